#!/usr/bin/env bash
# gpu/tests/host-emulation-check.sh [OUT_DIR] -- runs gpu/tests/device_check.c
# against the GPU backend built for the CPU (-DEPLB_HIP_ON_HOST, see
# gpu/hip/eplb_hip_compat.h): no GPU, no HIP, no CUDA needed, only gcc/g++.
#
# It checks the backend's host logic -- regions per rank mapped and checked
# (size against the allocation, the device it is on), plan ops to copy
# lists, the per-block work split, staging per device, held-rank subsets,
# peer vs hipMemcpyPeerAsync fallback (4 pretend devices, peers only within
# pairs; one pair's enabling made to fail), waves, fault injection and
# retry, a sticky device error, IPC handles -- byte for byte against the cpu
# backend and images computed by the test, and that device_check.c itself
# works.  Twice: as the "hip" build and as the "cuda" build (its symbol, name
# and IPC kind; the loader's hip-then-cuda order for auto).  It does not
# check the kernels on a GPU, their speed, or the real HIP/CUDA runtimes:
# gpu/tests/device-check.sh does, on an NVIDIA machine.
# Ends with "N passed, N failed" (the sum of both runs).
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

for flavour in hip cuda; do
    defs=(-DEPLB_HIP_ON_HOST)
    [ "$flavour" = cuda ] && defs+=(-DEPLB_HIP_ON_HOST_AS_CUDA)
    "$cxx" "${defs[@]}" -x c++ -std=c++17 -O2 -fPIC -shared -fvisibility=hidden \
        -Wall -Wextra -Werror "${inc[@]}" "$root/gpu/hip/eplb_backend_hip.hip" \
        -o "$out/libeplb_backend_$flavour.so" -ldl &
done
# -rdynamic: the emulated runtime in the .so finds the test's allocations
# (gpu/tests/host_emul/cuda_runtime_api.h).
"$cc" -std=c11 -O2 -Wall -Wextra -Werror -Wno-format-truncation -rdynamic \
    -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE "${inc[@]}" -I"$root/gpu/tests/host_emul" \
    "$root/service/core/eplb_status.c" "$root/service/core/eplb_plan.c" \
    "$root/gpu/eplb_backend.c" "$root/gpu/eplb_buffers.c" "$root/gpu/eplb_sigbus.c" \
    "$root/gpu/cpu/eplb_backend_cpu.c" "${core_extra[@]}" "$root/gpu/tests/device_check.c" \
    -ldl -lrt -lpthread -lm -o "$out/device_check"
wait %1 && wait %2

p=0 f=0 rc=0
for flavour in hip cuda; do
    echo "== $flavour build (host emulation)"
    # hip: both .so present, auto must pick hip (it is tried first);
    # cuda: the hip one absent, auto must fall through to cuda.
    hip_so=$out/libeplb_backend_hip.so
    [ "$flavour" = cuda ] && hip_so=$out/absent/libeplb_backend_hip.so
    set +e
    EPLB_HOST_DEVICES=4 EPLB_DEVICE_CHECK_BACKEND=$flavour EPLB_HIP_BACKEND=$hip_so \
        EPLB_CUDA_BACKEND="$out/libeplb_backend_cuda.so" timeout 300 "$out/device_check" \
        | tee "$out/$flavour.log"
    r=${PIPESTATUS[0]}
    set -e
    [ "$r" -ne 0 ] && rc=$r
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out/$flavour.log" | tail -1 || true)
    if [[ $line =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
        p=$((p + BASH_REMATCH[1])) f=$((f + BASH_REMATCH[2]))
    else
        echo "FAIL $flavour build: device_check gave no summary (exit $r)"
        f=$((f + 1))
    fi
done
echo "$p passed, $f failed"
[ "$rc" -eq 0 ] && [ "$f" -eq 0 ]
