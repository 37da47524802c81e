"""eplb.Client against a real eplbd: every RPC, errors mapped to classes with
the server's message, retries of reads only, unix: targets, TLS config."""
import os
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

import eplb
from eplb._proto.eplb.v1 import eplb_pb2
from conftest import Eplbd

MOE = {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
       "moe": {"num_moe_layers": 2, "num_logical_experts": 4, "num_physical_experts": 6,
               "num_local_physical_experts": 3, "num_redundant_experts": 2}}
VLM = {"architecture": "KimiK25ForConditionalGeneration", "interfaces": ["SUPPORTS_MULTIMODAL"],
       "languageModel": MOE}
LOAD = [[90, 132, 40, 61, 0, 0], [20, 107, 104, 64, 0, 0]]


def test_register_get_list_delete(client):
    r = client.register_model("kimi", VLM, ep_size=2, include_placement=True)
    assert r.registered and r.model_id == "kimi" and r.epoch == 0
    assert r.resolved_path == "KimiK25ForConditionalGeneration.language_model"
    assert r.placement.physical_to_logical.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    again = client.register_model("kimi", VLM, ep_size=2)
    assert again.registered and "already registered" in again.reason
    p = client.get_placement("kimi", include_logical_to_physical=True)
    assert p.epoch == 0 and p.state == "MOVE_STATE_IDLE" and p.pending_rebalance_id == ""
    assert p.logical_replica_count.dtype == np.int64 and p.logical_replica_count.tolist() == [[2, 2, 1, 1]] * 2
    models = client.list_models()
    assert [m.model_id for m in models] == ["kimi"]
    assert models[0].architecture == "DeepseekV3ForCausalLM" and models[0].ep_size == 2
    assert client.delete_model("kimi")
    with pytest.raises(eplb.NotFound) as e:
        client.get_placement("kimi")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "kimi" in e.value.message


def test_rebalance_record_continue(client):
    client.register_model("m", MOE, ep_size=2)
    rec = client.record_load("m", np.array(LOAD))
    assert rec.passes_recorded == 1 and not rec.rebalanced
    rec = client.record_load("m", np.array([LOAD, LOAD, LOAD]))  # packed: num_passes 3
    assert rec.passes_recorded == 4
    dry = client.rebalance("m", dry_run=True)
    assert not dry.committed and dry.placement.epoch == 0
    r = client.rebalance("m", physical_load=LOAD, expected_epoch=0)
    assert r.committed and r.placement.epoch == 1 and r.rebalance_id and not r.pending
    assert client.get_placement("m") == r.placement
    logical = client.rebalance("m", logical_load=[[130, 132, 40, 61], [20, 107, 104, 64]], dry_run=True,
                               slot_order="algorithm")
    assert logical.placement.num_layers == 2
    with pytest.raises(ValueError):
        client.rebalance("m", physical_load=LOAD, logical_load=LOAD)


def test_stepped_rebalance(client):
    client.register_model("s", MOE, ep_size=2)
    r = client.rebalance("s", physical_load=LOAD, layers_per_step=1)
    assert r.pending and r.layers_done == 1 and r.layers_moved == [0]
    p = client.get_placement("s")
    assert p.pending_rebalance_id == r.rebalance_id and p.pending_layers_done == 1
    r2 = client.continue_rebalance("s", r.rebalance_id)
    assert not r2.pending and r2.layers_done == 2
    with pytest.raises(eplb.NotFound):
        client.continue_rebalance("s", r.rebalance_id)
    with pytest.raises(eplb.InvalidArgument):
        client.continue_rebalance("s", "")


def test_setup_from_mapping(client):
    client.register_model("e", MOE, ep_size=2)
    p = client.setup_from_mapping("e", [[0, 1, 2, 3, 0, 1, -1, -1]] * 2, old_num_physical_experts=6, ep_size=2,
                                  expected_epoch=0)
    assert p.num_physical_experts == 8 and p.epoch == 1
    assert p.to_numpy().logical_to_physical_map.shape == (2, 4, 5)


def test_errors_carry_code_and_message(client):
    bad = dict(MOE, moe=dict(MOE["moe"], num_physical_experts=8))
    with pytest.raises(eplb.InvalidArgument) as e:
        client.register_model("bad", bad, ep_size=2)
    assert "num_physical_experts 8 != num_logical_experts 4 + num_redundant_experts 2" in e.value.message
    assert e.value.method == "RegisterModel" and "INVALID_ARGUMENT" in str(e.value)
    client.register_model("m", MOE, ep_size=2)
    with pytest.raises(eplb.AlreadyExists):
        client.register_model("m", MOE, ep_size=2, window_size=7)
    with pytest.raises(eplb.Aborted):
        client.rebalance("m", physical_load=LOAD, expected_epoch=7)
    with pytest.raises(eplb.FailedPrecondition):
        client.rebalance("m")  # no load recorded
    with pytest.raises(eplb.InvalidArgument):  # a wait event without device weights
        client.rebalance("m", physical_load=LOAD, wait_event=bytes(64))
    with pytest.raises(eplb.NotFound):
        client.register_model("d", MOE, ep_size=2, role="speculator", main_model_id="nope")
    with pytest.raises(eplb.NotFound):
        client.detach_weights("nope")
    for cls in (eplb.NotFound, eplb.Aborted, eplb.InvalidArgument, eplb.FailedPrecondition, eplb.AlreadyExists,
                eplb.PermissionDenied, eplb.ResourceExhausted, eplb.Unavailable, eplb.DataLoss, eplb.Internal):
        assert issubclass(cls, eplb.EplbError)


