#!/usr/bin/env bash
# gpu/tests/compile-check.sh BUILD_DIR -- the GPU sources compile with the
# real device compilers, every CI run, on machines without a GPU.
#
# Host emulation (host-emulation-check.sh) runs the backend's logic with
# g++, where __global__ and __device__ mean nothing: a kernel calling a
# host-only function, a type the device compiler rejects or a warning that
# -Werror turns into an error would pass it and break the first GPU build.
# So, with -Werror everywhere:
#   hip       BUILD_DIR's eplb_backend_hip target (gpu/CMakeLists.txt: hipcc
#             for gfx90a and gfx940) is built; the .so must export
#             eplb_backend_hip_get_ops and carry code for both;
#   cuda      the eplb_backend_cuda target (nvcc, sm_80 + sm_90 + PTX);
#             exports eplb_backend_cuda_get_ops, SASS for both;
#   device_check  gpu/tests/device-check.sh --build-only against that .so:
#             the GPU check program builds with the real CUDA headers;
#   broken kernel (hipcc, nvcc)  a copy of the backend whose kernel calls a
#             host-only function (made by sed) must fail to compile, and say
#             so by name -- and must compile with g++ as host emulation,
#             which is why this suite exists.
# A compiler that is not installed, or a BUILD_DIR configured without its
# target, makes its checks "skipped" (tests/run.sh fails a skip under
# CI=true unless EPLB_ALLOW_SKIP names the suite, so CI cannot lose them
# quietly; a local tree configured before hipcc was installed just says so).  Prints each check's time; ends with
# "N passed, N failed[, N skipped]".
set -uo pipefail

build=${1:?usage: compile-check.sh BUILD_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0 skipped=0
src=$root/gpu/hip/eplb_backend_hip.hip
inc=(-I"$root/service/core" -I"$root/gpu" -I"$root/gpu/hip")

hipcc=$(command -v hipcc || true)
[ -x /opt/rocm/bin/hipcc ] && hipcc=/opt/rocm/bin/hipcc
nvcc=$(command -v nvcc || true)
[ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc

pass() { echo "PASS $1 ($2 s)"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }

# build_so NAME TARGET COMPILER SYMBOL ARCH...: build the target, check it.
build_so() {
    local name=$1 target=$2 compiler=$3 symbol=$4 t0=$SECONDS so a
    shift 4
    if [ -z "$compiler" ]; then
        skip "$name" "compiler not installed"
        return
    fi
    so=$build/lib$target.so
    if ! cmake --build "$build" --target "$target" >"$tmp/$target.log" 2>&1; then
        # make says "No rule to make target", ninja "unknown target".
        if grep -qE "No rule to make target|unknown target" "$tmp/$target.log"; then
            skip "$name" "$compiler is installed but $build has no $target target (configured with it OFF, or before the compiler was installed: reconfigure)"
        else
            grep -v rocm_agent_enumerator "$tmp/$target.log" | tail -40
            fail "$name" "the $target build failed"
        fi
        return
    fi
    nm -D --defined-only "$so" >"$tmp/$target.nm" 2>&1
    if ! grep -q " T $symbol\$" "$tmp/$target.nm"; then
        fail "$name" "$so does not export $symbol"
        return
    fi
    strings "$so" >"$tmp/$target.strings"
    for a in "$@"; do
        if ! grep -q -- "$a" "$tmp/$target.strings"; then
            fail "$name" "$so has no code for $a"
            return
        fi
    done
    pass "$name: $so ($*)" $((SECONDS - t0))
}

build_so "hip backend (hipcc -Werror)" eplb_backend_hip "$hipcc" eplb_backend_hip_get_ops gfx90a gfx940
build_so "cuda backend (nvcc -Werror all-warnings)" eplb_backend_cuda "$nvcc" eplb_backend_cuda_get_ops \
    "-arch sm_80" "-arch sm_90"

t0=$SECONDS
if [ -z "$nvcc" ]; then
    skip "device_check build (nvcc + gcc)" "nvcc not installed"
elif [ ! -f "$build/libeplb_backend_cuda.so" ]; then
    skip "device_check build (nvcc + gcc)" "no $build/libeplb_backend_cuda.so to build against"
elif NVCC=$nvcc EPLB_CUDA_BACKEND=$build/libeplb_backend_cuda.so \
        bash "$root/gpu/tests/device-check.sh" --build-only "$tmp/dc" >"$tmp/dc.log" 2>&1; then
    pass "device_check build (gpu/tests/device-check.sh --build-only)" $((SECONDS - t0))
else
    tail -40 "$tmp/dc.log"
    fail "device_check build (gpu/tests/device-check.sh --build-only)"
fi

# The broken copy: a host-only function, called from the copy kernel.
broken=$tmp/broken.hip
sed -e 's|^template <typename W>$|static uint64_t eplb_host_only_share() { return 0; }\n&|' \
    -e 's|^\(    const uint64_t lo = (uint64_t)blockIdx.x \* share\);$|\1 + eplb_host_only_share();|' \
    "$src" >"$broken"
if [ "$(grep -c eplb_host_only_share "$broken")" -ne 2 ]; then
    fail "broken kernel" "the sed no longer matches $src (update this script with the kernel)"
else
    t0=$SECONDS
    if g++ -DEPLB_HIP_ON_HOST -x c++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror "${inc[@]}" \
        "$broken" >"$tmp/host.log" 2>&1; then
        pass "broken kernel compiles as host emulation (g++ cannot catch it)" $((SECONDS - t0))
    else
        cat "$tmp/host.log"
        fail "broken kernel compiles as host emulation" "g++ rejected it: the sed broke more than the kernel"
    fi
    # expect_broken NAME COMPILER ARGS...: must fail, naming the function.
    expect_broken() {
        local name=$1 compiler=$2 t0=$SECONDS
        shift 2
        if [ -z "$compiler" ]; then
            skip "$name" "compiler not installed"
        elif "$compiler" "$@" >"$tmp/b.log" 2>&1; then
            fail "$name" "it compiled: device-only errors would reach the GPU machines"
        elif grep -q "eplb_host_only_share" "$tmp/b.log" && grep -q "__host__" "$tmp/b.log"; then
            pass "$name: \"$(grep -m1 -E 'error.*(__host__|eplb_host_only_share)' "$tmp/b.log" | sed 's/.*error[: #0-9-]*//' |
                head -c 140)\"" $((SECONDS - t0))
        else
            grep -v rocm_agent_enumerator "$tmp/b.log" | tail -20
            fail "$name" "it failed, but not on the host-only call"
        fi
    }
    expect_broken "broken kernel refused by hipcc" "$hipcc" --offload-arch=gfx90a -x hip \
        -std=c++17 -fPIC -shared -Wall -Wextra -Werror "${inc[@]}" "$broken" -o "$tmp/b.so"
    expect_broken "broken kernel refused by nvcc" "$nvcc" -x cu -DEPLB_HIP_ON_CUDA -std=c++17 \
        -shared -gencode arch=compute_90,code=sm_90 -Xcompiler=-fPIC -Werror all-warnings \
        "${inc[@]}" "$broken" -o "$tmp/b.so"
fi

if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
