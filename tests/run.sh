#!/usr/bin/env bash
# tests/run.sh BUILD_DIR [--asan DIR] [--tsan DIR] [--fuzz DIR]
#   Run every test suite against built trees and end with one line
#   "N passed, N failed" (", N skipped" only when some were); exit non-zero
#   when anything failed.
# tests/run.sh --self-test
#   Check the counting below against fixtures (also run first by every run).
#
# Suites: the Criterion binaries (unit, store, gpu, integration), the Python
# grpcio client, the integration tests again with eplbd under valgrind, the
# GPU backend checks (host emulation; the real hipcc and nvcc builds with
# -Werror, and a broken kernel they must refuse; on a machine with an NVIDIA
# GPU, the device check), the container and deployment checks when present; with
# --asan, the unit and integration suites of an EPLB_SANITIZE=address,undefined
# tree; with --tsan, the integration suites against an EPLB_SANITIZE=thread
# eplbd; with --fuzz, every libFuzzer target of an EPLB_FUZZ tree for
# EPLB_FUZZ_SECONDS (default 20) each.  docs/testing.md has the details.
#
# Counting comes from machine-readable results, never from prose: Criterion's
# --json file, JUnit XML written by the Python runner below, exit statuses,
# sanitizer and valgrind report files.  Scripts this file does not own
# (gpu/, tests/deploy, tests/container) end with a "N passed, N failed[, N
# skipped]" line, which is parsed with a bounded pattern.
#
# EPLB_TEST_STAGES (default "plain asan tsan fuzz") picks the stages to run.
#
# A skipped suite fails the run when CI=true (a missing tool must not pass
# quietly), unless its name is listed in EPLB_ALLOW_SKIP (comma-separated).
set -uo pipefail

# Used as EPLBD_WRAPPER by the TSan stage: the harness puts the wrapper in
# front of its own eplbd path; run the sanitizer build's eplbd instead.
if [ "${1:-}" = "--exec-instead" ]; then
    real=$2
    shift 3
    exec "$real" "$@"
fi

root=$(cd "$(dirname "$0")/.." && pwd)
py=/usr/bin/python3
passed=0 failed=0 skipped=0
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
log=$results/log

banner() { printf '\n==== %s\n' "$*"; }

# ---- counting ---------------------------------------------------------------
# Each count_* prints "PASSED FAILED SKIPPED" for one result file, or fails
# when there is none or it cannot be read.

# Criterion's --json=FILE: top-level totals; "errored" are crashes.
count_criterion() {
    [ -s "$1" ] || return 1
    "$py" - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(int(d["passed"]), int(d["failed"]) + int(d["errored"]), int(d["skipped"]))
PY
}

# JUnit XML (one <testsuite> or several in <testsuites>): one count per
# <testcase>: failure or error, skipped, else passed.
count_junit() {
    [ -s "$1" ] || return 1
    "$py" - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
p = f = s = 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    tags = {child.tag for child in case}
    if tags & {"failure", "error"}:
        f += 1
    elif "skipped" in tags:
        s += 1
    else:
        p += 1
print(p, f, s)
PY
}

# The last "N passed, N failed[, N skipped]" line of a script's output; the
# count must start at a word boundary ("12 passed" is 12, never 2).
count_summary() {
    [ -f "$1" ] || return 1
    local line re='(^|[^0-9])([0-9]+) passed, ([0-9]+) failed(, ([0-9]+) skipped)?[[:space:]]*$'
    line=$(grep -aE '[0-9]+ passed, [0-9]+ failed' "$1" | tail -1)
    [[ $line =~ $re ]] || return 1
    echo "${BASH_REMATCH[2]} ${BASH_REMATCH[3]} ${BASH_REMATCH[5]:-0}"
}

# The final line.
summary_line() {
    if [ "$3" -gt 0 ]; then
        echo "$1 passed, $2 failed, $3 skipped"
    else
        echo "$1 passed, $2 failed"
    fi
}

skip_allowed() {
    local name=$1 allowed
    IFS=, read -ra allowed <<<"${EPLB_ALLOW_SKIP:-}"
    for a in "${allowed[@]}"; do
        [ "$a" = "$name" ] && return 0
    done
    return 1
}

