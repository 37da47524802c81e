"""bench_incremental's curve of balance against bytes: its per-rebalance CSV
(BENCH_CSV) and the extra rows (BENCH_TARGETS, BENCH_BUDGETS) against the
table it prints, and bench/plot_incremental.py on that CSV.

- Every CSV row belongs to a rebalance the table counts, and the table's
  mean balancedness and GB per rebalance are the CSV's means.
- The CSV's rows hold the policy's promises: INCREMENTAL never below the
  placement it started from, each target met, budgets respected; the stale
  row copies nothing and keeps its balancedness.
- BENCH_RELIEF: the GPUs each rebalance brought down (exact on 2 GPUs), and
  copies per such GPU as the CSV counts them.
- Bad BENCH_TARGETS / BENCH_BUDGETS / BENCH_CSV: exit 2, one line.
- The plot: a PNG per case, the curve's points printed; a file that is not
  such a CSV, exit 2 and one line; without matplotlib, exit 1 and one line.

Run: /usr/bin/python3 tests/integration/test_bench_curve.py BUILD_DIR
"""
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pngfile import png_size  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(sys.argv.pop(1) if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
BENCH = os.path.join(BUILD, "bench", "bench_incremental")
PLOT = os.path.join(ROOT, "bench", "plot_incremental.py")
SHAPE = "6,32,40,4,2,8"  # hierarchical: 2 nodes x 4 GPUs, 4 groups
R = 8
EXPERT_BYTES = 44040192  # bench_incremental's 42 MiB
# strategy, rel, rel_min, GB/rebal, xnode GB, vs MT, worse, stall s, ms p50, fb, nr
ROW = re.compile(r"^(\S.*?)\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d)%\s+(\d+)\s+"
                 r"(\d+\.\d{3})\s+(\d+\.\d{3})\s+(\d+\.\d)\s+(\d+\.\d)")
LATE = re.compile(r"^deepseek, one step late\s+(\d\.\d{4})\s+(\d\.\d{4})")


RELIEF = re.compile(r"^relief (\S.*?)\s+(\d+\.\d\d) GPUs per layer above the new max,\s+(\d+\.\d\d) copies per such GPU$")


def relief_lines(out):
    """BENCH_RELIEF's lines: {(trace, strategy): (GPUs per layer, copies per such GPU)}."""
    relief, trace = {}, None
    for text in out.splitlines():
        m = re.search(r", trace (\w+) \(", text)
        if m:
            trace = m.group(1)
        m = RELIEF.match(text)
        if m:
            relief[(trace, m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return relief


def bench(env, rebalances=R):
    return subprocess.run([BENCH, str(rebalances)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BENCH_SHAPE": SHAPE, **env})


class Curve(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="eplb-curve-")
        cls.csv = os.path.join(cls.dir, "inc.csv")
        r = bench({"BENCH_TARGETS": "0.97,0.8", "BENCH_BUDGETS": "0.1", "BENCH_CSV": cls.csv})
        assert r.returncode == 0, r.stderr
        cls.out = r.stdout
        with open(cls.csv, newline="") as f:
            cls.rows = list(csv.DictReader(f))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def table(self, late=None):
        """{(trace, strategy): (rel, rel_min, GB per rebalance, cross-node GB, stall s, from scratch)}
        from the printed tables; late, when given, gets {trace: (mean, min)} of "one step late"."""
        t, trace = {}, None
        for line in self.out.splitlines():
            m = re.search(r", trace (\w+) \(", line)
            if m:
                trace = m.group(1)
                continue
            m = LATE.match(line)
            if m and late is not None:
                late[trace] = (float(m.group(1)), float(m.group(2)))
                continue
            m = ROW.match(line)
            if m and trace:
                t[(trace, m.group(1))] = tuple(float(m.group(i)) for i in (2, 3, 4, 5, 8, 10))
        return t

    def by(self):
        g = {}
        for row in self.rows:
            g.setdefault((row["trace"], row["strategy"]), []).append(row)
        return g

    def test_rows_are_the_tables_rebalances(self):
        table, groups = self.table(), self.by()
        self.assertIn(("slow", "incremental t=0.97"), table)
        self.assertIn(("shift", "incremental t=0.8"), table)
        self.assertIn(("fast", "incr t=0.99 slots<=10%"), table)
        self.assertEqual(set(table), set(groups))
        self.assertEqual(len(table), 3 * 11)  # 3 traces x (8 rows + 3 added)
        self.assertEqual(len(self.rows), 3 * 11 * R)
        for key, rows in groups.items():
            self.assertEqual(sorted(int(r["rebalance"]) for r in rows), list(range(R)), key)
            self.assertTrue(all(r["case"] == "BENCH_SHAPE" for r in rows))
            rel, rel_min, gb, xnode_gb, stall, scratch = table[key]
            rels = [float(r["rel"]) for r in rows]
            self.assertAlmostEqual(sum(rels) / R, rel, delta=6e-5, msg=key)
            self.assertAlmostEqual(min(rels), rel_min, delta=6e-5, msg=key)
            bytes_ = [int(r["bytes_cross_gpu"]) for r in rows]
            self.assertAlmostEqual(sum(bytes_) / R / 1e9, gb, delta=0.051, msg=key)
            xnode = [int(r["copies_cross_node"]) * EXPERT_BYTES for r in rows]
            self.assertAlmostEqual(sum(xnode) / R / 1e9, xnode_gb, delta=0.051, msg=key)
            self.assertAlmostEqual(sum(float(r["stall_s"]) for r in rows) / R, stall, delta=6e-4, msg=key)
            self.assertAlmostEqual(sum(int(r["layers_from_scratch"]) for r in rows) / R, scratch, delta=0.051,
                                   msg=key)
            for r in rows:
                self.assertEqual(int(r["bytes_cross_gpu"]), int(r["copies_cross_gpu"]) * EXPERT_BYTES)
                self.assertLessEqual(int(r["copies_cross_node"]), int(r["copies_cross_gpu"]))

    def test_rel_before_is_the_tables_one_step_late(self):
        late = {}
        self.table(late)
        self.assertEqual(set(late), {"slow", "fast", "shift"})
        for trace, (mean, low) in late.items():
            before = [float(r["rel_before"]) for r in self.by()[(trace, "deepseek/min_traffic")]]
            self.assertAlmostEqual(sum(before) / R, mean, delta=6e-5, msg=trace)
            self.assertAlmostEqual(min(before), low, delta=6e-5, msg=trace)
        # and it is the placement before: each INCREMENTAL row starts below where it ends
        rows = self.by()[("slow", "incremental t=0.97")]
        self.assertTrue(any(float(r["rel_before"]) < float(r["rel"]) - 1e-3 for r in rows))

    def test_a_name_with_a_comma_and_a_budget_under_one_slot(self):
        path = os.path.join(self.dir, "comma.csv")
        r = subprocess.run([BENCH, "4"], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, BENCH_CASE="8 nodes", BENCH_STRATEGY="incr t=0.99 slots<=0.1%",
                                    BENCH_BUDGETS="0.001", BENCH_CSV=path))
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual({row["case"] for row in rows}, {"DeepSeek-V3 8 nodes x 8 GPUs, 320 slots"})
        self.assertEqual(len(rows), 3 * 2 * 4)
        budgeted = [row for row in rows if row["strategy"] == "incr t=0.99 slots<=0.1%"]
        self.assertEqual(len(budgeted), 3 * 4)
        # 0.1% of 58 x 320 slots is 18: never more copies than that (0 slots would mean no budget)
        self.assertTrue(all(int(row["copies_cross_gpu"]) <= 18 for row in budgeted))
        small = os.path.join(self.dir, "small.csv")
        r = bench({"BENCH_BUDGETS": "0.001", "BENCH_STRATEGY": "incr t=0.99 slots<=0.1%", "BENCH_CSV": small})
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(small, newline="") as f:  # 0.1% of 240 slots rounds to 0: it is 1 slot, not no budget
            rows = [row for row in csv.DictReader(f) if row["strategy"].startswith("incr")]
        self.assertEqual(len(rows), 3 * R)
        self.assertTrue(all(int(row["copies_cross_gpu"]) <= 1 for row in rows))
        self.assertTrue(any(float(row["rel"]) < 0.99 for row in rows))

    def test_rows_keep_the_policys_promises(self):
        slots = 6 * 40
        for (trace, name), rows in self.by().items():
            for r in rows:
                rel, before = float(r["rel"]), float(r["rel_before"])
                copies = int(r["copies_cross_gpu"])
                if name.startswith("deepseek"):
                    self.assertAlmostEqual(rel, 1.0, places=9)
                elif name.startswith("stale"):
                    self.assertEqual(copies, 0)
                    self.assertEqual(rel, before)
                else:
                    self.assertGreaterEqual(rel, before - 1e-9, (trace, name, r["rebalance"]))
                m = re.fullmatch(r"incremental t=([0-9.]+)", name)
                if m:
                    self.assertGreaterEqual(rel, float(m.group(1)) - 1e-9, (trace, name, r["rebalance"]))
                m = re.fullmatch(r"incr t=0.99 slots<=([0-9.]+)%", name)
                if m:  # a copy rewrites a slot: copies <= the slot budget
                    self.assertLessEqual(copies, int(float(m.group(1)) / 100 * slots), (trace, name))
        # the added rows are not copies of others: t=0.8 moves less than t=0.97
        g = self.by()
        low = sum(int(r["copies_cross_gpu"]) for r in g[("slow", "incremental t=0.8")])
        high = sum(int(r["copies_cross_gpu"]) for r in g[("slow", "incremental t=0.97")])
        self.assertLess(low, high)

    def test_relief_counts_the_gpus_each_rebalance_brought_down(self):
        """BENCH_RELIEF: GPUs above the layer's new max when a rebalance began, and copies per such GPU."""
        path = os.path.join(self.dir, "relief.csv")
        r = bench({"BENCH_RELIEF": "1", "BENCH_CSV": path, "BENCH_TARGETS": "0.8"})
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        relief = relief_lines(r.stdout)
        layers, gpus = 6, 8
        groups = {}
        for row in rows:
            groups.setdefault((row["trace"], row["strategy"]), []).append(row)
        self.assertIn(("slow", "incremental t=0.99"), relief)
        self.assertIn(("shift", "deepseek/min_traffic"), relief)
        for key, rs in groups.items():
            raised = sum(float(x["rel"]) > float(x["rel_before"]) + 1e-9 for x in rs)
            copies = sum(int(x["copies_cross_gpu"]) for x in rs)
            if key[1].startswith("stale"):
                self.assertNotIn(key, relief)  # it never moves: no GPU is above its own max
                continue
            if not raised:
                continue
            per_layer, per_gpu = relief[key]
            self.assertLessEqual(per_layer, gpus, key)
            relieved = round(per_layer * R * layers)
            # a rebalance that raised balancedness lowered some layer's max: a GPU of it was above the new one
            self.assertGreaterEqual(relieved, raised, key)
            self.assertAlmostEqual(per_gpu, copies / relieved, delta=0.006, msg=key)
        # On 2 GPUs only the busier can be above the new max (the lighter is at most the mean), and it
        # is exactly when the max fell: then every rebalance that raised balancedness counts one.
        # Two redundant slots, so replica counts other than 1 divide the loads.
        tiny = os.path.join(self.dir, "tiny.csv")
        t = subprocess.run([BENCH, "20"], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, BENCH_SHAPE="1,4,6,1,1,2", BENCH_RELIEF="1", BENCH_CSV=tiny))
        self.assertEqual(t.returncode, 0, t.stderr)
        tiny_relief = {key: round(per_layer * 20) for key, (per_layer, _) in relief_lines(t.stdout).items()}
        with open(tiny, newline="") as f:
            counted = {}
            for row in csv.DictReader(f):
                key = (row["trace"], row["strategy"])
                counted[key] = counted.get(key, 0) + (float(row["rel"]) > float(row["rel_before"]) + 1e-9)
        self.assertGreater(sum(counted.values()), 50)
        for key, n in counted.items():
            self.assertEqual(tiny_relief.get(key, 0), n, key)
        # from scratch, more than the busiest GPU per layer comes down, and far more than one copy each
        self.assertGreater(relief[("slow", "deepseek/min_traffic")][0], 1)
        self.assertGreater(relief[("slow", "deepseek/min_traffic")][1], relief[("slow", "incremental t=0.99")][1])
        # a lower target brings fewer GPUs down
        self.assertLess(relief[("slow", "incremental t=0.8")][0], relief[("slow", "incremental t=0.99")][0])

    def test_cross_node_cost_trades_cross_node_copies(self):
        # 2 nodes of 4 GPUs, one group (the global path: any copy may cross): a cheaper cross-node copy
        # lets more copies cross
        rows = {}
        for cost in ("1", "16"):
            path = os.path.join(self.dir, "xc%s.csv" % cost)
            r = bench({"BENCH_CROSS_NODE_COST": cost, "BENCH_STRATEGY": "incremental t=0.99", "BENCH_CSV": path,
                       "BENCH_SHAPE": "6,32,40,1,2,8"}, 20)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(path, newline="") as f:
                rows[cost] = [x for x in csv.DictReader(f) if x["strategy"] == "incremental t=0.99"]
        node = {k: sum(int(x["copies_cross_node"]) for x in v) for k, v in rows.items()}
        self.assertGreater(node["1"], node["16"])
        for v in rows.values():  # the target holds at either price
            self.assertTrue(all(float(x["rel"]) >= 0.99 - 1e-9 for x in v))

    def test_bad_settings_exit_2_with_one_line(self):
        for env, word in (({"BENCH_TARGETS": "1.5"}, "BENCH_TARGETS"), ({"BENCH_TARGETS": "0.9,"}, "BENCH_TARGETS"),
                          ({"BENCH_BUDGETS": "0.1,x"}, "BENCH_BUDGETS"), ({"BENCH_BUDGETS": "0"}, "BENCH_BUDGETS"),
                          ({"BENCH_TARGETS": ",".join("0.%02d" % i for i in range(10, 50))}, "at most"),
                          ({"BENCH_TARGETS": "0.99"}, "there already"), ({"BENCH_BUDGETS": "0.3,0.3"}, "there already"),
                          ({"BENCH_TARGETS": " 0.9"}, "BENCH_TARGETS"),
                          ({"BENCH_CROSS_NODE_COST": "0"}, "BENCH_CROSS_NODE_COST"),
                          ({"BENCH_CROSS_NODE_COST": "2x"}, "BENCH_CROSS_NODE_COST"),
                          ({"BENCH_CROSS_NODE_COST": "inf"}, "BENCH_CROSS_NODE_COST"),
                          ({"BENCH_CROSS_NODE_COST": "2e6"}, "BENCH_CROSS_NODE_COST"),
                          ({"BENCH_CROSS_NODE_COST": ""}, "BENCH_CROSS_NODE_COST"),
                          ({"BENCH_CROSS_NODE_COST": " 2"}, "BENCH_CROSS_NODE_COST"),
                          ({"BENCH_CSV": os.path.join(self.dir, "no", "such", "dir.csv")}, "BENCH_CSV")):
            r = bench(env, 4)
            self.assertEqual(r.returncode, 2, (env, r.stderr))
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn(word, r.stderr)
            self.assertEqual(r.stdout, "")

    def test_csv_appends_under_one_header(self):
        path = os.path.join(self.dir, "twice.csv")
        for _ in range(2):
            self.assertEqual(bench({"BENCH_CSV": path, "BENCH_STRATEGY": "incremental t=0.95"}, 4).returncode, 0)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(sum(line.startswith("case,") for line in lines), 1)
        self.assertEqual(len(lines), 1 + 2 * 3 * 2 * 4)  # 2 runs x 3 traces x (t=0.95 + MIN_TRAFFIC) x 4

    def plot(self, *args, code=None):
        cmd = [sys.executable, PLOT, *args] if code is None else [sys.executable, "-c", code, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    def test_plot_draws_each_case(self):
        out = os.path.join(self.dir, "img")
        r = self.plot(self.csv, out)
        self.assertEqual(r.returncode, 0, r.stderr)
        w, h = png_size(os.path.join(out, "incremental-bench-shape.png"))
        self.assertGreater(w, 500)
        self.assertGreater(h, 200)
        # the printed curve is the table's: t=0.97 on the slow trace
        rel, _, gb = self.table()[("slow", "incremental t=0.97")][:3]
        self.assertRegex(r.stdout, r"slow .*t=0\.97 %.4f/%.1f" % (rel, gb))

    def test_plot_refuses_what_it_cannot_draw(self):
        bad = os.path.join(self.dir, "bad.csv")
        with open(self.csv) as f:
            lines = f.read().splitlines(keepends=True)
        nan_rel = lines[1].split(",")
        nan_rel[4] = "x"  # rel
        for text in ("a,b,c\n1,2,3\n", "", lines[0], lines[0] + ",".join(nan_rel) + "".join(lines[2:]),
                     "".join(lines) + "".join(lines[1:]), "\xff\xfe\x00"):
            with open(bad, "w", encoding="latin-1") as f:
                f.write(text)
            r = self.plot(bad, os.path.join(self.dir, "img-bad"))
            self.assertEqual(r.returncode, 2, (text[:60], r.stderr))
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertFalse(os.path.exists(os.path.join(self.dir, "img-bad")))
        r = self.plot(os.path.join(self.dir, "no-such.csv"), os.path.join(self.dir, "img-bad"))
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        r = self.plot(self.csv, os.path.join(self.dir, "img-nompl"), code="import sys; sys.modules['matplotlib'] = None; sys.argv[0] = %r; "
                                     "exec(compile(open(%r).read(), %r, 'exec'))" % (PLOT, PLOT, PLOT))
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("python3-matplotlib", r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "img-nompl")))


if __name__ == "__main__":
    unittest.main(verbosity=2)
