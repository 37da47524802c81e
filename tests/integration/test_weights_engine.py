"""Weights as an engine holds them, moved by a real eplbd over shm, from a
separate "engine" process (this one): per-layer tensors (w13, w2 of each
layer in one region per layer at offsets, every layer's scale in one shared
region), 58 MoE layers x 3 tensors at ep 8, a rebalance committed 4 layers
per step with ContinueRebalance, and every slot's bytes checked against the
served placement after each step; a server holding only some ranks refuses
plans that need the others; a crash between steps keeps the step and the
pending rebalance, which continues after a restart and a re-attach.

Run: /usr/bin/python3 tests/integration/test_weights_engine.py BUILD_DIR
"""
import os
import signal
import sys
import unittest
from multiprocessing import shared_memory

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eplbd_py import Server, eplb_pb2, eplb_pb2_grpc  # noqa: E402

L, N, P, G = 58, 32, 40, 8          # layers, logical experts, slots, EP ranks
S = P // G                          # slots per rank
W13, W2, SCALE = 384, 192, 16       # bytes per expert of each tensor
ALIGN = 64


def pattern(layer, tensor, expert, n):
    """The bytes expert `expert`'s tensor holds in `layer`: distinct for
    every (layer, tensor, expert)."""
    seed = (layer * 131 + tensor * 31 + expert * 7 + 1) & 0xFF
    return bytes((seed + i * 13) & 0xFF for i in range(n))


class Engine:
    """The engine's weights: per rank, region 0 holds every layer's scale,
    region 1 + l holds layer l's w13 then w2 (each at its own offset)."""

    def __init__(self, tag):
        self.tag = tag
        self.layer_bytes = ALIGN + S * (W13 + W2) + ALIGN
        self.scale_bytes = L * S * SCALE + ALIGN
        self.shm = []  # [rank][region]
        for g in range(G):
            regs = [shared_memory.SharedMemory(name=self.name(g, 0), create=True, size=self.scale_bytes)]
            for layer in range(L):
                regs.append(shared_memory.SharedMemory(name=self.name(g, 1 + layer), create=True,
                                                       size=self.layer_bytes))
            self.shm.append(regs)

    def name(self, g, r):
        return "eplb-eng-%s-%d-%d-%d" % (self.tag, os.getpid(), g, r)

    # (region, offset, stride) of tensor t of layer l on any rank
    def layout(self, layer, t):
        if t == 0:
            return 1 + layer, ALIGN, W13
        if t == 1:
            return 1 + layer, ALIGN + S * W13, W2
        return 0, layer * S * SCALE, SCALE

    def slot(self, g, layer, t, i):
        region, off, stride = self.layout(layer, t)
        n = (W13, W2, SCALE)[t]
        at = off + i * stride
        return self.shm[g][region].buf, at, n

    def fill(self, phy2log):
        for layer in range(L):
            for s in range(P):
                g, i = divmod(s, S)
                for t in range(3):
                    buf, at, n = self.slot(g, layer, t, i)
                    buf[at:at + n] = pattern(layer, t, phy2log[layer * P + s], n)

    def check(self, test, phy2log, what):
        for layer in range(L):
            for s in range(P):
                g, i = divmod(s, S)
                for t in range(3):
                    buf, at, n = self.slot(g, layer, t, i)
                    if bytes(buf[at:at + n]) != pattern(layer, t, phy2log[layer * P + s], n):
                        test.fail("%s: layer %d slot %d tensor %d does not hold expert %d's bytes" %
                                  (what, layer, s, t, phy2log[layer * P + s]))

    def request(self, first_rank=0, num_ranks=0):
        ranks = range(first_rank, first_rank + (num_ranks or G))
        tensors = []
        for layer in range(L):
            ts = []
            for t, (name, n) in enumerate((("w13", W13), ("w2", W2), ("w13_scale", SCALE))):
                region, off, stride = self.layout(layer, t)
                ts.append(eplb_pb2.ExpertTensor(name=name, bytes_per_expert=n, ranks=[
                    eplb_pb2.TensorLayout(region=region, offset=off, stride=stride) for _ in ranks]))
            tensors.append(eplb_pb2.LayerWeights(tensors=ts))
        return eplb_pb2.AttachWeightsRequest(
            model_id="m", kind=eplb_pb2.BUFFER_KIND_SHM, backend="cpu", first_rank=first_rank,
            num_ranks=num_ranks,
            ranks=[eplb_pb2.RankBuffer(regions=[eplb_pb2.MemoryRegion(shm_name="/" + r.name) for r in self.shm[g]])
                   for g in ranks],
            layers=tensors)

    def close(self):
        for regs in self.shm:
            for r in regs:
                r.close()
                try:
                    r.unlink()
                except FileNotFoundError:
                    pass


