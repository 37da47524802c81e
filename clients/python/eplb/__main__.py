"""``python3 -m eplb``: placement files and the placement report from the shell.

    python3 -m eplb report MODEL_ID --out report.png [--load FILE] [--before FILE]
    python3 -m eplb export MODEL_ID [--format sglang|vllm] [-o FILE]   (.pt for a torch file)
    python3 -m eplb import MODEL_ID FILE                                (.json or .pt)

``--addr`` (default $EPLBD_ADDR or 127.0.0.1:50051).  Exit 0 OK, 1 the server
refused or a file does not fit the model, 2 usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import files
from .client import Client, RebalanceResult, default_target
from .errors import EplbError
from .placement import Placement


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m eplb", description="eplbd placement files and reports")
    ap.add_argument("--addr", default=None, help="eplbd address (default $EPLBD_ADDR or 127.0.0.1:50051)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="per-GPU load heatmaps, balancedness per layer, replicas per expert")
    r.add_argument("model_id")
    r.add_argument("--out", required=True, help="report.png or report.html")
    r.add_argument("--load", help="load file: SGLang logical_count [L][N] (.json/.pt) or {\"physical_load\": [L][P]}")
    r.add_argument("--before", help="placement file of the placement before the rebalance (else: served vs dry run)")
    e = sub.add_parser("export", help="the served placement as SGLang's or vLLM's file")
    e.add_argument("model_id")
    e.add_argument("--format", choices=("sglang", "vllm"), default="sglang")
    e.add_argument("-o", "--output", default="-", help="FILE (.json, or .pt for sglang); - = stdout (JSON)")
    i = sub.add_parser("import", help="apply a placement file: a map -> SetupFromMapping, logical_count -> Rebalance")
    i.add_argument("model_id")
    i.add_argument("file")
    return ap


def _summary(x: object) -> str:
    p = x.placement if isinstance(x, RebalanceResult) else x
    assert isinstance(p, Placement)
    d = {"model_id": p.model_id, "epoch": p.epoch, "state": p.state, "num_layers": p.num_layers,
         "num_physical_experts": p.num_physical_experts, "num_logical_experts": p.num_logical_experts}
    if isinstance(x, RebalanceResult):
        d.update(committed=x.committed, balancedness_before=round(x.balancedness_before, 4),
                 balancedness_after=round(x.balancedness_after, 4), experts_moved=x.experts_moved)
    return json.dumps(d, indent=2)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        with Client(args.addr or default_target(), timeout=args.timeout) as c:
            if args.command == "report":
                from .report import make_report

                data = make_report(c, args.model_id, args.out, load=args.load, before=args.before)
                print("%s: %s vs %s, balancedness %.4f -> %.4f" % (
                    args.out, data.before_label, data.after_label, float(data.balancedness_before.mean()),
                    float(data.balancedness_after.mean())))
            elif args.command == "export":
                p = c.get_placement(args.model_id)
                if args.output == "-":
                    import os
                    import tempfile

                    fd, tmp = tempfile.mkstemp(suffix=".json")
                    os.close(fd)
                    try:
                        (files.export_sglang if args.format == "sglang" else files.export_vllm)(p, tmp)
                        sys.stdout.write(open(tmp).read())
                    finally:
                        os.unlink(tmp)
                else:
                    (files.export_sglang if args.format == "sglang" else files.export_vllm)(p, args.output)
            else:
                print(_summary(files.apply(c, args.model_id, args.file)))
    except EplbError as e:
        print("python3 -m eplb: %s" % e, file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as e:
        print("python3 -m eplb: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
