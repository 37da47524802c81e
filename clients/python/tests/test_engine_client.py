"""Client methods of engine-executed rebalances: what they send and how they
read the answers (a recording fake server), then against a real eplbd
(pending rebalance, plans per rank, commit, abort, typed errors)."""
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

import eplb
from eplb._proto.eplb.v1 import eplb_pb2
from eplb.transfer import RECV, SEND, AbortResult, TransferPlan

MOE = {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
       "moe": {"num_moe_layers": 2, "num_logical_experts": 4, "num_physical_experts": 6,
               "num_local_physical_experts": 3, "num_redundant_experts": 2}}
LOAD = [[90, 132, 40, 61, 0, 0], [20, 107, 104, 64, 0, 0]]


def _plan_msg():
    op_s = eplb_pb2.TransferOp(kind=eplb_pb2.TRANSFER_OP_SEND, src=1, peer_rank=1, expert=3, tag=0, cross_node=True)
    op_r = eplb_pb2.TransferOp(kind=eplb_pb2.TRANSFER_OP_RECV, dst=2, dst_staging=True, peer_rank=1, expert=2, tag=0)
    return eplb_pb2.TransferPlan(
        model_id="x", rebalance_id="r7", base_epoch=4, num_ranks=2, ranks_per_node=1, num_local_physical_experts=3,
        layers=[1], num_steps=1, expert_bytes=100, copies_cross_gpu=2, copies_cross_node=2,
        ranks=[eplb_pb2.RankTransferPlan(rank=0, steps=[eplb_pb2.TransferStep(layer=1, chunk=0, ops=[op_s, op_r])],
                                         max_staging_slots=3, slots_sent=1, slots_received=1, slots_cross_node=1)])


class _Recorder:
    """eplbd's engine RPCs answered by fixed messages; requests kept; the
    first ``fail`` calls of each answered UNAVAILABLE."""

    def __init__(self, fail=0):
        self.fail = fail
        self.requests = {}
        self.lock = threading.Lock()
        place = eplb_pb2.Placement(model_id="x", epoch=5, num_layers=1, num_physical_experts=2, num_logical_experts=2,
                                   physical_to_logical=[1, 0], logical_replica_count=[1, 1])
        answers = {
            "RegisterModel": (eplb_pb2.RegisterModelRequest, eplb_pb2.RegisterModelResponse(registered=True)),
            "Rebalance": (eplb_pb2.RebalanceRequest,
                          eplb_pb2.RebalanceResponse(rebalance_id="r7", pending=True, transfer_plan=_plan_msg(),
                                                     placement=place)),
            "GetTransferPlan": (eplb_pb2.GetTransferPlanRequest, _plan_msg()),
            "CommitRebalance": (eplb_pb2.CommitRebalanceRequest,
                                eplb_pb2.RebalanceResponse(rebalance_id="r7", committed=True, placement=place)),
            "AbortRebalance": (eplb_pb2.AbortRebalanceRequest,
                               eplb_pb2.AbortRebalanceResponse(epoch=4, state=eplb_pb2.MOVE_STATE_NEEDS_RELOAD,
                                                               needs_weight_reload=True)),
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._handler(name, resp),
                                                              request_deserializer=cls.FromString,
                                                              response_serializer=lambda m: m.SerializeToString())
                    for name, (cls, resp) in answers.items()}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("eplb.v1.ExpertBalancer",
                                                                                  handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _handler(self, name, resp):
        def h(req, ctx):
            with self.lock:
                got = self.requests.setdefault(name, [])
                got.append(req)
                n = len(got)
            if n <= self.fail:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return resp
        return h


@pytest.fixture
def fake():
    f = _Recorder()
    yield f
    f.server.stop(0)


def test_requests_and_answers(fake):
    with eplb.Client("127.0.0.1:%d" % fake.port) as c:
        r = c.rebalance("x", physical_load=[[1, 2]], execution="engine", max_staging_bytes=1 << 20,
                        include_transfer_plan=True, expert_bytes=100)
        req = fake.requests["Rebalance"][0]
        assert req.execution == eplb_pb2.EXECUTION_ENGINE and req.max_staging_bytes == 1 << 20
        assert req.include_transfer_plan and req.expert_bytes == 100
        assert r.rebalance_id == "r7" and r.pending and r.placement.epoch == 5
        tp = r.transfer_plan
        assert isinstance(tp, TransferPlan) and tp.rebalance_id == "r7" and tp.base_epoch == 4
        assert tp.num_ranks == 2 and tp.layers == [1] and tp.copies_cross_node == 2 and tp.expert_bytes == 100
        rp = tp.rank_plan(0)
        assert rp.max_staging_slots == 3 and rp.slots_cross_node == 1
        (step,) = rp.steps
        assert step.layer == 1 and [o.kind for o in step.ops] == [SEND, RECV]
        assert step.ops[0].cross_node and step.ops[0].expert == 3 and step.ops[1].dst_staging
        assert tp.to_proto() == _plan_msg()

        c.rebalance("x", execution="server")
        assert fake.requests["Rebalance"][1].execution == eplb_pb2.EXECUTION_SERVER
        assert c.rebalance("x").transfer_plan is not None  # (the fake always answers one)
        assert fake.requests["Rebalance"][2].execution == eplb_pb2.EXECUTION_SERVER
        with pytest.raises(ValueError, match="execution"):
            c.rebalance("x", execution="gpu")
        for v in ("ENGINE", "EXECUTION_ENGINE", eplb_pb2.EXECUTION_ENGINE):
            c.rebalance("x", execution=v)
            assert fake.requests["Rebalance"][-1].execution == eplb_pb2.EXECUTION_ENGINE

        p = c.get_transfer_plan("x", "r7", 3)
        assert fake.requests["GetTransferPlan"][0] == eplb_pb2.GetTransferPlanRequest(model_id="x", rebalance_id="r7",
                                                                                     rank=3)
        assert p == tp
        done = c.commit_rebalance("x", "r7", include_logical_to_physical=True)
        assert fake.requests["CommitRebalance"][0] == eplb_pb2.CommitRebalanceRequest(
            model_id="x", rebalance_id="r7", include_logical_to_physical=True)
        assert done.committed and done.placement.physical_to_logical.tolist() == [[1, 0]]
        a = c.abort_rebalance("x", "r7", bytes_touched=np.int64(4096))
        assert fake.requests["AbortRebalance"][0].bytes_touched == 4096
        assert a == AbortResult(epoch=4, state="MOVE_STATE_NEEDS_RELOAD", needs_weight_reload=True)


def test_register_model_passes_the_model_defaults(fake):
    with eplb.Client("127.0.0.1:%d" % fake.port) as c:
        c.register_model("m", MOE, ep_size=2, num_nodes=2, default_policy="incremental", target_balancedness=0.95,
                         max_bytes_moved=1 << 30, max_slots_moved=64, min_improvement=0.01,
                         link_costs={"intra_node": 1.0, "cross_node": 6.0}, expert_bytes=44040192)
        c.register_model("old", MOE, ep_size=2)
        with pytest.raises(ValueError, match="link_costs"):
            c.register_model("m", MOE, ep_size=2, link_costs={"rdma": 3.0})
        with pytest.raises(ValueError, match="default_policy"):
            c.register_model("m", MOE, ep_size=2, default_policy="greedy")
    new, old = (r.parallel for r in fake.requests["RegisterModel"])
    assert new.default_policy == eplb_pb2.POLICY_INCREMENTAL and new.target_balancedness == 0.95
    assert (new.max_bytes_moved, new.max_slots_moved, new.expert_bytes) == (1 << 30, 64, 44040192)
    assert new.min_improvement == 0.01 and (new.link_costs.intra_node, new.link_costs.cross_node) == (1.0, 6.0)
    assert new.ep_size == 2 and new.num_nodes == 2
    assert old == eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=2)  # the defaults send nothing new


