"""The two-thread search (eplb_incremental.c, "Two threads") under TSan:
tests/tsan/two_threads_driver.c's random comparisons against threads = 1,
each fallback reached.  Argument: the build tree holding the driver (the
TSan tree in tests/run.sh's tsan stage, where TSAN_OPTIONS makes a report
exit 66 and write a file the harness counts).

    /usr/bin/python3 tests/tsan/test_two_threads.py BUILD_DIR
"""
import os
import re
import subprocess
import sys
import unittest

BUILD = None


def drive(cases, seed, mode):
    exe = os.path.join(BUILD, "tests", "two_threads_driver")
    out = subprocess.run([exe, str(cases), str(seed), mode], capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout, out.stderr


def counts(stdout):
    m = re.fullmatch(r"cases (\d+) two (\d+) undone (\d+)\n", stdout)
    if not m:
        raise AssertionError("unexpected output: %r" % stdout)
    return tuple(int(x) for x in m.groups())


class TwoThreads(unittest.TestCase):
    def run_mode(self, cases, seed, mode):
        rc, out, err = drive(cases, seed, mode)
        self.assertEqual(rc, 0, "%s: rc %d\n%s%s" % (mode, rc, out, err))
        n, two, undone = counts(out)
        self.assertEqual(n, cases)
        return two, undone

    def test_same_answer(self):
        two, undone = self.run_mode(200, 0x2b2b, "plain")
        self.assertGreater(two, 140, "the two-thread search finished in %d of 200" % two)
        self.assertEqual(undone, 0)

    def test_past_the_compute_bound(self):
        two, undone = self.run_mode(200, 0x3c3c, "bound")
        self.assertGreater(two, 50)
        self.assertGreater(undone, 10)

    def test_at_the_edge_of_the_compute_bound(self):
        two, undone = self.run_mode(150, 0x9c9c, "near")
        self.assertGreater(two, 10)
        self.assertGreater(undone, 10)

    def test_bad_layers(self):
        two, undone = self.run_mode(100, 0xadad, "bad")
        self.assertLess(two, 10)  # a shape of one expert has no bad layer: compared as usual
        self.assertGreater(undone, 80)

    def test_a_late_helper(self):
        # threads = 0 or 2 at random: with 0 the loop runs on one thread when
        # the helper has not arrived, with 2 it waits for the helper.
        two, undone = self.run_mode(150, 0xbebe, "late")
        self.assertGreater(150 - two - undone, 20)
        self.assertGreater(two, 10)
        self.assertEqual(undone, 0)

    def test_a_full_log(self):
        two, undone = self.run_mode(200, 0x5e5e, "log")
        self.assertGreater(undone, 40)
        self.assertGreater(two, 30)

    def test_without_a_thread(self):
        two, undone = self.run_mode(50, 0x6f6f, "nothread")
        self.assertEqual((two, undone), (0, 0))

    def test_bad_arguments(self):
        for args in (["0", "1", "plain"], ["5", "x", "plain"], ["5", "1", "fast"]):
            rc, _, err = drive(*args)
            self.assertEqual(rc, 2, args)
            self.assertTrue(err, args)


if __name__ == "__main__":
    BUILD = sys.argv.pop(1)
    unittest.main()
