"""Transfer plans of engine-executed rebalances (``execution="engine"``).

eplbd computes the placement and, per EP rank, a plan of steps: local
copies, sends and receives (docs/api.md, protos/eplb/v1/eplb.proto).  These
are plain dataclasses of those messages (no torch), built from the protos
with ``from_proto``; :func:`eplb.torch_exec.execute_plan` runs one rank's
plan with torch.distributed and accepts either form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from ._proto.eplb.v1 import eplb_pb2

__all__ = ["TransferOp", "TransferStep", "RankTransferPlan", "TransferPlan", "AbortResult", "simulate_plan",
           "PlanMismatch", "COPY", "SEND", "RECV", "as_rank_plan"]

COPY, SEND, RECV = "copy", "send", "recv"
_KIND_NAMES = {eplb_pb2.TRANSFER_OP_COPY: COPY, eplb_pb2.TRANSFER_OP_SEND: SEND, eplb_pb2.TRANSFER_OP_RECV: RECV}
_KIND_VALUES = {v: k for k, v in _KIND_NAMES.items()}


@dataclass(frozen=True)
class TransferOp:
    """One op of a step: ``kind`` "copy" (src -> dst on this rank), "send"
    (src -> ``peer_rank``) or "recv" (``peer_rank`` -> dst).  ``src`` / ``dst``
    are local slot indices [0, num_local_physical_experts), or staging
    entries [0, max_staging_slots) when ``src_staging`` / ``dst_staging``.
    ``tag`` pairs a send with its receive (unique per step and pair of ranks);
    ``expert`` is the logical expert whose bytes move."""

    kind: str
    src: int = 0
    src_staging: bool = False
    dst: int = 0
    dst_staging: bool = False
    peer_rank: int = 0
    expert: int = -1
    tag: int = 0
    cross_node: bool = False

    @classmethod
    def from_proto(cls, m: "eplb_pb2.TransferOp") -> "TransferOp":
        return cls(kind=_KIND_NAMES.get(m.kind, str(m.kind)), src=m.src, src_staging=m.src_staging, dst=m.dst,
                   dst_staging=m.dst_staging, peer_rank=m.peer_rank, expert=m.expert, tag=m.tag,
                   cross_node=m.cross_node)

    def to_proto(self) -> "eplb_pb2.TransferOp":
        return eplb_pb2.TransferOp(kind=_KIND_VALUES[self.kind], src=self.src, src_staging=self.src_staging,
                                   dst=self.dst, dst_staging=self.dst_staging, peer_rank=self.peer_rank,
                                   expert=self.expert, tag=self.tag, cross_node=self.cross_node)


@dataclass(frozen=True)
class TransferStep:
    """The ops of one layer (one chunk of it) that may run at once."""

    layer: int
    chunk: int = 0
    ops: List[TransferOp] = field(default_factory=list)

    @classmethod
    def from_proto(cls, m: "eplb_pb2.TransferStep") -> "TransferStep":
        return cls(layer=m.layer, chunk=m.chunk, ops=[TransferOp.from_proto(o) for o in m.ops])

    def to_proto(self) -> "eplb_pb2.TransferStep":
        return eplb_pb2.TransferStep(layer=self.layer, chunk=self.chunk, ops=[o.to_proto() for o in self.ops])


@dataclass(frozen=True)
class RankTransferPlan:
    """One EP rank's plan: every step of the rebalance (the same count and
    order on every rank, empty ones too), the staging entries it needs, and
    what it sends / receives (slots; ``slots_cross_node`` = sent + received
    across nodes)."""

    rank: int
    steps: List[TransferStep] = field(default_factory=list)
    max_staging_slots: int = 0
    slots_sent: int = 0
    slots_received: int = 0
    slots_cross_node: int = 0

    @classmethod
    def from_proto(cls, m: "eplb_pb2.RankTransferPlan") -> "RankTransferPlan":
        return cls(rank=m.rank, steps=[TransferStep.from_proto(s) for s in m.steps],
                   max_staging_slots=m.max_staging_slots, slots_sent=m.slots_sent,
                   slots_received=m.slots_received, slots_cross_node=m.slots_cross_node)

    def to_proto(self) -> "eplb_pb2.RankTransferPlan":
        return eplb_pb2.RankTransferPlan(rank=self.rank, steps=[s.to_proto() for s in self.steps],
                                         max_staging_slots=self.max_staging_slots, slots_sent=self.slots_sent,
                                         slots_received=self.slots_received,
                                         slots_cross_node=self.slots_cross_node)


@dataclass(frozen=True)
class TransferPlan:
    """A rebalance's plan (GetTransferPlan answers it with one rank's part in
    ``ranks``; RebalanceResponse.transfer_plan with every rank's)."""

    model_id: str
    rebalance_id: str
    base_epoch: int
    num_ranks: int
    ranks_per_node: int
    num_local_physical_experts: int
    layers: List[int]
    num_steps: int
    ranks: List[RankTransferPlan]
    expert_bytes: int = 0
    copies_cross_gpu: int = 0
    copies_cross_node: int = 0

    @classmethod
    def from_proto(cls, m: "eplb_pb2.TransferPlan") -> "TransferPlan":
        return cls(model_id=m.model_id, rebalance_id=m.rebalance_id, base_epoch=m.base_epoch,
                   num_ranks=m.num_ranks, ranks_per_node=m.ranks_per_node,
                   num_local_physical_experts=m.num_local_physical_experts, layers=list(m.layers),
                   num_steps=m.num_steps, ranks=[RankTransferPlan.from_proto(r) for r in m.ranks],
                   expert_bytes=m.expert_bytes, copies_cross_gpu=m.copies_cross_gpu,
                   copies_cross_node=m.copies_cross_node)

    def to_proto(self) -> "eplb_pb2.TransferPlan":
        return eplb_pb2.TransferPlan(model_id=self.model_id, rebalance_id=self.rebalance_id,
                                     base_epoch=self.base_epoch, num_ranks=self.num_ranks,
                                     ranks_per_node=self.ranks_per_node,
                                     num_local_physical_experts=self.num_local_physical_experts,
                                     layers=self.layers, num_steps=self.num_steps,
                                     ranks=[r.to_proto() for r in self.ranks], expert_bytes=self.expert_bytes,
                                     copies_cross_gpu=self.copies_cross_gpu,
                                     copies_cross_node=self.copies_cross_node)

    def rank_plan(self, rank: int) -> RankTransferPlan:
        """The part of EP rank ``rank`` (KeyError when the plan does not hold it)."""
        for r in self.ranks:
            if r.rank == rank:
                return r
        raise KeyError("the plan holds no part for rank %d (it has %s)" % (rank, [r.rank for r in self.ranks]))


