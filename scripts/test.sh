#!/usr/bin/env bash
# test.sh -- set up, build and run every test suite (docs/testing.md):
#   build/        the plain tree: every suite (tests/run.sh)
#   build-asan/   EPLB_SANITIZE=address,undefined: the unit and integration
#                 suites again
#   build-tsan/   EPLB_SANITIZE=thread: eplbd, under the integration suites, and
#                 two_threads_driver (the two-thread search's random cases)
#   build-fuzz/   EPLB_FUZZ (clang-14): one libFuzzer target per RPC, each
#                 run for EPLB_FUZZ_SECONDS (default 20)
# Each tree is configured once and builds only what its suites run; every
# stage prints how long it took.  Ends with "N passed, N failed"; exits
# non-zero when anything failed.
#
# EPLB_TEST_STAGES (default "plain asan tsan fuzz") picks the stages for a
# quicker local run (tests/run.sh honours it too); the plain tree is always
# built, since the TSan stage runs its integration binaries.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPLB_BUILD_DIR:-$root/build}
asan=${EPLB_ASAN_BUILD_DIR:-$root/build-asan}
tsan=${EPLB_TSAN_BUILD_DIR:-$root/build-tsan}
fuzz=${EPLB_FUZZ_BUILD_DIR:-$root/build-fuzz}
stages=" ${EPLB_TEST_STAGES:-plain asan tsan fuzz} "
jobs=$(nproc)
out=$(mktemp)
trap 'rm -f "$out"' EXIT

want() { [[ $stages == *" $1 "* ]]; }

# step NAME CMD...: run quietly, print the time; on failure the output's tail.
step() {
    local name=$1 t0=$SECONDS
    shift
    if ! "$@" >"$out" 2>&1; then
        tail -n 80 "$out"
        echo "test.sh: $name failed" >&2
        exit 1
    fi
    echo "test.sh: $name: $((SECONDS - t0)) s"
}

# configure BUILD ARGS...: cmake once; later runs only build.
configure() {
    local dir=$1
    shift
    if [ -f "$dir/CMakeCache.txt" ]; then
        cmake "$dir" "$@"
    else
        cmake -S "$root" -B "$dir" "$@"
    fi
}

step "setup" bash "$root/scripts/setup.sh" --test

step "configure build" configure "$build" -DEPLB_BUILD_TESTS=ON
step "build build" cmake --build "$build" -j "$jobs"
args=("$build")

# No GPU .so in the sanitizer trees: they are dlopen'd, never instrumented, and
# their host code is checked by the plain tree's suites.
if want asan; then
    step "configure build-asan" configure "$asan" -DEPLB_SANITIZE=address,undefined -DEPLB_BUILD_TESTS=ON \
        -DEPLB_HIP=OFF -DEPLB_CUDA=OFF
    step "build build-asan" cmake --build "$asan" -j "$jobs" --target eplb_test_binaries
    args+=(--asan "$asan")
fi
if want tsan; then
    step "configure build-tsan" configure "$tsan" -DEPLB_SANITIZE=thread -DEPLB_BUILD_TESTS=OFF -DEPLB_HIP=OFF -DEPLB_CUDA=OFF
    step "build build-tsan" cmake --build "$tsan" -j "$jobs" --target eplbd two_threads_driver
    args+=(--tsan "$tsan")
fi
if want fuzz; then
    step "configure build-fuzz" configure "$fuzz" -DCMAKE_C_COMPILER=clang-14 -DEPLB_FUZZ=ON \
        -DEPLB_BUILD_TESTS=OFF -DEPLB_HIP=OFF -DEPLB_CUDA=OFF
    step "build build-fuzz" cmake --build "$fuzz" -j "$jobs" --target eplb_fuzz_targets
    args+=(--fuzz "$fuzz")
fi

exec bash "$root/tests/run.sh" "${args[@]}"
