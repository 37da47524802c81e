"""eplb: the Python client of eplbd (expert-parallel load balancing for MoE inference).

- :class:`Client`: one method per RPC, plain values in and out, errors as
  :class:`EplbError` subclasses.
- :class:`Placement`: vLLM's EplbState maps (``to_numpy``, ``to_torch``,
  ``install_into``).
- :func:`handle_from_module`: a ModelHandle from a vLLM-shaped model object.
- :class:`LoadRecorder`: per-pass expert load, batched into RecordLoad off
  the engine thread.
- :mod:`eplb.weights`: shm-backed tensors and AttachWeights from tensors.
- :mod:`eplb.vllm`: ``RemoteEplbController`` (Model Runner V2's
  EPLBController) and ``RemoteEplbPolicy`` (vLLM's policy interface).
- :mod:`eplb.torch_exec`: engine-executed rebalances across nodes:
  ``execute_plan`` (one rank's transfer plan with torch.distributed) and
  ``EngineRebalancer`` (Rebalance -> plans -> barrier -> commit/abort on
  every rank); :mod:`eplb.transfer`: the plans as dataclasses.

torch is imported only by what needs it (tensors out, shm tensors, vllm).
"""
from .client import (DEFAULT_TARGET, AttachResult, Client, ModelSummary, RebalanceResult, RecordResult,
                     RegisterResult, TlsConfig, default_target)
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, EplbError,
                     FailedPrecondition, Internal, InvalidArgument, NotFound, OutOfRange, PermissionDenied,
                     ResourceExhausted, Unauthenticated, Unavailable, Unimplemented, Unknown)
from .handle import handle_from_module, is_mixture_of_experts, is_multimodal, unwrap_moe
from .placement import EplbMaps, Placement
from .recorder import LoadRecorder
from .transfer import AbortResult, RankTransferPlan, TransferOp, TransferPlan, TransferStep

__version__ = "0.1.0"

__all__ = [
    "Client", "TlsConfig", "RegisterResult", "RebalanceResult", "RecordResult", "AttachResult", "ModelSummary",
    "DEFAULT_TARGET", "default_target", "Placement", "EplbMaps", "LoadRecorder", "handle_from_module",
    "is_mixture_of_experts", "is_multimodal", "unwrap_moe", "AbortResult", "TransferPlan", "RankTransferPlan",
    "TransferStep", "TransferOp",
    "EplbError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
    "Internal", "Unavailable", "DataLoss", "Unauthenticated", "__version__",
]
