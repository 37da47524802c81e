"""RegisterModel, GetPlacement and Health from Debian's python3-grpcio, with
stubs generated from protos/ at test time (system protoc + grpc_python_plugin).

Run: /usr/bin/python3 tests/integration/test_python_client.py BUILD_DIR
"""
import os
import shutil
import subprocess
import sys
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eplbd_py import Server, eplb_pb2, eplb_pb2_grpc  # noqa: E402  (takes BUILD_DIR from argv)


def moe(arch, layers=2):
    return eplb_pb2.ModelHandle(
        architecture=arch, interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
        moe=eplb_pb2.MoeSpec(num_moe_layers=layers, num_logical_experts=4, num_physical_experts=6,
                             num_local_physical_experts=3, num_redundant_experts=2))


def vlm(arch, inner):
    return eplb_pb2.ModelHandle(architecture=arch, interfaces=[eplb_pb2.SUPPORTS_MULTIMODAL],
                                language_model=inner)


def register_request(name, handle, **kw):
    return eplb_pb2.RegisterModelRequest(
        model_name=name, model=handle,
        parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=2), **kw)


class PythonClientTest(unittest.TestCase):
    def setUp(self):
        self.server = Server()
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.addr)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)

    def tearDown(self):
        self.channel.close()
        rc = self.server.stop()
        self.server.cleanup()
        self.assertEqual(rc, 0, "eplbd did not exit cleanly on SIGTERM")

    def raw(self, method):
        return self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    def test_health_check(self):
        # grpc.health.v1 with raw bytes: a HealthCheckResponse{status: SERVING} is 08 01.
        self.assertEqual(self.raw("/grpc.health.v1.Health/Check")(b"", timeout=10), b"\x08\x01")
        with self.assertRaises(grpc.RpcError) as cm:
            self.raw("/grpc.health.v1.Health/Check")(b"\x0a\x03abc", timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_tls_and_mtls_with_ssl_channel_credentials(self):
        # A CA, a server certificate for localhost/127.0.0.1 and a client
        # certificate, made here with the openssl CLI (scripts/setup.sh
        # installs it: a missing openssl fails this test, it is not skipped).
        self.assertIsNotNone(shutil.which("openssl"), "the openssl CLI is missing")
        srv = Server()
        d = srv.dir
        with open(os.path.join(d, "x.cnf"), "w") as f:
            f.write("[req]\ndistinguished_name = dn\n[dn]\n"
                    "[ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
                    "[server_ext]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n"
                    "subjectAltName = DNS:localhost,IP:127.0.0.1\n"
                    "[client_ext]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n")
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def openssl(*args):
            subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True)

        openssl("req", "-x509", "-config", "x.cnf", "-extensions", "ca_ext", *key, "-keyout", "ca.key",
                "-out", "ca.pem", "-days", "2", "-subj", "/CN=eplb-py-test-ca")
        for name, ext in (("server", "server_ext"), ("client", "client_ext")):
            openssl("req", "-new", "-config", "x.cnf", *key, "-keyout", name + ".key", "-out", name + ".csr",
                    "-subj", "/CN=" + ("localhost" if name == "server" else "eplb-py-client"))
            openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out", name + ".pem", "-days", "2", "-extfile", "x.cnf", "-extensions", ext)

        def pem(name):
            with open(os.path.join(d, name), "rb") as f:
                return f.read()

        srv.extra = ["--tls-cert", os.path.join(d, "server.pem"), "--tls-key", os.path.join(d, "server.key"),
                     "--tls-client-ca", os.path.join(d, "ca.pem")]
        srv.start()
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=pem("ca.pem"), private_key=pem("client.key"),
                                                 certificate_chain=pem("client.pem"))
            with grpc.secure_channel(srv.addr, creds) as ch:
                health = ch.unary_unary("/grpc.health.v1.Health/Check")
                self.assertEqual(health(b"", timeout=10), b"\x08\x01")
                resp = eplb_pb2_grpc.ExpertBalancerStub(ch).RegisterModel(
                    register_request("tls", moe("DeepseekV3ForCausalLM")), timeout=10)
                self.assertTrue(resp.registered)
            # No client certificate: the mTLS server refuses the connection.
            with grpc.secure_channel(srv.addr, grpc.ssl_channel_credentials(pem("ca.pem"))) as ch:
                with self.assertRaises(grpc.RpcError) as cm:
                    ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
            # Plaintext against TLS fails too.
            with grpc.insecure_channel(srv.addr) as ch:
                with self.assertRaises(grpc.RpcError) as cm:
                    ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
        finally:
            rc = srv.stop()
            srv.cleanup()
        self.assertEqual(rc, 0, "the TLS eplbd did not exit cleanly on SIGTERM")

    def test_register_wrapped_moe(self):
        resp = self.stub.RegisterModel(register_request(
            "kimi", vlm("KimiK25ForConditionalGeneration", moe("DeepseekV3ForCausalLM", 3)),
            include_placement=True), timeout=10)
        self.assertTrue(resp.registered)
        self.assertEqual(resp.model_id, "kimi")
        self.assertEqual(resp.resolved_path, "KimiK25ForConditionalGeneration.language_model")
        self.assertEqual(resp.placement.epoch, 0)
        self.assertEqual(list(resp.placement.physical_to_logical), [0, 1, 2, 3, 0, 1] * 3)
        self.assertEqual(list(resp.placement.logical_replica_count), [2, 2, 1, 1] * 3)
        got = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="kimi",
                                                                  include_logical_to_physical=True), timeout=10)
        self.assertEqual(got, resp.placement)
        self.assertEqual(list(got.logical_to_physical[:8]), [0, 4, 1, 5, 2, -1, 3, -1])
        short = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="kimi"), timeout=10)
        self.assertEqual(len(short.logical_to_physical), 0)
        self.assertEqual(got.state, eplb_pb2.MOVE_STATE_IDLE)

    def test_register_answers_without_the_placement_unless_asked(self):
        # 1024 layers x 2048 slots: the placement is ~10 MB, over this client's
        # default 4 MiB receive limit; registering must still succeed here.
        big = eplb_pb2.ModelHandle(
            architecture="Big", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
            moe=eplb_pb2.MoeSpec(num_moe_layers=1024, num_logical_experts=1024, num_physical_experts=2048,
                                 num_local_physical_experts=1024, num_redundant_experts=1024))
        req = eplb_pb2.RegisterModelRequest(
            model_name="big", model=big,
            parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=2, window_size=1))
        resp = self.stub.RegisterModel(req, timeout=30)
        self.assertTrue(resp.registered)
        self.assertFalse(resp.HasField("placement"))
        self.assertEqual(resp.epoch, 0)
        self.assertLess(resp.ByteSize(), 1024)
        # Asked for, it is over this client's receive limit (the registration itself stands).
        req.include_placement = True
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.RegisterModel(req, timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)

    def test_speculator_nested_wrapper(self):
        self.stub.RegisterModel(register_request(
            "kimi", vlm("KimiK25ForConditionalGeneration", moe("DeepseekV3ForCausalLM"))), timeout=10)
        resp = self.stub.RegisterModel(register_request(
            "kimi-eagle", vlm("EagleKimiK25", vlm("KimiK25ForConditionalGeneration", moe("DeepseekV3MTP", 1))),
            role=eplb_pb2.MODEL_ROLE_SPECULATOR, main_model_id="kimi"), timeout=10)
        self.assertTrue(resp.registered)
        self.assertEqual(resp.resolved_path, "EagleKimiK25.language_model.language_model")

    def test_not_moe_is_not_registered(self):
        resp = self.stub.RegisterModel(register_request(
            "llava", vlm("LlavaForConditionalGeneration", eplb_pb2.ModelHandle(architecture="LlamaForCausalLM"))),
            timeout=10)
        self.assertFalse(resp.registered)
        self.assertIn("not a Mixture-of-Experts", resp.reason)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="llava"), timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_invalid_metadata(self):
        handle = moe("DeepseekV3ForCausalLM")
        handle.moe.num_local_physical_experts = 2
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.RegisterModel(register_request("bad", handle), timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("model.moe.num_local_physical_experts 2", cm.exception.details())

    def test_malformed_bytes(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.raw("/eplb.v1.ExpertBalancer/RegisterModel")(b"\xff" * 10 + b"\x0f", timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as cm:
            self.raw("/eplb.v1.ExpertBalancer/Nope")(b"", timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)

    def test_restart_keeps_the_model(self):
        self.stub.RegisterModel(register_request("ds", moe("DeepseekV3ForCausalLM", 2)), timeout=10)
        self.channel.close()
        self.assertEqual(self.server.stop(), 0)
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.addr)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)
        got = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="ds"), timeout=10)
        self.assertEqual(got.num_layers, 2)
        self.assertEqual(list(got.physical_to_logical), [0, 1, 2, 3, 0, 1] * 2)

    # ---- the placement engine -------------------------------------------

    README_LOAD = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    README_MAP = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                  7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]

    def register_readme(self):
        handle = eplb_pb2.ModelHandle(
            architecture="ReadmeMoE", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
            moe=eplb_pb2.MoeSpec(num_moe_layers=2, num_logical_experts=12, num_physical_experts=16,
                                 num_local_physical_experts=2, num_redundant_experts=4,
                                 num_expert_groups=4))
        self.stub.RegisterModel(eplb_pb2.RegisterModelRequest(
            model_name="m", model=handle,
            parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=8, num_nodes=2)), timeout=10)

    def physical(self, slots):
        return [row[s] if s < 12 else 0 for row in self.README_LOAD for s in range(slots)]

    def test_record_rebalance_get(self):
        self.register_readme()
        rec = self.stub.RecordLoad(eplb_pb2.RecordLoadRequest(model_id="m", physical_load=self.physical(16)),
                                   timeout=10)
        self.assertEqual(rec.passes_recorded, 1)
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(
            model_id="m", expected_epoch=0, slot_order=eplb_pb2.SLOT_ORDER_ALGORITHM), timeout=10)
        self.assertTrue(resp.committed)
        self.assertEqual(list(resp.placement.physical_to_logical), self.README_MAP)
        self.assertGreater(resp.balancedness_after, resp.balancedness_before)
        got = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=10)
        self.assertEqual(got.epoch, 1)
        self.assertEqual(list(got.physical_to_logical), self.README_MAP)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", expected_epoch=0), timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.ABORTED)
        self.assertEqual(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=10).epoch, 1)

    def test_commit_gate_and_topology_override(self):
        """A rebalance that does not pay is answered but not committed; a
        topology other than the registered one is dry-run only."""
        self.register_readme()
        # Balanced already: any other answer of this policy is no better.
        flat = [10] * (2 * 12)
        bad = [0] * (2 * 12)
        bad[0], bad[12] = 1000, 1000  # one hot expert per layer: the initial map is worst
        first = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", logical_load=bad), timeout=10)
        self.assertTrue(first.committed)
        self.assertEqual(first.reason, "")
        # Now a load under which the committed map is worse than the current
        # one would be: find out with a dry run, then ask for a gain too large.
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", logical_load=flat,
                                                            min_improvement=0.5), timeout=10)
        self.assertFalse(resp.committed)
        self.assertIn("min_improvement", resp.reason)
        got = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=10)
        self.assertEqual(got.epoch, 1)
        self.assertEqual(list(got.physical_to_logical), list(first.placement.physical_to_logical))
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", logical_load=flat, min_improvement=2),
                                timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        # A different topology: dry run only.
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", logical_load=bad, num_gpus=4, num_nodes=1),
                                timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("num_gpus 4 (registered ep_size 8)", cm.exception.details())
        self.assertIn("num_nodes 1 (registered 2)", cm.exception.details())
        dry = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", logical_load=bad, num_gpus=4, num_nodes=1,
                                                           dry_run=True), timeout=10)
        self.assertFalse(dry.committed)
        self.assertEqual(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=10).epoch, 1)

    def test_scale_up_then_rebalance(self):
        self.register_readme()
        old = list(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"),
                                          timeout=10).physical_to_logical)
        expanded = old[:16] + [-1] * 8 + old[16:] + [-1] * 8
        p = self.stub.SetupFromMapping(eplb_pb2.SetupFromMappingRequest(
            model_id="m", expanded_physical_to_logical=expanded, num_physical_experts=24,
            old_num_physical_experts=16, ep_size=12), timeout=10)
        self.assertEqual((p.epoch, p.num_physical_experts, p.num_valid_physical_experts), (1, 24, 16))
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=self.physical(24)),
                                   timeout=10)
        self.assertNotIn(-1, list(resp.placement.physical_to_logical))
        self.assertEqual(resp.placement.epoch, 2)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.SetupFromMapping(eplb_pb2.SetupFromMappingRequest(
                model_id="m", expanded_physical_to_logical=[0] * 48, num_physical_experts=24,
                old_num_physical_experts=24, ep_size=12), timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("has no replica", cm.exception.details())
        self.assertEqual(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=10).epoch, 2)

    def test_attach_weights_and_move(self):
        """Buffers in POSIX shm: each slot's bytes say which expert it holds."""
        from multiprocessing import shared_memory
        self.register_readme()
        slot_bytes, slots_per_rank, ranks = 256, 2, 8
        # Named under eplbd's --shm-prefix (default /eplb-): anything else is refused.
        shms = [shared_memory.SharedMemory(name="eplb-py-%d-%d" % (os.getpid(), r), create=True,
                                           size=2 * slots_per_rank * slot_bytes)
                for r in range(ranks)]
        try:
            def slot_view(layer, slot):
                r, i = divmod(slot, slots_per_rank)
                off = (layer * slots_per_rank + i) * slot_bytes
                return shms[r].buf[off:off + slot_bytes]

            old = list(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"),
                                              timeout=10).physical_to_logical)
            for layer in range(2):
                for slot in range(16):
                    slot_view(layer, slot)[:] = bytes([old[layer * 16 + slot] + 1 + layer * 16]) * slot_bytes
            req = eplb_pb2.AttachWeightsRequest(
                model_id="m", kind=eplb_pb2.BUFFER_KIND_SHM, backend="cpu",
                ranks=[eplb_pb2.RankBuffer(shm_name="/" + s.name) for s in shms],
                layers=[eplb_pb2.LayerWeights(tensors=[eplb_pb2.ExpertTensor(
                    name="w", bytes_per_expert=slot_bytes,
                    ranks=[eplb_pb2.TensorLayout(offset=layer * slots_per_rank * slot_bytes, stride=slot_bytes)
                           for _ in range(ranks)])]) for layer in range(2)])
            self.assertEqual(self.stub.AttachWeights(req, timeout=10).backend, "cpu")
            resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=self.physical(16)),
                                       timeout=10)
            self.assertGreater(resp.bytes_moved, 0)
            new = list(resp.placement.physical_to_logical)
            for layer in range(2):
                for slot in range(16):
                    self.assertEqual(bytes(slot_view(layer, slot)),
                                     bytes([new[layer * 16 + slot] + 1 + layer * 16]) * slot_bytes)
            self.assertTrue(self.stub.DetachWeights(eplb_pb2.DetachWeightsRequest(model_id="m"), timeout=10).detached)
        finally:
            for s in shms:
                s.close()
                s.unlink()


if __name__ == "__main__":
    unittest.main(verbosity=2)
