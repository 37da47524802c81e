"""ModelHandle from an engine's model object, by vLLM's protocols (duck-typed,
no torch or vLLM import)."""
from __future__ import annotations

from typing import Any, Optional

from ._proto.eplb.v1 import eplb_pb2

__all__ = ["MOE_ATTRIBUTES", "handle_from_module", "is_mixture_of_experts", "is_multimodal"]

#: vLLM's MixtureOfExperts protocol attributes (vllm/model_executor/models/interfaces.py).
MOE_ATTRIBUTES = ("num_moe_layers", "num_logical_experts", "num_physical_experts",
                  "num_local_physical_experts", "num_routed_experts", "num_shared_experts",
                  "num_redundant_experts", "num_expert_groups")

# The server unwraps at most 8 wrapper hops; one more level lets it say so.
_MAX_DEPTH = 9


def is_mixture_of_experts(module: Any) -> bool:
    """True when ``module`` has every MixtureOfExperts attribute and MoE layers
    (vLLM's ``is_mixture_of_experts``)."""
    if not all(hasattr(module, a) for a in MOE_ATTRIBUTES):
        return False
    return int(getattr(module, "num_moe_layers") or 0) > 0


def is_multimodal(module: Any) -> bool:
    """True when ``module`` has a callable ``get_language_model()`` (SupportsMultiModal)."""
    return callable(getattr(module, "get_language_model", None))


def _int(module: Any, name: str) -> int:
    v = getattr(module, name, 0)
    return int(v) if v is not None else 0


def handle_from_module(module: Any, *, architecture: Optional[str] = None) -> "eplb_pb2.ModelHandle":
    """Describe ``module`` as an ``eplb.v1.ModelHandle``.

    - MoE (``MIXTURE_OF_EXPERTS`` and ``moe``) when it has the MixtureOfExperts
      attributes (``num_moe_layers`` > 0, ``num_logical_experts``,
      ``num_physical_experts``, ``num_local_physical_experts``,
      ``num_routed_experts``, ``num_shared_experts``, ``num_redundant_experts``,
      ``num_expert_groups``; ``None`` counts as 0);
    - ``SUPPORTS_MULTIMODAL`` when it has ``get_language_model()``; a
      multimodal handle that is not MoE gets ``language_model`` =
      ``handle_from_module(module.get_language_model())``, recursively (the
      server unwraps it, at most 8 hops);
    - ``architecture``: the class name (``type(module).__name__``) unless given.

    A module that is neither gives a handle with no interfaces (the server
    then registers nothing or refuses, as docs/api.md says).
    """
    return _handle(module, architecture, 0)


def _handle(module: Any, architecture: Optional[str], depth: int) -> "eplb_pb2.ModelHandle":
    h = eplb_pb2.ModelHandle(architecture=architecture or type(module).__name__)
    moe = is_mixture_of_experts(module)
    mm = is_multimodal(module)
    if moe:
        h.interfaces.append(eplb_pb2.MIXTURE_OF_EXPERTS)
        h.moe.CopyFrom(eplb_pb2.MoeSpec(
            num_moe_layers=_int(module, "num_moe_layers"),
            num_logical_experts=_int(module, "num_logical_experts"),
            num_physical_experts=_int(module, "num_physical_experts"),
            num_local_physical_experts=_int(module, "num_local_physical_experts"),
            num_routed_experts=_int(module, "num_routed_experts"),
            num_shared_experts=_int(module, "num_shared_experts"),
            num_redundant_experts=_int(module, "num_redundant_experts"),
            num_expert_groups=_int(module, "num_expert_groups")))
    if mm:
        h.interfaces.append(eplb_pb2.SUPPORTS_MULTIMODAL)
        if not moe and depth < _MAX_DEPTH:
            inner = module.get_language_model()
            if inner is not None:
                h.language_model.CopyFrom(_handle(inner, None, depth + 1))
    return h


def unwrap_moe(module: Any) -> Optional[Any]:
    """The MoE module the server resolves ``module`` to (what vLLM's
    ``get_mixture_of_experts_model`` returns), or None."""
    for _ in range(_MAX_DEPTH):
        if module is None:
            return None
        if is_mixture_of_experts(module):
            return module
        if not is_multimodal(module):
            return None
        module = module.get_language_model()
    return None
