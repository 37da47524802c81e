"""eplb.Client: one method per eplbd RPC, keyword arguments, plain values."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import grpc
import numpy as np

from . import errors
from ._proto import health_pb2
from ._proto.eplb.v1 import eplb_pb2, eplb_pb2_grpc
from .handle import handle_from_module
from .placement import Placement, _as_int64_list, _as_numpy
from .transfer import AbortResult, TransferPlan

__all__ = ["Client", "TlsConfig", "RegisterResult", "RebalanceResult", "RecordResult", "AttachResult",
           "ModelSummary", "AbortResult", "DEFAULT_TARGET", "default_target"]

DEFAULT_TARGET = "127.0.0.1:50051"

_SLOT_ORDERS = {"preserve": eplb_pb2.SLOT_ORDER_PRESERVE, "algorithm": eplb_pb2.SLOT_ORDER_ALGORITHM,
                "min_traffic": eplb_pb2.SLOT_ORDER_MIN_TRAFFIC}
_POLICIES = {"deepseek": eplb_pb2.POLICY_DEEPSEEK, "incremental": eplb_pb2.POLICY_INCREMENTAL}
_POLICY_NAMES = {v: k for k, v in _POLICIES.items()}
_EXECUTIONS = {"server": eplb_pb2.EXECUTION_SERVER, "engine": eplb_pb2.EXECUTION_ENGINE,
               "execution_server": eplb_pb2.EXECUTION_SERVER, "execution_engine": eplb_pb2.EXECUTION_ENGINE}
_ROLES = {"main": eplb_pb2.MODEL_ROLE_MAIN, "speculator": eplb_pb2.MODEL_ROLE_SPECULATOR}
_KINDS = {"shm": eplb_pb2.BUFFER_KIND_SHM, "hip_ipc": eplb_pb2.BUFFER_KIND_HIP_IPC,
          "cuda_ipc": eplb_pb2.BUFFER_KIND_CUDA_IPC}

Array = Any  # numpy array, torch tensor, or nested lists of ints


def default_target() -> str:
    """``$EPLBD_ADDR``, else ``127.0.0.1:50051`` (as eplbctl)."""
    return os.environ.get("EPLBD_ADDR") or DEFAULT_TARGET


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel, as eplbctl's --tls-ca/--tls-cert/--tls-key/--tls-server-name.

    ca: PEM file of the CA that signed the server's certificate (None: the
        system's roots); cert/key: the client's certificate and key files for
        mutual TLS (both or neither); server_name: the name to check the
        server's certificate against when it differs from the target's host.
    """

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    server_name: Optional[str] = None

    @classmethod
    def coerce(cls, tls: Union["TlsConfig", Mapping[str, Any], bool, None]) -> Optional["TlsConfig"]:
        """A TlsConfig from a TlsConfig, a dict of its fields, True (system roots) or None."""
        if tls is None or tls is False:
            return None
        if tls is True:
            return cls()
        if isinstance(tls, TlsConfig):
            return tls
        if isinstance(tls, Mapping):
            unknown = set(tls) - {"ca", "cert", "key", "server_name"}
            if unknown:
                raise ValueError("unknown tls keys: %s" % ", ".join(sorted(unknown)))
            return cls(**dict(tls))
        raise TypeError("tls must be a TlsConfig, a dict, True or None")

    def credentials(self) -> grpc.ChannelCredentials:
        """grpc.ssl_channel_credentials of the files."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls: cert and key go together")

        def read(p: Optional[str]) -> Optional[bytes]:
            if p is None:
                return None
            with open(p, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


@dataclass
class RegisterResult:
    """RegisterModel's answer."""

    registered: bool
    model_id: str
    resolved_path: str
    reason: str
    epoch: int
    state: str
    placement: Optional[Placement] = None