def test_attach_detach_raw(client):
    client.register_model("w", MOE, ep_size=2)
    with pytest.raises(eplb.InvalidArgument):
        client.attach_weights("w", kind="shm", ranks=[{"shmName": "/eplb-x"}], layers=[])
    with pytest.raises(eplb.NotFound):
        client.attach_weights("nope", kind="shm", ranks=[], layers=[])


def test_health_and_watch(eplbd, client):
    assert client.health() == "SERVING"
    assert client.health("eplb.v1.ExpertBalancer") == "SERVING"
    with pytest.raises(eplb.NotFound):
        client.health("no.such.Service")
    seen = []
    stream = client.watch_health("")
    seen.append(next(stream))
    eplbd.proc.send_signal(15)
    with pytest.raises(eplb.Unavailable):
        for s in stream:
            seen.append(s)
    assert seen[0] == "SERVING" and seen[-1] == "NOT_SERVING"


def test_unix_target_and_env_default(monkeypatch):
    s = Eplbd(listen="unix:" + "/tmp/eplb-pytest-%d.sock" % os.getpid()).start()
    try:
        monkeypatch.setenv("EPLBD_ADDR", s.listen)
        with eplb.Client() as c:
            assert c.target == s.listen
            assert c.health() == "SERVING"
    finally:
        assert s.stop() == 0
        s.cleanup()
    monkeypatch.delenv("EPLBD_ADDR")
    assert eplb.default_target() == "127.0.0.1:50051"


def test_tls_config():
    assert eplb.TlsConfig.coerce(None) is None
    assert eplb.TlsConfig.coerce({"server_name": "x"}) == eplb.TlsConfig(server_name="x")
    with pytest.raises(ValueError):
        eplb.TlsConfig.coerce({"cafile": "x"})
    with pytest.raises(ValueError):
        eplb.TlsConfig(cert="c").credentials()