def test_plan_fetch_is_retried_commit_and_abort_are_not():
    f = _Recorder(fail=1)
    try:
        with eplb.Client("127.0.0.1:%d" % f.port, read_retries=2, retry_backoff=0.001) as c:
            assert c.get_transfer_plan("x", "r7", 0).rebalance_id == "r7"
            with pytest.raises(eplb.Unavailable):
                c.commit_rebalance("x", "r7")
            with pytest.raises(eplb.Unavailable):
                c.abort_rebalance("x", "r7", 0)
        assert {k: len(v) for k, v in f.requests.items()} == {"GetTransferPlan": 2, "CommitRebalance": 1,
                                                              "AbortRebalance": 1}
    finally:
        f.server.stop(0)


# ---- against a real eplbd ---------------------------------------------------------------------


def _engine_rebalance(client, model="e", **kw):
    try:
        client.get_transfer_plan(model, "0", 0)
    except eplb.Unimplemented:  # pragma: no cover - an eplbd without #13's RPCs
        pytest.skip("this eplbd does not implement engine-executed rebalances")
    except eplb.EplbError:
        pass
    return client.rebalance(model, physical_load=LOAD, execution="engine", **kw)


def test_engine_rebalance_pending_then_commit(client):
    client.register_model("e", MOE, ep_size=2, num_nodes=2, expert_bytes=1000)
    before = client.get_placement("e")
    r = _engine_rebalance(client, include_transfer_plan=True)
    assert r.rebalance_id and r.pending and not r.committed
    p = client.get_placement("e")
    assert p.epoch == before.epoch and np.array_equal(p.physical_to_logical, before.physical_to_logical)
    assert p.pending_rebalance_id == r.rebalance_id and p.pending_execution == "engine"
    tp = r.transfer_plan
    assert tp is not None and tp.rebalance_id == r.rebalance_id and tp.num_ranks == 2 and len(tp.ranks) == 2
    assert tp.base_epoch == before.epoch and tp.num_local_physical_experts == 3
    for rank in range(2):
        one = client.get_transfer_plan("e", r.rebalance_id, rank)
        assert [x.rank for x in one.ranks] == [rank] and one.ranks[0] == tp.rank_plan(rank)
    with pytest.raises(eplb.InvalidArgument) as e:
        client.get_transfer_plan("e", r.rebalance_id, 2)
    assert "rank" in e.value.message
    with pytest.raises(eplb.Aborted):  # a second rebalance while one is pending
        client.rebalance("e", physical_load=LOAD)
    with pytest.raises(eplb.Aborted):
        client.commit_rebalance("e", "ffffffffffffffff")
    assert client.get_placement("e").pending_rebalance_id == r.rebalance_id
    done = client.commit_rebalance("e", r.rebalance_id)
    assert done.committed and done.placement.epoch == before.epoch + 1
    after = client.get_placement("e")
    assert after == done.placement and after.pending_rebalance_id == "" and after.pending_execution == ""
    assert not np.array_equal(after.physical_to_logical, before.physical_to_logical)
    assert set(tp.layers) == {layer for layer in range(2)
                              if list(after.physical_to_logical[layer]) != list(before.physical_to_logical[layer])}


