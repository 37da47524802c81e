"""Placements as vLLM's EplbState holds them.

A :class:`Placement` is what GetPlacement, Rebalance, ContinueRebalance and
SetupFromMapping answer.  ``to_numpy()`` / ``to_torch()`` give exactly the
shapes and dtypes of vLLM's ``EplbState`` (int64):

- ``physical_to_logical_map`` [L, P] (-1 = an empty slot),
- ``logical_to_physical_map`` [L, N, R], ascending slots, padded with -1,
  R = ``num_redundant_experts + 1`` = P - N + 1 as vLLM sizes it,
- ``logical_replica_count`` [L, N].

``install_into()`` copies them into tensors the engine already holds
(``Tensor.copy_``), so addresses captured by CUDA graphs stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ._proto.eplb.v1 import eplb_pb2

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Placement", "EplbMaps", "MAP_NAMES", "logical_to_physical_from"]

MAP_NAMES = ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")


class EplbMaps(NamedTuple):
    """The three maps of vLLM's EplbState (numpy int64 arrays or torch int64 tensors)."""

    physical_to_logical_map: Any
    logical_to_physical_map: Any
    logical_replica_count: Any


def logical_to_physical_from(phy2log: np.ndarray, num_logical: int, max_replicas: int) -> np.ndarray:
    """[L, N, max_replicas] int64: each logical expert's slots in ascending order, -1 padded.

    Raises ValueError when an expert has more than ``max_replicas`` replicas.
    """
    phy2log = np.asarray(phy2log, dtype=np.int64)
    L, P = phy2log.shape
    out = np.full((L, num_logical, max_replicas), -1, dtype=np.int64)
    valid = phy2log >= 0
    if np.any(phy2log >= num_logical):
        raise ValueError("physical_to_logical names expert %d >= num_logical_experts %d"
                         % (int(phy2log.max()), num_logical))
    # Sort each row's slots by (expert, slot): a stable sort of the expert ids.
    key = np.where(valid, phy2log, num_logical)
    order = np.argsort(key, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(key, order, axis=1)
    # rank of each entry within its expert's run
    counts = np.zeros((L, num_logical + 1), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(L), P), key.ravel()), 1)
    if counts[:, :num_logical].size and counts[:, :num_logical].max(initial=0) > max_replicas:
        raise ValueError("an expert has %d replicas, more than max_replicas %d"
                         % (int(counts[:, :num_logical].max()), max_replicas))
    starts = np.cumsum(counts, axis=1) - counts
    rank = np.arange(P)[None, :] - np.take_along_axis(starts, sorted_ids, axis=1)
    keep = sorted_ids < num_logical
    li, pi = np.nonzero(keep)
    out[li, sorted_ids[li, pi], rank[li, pi]] = order[li, pi]
    return out


def _state_name(v: int) -> str:
    return eplb_pb2.MoveState.Name(v) if v in eplb_pb2.MoveState.values() else str(v)


