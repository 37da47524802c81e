"""A placement report: per-GPU load per layer before and after a rebalance,
balancedness per layer, replicas per expert -- one PNG (or an HTML page
holding it and the numbers).

What it shows, and where each number comes from (the report prints this
on the image too):

- eplbd's recorded load window is not readable through the API: only a
  Rebalance uses it.  So the per-GPU heatmaps need the load as a file
  (``--load``: SGLang's ``{"logical_count": [L][N]}`` JSON/.pt, or
  ``{"physical_load": [L][P]}`` counted under the *before* placement).
- "after" is the placement eplbd serves now (GetPlacement).  "before" is a
  placement file given with ``--before`` (e.g. ``eplbctl export`` taken
  before the rebalance).  Without ``--before`` the report compares the served
  placement ("before") with what a dry-run Rebalance of the same load would
  commit ("after", not committed).
- Per-GPU load: each logical expert's load split evenly over its replicas
  (the model DeepSeek's EPLB balances), summed over each GPU's slots; shown
  relative to the layer's mean GPU load (1.0 = perfectly even).
  Balancedness = mean / max GPU load, vLLM's definition.
- Without ``--load`` the balancedness lines are eplbd's own numbers from a
  dry-run Rebalance over its recorded window, and the heatmaps are left out.
"""
from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

import numpy as np

from . import files
from .placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

__all__ = ["ReportData", "gpu_load", "balancedness", "collect", "render", "make_report"]

PathLike = Union[str, "os.PathLike[str]"]


def gpu_load(placement: Placement, logical_load: np.ndarray, ep_size: int) -> np.ndarray:
    """[L, ep_size] float: each GPU's load under ``placement`` when each logical
    expert's load [L, N] is split evenly over its replicas."""
    lc = np.asarray(logical_load, dtype=np.float64)
    L, P, N = placement.num_layers, placement.num_physical_experts, placement.num_logical_experts
    if lc.shape != (L, N):
        raise ValueError("load is %s, the placement is %d layers x %d logical experts" % (lc.shape, L, N))
    if ep_size <= 0 or P % ep_size:
        raise ValueError("ep_size %d does not divide %d slots" % (ep_size, P))
    p2l = placement.physical_to_logical
    cnt = placement.logical_replica_count.astype(np.float64)
    per_replica = np.divide(lc, cnt, out=np.zeros_like(lc), where=cnt > 0)
    rows = np.arange(L)[:, None]
    slot = np.where(p2l >= 0, per_replica[rows, np.maximum(p2l, 0)], 0.0)
    return slot.reshape(L, ep_size, P // ep_size).sum(axis=2)


def balancedness(per_gpu: np.ndarray) -> np.ndarray:
    """[L]: mean / max GPU load per layer (1.0 for a layer with no load)."""
    mx = per_gpu.max(axis=1)
    return np.divide(per_gpu.mean(axis=1), mx, out=np.ones_like(mx), where=mx > 0)


def _logical_from_physical(placement: Placement, physical: np.ndarray) -> np.ndarray:
    L, P, N = placement.num_layers, placement.num_physical_experts, placement.num_logical_experts
    if physical.shape != (L, P):
        raise ValueError("physical_load is %s, the placement is %d layers x %d slots" % (physical.shape, L, P))
    out = np.zeros((L, N), dtype=np.int64)
    valid = placement.num_valid_physical_experts or P
    p2l = placement.physical_to_logical[:, :valid]
    li, si = np.nonzero(p2l >= 0)
    np.add.at(out, (li, p2l[li, si]), physical[li, si])
    return out


def read_load(path: PathLike, placement: Placement) -> np.ndarray:
    """The logical load [L, N] of a load file: ``logical_count`` (SGLang), or
    ``physical_load`` [L, P] (JSON) summed per expert under ``placement``."""
    p = os.fspath(path)
    if not p.endswith(".pt"):
        import json

        with open(p) as f:
            data = json.load(f)
        if isinstance(data, dict) and "physical_load" in data and "logical_count" not in data:
            a = np.asarray(data["physical_load"], dtype=np.int64)
            if a.ndim == 3:  # [passes, L, P], as a window
                a = a.sum(axis=0)
            return _logical_from_physical(placement, a)
    pf = files.load(p)
    if pf.kind != "load" or pf.logical_count is None:
        raise ValueError("%s holds a placement, not load (logical_count or physical_load)" % p)
    return pf.logical_count


@dataclass
class ReportData:
    """Everything the report draws (numpy arrays), and where it came from."""

    model_id: str
    ep_size: int
    served_epoch: int
    before_label: str
    after_label: str
    before: Placement
    after: Placement
    load_source: str
    logical_load: Optional[np.ndarray]                 # [L, N], None without --load
    gpu_before: Optional[np.ndarray] = None            # [L, ep_size]
    gpu_after: Optional[np.ndarray] = None
    balancedness_before: np.ndarray = field(default_factory=lambda: np.zeros(0))
    balancedness_after: np.ndarray = field(default_factory=lambda: np.zeros(0))
    balancedness_source: str = ""
    notes: List[str] = field(default_factory=list)


def collect(client: "Client", model_id: str, *, load: Optional[PathLike] = None,
            before: Optional[PathLike] = None) -> ReportData:
    """Read what the report needs from eplbd (GetPlacement, ListModels, a
    dry-run Rebalance when there is no ``before`` file) and the files."""
    served = client.get_placement(model_id)
    ep = [m.ep_size for m in client.list_models() if m.model_id == model_id]
    if not ep:
        raise ValueError("model %s is not listed" % model_id)
    ep_size = ep[0]
    notes = ["eplbd's recorded load window is not readable through the API, "
             + ("so the load comes from the file" if load is not None
                else "so per-GPU load needs --load FILE; balancedness is eplbd's dry run over its window") + "."]
    if before is not None:
        b = files.load(before).to_placement(served.num_logical_experts)
        if (b.num_layers, b.num_physical_experts) != (served.num_layers, served.num_physical_experts):
            raise ValueError("%s is %d x %d, the served placement %d x %d" % (
                os.fspath(before), b.num_layers, b.num_physical_experts, served.num_layers,
                served.num_physical_experts))
        before_p, after_p = b, served
        before_label = "before: %s" % os.path.basename(os.fspath(before))
        after_label = "after: served, epoch %d" % served.epoch
        lc = read_load(load, before_p) if load is not None else None
        if lc is None:
            raise ValueError("with --before the report needs --load (the window is not readable)")
    else:
        lc = read_load(load, served) if load is not None else None
        dry = client.rebalance(model_id, logical_load=lc, dry_run=True) if lc is not None else \
            client.rebalance(model_id, dry_run=True)
        before_p, after_p = served, dry.placement
        before_label = "served, epoch %d" % served.epoch
        after_label = "proposed by a dry-run Rebalance (not committed)"
        notes.append("No --before file: 'after' is what a Rebalance of this load would commit.")
    data = ReportData(model_id=model_id, ep_size=ep_size, served_epoch=served.epoch, before_label=before_label, after_label=after_label,
                      before=before_p, after=after_p,
                      load_source=os.fspath(load) if load is not None else "eplbd's window (dry run)",
                      logical_load=lc, notes=notes)
    if lc is not None:
        data.gpu_before = gpu_load(before_p, lc, ep_size)
        data.gpu_after = gpu_load(after_p, lc, ep_size)
        data.balancedness_before = balancedness(data.gpu_before)
        data.balancedness_after = balancedness(data.gpu_after)
        data.balancedness_source = "mean/max GPU load from the load file"
    else:
        data.balancedness_before = np.asarray(dry.layer_balancedness_before)
        data.balancedness_after = np.asarray(dry.layer_balancedness_after)
        data.balancedness_source = "eplbd's dry-run Rebalance over its recorded window"
    return data


def _ticks(n: int, target: int = 16) -> Sequence[int]:
    step = max(1, int(np.ceil(n / target)))
    for nice in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100):
        if nice >= step:
            step = nice
            break
    return list(range(0, n, step))