def test_engine_abort_untouched_and_touched(client):
    client.register_model("a", MOE, ep_size=2)
    before = client.get_placement("a")
    r = _engine_rebalance(client, model="a")
    a = client.abort_rebalance("a", r.rebalance_id, 0)
    assert a.epoch == before.epoch and a.state == "MOVE_STATE_IDLE" and not a.needs_weight_reload
    assert client.get_placement("a") == before and client.get_placement("a").pending_rebalance_id == ""
    r = _engine_rebalance(client, model="a")
    a = client.abort_rebalance("a", r.rebalance_id, 4096)
    assert a.needs_weight_reload and a.state == "MOVE_STATE_NEEDS_RELOAD"
    p = client.get_placement("a")
    assert p.needs_weight_reload and p.state == "MOVE_STATE_NEEDS_RELOAD" and p.pending_rebalance_id == ""


@pytest.mark.parametrize("staging_experts,layers_per_step", [(0, 0), (4, 0), (3, 20)])
def test_deepseek_v3_plans_simulated_reach_the_committed_placement(client, staging_experts, layers_per_step):
    """DeepSeek-V3 at 4 nodes x 8 GPUs (58 layers, 256 + 32 experts, 42 MiB
    each): every rank's plan of every step, run on expert ids in
    execute_plan's order (eplb.transfer.simulate_plan), gives what
    CommitRebalance then serves; cross-node flags and counters agree."""
    from eplb.transfer import simulate_plan

    L, N, P, G, nodes, eb = 58, 256, 288, 32, 4, 42 << 20
    moe = {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
           "moe": {"num_moe_layers": L, "num_logical_experts": N, "num_physical_experts": P,
                   "num_local_physical_experts": P // G, "num_redundant_experts": P - N, "num_expert_groups": 8}}
    client.register_model("ds", moe, ep_size=G, num_nodes=nodes, expert_bytes=eb)
    try:
        client.get_transfer_plan("ds", "0", 0)
    except eplb.Unimplemented:  # pragma: no cover
        pytest.skip("this eplbd does not implement engine-executed rebalances")
    except eplb.EplbError:
        pass
    rng = np.random.default_rng(staging_experts)
    load = rng.zipf(1.3, (L, N)).clip(max=10000)
    r = client.rebalance("ds", logical_load=load, execution="engine", include_transfer_plan=True,
                         max_staging_bytes=staging_experts * eb, layers_per_step=layers_per_step)
    assert r.pending and r.rebalance_id
    served = client.get_placement("ds").physical_to_logical
    commits = 0
    while True:
        tp = r.transfer_plan if commits == 0 else client.get_transfer_plan("ds", r.rebalance_id, 0)
        if commits:  # the other ranks' parts, one call each (as 32 ranks would)
            from dataclasses import replace

            tp = replace(tp, ranks=[client.get_transfer_plan("ds", r.rebalance_id, g).rank_plan(g) for g in range(G)])
        assert tp.num_ranks == G and tp.ranks_per_node == G // nodes and tp.expert_bytes == eb
        if staging_experts:
            assert max(x.max_staging_slots for x in tp.ranks) <= staging_experts
        xnode = sum(1 for x in tp.ranks for s in x.steps for o in s.ops if o.kind == SEND and o.cross_node)
        assert xnode == tp.copies_cross_node
        assert all(o.cross_node == (o.peer_rank // 8 != x.rank // 8)
                   for x in tp.ranks for s in x.steps for o in s.ops if o.kind != "copy")
        assert sum(x.slots_sent for x in tp.ranks) == tp.copies_cross_gpu
        after = simulate_plan(tp, served)
        done = client.commit_rebalance("ds", r.rebalance_id)
        commits += 1
        assert np.array_equal(after, done.placement.physical_to_logical), "step %d" % commits
        served = done.placement.physical_to_logical
        if not done.pending:
            break
    if layers_per_step:
        assert commits > 1
    assert client.get_placement("ds").epoch == commits
