#!/usr/bin/env bash
# tests/run.sh BUILD_DIR -- run every test suite against a built tree and
# end with one line "N passed, N failed" (plus skipped, when any).
#
# Suites: the Criterion binaries (unit, store, integration), the Python
# grpcio client, the integration tests again with eplbd under valgrind, and
# the container and deployment checks when they are present.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
passed=0 failed=0 skipped=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

banner() { printf '\n==== %s\n' "$*"; }

# A Criterion binary: count from its "Synthesis" line; no line = it crashed.
criterion() {
    local name=$1; shift
    banner "$name"
    "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    local line
    line=$(grep -a 'Synthesis: Tested:' "$log" | tail -1)
    if [ -z "$line" ]; then
        echo "$name: no Criterion summary (exit $rc)"
        failed=$((failed + 1))
        return
    fi
    local p f c
    p=$(sed -E 's/.*Passing: ([0-9]+).*/\1/' <<<"$line")
    f=$(sed -E 's/.*Failing: ([0-9]+).*/\1/' <<<"$line")
    c=$(sed -E 's/.*Crashing: ([0-9]+).*/\1/' <<<"$line")
    passed=$((passed + p))
    failed=$((failed + f + c))
    if [ "$rc" -ne 0 ] && [ $((f + c)) -eq 0 ]; then
        echo "$name: exit $rc with no failing test"
        failed=$((failed + 1))
    fi
}

# A script whose last line is "N passed, N failed[, N skipped]".
counted() {
    local name=$1; shift
    banner "$name"
    "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    local line
    line=$(grep -aE '^[A-Za-z-]*:? ?[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    if [ -z "$line" ]; then
        echo "$name: no summary line (exit $rc)"
        failed=$((failed + 1))
        return
    fi
    local p f s
    p=$(sed -E 's/.*[^0-9]?([0-9]+) passed.*/\1/' <<<"$line")
    f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
    s=$(grep -oE '[0-9]+ skipped' <<<"$line" | grep -oE '[0-9]+' || echo 0)
    passed=$((passed + p))
    failed=$((failed + f))
    skipped=$((skipped + s))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "$name: exit $rc with no failing test"
        failed=$((failed + 1))
    fi
}

# unittest: "Ran N tests" then "OK" or "FAILED (failures=a, errors=b)".
python_unittest() {
    local name=$1; shift
    banner "$name"
    "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    local ran bad
    ran=$(grep -aoE '^Ran [0-9]+ test' "$log" | grep -oE '[0-9]+' | tail -1)
    if [ -z "$ran" ]; then
        echo "$name: no unittest summary (exit $rc)"
        failed=$((failed + 1))
        return
    fi
    bad=0
    for k in failures errors; do
        n=$(grep -aoE "$k=[0-9]+" "$log" | grep -oE '[0-9]+' | tail -1)
        bad=$((bad + ${n:-0}))
    done
    [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ] && bad=1
    passed=$((passed + ran - bad))
    failed=$((failed + bad))
}

for t in "$build"/tests/test_*; do
    [ -x "$t" ] || continue
    criterion "$(basename "$t")" "$t" --jobs 2
done

python_unittest "python grpcio client" /usr/bin/python3 "$root/tests/integration/test_python_client.py" "$build"

# The integration path again with eplbd under valgrind: any invalid access or
# definite/indirect leak makes eplbd exit 99 at SIGTERM, which the harness
# reports as a failed test.
if command -v valgrind >/dev/null; then
    for t in test_server test_engine_rpc test_weights_rpc; do
        EPLBD_WRAPPER="valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect" \
            criterion "$t (eplbd under valgrind)" "$build/tests/$t" --jobs 2
    done
else
    echo "valgrind not installed: skipping the valgrind pass"
    skipped=$((skipped + 1))
fi

# The HIP backend's host code with its kernels emulated on the CPU, compared
# byte for byte with the CPU backend; on a machine with an NVIDIA GPU, the
# same kernels for real (HIP-on-CUDA).
counted "hip backend (host emulation)" bash "$root/gpu/tests/host-emulation-check.sh"
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    counted "hip backend (GPU)" bash "$root/gpu/tests/device-check.sh"
fi

[ -f "$root/tests/deploy/check.sh" ] && counted "deployment manifests" bash "$root/tests/deploy/check.sh"
[ -f "$root/tests/container/check.sh" ] && counted "container image" bash "$root/tests/container/check.sh" "$build"

echo
if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