@dataclass
class RebalanceResult:
    """Rebalance's / ContinueRebalance's answer; ``placement`` is what is served now."""

    placement: Placement
    committed: bool
    balancedness_before: float
    balancedness_after: float
    layer_balancedness_before: List[float]
    layer_balancedness_after: List[float]
    experts_moved: int
    compute_ms: float
    bytes_moved: int
    move_ms: float
    rebalance_id: str
    layers_done: int
    pending: bool
    layers_moved: List[int]
    bytes_cross_gpu: int
    bytes_staged: int
    done_event: bytes = b""
    reason: str = ""
    policy_used: str = "deepseek"
    balancedness_reference: float = 0.0
    layers_from_scratch: int = 0
    slots_moved: int = 0
    plan_copies_cross_gpu: int = 0
    plan_copies_cross_node: int = 0
    plan_bytes_cross_gpu: int = 0
    plan_bytes_cross_node: int = 0
    reference_copies_cross_gpu: int = 0
    transfer_plan: Optional[TransferPlan] = None
    layers_node_repaired: int = 0

    @classmethod
    def from_proto(cls, r: "eplb_pb2.RebalanceResponse") -> "RebalanceResult":
        return cls(placement=Placement.from_proto(r.placement), committed=r.committed,
                   balancedness_before=r.balancedness_before, balancedness_after=r.balancedness_after,
                   layer_balancedness_before=list(r.layer_balancedness_before),
                   layer_balancedness_after=list(r.layer_balancedness_after),
                   experts_moved=r.experts_moved, compute_ms=r.compute_ms, bytes_moved=r.bytes_moved,
                   move_ms=r.move_ms, rebalance_id=r.rebalance_id, layers_done=r.layers_done,
                   pending=r.pending, layers_moved=list(r.layers_moved),
                   bytes_cross_gpu=r.bytes_cross_gpu, bytes_staged=r.bytes_staged, done_event=r.done_event,
                   reason=r.reason, policy_used=_POLICY_NAMES.get(r.policy_used, str(r.policy_used)),
                   balancedness_reference=r.balancedness_reference, layers_from_scratch=r.layers_from_scratch,
                   slots_moved=r.slots_moved, plan_copies_cross_gpu=r.plan_copies_cross_gpu,
                   plan_copies_cross_node=r.plan_copies_cross_node, plan_bytes_cross_gpu=r.plan_bytes_cross_gpu,
                   plan_bytes_cross_node=r.plan_bytes_cross_node,
                   reference_copies_cross_gpu=r.reference_copies_cross_gpu,
                   transfer_plan=TransferPlan.from_proto(r.transfer_plan) if r.HasField("transfer_plan") else None,
                   layers_node_repaired=r.layers_node_repaired)


@dataclass
class RecordResult:
    """RecordLoad's answer: passes counted so far, whether an automatic rebalance committed."""

    passes_recorded: int
    rebalanced: bool
    epoch: int


@dataclass
class AttachResult:
    """AttachWeights' answer."""

    backend: str
    bytes_per_slot: int


@dataclass
class ModelSummary:
    """One entry of ListModels."""

    model_id: str
    role: str
    main_model_id: str
    architecture: str
    resolved_path: str
    epoch: int
    num_layers: int
    num_logical_experts: int
    num_physical_experts: int
    ep_size: int
    num_nodes: int
    state: str
    state_reason: str
    weights_attached: bool
    damaged: str


def _link_costs(msg: "eplb_pb2.LinkCosts", costs: Mapping[str, float]) -> None:
    unknown = set(costs) - {"intra_node", "cross_node"}
    if unknown:
        raise ValueError("unknown link_costs keys: %s" % ", ".join(sorted(unknown)))
    msg.intra_node = float(costs.get("intra_node", 0.0))
    msg.cross_node = float(costs.get("cross_node", 0.0))


def _enum(table: Mapping[str, int], v: Union[str, int], what: str) -> int:
    if isinstance(v, str):
        key = v.lower()
        if key not in table:
            raise ValueError("%s must be one of %s, got %r" % (what, ", ".join(table), v))
        return table[key]
    return int(v)


