#!/usr/bin/env bash
# test.sh -- set up, build (with tests) and run every test suite.
# Ends with "N passed, N failed"; exits non-zero when anything failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPLB_BUILD_DIR:-$root/build}
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -DEPLB_BUILD_TESTS=ON >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
exec bash "$root/tests/run.sh" "$build"
