"""Placement files, the report and eplbctl against a real eplbd.

- eplb.files: SGLang (.json, .pt) and vLLM map files written from a served
  placement, read back equal, applied (a map -> SetupFromMapping, epoch + 1,
  served as written; logical_count -> Rebalance, bit-exact with the same
  Rebalance by hand); malformed files refused before anything is sent.
- eplbctl export/import: the same bytes as eplb.files, round trips, refusals.
- eplbctl --summary at DeepSeek-V3 size (58 x 288, ep 32), 64-bit numbers as
  JSON numbers, exit 3 on "registered": false (0 with --allow-unregistered),
  --version, one-line usage errors with exit 2.
- python3 -m eplb report: a PNG (and HTML) of a real model at DeepSeek-V3
  size, whose per-layer balancedness is eplbd's own.

Run: /usr/bin/python3 tests/integration/test_placement_files.py BUILD_DIR
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pngfile import png_size  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(sys.argv.pop(1) if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
PKG = os.path.join(ROOT, "clients", "python")
sys.path.insert(0, PKG)

import numpy as np  # noqa: E402

import eplb  # noqa: E402
from eplb import files, report  # noqa: E402

EPLBCTL = os.path.join(BUILD, "eplbctl")
SMALL = {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
         "moe": {"num_moe_layers": 2, "num_logical_experts": 4, "num_physical_experts": 6,
                 "num_local_physical_experts": 3, "num_redundant_experts": 2}}
L, N, P, G = 58, 256, 288, 32   # DeepSeek-V3: 58 MoE layers, 256 experts + 32 redundant, ep 32
DSV3 = {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
        "moe": {"num_moe_layers": L, "num_logical_experts": N, "num_physical_experts": P,
                "num_local_physical_experts": P // G, "num_redundant_experts": P - N, "num_expert_groups": 8}}
LOAD = [[90, 132, 40, 61, 0, 0], [20, 107, 104, 64, 0, 0]]


class Eplbd:
    """A real eplbd on an ephemeral port with its own database."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="eplbd-files-")
        ready = os.path.join(self.dir, "ready")
        with open(os.path.join(self.dir, "log"), "ab") as log:
            self.proc = subprocess.Popen([os.path.join(BUILD, "eplbd"), "--listen", "127.0.0.1:0", "--db",
                                          os.path.join(self.dir, "db"), "--ready-file", ready],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 30
        self.addr = ""
        while time.time() < deadline and not self.addr:
            if os.path.exists(ready):
                with open(ready) as f:
                    self.addr = f.read().strip()
            elif self.proc.poll() is not None:
                raise RuntimeError("eplbd exited with %d" % self.proc.returncode)
            time.sleep(0.02)
        if not self.addr:
            raise RuntimeError("eplbd did not become ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def zipfish(seed, shape):
    """A skewed, deterministic expert load."""
    return (np.random.default_rng(seed).lognormal(0, 1.0, size=shape) * 1000).astype(np.int64)


class Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Eplbd()
        cls.client = eplb.Client(cls.server.addr, timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        assert cls.server.stop() == 0, "eplbd did not exit cleanly"

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="eplb-files-test-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def fresh(self, name, moe=SMALL, ep=2, rebalance=True):
        """Register model `name` (deleting an old one) and rebalance it once."""
        try:
            self.client.delete_model(name, force=True)
        except eplb.NotFound:
            pass
        self.client.register_model(name, moe, ep_size=ep)
        if rebalance:
            self.client.rebalance(name, physical_load=LOAD if moe is SMALL else zipfish(1, (L, P)))
        return self.client.get_placement(name)

    def ctl(self, *args, stdin=None):
        return subprocess.run([EPLBCTL, "--addr", self.server.addr] + list(args), input=stdin,
                              capture_output=True, text=True, timeout=60)

    def py(self, *args):
        env = dict(os.environ, PYTHONPATH=PKG, MPLBACKEND="Agg")
        return subprocess.run([sys.executable, "-m", "eplb", "--addr", self.server.addr] + list(args),
                              capture_output=True, text=True, timeout=120, env=env)


class PythonFiles(Base):
    def test_sglang_and_vllm_round_trip(self):
        p = self.fresh("rt")
        self.assertNotEqual(p.physical_to_logical.tolist(), [[0, 1, 2, 3, 0, 1]] * 2)  # rebalanced
        for name in ("s.json", "s.pt"):
            files.export_sglang(p, self.path(name))
            f = files.load(self.path(name))
            self.assertEqual((f.kind, f.format), ("mapping", "sglang"))
            self.assertEqual(f.physical_to_logical.tolist(), p.physical_to_logical.tolist())
        with open(self.path("s.json")) as fh:
            self.assertEqual(list(json.load(fh)), ["physical_to_logical_map"])  # SGLang's kwargs: only that key
        files.export_vllm(p, self.path("v.json"))
        f = files.load(self.path("v.json"))
        self.assertEqual((f.kind, f.format, f.num_logical_experts), ("mapping", "vllm", 4))
        server = self.client.get_placement("rt", include_logical_to_physical=True).to_numpy()
        self.assertEqual(f.logical_to_physical.tolist(), server.logical_to_physical_map.tolist())
        self.assertEqual(f.logical_to_physical.shape, (2, 4, 3))  # R = P - N + 1, as vLLM sizes it
        self.assertEqual(f.logical_replica_count.tolist(), p.logical_replica_count.tolist())
        self.assertEqual(f.to_placement(), p)  # model_id, epoch and maps
        self.assertEqual(files.load(self.path("s.json")).to_placement(4).logical_replica_count.tolist(),
                         p.logical_replica_count.tolist())

    def test_apply_mapping_serves_it_at_epoch_plus_one(self):
        self.fresh("am", rebalance=False)
        want = np.array([[3, 2, 1, 0, 3, 2], [1, 1, 0, 2, 3, 0]])
        files.export_sglang(eplb.Placement.from_arrays(want, 4), self.path("m.pt"))
        got = files.apply(self.client, "am", self.path("m.pt"))
        self.assertEqual(got.epoch, 1)
        served = self.client.get_placement("am")
        self.assertEqual((served.epoch, served.physical_to_logical.tolist()), (1, want.tolist()))
        # a vLLM file of another placement, applied on top
        other = eplb.Placement.from_arrays([[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 3, 3]], 4)
        files.export_vllm(other, self.path("v.json"))
        files.apply(self.client, "am", self.path("v.json"))
        served = self.client.get_placement("am")
        self.assertEqual((served.epoch, served.logical_replica_count.tolist()), (2, [[3, 1, 1, 1], [1, 1, 1, 3]]))

    def test_apply_load_is_a_rebalance(self):
        self.fresh("al", rebalance=False)
        lc = [[5, 900, 30, 400], [70, 8, 600, 2]]
        files.save_load(lc, self.path("l.json"))
        f = files.load(self.path("l.json"))
        self.assertEqual((f.kind, f.logical_count.tolist()), ("load", lc))
        dry = self.client.rebalance("al", logical_load=np.array(lc), dry_run=True)
        r = files.apply(self.client, "al", self.path("l.json"))
        self.assertTrue(r.committed)
        self.assertEqual(r.placement.epoch, 1)
        self.assertEqual(r.placement.physical_to_logical.tolist(), dry.placement.physical_to_logical.tolist())
        self.assertEqual(r.layer_balancedness_after, dry.layer_balancedness_after)
        # SGLang's [k, L, N] form is summed over k
        files.save_load(np.array([lc, lc]), self.path("l3.pt"))
        self.assertEqual(files.load(self.path("l3.pt")).logical_count.tolist(), (2 * np.array(lc)).tolist())

    def test_bad_files_are_refused_before_sending(self):
        self.fresh("bad", rebalance=False)
        cases = {
            "ragged.json": ('{"physical_to_logical_map": [[0, 1, 2], [0, 1]]}', "rectangular"),
            "empty-slot.json": ('{"physical_to_logical_map": [[0, 1, 2, 3, -1, 0], [0, 1, 2, 3, 0, 1]]}',
                                "no empty slots"),
            "counts.json": ('{"physical_to_logical_map": [[0,1,2,3,0,1],[0,1,2,3,0,1]], '
                            '"logical_replica_count": [[2,2,1,1],[2,1,2,1]], "num_logical_experts": 4}',
                            "logical_replica_count[1][1] = 1"),
            "neither.json": ('{"foo": 1}', "neither physical_to_logical_map nor logical_count"),
            "frac.json": ('{"logical_count": [[1.5, 2, 3, 4], [1, 2, 3, 4]]}', "not an integer"),
            "notjson.json": ('{"logical_count": [[1, 2', "not valid JSON"),
        }
        for name, (text, msg) in cases.items():
            with open(self.path(name), "w") as fh:
                fh.write(text)
            with self.assertRaises(ValueError, msg=name) as e:
                files.load(self.path(name))
            self.assertIn(msg, str(e.exception), name)
        files.export_sglang(eplb.Placement.from_arrays([[0, 1, 2, 3, 0, 1]] * 3, 4), self.path("3layers.json"))
        with self.assertRaises(ValueError) as e:
            files.apply(self.client, "bad", self.path("3layers.json"))
        self.assertIn("[3, 6] but model bad has 2 layers x 6 slots", str(e.exception))
        self.assertEqual(self.client.get_placement("bad").epoch, 0)  # nothing was sent

    def test_sglang_export_refuses_empty_slots(self):
        self.fresh("el", rebalance=False)
        self.client.setup_from_mapping("el", [[0, 1, 2, 3, 0, 1, -1, -1]] * 2, old_num_physical_experts=6,
                                       ep_size=2)
        p = self.client.get_placement("el")
        with self.assertRaises(ValueError) as e:
            files.export_sglang(p, self.path("x.json"))
        self.assertIn("layer 0 slot 6 is empty", str(e.exception))
        files.export_vllm(p, self.path("x.json"))  # vLLM's map has -1 slots
        self.assertEqual(files.load(self.path("x.json")).physical_to_logical[0].tolist()[-2:], [-1, -1])
        r = self.ctl("export", "el")
        self.assertEqual(r.returncode, 1)
        self.assertIn("layer 0 slot 6 of el is empty", r.stderr)

    def test_python_cli_pt_round_trip(self):
        p = self.fresh("cli")
        r = self.py("export", "cli", "-o", self.path("c.pt"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(files.load(self.path("c.pt")).physical_to_logical.tolist(), p.physical_to_logical.tolist())
        r = self.py("import", "cli", self.path("c.pt"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["epoch"], p.epoch + 1)
        r = self.py("import", "nosuch", self.path("c.pt"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT_FOUND", r.stderr)


class Eplbctl(Base):
    def test_export_same_bytes_as_python_and_import_round_trip(self):
        p = self.fresh("cx")
        for fmt, fn in (("sglang", files.export_sglang), ("vllm", files.export_vllm)):
            fn(p, self.path("py-" + fmt + ".json"))
            r = self.ctl("export", "cx", "--format", fmt, "-o", self.path("c-" + fmt + ".json"))
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(self.path("py-" + fmt + ".json"), "rb") as a, open(self.path("c-" + fmt + ".json"), "rb") as b:
                self.assertEqual(a.read(), b.read(), fmt)
        r = self.ctl("export", "cx")  # stdout, sglang
        self.assertEqual(json.loads(r.stdout), {"physical_to_logical_map": p.physical_to_logical.tolist()})
        # import a different map (vLLM file), then the exported one back
        other = eplb.Placement.from_arrays([[0, 1, 2, 3, 1, 1], [3, 2, 1, 0, 0, 0]], 4)
        files.export_vllm(other, self.path("other.json"))
        r = self.ctl("import", "cx", self.path("other.json"))
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)
        self.assertEqual((s["epoch"], s["replica_histogram"]), (p.epoch + 1, {"1": 6, "3": 2}))
        self.assertEqual(self.client.get_placement("cx").physical_to_logical.tolist(),
                         other.physical_to_logical.tolist())
        with open(self.path("c-sglang.json")) as fh:
            r = self.ctl("import", "cx", "-", stdin=fh.read())
        self.assertEqual(r.returncode, 0, r.stderr)
        served = self.client.get_placement("cx")
        self.assertEqual((served.epoch, served.physical_to_logical.tolist()),
                         (p.epoch + 2, p.physical_to_logical.tolist()))

    def test_import_logical_count_rebalances(self):
        self.fresh("cl", rebalance=False)
        lc = [[5, 900, 30, 400], [70, 8, 600, 2]]
        dry = self.client.rebalance("cl", logical_load=np.array(lc), dry_run=True)
        files.save_load(lc, self.path("l.json"))
        r = self.ctl("import", "cl", self.path("l.json"))
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)
        self.assertTrue(s["committed"])
        self.assertEqual(s["placement"]["epoch"], 1)
        self.assertEqual(s["layer_balancedness_after"], [round(x, 4) for x in dry.layer_balancedness_after])
        self.assertEqual(self.client.get_placement("cl").physical_to_logical.tolist(),
                         dry.placement.physical_to_logical.tolist())

    def test_import_refusals(self):
        self.fresh("cr", rebalance=False)
        bad = {"ragged.json": '{"physical_to_logical_map": [[0,1,2,3,0,1],[0,1]]}',
               "syntax.json": '{"physical_to_logical_map": [[0,1,2,3,0,1] [0,1,2,3,0,1]]}',
               "neg.json": '{"logical_count": [[1,2,3,-4],[1,2,3,4]]}',
               "frac.json": '{"logical_count": [[1,2,3,4.5],[1,2,3,4]]}'}
        for name, text in bad.items():
            with open(self.path(name), "w") as fh:
                fh.write(text)
            r = self.ctl("import", "cr", self.path(name))
            self.assertEqual(r.returncode, 2, name + r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("line 1 column 44: expected ']'", self.ctl("import", "cr", self.path("syntax.json")).stderr)
        files.export_sglang(eplb.Placement.from_arrays([[0, 1, 2, 3, 0, 1]] * 3, 4), self.path("3.json"))
        r = self.ctl("import", "cr", self.path("3.json"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("is [3][6] but cr has 2 layers x 6 slots", r.stderr)
        r = self.ctl("import", "cr", self.path("x.pt"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("python3 -m eplb import", r.stderr)
        r = self.ctl("export", "cr", "-o", self.path("x.pt"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("python3 -m eplb export", r.stderr)
        r = self.ctl("export", "cr", "--format", "yaml")
        self.assertEqual(r.returncode, 2)
        self.assertIn("sglang or vllm", r.stderr)
        self.assertEqual(self.client.get_placement("cr").epoch, 0)

    def test_summary_at_deepseek_v3_size(self):
        p = self.fresh("big", moe=DSV3, ep=G)
        full = self.ctl("get", "big")
        self.assertGreater(len(full.stdout), 30000)
        r = self.ctl("get", "big", "--summary")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLess(len(r.stdout), 1000)
        s = json.loads(r.stdout)
        self.assertEqual((s["epoch"], s["num_layers"], s["num_physical_experts"], s["num_logical_experts"]),
                         (1, L, P, N))
        hist = np.bincount(p.logical_replica_count.ravel())
        self.assertEqual(s["replica_histogram"], {str(k): int(v) for k, v in enumerate(hist) if v})
        self.assertEqual((s["max_replicas"], s["empty_slots"], s["state"], s["pending_rebalance_id"]),
                         (len(hist) - 1, 0, "MOVE_STATE_IDLE", ""))
        load = zipfish(2, (L, P))
        req = json.dumps({"model_id": "big", "physical_load": load.ravel().tolist(), "layers_per_step": 20})
        r = self.ctl("rebalance", "-", "--summary", stdin=req)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLess(len(r.stdout), 4000)
        s = json.loads(r.stdout)
        self.assertEqual(len(s["layer_balancedness_before"]), L)
        self.assertTrue(s["pending"])
        self.assertEqual(s["placement"]["pending_rebalance_id"], s["rebalance_id"])
        self.assertEqual(s["placement"]["pending_layers_done"], s["layers_done"])
        self.assertEqual(len(s["layers_moved"]), 20)
        cont = self.ctl("continue", json.dumps({"model_id": "big", "rebalance_id": s["rebalance_id"]}), "--summary")
        self.assertEqual(json.loads(cont.stdout)["placement"]["epoch"], 3)

    def test_64bit_numbers_are_numbers(self):
        self.fresh("n64")
        out = json.loads(self.ctl("get", "n64").stdout)
        self.assertIs(type(out["epoch"]), int)
        self.assertEqual(out["epoch"], 1)
        r = json.loads(self.ctl("rebalance", json.dumps({"model_id": "n64", "physical_load": sum(LOAD, [])})).stdout)
        self.assertIs(type(r["experts_moved"]), int)
        self.assertIs(type(r["placement"]["epoch"]), int)
        self.assertIs(type(r["bytes_moved"]), int)
        self.assertIs(type(r["rebalance_id"]), str)  # a string field stays a string
        rec = json.loads(self.ctl("record-load", json.dumps({"model_id": "n64", "physical_load": sum(LOAD, [])}))
                         .stdout)
        self.assertEqual(rec["passes_recorded"], 1)
        models = json.loads(self.ctl("list").stdout)["models"]
        self.assertTrue(all(type(m["epoch"]) is int for m in models))

    def test_register_exit_status(self):
        dense = json.dumps({"model_name": "dense", "model": {"architecture": "LlamaForCausalLM"},
                            "parallel": {"enable_eplb": False, "ep_size": 1}, "load_dummy_weights": True})
        r = self.ctl("register", dense)
        self.assertEqual(r.returncode, 3)
        self.assertFalse(json.loads(r.stdout)["registered"])
        self.assertIn("not registered", r.stderr)
        self.assertEqual(self.ctl("register", dense, "--allow-unregistered").returncode, 0)
        moe = json.dumps({"model_name": "reg", "model": SMALL, "parallel": {"enable_eplb": True, "ep_size": 2}})
        r = self.ctl("--allow-unregistered", "register", moe)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.ctl("register", moe, "--summary")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("already registered", json.loads(r.stdout)["reason"])

    def test_version_and_usage_errors(self):
        r = self.ctl("--version")
        self.assertEqual(r.returncode, 0)
        eplbd = subprocess.run([os.path.join(BUILD, "eplbd"), "--version"], capture_output=True, text=True)
        self.assertEqual(r.stdout.split()[1], eplbd.stdout.split()[1])
        self.assertTrue(r.stdout.startswith("eplbctl "))
        cases = [(["frob"], "unknown command 'frob'"), (["get"], "get needs an argument: MODEL_ID|JSON"),
                 (["rebalance", '{"model_id": '], "is not a valid eplb.v1.RebalanceRequest"),
                 (["rebalance", '{"modle_id": "x"}'], "is not a valid eplb.v1.RebalanceRequest"),
                 (["--bogus", "list"], "unknown option --bogus"), ([], "no command given"),
                 (["import", "m"], "import needs MODEL_ID and FILE"), (["export"], "export needs MODEL_ID"),
                 (["get", "m", "extra"], "get takes 1 argument"), (["get", "m", "--format", "vllm"], "--format is for export"),
                 (["--timeout", "soon", "list"], "--timeout wants seconds"), (["get", "m", "--addr"], "--addr needs a value")]
        for args, msg in cases:
            r = subprocess.run([EPLBCTL] + args, capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 2, args)
            lines = r.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, r.stderr)
            self.assertIn(msg, lines[0])
            self.assertIn("eplbctl --help", lines[0])
            self.assertEqual(r.stdout, "")
        r = self.ctl("get", "nosuch")
        self.assertEqual(r.returncode, 1)
        self.assertIn("GetPlacement: NOT_FOUND", r.stderr)


class Report(Base):
    def test_report_at_deepseek_v3_size(self):
        before = self.fresh("rep", moe=DSV3, ep=G, rebalance=False)
        files.export_sglang(before, self.path("before.json"))
        lc = zipfish(3, (L, N))
        files.save_load(lc, self.path("load.json"))
        # served vs a dry run: the report's balancedness is eplbd's own
        r = self.py("report", "rep", "--load", self.path("load.json"), "--out", self.path("dry.png"))
        self.assertEqual(r.returncode, 0, r.stderr)
        dry = self.client.rebalance("rep", logical_load=lc, dry_run=True)
        d = report.collect(self.client, "rep", load=self.path("load.json"))
        np.testing.assert_allclose(d.balancedness_before, dry.layer_balancedness_before, rtol=1e-12)
        np.testing.assert_allclose(d.balancedness_after, dry.layer_balancedness_after, rtol=1e-12)
        self.assertEqual(d.gpu_before.shape, (L, G))
        np.testing.assert_allclose(d.gpu_before.sum(axis=1), lc.sum(axis=1))  # every token on some GPU
        # before (a file) vs after (served) the rebalance
        done = files.apply(self.client, "rep", self.path("load.json"))
        out = self.path("after.png")
        r = self.py("report", "rep", "--load", self.path("load.json"), "--before", self.path("before.json"),
                    "--out", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        w, h = png_size(out)
        self.assertTrue(1200 <= w <= 2400 and 1200 <= h <= 2400, (w, h))
        self.assertTrue(50_000 < os.path.getsize(out) < 5_000_000, os.path.getsize(out))
        d = report.collect(self.client, "rep", load=self.path("load.json"), before=self.path("before.json"))
        np.testing.assert_allclose(d.balancedness_after, done.layer_balancedness_after, rtol=1e-12)
        self.assertGreater(d.balancedness_after.mean(), d.balancedness_before.mean())
        self.assertIn("epoch 1", d.after_label)
        r = self.py("report", "rep", "--load", self.path("load.json"), "--out", self.path("r.html"))
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(self.path("r.html")) as fh:
            page = fh.read()
        self.assertIn("data:image/png;base64,", page)
        self.assertEqual(page.count("<tr><td>"), L)

    def test_report_from_the_window_and_without_load(self):
        self.fresh("win", rebalance=False)
        r = self.py("report", "win", "--out", self.path("none.png"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("FAILED_PRECONDITION", r.stderr)  # no load recorded: said, not drawn
        self.client.record_load("win", np.array(LOAD))
        # without matplotlib: one line that says what to install, no traceback, no file
        code = ("import sys; sys.modules['matplotlib'] = None; from eplb.__main__ import main; "
                "sys.exit(main(sys.argv[1:]))")
        r = subprocess.run([sys.executable, "-c", code, "--addr", self.server.addr, "report", "win", "--out",
                            self.path("nompl.png")], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=PKG))
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("python3-matplotlib", r.stderr)
        self.assertFalse(os.path.exists(self.path("nompl.png")))
        r = self.py("report", "win", "--out", self.path("w.png"))
        self.assertEqual(r.returncode, 0, r.stderr)
        png_size(self.path("w.png"))
        d = report.collect(self.client, "win")
        self.assertIsNone(d.gpu_before)
        dry = self.client.rebalance("win", dry_run=True)
        self.assertEqual(d.balancedness_after.tolist(), dry.layer_balancedness_after)
        self.assertIn("not readable through the API", d.notes[0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