@dataclass
class AbortResult:
    """AbortRebalance's answer: the model's epoch and state after the abort
    (``needs_weight_reload`` when bytes were touched)."""

    epoch: int
    state: str
    needs_weight_reload: bool


PlanLike = Union[RankTransferPlan, TransferPlan, "eplb_pb2.RankTransferPlan", "eplb_pb2.TransferPlan"]


def as_rank_plan(plan: Any, rank: Optional[int] = None) -> RankTransferPlan:
    """A :class:`RankTransferPlan` from one rank's plan or a whole plan (proto
    or dataclass); from a whole plan, ``rank``'s part."""
    if isinstance(plan, eplb_pb2.RankTransferPlan):
        plan = RankTransferPlan.from_proto(plan)
    elif isinstance(plan, eplb_pb2.TransferPlan):
        plan = TransferPlan.from_proto(plan)
    if isinstance(plan, TransferPlan):
        if rank is None:
            if len(plan.ranks) != 1:
                raise ValueError("a whole plan of %d ranks: say which rank" % len(plan.ranks))
            return plan.ranks[0]
        return plan.rank_plan(rank)
    if isinstance(plan, RankTransferPlan):
        if rank is not None and plan.rank != rank:
            raise ValueError("the plan is rank %d's, not rank %d's" % (plan.rank, rank))
        return plan
    raise TypeError("plan must be a (Rank)TransferPlan message or dataclass, got %s" % type(plan).__name__)


class PlanMismatch(ValueError):
    """:func:`simulate_plan` found a plan that does not do what it says: a
    send without its receive, an op whose ``expert`` is not what it moves."""