def render(data: ReportData, out: PathLike, *, dpi: int = 100) -> None:
    """Draw ``data`` into ``out``: .png, or .html (the PNG inline and the per-layer numbers)."""
    try:
        import matplotlib
    except ImportError as e:  # the report is the package's only user of it: said, not a traceback
        raise ImportError("drawing a report needs matplotlib (Debian: apt-get install python3-matplotlib; "
                          "pip: matplotlib): %s" % e) from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors

    after = data.after
    L, P, N = after.num_layers, after.num_physical_experts, after.num_logical_experts
    fig = plt.figure(figsize=(16, 19), dpi=dpi)
    gs = fig.add_gridspec(3, 3, height_ratios=[1.25, 0.6, 1.0], width_ratios=[1, 1, 0.04],
                          hspace=0.32, wspace=0.12, top=0.90, bottom=0.04, left=0.06, right=0.95)
    fig.suptitle("eplbd placement report: %s  (served epoch %d, %d MoE layers x %d slots, %d logical experts + "
                 "%d redundant, ep %d)" % (data.model_id, data.served_epoch, L, P, N, P - N, data.ep_size),
                 fontsize=15, fontweight="bold", y=0.985)
    fig.text(0.06, 0.955, "load: %s.   per-GPU load = each expert's load split evenly over its replicas, summed "
             "per GPU, shown relative to the layer's mean (1.0 = even); balancedness = mean / max GPU load."
             % data.load_source, fontsize=10.5)
    fig.text(0.06, 0.94, "  ".join(data.notes), fontsize=10.5, style="italic")

    # Row 1: per-GPU load heatmaps, one shared colour scale.
    ax_b, ax_a, ax_c = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[0, 2])
    if data.gpu_before is not None and data.gpu_after is not None:
        def rel(g: np.ndarray) -> np.ndarray:
            m = g.mean(axis=1, keepdims=True)
            return np.divide(g, m, out=np.ones_like(g), where=m > 0)

        rb, ra = rel(data.gpu_before), rel(data.gpu_after)
        # Colours are linear on [0, 2] around the mean (1.0, white); a hotter GPU
        # is clipped to the darkest red so one outlier does not wash out the rest.
        peak = float(max(rb.max(initial=1), ra.max(initial=1)))
        norm = colors.Normalize(vmin=0.0, vmax=2.0)
        for ax, r, label, bal in ((ax_b, rb, data.before_label, data.balancedness_before),
                                  (ax_a, ra, data.after_label, data.balancedness_after)):
            im = ax.imshow(r, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            ax.set_title("%s\nbalancedness mean %.3f, worst layer %.3f" % (label, float(bal.mean()),
                                                                          float(bal.min())), fontsize=12)
            ax.set_xlabel("GPU (EP rank)")
            ax.set_xticks(_ticks(data.ep_size))
            ax.set_yticks(_ticks(L))
        ax_b.set_ylabel("MoE layer")
        ax_a.set_yticklabels([])
        cb = fig.colorbar(im, cax=ax_c, extend="max" if peak > 2.0 else "neither")
        cb.set_label("GPU load / layer mean" + (" (>= 2 shown as 2; hottest %.1f)" % peak if peak > 2.0 else ""))
    else:
        for ax in (ax_b, ax_a):
            ax.axis("off")
        ax_c.axis("off")
        ax_b.text(0.0, 0.5, "per-GPU load per layer: give the load with --load FILE\n(eplbd's recorded window is "
                  "not readable through the API)", fontsize=13, va="center")

    # Row 2: balancedness per layer.
    ax = fig.add_subplot(gs[1, :2])
    x = np.arange(len(data.balancedness_before))
    ax.plot(x, data.balancedness_before, "o-", color="#c0392b", ms=3.5, lw=1.4, label=data.before_label)
    ax.plot(x, data.balancedness_after, "o-", color="#2471a3", ms=3.5, lw=1.4, label=data.after_label)
    ax.set_xlim(-0.5, max(len(x) - 0.5, 0.5))
    lo = float(min(np.min(data.balancedness_before, initial=1), np.min(data.balancedness_after, initial=1)))
    ax.set_ylim(max(0.0, lo - 0.05), 1.01)
    ax.set_xticks(_ticks(len(x), 30))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("balancedness (mean/max)")
    ax.set_title("balancedness per layer (%s)" % data.balancedness_source, fontsize=12, loc="right")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, fontsize=10, frameon=False)

    # Row 3: replicas per expert of the 'after' placement.
    ax_r, ax_rc = fig.add_subplot(gs[2, :2]), fig.add_subplot(gs[2, 2])
    cnt = after.logical_replica_count
    kmax = int(max(cnt.max(initial=1), 1))
    cmap = plt.get_cmap("viridis", kmax)
    norm_r = colors.BoundaryNorm(np.arange(0.5, kmax + 1.5), cmap.N)
    im = ax_r.imshow(cnt, aspect="auto", cmap=cmap, norm=norm_r, interpolation="nearest")
    hist = np.bincount(cnt.ravel(), minlength=kmax + 1)
    ax_r.set_title("replicas per logical expert (%s): %s" % (
        data.after_label, ", ".join("%d x%d" % (int(hist[k]), k) for k in range(1, kmax + 1) if hist[k])),
        fontsize=12)
    ax_r.set_xlabel("logical expert")
    ax_r.set_ylabel("MoE layer")
    ax_r.set_xticks(_ticks(N, 16))
    ax_r.set_yticks(_ticks(L))
    cb = fig.colorbar(im, cax=ax_rc, ticks=np.arange(1, kmax + 1))
    cb.set_label("replicas")

    o = os.fspath(out)
    if o.endswith(".html"):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        _write_html(data, o, buf.getvalue())
    else:
        fig.savefig(o, format="png", dpi=dpi)
        plt.close(fig)


