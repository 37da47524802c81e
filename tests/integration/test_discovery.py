"""grpc.health.v1.Health/Watch and gRPC server reflection (v1 and v1alpha)
against a real eplbd, from Debian's python3-grpcio in a separate process.

Run: /usr/bin/python3 tests/integration/test_discovery.py BUILD_DIR
"""
import os
import queue
import sys
import threading
import time
import unittest

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eplbd_py import (Server, eplb_pb2, eplb_pb2_grpc, health_pb2, reflection_pb2,  # noqa: E402
                      reflection_v1alpha_pb2)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
WATCH = "/grpc.health.v1.Health/Watch"
REFLECT = {"v1": ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", reflection_pb2),
           "v1alpha": ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", reflection_v1alpha_pb2)}


class Watcher:
    """One Watch stream read on a thread: statuses land in a queue, then the
    stream's end (a grpc.RpcError or None for OK)."""

    def __init__(self, channel, service=""):
        watch = channel.unary_stream(WATCH, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.call = watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        self.q = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for resp in self.call:
                self.q.put(resp.status)
            self.q.put(("end", None))
        except grpc.RpcError as e:
            self.q.put(("end", e))

    def next(self, timeout=20):
        return self.q.get(timeout=timeout)

    def quiet(self, seconds):
        """Nothing arrives for that long."""
        try:
            got = self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError("unexpected %r" % (got,))


def moe(layers=2):
    return eplb_pb2.ModelHandle(
        architecture="ReadmeMoE", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
        moe=eplb_pb2.MoeSpec(num_moe_layers=layers, num_logical_experts=12, num_physical_experts=16,
                             num_local_physical_experts=2, num_redundant_experts=4, num_expert_groups=4))


class DiscoveryTest(unittest.TestCase):
    def setUp(self):
        self.server = Server()
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.addr)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)
        self.stopped = False

    def tearDown(self):
        self.channel.close()
        if not self.stopped:
            self.assertEqual(self.server.stop(), 0, "eplbd did not exit cleanly on SIGTERM")
        self.server.cleanup()

    def stop_server(self):
        t0 = time.time()
        rc = self.server.stop()
        self.stopped = True
        self.assertEqual(rc, 0, "eplbd did not exit cleanly on SIGTERM")
        return time.time() - t0

    # ---- Health/Watch ---------------------------------------------------

    def test_watch_serving_then_not_serving_on_sigterm(self):
        watchers = [Watcher(self.channel, svc) for svc in ("", "eplb.v1.ExpertBalancer")]
        for w in watchers:
            self.assertEqual(w.next(), SERVING)
            w.quiet(0.3)  # no change, no message
        took = self.stop_server()
        for w in watchers:
            self.assertEqual(w.next(), NOT_SERVING)
            kind, err = w.next()
            self.assertEqual(kind, "end")
            self.assertIsNotNone(err)
            self.assertEqual(err.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("shutting down", err.details())
        # Watchers do not hold the drain (default --drain-ms is 10 s).
        self.assertLess(took, 5.0)

    def test_many_watchers_all_see_the_drain(self):
        watchers = [Watcher(self.channel) for _ in range(40)]
        for w in watchers:
            self.assertEqual(w.next(), SERVING)
        self.stop_server()
        for w in watchers:
            self.assertEqual(w.next(), NOT_SERVING)
            self.assertEqual(w.next()[1].code(), grpc.StatusCode.UNAVAILABLE)

    def test_watch_unknown_service_stays_open(self):
        w = Watcher(self.channel, "no.such.Service")
        self.assertEqual(w.next(), SERVICE_UNKNOWN)
        w.quiet(0.5)  # the protocol: the call is not ended
        w.call.cancel()
        kind, err = w.next()
        self.assertEqual(err.code(), grpc.StatusCode.CANCELLED)
        # The server is fine and counts the stream as gone.
        health = self.channel.unary_unary("/grpc.health.v1.Health/Check",
                                          request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                          response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.assertEqual(health(health_pb2.HealthCheckRequest(), timeout=10).status, SERVING)

    def test_watch_client_cancel_then_drain_is_quick(self):
        ws = [Watcher(self.channel, "eplb.v1.ExpertBalancer") for _ in range(5)]
        for w in ws:
            self.assertEqual(w.next(), SERVING)
            w.call.cancel()
            self.assertEqual(w.next()[1].code(), grpc.StatusCode.CANCELLED)
        time.sleep(0.2)
        self.assertLess(self.stop_server(), 5.0)
        with open(self.server.log) as f:
            log = f.read()
        self.assertIn("Health/Watch CANCELLED", log)

    def test_watch_malformed_request(self):
        raw = self.channel.unary_stream(WATCH, request_serializer=None, response_deserializer=None)
        with self.assertRaises(grpc.RpcError) as cm:
            list(raw(b"\x0a\xff\xff", timeout=10))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("HealthCheckRequest", cm.exception.details())

    def test_watch_sees_a_model_needing_reload(self):
        """A weight move that cannot run (a shm buffer shrank) leaves the
        model NEEDS_RELOAD: the service watch goes NOT_SERVING, the
        whole-server watch stays SERVING; deleting the model recovers."""
        from multiprocessing import shared_memory
        self.stub.RegisterModel(eplb_pb2.RegisterModelRequest(
            model_name="m", model=moe(),
            parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=8, num_nodes=2)), timeout=10)
        svc, whole = Watcher(self.channel, "eplb.v1.ExpertBalancer"), Watcher(self.channel, "")
        self.assertEqual(svc.next(), SERVING)
        self.assertEqual(whole.next(), SERVING)
        slot_bytes, ranks = 256, 8
        shms = [shared_memory.SharedMemory(name="eplb-disc-%d-%d" % (os.getpid(), r), create=True,
                                           size=2 * 2 * slot_bytes) for r in range(ranks)]
        try:
            req = eplb_pb2.AttachWeightsRequest(
                model_id="m", kind=eplb_pb2.BUFFER_KIND_SHM, backend="cpu",
                ranks=[eplb_pb2.RankBuffer(shm_name="/" + s.name) for s in shms],
                layers=[eplb_pb2.LayerWeights(tensors=[eplb_pb2.ExpertTensor(
                    name="w", bytes_per_expert=slot_bytes,
                    ranks=[eplb_pb2.TensorLayout(offset=layer * 2 * slot_bytes, stride=slot_bytes)
                           for _ in range(ranks)])]) for layer in range(2)])
            self.stub.AttachWeights(req, timeout=10)
            os.truncate("/dev/shm/" + shms[3].name, 0)
            load = [(7 * i) % 13 + (50 if i % 16 == 3 else 0) for i in range(32)]
            with self.assertRaises(grpc.RpcError) as cm:
                self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=load), timeout=10)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.DATA_LOSS)
            got = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=10)
            self.assertEqual(got.state, eplb_pb2.MOVE_STATE_NEEDS_RELOAD)
            self.assertEqual(svc.next(), NOT_SERVING)
            whole.quiet(0.3)
            self.stub.DeleteModel(eplb_pb2.DeleteModelRequest(model_id="m", force=True), timeout=10)
            self.assertEqual(svc.next(), SERVING)
            whole.quiet(0.2)
        finally:
            for s in shms:
                s.close()
                try:
                    s.unlink()
                except FileNotFoundError:
                    pass

    # ---- reflection -----------------------------------------------------

    def reflect(self, version, requests):
        method, pb = REFLECT[version]
        call = self.channel.stream_stream(method, request_serializer=pb.ServerReflectionRequest.SerializeToString,
                                          response_deserializer=pb.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=10))

    def test_list_services_and_fetch_descriptors(self):
        for version in ("v1", "v1alpha"):
            pb = REFLECT[version][1]
            R = pb.ServerReflectionRequest
            out = self.reflect(version, [
                R(host="h", list_services=""),
                R(file_containing_symbol="eplb.v1.ExpertBalancer"),
                R(file_containing_symbol="eplb.v1.ExpertBalancer.Rebalance"),
                R(file_containing_symbol="eplb.v1.RebalanceRequest"),
                R(file_by_filename="grpc/health/v1/health.proto"),
            ])
            self.assertEqual(len(out), 5)
            self.assertEqual(out[0].valid_host, "h")
            self.assertEqual(out[0].original_request.list_services, "")
            names = [s.name for s in out[0].list_services_response.service]
            for want in ("eplb.v1.ExpertBalancer", "grpc.health.v1.Health",
                         "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
                self.assertIn(want, names)
            pool = descriptor_pool.DescriptorPool()
            for r in out[1:4]:
                (raw,) = r.file_descriptor_response.file_descriptor_proto
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                self.assertEqual(fd.name, "eplb/v1/eplb.proto")
            pool.Add(fd)
            svc = pool.FindServiceByName("eplb.v1.ExpertBalancer")
            methods = {m.name for m in svc.methods}
            for m in ("RegisterModel", "GetPlacement", "SetupFromMapping", "Rebalance", "RecordLoad",
                      "AttachWeights", "DetachWeights", "ListModels", "DeleteModel"):
                self.assertIn(m, methods)
            # The descriptor is the one the stubs were built from.
            self.assertEqual(pool.FindMessageTypeByName("eplb.v1.RebalanceRequest").fields_by_name.keys(),
                             eplb_pb2.RebalanceRequest.DESCRIPTOR.fields_by_name.keys())
            (raw,) = out[4].file_descriptor_response.file_descriptor_proto
            hfd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            self.assertEqual([s.name for s in hfd.service], ["Health"])
            self.assertEqual({m.name for m in hfd.service[0].method}, {"Check", "Watch"})

    def test_reflection_errors_keep_the_stream(self):
        R = reflection_pb2.ServerReflectionRequest
        out = self.reflect("v1", [
            R(file_containing_symbol="eplb.v1.NoSuchThing"),
            R(file_by_filename="nope.proto"),
            R(file_containing_extension=reflection_pb2.ExtensionRequest(containing_type="eplb.v1.Placement",
                                                                        extension_number=5)),
            R(all_extension_numbers_of_type="eplb.v1.Placement"),
            R(file_containing_symbol="eplb.v1.ExpertBalancer.NoSuchMethod"),
            R(),
            R(list_services=""),
        ])
        self.assertEqual(len(out), 7)
        for r in out[:3] + out[4:5]:
            self.assertEqual(r.error_response.error_code, grpc.StatusCode.NOT_FOUND.value[0])
            self.assertTrue(r.error_response.error_message)
        self.assertEqual(out[3].all_extension_numbers_response.base_type_name, "eplb.v1.Placement")
        self.assertEqual(list(out[3].all_extension_numbers_response.extension_number), [])
        self.assertEqual(out[5].error_response.error_code, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        self.assertTrue(out[6].list_services_response.service)

    def test_reflection_error_messages_stay_valid_utf8(self):
        """A name cut in the error message is cut between characters (the
        response must stay decodable), and huge requests are refused."""
        R = reflection_pb2.ServerReflectionRequest
        name = "x" * 199 + "\u00e9" * 10
        out = self.reflect("v1", [R(file_containing_symbol=name), R(file_by_filename=name)])
        self.assertEqual(len(out), 2)
        for r in out:
            self.assertEqual(r.error_response.error_code, grpc.StatusCode.NOT_FOUND.value[0])
            self.assertTrue(r.error_response.error_message.endswith("x" * 199))
        with self.assertRaises(grpc.RpcError) as cm:
            self.reflect("v1", [R(file_containing_symbol="y" * (70 << 10))])
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)

    def test_reflection_malformed_message_ends_the_stream(self):
        raw = self.channel.stream_stream(REFLECT["v1"][0], request_serializer=None, response_deserializer=None)
        with self.assertRaises(grpc.RpcError) as cm:
            list(raw(iter([b"\x3a\xff\xff\xff"]), timeout=10))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_idle_reflection_stream_does_not_hold_the_drain(self):
        method, pb = REFLECT["v1"]
        call = self.channel.stream_stream(method, request_serializer=pb.ServerReflectionRequest.SerializeToString,
                                          response_deserializer=pb.ServerReflectionResponse.FromString)
        gate = threading.Event()

        def requests():
            yield pb.ServerReflectionRequest(list_services="")
            gate.wait(30)  # idle: the client sends nothing more

        it = call(requests(), timeout=60)
        self.assertTrue(next(it).list_services_response.service)
        took = self.stop_server()
        with self.assertRaises(grpc.RpcError) as cm:
            next(it)
        gate.set()
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertLess(took, 5.0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
