"""One EP rank of test_torch_exec.py's gloo runs: run as
``python3 exec_worker.py SPEC.json RANK``; writes OUT_DIR/rank<R>.json.

SPEC: world, init (tcp://...), timeout_s, seed, L, N, P, ranks_per_node,
max_moves_per_chunk, noncontiguous (bool), die_at_step ({rank: step}: that
rank exits at once when it reaches that step), hang_at_step (likewise, but
it sleeps), out.
"""
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb.torch_exec import PlanExecutionError, execute_plan  # noqa: E402
from planref import build_plan, fill_value, random_placements  # noqa: E402

SHAPE0 = (2, 64)
W1 = 16


def expected(layer, expert, t):
    v = fill_value(layer, expert, t)
    if t == 0:
        return torch.full(SHAPE0, v) + torch.arange(128, dtype=torch.float32).reshape(SHAPE0) / 128
    return torch.full((W1,), int(v) * 7, dtype=torch.int32) + torch.arange(W1, dtype=torch.int32)


def make_tensors(spec, rank, p2l):
    S = spec["P"] // spec["world"]
    layers = []
    for layer in range(spec["L"]):
        t0 = torch.empty((S,) + SHAPE0, dtype=torch.float32)
        if spec.get("noncontiguous"):
            t1 = torch.empty((W1, S), dtype=torch.int32).t()  # [S, W1], not contiguous
        else:
            t1 = torch.empty((S, W1), dtype=torch.int32)
        for j in range(S):
            e = int(p2l[layer, rank * S + j])
            t0[j] = expected(layer, e, 0)
            t1[j] = expected(layer, e, 1)
        layers.append([t0, t1])
    return layers


def check(spec, rank, layers, p2l):
    S = spec["P"] // spec["world"]
    bad = []
    for layer in range(spec["L"]):
        for j in range(S):
            e = int(p2l[layer, rank * S + j])
            for t in range(2):
                if not torch.equal(layers[layer][t][j], expected(layer, e, t)):
                    bad.append([layer, j, t])
    return bad


def main():
    spec = json.load(open(sys.argv[1]))
    rank = int(sys.argv[2])
    out = os.path.join(spec["out"], "rank%d.json" % rank)
    res = {"rank": rank, "ok": False}
    try:
        dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=spec["world"],
                                timeout=datetime.timedelta(seconds=spec["timeout_s"]))
        old, new = random_placements(spec["seed"], spec["L"], spec["N"], spec["P"])
        plan = build_plan(old, new, spec["world"], spec["ranks_per_node"],
                          max_moves_per_chunk=spec.get("max_moves_per_chunk"), empty_steps=True)
        layers = make_tensors(spec, rank, old)
        die = {int(k): v for k, v in spec.get("die_at_step", {}).items()}
        hang = {int(k): v for k, v in spec.get("hang_at_step", {}).items()}

        def on_step(i, step):
            if die.get(rank) == i:
                os._exit(3)
            if hang.get(rank) == i:
                time.sleep(3600)

        res["plan"] = {"copies_cross_node": plan.copies_cross_node, "copies_cross_gpu": plan.copies_cross_gpu,
                       "slots_cross_node": plan.ranks[rank].slots_cross_node,
                       "slots_sent": plan.ranks[rank].slots_sent, "slots_received": plan.ranks[rank].slots_received,
                       "num_steps": plan.num_steps, "max_staging_slots": plan.ranks[rank].max_staging_slots}
        t0 = time.monotonic()
        try:
            # the proto form on odd ranks, the dataclass on even ones
            p = plan.ranks[rank].to_proto() if rank % 2 else plan
            stats = execute_plan(p, rank, layers, on_step=on_step)
            res["stats"] = dataclasses.asdict(stats)
            res["bad"] = check(spec, rank, layers, new)
            res["ok"] = True
        except PlanExecutionError as e:
            res["error"] = str(e)
            res["bytes_touched"] = e.bytes_touched
            res["failed_after_s"] = time.monotonic() - t0
    except Exception:
        res["error"] = traceback.format_exc()
    with open(out + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(out + ".tmp", out)
    os._exit(0)  # no destroy_process_group: a peer may be gone


if __name__ == "__main__":
    main()
