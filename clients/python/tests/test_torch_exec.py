"""eplb.torch_exec.execute_plan on plans built here (tests/planref.py): 4
gloo processes on loopback, each holding its own expert tensors; every slot
holds its new expert's bytes afterwards; bytes counted; a peer that dies or
hangs mid-plan surfaces as PlanExecutionError within the group's timeout;
plans that do not fit are refused before anything moves."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from eplb.torch_exec import (ExecStats, PlanError, StagingPool, execute_plan,  # noqa: E402
                             validate_rank_plan)
from eplb.transfer import (COPY, RECV, SEND, RankTransferPlan, TransferOp, TransferPlan,  # noqa: E402
                           TransferStep, as_rank_plan)
from planref import build_plan, random_placements  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERT_BYTES = 2 * 64 * 4 + 16 * 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, world=4, timeout=60, **spec):
    spec = dict(dict(world=world, init="tcp://127.0.0.1:%d" % free_port(), timeout_s=5, seed=1, L=3, N=8, P=12,
                     ranks_per_node=2, out=str(tmp_path)), **spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "exec_worker.py"), str(path), str(r)])
             for r in range(world)]
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not finish within %d s" % timeout)
    out = {}
    for r in range(world):
        f = tmp_path / ("rank%d.json" % r)
        if f.exists():
            out[r] = json.loads(f.read_text())
    return out, [p.returncode for p in procs]


@pytest.mark.parametrize("seed,chunk,noncontig", [(1, None, False), (2, 3, True), (3, 1, False)])
def test_four_ranks_two_nodes_move_every_slot(tmp_path, seed, chunk, noncontig):
    res, rcs = run_ranks(tmp_path, seed=seed, max_moves_per_chunk=chunk, noncontiguous=noncontig)
    assert rcs == [0] * 4
    for r in range(4):
        assert res[r]["ok"], res[r].get("error")
        assert res[r]["bad"] == [], "rank %d: [layer, slot, tensor] wrong: %s" % (r, res[r]["bad"])
        st, pl = res[r]["stats"], res[r]["plan"]
        assert st["bytes_sent"] == pl["slots_sent"] * EXPERT_BYTES
        assert st["bytes_received"] == pl["slots_received"] * EXPERT_BYTES
        assert st["bytes_sent_cross_node"] + st["bytes_received_cross_node"] == pl["slots_cross_node"] * EXPERT_BYTES
        assert st["steps_done"] == pl["num_steps"]
    plan = res[0]["plan"]
    assert plan["copies_cross_node"] > 0 and plan["copies_cross_gpu"] > plan["copies_cross_node"]
    assert sum(res[r]["stats"]["bytes_sent_cross_node"] for r in range(4)) == plan["copies_cross_node"] * EXPERT_BYTES
    assert sum(res[r]["stats"]["bytes_received"] for r in range(4)) == plan["copies_cross_gpu"] * EXPERT_BYTES
    if chunk == 1:
        assert plan["num_steps"] > 3  # layers cut into chunks


def test_a_rank_that_dies_mid_plan_fails_the_others_in_time(tmp_path):
    res, rcs = run_ranks(tmp_path, die_at_step={3: 2}, timeout_s=4, timeout=60)
    assert rcs[3] == 3 and 3 not in res
    failed = [r for r in (0, 1, 2) if not res[r]["ok"]]
    assert failed, "nobody noticed rank 3 dying"
    for r in failed:
        assert "step" in res[r]["error"] and res[r]["failed_after_s"] < 30
        assert res[r]["bytes_touched"] >= 0


def test_a_rank_that_hangs_times_out_its_peers(tmp_path):
    t0 = time.time()
    # 2 ranks: rank 1 sleeps at step 1; rank 0 must give up after ~3 s (gloo honours the group's timeout)
    spec_dir = tmp_path / "hang"
    spec_dir.mkdir()
    spec = dict(world=2, init="tcp://127.0.0.1:%d" % free_port(), timeout_s=3, seed=5, L=3, N=6, P=8,
                ranks_per_node=1, out=str(spec_dir), hang_at_step={"1": 1})
    (spec_dir / "spec.json").write_text(json.dumps(spec))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "exec_worker.py"), str(spec_dir / "spec.json"),
                               str(r)]) for r in range(2)]
    try:
        procs[0].wait(timeout=40)
    finally:
        procs[1].kill()
        procs[1].wait()
    r0 = json.loads((spec_dir / "rank0.json").read_text())
    assert not r0["ok"] and "step 1" in r0["error"], r0
    assert 2 <= r0["failed_after_s"] < 20
    assert time.time() - t0 < 45


def test_local_only_plan_needs_no_process_group():
    # slot 0 <- slot 1, slot 1 <- slot 0 (a swap through staging), slot 2 <- slot 0
    ops = [TransferOp(COPY, src=0, dst=0, dst_staging=True), TransferOp(COPY, src=1, dst=0),
           TransferOp(COPY, src=0, src_staging=True, dst=1), TransferOp(COPY, src=0, src_staging=True, dst=2)]
    rp = RankTransferPlan(rank=0, steps=[TransferStep(layer=1, ops=ops)], max_staging_slots=1)
    t = [torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4), torch.tensor([[10], [11], [12]])]
    layers = [[torch.zeros(3, 4)], t]
    pool = StagingPool()
    st = execute_plan(rp, 0, layers, staging=pool)
    assert t[0][:, 0].tolist() == [4.0, 0.0, 0.0] and t[1][:, 0].tolist() == [11, 10, 10]
    assert st.copies == 4 and st.bytes_staged == 16 + 8 and st.bytes_touched == 3 * 24 and st.bytes_sent == 0
    assert pool.nbytes == 16 + 8
    # the proto form runs the same, and a layer's tensors may be a dict
    t2 = [torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.tensor([[10], [11], [12]])]
    execute_plan(rp.to_proto(), 0, [[torch.zeros(3, 4)], {"w13": t2[0], "w2": t2[1]}])
    assert torch.equal(t[0], t2[0]) and torch.equal(t[1], t2[1])


def test_hazards_are_refused_before_anything_moves():
    t = [torch.arange(4.0).reshape(4, 1)]
    before = t[0].clone()

    def plan(*ops, stg=0):
        return RankTransferPlan(rank=1, steps=[TransferStep(layer=0, ops=list(ops))], max_staging_slots=stg)

    bad = {
        "both sent and received": plan(TransferOp(SEND, src=2, peer_rank=0), TransferOp(RECV, dst=2, peer_rank=0)),
        "reads slot 3 after": plan(TransferOp(RECV, dst=3, peer_rank=0), TransferOp(COPY, src=3, dst=1)),
        "reads slot 0 after": plan(TransferOp(COPY, src=1, dst=0), TransferOp(COPY, src=0, dst=2)),
        "src slot 4 out of": plan(TransferOp(COPY, src=4, dst=0)),
        "dst staging 0 out of": plan(TransferOp(COPY, src=1, dst=0, dst_staging=True)),
        "peer_rank is this rank": plan(TransferOp(SEND, src=1, peer_rank=1)),
        "peer_rank 7 out of": plan(TransferOp(SEND, src=1, peer_rank=7)),
        "tag 0 used twice": plan(TransferOp(SEND, src=1, peer_rank=0), TransferOp(SEND, src=2, peer_rank=0)),
        "received into twice": plan(TransferOp(RECV, dst=1, peer_rank=0, tag=0),
                                    TransferOp(RECV, dst=1, peer_rank=2, tag=0)),
    }
    for what, p in bad.items():
        with pytest.raises(PlanError, match=what):
            execute_plan(p, 1, [t], num_ranks=4)
        assert torch.equal(t[0], before)
    with pytest.raises(PlanError, match="layer 2"):
        validate_rank_plan(RankTransferPlan(rank=0, steps=[TransferStep(layer=2, ops=[])]), 4, 4, num_layers=1)
    with pytest.raises(PlanError, match="rank 1's, not rank 0's"):
        execute_plan(plan(), 0, [t])
    with pytest.raises(PlanError, match="local experts"):
        execute_plan(plan(), 1, [[t[0], torch.zeros(3, 2)]])


def test_as_rank_plan_forms():
    old, new = random_placements(7, 2, 6, 8)
    whole = build_plan(old, new, 4, 2)
    assert as_rank_plan(whole, 2).rank == 2
    assert as_rank_plan(whole.to_proto(), 3) == whole.ranks[3]
    assert TransferPlan.from_proto(whole.to_proto()) == whole
    one = TransferPlan.from_proto(whole.to_proto())
    one = TransferPlan(**dict(one.__dict__, ranks=[whole.ranks[1]]))
    assert as_rank_plan(one).rank == 1  # GetTransferPlan's answer: one rank's part
    with pytest.raises(KeyError):
        as_rank_plan(one, 2)
    with pytest.raises(TypeError):
        as_rank_plan({"rank": 0})
    assert ExecStats(rank=0, bytes_sent_cross_node=3, bytes_received_cross_node=4).bytes_cross_node == 7


# ---- EngineRebalancer over 4 gloo ranks, with a fake eplbd client (exec_worker.FakeClient) ----

def test_controller_commits_and_installs_on_every_rank(tmp_path):
    res, rcs = run_ranks(tmp_path, mode="controller", seed=11)
    assert rcs == [0] * 4
    for r in range(4):
        assert res[r]["ok"], res[r].get("error")
        assert res[r]["committed"] and res[r]["installed"] and res[r]["bad"] == []
        names = [c[0] for c in res[r]["calls"]]
        if r == 0:
            assert names == ["rebalance", "get_transfer_plan", "commit_rebalance"]
            assert res[r]["calls"][0] == ["rebalance", "engine", 4096]
        else:
            assert names == ["get_transfer_plan"]
        assert res[r]["calls"][-1 if r else 1] == ["get_transfer_plan", "r1", r]


def test_controller_gate_moves_nothing(tmp_path):
    res, rcs = run_ranks(tmp_path, mode="controller", world=2, P=8, N=6, ranks_per_node=1, gate=True)
    assert rcs == [0, 0]
    for r in range(2):
        assert res[r]["ok"] and not res[r]["committed"] and "min_improvement" in res[r]["reason"]
        assert res[r]["bad"] == [] and not res[r]["installed"]
    assert [c[0] for c in res[0]["calls"]] == ["rebalance"] and res[1]["calls"] == []


def test_controller_a_rank_without_its_plan_aborts_untouched(tmp_path):
    res, rcs = run_ranks(tmp_path, mode="controller", fetch_fails=[2])
    assert rcs == [0] * 4
    for r in range(4):
        assert not res[r]["ok"] and "1 rank(s) failed; aborted with 0 bytes touched" in res[r]["error"]
        assert res[r]["bytes_touched"] == 0
    assert res[0]["calls"][-1] == ["abort_rebalance", "r1", 0] and res[0]["aborted"] == "MOVE_STATE_IDLE"
    assert "no server" in res[2]["error"]


def test_controller_a_rank_dying_mid_plan_aborts_touched(tmp_path):
    res, rcs = run_ranks(tmp_path, mode="controller", seed=11, die_at_step={3: 2}, timeout_s=4)
    assert rcs[3] == 3 and 3 not in res
    for r in (0, 1, 2):
        assert not res[r]["ok"] and "could not be reached" in res[r]["error"], res[r]
    last = res[0]["calls"][-1]
    assert last[:2] == ["abort_rebalance", "r1"] and last[2] >= 1
    assert res[0]["aborted"] == "MOVE_STATE_NEEDS_RELOAD"


def test_controller_a_failed_commit_says_the_weights_moved(tmp_path):
    res, rcs = run_ranks(tmp_path, mode="controller", world=2, P=8, N=6, ranks_per_node=1, commit_fails=True)
    assert rcs == [0, 0]
    for r in range(2):
        assert not res[r]["ok"] and res[r]["commit_failed"], res[r]
        assert "retry commit_rebalance('m', 'r1')" in res[r]["error"] and res[r]["bad_if_new"] == []
    assert [c[0] for c in res[0]["calls"]] == ["rebalance", "get_transfer_plan", "commit_rebalance"]


def test_simulate_plan_runs_reference_plans_and_finds_broken_ones():
    from dataclasses import replace

    from eplb.transfer import PlanMismatch, simulate_plan

    for seed, chunk in ((1, None), (2, 3), (3, 1)):
        old, new = random_placements(seed, 4, 12, 16)
        plan = build_plan(old, new, 4, 2, max_moves_per_chunk=chunk, empty_steps=True)
        assert (simulate_plan(plan, old) == new).all()
        assert (simulate_plan(plan.to_proto(), old) == new).all()
    # a receive left out
    r1 = plan.ranks[1]
    i, step = next((i, s) for i, s in enumerate(r1.steps) if any(o.kind == RECV for o in s.ops))
    ops = list(step.ops)
    ops.remove(next(o for o in ops if o.kind == RECV))
    steps = list(r1.steps)
    steps[i] = replace(step, ops=ops)
    broken = replace(plan, ranks=[replace(r, steps=steps) if r.rank == 1 else r for r in plan.ranks])
    with pytest.raises(PlanMismatch, match="has no receive"):
        simulate_plan(broken, old)
    # an op that says it moves another expert
    r0 = plan.ranks[0]
    i, step = next((i, s) for i, s in enumerate(r0.steps) if s.ops)
    ops = [replace(step.ops[0], expert=99)] + list(step.ops[1:])
    steps = list(r0.steps)
    steps[i] = replace(step, ops=ops)
    liar = replace(plan, ranks=[replace(r0, steps=steps)] + list(plan.ranks[1:]))
    with pytest.raises(PlanMismatch, match="says 99"):
        simulate_plan(liar, old)