def handle():
    return eplb_pb2.ModelHandle(
        architecture="EngineMoE", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
        moe=eplb_pb2.MoeSpec(num_moe_layers=L, num_logical_experts=N, num_physical_experts=P,
                             num_local_physical_experts=S, num_redundant_experts=P - N, num_expert_groups=4))


def skewed_load():
    """Physical load under the initial map (expert e in slot e, redundant
    slots e - N): one hot expert per layer, so every layer changes."""
    load = []
    for layer in range(L):
        for s in range(P):
            e = s if s < N else s - N
            load.append(5 + (e * 7 + layer * 3) % 11 + (300 if e == (layer * 5) % N else 0))
    return load


class WeightsEngineTest(unittest.TestCase):
    def setUp(self):
        self.server = Server()
        self.server.start()
        self.connect()
        self.engine = Engine(str(id(self) % 100000))
        self.stub.RegisterModel(eplb_pb2.RegisterModelRequest(
            model_name="m", model=handle(),
            parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=G, num_nodes=2)), timeout=30)

    def connect(self):
        self.channel = grpc.insecure_channel(self.server.addr)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)

    def tearDown(self):
        self.channel.close()
        if self.server.proc.poll() is None:
            self.assertEqual(self.server.stop(), 0, "eplbd did not exit cleanly on SIGTERM")
        self.server.cleanup()
        self.engine.close()

    def served(self):
        return list(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=30).physical_to_logical)

    def test_per_layer_regions_four_layers_per_step(self):
        start = self.served()
        self.engine.fill(start)
        got = self.stub.AttachWeights(self.engine.request(), timeout=60)
        self.assertEqual(got.backend, "cpu")
        self.assertEqual(got.bytes_per_slot, L * (W13 + W2 + SCALE))
        # The one-shot target of the same load from the same start.
        dry = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=skewed_load(),
                                                           dry_run=True), timeout=60)
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=skewed_load(),
                                                            layers_per_step=4), timeout=60)
        rid = resp.rebalance_id
        self.assertTrue(rid)
        steps, moved = 1, []
        while True:
            self.assertTrue(resp.committed)
            self.assertLessEqual(len(resp.layers_moved), 4)
            moved += list(resp.layers_moved)
            self.assertEqual(resp.bytes_moved, resp.experts_moved * (W13 + W2 + SCALE))
            served = self.served()
            self.assertEqual(served, list(resp.placement.physical_to_logical))
            self.engine.check(self, served, "after step %d" % steps)
            p = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=30)
            if not resp.pending:
                self.assertEqual(p.pending_rebalance_id, "")
                break
            self.assertEqual((p.pending_rebalance_id, p.pending_layers_done), (rid, resp.layers_done))
            resp = self.stub.ContinueRebalance(eplb_pb2.ContinueRebalanceRequest(model_id="m", rebalance_id=rid),
                                               timeout=60)
            self.assertEqual(resp.rebalance_id, rid)
            steps += 1
        self.assertEqual(resp.layers_done, L)
        self.assertEqual(sorted(moved), sorted(set(moved)))
        self.assertGreaterEqual(steps, 10)  # >= 40 of 58 layers change under this load
        # The last step ends at the one-shot target; the balancedness each
        # step reports is the whole rebalance's.
        self.assertEqual(self.served(), list(dry.placement.physical_to_logical))
        self.assertAlmostEqual(resp.balancedness_after, dry.balancedness_after, places=12)
        self.assertEqual(len(moved), sum(1 for layer in range(L)
                                         if start[layer * P:(layer + 1) * P] !=
                                         list(dry.placement.physical_to_logical)[layer * P:(layer + 1) * P]))

    def test_a_rebalance_while_one_is_pending_is_aborted(self):
        self.engine.fill(self.served())
        self.stub.AttachWeights(self.engine.request(), timeout=60)
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=skewed_load(),
                                                            layers_per_step=4), timeout=60)
        self.assertTrue(resp.pending)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=skewed_load()), timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.ABORTED)
        self.assertIn(resp.rebalance_id, cm.exception.details())
        for rid, code in (("", grpc.StatusCode.INVALID_ARGUMENT), ("ffffffffffffffff", grpc.StatusCode.NOT_FOUND)):
            with self.assertRaises(grpc.RpcError) as cm:
                self.stub.ContinueRebalance(eplb_pb2.ContinueRebalanceRequest(model_id="m", rebalance_id=rid),
                                            timeout=30)
            self.assertEqual(cm.exception.code(), code)
        self.engine.check(self, self.served(), "after the refusals")

    def test_a_server_holding_some_ranks_refuses_plans_that_need_others(self):
        start = self.served()
        self.engine.fill(start)
        # This server holds ranks 4..7 (one node of two).
        got = self.stub.AttachWeights(self.engine.request(first_rank=4, num_ranks=4), timeout=60)
        self.assertEqual(got.backend, "cpu")
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=skewed_load(),
                                                         slot_order=eplb_pb2.SLOT_ORDER_ALGORITHM), timeout=60)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("GPU", cm.exception.details())
        self.assertEqual(self.served(), start)
        self.engine.check(self, start, "after the refusal")
        # Wrong counts are refused with the range in the message.
        bad = self.engine.request(first_rank=4, num_ranks=4)
        bad.num_ranks = 5
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachWeights(bad, timeout=60)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_bad_regions_are_refused_naming_them(self):
        req = self.engine.request()
        req.layers[3].tensors[1].ranks[2].region = 99
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachWeights(req, timeout=60)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("layers[3].tensors[1] (w2).ranks[2].region 99", cm.exception.details())
        req = self.engine.request()
        req.layers[7].tensors[0].ranks[1].offset = ALIGN + 10  # overlaps w2 of layer 7
        req.layers[7].tensors[1].ranks[1].offset = ALIGN + 10 + S * W13 - 64
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachWeights(req, timeout=60)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("overlaps", cm.exception.details())
        req = self.engine.request()
        req.ranks[5].regions[3].shm_name = req.ranks[5].regions[2].shm_name
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachWeights(req, timeout=60)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("same memory", cm.exception.details())

    def test_a_crash_between_steps_continues_after_a_restart(self):
        self.engine.fill(self.served())
        self.stub.AttachWeights(self.engine.request(), timeout=60)
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", physical_load=skewed_load(),
                                                            layers_per_step=4), timeout=60)
        resp = self.stub.ContinueRebalance(eplb_pb2.ContinueRebalanceRequest(model_id="m",
                                                                             rebalance_id=resp.rebalance_id), timeout=60)
        self.assertTrue(resp.pending)
        rid, done, epoch = resp.rebalance_id, resp.layers_done, resp.placement.epoch
        self.channel.close()
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(timeout=30)
        self.server.start()
        self.connect()
        p = self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=30)
        self.assertEqual((p.epoch, p.pending_rebalance_id, p.pending_layers_done), (epoch, rid, done))
        self.engine.check(self, list(p.physical_to_logical), "after the restart")
        # The weights moved with it: continuing needs them attached again.
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.ContinueRebalance(eplb_pb2.ContinueRebalanceRequest(model_id="m", rebalance_id=rid), timeout=60)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.stub.AttachWeights(self.engine.request(), timeout=60)
        while True:
            resp = self.stub.ContinueRebalance(eplb_pb2.ContinueRebalanceRequest(model_id="m", rebalance_id=rid),
                                               timeout=60)
            self.engine.check(self, list(resp.placement.physical_to_logical), "after a step past the restart")
            if not resp.pending:
                break
        self.assertEqual(resp.layers_done, L)


