"""Engine-executed rebalances with torch.distributed.

eplbd is the planner and the source of truth; the engine's own
communicator moves the bytes (NCCL / RCCL on GPUs, gloo on CPU):

- :func:`execute_plan` runs one EP rank's :class:`eplb.transfer.RankTransferPlan`
  on that rank's expert tensors with batched point-to-point ops
  (``dist.P2POp`` + ``dist.batch_isend_irecv``, as vLLM's and SGLang's
  movers do) and local copies.
- :class:`EngineRebalancer` drives the whole protocol on every rank:
  Rebalance(execution="engine") on rank 0, the rebalance id broadcast, every
  rank fetches and runs its plan, a barrier (all-reduce of failures and bytes
  touched), then rank 0 commits -- or aborts with the bytes touched -- and
  every rank installs the maps rank 0 broadcasts.

A step runs as: (1) the copies into staging (the old contents a step still
needs), (2) one batch of every send (reading slots or staging) and receive
(writing slots or staging), waited for, (3) the copies into slots, in plan
order.  A plan whose step would read a slot after that step writes it under
this order is refused before anything moves (:class:`PlanError`).

Bytes touched: bytes written into live slots (not staging) so far, counted
when a receive into a slot is posted and when a copy into a slot is made:
what AbortRebalance needs to know whether the weights still match the old
map.  A peer that dies mid-plan surfaces as an exception from the
process group (gloo: at once when the connection drops, else after the
group's ``timeout``; NCCL: with ``NCCL_ASYNC_ERROR_HANDLING=1`` /
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` and the group's timeout).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import EplbError
from .transfer import COPY, RECV, SEND, RankTransferPlan, TransferStep, as_rank_plan

__all__ = ["execute_plan", "validate_rank_plan", "ExecStats", "StagingPool", "PlanError",
           "PlanExecutionError", "EngineRebalancer", "EngineRebalanceError", "EngineRebalanceOutcome"]

logger = logging.getLogger("eplb")


class PlanError(ValueError):
    """The plan cannot run on these tensors (out-of-range slots, a hazard
    within a step, a peer that is this rank...).  Raised before anything
    moves: nothing is touched."""


class PlanExecutionError(RuntimeError):
    """A step failed part-way (a peer died, a timeout, a backend error).

    ``bytes_touched``: bytes this rank wrote into live slots before the
    failure (what AbortRebalance needs); ``step`` / ``layer``: where it
    failed; ``stats``: what had been done; ``__cause__``: the backend's error.
    """

    def __init__(self, message: str, *, rank: int, step: int, layer: int, bytes_touched: int,
                 stats: "ExecStats") -> None:
        super().__init__(message)
        self.rank = rank
        self.step = step
        self.layer = layer
        self.bytes_touched = bytes_touched
        self.stats = stats


@dataclass
class ExecStats:
    """What :func:`execute_plan` did on one rank (bytes of all tensors)."""

    rank: int
    steps: int = 0
    steps_done: int = 0
    copies: int = 0
    sends: int = 0
    recvs: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_sent_cross_node: int = 0
    bytes_received_cross_node: int = 0
    bytes_copied: int = 0          # local copies (into slots or staging)
    bytes_staged: int = 0          # of those, into staging
    bytes_touched: int = 0         # written into live slots (receives posted + copies made)
    elapsed_s: float = 0.0
    p2p_s: float = 0.0             # waiting for the batches

    @property
    def bytes_cross_node(self) -> int:
        """Bytes sent plus received across nodes (the plan's ``cross_node`` ops)."""
        return self.bytes_sent_cross_node + self.bytes_received_cross_node


class StagingPool:
    """Staging buffers, one per (tensor index within a layer, expert shape,
    dtype, device), each [entries, *expert shape]; grown when a plan needs
    more entries, reused across layers, steps and calls."""

    def __init__(self) -> None:
        self._bufs: Dict[Tuple[Any, ...], Any] = {}

    def get(self, index: int, like: Any, entries: int) -> Any:
        import torch

        key = (index, tuple(like.shape[1:]), like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < entries:
            buf = torch.empty((max(entries, 1),) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
            self._bufs[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()


def _expert_nbytes(t: Any) -> int:
    return (t.numel() // max(t.shape[0], 1)) * t.element_size() if t.shape[0] else 0


def validate_rank_plan(plan: Any, num_local: int, num_ranks: Optional[int] = None, *,
                       num_layers: Optional[int] = None, rank: Optional[int] = None) -> RankTransferPlan:
    """Check one rank's plan against the executor's order (module docstring);
    raise :class:`PlanError` naming the step and op, else return the plan."""
    rp = as_rank_plan(plan, rank)
    me = rp.rank
    nst = rp.max_staging_slots
    for i, step in enumerate(rp.steps):
        where = "step %d (layer %d, chunk %d)" % (i, step.layer, step.chunk)
        if num_layers is not None and not 0 <= step.layer < num_layers:
            raise PlanError("%s: layer %d, the tensors have %d layers" % (where, step.layer, num_layers))
        written_p2p = set()     # ("slot"/"stg", index) written by receives
        read_p2p = set()        # read by sends
        staged_writes = set()   # staging entries written in phase 1
        tags = set()
        for j, op in enumerate(step.ops):
            w = "%s op %d (%s)" % (where, j, op.kind)
            if op.kind not in (COPY, SEND, RECV):
                raise PlanError("%s: unknown kind" % w)
            if op.kind in (COPY, SEND):
                lim = nst if op.src_staging else num_local
                if not 0 <= op.src < lim:
                    raise PlanError("%s: src %s %d out of [0, %d)" % (w, "staging" if op.src_staging else "slot",
                                                                      op.src, lim))
            if op.kind in (COPY, RECV):
                lim = nst if op.dst_staging else num_local
                if not 0 <= op.dst < lim:
                    raise PlanError("%s: dst %s %d out of [0, %d)" % (w, "staging" if op.dst_staging else "slot",
                                                                      op.dst, lim))
            if op.kind in (SEND, RECV):
                if op.peer_rank == me:
                    raise PlanError("%s: peer_rank is this rank %d" % (w, me))
                if num_ranks is not None and not 0 <= op.peer_rank < num_ranks:
                    raise PlanError("%s: peer_rank %d out of [0, %d)" % (w, op.peer_rank, num_ranks))
                key = (op.kind, op.peer_rank, op.tag)
                if key in tags:
                    raise PlanError("%s: tag %d used twice with rank %d" % (w, op.tag, op.peer_rank))
                tags.add(key)
            src = ("stg" if op.src_staging else "slot", op.src)
            dst = ("stg" if op.dst_staging else "slot", op.dst)
            if op.kind == SEND:
                read_p2p.add(src)
            elif op.kind == RECV:
                if dst in written_p2p:
                    raise PlanError("%s: %s %d is received into twice" % (w, dst[0], dst[1]))
                written_p2p.add(dst)
            elif op.dst_staging:
                if op.src_staging and src in staged_writes:
                    raise PlanError("%s: staging %d is copied from in the step that stages it" % (w, op.src))
                staged_writes.add(dst)
        # Phase 2 reads and writes at once: a location both sent and received.
        both = read_p2p & written_p2p
        if both:
            k, n = sorted(both)[0]
            raise PlanError("%s: %s %d is both sent and received into in one step (its old contents "
                            "must be staged first)" % (where, k, n))
        # Phase 3 (copies into slots, in order) reads after phase 2 wrote.
        written = set(written_p2p)
        for j, op in enumerate(step.ops):
            if op.kind != COPY or op.dst_staging:
                continue
            src = ("stg" if op.src_staging else "slot", op.src)
            if src in written:
                raise PlanError("%s op %d (copy): reads %s %d after this step wrote it" % (where, j, src[0], src[1]))
            written.add(("slot", op.dst))
        # Staging read by sends / copies into slots must not be what this
        # step's receives overwrite (checked above for sends); phase 1 never
        # reads a slot a previous phase wrote: it runs first.
    return rp


def _global_ranks(group: Any, n: int, given: Optional[Sequence[int]]) -> List[int]:
    if given is not None:
        if len(given) < n:
            raise ValueError("global_ranks has %d entries, the plan names ranks up to %d" % (len(given), n - 1))
        return [int(x) for x in given]
    import torch.distributed as dist

    if group is None or group is dist.GroupMember.WORLD:
        return list(range(n))
    get = getattr(dist, "get_global_rank", None)
    if get is None:  # torch < 1.13
        from torch.distributed import distributed_c10d

        get = distributed_c10d._get_global_rank
    return [get(group, r) for r in range(n)]


def execute_plan(plan: Any, rank: int, expert_tensors: Sequence[Sequence[Any]], group: Any = None, *,
                 staging: Optional[StagingPool] = None, global_ranks: Optional[Sequence[int]] = None,
                 num_ranks: Optional[int] = None,
                 on_step: Optional[Callable[[int, TransferStep], None]] = None) -> ExecStats:
    """Run EP rank ``rank``'s part of a transfer plan.

    ``plan``: this rank's ``RankTransferPlan`` (proto message or
    :class:`eplb.transfer.RankTransferPlan`), or a whole ``TransferPlan``
    (GetTransferPlan's answer; this rank's part is taken).
    ``expert_tensors[layer]``: that layer's expert tensors on this rank, each
    [num_local_physical_experts, ...] (w13, w2, scales...; every tensor of an
    expert moves with it; a list, or a dict of name -> tensor).  ``group``: the EP process group (default: the
    world); the plan's peers are EP ranks, mapped to global ranks with
    ``dist.get_global_rank`` unless ``global_ranks`` (EP rank -> global rank)
    is given.  ``staging``: a :class:`StagingPool` to reuse across calls.
    ``on_step(i, step)``: called before each step (progress, tests).

    Returns :class:`ExecStats`.  Raises :class:`PlanError` before anything
    moves when the plan does not fit the tensors, and
    :class:`PlanExecutionError` (with ``bytes_touched``) when a step fails.
    """
    import torch
    import torch.distributed as dist

    t0 = time.monotonic()
    rp = as_rank_plan(plan, rank) if not isinstance(plan, RankTransferPlan) else plan
    if rp.rank != rank:
        raise PlanError("the plan is rank %d's, not rank %d's" % (rp.rank, rank))
    layers = [list(ts.values()) if isinstance(ts, dict) else list(ts) for ts in expert_tensors]
    num_local = None
    for li, ts in enumerate(layers):
        for ti, t in enumerate(ts):
            if t.dim() < 1:
                raise PlanError("expert_tensors[%d][%d] is a scalar" % (li, ti))
            if num_local is None:
                num_local = t.shape[0]
            elif t.shape[0] != num_local:
                raise PlanError("expert_tensors[%d][%d] has %d local experts, others %d"
                                % (li, ti, t.shape[0], num_local))
    used = {s.layer for s in rp.steps if s.ops}
    for li in used:
        if li < len(layers) and not layers[li]:
            raise PlanError("the plan moves layer %d, which has no tensors" % li)
    if num_ranks is None and dist.is_initialized():
        num_ranks = dist.get_world_size(group)
    validate_rank_plan(rp, num_local or 0, num_ranks, num_layers=len(layers), rank=rank)
    peers = {op.peer_rank for s in rp.steps for op in s.ops if op.kind != COPY}
    gr = _global_ranks(group, max(peers) + 1, global_ranks) if peers else []
    pool = staging if staging is not None else StagingPool()
    stats = ExecStats(rank=rank, steps=len(rp.steps))
    nst = rp.max_staging_slots

    for i, step in enumerate(rp.steps):
        if on_step is not None:
            on_step(i, step)
        if not step.ops:
            stats.steps_done += 1
            continue
        ts = layers[step.layer]
        stg = [pool.get(k, t, nst) for k, t in enumerate(ts)] if nst else []
        nbytes = [_expert_nbytes(t) for t in ts]
        per_expert = sum(nbytes)

        def loc(k: int, staging_: bool, idx: int) -> Any:
            return stg[k][idx] if staging_ else ts[k][idx]

        try:
            # (1) old contents this step still needs, into staging
            for op in step.ops:
                if op.kind == COPY and op.dst_staging:
                    for k in range(len(ts)):
                        stg[k][op.dst].copy_(loc(k, op.src_staging, op.src))
                    stats.copies += 1
                    stats.bytes_copied += per_expert
                    stats.bytes_staged += per_expert
            # (2) one batch of every send and receive, in (peer, tag) order on
            # both sides (NCCL matches a pair's messages in posted order)
            p2p = sorted((op for op in step.ops if op.kind != COPY), key=lambda o: (o.peer_rank, o.tag, o.kind))
            if p2p:
                ops, fixups = [], []
                ntensors = len(ts)
                for op in p2p:
                    peer = gr[op.peer_rank]
                    for k in range(ntensors):
                        tag = op.tag * ntensors + k
                        if op.kind == SEND:
                            v = loc(k, op.src_staging, op.src)
                            ops.append(dist.P2POp(dist.isend, v if v.is_contiguous() else v.contiguous(), peer,
                                                  group, tag))
                        else:
                            v = loc(k, op.dst_staging, op.dst)
                            if not v.is_contiguous():
                                tmp = torch.empty_like(v, memory_format=torch.contiguous_format)
                                fixups.append((v, tmp))
                                v = tmp
                            ops.append(dist.P2POp(dist.irecv, v, peer, group, tag))
                    if op.kind == SEND:
                        stats.sends += 1
                        stats.bytes_sent += per_expert
                        if op.cross_node:
                            stats.bytes_sent_cross_node += per_expert
                    else:
                        stats.recvs += 1
                        stats.bytes_received += per_expert
                        if op.cross_node:
                            stats.bytes_received_cross_node += per_expert
                        if not op.dst_staging:
                            stats.bytes_touched += per_expert  # may be partly written from now on
                tp = time.monotonic()
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
                for v, tmp in fixups:
                    v.copy_(tmp)
                stats.p2p_s += time.monotonic() - tp
            # (3) copies into slots, in plan order
            for op in step.ops:
                if op.kind == COPY and not op.dst_staging:
                    stats.bytes_touched += per_expert
                    for k in range(len(ts)):
                        ts[k][op.dst].copy_(loc(k, op.src_staging, op.src))
                    stats.copies += 1
                    stats.bytes_copied += per_expert
        except Exception as e:
            stats.elapsed_s = time.monotonic() - t0
            raise PlanExecutionError("rank %d: step %d (layer %d, chunk %d) failed after %d bytes touched: %s"
                                     % (rank, i, step.layer, step.chunk, stats.bytes_touched, e), rank=rank,
                                     step=i, layer=step.layer, bytes_touched=stats.bytes_touched,
                                     stats=stats) from e
        stats.steps_done += 1
    if any(t.is_cuda for ts in layers for t in ts):
        torch.cuda.synchronize()
    stats.elapsed_s = time.monotonic() - t0
    return stats


def _add_stats(a: Optional[ExecStats], b: Optional[ExecStats]) -> Optional[ExecStats]:
    if a is None or b is None:
        return b if a is None else a
    out = ExecStats(rank=a.rank)
    for f in ExecStats.__dataclass_fields__:
        if f != "rank":
            setattr(out, f, getattr(a, f) + getattr(b, f))
    return out


# ---- the controller ------------------------------------------------------------------


class EngineRebalanceError(RuntimeError):
    """An engine-executed rebalance did not commit.

    ``rebalance_id``; ``bytes_touched``: the sum over ranks (None when a rank
    could not be reached: then the abort counted the weights as touched);
    ``aborted``: the AbortRebalance answer on rank 0 (None elsewhere, or when
    the abort itself failed); ``local_error``: this rank's own failure, if any;
    ``commit_failed``: every rank ran its plan (the weights hold the new
    placement) but CommitRebalance failed (eplbd unreachable): retry
    ``client.commit_rebalance(model_id, rebalance_id)`` on the leader and
    install its placement everywhere, or reload -- do not serve with the old maps.
    ``steps_committed``: with ``layers_per_step``, the steps committed and
    installed before the failing one (they stay: the maps match the bytes).
    """

    def __init__(self, message: str, *, rebalance_id: str, bytes_touched: Optional[int],
                 aborted: Any = None, local_error: Optional[BaseException] = None,
                 commit_failed: bool = False) -> None:
        super().__init__(message)
        self.rebalance_id = rebalance_id
        self.bytes_touched = bytes_touched
        self.aborted = aborted
        self.local_error = local_error
        self.commit_failed = commit_failed
        # A rebalance in steps: the steps committed (and installed) before this one failed.
        self.steps_committed = 0


@dataclass
class EngineRebalanceOutcome:
    """What :meth:`EngineRebalancer.rebalance` did on this rank.

    ``committed``: the new placement is served (``placement``, installed into
    ``maps`` when given); False with ``reason`` when eplbd chose not to
    rebalance (the commit gate), nothing moved.  ``result``: rank 0's
    RebalanceResult of the commit (the Rebalance answer when nothing was
    pending); ``stats``: this rank's :class:`ExecStats`.
    """

    committed: bool
    rebalance_id: str
    placement: Any
    stats: Optional[ExecStats] = None
    result: Any = None
    reason: str = ""
    bytes_touched: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


class EngineRebalancer:
    """Drive an engine-executed rebalance on every EP rank (call
    :meth:`rebalance` on all of them, collectively, like a collective op).

    ``client``: an :class:`eplb.Client` (each rank its own; every rank
    fetches its own plan).  ``group``: the EP process group (default world);
    ``ep_rank``: this process's EP rank (default ``dist.get_rank(group)``);
    ``leader``: the EP rank that calls Rebalance and Commit/Abort (0).
    ``device``: where the barrier's small tensors live (default: CUDA's
    current device for NCCL, else CPU).

    The protocol (docs/integrations.md, "Engine-executed rebalances"):
    leader Rebalance(execution="engine") -> broadcast of the id -> every rank
    GetTransferPlan(own rank) -> all-reduce (every rank has its plan) ->
    execute_plan -> all-reduce of failures and bytes touched -> leader
    CommitRebalance, or AbortRebalance(bytes touched) -> broadcast of the
    outcome -> every rank installs the new maps (``maps``: vLLM's EplbState
    or anything :meth:`eplb.Placement.install_into` takes).
    """

    def __init__(self, client: Any, model_id: str, *, group: Any = None, ep_rank: Optional[int] = None,
                 leader: int = 0, device: Any = None, global_ranks: Optional[Sequence[int]] = None) -> None:
        import torch
        import torch.distributed as dist

        self.client = client
        self.model_id = model_id
        self.group = group
        self.ep_rank = dist.get_rank(group) if ep_rank is None else ep_rank
        self.world = dist.get_world_size(group)
        self.leader = leader
        self.global_ranks = list(global_ranks) if global_ranks is not None else _global_ranks(group, self.world, None)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        self.device = device
        self.staging = StagingPool()
        self.last_stats: Optional[ExecStats] = None   # this rank's, of the last execute
        self.last_plan: Any = None                    # the TransferPlan this rank fetched last
        self.last_rebalance: Any = None               # the leader's last Rebalance answer

    @property
    def is_leader(self) -> bool:
        return self.ep_rank == self.leader

    # ---- collectives ---------------------------------------------------------------

    def _broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=self.global_ranks[self.leader], group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def _allreduce(self, failed: bool, touched: int) -> Tuple[int, int]:
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if failed else 0, int(touched)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return int(t[0]), int(t[1])

    # ---- the protocol ------------------------------------------------------------------

    def rebalance(self, expert_tensors: Sequence[Sequence[Any]], maps: Any = None, *,
                  on_step: Optional[Callable[[int, TransferStep], None]] = None,
                  **rebalance_kwargs: Any) -> EngineRebalanceOutcome:
        """Rebalance(execution="engine", **rebalance_kwargs) on the leader (the
        kwargs matter there only: physical_load / logical_load, policy,
        max_staging_bytes...), then :meth:`execute` on every rank."""
        start: Dict[str, Any] = {}
        exc: Optional[BaseException] = None
        r = None
        if self.is_leader:
            try:
                kw = dict(rebalance_kwargs)
                kw["execution"] = "engine"
                r = self.client.rebalance(self.model_id, **kw)
                self.last_rebalance = r
                start = {"ok": True, "rebalance_id": r.rebalance_id if r.pending else "", "reason": r.reason,
                         "placement": r.placement, "result": None if r.pending else r}
            except Exception as e:  # every rank must hear of it, or they wait in the broadcast
                exc = e
                start = {"ok": False, "error": "%s: %s" % (type(e).__name__, e),
                         "code": e.code.name if isinstance(e, EplbError) else ""}
        got = self._broadcast(start)
        if not got["ok"]:
            if exc is not None:
                raise exc
            if got.get("code"):  # the same error class on every rank (Aborted: resync everywhere)
                import grpc

                from .errors import _BY_CODE

                code = grpc.StatusCode[got["code"]]
                raise _BY_CODE.get(code, EplbError)("the leader's Rebalance failed: %s" % got["error"], code=code,
                                                    method="Rebalance")
            raise EngineRebalanceError("rank %d: the leader's Rebalance failed: %s" % (self.ep_rank, got["error"]),
                                       rebalance_id="", bytes_touched=0)
        if not got["rebalance_id"]:
            # Not pending: the commit gate kept the placement (reason says why).
            return EngineRebalanceOutcome(committed=False, rebalance_id="", placement=got["placement"],
                                          result=got["result"], reason=got["reason"] or "nothing to move")
        return self.execute(got["rebalance_id"], expert_tensors, maps, on_step=on_step)

    def execute(self, rebalance_id: str, expert_tensors: Sequence[Sequence[Any]], maps: Any = None, *,
                on_step: Optional[Callable[[int, TransferStep], None]] = None) -> EngineRebalanceOutcome:
        """Run the pending engine-executed rebalance ``rebalance_id`` on every
        rank (collective): fetch, execute, barrier, commit or abort, install.
        A rebalance in steps (``layers_per_step``) runs step after step, each
        committed (epoch + 1) and installed before the next one's plan is
        fetched; the outcome's ``stats`` sum them (``extra["commits"]``).
        Raises :class:`EngineRebalanceError` (every rank) when a step did not
        commit (the steps before it stay committed and installed)."""
        commits = 0
        total: Optional[ExecStats] = None
        while True:
            try:
                out = self._execute_step(rebalance_id, expert_tensors, maps, on_step)
            except EngineRebalanceError as e:
                e.steps_committed = commits
                raise
            commits += 1
            total = _add_stats(total, out.stats)
            if not getattr(out.result, "pending", False):
                out.stats = total
                out.extra["commits"] = commits
                return out

    def _execute_step(self, rebalance_id: str, expert_tensors: Sequence[Sequence[Any]], maps: Any,
                      on_step: Optional[Callable[[int, TransferStep], None]]) -> EngineRebalanceOutcome:
        plan = None
        local_error: Optional[BaseException] = None
        try:
            plan = self.client.get_transfer_plan(self.model_id, rebalance_id, self.ep_rank)
            self.last_plan = plan
        except Exception as e:
            local_error = e
        # Every rank has its plan, or nobody starts (a rank that could not
        # fetch it would leave its peers waiting in the first batch).
        nfail, _ = self._allreduce(local_error is not None, 0)
        if nfail:
            return self._finish(rebalance_id, None, 0, nfail, local_error, maps)
        stats = None
        touched = 0
        try:
            stats = execute_plan(plan, self.ep_rank, expert_tensors, self.group, staging=self.staging,
                                 global_ranks=self.global_ranks, num_ranks=self.world, on_step=on_step)
            touched = stats.bytes_touched
        except PlanExecutionError as e:
            local_error, touched, stats = e, e.bytes_touched, e.stats
        except Exception as e:  # PlanError: nothing moved here
            local_error = e
        self.last_stats = stats
        try:
            nfail, total = self._allreduce(local_error is not None, touched)
        except Exception as e:
            # A rank is gone: what it wrote is unknown -> counted as touched.
            logger.error("eplb: rank %d: the barrier after rebalance %s failed: %s", self.ep_rank, rebalance_id, e)
            return self._unreachable(rebalance_id, touched, local_error or e)
        return self._finish(rebalance_id, stats, total, nfail, local_error, maps)

    def _unreachable(self, rebalance_id: str, touched: int, err: BaseException) -> EngineRebalanceOutcome:
        aborted = None
        if self.is_leader:
            try:
                # At least one byte: a rank that cannot report may have written its slots.
                aborted = self.client.abort_rebalance(self.model_id, rebalance_id, max(touched, 1))
            except Exception as e:  # eplbd keeps it pending; recover() aborts it later
                logger.error("eplb: AbortRebalance(%s) failed: %s", rebalance_id, e)
        raise EngineRebalanceError("rank %d: rebalance %s: a rank could not be reached (%s); aborted, the weights "
                                   "count as touched" % (self.ep_rank, rebalance_id, err),
                                   rebalance_id=rebalance_id, bytes_touched=None, aborted=aborted,
                                   local_error=err) from err

    def _finish(self, rebalance_id: str, stats: Optional[ExecStats], touched: int, nfail: int,
                local_error: Optional[BaseException], maps: Any) -> EngineRebalanceOutcome:
        outcome: Dict[str, Any] = {}
        if self.is_leader:
            try:
                if nfail == 0:
                    base = getattr(self.last_plan, "base_epoch", None)
                    r = self.client.commit_rebalance(self.model_id, rebalance_id, base_epoch=base)
                    outcome = {"committed": True, "result": r}
                else:
                    a = self.client.abort_rebalance(self.model_id, rebalance_id, touched)
                    outcome = {"committed": False, "aborted": a,
                               "error": "%d rank(s) failed; aborted with %d bytes touched" % (nfail, touched)}
            except Exception as e:
                outcome = {"committed": False, "aborted": None, "commit_failed": nfail == 0,
                           "error": "%s failed: %s: %s" % ("CommitRebalance" if nfail == 0 else "AbortRebalance",
                                                           type(e).__name__, e)}
                if nfail == 0:
                    outcome["error"] += ("; the weights hold the new placement: retry commit_rebalance(%r, %r) "
                                         "or reload" % (self.model_id, rebalance_id))
        outcome = self._broadcast(outcome)
        if not outcome["committed"]:
            raise EngineRebalanceError("rank %d: rebalance %s not committed: %s%s"
                                       % (self.ep_rank, rebalance_id, outcome["error"],
                                          "; here: %s" % local_error if local_error else ""),
                                       rebalance_id=rebalance_id, bytes_touched=touched,
                                       aborted=outcome.get("aborted"), local_error=local_error,
                                       commit_failed=bool(outcome.get("commit_failed")))
        r = outcome["result"]
        if maps is not None:
            r.placement.install_into(maps)
        return EngineRebalanceOutcome(committed=True, rebalance_id=rebalance_id, placement=r.placement,
                                      stats=stats, result=r, bytes_touched=touched)

    def recover(self, bytes_touched: Optional[int] = None) -> Any:
        """After a crash of the engine (leader only, not collective): abort an
        engine-executed rebalance eplbd still holds as pending for this model.
        ``bytes_touched`` None = unknown, counted as touched (NEEDS_RELOAD);
        pass 0 when the weights are known to hold the served placement (e.g.
        they were reloaded for it).  Returns the AbortResult, or None when
        nothing was pending."""
        p = self.client.get_placement(self.model_id)
        if not p.pending_rebalance_id or p.pending_execution != "engine":
            return None
        return self.client.abort_rebalance(self.model_id, p.pending_rebalance_id,
                                           1 if bytes_touched is None else bytes_touched)