def _write_html(data: ReportData, path: str, png: bytes) -> None:
    rows = "\n".join("<tr><td>%d</td><td>%.4f</td><td>%.4f</td></tr>" % (i, b, a) for i, (b, a) in enumerate(
        zip(data.balancedness_before, data.balancedness_after)))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>eplbd report: {m}</title></head><body>"
            "<h1>eplbd placement report: {m}</h1><p>{notes}</p><p>load: {src}; balancedness: {bsrc}</p>"
            "<img alt='report' style='max-width:100%' src='data:image/png;base64,{img}'>"
            "<h2>balancedness per layer</h2><table border='1' cellpadding='3'>"
            "<tr><th>layer</th><th>{b}</th><th>{a}</th></tr>{rows}</table></body></html>\n").format(
        m=html.escape(data.model_id), notes=html.escape(" ".join(data.notes)), src=html.escape(data.load_source),
        bsrc=html.escape(data.balancedness_source), img=base64.b64encode(png).decode(),
        b=html.escape(data.before_label), a=html.escape(data.after_label), rows=rows)
    with open(path, "w") as f:
        f.write(page)


def make_report(client: "Client", model_id: str, out: PathLike, *, load: Optional[PathLike] = None,
                before: Optional[PathLike] = None) -> ReportData:
    """:func:`collect` then :func:`render` into ``out`` (.png or .html); returns the data drawn."""
    data = collect(client, model_id, load=load, before=before)
    render(data, out)
    return data