class StagingBoundTest(unittest.TestCase):
    """--max-staging-mib 1 with 384 KiB experts: 2 staging entries per GPU,
    so a layer that reshuffles more moves in chunks -- and its bytes are
    right after the move."""

    EB = 384 << 10  # one expert's bytes (one tensor)
    LB, NB, PB, GB = 3, 8, 16, 2

    def setUp(self):
        self.server = Server()
        self.server.extra = ["--max-staging-mib", "1"]
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.addr)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)
        S = self.PB // self.GB
        self.shm = [shared_memory.SharedMemory(name="eplb-stg-%d-%d" % (os.getpid(), g), create=True,
                                               size=self.LB * S * self.EB) for g in range(self.GB)]
        h = eplb_pb2.ModelHandle(
            architecture="StagingMoE", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
            moe=eplb_pb2.MoeSpec(num_moe_layers=self.LB, num_logical_experts=self.NB,
                                 num_physical_experts=self.PB, num_local_physical_experts=S,
                                 num_redundant_experts=self.PB - self.NB, num_expert_groups=1))
        self.stub.RegisterModel(eplb_pb2.RegisterModelRequest(
            model_name="m", model=h, parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=self.GB)),
            timeout=30)

    def tearDown(self):
        self.channel.close()
        self.assertEqual(self.server.stop(), 0)
        self.server.cleanup()
        for m in self.shm:
            m.close()
            m.unlink()

    def view(self, layer, s):
        S = self.PB // self.GB
        g, i = divmod(s, S)
        at = (layer * S + i) * self.EB
        return self.shm[g].buf[at:at + self.EB]

    def stamp(self, layer, expert):
        return bytes([(layer * 16 + expert) & 0xFF]) * 64

    def test_a_layer_over_the_bound_moves_in_chunks(self):
        S = self.PB // self.GB
        start = list(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=30).physical_to_logical)
        for layer in range(self.LB):
            for s in range(self.PB):
                v = self.view(layer, s)
                v[:] = self.stamp(layer, start[layer * self.PB + s]) * (self.EB // 64)
        req = eplb_pb2.AttachWeightsRequest(
            model_id="m", kind=eplb_pb2.BUFFER_KIND_SHM, backend="cpu",
            ranks=[eplb_pb2.RankBuffer(shm_name="/" + m.name) for m in self.shm],
            layers=[eplb_pb2.LayerWeights(tensors=[eplb_pb2.ExpertTensor(
                name="w", bytes_per_expert=self.EB,
                ranks=[eplb_pb2.TensorLayout(offset=layer * S * self.EB, stride=self.EB)
                       for _ in range(self.GB)])]) for layer in range(self.LB)])
        self.stub.AttachWeights(req, timeout=30)
        # A load whose policy answer reshuffles most slots of each GPU.
        load = [(l * 7 + e * 13) % 17 + (200 if e % 3 == l else 0) for l in range(self.LB) for e in range(self.NB)]
        # (force: this load's answer is no better balanced than the initial
        # map, and the commit gate would keep it; the bytes are the point)
        resp = self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="m", logical_load=load, force=True,
                                                            slot_order=eplb_pb2.SLOT_ORDER_ALGORITHM), timeout=60)
        self.assertTrue(resp.committed)
        self.assertGreater(resp.bytes_staged, 0)
        new = list(resp.placement.physical_to_logical)
        changed = sum(1 for i in range(len(new)) if new[i] != start[i])
        self.assertGreater(changed, 2 * self.GB * self.LB)  # more than one chunk's staging could hold
        self.assertEqual(resp.bytes_moved, changed * self.EB)
        for layer in range(self.LB):
            for s in range(self.PB):
                self.assertEqual(bytes(self.view(layer, s)), self.stamp(layer, new[layer * self.PB + s]) * (self.EB // 64),
                                 "layer %d slot %d" % (layer, s))
        with open(self.server.log) as f:
            levels = [line.split()[1] for line in f if len(line.split()) > 1]
        self.assertNotIn("warn", levels[1:])  # (the first line is the start-up banner)
        self.assertNotIn("error", levels)

    def test_an_expert_larger_than_the_bound_cannot_be_staged(self):
        """2 MiB experts against a 1 MiB bound: a move that needs staging is
        refused before anything moves."""
        S = self.PB // self.GB
        big = 2 << 20
        shm = [shared_memory.SharedMemory(name="eplb-stg2-%d-%d" % (os.getpid(), g), create=True, size=S * big)
               for g in range(self.GB)]
        try:
            h = eplb_pb2.ModelHandle(
                architecture="BigMoE", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
                moe=eplb_pb2.MoeSpec(num_moe_layers=1, num_logical_experts=self.NB, num_physical_experts=self.PB,
                                     num_local_physical_experts=S, num_redundant_experts=self.PB - self.NB,
                                     num_expert_groups=1))
            self.stub.RegisterModel(eplb_pb2.RegisterModelRequest(
                model_name="big", model=h, parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=self.GB)),
                timeout=30)
            self.stub.AttachWeights(eplb_pb2.AttachWeightsRequest(
                model_id="big", kind=eplb_pb2.BUFFER_KIND_SHM, backend="cpu",
                ranks=[eplb_pb2.RankBuffer(shm_name="/" + m.name) for m in shm],
                layers=[eplb_pb2.LayerWeights(tensors=[eplb_pb2.ExpertTensor(
                    name="w", bytes_per_expert=big,
                    ranks=[eplb_pb2.TensorLayout(offset=0, stride=big) for _ in range(self.GB)])])]), timeout=30)
            load = [(e * 13) % 17 + (200 if e % 3 == 0 else 0) for e in range(self.NB)]
            with self.assertRaises(grpc.RpcError) as cm:
                self.stub.Rebalance(eplb_pb2.RebalanceRequest(model_id="big", logical_load=load, force=True,
                                                             slot_order=eplb_pb2.SLOT_ORDER_ALGORITHM), timeout=60)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn("--max-staging-mib", cm.exception.details())
            self.assertEqual(self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="big"), timeout=30).epoch, 0)
        finally:
            for m in shm:
                m.close()
                m.unlink()


if __name__ == "__main__":
    unittest.main(verbosity=2)
