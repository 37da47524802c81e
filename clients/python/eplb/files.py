"""Placement files: SGLang's ``--init-expert-location`` and vLLM's EplbState maps.

Formats (``docs/integrations.md``, "Placement files"):

- **SGLang** (``.json`` or ``.pt``, what ``--init-expert-location PATH`` reads,
  ``sglang/srt/eplb/expert_location.py``): a dict holding *either*
  ``physical_to_logical_map`` [L, P] (SGLang passes the dict as keyword
  arguments to ``ExpertLocationMetadata.init_by_mapping``, so the file holds
  that key and nothing else) *or* ``logical_count`` [L, N] (or [k, L, N],
  summed over k) load statistics, from which a placement is computed
  (``init_by_eplb``).  SGLang's map has no empty slots.
- **vLLM** (``.json``): vLLM has no file of its own; this is its three
  ``EplbState`` maps as lists -- ``physical_to_logical_map`` [L, P] (-1 = an
  empty slot), ``logical_to_physical_map`` [L, N, R] ascending slots padded
  with -1 (R = P - N + 1, as vLLM sizes it), ``logical_replica_count`` [L, N] --
  plus ``model_id``, ``epoch``, ``num_logical_experts`` and ``format``.

:func:`load` reads any of them; :func:`apply` gives one to eplbd: a mapping
becomes a ``SetupFromMapping`` of the same shape (the server then serves it,
epoch + 1), load counts a ``Rebalance(logical_load=...)``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import numpy as np

from .placement import Placement, logical_to_physical_from

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client, RebalanceResult

__all__ = ["PlacementFile", "VLLM_FORMAT", "export_sglang", "export_vllm", "save_load", "load", "apply"]

VLLM_FORMAT = "eplb-vllm-maps/1"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class PlacementFile:
    """What :func:`load` read.

    Attributes:
        kind: ``"mapping"`` (a placement: ``physical_to_logical`` is set) or
            ``"load"`` (load statistics: ``logical_count`` is set).
        format: ``"sglang"`` or ``"vllm"``.
        physical_to_logical: [L, P] int64 (-1 = empty slot), for a mapping.
        logical_to_physical: [L, N, R] int64, -1 padded (vLLM files only).
        logical_replica_count: [L, N] int64 (vLLM files only).
        logical_count: [L, N] int64 token counts per logical expert, for load
            statistics (a [k, L, N] file is summed over k, as SGLang does).
        num_logical_experts: N when the file says it (vLLM files, load files);
            else 0 (an SGLang map alone does not: its largest id is a lower bound).
        meta: the file's other keys (vLLM files: model_id, epoch, format).
    """

    kind: str
    format: str
    physical_to_logical: Optional[np.ndarray] = None
    logical_to_physical: Optional[np.ndarray] = None
    logical_replica_count: Optional[np.ndarray] = None
    logical_count: Optional[np.ndarray] = None
    num_logical_experts: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """L of the map or of the load."""
        a = self.physical_to_logical if self.kind == "mapping" else self.logical_count
        return int(a.shape[0]) if a is not None else 0

    def to_placement(self, num_logical_experts: int = 0) -> Placement:
        """A :class:`Placement` of a mapping file (replica counts derived);
        ``num_logical_experts`` defaults to the file's N (or, for an SGLang
        map, its largest expert id + 1)."""
        if self.kind != "mapping" or self.physical_to_logical is None:
            raise ValueError("a %s file holds load statistics, not a placement" % self.format)
        n = num_logical_experts or self.num_logical_experts or int(self.physical_to_logical.max(initial=-1)) + 1
        return Placement.from_arrays(self.physical_to_logical, n, model_id=str(self.meta.get("model_id", "")),
                                     epoch=int(self.meta.get("epoch", 0)))


# ---- writing ---------------------------------------------------------------------


def _is_pt(path: PathLike) -> bool:
    return os.fspath(path).endswith(".pt")


def _write(data: Dict[str, Any], path: PathLike) -> None:
    """Write a dict of int64 arrays / plain values as .pt (torch tensors) or JSON."""
    if _is_pt(path):
        import torch

        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                    for k, v in data.items()}, os.fspath(path))
        return
    text = json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in data.items()},
                      separators=(",", ":"))
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.write("\n")
    os.replace(tmp, path)


def export_sglang(placement: Placement, path: PathLike) -> None:
    """Write ``placement`` as SGLang's ``--init-expert-location`` file
    (``{"physical_to_logical_map": [L][P]}``; ``.pt`` for a torch file, else JSON).

    Raises ValueError when a slot is empty (-1, after an elastic expand and
    before a rebalance): SGLang's map has no empty slots.
    """
    p2l = np.asarray(placement.physical_to_logical, dtype=np.int64)
    empty = np.argwhere(p2l < 0)
    if empty.size:
        layer, slot = (int(x) for x in empty[0])
        raise ValueError("layer %d slot %d is empty (-1) and %d slot(s) in all: SGLang's physical_to_logical_map "
                         "has no empty slots (rebalance first)" % (layer, slot, len(empty)))
    _write({"physical_to_logical_map": p2l}, path)


def export_vllm(placement: Placement, path: PathLike) -> None:
    """Write ``placement`` as vLLM's three EplbState maps (JSON; see the module
    docstring), with R = P - N + 1 as vLLM sizes ``logical_to_physical_map``."""
    if _is_pt(path):
        raise ValueError("vLLM maps are written as JSON (%s ends in .pt)" % os.fspath(path))
    maps = placement.to_numpy()
    _write({"format": VLLM_FORMAT, "model_id": placement.model_id, "epoch": int(placement.epoch),
            "num_logical_experts": int(placement.num_logical_experts),
            "physical_to_logical_map": maps.physical_to_logical_map,
            "logical_to_physical_map": maps.logical_to_physical_map,
            "logical_replica_count": maps.logical_replica_count}, path)


def save_load(logical_count: Any, path: PathLike) -> None:
    """Write load statistics as SGLang's ``{"logical_count": [L][N]}`` (.pt or JSON):
    what ``--init-expert-location`` computes a placement from, and what
    :func:`apply` turns into a ``Rebalance(logical_load=...)``."""
    a = _as_int64(logical_count, "logical_count")
    if a.ndim not in (2, 3):
        raise ValueError("logical_count must be [layers, logical] or [k, layers, logical], got shape %s"
                         % (a.shape,))
    _write({"logical_count": a}, path)


# ---- reading ---------------------------------------------------------------------


def _as_int64(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except ValueError as e:  # ragged lists
        raise ValueError("%s is not a rectangular array: %s" % (what, e)) from None
    if a.dtype == object:
        raise ValueError("%s is not a rectangular array of numbers" % what)
    if a.size and not np.issubdtype(a.dtype, np.number):
        raise ValueError("%s holds %s, not numbers" % (what, a.dtype))
    if a.size and np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError("%s holds a value that is not finite" % what)
        if not np.array_equal(a, np.floor(a)):
            raise ValueError("%s holds a number that is not an integer" % what)
    return a.astype(np.int64)


def _read(path: PathLike) -> Dict[str, Any]:
    p = os.fspath(path)
    if _is_pt(p):
        import torch

        data = torch.load(p, weights_only=True, map_location="cpu")
    else:
        with open(p) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError("%s is not valid JSON: %s" % (p, e)) from None
    if not isinstance(data, dict):
        raise ValueError("%s holds a %s, not a dict with physical_to_logical_map or logical_count"
                         % (p, type(data).__name__))
    return data


def load(path: PathLike) -> PlacementFile:
    """Read a placement file (SGLang ``.json``/``.pt``, or vLLM maps JSON).

    Returns a :class:`PlacementFile` saying what it holds: a mapping (its
    maps) or load counts.  Raises ValueError naming what is wrong (shapes,
    entries, vLLM maps that disagree with each other).
    """
    p = os.fspath(path)
    data = _read(p)
    if "physical_to_logical_map" in data:
        p2l = _as_int64(data["physical_to_logical_map"], "physical_to_logical_map")
        if p2l.ndim != 2 or p2l.shape[1] == 0:
            raise ValueError("%s: physical_to_logical_map must be [layers, physical], got shape %s"
                             % (p, p2l.shape))
        if p2l.size and p2l.min() < -1:
            raise ValueError("%s: physical_to_logical_map holds %d (entries are -1 or an expert id)"
                             % (p, int(p2l.min())))
        vllm = "logical_replica_count" in data or "logical_to_physical_map" in data
        meta = {k: v for k, v in data.items() if not isinstance(v, (list, dict)) and not hasattr(v, "shape")}
        if not vllm:
            if p2l.size and p2l.min() < 0:
                raise ValueError("%s: an SGLang physical_to_logical_map has no empty slots (-1)" % p)
            return PlacementFile(kind="mapping", format="sglang", physical_to_logical=p2l, meta=meta)
        cnt = _as_int64(data.get("logical_replica_count"), "logical_replica_count")
        n = int(data.get("num_logical_experts") or (cnt.shape[1] if cnt.ndim == 2 else 0))
        L = p2l.shape[0]
        if cnt.shape != (L, n):
            raise ValueError("%s: logical_replica_count has shape %s, expected (%d, %d)" % (p, cnt.shape, L, n))
        if p2l.max(initial=-1) >= n:
            raise ValueError("%s: physical_to_logical_map names expert %d >= num_logical_experts %d"
                             % (p, int(p2l.max()), n))
        derived = Placement.from_arrays(p2l, n).logical_replica_count
        if not np.array_equal(derived, cnt):
            layer, expert = (int(x) for x in np.argwhere(derived != cnt)[0])
            raise ValueError("%s: logical_replica_count[%d][%d] = %d but physical_to_logical_map holds expert %d "
                             "%d time(s) in layer %d" % (p, layer, expert, cnt[layer, expert], expert,
                                                         derived[layer, expert], layer))
        l2p = None
        if "logical_to_physical_map" in data:
            l2p = _as_int64(data["logical_to_physical_map"], "logical_to_physical_map")
            if l2p.ndim != 3 or l2p.shape[:2] != (L, n):
                raise ValueError("%s: logical_to_physical_map has shape %s, expected (%d, %d, R)"
                                 % (p, l2p.shape, L, n))
            want = logical_to_physical_from(p2l, n, max(l2p.shape[2], int(cnt.max(initial=0))))[:, :, :l2p.shape[2]]
            if not np.array_equal(want, l2p):
                layer, expert, _ = (int(x) for x in np.argwhere(want != l2p)[0])
                raise ValueError("%s: logical_to_physical_map[%d][%d] = %s disagrees with physical_to_logical_map "
                                 "(%s)" % (p, layer, expert, l2p[layer, expert].tolist(),
                                           want[layer, expert].tolist()))
        return PlacementFile(kind="mapping", format="vllm", physical_to_logical=p2l, logical_to_physical=l2p,
                             logical_replica_count=cnt, num_logical_experts=n, meta=meta)
    if "logical_count" in data:
        lc = _as_int64(data["logical_count"], "logical_count")
        if lc.ndim == 3:
            lc = lc.sum(axis=0)
        if lc.ndim != 2 or lc.shape[1] == 0:
            raise ValueError("%s: logical_count must be [layers, logical] or [k, layers, logical], got shape %s"
                             % (p, lc.shape))
        if lc.size and lc.min() < 0:
            raise ValueError("%s: logical_count holds a negative count (%d)" % (p, int(lc.min())))
        return PlacementFile(kind="load", format="sglang", logical_count=lc, num_logical_experts=lc.shape[1])
    raise ValueError("%s has neither physical_to_logical_map nor logical_count (keys: %s)"
                     % (p, ", ".join(sorted(map(str, data))) or "none"))


# ---- applying ----------------------------------------------------------------------


def apply(client: "Client", model_id: str, f: Union[PlacementFile, PathLike], *,
          expected_epoch: Optional[int] = None,
          timeout: Optional[float] = None) -> Union[Placement, "RebalanceResult"]:
    """Give a placement file to eplbd for ``model_id``.

    A mapping becomes ``SetupFromMapping`` with the model's current shape
    (``num_physical_experts`` = ``old_num_physical_experts`` = its P, its
    ep_size): the server serves that map from epoch + 1; returns the committed
    :class:`Placement`.  Load counts become ``Rebalance(logical_load=...)``;
    returns its :class:`RebalanceResult`.  ``expected_epoch`` defaults to the
    epoch read just before, so a change in between is ABORTED, not overwritten.

    Raises ValueError when the file's shape is not the model's (nothing is
    sent), and the call's :class:`eplb.EplbError` when the server refuses it.
    """
    pf = f if isinstance(f, PlacementFile) else load(f)
    cur = client.get_placement(model_id, timeout=timeout)
    epoch = cur.epoch if expected_epoch is None else expected_epoch
    L, P, N = cur.num_layers, cur.num_physical_experts, cur.num_logical_experts
    if pf.kind == "load":
        lc = pf.logical_count
        assert lc is not None
        if lc.shape != (L, N):
            raise ValueError("logical_count is [%d, %d] but model %s has %d layers x %d logical experts"
                             % (lc.shape[0], lc.shape[1], model_id, L, N))
        return client.rebalance(model_id, logical_load=lc, expected_epoch=epoch, timeout=timeout)
    p2l = pf.physical_to_logical
    assert p2l is not None
    if p2l.shape != (L, P):
        raise ValueError("physical_to_logical_map is [%d, %d] but model %s has %d layers x %d slots "
                         "(a file applies at the model's own shape)" % (p2l.shape[0], p2l.shape[1], model_id, L, P))
    if pf.num_logical_experts and pf.num_logical_experts != N:
        raise ValueError("the file has %d logical experts, model %s has %d" % (pf.num_logical_experts, model_id, N))
    ep = [m.ep_size for m in client.list_models(timeout=timeout) if m.model_id == model_id]
    if not ep:
        raise ValueError("model %s is not listed" % model_id)
    return client.setup_from_mapping(model_id, p2l, old_num_physical_experts=P, ep_size=ep[0],
                                     expected_epoch=epoch, timeout=timeout)
