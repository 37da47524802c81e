#!/usr/bin/env bash
# run.sh -- set up, build and run eplbd in the foreground on its embedded
# SQLite default (./eplbd-data/eplbd.db, listening on 127.0.0.1:50051).
# Extra arguments go to eplbd (e.g. --listen 0.0.0.0:50051, --db :memory:).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPLB_BUILD_DIR:-$root/build}
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
exec "$build/eplbd" "$@"
