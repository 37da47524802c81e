"""One EP rank of test_engine_exec.py: a process of its own with gloo on
loopback, its expert tensors in its own memory, the eplb package of this
checkout and eplbd as the authority.

Run: /usr/bin/python3 engine_exec_rank.py SPEC.json RANK  (writes OUT/rank<R>.json)

SPEC: addr, init, world, ranks_per_node, timeout_s, L, N, P, mode
("rebalance": the leader starts one from `load`; "execute": run the pending
`rebalance_id`), load, max_staging_bytes, die_at_step ({rank: step}), out.
"""
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import eplb  # noqa: E402
from eplb.torch_exec import EngineRebalanceError, EngineRebalancer  # noqa: E402

SHAPE0 = (2, 64)   # tensor 0 of each layer: float32 [S, 2, 64]
W1 = 16            # tensor 1: int32 [S, 16]
EXPERT_BYTES = 2 * 64 * 4 + W1 * 4


def expected(layer, expert, t):
    """The bytes of `expert`'s tensor t in `layer`: they encode (layer, expert, tensor)."""
    v = layer * 1000 + expert * 10 + t
    if t == 0:
        return torch.full(SHAPE0, float(v)) + torch.arange(128, dtype=torch.float32).reshape(SHAPE0) / 128
    return torch.full((W1,), v * 7, dtype=torch.int32) + torch.arange(W1, dtype=torch.int32)


def tensors_for(rank, S, p2l):
    layers = []
    for layer in range(p2l.shape[0]):
        t0 = torch.empty((S,) + SHAPE0, dtype=torch.float32)
        t1 = torch.empty((S, W1), dtype=torch.int32)
        for j in range(S):
            e = int(p2l[layer, rank * S + j])
            t0[j] = expected(layer, e, 0)
            t1[j] = expected(layer, e, 1)
        layers.append([t0, t1])
    return layers


def wrong_slots(rank, S, layers, p2l):
    bad = []
    for layer in range(p2l.shape[0]):
        for j in range(S):
            e = int(p2l[layer, rank * S + j])
            for t in range(2):
                if not torch.equal(layers[layer][t][j], expected(layer, e, t)):
                    bad.append([layer, j, t])
    return bad


def sequence(spec, rank, S, client, rb, layers, maps, res):
    """Rebalances one after another with the knobs of spec["sequence"]; after
    each, whatever happened, every slot must hold the served placement."""
    import numpy as np

    L, P = spec["L"], spec["P"]
    res["steps"] = []
    for k, knobs in enumerate(spec["sequence"]):
        rng = np.random.default_rng(100 + k)
        load = rng.integers(1, 20, (L, P))
        for layer in range(L):
            load[layer, rng.integers(0, P, 3)] += rng.integers(100, 900, 3)
        entry = {"k": k}
        try:
            out = rb.rebalance(layers, maps, physical_load=load, **knobs)
            entry.update(committed=out.committed, commits=out.extra.get("commits", 0))
        except EngineRebalanceError as e:
            entry.update(error=str(e)[:400], steps_committed=e.steps_committed,
                         touched=e.bytes_touched)
        except eplb.EplbError as e:  # the leader's own Rebalance refused
            entry.update(error=str(e)[:400], code=e.code.name)
        served = client.get_placement("m")
        entry["epoch"] = served.epoch
        entry["state"] = served.state
        entry["bad"] = len(wrong_slots(rank, S, layers, served.physical_to_logical))
        entry["maps_installed"] = bool(torch.equal(maps["physical_to_logical_map"],
                                                   torch.from_numpy(served.physical_to_logical)))
        res["steps"].append(entry)
    res["ok"] = True


def held(S, layers):
    """The expert each slot holds [layer][slot], read back from its bytes (-1: neither tensor agrees)."""
    out = []
    for layer, (t0, t1) in enumerate(layers):
        row = []
        for j in range(S):
            e = (int(t0[j][0, 0].item()) - layer * 1000) // 10
            ok = torch.equal(t0[j], expected(layer, e, 0)) and torch.equal(t1[j], expected(layer, e, 1))
            row.append(e if ok else -1)
        out.append(row)
    return out


