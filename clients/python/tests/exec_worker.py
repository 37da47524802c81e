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


class FakeClient:
    """What EngineRebalancer calls, answered from the reference planner (the
    same answers in every process); each call is logged."""

    def __init__(self, spec, rank, old, new, plan):
        self.spec, self.rank, self.old, self.new, self.plan = spec, rank, old, new, plan
        self.calls = []

    def _placement(self, p2l, epoch):
        from eplb import Placement

        return Placement.from_arrays(p2l, self.spec["N"], model_id="m", epoch=epoch)

    def rebalance(self, model_id, **kw):
        from eplb import RebalanceResult

        self.calls.append(["rebalance", kw.get("execution"), kw.get("max_staging_bytes", 0)])
        pending = not self.spec.get("gate")
        return RebalanceResult(placement=self._placement(self.old, 0), committed=False, balancedness_before=0.5,
                               balancedness_after=0.9, layer_balancedness_before=[], layer_balancedness_after=[],
                               experts_moved=0, compute_ms=0, bytes_moved=0, move_ms=0,
                               rebalance_id="r1" if pending else "", layers_done=0, pending=pending,
                               layers_moved=[], bytes_cross_gpu=0, bytes_staged=0,
                               reason="" if pending else "gain 0.001 below min_improvement 0.01")

    def get_transfer_plan(self, model_id, rebalance_id, rank):
        from eplb.errors import Unavailable

        self.calls.append(["get_transfer_plan", rebalance_id, rank])
        if rank in self.spec.get("fetch_fails", []):
            raise Unavailable("no server", method="GetTransferPlan")
        one = self.plan.to_proto()
        del one.ranks[:]
        one.ranks.append(self.plan.ranks[rank].to_proto())
        from eplb.transfer import TransferPlan

        return TransferPlan.from_proto(one)

    def commit_rebalance(self, model_id, rebalance_id, **kw):
        from eplb import RebalanceResult

        self.calls.append(["commit_rebalance", rebalance_id])
        if self.spec.get("commit_fails"):
            from eplb.errors import Unavailable

            raise Unavailable("eplbd went away", method="CommitRebalance")
        return RebalanceResult(placement=self._placement(self.new, 1), committed=True, balancedness_before=0.5,
                               balancedness_after=0.9, layer_balancedness_before=[], layer_balancedness_after=[],
                               experts_moved=0, compute_ms=0, bytes_moved=0, move_ms=0, rebalance_id=rebalance_id,
                               layers_done=0, pending=False, layers_moved=[], bytes_cross_gpu=0, bytes_staged=0)

    def abort_rebalance(self, model_id, rebalance_id, bytes_touched=0):
        from eplb.transfer import AbortResult

        self.calls.append(["abort_rebalance", rebalance_id, bytes_touched])
        return AbortResult(epoch=0, state="MOVE_STATE_NEEDS_RELOAD" if bytes_touched else "MOVE_STATE_IDLE",
                           needs_weight_reload=bytes_touched > 0)


def controller(spec, rank, res, on_step):
    from eplb.torch_exec import EngineRebalanceError, EngineRebalancer

    old, new = random_placements(spec["seed"], spec["L"], spec["N"], spec["P"])
    plan = build_plan(old, new, spec["world"], spec["ranks_per_node"], empty_steps=True)
    client = FakeClient(spec, rank, old, new, plan)
    layers = make_tensors(spec, rank, old)
    L, N, P = spec["L"], spec["N"], spec["P"]
    maps = {"physical_to_logical_map": torch.zeros((L, P), dtype=torch.int64),
            "logical_to_physical_map": torch.zeros((L, N, P - N + 1), dtype=torch.int64),
            "logical_replica_count": torch.zeros((L, N), dtype=torch.int64)}
    rb = EngineRebalancer(client, "m")
    try:
        out = rb.rebalance(layers, maps, on_step=on_step, physical_load=[[1]], max_staging_bytes=4096)
        res["committed"] = out.committed
        res["reason"] = out.reason
        res["installed"] = torch.equal(maps["physical_to_logical_map"], torch.from_numpy(new))
        res["bad"] = check(spec, rank, layers, new if out.committed else old)
        res["ok"] = True
    except EngineRebalanceError as e:
        res["error"] = str(e)
        res["bytes_touched"] = e.bytes_touched
        res["aborted"] = None if e.aborted is None else e.aborted.state
        res["commit_failed"] = e.commit_failed
        res["bad_if_new"] = check(spec, rank, layers, new)
    res["calls"] = client.calls


def main():
    spec = json.load(open(sys.argv[1]))
    rank = int(sys.argv[2])
    out = os.path.join(spec["out"], "rank%d.json" % rank)
    res = {"rank": rank, "ok": False}
    try:
        dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=spec["world"],
                                timeout=datetime.timedelta(seconds=spec["timeout_s"]))
        die0 = {int(k): v for k, v in spec.get("die_at_step", {}).items()}

        def die_step(i, step):
            if die0.get(rank) == i:
                os._exit(3)

        if spec.get("mode") == "controller":
            controller(spec, rank, res, die_step)
            raise SystemExit
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
    except SystemExit:
        pass
    except Exception:
        res["error"] = traceback.format_exc()
    with open(out + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(out + ".tmp", out)
    os._exit(0)  # no destroy_process_group: a peer may be gone


if __name__ == "__main__":
    main()