def test_tls_against_eplbd(tmp_path):
    import shutil
    import subprocess
    assert shutil.which("openssl"), "the openssl CLI is missing"
    d = str(tmp_path)
    with open(os.path.join(d, "x.cnf"), "w") as f:
        f.write("[req]\ndistinguished_name = dn\n[dn]\n[ca_ext]\nbasicConstraints = critical,CA:TRUE\n"
                "keyUsage = critical,keyCertSign,cRLSign\n[server_ext]\nbasicConstraints = CA:FALSE\n"
                "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:eplbd.test\n")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ssl(*a):
        subprocess.run(["openssl"] + list(a), cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-config", "x.cnf", "-extensions", "ca_ext", *key, "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=t-ca")
    ssl("req", "-new", "-config", "x.cnf", *key, "-keyout", "s.key", "-out", "s.csr", "-subj", "/CN=eplbd.test")
    ssl("x509", "-req", "-in", "s.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "s.pem",
        "-days", "2", "-extfile", "x.cnf", "-extensions", "server_ext")
    s = Eplbd("--tls-cert", os.path.join(d, "s.pem"), "--tls-key", os.path.join(d, "s.key")).start()
    try:
        tls = {"ca": os.path.join(d, "ca.pem"), "server_name": "eplbd.test"}
        with eplb.Client(s.addr, tls=tls) as c:
            assert c.health() == "SERVING"
        with eplb.Client(s.addr, timeout=3, read_retries=0) as c:  # plaintext to a TLS server
            with pytest.raises(eplb.EplbError):
                c.health()
    finally:
        assert s.stop() == 0
        s.cleanup()


class _Flaky:
    """A gRPC server answering UNAVAILABLE to the first `fail` calls of each method."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls = {}
        self.lock = threading.Lock()
        handlers = {}
        for name, resp in (("GetPlacement", eplb_pb2.Placement(model_id="x", num_layers=1, num_physical_experts=1,
                                                               num_logical_experts=1, physical_to_logical=[0],
                                                               logical_replica_count=[1])),
                           ("ListModels", eplb_pb2.ListModelsResponse()),
                           ("RecordLoad", eplb_pb2.RecordLoadResponse()),
                           ("Rebalance", eplb_pb2.RebalanceResponse())):
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._handler(name, resp), request_deserializer=lambda b: b,
                response_serializer=lambda m: m.SerializeToString())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("eplb.v1.ExpertBalancer",
                                                                                  handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _handler(self, name, resp):
        def h(req, ctx):
            with self.lock:
                n = self.calls[name] = self.calls.get(name, 0) + 1
            if n <= self.fail:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return resp
        return h


def test_retries_reads_only():
    f = _Flaky(fail=2)
    try:
        with eplb.Client("127.0.0.1:%d" % f.port, read_retries=3, retry_backoff=0.001) as c:
            assert c.get_placement("x").model_id == "x"       # 2 failures, then OK
            assert c.list_models() == []
            with pytest.raises(eplb.Unavailable) as e:
                c.record_load("x", [[1]])                     # never retried
            assert e.value.message == "try again"
            with pytest.raises(eplb.Unavailable):
                c.rebalance("x", physical_load=[[1]])
        assert f.calls == {"GetPlacement": 3, "ListModels": 3, "RecordLoad": 1, "Rebalance": 1}
    finally:
        f.server.stop(0)


def test_stopped_server_reads_retry_then_raise(eplbd):
    addr = eplbd.addr
    with eplb.Client(addr, read_retries=2, retry_backoff=0.05, timeout=5) as c:
        c.register_model("m", MOE, ep_size=2)
        assert eplbd.stop() == 0
        t0 = time.monotonic()
        with pytest.raises(eplb.Unavailable):
            c.get_placement("m")
        assert time.monotonic() - t0 >= 0.05 + 0.1 * 0.99  # two backoffs: 0.05 + 0.1
        with pytest.raises(eplb.Unavailable):
            c.record_load("m", LOAD)
        with pytest.raises(eplb.Unavailable):
            c.delete_model("m")


def test_rebalance_reports_node_repairs(client):
    """A layer whose nodes drift apart takes a node repair (one group swapped
    between the nodes), and the answer counts it: DeepSeek's placement of the
    first load puts groups 0 and 3 on one node, the second makes both hot."""
    moe = {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
           "moe": {"num_moe_layers": 4, "num_logical_experts": 32, "num_physical_experts": 40,
                   "num_local_physical_experts": 5, "num_redundant_experts": 8, "num_expert_groups": 4}}
    client.register_model("nr", moe, ep_size=8, num_nodes=2)
    first = [[(400, 300, 200, 100)[e // 8] * (1 + (e + l) % 8) for e in range(32)] for l in range(4)]
    second = [[(400, 100, 100, 400)[e // 8] * (1 + (e + 3 * l) % 8) for e in range(32)] for l in range(4)]
    assert client.rebalance("nr", logical_load=first).committed
    r = client.rebalance("nr", logical_load=second, policy="incremental", dry_run=True)
    assert r.layers_node_repaired == 4 and r.layers_from_scratch == 0, r.reason
    assert r.policy_used == "incremental" and "node repair" in r.reason
    assert r.balancedness_after >= 0.99 * r.balancedness_reference - 1e-9
    assert r.plan_copies_cross_gpu < r.reference_copies_cross_gpu


def test_rebalance_incremental_policy_fields(client):
    """POLICY_INCREMENTAL through the client: what the answer reports, budgets, bad knobs."""
    client.register_model("inc", MOE, ep_size=2)
    r = client.rebalance("inc", physical_load=LOAD, policy="incremental", target_balancedness=0.99, dry_run=True)
    assert r.policy_used == "incremental" and not r.committed
    assert r.balancedness_after >= r.balancedness_before - 1e-12
    assert r.balancedness_after >= 0.99 * r.balancedness_reference - 1e-9
    assert r.slots_moved == r.experts_moved
    assert r.plan_copies_cross_gpu <= r.slots_moved
    budget = client.rebalance("inc", physical_load=LOAD, policy="incremental", max_slots_moved=1,
                              expert_bytes=1 << 20, max_bytes_moved=1 << 20, link_costs={"cross_node": 8},
                              dry_run=True)
    assert budget.slots_moved <= 1 and budget.plan_copies_cross_gpu <= 1
    assert budget.plan_bytes_cross_gpu == budget.plan_copies_cross_gpu << 20
    d = client.rebalance("inc", physical_load=LOAD, dry_run=True)
    assert d.policy_used == "deepseek" and d.balancedness_reference == pytest.approx(d.balancedness_after)
    with pytest.raises(eplb.InvalidArgument) as e:
        client.rebalance("inc", physical_load=LOAD, policy="incremental", max_bytes_moved=10)
    assert "expert_bytes" in e.value.message
    with pytest.raises(ValueError):
        client.rebalance("inc", physical_load=LOAD, policy="fastest")
    assert client.get_placement("inc").epoch == 0
