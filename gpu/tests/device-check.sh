#!/usr/bin/env bash
# gpu/tests/device-check.sh [--build-only] [OUT_DIR] -- GPU check of the cuda
# backend on an NVIDIA machine (nvcc + a GPU; no HIP packages needed).
#
#   1. builds libeplb_backend_cuda.so from gpu/hip/eplb_backend_hip.hip as
#      gpu/CMakeLists.txt does (nvcc -x cu -DEPLB_HIP_ON_CUDA, static cudart,
#      -Werror all-warnings, SASS for $EPLB_CUDA_ARCHS -- default 80 90, plus
#      the present GPU's -- and PTX of the last), unless $EPLB_CUDA_BACKEND
#      names one already built;
#   2. builds gpu/tests/device_check.c with the C compiler against the
#      eplb_core + eplb_gpu sources and the static CUDA runtime;
#   3. runs it (not with --build-only): correctness against the cpu backend
#      and computed images (regions at offsets, several per rank, a held
#      subset of ranks, 16- and 4-byte paths, peer copies with >= 2 GPUs),
#      open refusals, fault injection, CUDA IPC from an engine child
#      process, and bandwidth vs cudaMemcpy device-to-device (pass >= 80%).
# --build-only builds without a GPU (tests/run.sh does, every run, so this
# file and device_check.c cannot rot on machines without one).
# Ends with the program's "N passed, N failed" line; exit status 0 only when
# everything passed (3: no CUDA device).  Budget: a few seconds to build,
# well under a minute to run on one H100/H200; hard limit 270 s.
set -euo pipefail

build_only=0
if [ "${1:-}" = "--build-only" ]; then
    build_only=1
    shift
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
cuda=${CUDA_HOME:-/usr/local/cuda}
nvcc=${NVCC:-$cuda/bin/nvcc}
cc=${CC:-gcc}

command -v "$nvcc" >/dev/null || { echo "nvcc not found (set NVCC or CUDA_HOME)"; exit 2; }
"$nvcc" --version | tail -1
read -ra sms <<<"${EPLB_CUDA_ARCHS:-80 90}"
if [ "$build_only" -eq 0 ]; then
    nvidia-smi --query-gpu=index,name,compute_cap,memory.total --format=csv,noheader || true
    # The present GPU's SM (e.g. 9.0 -> 90) when the list lacks it.
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
          head -1 | tr -d ' .' || true)
    if [[ "$cap" =~ ^[0-9]+$ ]] && [[ " ${sms[*]} " != *" $cap "* ]]; then
        sms+=("$cap")
    fi
fi
arch=()
for sm in "${sms[@]}"; do
    arch+=(-gencode "arch=compute_${sm},code=sm_${sm}")
done
arch+=(-gencode "arch=compute_${sms[-1]},code=compute_${sms[-1]}")

inc=(-I"$root/service/core" -I"$root/gpu" -I"$root/gpu/hip")
# The core's allocator, where the core has one (eplb_plan.c allocates through it).
core_extra=()
[[ -f "$root/service/core/eplb_alloc.c" ]] && core_extra+=("$root/service/core/eplb_alloc.c")
t0=$(date +%s)
so=${EPLB_CUDA_BACKEND:-}
if [ -z "$so" ]; then
    so=$out/libeplb_backend_cuda.so
    "$nvcc" -x cu -DEPLB_HIP_ON_CUDA -std=c++17 -O3 -shared -cudart static "${arch[@]}" \
        -Xcompiler=-fPIC,-fvisibility=hidden,-Wall,-Wextra -Werror all-warnings \
        "${inc[@]}" "$root/gpu/hip/eplb_backend_hip.hip" -o "$so" -ldl
fi
"$cc" -std=c11 -O2 -Wall -Wextra -Werror -Wno-format-truncation \
    -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE "${inc[@]}" -I"$cuda/include" \
    "$root/service/core/eplb_status.c" "$root/service/core/eplb_plan.c" \
    "$root/gpu/eplb_backend.c" "$root/gpu/eplb_buffers.c" "$root/gpu/eplb_sigbus.c" \
    "$root/gpu/cpu/eplb_backend_cpu.c" "${core_extra[@]}" "$root/gpu/tests/device_check.c" \
    "$cuda/lib64/libcudart_static.a" -ldl -lrt -lpthread -lm -o "$out/device_check"
echo "built in $(( $(date +%s) - t0 )) s: $so $out/device_check"
[ "$build_only" -eq 1 ] && exit 0

# Only the backend under test: a HIP .so next to nothing, so auto means cuda.
EPLB_DEVICE_CHECK_BACKEND=cuda EPLB_CUDA_BACKEND="$so" EPLB_HIP_BACKEND="$out/absent.so" \
    timeout 270 "$out/device_check"
