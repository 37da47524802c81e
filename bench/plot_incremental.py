"""Draws bench_incremental's curve of balance against bytes.

    BENCH_TARGETS=0.8,0.85,0.93,0.97,0.98,0.995 BENCH_CSV=inc.csv build/bench/bench_incremental 50
    /usr/bin/python3 bench/plot_incremental.py inc.csv docs/img

Per case of the CSV (one row per rebalance of every strategy, written by
BENCH_CSV), one PNG, incremental-<case>.png:
- left: each strategy's mean balancedness (as a fraction of DeepSeek's on
  the same load) against its mean GB copied across GPUs per rebalance, for
  the slow, fast and shift traces.  The INCREMENTAL targets make the curve;
  budgets and DEEPSEEK are points; the stale placement's balancedness is
  in the title.
- right: the cumulative bytes over the slow trace's rebalances (DEEPSEEK,
  INCREMENTAL at 0.9, 0.95 and 0.99, the budgets dashed).
Also prints the curve's points as a table.  Exit 2 on a file that cannot
be read or is not such a CSV (a rebalance twice: two runs appended to one
file), 1 without python3-matplotlib.
"""
import csv
import os
import re
import sys
from collections import OrderedDict, defaultdict

COLUMNS = ("case", "trace", "strategy", "rebalance", "rel", "copies_cross_gpu", "bytes_cross_gpu")
TRACE_STYLE = {"slow": "o-", "fast": "s--", "shift": "^:"}
CUMULATIVE_TARGETS = (0.9, 0.95, 0.99)  # the INCREMENTAL targets drawn on the right


def fail(code, msg):
    print("plot_incremental: " + msg, file=sys.stderr)
    sys.exit(code)


def read(path):
    """{case: {trace: {strategy: [(rebalance, rel, bytes), ...]}}}, in file order."""
    data, seen = OrderedDict(), set()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            r = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (r.fieldnames or [])]
            if missing:
                fail(2, "%s is not a bench_incremental CSV (missing columns: %s)" % (path, ", ".join(missing)))
            for n, row in enumerate(r, start=2):
                try:
                    item = (int(row["rebalance"]), float(row["rel"]), float(row["bytes_cross_gpu"]))
                except (TypeError, ValueError):
                    fail(2, "%s:%d: not a number where one belongs" % (path, n))
                key = (row["case"], row["trace"], row["strategy"], item[0])
                if key in seen:
                    fail(2, "%s:%d: rebalance %d of %s / %s / %s is there twice (two runs in one file?)"
                         % ((path, n, item[0]) + key[:3]))
                seen.add(key)
                data.setdefault(row["case"], OrderedDict()).setdefault(row["trace"], OrderedDict()) \
                    .setdefault(row["strategy"], []).append(item)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        fail(2, "%s: %s" % (path, e))
    if not data:
        fail(2, "%s has no rows" % path)
    return data


def target_of(name):
    m = re.fullmatch(r"incremental t=([0-9.eE+-]+)", name)
    return float(m.group(1)) if m else None


def summary(rows):
    """(mean rel, mean GB per rebalance, cumulative GB per rebalance)."""
    rows = sorted(rows)
    cum, total = [], 0.0
    for _, _, b in rows:
        total += b / 1e9
        cum.append(total)
    return sum(r for _, r, _ in rows) / len(rows), total / len(rows), cum


def slug(case):
    return re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-")


def main(argv):
    if len(argv) != 2:
        fail(2, "usage: plot_incremental.py CSV OUTDIR")
    data = read(argv[0])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail(1, "needs matplotlib (Debian: apt-get install python3-matplotlib)")
    os.makedirs(argv[1], exist_ok=True)
    for case, traces in data.items():
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
        print("%s: balancedness vs DeepSeek / GB across GPUs per rebalance" % case)
        positive = [summary(rows)[1] for st in traces.values() for rows in st.values() if summary(rows)[1] > 0]
        xmin = min(positive) / 2 if positive else 0.1  # a rebalance that copies nothing sits on the left edge
        stale_note, lowest = [], 1.0
        for trace, strategies in traces.items():
            pts = defaultdict(list)
            for name, rows in strategies.items():
                rel, gb, cum = summary(rows)
                t = target_of(name)
                kind = "curve" if t is not None else "budget" if name.startswith("incr") else \
                    "stale" if name.startswith("stale") else "deepseek"
                pts[kind].append((gb, rel, t if t is not None else name))
                if kind != "stale":
                    lowest = min(lowest, rel)
                if trace == "slow" and cum[-1] > 0 and (kind != "curve" or t in CUMULATIVE_TARGETS):
                    ax2.plot(range(1, len(cum) + 1), cum, "--" if kind == "budget" else "-", label=name)
            curve = sorted(pts["curve"])
            style = TRACE_STYLE.get(trace, "x-")
            color = None
            if curve:
                line, = ax.plot([max(p[0], xmin) for p in curve], [p[1] for p in curve], style,
                                label="incremental, " + trace)
                color = line.get_color()
                if trace == "slow":
                    for gb, rel, t in curve:
                        ax.annotate("t=%g" % t, (max(gb, xmin), rel), textcoords="offset points", xytext=(5, -9),
                                    fontsize=7)
            for gb, rel, name in sorted(pts["budget"]):
                ax.plot([max(gb, xmin)], [rel], "D", color=color, mfc="none",
                        label=("t=0.99 with a slot budget, " + trace) if name == sorted(pts["budget"])[0][2] else None)
                if trace == "slow":
                    ax.annotate(name.split(" ")[-1], (max(gb, xmin), rel), textcoords="offset points",
                                xytext=(5, 2), fontsize=6, color=color)
            for gb, rel, name in pts["deepseek"]:
                marker = "*" if "min_traffic" in name else "P"
                ax.plot([max(gb, xmin)], [rel], marker, color=color, ms=9, label=name if trace == "slow" else None)
            for _, rel, _ in pts["stale"]:
                stale_note.append("%s %.2f" % (trace, rel))
            print("  %-6s %s" % (trace, "  ".join("t=%g %.4f/%.1f" % (t, rel, gb) for gb, rel, t in curve)))
            for gb, rel, name in pts["budget"] + pts["deepseek"] + pts["stale"]:
                print("  %-6s %s %.4f/%.1f" % (trace, name, rel, gb))
        ax.set_xscale("log")
        ax.set_xlim(left=xmin / 1.3)
        ax.set_ylim(bottom=max(0.0, lowest - 0.03), top=1.01 + 0.02 * (1 - lowest))
        ax.set_xlabel("GB copied across GPUs per rebalance (log)")
        ax.set_ylabel("balancedness / DeepSeek's on the same load")
        runs = max(len(rows) for st in traces.values() for rows in st.values())
        ax.set_title("%s: balance against bytes, means over %d rebalances\n(the stale placement: %s)"
                     % (case, runs, ", ".join(stale_note) or "not run"), fontsize=9)
        ax.grid(True, which="both", lw=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        ax2.set_yscale("log")
        ax2.set_xlabel("rebalance (slow trace)")
        ax2.set_ylabel("cumulative GB across GPUs (log)")
        ax2.set_title("cumulative bytes, slow drift", fontsize=9)
        ax2.grid(True, which="both", lw=0.3)
        if ax2.get_lines():
            ax2.legend(fontsize=6, ncol=2, loc="lower right")
        fig.tight_layout()
        out = os.path.join(argv[1], "incremental-%s.png" % slug(case))
        fig.savefig(out, dpi=90)
        plt.close(fig)
        print("wrote " + out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