# A suite that did not run (or ran and reported n skipped tests).
skip() {
    local name=$1 n=$2 why=$3
    if [ "${CI:-}" = "true" ] && ! skip_allowed "$name"; then
        echo "FAIL $name: $n skipped with CI=true ($why); EPLB_ALLOW_SKIP=\"$name\" accepts it"
        failed=$((failed + n))
    else
        echo "SKIP $name: $why"
        skipped=$((skipped + n))
    fi
}

# suite NAME KIND RESULT CMD...: run CMD, count RESULT with count_KIND
# ("summary": RESULT is the command's own output).  A command that fails with
# no failing test counted, a result that cannot be read, or a suite with no
# test at all count as one failure.
suite() {
    local name=$1 kind=$2 result=$3 t0=$SECONDS rc counts p f s
    shift 3
    banner "$name"
    if [ "$kind" = summary ]; then
        result=$log
    else
        rm -f "$result"
    fi
    "$@" >"$log" 2>&1
    rc=$?
    cat "$log"
    if ! counts=$(count_$kind "$result" 2>&1); then
        echo "FAIL $name: no $kind result (exit $rc)${counts:+: $counts}"
        failed=$((failed + 1))
        return
    fi
    read -r p f s <<<"$counts"
    passed=$((passed + p))
    failed=$((failed + f))
    [ "$s" -gt 0 ] && skip "$name" "$s" "the suite reported $s skipped"
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $name: exit $rc with no failing test"
        failed=$((failed + 1))
    elif [ $((p + f + s)) -eq 0 ]; then
        echo "FAIL $name: no test ran"
        failed=$((failed + 1))
    fi
    printf -- '---- %s: %s (%d s)\n' "$name" "$(summary_line "$p" "$f" "$s")" $((SECONDS - t0))
}

criterion() { # NAME BINARY [ARGS...]
    local name=$1 bin=$2 json=$results/criterion.json
    shift 2
    suite "$name" criterion "$json" "$bin" --jobs 2 --json="$json" "$@"
}

