#!/usr/bin/env bash
# gpu/tests/host-emulation-check.sh [OUT_DIR] -- runs gpu/tests/device_check.c
# against the hip backend built for the CPU (-DEPLB_HIP_ON_HOST, see
# gpu/hip/eplb_hip_compat.h): no GPU, no HIP, no CUDA needed, only gcc/g++.
#
# It checks the hip backend's host logic -- plan ops to chunk lists, staging
# per destination rank, peer vs hipMemcpyPeerAsync fallback (4 pretend
# devices, peers only within pairs), waves, fault injection and retry, IPC
# handles -- byte for byte against the cpu backend, and that device_check.c
# itself works.  It does not check the kernels on a GPU, their speed, or the
# real HIP/CUDA runtimes: gpu/tests/device-check.sh does, on an NVIDIA machine.
# Ends with "N passed, N failed".
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
cc=${CC:-gcc}
cxx=${CXX:-g++}
inc=(-I"$root/service/core" -I"$root/gpu" -I"$root/gpu/hip")
# The core's allocator, where the core has one (eplb_plan.c allocates through it).
core_extra=()
[[ -f "$root/service/core/eplb_alloc.c" ]] && core_extra+=("$root/service/core/eplb_alloc.c")

"$cxx" -DEPLB_HIP_ON_HOST -x c++ -std=c++17 -O2 -fPIC -shared -fvisibility=hidden \
    -Wall -Wextra -Werror "${inc[@]}" "$root/gpu/hip/eplb_backend_hip.hip" \
    -o "$out/libeplb_backend_hip.so"
"$cc" -std=c11 -O2 -Wall -Wextra -Werror -Wno-format-truncation \
    -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE "${inc[@]}" -I"$root/gpu/tests/host_emul" \
    "$root/service/core/eplb_status.c" "$root/service/core/eplb_plan.c" \
    "$root/gpu/eplb_backend.c" "$root/gpu/eplb_buffers.c" "$root/gpu/eplb_sigbus.c" \
    "$root/gpu/cpu/eplb_backend_cpu.c" "${core_extra[@]}" "$root/gpu/tests/device_check.c" \
    -ldl -lrt -lpthread -lm -o "$out/device_check"

EPLB_HOST_DEVICES=4 EPLB_HIP_BACKEND="$out/libeplb_backend_hip.so" timeout 300 "$out/device_check"