def simulate_plan(plan: Any, physical_to_logical: Any) -> Any:
    """Run a whole plan (every rank's part) on expert ids instead of bytes, in
    :func:`eplb.torch_exec.execute_plan`'s order, and return the
    physical-to-logical map [L, P] (numpy int64) the slots hold afterwards.

    ``physical_to_logical``: the map the plan starts from (its base_epoch's).
    Each rank's part is checked first as execute_plan checks it
    (:class:`eplb.torch_exec.PlanError`); then every SEND must meet exactly
    one RECV of its peer in the same step with the same tag, and every op's
    ``expert`` must be the expert it moves (:class:`PlanMismatch`).  No
    torch needed: for tests, and to check a plan before running it."""
    import numpy as np

    from .torch_exec import validate_rank_plan

    if isinstance(plan, eplb_pb2.TransferPlan):
        plan = TransferPlan.from_proto(plan)
    cur = np.array(physical_to_logical, dtype=np.int64, copy=True)
    L, P = cur.shape
    R = plan.num_ranks
    S = plan.num_local_physical_experts or P // max(R, 1)
    if R * S != P:
        raise ValueError("the plan has %d ranks x %d slots, the map %d slots" % (R, S, P))
    ranks = {r.rank: r for r in plan.ranks}
    if sorted(ranks) != list(range(R)):
        raise ValueError("simulate_plan needs every rank's part, the plan has %s" % sorted(ranks))
    for r in ranks.values():
        validate_rank_plan(r, S, R, num_layers=L, rank=r.rank)
    nsteps = {len(r.steps) for r in ranks.values()}
    if len(nsteps) != 1:
        raise PlanMismatch("ranks have different step counts: %s" % sorted(nsteps))
    staging = {r: {} for r in range(R)}
    for i in range(nsteps.pop()):
        steps = [ranks[r].steps[i] for r in range(R)]
        layers = {s.layer for s in steps if s.ops}
        if len(layers) > 1:
            raise PlanMismatch("step %d: ranks move different layers %s" % (i, sorted(layers)))
        if not layers:
            continue
        layer = layers.pop()
        row = cur[layer]

        def read(r: int, stg: bool, idx: int, what: str) -> int:
            if stg:
                if idx not in staging[r]:
                    raise PlanMismatch("%s: rank %d reads staging %d, never written" % (what, r, idx))
                return staging[r][idx]
            return int(row[r * S + idx])

        for r in range(R):  # (1) into staging
            for j, op in enumerate(steps[r].ops):
                if op.kind == COPY and op.dst_staging:
                    v = read(r, op.src_staging, op.src, "step %d rank %d op %d" % (i, r, j))
                    if op.expert >= 0 and v != op.expert:
                        raise PlanMismatch("step %d rank %d op %d: stages expert %d, says %d"
                                           % (i, r, j, v, op.expert))
                    staging[r][op.dst] = v
        sends, recvs = {}, {}
        for r in range(R):  # (2) the batch: reads, then writes
            for j, op in enumerate(steps[r].ops):
                if op.kind == SEND:
                    v = read(r, op.src_staging, op.src, "step %d rank %d op %d" % (i, r, j))
                    if op.expert >= 0 and v != op.expert:
                        raise PlanMismatch("step %d rank %d op %d: sends expert %d, says %d"
                                           % (i, r, j, v, op.expert))
                    sends[(r, op.peer_rank, op.tag)] = (v, op.cross_node)
                elif op.kind == RECV:
                    recvs[(op.peer_rank, r, op.tag)] = op
        if set(sends) != set(recvs):
            odd = sorted(set(sends) ^ set(recvs))[0]
            raise PlanMismatch("step %d (layer %d): (from, to, tag) %s has no %s" %
                               (i, layer, odd, "receive" if odd in sends else "send"))
        for key, op in recvs.items():
            v, xnode = sends[key]
            if op.expert >= 0 and v != op.expert:
                raise PlanMismatch("step %d: rank %d receives expert %d from rank %d, says %d"
                                   % (i, key[1], v, key[0], op.expert))
            if op.dst_staging:
                staging[key[1]][op.dst] = v
            else:
                row[key[1] * S + op.dst] = v
        for r in range(R):  # (3) copies into slots, in order
            for j, op in enumerate(steps[r].ops):
                if op.kind == COPY and not op.dst_staging:
                    v = read(r, op.src_staging, op.src, "step %d rank %d op %d" % (i, r, j))
                    if op.expert >= 0 and v != op.expert:
                        raise PlanMismatch("step %d rank %d op %d: copies expert %d, says %d"
                                           % (i, r, j, v, op.expert))
                    row[r * S + op.dst] = v
    return cur
