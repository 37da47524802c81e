"""Exceptions: every failed RPC is raised as an :class:`EplbError` subclass
chosen by its gRPC status code, carrying the code and the server's message."""
from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

__all__ = [
    "EplbError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
    "from_rpc_error",
]


class EplbError(Exception):
    """An eplbd call failed.

    Attributes:
        code: the ``grpc.StatusCode`` the server (or the channel) answered.
        message: the server's message (``details()``), e.g.
            ``"model.moe.num_physical_experts 8 != num_logical_experts 4 + num_redundant_experts 2"``.
        method: the RPC, e.g. ``"Rebalance"``.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: Optional[grpc.StatusCode] = None, method: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.method = method

    def __str__(self) -> str:
        where = "%s: " % self.method if self.method else ""
        return "%s%s: %s" % (where, self.code.name, self.message)


class Cancelled(EplbError):
    """CANCELLED."""
    code = grpc.StatusCode.CANCELLED


class Unknown(EplbError):
    """UNKNOWN."""
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(EplbError):
    """INVALID_ARGUMENT: the request is malformed (the message names the field)."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(EplbError):
    """DEADLINE_EXCEEDED: the call ran past the client's timeout."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(EplbError):
    """NOT_FOUND: unknown model, rebalance id, or health service."""
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EplbError):
    """ALREADY_EXISTS: a model of that name is registered differently."""
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(EplbError):
    """PERMISSION_DENIED: e.g. shm objects outside the server's prefix or uid."""
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(EplbError):
    """RESOURCE_EXHAUSTED: a server limit (--max-models, --max-state-mib, message size)."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(EplbError):
    """FAILED_PRECONDITION: the model's state refuses the call (NEEDS_RELOAD, attached weights, ...)."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(EplbError):
    """ABORTED: expected_epoch is stale, or a stepped rebalance is pending."""
    code = grpc.StatusCode.ABORTED


class OutOfRange(EplbError):
    """OUT_OF_RANGE."""
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(EplbError):
    """UNIMPLEMENTED: the server does not have this RPC."""
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(EplbError):
    """INTERNAL: e.g. a weight move failed part-way (committed layers stay committed)."""
    code = grpc.StatusCode.INTERNAL


class Unavailable(EplbError):
    """UNAVAILABLE: no server at the target, or it is shutting down."""
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(EplbError):
    """DATA_LOSS: weights or a stored row were damaged; the model needs a reload."""
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(EplbError):
    """UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[EplbError]] = {
    cls.code: cls for cls in (Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
                              PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
                              Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated)
}


def from_rpc_error(err: grpc.RpcError, method: str = "") -> EplbError:
    """The :class:`EplbError` subclass for a ``grpc.RpcError`` (code and details kept)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, EplbError)
    exc = cls(details or "", code=code, method=method)
    return exc