# Run a Python unittest script as __main__ (its own set-up and clean-up
# run), with a result class that writes JUnit XML to $1.
python_junit() { # XML SCRIPT [ARGS...]
    "$py" - "$@" <<'PY'
import os, runpy, sys, time, traceback, unittest
import xml.etree.ElementTree as ET

xml_path, script = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
cases = []  # (classname, name, outcome, text, seconds)


class Result(unittest.TextTestResult):
    def startTest(self, test):
        self._t0 = time.time()
        super().startTest(test)

    def _add(self, test, outcome, text=""):
        cls, _, name = test.id().rpartition(".")
        cases.append((cls, name, outcome, text, time.time() - getattr(self, "_t0", time.time())))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._add(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._add(test, "failure", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._add(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._add(test, "skipped", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._add(test, "passed")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._add(test, "failure", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            bad = "failure" if issubclass(err[0], test.failureException) else "error"
            self._add(subtest, bad, self._exc_info_to_string(err, test))


class Runner(unittest.TextTestRunner):
    resultclass = Result


def main(*args, **kw):
    kw.setdefault("testRunner", Runner)
    kw["exit"] = False
    return unittest.TestProgram(*args, **kw)


unittest.main = main
try:
    runpy.run_path(script, run_name="__main__")
except BaseException:
    traceback.print_exc()
    cases.append(("", "run " + os.path.basename(script), "error", traceback.format_exc(), 0.0))

bad = sum(1 for c in cases if c[2] in ("failure", "error"))
top = ET.Element("testsuite", name=os.path.basename(script), tests=str(len(cases)),
                 failures=str(sum(1 for c in cases if c[2] == "failure")),
                 errors=str(sum(1 for c in cases if c[2] == "error")),
                 skipped=str(sum(1 for c in cases if c[2] == "skipped")))
for cls, name, outcome, text, secs in cases:
    case = ET.SubElement(top, "testcase", classname=cls, name=name, time="%.3f" % secs)
    if outcome != "passed":
        ET.SubElement(case, outcome, message=text.strip().splitlines()[-1][:200] if text.strip() else outcome).text = text
ET.ElementTree(top).write(xml_path, encoding="utf-8", xml_declaration=True)
sys.exit(1 if bad else 0)
PY
}

python_suite() { # NAME SCRIPT [ARGS...]
    local name=$1 xml=$results/junit.xml
    shift
    suite "$name" junit "$xml" python_junit "$xml" "$@"
}

# ---- sanitizer and valgrind report files -------------------------------------
# Reports go to files (log_path, --log-file), one per process: eplbd's own
# stderr is a log the harness deletes, and Criterion ignores what a test's
# process reports after the test passed (a leak at exit) or in .fini.  Each
# report file is printed and counts as one failure of the suite that ran.
reports_dir=""

count_reports() { # NAME
    local name=$1 f n=0
    [ -n "$reports_dir" ] || return 0
    for f in "$reports_dir"/*; do
        [ -s "$f" ] || { rm -f "$f"; continue; }
        echo "---- $name: report $(basename "$f"):"
        head -n 200 "$f"
        rm -f "$f"
        n=$((n + 1))
    done
    if [ "$n" -gt 0 ]; then
        echo "FAIL $name: $n sanitizer/valgrind report(s)"
        failed=$((failed + n))
    fi
}

reports_begin() { # DIR
    reports_dir=$1
    rm -rf "$reports_dir"
    mkdir -p "$reports_dir"
}

reports_end() {
    reports_dir=""
}

# ---- self-test of the counting ------------------------------------------------
self_test() {
    local dir=$results/self-test ok=0 bad=0
    mkdir -p "$dir"
    check() { # WHAT EXPECTED ACTUAL
        if [ "$2" = "$3" ]; then
            ok=$((ok + 1))
        else
            echo "self-test FAIL: $1: want '$2', got '$3'"
            bad=$((bad + 1))
        fi
    }
    printf 'building\n12 passed, 0 failed\n' >"$dir/a"
    check "summary '12 passed'" "12 0 0" "$(count_summary "$dir/a")"
    printf 'hip backend (host emulation): 12 passed, 3 failed, 2 skipped\n' >"$dir/b"
    check "summary with a prefix and skips" "12 3 2" "$(count_summary "$dir/b")"
    printf '100 passed, 1 failed\nSKIP x\n0 passed, 0 failed, 1 skipped\n' >"$dir/c"
    check "summary: the last line counts" "0 0 1" "$(count_summary "$dir/c")"
    printf 'check 3: 7 passed, 10 failed\n' >"$dir/d"
    check "summary after digits" "7 10 0" "$(count_summary "$dir/d")"
    printf 'no summary here\n' >"$dir/e"
    check "summary missing" "fail" "$(count_summary "$dir/e" || echo fail)"
    cat >"$dir/f.json" <<'EOF'
{"id": "Criterion v2.4.1", "passed": 12, "failed": 1, "errored": 2, "skipped": 3,
 "test_suites": [{"name": "s", "passed": 12, "failed": 1, "errored": 2, "skipped": 3, "tests": []}]}
EOF
    check "criterion json" "12 3 3" "$(count_criterion "$dir/f.json")"
    printf '{"passed": 1, "failed"' >"$dir/g.json"
    check "criterion json truncated" "fail" "$(count_criterion "$dir/g.json" 2>/dev/null || echo fail)"
    check "criterion json missing" "fail" "$(count_criterion "$dir/none.json" || echo fail)"
    {
        echo '<?xml version="1.0"?><testsuites><testsuite name="a">'
        for i in $(seq 12); do echo "<testcase classname=\"c\" name=\"t$i\"/>"; done
        echo '<testcase name="f"><failure message="x">trace</failure></testcase>'
        echo '<testcase name="e"><error message="y"/></testcase></testsuite>'
        echo '<testsuite name="b"><testcase name="s"><skipped/></testcase></testsuite></testsuites>'
    } >"$dir/h.xml"
    check "junit xml" "12 2 1" "$(count_junit "$dir/h.xml")"
    check "final line" "12 passed, 0 failed" "$(summary_line 12 0 0)"
    check "final line with skips" "12 passed, 1 failed, 2 skipped" "$(summary_line 12 1 2)"
    # A skipped suite fails CI (and only then), unless allowed by name.
    local p0=$passed f0=$failed s0=$skipped
    failed=0 skipped=0
    CI=true skip "tool-x" 1 "not installed" >/dev/null
    check "skip with CI=true fails" "1 0" "$failed $skipped"
    failed=0 skipped=0
    CI=true EPLB_ALLOW_SKIP="other,tool-x" skip "tool-x" 1 "not installed" >/dev/null
    check "skip with CI=true, allowed" "0 1" "$failed $skipped"
    failed=0 skipped=0
    CI= skip "tool-x" 1 "not installed" >/dev/null
    check "skip without CI" "0 1" "$failed $skipped"
    passed=$p0 failed=$f0 skipped=$s0
    # The Python runner: JUnit XML from a unittest script run as __main__.
    cat >"$dir/t.py" <<'EOF'
import unittest
class T(unittest.TestCase):
    def test_ok(self): pass
    def test_ok2(self): pass
    def test_fail(self): self.fail("x")
    @unittest.skip("why")
    def test_skip(self): pass
if __name__ == "__main__":
    unittest.main(verbosity=2)
EOF
    python_junit "$dir/t.xml" "$dir/t.py" >/dev/null 2>&1
    check "python runner exit" "1" "$?"
    check "python runner junit" "2 1 1" "$(count_junit "$dir/t.xml")"
    echo "count self-test: $ok passed, $bad failed"
    [ "$bad" -eq 0 ]
}

if [ "${1:-}" = "--self-test" ]; then
    self_test
    exit
fi

# ---- arguments ------------------------------------------------------------------
build=$(cd "${1:-$root/build}" && pwd) || exit 1
[ $# -gt 0 ] && shift
asan="" tsan="" fuzz=""
while [ $# -gt 0 ]; do
    case $1 in
    --asan) asan=$(cd "$2" && pwd) || exit 1; shift 2 ;;
    --tsan) tsan=$(cd "$2" && pwd) || exit 1; shift 2 ;;
    --fuzz) fuzz=$(cd "$2" && pwd) || exit 1; shift 2 ;;
    *) echo "tests/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

stage_t0=$SECONDS
stage_name=""
stage() { # NAME: close the previous stage (print its time), open the next
    [ -n "$stage_name" ] && printf '\n#### stage %s: %d s\n' "$stage_name" $((SECONDS - stage_t0))
    stage_name=$1
    stage_t0=$SECONDS
    [ -n "$stage_name" ] && printf '\n#### stage %s\n' "$stage_name"
}

# eplbd under concurrent calls, which no integration test makes: the plain
# tree's bench_rpc (client threads, each Rebalance-ing its own model, dry
# runs and commits) against EPLBD.  One test: it passes when every call
# succeeded (bench_rpc's exit status) and eplbd exited 0 at SIGTERM.
load_suite() { # NAME EPLBD
    local name=$1 bin=$2 bench=$build/bench/bench_rpc t0=$SECONDS dir pid addr="" brc erc
    banner "$name"
    if [ ! -x "$bench" ] || [ ! -x "$bin" ]; then
        echo "FAIL $name: $bench or $bin is missing"
        failed=$((failed + 1))
        return
    fi
    dir=$(mktemp -d -p "$results")
    "$bin" --listen 127.0.0.1:0 --db "$dir/eplbd.db" --ready-file "$dir/ready" --workers 4 \
        >/dev/null 2>"$dir/eplbd.log" &
    pid=$!
    for _ in $(seq 600); do
        [ -s "$dir/ready" ] && { addr=$(cat "$dir/ready"); break; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        tail -n 20 "$dir/eplbd.log"
        echo "FAIL $name: eplbd did not start"
        failed=$((failed + 1))
        return
    fi
    timeout 600 "$bench" "$addr" 4 25 2 16 20 1 1 4
    brc=$?
    # DeepSeek-V3 size too, dry runs only (a model of that size takes
    # 231 MiB of state): the policy's and the packed decoder's full-size
    # paths under the sanitizers, with calls at once.
    if [ "$brc" -eq 0 ]; then
        BENCH_RPC_MODES=dry-run timeout 600 "$bench" "$addr" 4 10
        brc=$?
    fi
    kill -TERM "$pid"
    wait "$pid"
    erc=$?
    if [ "$brc" -eq 0 ] && [ "$erc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "---- $name: passed ($((SECONDS - t0)) s)"
    else
        tail -n 20 "$dir/eplbd.log"
        echo "FAIL $name: bench_rpc exit $brc, eplbd exit $erc at SIGTERM"
        failed=$((failed + 1))
    fi
}

integration_tests() { # BUILD: the integration Criterion binaries there
    local src
    for src in "$root"/tests/integration/test_*.c; do
        src=$(basename "$src" .c)
        [ -x "$1/tests/$src" ] && echo "$src"
    done
}

stages=" ${EPLB_TEST_STAGES:-plain asan tsan fuzz} "
want() { [[ $stages == *" $1 "* ]]; }

# A stage whose tree was not given, or that EPLB_TEST_STAGES leaves out,
# is a skipped suite (so it fails CI).
stage_skipped() { # STAGE DIR OPTION
    if [ -z "$2" ]; then
        skip "$1 stage" 1 "no $3 tree given (scripts/test.sh builds it)"
    elif ! want "$1"; then
        skip "$1 stage" 1 "left out by EPLB_TEST_STAGES"
    fi
}
stage_skipped asan "$asan" --asan
stage_skipped tsan "$tsan" --tsan
stage_skipped fuzz "$fuzz" --fuzz
want plain || skip "plain stage" 1 "left out by EPLB_TEST_STAGES"

# ---- the counting itself ---------------------------------------------------------
banner "count self-test"
self_test >"$results/self-test.out"
cat "$results/self-test.out"
if read -r p f _ < <(count_summary "$results/self-test.out"); then
    passed=$((passed + p)) failed=$((failed + f))
else
    echo "FAIL count self-test: no summary"
    failed=$((failed + 1))
fi

# ---- plain build ------------------------------------------------------------------
if want plain; then
stage "plain"

for t in "$build"/tests/test_*; do
    [ -x "$t" ] || continue
    criterion "$(basename "$t")" "$t"
done

python_suite "python grpcio client" "$root/tests/integration/test_python_client.py" "$build"
python_suite "health watch and reflection" "$root/tests/integration/test_discovery.py" "$build"
python_suite "engine-held weights, stepped rebalance" "$root/tests/integration/test_weights_engine.py" "$build"
python_suite "placement files, report, eplbctl" "$root/tests/integration/test_placement_files.py" "$build"
python_suite "engine-executed rebalances, 4 gloo ranks" "$root/tests/integration/test_engine_exec.py" "$build"
python_suite "bench_incremental's curve (CSV, plot)" "$root/tests/integration/test_bench_curve.py" "$build"
# The eplb Python package (clients/python) against this build's eplbd:
# pytest writes JUnit, counted like the others.
suite "python package eplb (pytest)" junit "$results/junit.xml" \
    env EPLBD_BUILD="$build" "$py" -m pytest -q -p no:cacheprovider --junitxml="$results/junit.xml" \
    "$root/clients/python/tests"

# The integration path again with eplbd under valgrind: each error or
# definite/indirect leak goes to a per-process log file, counted as a
# failure (and eplbd exits 99, which the harness reports).
if command -v valgrind >/dev/null; then
    reports_begin "$results/valgrind"
    for t in $(integration_tests "$build"); do
        EPLBD_WRAPPER="valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect --log-file=$reports_dir/valgrind.%p" \
            criterion "$t (eplbd under valgrind)" "$build/tests/$t"
        count_reports "$t (eplbd under valgrind)"
    done
    reports_end
else
    skip "valgrind" 1 "valgrind is not installed"
fi

# The HIP backend's host code with its kernels emulated on the CPU, compared
# byte for byte with the CPU backend; on a machine with an NVIDIA GPU, the
# same kernels for real (HIP-on-CUDA).
suite "gpu backend (host emulation)" summary - bash "$root/gpu/tests/host-emulation-check.sh"
# The same sources through the real device compilers (hipcc: gfx90a, gfx940;
# nvcc: sm_80, sm_90), the GPU check program built, and a kernel calling a
# host-only function refused by both: what host emulation cannot see.  A
# missing compiler is a skip (scripts/setup.sh --test installs hipcc).
suite "gpu backends compile" summary - bash "$root/gpu/tests/compile-check.sh" "$build"
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    suite "cuda backend (GPU)" summary - bash "$root/gpu/tests/device-check.sh"
else
    echo "cuda backend (GPU): no NVIDIA GPU on this machine, not run (hardware, not a skipped tool)"
fi

[ -f "$root/tests/deploy/check.sh" ] && suite "deployment manifests" summary - bash "$root/tests/deploy/check.sh"
[ -f "$root/tests/container/check.sh" ] && suite "container image" summary - bash "$root/tests/container/check.sh" "$build"
fi

# ---- ASan + UBSan --------------------------------------------------------------------
# Every Criterion binary of the sanitizer tree (their EPLBD_PATH is that
# tree's eplbd) and the Python client against that eplbd.  A report aborts
# the process that made it (exit 66) and leaves a file in the reports dir.
if [ -n "$asan" ] && want asan; then
    stage "asan+ubsan"
    reports_begin "$results/asan"
    export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=66:detect_leaks=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:log_path=$reports_dir/asan"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=66:log_path=$reports_dir/ubsan"
    for t in "$asan"/tests/test_*; do
        [ -x "$t" ] || continue
        # test_cpu_backend's SIGBUS tests end workers by a signal; with two
        # workers, Criterion 2.4.1's runner leaks 48 bytes of its own (a
        # calloc in libcriterion, no frame of ours) in ~1 run of 8, which
        # LeakSanitizer reports.  One worker: 0 in 28 runs.  Its tests take
        # a second either way.
        one=""
        [ "$(basename "$t")" = test_cpu_backend ] && one="--jobs 1"
        # shellcheck disable=SC2086
        criterion "$(basename "$t") (asan+ubsan)" "$t" $one
        count_reports "$(basename "$t") (asan+ubsan)"
    done
    python_suite "python grpcio client (asan+ubsan eplbd)" "$root/tests/integration/test_python_client.py" "$asan"
    count_reports "python grpcio client (asan+ubsan eplbd)"
    python_suite "health watch and reflection (asan+ubsan eplbd)" "$root/tests/integration/test_discovery.py" "$asan"
    count_reports "health watch and reflection (asan+ubsan eplbd)"
    python_suite "engine-held weights, stepped rebalance (asan+ubsan eplbd)" "$root/tests/integration/test_weights_engine.py" "$asan"
    count_reports "engine-held weights, stepped rebalance (asan+ubsan eplbd)"
    python_suite "placement files, report, eplbctl (asan+ubsan)" "$root/tests/integration/test_placement_files.py" "$asan"
    count_reports "placement files, report, eplbctl (asan+ubsan)"
    python_suite "engine-executed rebalances, 4 gloo ranks (asan+ubsan eplbd)" "$root/tests/integration/test_engine_exec.py" "$asan"
    count_reports "engine-executed rebalances, 4 gloo ranks (asan+ubsan eplbd)"
    load_suite "concurrent Rebalance calls (asan+ubsan eplbd)" "$asan/eplbd"
    count_reports "concurrent Rebalance calls (asan+ubsan eplbd)"
    unset ASAN_OPTIONS UBSAN_OPTIONS
    reports_end
fi

# ---- TSan ------------------------------------------------------------------------------
# Criterion cannot run under TSan (its boxfort arena is mapped where TSan's
# shadow lives: Snaipe/Criterion#274), and the one unit test that starts a
# thread (test_incremental's two-thread search) gets its TSan runs through
# eplbd (test_policy_rpc's incremental_at_deepseek_v3_size makes eplbd
# search on two threads) and through tests/tsan/two_threads_driver, the
# same random comparisons without Criterion.  So the plain tree's integration binaries run with
# the TSan tree's eplbd swapped in (EPLBD_WRAPPER), and the Python client
# runs against it.  Races inside uninstrumented gRPC/abseil are suppressed
# by tests/tsan.supp, each line explained there.
if [ -n "$tsan" ] && want tsan; then
    stage "tsan"
    reports_begin "$results/tsan"
    export TSAN_OPTIONS="halt_on_error=0:exitcode=66:second_deadlock_stack=1:suppressions=$root/tests/tsan.supp:log_path=$reports_dir/tsan"
    [ -x "$tsan/eplbd" ] || { echo "FAIL tsan: $tsan/eplbd is missing"; failed=$((failed + 1)); }
    for t in $(integration_tests "$build"); do
        EPLBD_WRAPPER="/bin/bash $root/tests/run.sh --exec-instead $tsan/eplbd" \
            criterion "$t (tsan eplbd)" "$build/tests/$t"
        count_reports "$t (tsan eplbd)"
    done
    python_suite "python grpcio client (tsan eplbd)" "$root/tests/integration/test_python_client.py" "$tsan"
    count_reports "python grpcio client (tsan eplbd)"
    python_suite "health watch and reflection (tsan eplbd)" "$root/tests/integration/test_discovery.py" "$tsan"
    count_reports "health watch and reflection (tsan eplbd)"
    python_suite "engine-held weights, stepped rebalance (tsan eplbd)" "$root/tests/integration/test_weights_engine.py" "$tsan"
    count_reports "engine-held weights, stepped rebalance (tsan eplbd)"
    python_suite "engine-executed rebalances, 4 gloo ranks (tsan eplbd)" "$root/tests/integration/test_engine_exec.py" "$tsan"
    count_reports "engine-executed rebalances, 4 gloo ranks (tsan eplbd)"
    load_suite "concurrent Rebalance calls (tsan eplbd)" "$tsan/eplbd"
    count_reports "concurrent Rebalance calls (tsan eplbd)"
    python_suite "two-thread search, random cases (tsan)" "$root/tests/tsan/test_two_threads.py" "$tsan"
    count_reports "two-thread search, random cases (tsan)"
    unset TSAN_OPTIONS
    reports_end
fi

# ---- fuzzing ------------------------------------------------------------------------------
# The committed seed corpus must be what fuzz/make_corpus.py writes; then
# each target of fuzz/rpcs.txt runs for EPLB_FUZZ_SECONDS on a scratch copy
# of its corpus (new inputs stay out of the repository).  A crash, leak,
# timeout or out-of-memory fails its target and leaves the input in
# $fuzz/artifacts/ (how to replay it: fuzz/README.md).
if [ -n "$fuzz" ] && want fuzz; then
    stage "fuzz"
    secs=${EPLB_FUZZ_SECONDS:-20}
    banner "fuzz seed corpus"
    if "$py" "$root/fuzz/make_corpus.py" --check; then
        passed=$((passed + 1))
    else
        echo "FAIL fuzz seed corpus: run /usr/bin/python3 fuzz/make_corpus.py and commit fuzz/corpus/"
        failed=$((failed + 1))
    fi
    mkdir -p "$fuzz/artifacts"
    while read -r name _; do
        case $name in [a-z]*) ;; *) continue ;; esac
        banner "fuzz_$name (${secs} s)"
        bin=$fuzz/fuzz/fuzz_$name
        if [ ! -x "$bin" ]; then
            echo "FAIL fuzz_$name: $bin is missing"
            failed=$((failed + 1))
            continue
        fi
        work=$results/fuzz-corpus/$name
        mkdir -p "$work"
        t0=$SECONDS
        timeout $((secs + 120)) "$bin" -max_total_time="$secs" -max_len=4096 -rss_limit_mb=2048 \
            -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 \
            -artifact_prefix="$fuzz/artifacts/fuzz_$name-" "$work" "$root/fuzz/corpus/$name" >"$log" 2>&1
        rc=$?
        grep -aE '^(INFO: Seed:|INFO: seed corpus|#[0-9]+[[:space:]]+(INITED|DONE)|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|new_units_added))' "$log"
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
            echo "---- fuzz_$name: passed ($((SECONDS - t0)) s)"
        else
            tail -n 80 "$log"
            art=$(ls -t "$fuzz/artifacts/fuzz_$name-"* 2>/dev/null | head -1)
            echo "FAIL fuzz_$name: exit $rc; replay: EPLB_FUZZ_RESET_EVERY=1 EPLB_FUZZ_VERBOSE=1 $bin ${art:-"(no artifact)"}"
            failed=$((failed + 1))
        fi
    done <"$root/fuzz/rpcs.txt"
fi
stage ""

echo
summary_line "$passed" "$failed" "$skipped"
[ "$failed" -eq 0 ]
