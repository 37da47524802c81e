#!/usr/bin/env bash
# gpu/tests/device-check.sh [OUT_DIR] -- GPU check of the hip backend on an
# NVIDIA machine that has nvcc and a GPU but no HIP packages.
#
#   1. builds libeplb_backend_hip.so from gpu/hip/eplb_backend_hip.hip with
#      nvcc -x cu -DEPLB_HIP_ON_CUDA (static cudart; eplb_hip_compat.h maps
#      the hip* calls to CUDA), for the GPU present;
#   2. builds gpu/tests/device_check.c with the C compiler against eplb_core
#      + eplb_gpu sources and the static CUDA runtime;
#   3. runs it: correctness against the cpu backend (device pointers and
#      IPC handles from another process), fault injection, and copy
#      bandwidth vs cudaMemcpy device-to-device.
# Ends with the program's "N passed, N failed" line; exit status 0 only when
# everything passed (3: no CUDA device).  Budget: a few seconds to build,
# well under a minute to run on one H100; hard limit 270 s.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
cuda=${CUDA_HOME:-/usr/local/cuda}
nvcc=${NVCC:-$cuda/bin/nvcc}
cc=${CC:-gcc}

command -v "$nvcc" >/dev/null || { echo "nvcc not found (set NVCC or CUDA_HOME)"; exit 2; }
"$nvcc" --version | tail -1
nvidia-smi --query-gpu=index,name,compute_cap,memory.total --format=csv,noheader || true

# The GPU's architecture, e.g. 9.0 -> sm_90 (plus PTX for it); else native.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
      head -1 | tr -d ' .' || true)
if [[ "$cap" =~ ^[0-9]+$ ]]; then
    arch=(-gencode "arch=compute_${cap},code=sm_${cap}"
          -gencode "arch=compute_${cap},code=compute_${cap}")
else
    arch=(-arch=native)
fi

inc=(-I"$root/service/core" -I"$root/gpu" -I"$root/gpu/hip")
# The core's allocator, where the core has one (eplb_plan.c allocates through it).
core_extra=()
[[ -f "$root/service/core/eplb_alloc.c" ]] && core_extra+=("$root/service/core/eplb_alloc.c")
t0=$(date +%s)
"$nvcc" -x cu -DEPLB_HIP_ON_CUDA -std=c++17 -O3 -shared -cudart static "${arch[@]}" \
    -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra -Werror all-warnings \
    "${inc[@]}" "$root/gpu/hip/eplb_backend_hip.hip" -o "$out/libeplb_backend_hip.so" -ldl
"$cc" -std=c11 -O2 -Wall -Wextra -Werror -Wno-format-truncation \
    -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE "${inc[@]}" -I"$cuda/include" \
    "$root/service/core/eplb_status.c" "$root/service/core/eplb_plan.c" \
    "$root/gpu/eplb_backend.c" "$root/gpu/eplb_buffers.c" "$root/gpu/eplb_sigbus.c" \
    "$root/gpu/cpu/eplb_backend_cpu.c" "${core_extra[@]}" "$root/gpu/tests/device_check.c" \
    "$cuda/lib64/libcudart_static.a" -ldl -lrt -lpthread -lm -o "$out/device_check"
echo "built in $(( $(date +%s) - t0 )) s: $out/libeplb_backend_hip.so $out/device_check"

EPLB_HIP_BACKEND="$out/libeplb_backend_hip.so" timeout 270 "$out/device_check"