def main():
    spec = json.load(open(sys.argv[1]))
    rank = int(sys.argv[2])
    out = os.path.join(spec["out"], "rank%d.json" % rank)
    res = {"rank": rank, "ok": False}
    try:
        dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=spec["world"],
                                timeout=datetime.timedelta(seconds=spec["timeout_s"]))
        L, N, P, world = spec["L"], spec["N"], spec["P"], spec["world"]
        S = P // world
        rpn = spec["ranks_per_node"]
        client = eplb.Client(spec["addr"], timeout=30)
        start = client.get_placement("m")
        res["start_epoch"] = start.epoch
        layers = tensors_for(rank, S, start.physical_to_logical)
        maps = {"physical_to_logical_map": torch.full((L, P), -7, dtype=torch.int64),
                "logical_to_physical_map": torch.full((L, N, P - N + 1), -7, dtype=torch.int64),
                "logical_replica_count": torch.zeros((L, N), dtype=torch.int64)}
        die = {int(k): v for k, v in spec.get("die_at_step", {}).items()}
        pause = {int(k): v for k, v in spec.get("pause_at_step", {}).items()}

        def on_step(i, step):
            if die.get(rank) == i:
                os._exit(3)  # killed mid-plan: no barrier, no goodbye
            if pause.get(rank) == i:  # the test does something to eplbd meanwhile
                open(os.path.join(spec["out"], "paused.%d" % rank), "w").close()
                deadline = time.time() + 60
                while not os.path.exists(os.path.join(spec["out"], "resume")) and time.time() < deadline:
                    time.sleep(0.02)

        rb = EngineRebalancer(client, "m")
        t0 = time.monotonic()
        if spec["mode"] == "sequence":
            sequence(spec, rank, S, client, rb, layers, maps, res)
            raise SystemExit
        try:
            if spec["mode"] == "rebalance":
                outcome = rb.rebalance(layers, maps, on_step=on_step, physical_load=spec["load"],
                                       max_staging_bytes=spec.get("max_staging_bytes", 0),
                                       layers_per_step=spec.get("layers_per_step", 0))
            else:
                outcome = rb.execute(spec["rebalance_id"], layers, maps, on_step=on_step)
            res["committed"] = outcome.committed
            res["rebalance_id"] = outcome.rebalance_id
            new = outcome.placement.physical_to_logical
            res["epoch"] = outcome.placement.epoch
            res["new_physical_to_logical"] = new.tolist()
            res["bad"] = wrong_slots(rank, S, layers, new)
            res["maps_installed"] = bool(torch.equal(maps["physical_to_logical_map"], torch.from_numpy(new)))
            res["stats"] = dataclasses.asdict(outcome.stats) if outcome.stats else None
            res["commits"] = outcome.extra.get("commits", 1)
            res["ok"] = True
        except EngineRebalanceError as e:
            res["error"] = str(e)
            res["commit_failed"] = e.commit_failed
            res["held"] = held(S, layers)
            res["bytes_touched"] = e.bytes_touched
            res["aborted"] = dataclasses.asdict(e.aborted) if e.aborted is not None else None
            res["stats"] = dataclasses.asdict(rb.last_stats) if rb.last_stats else None
        res["seconds"] = time.monotonic() - t0
        if rb.last_plan is not None:
            plan = rb.last_plan
            mine = plan.rank_plan(rank)
            res["plan"] = {"copies_cross_node": plan.copies_cross_node, "copies_cross_gpu": plan.copies_cross_gpu,
                           "expert_bytes": plan.expert_bytes, "num_steps": plan.num_steps,
                           "num_ranks": plan.num_ranks, "ranks_per_node": plan.ranks_per_node,
                           "slots_sent": mine.slots_sent, "slots_received": mine.slots_received,
                           "slots_cross_node": mine.slots_cross_node, "max_staging_slots": mine.max_staging_slots,
                           "steps": len(mine.steps),
                           # ops whose cross_node flag disagrees with the node of the peer
                           "wrong_cross_node_flags": sum(1 for s in mine.steps for o in s.ops if o.kind != "copy"
                                                         and o.cross_node != (o.peer_rank // rpn != rank // rpn))}
        if rb.last_rebalance is not None:
            r = rb.last_rebalance
            res["rebalance"] = {"plan_bytes_cross_node": r.plan_bytes_cross_node,
                                "plan_copies_cross_node": r.plan_copies_cross_node,
                                "plan_copies_cross_gpu": r.plan_copies_cross_gpu, "pending": r.pending}
        client.close()
    except SystemExit:
        pass
    except Exception:
        res["error"] = traceback.format_exc()
    with open(out + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(out + ".tmp", out)
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: a peer may be gone


if __name__ == "__main__":
    main()