class Client:
    """A connection to eplbd.

    ``target``: "host:port" or "unix:/path" (default :func:`default_target`);
    ``timeout``: seconds per call (each method also takes ``timeout=``);
    ``tls``: a :class:`TlsConfig`, a dict of its fields (ca, cert, key,
    server_name), True (system roots) or None (plaintext);
    ``read_retries``: further attempts of reads (GetPlacement, ListModels,
    Health Check) answered UNAVAILABLE, with exponential backoff from
    ``retry_backoff`` seconds.  Nothing that changes state is retried.
    ``max_message_bytes``: the channel's send/receive limit (default no limit:
    a large placement exceeds gRPC's 4 MiB).

    Every failed call raises an :class:`eplb.EplbError` subclass.  Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, target: Optional[str] = None, *, timeout: float = 30.0,
                 tls: Union[TlsConfig, Mapping[str, Any], bool, None] = None, read_retries: int = 3,
                 retry_backoff: float = 0.05, max_message_bytes: int = -1,
                 options: Sequence[tuple] = ()) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        self.read_retries = read_retries
        self.retry_backoff = retry_backoff
        self.tls = TlsConfig.coerce(tls)
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        if self.tls is not None and self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        opts.extend(options)
        if self.tls is None:
            self.channel = grpc.insecure_channel(self.target, options=opts)
        else:
            self.channel = grpc.secure_channel(self.target, self.tls.credentials(), options=opts)
        self.stub = eplb_pb2_grpc.ExpertBalancerStub(self.channel)
        self._health_check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self._health_watch = self.channel.unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)

    # ---- plumbing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "Client(%r%s)" % (self.target, ", tls" if self.tls else "")

    def _call(self, name: str, fn: Callable[..., Any], request: Any, timeout: Optional[float],
              read: bool = False) -> Any:
        attempts = 1 + (self.read_retries if read else 0)
        delay = self.retry_backoff
        t = self.timeout if timeout is None else timeout
        for i in range(attempts):
            try:
                return fn(request, timeout=t)
            except grpc.RpcError as e:
                if read and i + 1 < attempts and e.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise errors.from_rpc_error(e, name) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _handle(model: Any) -> "eplb_pb2.ModelHandle":
        if isinstance(model, eplb_pb2.ModelHandle):
            return model
        if isinstance(model, Mapping):
            from google.protobuf import json_format

            return json_format.ParseDict(dict(model), eplb_pb2.ModelHandle())
        return handle_from_module(model)

    # ---- models -----------------------------------------------------------------

    def register_model(self, model_name: str, model: Any, *, ep_size: int, enable_eplb: bool = True,
                       num_nodes: int = 0, window_size: int = 0, step_interval: int = 0,
                       num_redundant_experts: int = 0, auto_rebalance: bool = False,
                       role: Union[str, int] = "main", main_model_id: str = "",
                       load_dummy_weights: bool = False, include_placement: bool = False,
                       default_policy: Union[str, int] = "deepseek", target_balancedness: float = 0.0,
                       max_bytes_moved: int = 0, max_slots_moved: int = 0, min_improvement: float = 0.0,
                       link_costs: Optional[Mapping[str, float]] = None, expert_bytes: int = 0,
                       timeout: Optional[float] = None) -> RegisterResult:
        """RegisterModel.  ``model``: an ``eplb.v1.ModelHandle``, a dict in its
        proto3 JSON form, or a model object (see :func:`eplb.handle_from_module`).
        ``role``: "main" or "speculator" (with ``main_model_id``).  0 means the
        server's default for window_size (1000), step_interval (3000), num_nodes (1).
        The model's defaults for automatic rebalances: ``default_policy``,
        ``target_balancedness``, ``max_bytes_moved``, ``max_slots_moved``,
        ``min_improvement``, ``link_costs`` (as :meth:`rebalance`);
        ``expert_bytes``: one expert's bytes in one layer (all its tensors),
        what budgets and transfer plans count when no weights are attached."""
        parallel = eplb_pb2.ParallelConfig(enable_eplb=enable_eplb, ep_size=ep_size, num_nodes=num_nodes,
                                           window_size=window_size, step_interval=step_interval,
                                           num_redundant_experts=num_redundant_experts,
                                           auto_rebalance=auto_rebalance,
                                           default_policy=_enum(_POLICIES, default_policy, "default_policy"),
                                           target_balancedness=target_balancedness,
                                           max_bytes_moved=max_bytes_moved, max_slots_moved=max_slots_moved,
                                           min_improvement=min_improvement, expert_bytes=expert_bytes)
        if link_costs:
            _link_costs(parallel.link_costs, link_costs)
        req = eplb_pb2.RegisterModelRequest(
            model_name=model_name, model=self._handle(model), role=_enum(_ROLES, role, "role"),
            main_model_id=main_model_id, load_dummy_weights=load_dummy_weights,
            include_placement=include_placement, parallel=parallel)
        r = self._call("RegisterModel", self.stub.RegisterModel, req, timeout)
        return RegisterResult(registered=r.registered, model_id=r.model_id, resolved_path=r.resolved_path,
                              reason=r.reason, epoch=r.epoch, state=eplb_pb2.MoveState.Name(r.state),
                              placement=Placement.from_proto(r.placement) if r.HasField("placement") else None)

    def get_placement(self, model_id: str, *, include_logical_to_physical: bool = False,
                      timeout: Optional[float] = None) -> Placement:
        """GetPlacement (retried on UNAVAILABLE).  The logical-to-physical map is
        derived locally unless ``include_logical_to_physical``."""
        req = eplb_pb2.GetPlacementRequest(model_id=model_id,
                                           include_logical_to_physical=include_logical_to_physical)
        return Placement.from_proto(self._call("GetPlacement", self.stub.GetPlacement, req, timeout, read=True))

    def list_models(self, *, timeout: Optional[float] = None) -> List[ModelSummary]:
        """ListModels (retried on UNAVAILABLE), sorted by model_id."""
        r = self._call("ListModels", self.stub.ListModels, eplb_pb2.ListModelsRequest(), timeout, read=True)
        return [ModelSummary(model_id=m.model_id, role=eplb_pb2.ModelRole.Name(m.role),
                             main_model_id=m.main_model_id, architecture=m.architecture,
                             resolved_path=m.resolved_path, epoch=m.epoch, num_layers=m.num_layers,
                             num_logical_experts=m.num_logical_experts,
                             num_physical_experts=m.num_physical_experts, ep_size=m.ep_size,
                             num_nodes=m.num_nodes, state=eplb_pb2.MoveState.Name(m.state),
                             state_reason=m.state_reason, weights_attached=m.weights_attached,
                             damaged=m.damaged) for m in r.models]

    def delete_model(self, model_id: str, *, force: bool = False, timeout: Optional[float] = None) -> bool:
        """DeleteModel; ``force`` detaches weights and waits for an operation in progress."""
        req = eplb_pb2.DeleteModelRequest(model_id=model_id, force=force)
        return self._call("DeleteModel", self.stub.DeleteModel, req, timeout).deleted

    # ---- placements ---------------------------------------------------------------

    def setup_from_mapping(self, model_id: str, expanded_physical_to_logical: Array, *,
                           old_num_physical_experts: int, ep_size: int, model: Any = None,
                           expected_epoch: Optional[int] = None, timeout: Optional[float] = None) -> Placement:
        """SetupFromMapping (elastic EP): adopt ``expanded_physical_to_logical``
        [L, P_new] (-1 = a new empty slot); P_new is its second dimension."""
        a = _as_numpy(expanded_physical_to_logical)
        if a.ndim != 2:
            raise ValueError("expanded_physical_to_logical must be [layers, physical], got shape %s" % (a.shape,))
        req = eplb_pb2.SetupFromMappingRequest(
            model_id=model_id, expanded_physical_to_logical=a.astype(np.int64).ravel().tolist(),
            num_physical_experts=a.shape[1], old_num_physical_experts=old_num_physical_experts, ep_size=ep_size)
        if model is not None:
            req.model.CopyFrom(self._handle(model))
        if expected_epoch is not None:
            req.expected_epoch = expected_epoch
        return Placement.from_proto(self._call("SetupFromMapping", self.stub.SetupFromMapping, req, timeout))

    def rebalance(self, model_id: str, *, physical_load: Optional[Array] = None,
                  logical_load: Optional[Array] = None, num_groups: int = 0, num_nodes: int = 0,
                  num_gpus: int = 0, expected_epoch: Optional[int] = None, dry_run: bool = False,
                  slot_order: Union[str, int] = "preserve", include_logical_to_physical: bool = False,
                  layers_per_step: int = 0, wait_event: bytes = b"",
                  policy: Union[str, int] = "deepseek", target_balancedness: float = 0.0,
                  max_bytes_moved: int = 0, max_slots_moved: int = 0, expert_bytes: int = 0,
                  link_costs: Optional[Mapping[str, float]] = None, min_improvement: float = 0.0,
                  force: bool = False, execution: Union[str, int] = "server", max_staging_bytes: int = 0,
                  include_transfer_plan: bool = False, timeout: Optional[float] = None) -> RebalanceResult:
        """Rebalance from ``physical_load`` [L, P] or ``logical_load`` [L, N]
        (int token counts; neither = the server's recorded window).
        ``slot_order``: "preserve" (default), "algorithm", "min_traffic".
        ``layers_per_step`` > 0 commits in steps (see :meth:`continue_rebalance`).
        ``wait_event``: the 64-byte IPC handle of an event recorded on the
        engine's stream after its last use of the weights (device backends
        only; docs/api.md); the answer's ``done_event`` is eplbd's.
        ``policy``: "deepseek" (from scratch, default) or "incremental" (from the
        current placement, until ``target_balancedness`` x the from-scratch
        balancedness, 0 = 0.99, within ``max_bytes_moved`` / ``max_slots_moved``;
        ``link_costs``: {"intra_node": 1, "cross_node": 4}).  ``min_improvement``
        and ``force``: the commit gate (``reason`` says why it did not commit).
        ``execution``: "server" (default: eplbd moves the weights it holds, or
        none) or "engine": eplbd stores the rebalance as pending and answers
        its ``rebalance_id`` (``pending``); the engine's ranks fetch their
        plans (:meth:`get_transfer_plan`), run them
        (:func:`eplb.torch_exec.execute_plan`) and then one caller commits
        (:meth:`commit_rebalance`) or aborts (:meth:`abort_rebalance`); see
        :class:`eplb.torch_exec.EngineRebalancer`.  ``max_staging_bytes``:
        the most staging a rank's plan may need at once (0 = one layer's
        slots); ``include_transfer_plan``: every rank's plan in the answer
        (``transfer_plan``)."""
        if physical_load is not None and logical_load is not None:
            raise ValueError("physical_load or logical_load, not both")
        req = eplb_pb2.RebalanceRequest(model_id=model_id, num_groups=num_groups, num_nodes=num_nodes,
                                        num_gpus=num_gpus, dry_run=dry_run,
                                        slot_order=_enum(_SLOT_ORDERS, slot_order, "slot_order"),
                                        include_logical_to_physical=include_logical_to_physical,
                                        layers_per_step=layers_per_step, wait_event=wait_event,
                                        policy=_enum(_POLICIES, policy, "policy"),
                                        target_balancedness=target_balancedness, max_bytes_moved=max_bytes_moved,
                                        max_slots_moved=max_slots_moved, expert_bytes=expert_bytes,
                                        min_improvement=min_improvement, force=force,
                                        execution=_enum(_EXECUTIONS, execution, "execution"),
                                        max_staging_bytes=max_staging_bytes,
                                        include_transfer_plan=include_transfer_plan)
        if link_costs:
            _link_costs(req.link_costs, link_costs)
        if physical_load is not None:
            req.physical_load.extend(_as_int64_list(physical_load))
        if logical_load is not None:
            req.logical_load.extend(_as_int64_list(logical_load))
        if expected_epoch is not None:
            req.expected_epoch = expected_epoch
        return RebalanceResult.from_proto(self._call("Rebalance", self.stub.Rebalance, req, timeout))

    def continue_rebalance(self, model_id: str, rebalance_id: str, *, include_logical_to_physical: bool = False,
                           wait_event: bytes = b"", timeout: Optional[float] = None) -> RebalanceResult:
        """ContinueRebalance: the next step of a stepped rebalance (``wait_event`` as in :meth:`rebalance`)."""
        req = eplb_pb2.ContinueRebalanceRequest(model_id=model_id, rebalance_id=rebalance_id,
                                                include_logical_to_physical=include_logical_to_physical,
                                                wait_event=wait_event)
        return RebalanceResult.from_proto(self._call("ContinueRebalance", self.stub.ContinueRebalance, req, timeout))

    # ---- engine-executed rebalances ---------------------------------------------

    def get_transfer_plan(self, model_id: str, rebalance_id: str, rank: int, *,
                          timeout: Optional[float] = None) -> TransferPlan:
        """GetTransferPlan (retried on UNAVAILABLE): the pending engine-executed
        rebalance's plan with EP rank ``rank``'s part (``.rank_plan(rank)``).
        A rank outside [0, ep_size) is :class:`eplb.InvalidArgument`; an
        unknown id :class:`eplb.NotFound`."""
        req = eplb_pb2.GetTransferPlanRequest(model_id=model_id, rebalance_id=rebalance_id, rank=rank)
        return TransferPlan.from_proto(self._call("GetTransferPlan", self.stub.GetTransferPlan, req, timeout,
                                                  read=True))

    def commit_rebalance(self, model_id: str, rebalance_id: str, *, include_logical_to_physical: bool = False,
                         base_epoch: Optional[int] = None, timeout: Optional[float] = None) -> RebalanceResult:
        """CommitRebalance, after every rank ran its plan: the placement and the
        epoch advance (``placement`` is the new one; ``pending`` when steps
        remain: their plans follow with :meth:`get_transfer_plan`).  Not
        retried.  An id that is not the pending one is :class:`eplb.Aborted`
        (nothing changes).  ``base_epoch``: the plan's ``base_epoch``, checked
        by servers whose CommitRebalanceRequest has it (a retried commit then
        cannot commit a step nobody ran); ignored by older ones."""
        req = eplb_pb2.CommitRebalanceRequest(model_id=model_id, rebalance_id=rebalance_id,
                                              include_logical_to_physical=include_logical_to_physical)
        if base_epoch is not None and "base_epoch" in req.DESCRIPTOR.fields_by_name:
            setattr(req, "base_epoch", base_epoch)
        return RebalanceResult.from_proto(self._call("CommitRebalance", self.stub.CommitRebalance, req, timeout))

    def abort_rebalance(self, model_id: str, rebalance_id: str, bytes_touched: int = 0, *,
                        timeout: Optional[float] = None) -> AbortResult:
        """AbortRebalance: ``bytes_touched`` 0 = no live slot was written, the
        placement stays; > 0 = the weights match no map (NEEDS_RELOAD)."""
        req = eplb_pb2.AbortRebalanceRequest(model_id=model_id, rebalance_id=rebalance_id,
                                             bytes_touched=int(bytes_touched))
        r = self._call("AbortRebalance", self.stub.AbortRebalance, req, timeout)
        return AbortResult(epoch=r.epoch, state=eplb_pb2.MoveState.Name(r.state),
                           needs_weight_reload=r.needs_weight_reload)

    def record_load(self, model_id: str, physical_load: Array, *, num_passes: Optional[int] = None,
                    is_dummy: bool = False, timeout: Optional[float] = None) -> RecordResult:
        """RecordLoad of one pass [L, P] or several packed [k, L, P] (``num_passes``
        defaults to k for a 3-d array, else 1).  Not retried: the server counts
        a pass once it answers."""
        a = _as_numpy(physical_load)
        if num_passes is None:
            num_passes = a.shape[0] if a.ndim == 3 else 1
        req = eplb_pb2.RecordLoadRequest(model_id=model_id, is_dummy=is_dummy, num_passes=num_passes)
        req.physical_load.extend(a.astype(np.int64, copy=False).ravel().tolist())
        r = self._call("RecordLoad", self.stub.RecordLoad, req, timeout)
        return RecordResult(passes_recorded=r.passes_recorded, rebalanced=r.rebalanced, epoch=r.epoch)

    # ---- weights ---------------------------------------------------------------------

    def attach_weights(self, model_id: str = "", *, request: Optional["eplb_pb2.AttachWeightsRequest"] = None,
                       kind: Union[str, int] = "shm", ranks: Sequence[Any] = (), layers: Sequence[Any] = (),
                       backend: str = "", first_rank: int = 0, num_ranks: int = 0,
                       timeout: Optional[float] = None) -> AttachResult:
        """AttachWeights.  Either a ready ``request`` (see :func:`eplb.weights.attach`,
        which builds it from tensors), or its parts: ``kind`` ("shm", "hip_ipc",
        "cuda_ipc"), ``ranks`` (RankBuffer messages or dicts), ``layers``
        (LayerWeights messages or dicts), ``backend``, ``first_rank``, ``num_ranks``."""
        if request is None:
            from google.protobuf import json_format

            def msg(x: Any, cls: Any) -> Any:
                return x if isinstance(x, cls) else json_format.ParseDict(dict(x), cls())

            request = eplb_pb2.AttachWeightsRequest(
                model_id=model_id, kind=_enum(_KINDS, kind, "kind"), backend=backend, first_rank=first_rank,
                num_ranks=num_ranks, ranks=[msg(r, eplb_pb2.RankBuffer) for r in ranks],
                layers=[msg(x, eplb_pb2.LayerWeights) for x in layers])
        r = self._call("AttachWeights", self.stub.AttachWeights, request, timeout)
        return AttachResult(backend=r.backend, bytes_per_slot=r.bytes_per_slot)

    def detach_weights(self, model_id: str, *, timeout: Optional[float] = None) -> bool:
        """DetachWeights."""
        req = eplb_pb2.DetachWeightsRequest(model_id=model_id)
        return self._call("DetachWeights", self.stub.DetachWeights, req, timeout).detached

    # ---- health -------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """grpc.health.v1 Check (retried on UNAVAILABLE): "SERVING",
        "NOT_SERVING", ...  ``service``: "" (the server) or "eplb.v1.ExpertBalancer"."""
        r = self._call("Health.Check", self._health_check, health_pb2.HealthCheckRequest(service=service),
                       timeout, read=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def watch_health(self, service: str = "", *, timeout: Optional[float] = None) -> Iterator[str]:
        """grpc.health.v1 Watch: yields the status now and at each change.
        The stream ends with :class:`eplb.Unavailable` when eplbd shuts down;
        ``timeout`` (default none) bounds the whole stream."""
        stream = self._health_watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        try:
            for r in stream:
                yield health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, "Health.Watch") from None
        finally:
            stream.cancel()
