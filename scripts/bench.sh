#!/usr/bin/env bash
# bench.sh -- build (Release) and run the benchmarks; prints numbers.
#   policy: bench/bench_policy (DeepSeek-V3 size, 2x, 4x)
#   plan:   bench/bench_plan (bytes moved per rebalance, 50 drifting rebalances)
#   copy:   bench/bench_copy (cpu backend vs memcpy; ~450 MB of /dev/shm)
#   rpc:    eplbd on an ephemeral loopback port with a temporary database,
#           bench/bench_rpc as a separate client process (4 clients)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPLB_BENCH_BUILD_DIR:-$root/build-bench}
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DEPLB_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target eplbd bench_policy bench_rpc bench_plan bench_copy >/dev/null

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "== policy"
"$build/bench/bench_policy"

echo "== Moving expert weights: bytes per rebalance"
"$build/bench/bench_plan"

echo "== cpu backend copy throughput"
"$build/bench/bench_copy"

echo "== Rebalance RPC over loopback"
tmp=$(mktemp -d)
"$build/eplbd" --listen 127.0.0.1:0 --db "$tmp/eplbd.db" --ready-file "$tmp/ready" --log-level warn \
    2>"$tmp/eplbd.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 500); do [ -s "$tmp/ready" ] && break; sleep 0.02; done
"$build/bench/bench_rpc" "$(cat "$tmp/ready")" "${BENCH_CLIENTS:-4}" "${BENCH_CALLS:-500}"
