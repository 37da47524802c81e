"""Engine-executed rebalances (#13) across 2 "nodes" x 2 ranks: 4 processes
with gloo on loopback, each holding its own expert tensors (2 per layer;
every slot's bytes encode its layer and expert), one real eplbd as the
authority, driven by eplb.torch_exec.EngineRebalancer on every rank
(tests/integration/engine_exec_rank.py):

- skewed load -> Rebalance(EXECUTION_ENGINE) -> every rank fetches and runs
  its plan (staging-bounded chunks) -> commit: every slot on every rank
  holds its new expert's bytes, the maps are installed, the cross-node
  bytes counted equal the plan's;
- a rank killed mid-plan: the others fail within the group's timeout, the
  leader aborts with bytes touched, the model is NEEDS_RELOAD;
- eplbd killed while a rebalance is pending: after a restart on the same
  --db it is still pending, and the ranks execute and commit it (and a
  later one aborts untouched);
- eplbd lost after the ranks fetched their plans: they move the bytes, the
  commit fails on every rank (commit_failed), and after a restart the
  commit serves exactly what the ranks hold;
- stepped rebalances, and a sequence of rebalances with varied knobs;
- a commit with a wrong id is ABORTED and changes nothing; a plan for a rank
  that does not exist is INVALID_ARGUMENT.

Run: /usr/bin/python3 tests/integration/test_engine_exec.py BUILD_DIR
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from eplbd_py import Server, eplb_pb2, eplb_pb2_grpc  # noqa: E402

L, N, P, G, NODES = 4, 16, 20, 4, 2     # layers, logical experts, slots, EP ranks, nodes
S = P // G
EXPERT_BYTES = 2 * 64 * 4 + 16 * 4      # engine_exec_rank.py's two tensors per expert
GLOO_TIMEOUT_S = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def handle():
    return eplb_pb2.ModelHandle(
        architecture="EngineExecMoE", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
        moe=eplb_pb2.MoeSpec(num_moe_layers=L, num_logical_experts=N, num_physical_experts=P,
                             num_local_physical_experts=S, num_redundant_experts=P - N))


def skewed_load(shift=0):
    """[L, P] under the initial map: two hot experts per layer (on node 0
    for shift 0), so every layer changes and bytes cross nodes."""
    rows = []
    for layer in range(L):
        row = []
        for s in range(P):
            e = s if s < N else s - N
            row.append(3 + (e * 5 + layer) % 7 + (500 if e == (layer + shift) % N else 0)
                       + (200 if e == (layer + 2 + shift) % N else 0))
        rows.append(row)
    return rows


class EngineExecTest(unittest.TestCase):
    def setUp(self):
        self.server = Server()
        self.server.start()
        self.connect()
        self.stub.RegisterModel(eplb_pb2.RegisterModelRequest(
            model_name="m", model=handle(),
            parallel=eplb_pb2.ParallelConfig(enable_eplb=True, ep_size=G, num_nodes=NODES,
                                             expert_bytes=EXPERT_BYTES)), timeout=30)
        try:
            self.stub.GetTransferPlan(eplb_pb2.GetTransferPlanRequest(model_id="m", rebalance_id="0"), timeout=30)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.skipTest("this eplbd does not implement GetTransferPlan yet")
        self.tmp = tempfile.mkdtemp(prefix="eplb-engine-exec-")

    def connect(self):
        self.channel = grpc.insecure_channel(self.server.addr)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)

    def tearDown(self):
        self.channel.close()
        if self.server.proc.poll() is None:
            self.assertEqual(self.server.stop(), 0, "eplbd did not exit cleanly on SIGTERM")
        self.server.cleanup()
        shutil.rmtree(getattr(self, "tmp", ""), ignore_errors=True)

    def placement(self):
        return self.stub.GetPlacement(eplb_pb2.GetPlacementRequest(model_id="m"), timeout=30)

    def engine_rebalance(self, shift=0, **kw):
        return self.stub.Rebalance(eplb_pb2.RebalanceRequest(
            model_id="m", physical_load=[x for row in skewed_load(shift) for x in row],
            execution=eplb_pb2.EXECUTION_ENGINE, **kw), timeout=60)

    def ranks(self, name, timeout=90, **spec):
        """Run the 4 ranks; their JSON results by rank (a rank that died has none)."""
        return self.wait_ranks(self.start_ranks(name, **spec), timeout)

    def start_ranks(self, name, **spec):
        out = os.path.join(self.tmp, name)
        os.makedirs(out)
        spec = dict(dict(addr=self.server.addr, init="tcp://127.0.0.1:%d" % free_port(), world=G,
                         ranks_per_node=G // NODES, timeout_s=GLOO_TIMEOUT_S, L=L, N=N, P=P, out=out), **spec)
        path = os.path.join(out, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "engine_exec_rank.py"), path, str(r)])
                 for r in range(G)]
        return out, procs

    def wait_ranks(self, started, timeout=90):
        out, procs = started
        deadline = time.time() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.fail("a rank did not finish within %d s" % timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        res = {}
        for r in range(G):
            f = os.path.join(out, "rank%d.json" % r)
            if os.path.exists(f):
                with open(f) as fh:
                    res[r] = json.load(fh)
        return res, [p.returncode for p in procs]

    def check_committed(self, res, start):
        final = self.placement()
        self.assertEqual(final.epoch, start.epoch + 1)
        self.assertEqual(final.pending_rebalance_id, "")
        self.assertEqual(final.state, eplb_pb2.MOVE_STATE_IDLE)
        new = list(final.physical_to_logical)
        self.assertNotEqual(new, list(start.physical_to_logical))
        for r in range(G):
            self.assertTrue(res[r]["ok"], "rank %d: %s" % (r, res[r].get("error")))
            self.assertTrue(res[r]["committed"])
            self.assertEqual(res[r]["epoch"], final.epoch)
            self.assertEqual([x for row in res[r]["new_physical_to_logical"] for x in row], new)
            self.assertEqual(res[r]["bad"], [], "rank %d: [layer, slot, tensor] not holding their new expert" % r)
            self.assertTrue(res[r]["maps_installed"])
        # Bytes: per rank as its plan says; across nodes, the plan's pairs.
        plan = res[0]["plan"]
        self.assertEqual(plan["num_ranks"], G)
        self.assertEqual(plan["ranks_per_node"], G // NODES)
        self.assertEqual(plan["expert_bytes"], EXPERT_BYTES)
        self.assertGreater(plan["copies_cross_node"], 0)
        for r in range(G):
            st, pl = res[r]["stats"], res[r]["plan"]
            self.assertEqual(pl["wrong_cross_node_flags"], 0, "rank %d" % r)
            self.assertEqual(st["bytes_sent"], pl["slots_sent"] * EXPERT_BYTES, "rank %d" % r)
            self.assertEqual(st["bytes_received"], pl["slots_received"] * EXPERT_BYTES, "rank %d" % r)
            self.assertEqual(st["bytes_sent_cross_node"] + st["bytes_received_cross_node"],
                             pl["slots_cross_node"] * EXPERT_BYTES, "rank %d" % r)
            self.assertEqual(st["steps_done"], plan["num_steps"])
        self.assertEqual(sum(res[r]["stats"]["bytes_sent_cross_node"] for r in range(G)),
                         plan["copies_cross_node"] * EXPERT_BYTES)
        self.assertEqual(sum(res[r]["stats"]["bytes_received_cross_node"] for r in range(G)),
                         plan["copies_cross_node"] * EXPERT_BYTES)
        self.assertEqual(sum(res[r]["stats"]["bytes_sent"] for r in range(G)),
                         plan["copies_cross_gpu"] * EXPERT_BYTES)
        return final, plan

    def test_skewed_load_executed_by_four_ranks_on_two_nodes(self):
        start = self.placement()
        staging = 2 * EXPERT_BYTES   # two staging entries per rank: layers move in chunks
        res, rcs = self.ranks("ok", mode="rebalance", load=skewed_load(), max_staging_bytes=staging)
        self.assertEqual(rcs, [0] * G)
        final, plan = self.check_committed(res, start)
        for r in range(G):
            self.assertLessEqual(res[r]["plan"]["max_staging_slots"], 2)
        # The Rebalance answer's counters are the plan's.
        rb = res[0]["rebalance"]
        self.assertTrue(rb["pending"])
        self.assertEqual(rb["plan_copies_cross_node"], plan["copies_cross_node"])
        self.assertEqual(rb["plan_bytes_cross_node"], plan["copies_cross_node"] * EXPERT_BYTES)

    def test_in_steps_of_two_layers_each_step_committed(self):
        start = self.placement()
        res, rcs = self.ranks("steps", mode="rebalance", load=skewed_load(), layers_per_step=2)
        self.assertEqual(rcs, [0] * G)
        for r in range(G):
            self.assertTrue(res[r]["ok"], "rank %d: %s" % (r, res[r].get("error")))
            self.assertEqual(res[r]["bad"], [], "rank %d" % r)
        final = self.placement()
        commits = res[0]["commits"]
        old, new = list(start.physical_to_logical), list(final.physical_to_logical)
        changed = sum(1 for layer in range(L) if old[layer * P:(layer + 1) * P] != new[layer * P:(layer + 1) * P])
        self.assertGreaterEqual(changed, 3)
        self.assertEqual(commits, (changed + 1) // 2)  # one commit per step of 2 changed layers
        self.assertEqual(final.epoch, start.epoch + commits)
        self.assertEqual(final.pending_rebalance_id, "")
        for r in range(G):
            self.assertEqual([x for row in res[r]["new_physical_to_logical"] for x in row],
                             list(final.physical_to_logical))
            self.assertTrue(res[r]["maps_installed"])

    def test_a_sequence_of_rebalances_with_varied_knobs(self):
        """Staging bounds (none, 1, 2, 5 experts), steps, policies, slot
        orders: after every call -- committed, kept by the gate, or refused
        -- every slot holds the served placement and the maps are installed."""
        eb = EXPERT_BYTES
        seq = [dict(max_staging_bytes=0),
               dict(max_staging_bytes=eb, layers_per_step=1, policy="incremental", force=True),
               dict(max_staging_bytes=2 * eb, slot_order="algorithm"),
               dict(max_staging_bytes=5 * eb, layers_per_step=3, policy="incremental", force=True),
               dict(max_staging_bytes=0, slot_order="min_traffic", layers_per_step=2),
               dict(max_staging_bytes=eb, policy="incremental", force=True)]
        start = self.placement()
        res, rcs = self.ranks("sequence", mode="sequence", sequence=seq)
        self.assertEqual(rcs, [0] * G)
        commits = 0
        for r in range(G):
            self.assertTrue(res[r].get("ok"), "rank %d: %s" % (r, res[r].get("error")))
            for e in res[r]["steps"]:
                self.assertEqual(e["bad"], 0, "rank %d after rebalance %s" % (r, e))
                self.assertTrue(e["maps_installed"], "rank %d after rebalance %s" % (r, e))
                self.assertEqual(e["state"], "MOVE_STATE_IDLE", e)
                self.assertEqual(e.get("touched", 0), 0, e)
            self.assertEqual([e["epoch"] for e in res[r]["steps"]], [e["epoch"] for e in res[0]["steps"]])
        steps = res[0]["steps"]
        commits = sum(e.get("commits", 0) + e.get("steps_committed", 0) for e in steps)
        self.assertEqual(self.placement().epoch, start.epoch + commits)
        self.assertGreaterEqual(sum(1 for e in steps if e.get("committed")), 4, steps)

    def test_a_rank_killed_mid_plan_leaves_the_model_needing_a_reload(self):
        start = self.placement()
        t0 = time.time()
        res, rcs = self.ranks("kill", mode="rebalance", load=skewed_load(), die_at_step={"3": 1})
        self.assertEqual(rcs[3], 3, "rank 3 was to die at step 1")
        self.assertNotIn(3, res)
        for r in range(3):
            self.assertFalse(res[r]["ok"], "rank %d committed without rank 3" % r)
            self.assertIn("not", res[r]["error"])
        self.assertIsNotNone(res[0]["aborted"], res[0]["error"])
        self.assertTrue(res[0]["aborted"]["needs_weight_reload"])
        self.assertLess(time.time() - t0, 60)
        p = self.placement()
        self.assertTrue(p.needs_weight_reload)
        self.assertEqual(p.state, eplb_pb2.MOVE_STATE_NEEDS_RELOAD)
        self.assertEqual(p.epoch, start.epoch)
        self.assertEqual(p.pending_rebalance_id, "")

    def test_eplbd_killed_while_pending_then_the_ranks_commit(self):
        start = self.placement()
        r = self.engine_rebalance()
        self.assertTrue(r.pending and r.rebalance_id and not r.committed)
        self.channel.close()
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(timeout=30)
        self.server.start()   # the same --db
        self.connect()
        p = self.placement()
        self.assertEqual((p.pending_rebalance_id, p.pending_execution), (r.rebalance_id, eplb_pb2.EXECUTION_ENGINE))
        self.assertEqual((p.epoch, list(p.physical_to_logical)), (start.epoch, list(start.physical_to_logical)))
        res, rcs = self.ranks("restart", mode="execute", rebalance_id=r.rebalance_id)
        self.assertEqual(rcs, [0] * G)
        final, _ = self.check_committed(res, start)
        # Another one, pending across a restart again, aborted untouched.
        r2 = self.engine_rebalance(shift=9, force=True)
        self.assertTrue(r2.pending)
        self.channel.close()
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(timeout=30)
        self.server.start()
        self.connect()
        self.assertEqual(self.placement().pending_rebalance_id, r2.rebalance_id)
        a = self.stub.AbortRebalance(eplb_pb2.AbortRebalanceRequest(model_id="m", rebalance_id=r2.rebalance_id,
                                                                    bytes_touched=0), timeout=30)
        self.assertEqual((a.epoch, a.state, a.needs_weight_reload), (final.epoch, eplb_pb2.MOVE_STATE_IDLE, False))
        p = self.placement()
        self.assertEqual((p.epoch, p.pending_rebalance_id, list(p.physical_to_logical)),
                         (final.epoch, "", list(final.physical_to_logical)))

    def test_eplbd_lost_before_the_commit_then_committed_after_its_restart(self):
        """The ranks fetched their plans, then eplbd dies; they move the bytes,
        the commit cannot reach it: every rank says so (commit_failed) and
        holds the target.  After a restart on the same --db the rebalance
        is still pending and its commit serves exactly what the ranks hold."""
        start = self.placement()
        started = self.start_ranks("lost", mode="rebalance", load=skewed_load(),
                                   pause_at_step={str(r): 0 for r in range(G)})
        out = started[0]
        deadline = time.time() + 60
        while not all(os.path.exists(os.path.join(out, "paused.%d" % r)) for r in range(G)):
            self.assertLess(time.time(), deadline, "the ranks did not reach their first step")
            time.sleep(0.02)
        pending = self.placement().pending_rebalance_id
        self.assertTrue(pending)
        self.channel.close()
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(timeout=30)
        open(os.path.join(out, "resume"), "w").close()
        res, rcs = self.wait_ranks(started)
        self.assertEqual(rcs, [0] * G)
        for r in range(G):
            self.assertFalse(res[r]["ok"])
            self.assertTrue(res[r]["commit_failed"], res[r]["error"])
            self.assertIn("retry commit_rebalance", res[r]["error"])
        self.server.start()
        self.connect()
        p = self.placement()
        self.assertEqual((p.epoch, p.pending_rebalance_id), (start.epoch, pending))
        done = self.stub.CommitRebalance(eplb_pb2.CommitRebalanceRequest(model_id="m", rebalance_id=pending),
                                         timeout=30)
        self.assertTrue(done.committed)
        new = list(self.placement().physical_to_logical)
        self.assertNotEqual(new, list(start.physical_to_logical))
        for r in range(G):
            self.assertEqual([e for row in res[r]["held"] for e in row],
                             [new[layer * P + r * S + j] for layer in range(L) for j in range(S)], "rank %d" % r)

    def test_wrong_ids_and_ranks_are_refused_and_change_nothing(self):
        start = self.placement()
        r = self.engine_rebalance()
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.CommitRebalance(eplb_pb2.CommitRebalanceRequest(model_id="m", rebalance_id="ffffffffffffffff"),
                                      timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.ABORTED)
        p = self.placement()
        self.assertEqual((p.epoch, p.pending_rebalance_id, list(p.physical_to_logical)),
                         (start.epoch, r.rebalance_id, list(start.physical_to_logical)))
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetTransferPlan(eplb_pb2.GetTransferPlanRequest(model_id="m", rebalance_id=r.rebalance_id,
                                                                      rank=G), timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        one = self.stub.GetTransferPlan(eplb_pb2.GetTransferPlanRequest(model_id="m", rebalance_id=r.rebalance_id,
                                                                        rank=G - 1), timeout=30)
        self.assertEqual([x.rank for x in one.ranks], [G - 1])
        # A second rebalance while one is pending is ABORTED.
        with self.assertRaises(grpc.RpcError) as cm:
            self.engine_rebalance()
        self.assertEqual(cm.exception.code(), grpc.StatusCode.ABORTED)
        # The right id still commits.
        done = self.stub.CommitRebalance(eplb_pb2.CommitRebalanceRequest(model_id="m", rebalance_id=r.rebalance_id),
                                         timeout=30)
        self.assertTrue(done.committed)
        self.assertEqual(self.placement().epoch, start.epoch + 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
