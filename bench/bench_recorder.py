#!/usr/bin/python3
"""LoadRecorder: engine-thread time per pass at DeepSeek-V3 size (58 MoE
layers x 288 physical slots, int64), against a real eplbd.

Measures, per pass, the wall time of LoadRecorder.record() on the calling
thread (the background thread runs meanwhile: on 2 vCPUs it competes for
the CPU, as it would in an engine), for numpy arrays and CPU torch tensors
(int64 and int32 sources): back to back (what the sender process sustains;
the rest is dropped), and one pass every --interval-us (default 10000, a
fast DeepSeek-V3 decode step) with the engine thread busy in between (CPU
matmuls) or idle (sleeping); then the batches sent,
passes dropped and the time flush() takes.

    PYTHONPATH=clients/python /usr/bin/python3 bench/bench_recorder.py [--addr A | --eplbd build/eplbd]
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clients", "python"))
import eplb  # noqa: E402

L, N, P, GPUS = 58, 256, 288, 32


def start_eplbd(exe):
    d = tempfile.mkdtemp(prefix="eplb-bench-")
    ready = os.path.join(d, "ready")
    proc = subprocess.Popen([exe, "--listen", "127.0.0.1:0", "--db", os.path.join(d, "db"), "--ready-file", ready],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1500):
        if os.path.exists(ready) and open(ready).read().strip():
            return proc, open(ready).read().strip()
        time.sleep(0.02)
    raise RuntimeError("eplbd did not start")


def pct(a, q):
    return float(np.percentile(a, q))


def run(client, name, make, passes, interval_us, max_pending, mode):
    import torch

    rec = eplb.LoadRecorder(client, "bench", shape=(L, P), max_pending=max_pending)
    a = torch.randn(384, 384)
    loads = [make(i) for i in range(8)]
    for i in range(50):  # warm-up (first-use allocations)
        rec.record(loads[i % 8])
    rec.flush()
    base_calls, base_sent = rec.calls, rec.sent
    times = np.empty(passes)
    t_start = next_t = time.perf_counter()
    for i in range(passes):
        x = loads[i % 8]
        t0 = time.perf_counter()
        rec.record(x)
        times[i] = time.perf_counter() - t0
        if interval_us:
            next_t += interval_us / 1e6
            if mode == "sleep":  # an idle engine thread between passes
                left = next_t - time.perf_counter()
                if left > 0:
                    time.sleep(left)
            else:  # a busy one: its own work (CPU matmuls) until the next pass
                while time.perf_counter() < next_t:
                    torch.mm(a, a)
    t0 = time.perf_counter()
    rec.flush()
    flush_ms = (time.perf_counter() - t0) * 1e3
    us = times * 1e6
    calls = rec.calls - base_calls
    wall = time.perf_counter() - t_start
    print("%-16s %5d passes, every %5d us (%s): record() mean %5.1f us, median %5.1f, p90 %5.1f, p99 %6.1f, "
          "max %7.1f; %4d RecordLoad calls (%.1f passes each), %d dropped, flush %.0f ms, %.0f passes/s sent"
          % (name, passes, interval_us, mode if interval_us else "back to back", us.mean(), pct(us, 50), pct(us, 90), pct(us, 99), us.max(), calls,
             (rec.sent - base_sent) / max(calls, 1), rec.dropped, flush_ms, (rec.sent - base_sent) / wall))
    rec.close()
    return pct(us, 50)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr")
    ap.add_argument("--eplbd", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "build", "eplbd"))
    ap.add_argument("--passes", type=int, default=1000)
    ap.add_argument("--interval-us", type=int, default=10000,
                    help="between passes (10 ms: a fast DeepSeek-V3 decode step); 0 = flat out too")
    ap.add_argument("--max-pending", type=int, default=64)
    args = ap.parse_args()
    proc = None
    addr = args.addr
    if addr is None:
        proc, addr = start_eplbd(args.eplbd)
    try:
        import torch

        torch.set_num_threads(1)
        with eplb.Client(addr) as client:
            client.register_model("bench", {
                "architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
                "moe": {"num_moe_layers": L, "num_logical_experts": N, "num_physical_experts": P,
                        "num_local_physical_experts": P // GPUS, "num_redundant_experts": P - N,
                        "num_expert_groups": 8}}, ep_size=GPUS, num_nodes=4)
            rng = np.random.default_rng(1)
            cases = [
                ("numpy int64", lambda i: rng.integers(0, 4096, (L, P), dtype=np.int64)),
                ("torch cpu int64", lambda i: torch.randint(0, 4096, (L, P), dtype=torch.int64)),
                ("torch cpu int32", lambda i: torch.randint(0, 4096, (L, P), dtype=torch.int32)),
            ]
            print("LoadRecorder at %d layers x %d slots (%d KiB per pass), python %s, torch %s, %d CPUs"
                  % (L, P, L * P * 8 // 1024, sys.version.split()[0], torch.__version__, os.cpu_count()))
            for interval, mode in ((0, ""), (args.interval_us, "busy"), (args.interval_us, "sleep")):
                for name, make in cases:
                    run(client, name, make, args.passes, interval, args.max_pending, mode)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()


if __name__ == "__main__":
    main()