@dataclass
class Placement:
    """One model's expert placement at one epoch (numpy int64 arrays).

    Attributes:
        model_id, epoch: the model and the epoch this placement was committed at.
        num_layers (L), num_physical_experts (P), num_logical_experts (N),
        num_valid_physical_experts: the shape (slots past the valid count are
            not counted for load after an elastic expand, until a rebalance).
        physical_to_logical: [L, P] int64, -1 = empty slot.
        logical_replica_count: [L, N] int64.
        logical_to_physical: [L, N, max_replicas] int64 as the server sent it
            (only when asked for), else None (derived on demand).
        state: the move state name ("MOVE_STATE_IDLE", ...); state_reason,
            needs_weight_reload: why the weights must be reloaded.
        pending_rebalance_id, pending_layers_done: a stepped rebalance in progress.
        pending_execution: who executes the pending rebalance: "server" (a
            stepped one), "engine" (a transfer plan awaits the engine's
            commit or abort), "" when none is pending.
    """

    model_id: str
    epoch: int
    num_layers: int
    num_physical_experts: int
    num_logical_experts: int
    physical_to_logical: np.ndarray
    logical_replica_count: np.ndarray
    num_valid_physical_experts: int = 0
    logical_to_physical: Optional[np.ndarray] = None
    max_replicas: int = 0
    state: str = "MOVE_STATE_IDLE"
    state_reason: str = ""
    needs_weight_reload: bool = False
    pending_rebalance_id: str = ""
    pending_layers_done: int = 0
    pending_execution: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------

    @classmethod
    def from_proto(cls, msg: "eplb_pb2.Placement") -> "Placement":
        """From an ``eplb.v1.Placement`` message."""
        L, P, N = msg.num_layers, msg.num_physical_experts, msg.num_logical_experts
        p2l = np.array(msg.physical_to_logical, dtype=np.int64).reshape(L, P)
        cnt = np.array(msg.logical_replica_count, dtype=np.int64).reshape(L, N)
        l2p = None
        if len(msg.logical_to_physical):
            l2p = np.array(msg.logical_to_physical, dtype=np.int64).reshape(L, N, msg.max_replicas)
        return cls(model_id=msg.model_id, epoch=msg.epoch, num_layers=L, num_physical_experts=P,
                   num_logical_experts=N, physical_to_logical=p2l, logical_replica_count=cnt,
                   num_valid_physical_experts=msg.num_valid_physical_experts or P,
                   logical_to_physical=l2p, max_replicas=msg.max_replicas,
                   state=_state_name(msg.state), state_reason=msg.state_reason,
                   needs_weight_reload=msg.needs_weight_reload,
                   pending_rebalance_id=msg.pending_rebalance_id,
                   pending_layers_done=msg.pending_layers_done,
                   pending_execution=("engine" if msg.pending_execution == eplb_pb2.EXECUTION_ENGINE
                                      else "server" if msg.pending_rebalance_id else ""))

    @classmethod
    def from_arrays(cls, physical_to_logical: Any, num_logical_experts: int, *, model_id: str = "",
                    epoch: int = 0) -> "Placement":
        """From a [L, P] physical-to-logical map (numpy, torch or nested lists);
        replica counts are derived.  For placements read from files or built by hand."""
        p2l = _as_numpy(physical_to_logical).astype(np.int64, copy=True)
        if p2l.ndim != 2:
            raise ValueError("physical_to_logical must be [layers, physical], got shape %s" % (p2l.shape,))
        L, P = p2l.shape
        if p2l.size and (p2l.min() < -1 or p2l.max() >= num_logical_experts):
            raise ValueError("physical_to_logical entries must be -1 or in [0, %d)" % num_logical_experts)
        cnt = np.zeros((L, num_logical_experts), dtype=np.int64)
        li, pi = np.nonzero(p2l >= 0)
        np.add.at(cnt, (li, p2l[li, pi]), 1)
        return cls(model_id=model_id, epoch=epoch, num_layers=L, num_physical_experts=P,
                   num_logical_experts=num_logical_experts, physical_to_logical=p2l,
                   logical_replica_count=cnt, num_valid_physical_experts=P,
                   max_replicas=int(cnt.max(initial=0)))

    # ---- views ----------------------------------------------------------------

    @property
    def num_redundant_experts(self) -> int:
        """P - N (vLLM's num_redundant_experts)."""
        return self.num_physical_experts - self.num_logical_experts

    def to_numpy(self, max_replicas: Optional[int] = None) -> EplbMaps:
        """vLLM's three maps as int64 numpy arrays (copies).

        ``max_replicas`` is R of ``logical_to_physical_map`` [L, N, R];
        default ``num_redundant_experts + 1`` as vLLM sizes it.
        """
        R = self.num_redundant_experts + 1 if max_replicas is None else max_replicas
        if self.logical_to_physical is not None:
            X = self.logical_to_physical.shape[2]
            if X <= R:
                l2p = np.full((self.num_layers, self.num_logical_experts, R), -1, dtype=np.int64)
                l2p[:, :, :X] = self.logical_to_physical
            elif np.all(self.logical_to_physical[:, :, R:] == -1):
                l2p = self.logical_to_physical[:, :, :R].copy()
            else:
                raise ValueError("an expert has more than %d replicas" % R)
        else:
            l2p = logical_to_physical_from(self.physical_to_logical, self.num_logical_experts, R)
        return EplbMaps(self.physical_to_logical.copy(), l2p, self.logical_replica_count.copy())

    def to_torch(self, device: Any = None, max_replicas: Optional[int] = None) -> EplbMaps:
        """vLLM's three maps as torch.int64 tensors on ``device`` (default CPU)."""
        import torch

        return EplbMaps(*(torch.from_numpy(a).to(device) for a in self.to_numpy(max_replicas)))

    def install_into(self, tensors: Any, layers: Optional[Iterable[int]] = None) -> None:
        """Copy the maps into existing tensors in place.

        ``tensors``: a mapping or an object (vLLM's EplbState or a model state)
        with ``physical_to_logical_map`` [L, P], ``logical_to_physical_map``
        [L, N, R] and ``logical_replica_count`` [L, N] (torch tensors or numpy
        arrays, any device).  R may be anything >= the largest replica count:
        the rows are -1 padded to it.  ``layers``: only these rows (the
        ``layers_moved`` of a stepped rebalance); default all.

        Raises ValueError naming the tensor when a shape is wrong; nothing is
        written then.
        """
        dst = [_get(tensors, n) for n in MAP_NAMES]
        L, P, N = self.num_layers, self.num_physical_experts, self.num_logical_experts
        want = {"physical_to_logical_map": (L, P), "logical_replica_count": (L, N)}
        for name, t in zip(MAP_NAMES, dst):
            shape = tuple(t.shape)
            if name == "logical_to_physical_map":
                if len(shape) != 3 or shape[:2] != (L, N):
                    raise ValueError("logical_to_physical_map has shape %s, expected (%d, %d, R)" % (shape, L, N))
            elif shape != want[name]:
                raise ValueError("%s has shape %s, expected %s" % (name, shape, want[name]))
        R = tuple(dst[1].shape)[2]
        need = int(self.logical_replica_count.max(initial=0))
        if need > R:
            raise ValueError("logical_to_physical_map has R = %d, but an expert has %d replicas" % (R, need))
        src = self.to_numpy(max_replicas=R)
        rows = None if layers is None else np.array(sorted(set(int(x) for x in layers)), dtype=np.int64)
        if rows is not None and rows.size and (rows.min() < 0 or rows.max() >= L):
            raise ValueError("layers must be in [0, %d)" % L)
        for t, a in zip(dst, src):
            _copy_rows(t, a, rows)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict (lists), the shape a placement file can hold."""
        return {"model_id": self.model_id, "epoch": self.epoch, "num_layers": self.num_layers,
                "num_physical_experts": self.num_physical_experts,
                "num_logical_experts": self.num_logical_experts,
                "physical_to_logical": self.physical_to_logical.tolist(),
                "logical_replica_count": self.logical_replica_count.tolist()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (self.model_id == other.model_id and self.epoch == other.epoch
                and np.array_equal(self.physical_to_logical, other.physical_to_logical)
                and np.array_equal(self.logical_replica_count, other.logical_replica_count))

    def __repr__(self) -> str:
        return ("Placement(model_id=%r, epoch=%d, L=%d, P=%d, N=%d, state=%s%s)"
                % (self.model_id, self.epoch, self.num_layers, self.num_physical_experts,
                   self.num_logical_experts, self.state,
                   ", pending=%s" % self.pending_rebalance_id if self.pending_rebalance_id else ""))


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        if name not in obj:
            raise ValueError("no %s to install into" % name)
        return obj[name]
    if not hasattr(obj, name):
        raise ValueError("no %s to install into" % name)
    return getattr(obj, name)


def _copy_rows(dst: Any, src: np.ndarray, rows: Optional[np.ndarray]) -> None:
    if isinstance(dst, np.ndarray):
        if rows is None:
            dst[...] = src
        else:
            dst[rows] = src[rows]
        return
    import torch

    s = torch.from_numpy(src)
    if rows is None:
        dst.copy_(s)
    else:
        for r in rows.tolist():  # per row: copy_ into a view, the storage stays
            dst[r].copy_(s[r])


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_int64_list(x: Any, shape: Optional[Sequence[int]] = None, what: str = "array") -> list:
    a = _as_numpy(x)
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError("%s has shape %s, expected %s" % (what, tuple(a.shape), tuple(shape)))
    return a.astype(np.int64, copy=False).ravel().tolist()
