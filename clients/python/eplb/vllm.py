"""vLLM integration: a drop-in for Model Runner V2's EPLBController that
keeps EplbState-shaped tensors and lets eplbd compute (and, with attached
weights, execute) the rebalances; and a policy with vLLM's
``rebalance_experts`` signature computed by eplbd.

vLLM need not be importable: the model and configs are duck-typed.

What is read:

- ``parallel_config``: ``enable_eplb`` (default True), ``eplb_config``
  with ``window_size``, ``step_interval``, ``num_redundant_experts``
  (optional; 0 = the server's defaults 1000 / 3000), ``enable_elastic_ep``
  (optional).
- ``model_config``: ``model`` (the served model's name; the eplbd model id is
  it, with characters outside ``[A-Za-z0-9._:/-]`` replaced by ``-``, unless
  the controller is given ``model_name=``).
- the model: vLLM's MixtureOfExperts attributes (see
  :func:`eplb.handle_from_module`), ``get_language_model()`` for wrappers,
  optionally ``expert_weights`` (per layer, the list of that layer's expert
  tensors [local_experts, ...] of this process's EP rank ``ep_rank``, default
  0) and ``set_eplb_state(expert_load_view, logical_to_physical_map,
  logical_replica_count)``.  Not vLLM: ``expert_weights_per_rank`` (a list of
  such lists, one per rank) when one process holds every rank's weights.
- a speculator: ``.model`` (the drafter); ``speculative_config.draft_model_config.model``.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .client import Client, RebalanceResult
from .errors import Aborted, NotFound
from .handle import handle_from_module, unwrap_moe
from .placement import Placement
from .recorder import LoadRecorder

__all__ = ["RemoteEplbController", "RemoteEplbPolicy", "ModelState", "Rearrangement", "model_id_for"]

logger = logging.getLogger("eplb")

_BAD = re.compile(r"[^A-Za-z0-9._:/-]")


def model_id_for(name: str, suffix: str = "") -> str:
    """An eplbd model name from an engine's model name: characters outside
    ``[A-Za-z0-9._:/-]`` become ``-``, at most 128 characters."""
    s = _BAD.sub("-", str(name) or "model") + suffix
    return s[-128:] if len(s) > 128 else s


def _cfg(obj: Any, name: str, default: Any) -> Any:
    v = getattr(obj, name, default) if obj is not None else default
    return default if v is None else v


@dataclass
class ModelState:
    """One registered model's EplbState-shaped tensors (int64, on the controller's device).

    physical_to_logical_map [L, P], logical_to_physical_map [L, N, R]
    (R = num_redundant_experts + 1, -1 padded), logical_replica_count [L, N],
    expert_load_pass [L, P] (the MoE layers add this pass's token counts into
    it), expert_load_window [window, L, P] or None (the server keeps the
    window; kept locally only with ``keep_local_window``).
    """

    model_id: str
    model: Any
    role: str
    placement: Placement
    physical_to_logical_map: Any
    logical_to_physical_map: Any
    logical_replica_count: Any
    expert_load_pass: Any
    expert_load_window: Any = None
    recorder: Optional[LoadRecorder] = None
    weights_attached: bool = False
    pending: Optional[RebalanceResult] = None


@dataclass
class Rearrangement:
    """What one model's rearrange did: the old and new physical-to-logical maps
    ([L, P] int64 numpy), the server's answer, and whether the engine must
    move the weights itself (no weights attached)."""

    model_id: str
    old_physical_to_logical: np.ndarray
    result: RebalanceResult
    engine_moves_weights: bool

    @property
    def new_physical_to_logical(self) -> np.ndarray:
        return self.result.placement.physical_to_logical


class RemoteEplbController:
    """vLLM Model Runner V2's EPLBController, backed by eplbd.

    Same methods and arguments: ``prepare_load``, ``maybe_register_model(model,
    model_config, load_dummy_weights)``, ``maybe_register_speculator(speculator,
    speculative_config, load_dummy_weights)``, ``maybe_start_async_loop``,
    ``step(is_dummy, is_profile)``, ``prepare_forward``, ``setup_from_mapping(model,
    model_config, expanded_physical_to_logical, old_num_physical_experts)``,
    plus ``rearrange(...)`` (EplbState.rearrange).

    The tensors live in :attr:`models` (one :class:`ModelState` per
    registered model, main first); :attr:`state` is the main model's.  Each
    ``step`` hands ``expert_load_pass`` to a :class:`eplb.LoadRecorder` and
    zeroes it; every ``step_interval`` steps ``rearrange`` flushes the
    recorder and asks eplbd to rebalance from its window.  With the model's
    ``expert_weights`` in shm (``eplb.weights.shm_tensor``) or CUDA memory
    and ``attach_weights`` true, they are attached at registration and eplbd
    moves them in place before it commits; otherwise the new maps are
    installed and :attr:`last_rearrangement` carries old and new maps for the
    engine's own weight mover.

    Args:
        parallel_config: vLLM's ParallelConfig (or any object; see module doc).
        device: where the EplbState tensors live (torch device or string).
        client: an :class:`eplb.Client` (default ``Client(target)``).
        model_name: the eplbd model id of the main model.
        num_nodes: nodes of the EP group (default 1).
        layers_per_step: > 0: rebalances commit this many layers per step,
            the rest follow one step per ``step()`` (between forward passes).
        attach_weights: attach the model's ``expert_weights`` when they are shm/CUDA tensors.
        slot_order: the rebalance's slot order ("preserve", "algorithm", "min_traffic").
        keep_local_window: also keep vLLM's expert_load_window on the device.
        execution: "server" (default: eplbd moves attached weights, or the
            engine's mover uses :attr:`last_rearrangement`) or "engine": one
            controller per EP rank, and ``rearrange`` is collective: the
            ranks run eplbd's transfer plan on the model's ``expert_weights``
            with torch.distributed (:class:`eplb.torch_exec.EngineRebalancer`
            over ``ep_group``) and every rank installs the committed maps
            (weights are not attached; steps of ``layers_per_step`` run back
            to back within ``rearrange``).  Every rank records its own load:
            the server's window holds ep_size passes per step.
        ep_group: the EP process group of ``execution="engine"`` (default world).
        max_staging_bytes: ``execution="engine"``: the staging a rank's plan may need.
    """

    def __init__(self, parallel_config: Any, device: Any = "cpu", *, client: Optional[Client] = None,
                 target: Optional[str] = None, model_name: Optional[str] = None, num_nodes: int = 1,
                 layers_per_step: int = 0, attach_weights: bool = True, slot_order: str = "preserve",
                 keep_local_window: bool = False, recorder_max_pending: int = 256, execution: str = "server",
                 ep_group: Any = None, max_staging_bytes: int = 0) -> None:
        if execution not in ("server", "engine"):
            raise ValueError("execution must be 'server' or 'engine', got %r" % (execution,))
        self.execution = execution
        self.ep_group = ep_group
        self.max_staging_bytes = max_staging_bytes
        self._rebalancers: Dict[str, Any] = {}
        self.parallel_config = parallel_config
        self.device = device
        self._own_client = client is None
        self.client = client if client is not None else Client(target)
        self.model_name = model_name
        self.num_nodes = num_nodes
        self.layers_per_step = layers_per_step
        self.attach = attach_weights and execution == "server"
        self.slot_order = slot_order
        self.keep_local_window = keep_local_window
        self.recorder_max_pending = recorder_max_pending
        eplb_cfg = _cfg(parallel_config, "eplb_config", None)
        self.window_size = int(_cfg(eplb_cfg, "window_size", 0))
        self.step_interval = int(_cfg(eplb_cfg, "step_interval", 0)) or 3000
        self.num_redundant_experts = int(_cfg(eplb_cfg, "num_redundant_experts", 0))
        self.models: Dict[str, ModelState] = {}
        self.suppressed = False
        self.steps = 0
        self.last_rearrangement: List[Rearrangement] = []
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(_cfg(self.parallel_config, "enable_eplb", True))

    @property
    def state(self) -> Optional[ModelState]:
        """The main model's :class:`ModelState` (None before registration)."""
        for m in self.models.values():
            if m.role == "main":
                return m
        return None

    # ---- vLLM's EPLBController methods ---------------------------------------------

    def prepare_load(self) -> None:
        """Forget registered models (before a model (re)load), as vLLM's does."""
        self.close_recorders()
        self.models.clear()
        self.steps = 0

    def maybe_register_model(self, model: Any, model_config: Any, load_dummy_weights: bool = False) -> bool:
        """Register the MoE part of ``model`` (multimodal wrappers unwrapped).
        False when EPLB is off, weights are dummy, or there is no MoE model."""
        if not self.enabled or load_dummy_weights:
            return False
        moe = unwrap_moe(model)
        if moe is None:
            return False
        name = self.model_name or model_id_for(_cfg(model_config, "model", type(model).__name__))
        self._register(name, model, moe, role="main", main_model_id="")
        return True

    def maybe_register_speculator(self, speculator: Any, speculative_config: Any,
                                  load_dummy_weights: bool = False) -> bool:
        """Register an MoE drafter (``speculator.model``, unwrapped like the
        main model) as a speculator of the main model."""
        if speculator is None or not hasattr(speculator, "model") or not self.enabled or load_dummy_weights:
            return False
        main = self.state
        if main is None:
            raise RuntimeError("register the main model before its speculator")
        draft = speculator.model
        moe = unwrap_moe(draft)
        if moe is None:
            return False
        if _cfg(self.parallel_config, "enable_elastic_ep", False):
            raise RuntimeError("Elastic EP is not supported with draft model.")
        dmc = _cfg(speculative_config, "draft_model_config", None)
        name = model_id_for(_cfg(dmc, "model", type(draft).__name__), ".draft")
        if name == main.model_id:
            name = model_id_for(main.model_id, ".draft")
        st = self._register(name, draft, moe, role="speculator", main_model_id=main.model_id)
        if hasattr(speculator, "set_eplb_state"):
            speculator.set_eplb_state(st)
        return True

    def maybe_start_async_loop(self, eplb_models_added: bool, load_dummy_weights: bool = False) -> None:
        """Nothing to start: the LoadRecorder's thread is the background work."""

    def prepare_forward(self, model_config: Any = None, num_unpadded_tokens: int = 0,
                        ubatch_slices: Any = None) -> None:
        """Nothing to prepare: the load tensor is the same every pass."""

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        """After a forward pass: record ``expert_load_pass`` of every model and
        zero it; do the next step of a pending stepped rebalance; every
        ``step_interval`` steps, :meth:`rearrange`.  Dummy and profile passes
        record nothing (as vLLM)."""
        if not self.enabled or self.suppressed or not self.models:
            return
        if is_dummy or is_profile:
            for m in self.models.values():
                m.expert_load_pass.zero_()
            return
        for m in self.models.values():
            if m.expert_load_window is not None:
                m.expert_load_window[self.steps % m.expert_load_window.shape[0]].copy_(m.expert_load_pass)
            assert m.recorder is not None
            m.recorder.record(m.expert_load_pass)
            m.expert_load_pass.zero_()
        self.steps += 1
        try:
            if any(m.pending is not None for m in self.models.values()):
                self._continue()
            elif self.steps % self.step_interval == 0:
                self.rearrange()
        except Aborted as e:
            # someone else committed (an operator, another engine): serve what eplbd serves
            logger.warning("eplb: %s; installing the current placement", e)
            self.resync()

    def resync(self) -> None:
        """Install what eplbd serves now for every model (after an ABORTED
        rebalance, or to pick up a commit made elsewhere)."""
        for m in self.models.values():
            p = self.client.get_placement(m.model_id)
            p.install_into(m)
            m.placement = p
            m.pending = None

    def rearrange(self, is_profile: bool = False, execute_shuffle: bool = True,
                  global_expert_loads: Optional[List[Any]] = None,
                  rank_mapping: Optional[Dict[int, int]] = None) -> List[Rearrangement]:
        """Rebalance every registered model (EplbState.rearrange).

        Load: ``global_expert_loads`` (one logical load [L, N] per model, in
        registration order) or the server's window (the recorders are flushed
        first).  ``is_profile``: a dry run, nothing installed.  Otherwise the
        committed maps are installed into the tensors (with
        ``layers_per_step``, only the layers moved; later steps follow in
        :meth:`step`).  ``execute_shuffle=False`` with attached weights is
        refused (eplbd moves them as it commits).  ``rank_mapping`` (elastic
        EP) goes through :meth:`setup_from_mapping` instead.
        """
        if rank_mapping is not None:
            raise NotImplementedError("elastic EP: call setup_from_mapping with the expanded map")
        out: List[Rearrangement] = []
        self._sync_device()
        for i, m in enumerate(list(self.models.values())):
            if m.pending is not None:
                continue  # finish it first (step() does)
            if m.recorder is not None:
                m.recorder.flush()
            if not execute_shuffle and m.weights_attached:
                raise ValueError("execute_shuffle=False with attached weights: eplbd moves them when it commits")
            kw: Dict[str, Any] = {}
            if global_expert_loads is not None:
                kw["logical_load"] = global_expert_loads[i]
            old = m.placement.physical_to_logical.copy()
            if self.execution == "engine" and not is_profile:
                out.append(self._rearrange_engine(m, old, kw))
                continue
            r = self.client.rebalance(m.model_id, expected_epoch=m.placement.epoch, dry_run=is_profile,
                                      slot_order=self.slot_order,
                                      layers_per_step=0 if is_profile else self.layers_per_step, **kw)
            if not is_profile:
                self._install(m, r)
            out.append(Rearrangement(m.model_id, old, r, engine_moves_weights=not m.weights_attached))
        self.last_rearrangement = out
        return out

    def setup_from_mapping(self, model: Any, model_config: Any, expanded_physical_to_logical: Any,
                           old_num_physical_experts: int) -> None:
        """Elastic EP: adopt ``expanded_physical_to_logical`` [L, P_new] for the
        main model (unwrapped); the tensors are reallocated at the new P (and
        handed to the model's ``set_eplb_state``), since their shapes change."""
        moe = unwrap_moe(model)
        if moe is None:
            raise ValueError("setup_from_mapping: %s is not an MoE model" % type(model).__name__)
        m = self.state
        if m is None:
            raise RuntimeError("setup_from_mapping before maybe_register_model")
        if m.recorder is not None:
            m.recorder.close()
        ep_size = int(moe.num_physical_experts) // int(moe.num_local_physical_experts)
        p = self.client.setup_from_mapping(m.model_id, expanded_physical_to_logical,
                                           old_num_physical_experts=old_num_physical_experts, ep_size=ep_size,
                                           model=handle_from_module(model), expected_epoch=m.placement.epoch)
        m.placement = p
        self._allocate(m, moe)
        if not p.num_physical_experts == old_num_physical_experts:
            m.weights_attached = False  # the server detached the old layout
        self._maybe_attach(m, moe)

    # ---- helpers ---------------------------------------------------------------------

    def _register(self, name: str, model: Any, moe: Any, *, role: str, main_model_id: str) -> ModelState:
        ep_size = int(moe.num_physical_experts) // max(int(moe.num_local_physical_experts), 1)
        self.client.register_model(name, handle_from_module(model), ep_size=ep_size, role=role,
                                   main_model_id=main_model_id, num_nodes=self.num_nodes,
                                   window_size=self.window_size, step_interval=self.step_interval,
                                   num_redundant_experts=self.num_redundant_experts)
        p = self.client.get_placement(name)
        st = ModelState(model_id=name, model=moe, role=role, placement=p, physical_to_logical_map=None,
                        logical_to_physical_map=None, logical_replica_count=None, expert_load_pass=None)
        self._allocate(st, moe)
        self.models[name] = st
        self._maybe_attach(st, moe)
        if p.pending_rebalance_id and p.pending_execution == "engine":
            # An engine-executed rebalance left by an earlier engine: only its
            # ranks know what they wrote.  Rebalances are refused until it is
            # executed or aborted (EngineRebalancer.execute / .recover).
            logger.warning("eplb: model %s has engine-executed rebalance %s pending; EngineRebalancer.execute() "
                           "or .recover() it", name, p.pending_rebalance_id)
        elif p.pending_rebalance_id:  # left pending by an earlier engine: continue it
            self._resume(st)
        return st

    def _allocate(self, st: ModelState, moe: Any) -> None:
        import torch

        p = st.placement
        maps = p.to_torch(device=self.device)
        st.physical_to_logical_map, st.logical_to_physical_map, st.logical_replica_count = maps
        st.expert_load_pass = torch.zeros((p.num_layers, p.num_physical_experts), dtype=torch.int64,
                                          device=self.device)
        if self.keep_local_window:
            st.expert_load_window = torch.zeros((self.window_size or 1000, p.num_layers, p.num_physical_experts),
                                                dtype=torch.int64, device=self.device)
        st.recorder = LoadRecorder(self.client, st.model_id, shape=(p.num_layers, p.num_physical_experts),
                                   max_pending=self.recorder_max_pending)
        if hasattr(moe, "set_eplb_state"):
            moe.set_eplb_state(st.expert_load_pass, st.logical_to_physical_map, st.logical_replica_count)

    def _maybe_attach(self, st: ModelState, moe: Any) -> None:
        if not self.attach:
            return
        layers = getattr(moe, "expert_weights", None)
        if not layers:
            return
        from . import weights

        ts = [t for layer in layers for t in (layer.values() if isinstance(layer, dict) else layer)]
        if not ts or not all(t.is_cuda or weights.shm_region_of(t) is not None for t in ts):
            return  # the engine moves its own weights
        ep_size = st.placement.num_physical_experts // int(moe.num_local_physical_experts)
        per_rank = getattr(moe, "expert_weights_per_rank", None)
        if per_rank is not None:  # one process holding every rank (tests, single-host CPU)
            weights.attach(self.client, st.model_id, ranks=per_rank)
        else:
            rank = int(getattr(moe, "ep_rank", 0))
            weights.attach(self.client, st.model_id, layers, first_rank=rank, num_ranks=1 if ep_size > 1 else 0)
        st.weights_attached = True

    def _rearrange_engine(self, m: ModelState, old: np.ndarray, kw: Dict[str, Any]) -> Rearrangement:
        import torch.distributed as dist

        from .torch_exec import EngineRebalancer

        rb = self._rebalancers.get(m.model_id)
        if rb is None:
            rb = self._rebalancers[m.model_id] = EngineRebalancer(self.client, m.model_id, group=self.ep_group)
        # every rank's passes are in eplbd's window before the leader asks
        dist.barrier(group=self.ep_group)
        layers = getattr(m.model, "expert_weights", None)
        if not layers:
            raise ValueError("execution='engine' needs the model's expert_weights (per layer, this rank's tensors)")
        tensors = [list(x.values()) if isinstance(x, dict) else list(x) for x in layers]
        outcome = rb.rebalance(tensors, m, expected_epoch=m.placement.epoch, slot_order=self.slot_order,
                               layers_per_step=self.layers_per_step, max_staging_bytes=self.max_staging_bytes, **kw)
        m.placement = outcome.placement
        m.pending = None
        return Rearrangement(m.model_id, old, outcome.result, engine_moves_weights=False)

    def _install(self, st: ModelState, r: RebalanceResult) -> None:
        layers = r.layers_moved if self.layers_per_step else None
        r.placement.install_into(st, layers=layers)
        st.placement = r.placement
        st.pending = r if r.pending else None

    def _continue(self) -> None:
        self._sync_device()
        for m in self.models.values():
            if m.pending is not None:
                r = self.client.continue_rebalance(m.model_id, m.pending.rebalance_id)
                self._install(m, r)

    def _resume(self, st: ModelState) -> None:
        r = self.client.continue_rebalance(st.model_id, st.placement.pending_rebalance_id)
        self._install(st, r)

    def _sync_device(self) -> None:
        dev = str(self.device)
        if dev.startswith("cuda"):
            import torch

            torch.cuda.current_stream(torch.device(dev)).synchronize()

    def close_recorders(self) -> None:
        """Flush and stop every model's LoadRecorder."""
        for m in self.models.values():
            if m.recorder is not None:
                m.recorder.close()

    def close(self) -> None:
        """Close the recorders (and the client, if the controller made it)."""
        self.close_recorders()
        if self._own_client:
            self.client.close()

    def __enter__(self) -> "RemoteEplbController":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _InstanceOrClass:
    """A method callable on an instance, or on the class (then on its default instance)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __get__(self, obj: Any, cls: Any) -> Any:
        target = obj if obj is not None else cls.default()
        fn = self.fn

        def bound(*args: Any, **kw: Any) -> Any:
            return fn(target, *args, **kw)

        bound.__doc__ = fn.__doc__
        bound.__name__ = fn.__name__
        return bound


class RemoteEplbPolicy:
    """vLLM's EPLB policy interface, computed by eplbd (DeepSeek's EPLB, bit-exact).

    ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks)``
    -> ``(phy2log [L, P], log2phy [L, N, P - N + 1], logcnt [L, N])`` int64
    tensors on ``weight``'s device, as vLLM's DefaultEplbPolicy returns them
    (log2phy lists each expert's slots in ascending order, -1 padded).
    Stateless: each call is a dry run (slot order ALGORITHM: the policy's own
    placement) on a scratch model registered once per shape, named
    ``eplb.policy/L..-N..-P..-g..-n..-r..``.  Callable on an instance or, as
    vLLM calls it, on the class (a default instance, ``Client()``'s target).
    """

    _default: Optional["RemoteEplbPolicy"] = None
    _default_lock = threading.Lock()
    PREFIX = "eplb.policy/"

    def __init__(self, target: Optional[str] = None, *, client: Optional[Client] = None) -> None:
        self.client = client if client is not None else Client(target)
        self._shapes: set = set()

    @classmethod
    def default(cls) -> "RemoteEplbPolicy":
        """The instance class-level calls use (created on first use)."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    @classmethod
    def set_default(cls, policy: Optional["RemoteEplbPolicy"]) -> None:
        """Replace (or with None, drop) the default instance."""
        with cls._default_lock:
            cls._default = policy

    def _scratch(self, L: int, N: int, P: int, groups: int, nodes: int, ranks: int) -> str:
        name = "%sL%d-N%d-P%d-g%d-n%d-r%d" % (self.PREFIX, L, N, P, groups, nodes, ranks)
        if name not in self._shapes:
            from ._proto.eplb.v1 import eplb_pb2

            h = eplb_pb2.ModelHandle(architecture="RemoteEplbPolicy", interfaces=[eplb_pb2.MIXTURE_OF_EXPERTS],
                                     moe=eplb_pb2.MoeSpec(num_moe_layers=L, num_logical_experts=N,
                                                          num_physical_experts=P,
                                                          num_local_physical_experts=P // ranks,
                                                          num_routed_experts=N, num_redundant_experts=P - N,
                                                          num_expert_groups=groups))
            self.client.register_model(name, h, ep_size=ranks, num_nodes=nodes)
            self._shapes.add(name)
        return name

    @_InstanceOrClass
    def rebalance_experts(self, weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
                          num_ranks: int, old_global_expert_indices: Any = None) -> Tuple[Any, Any, Any]:
        """vLLM's policy call: ``weight`` [L, N] logical load (torch or numpy),
        ``num_replicas`` P, ``num_groups``, ``num_nodes``, ``num_ranks`` (GPUs).
        ``old_global_expert_indices`` is accepted and not used (the policy's
        own order is returned, as DeepSeek's)."""
        import torch

        dev = weight.device if hasattr(weight, "device") else None
        w = weight.detach().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight)
        if w.ndim != 2:
            raise ValueError("weight must be [layers, logical experts], got shape %s" % (w.shape,))
        if np.issubdtype(w.dtype, np.floating):
            if not np.all(np.equal(np.mod(w, 1), 0)):
                raise ValueError("eplbd takes integer loads (token counts)")
        L, N = w.shape
        P = int(num_replicas)
        name = self._scratch(L, N, P, int(num_groups), int(num_nodes), int(num_ranks))
        try:
            r = self.client.rebalance(name, logical_load=w.astype(np.int64), dry_run=True, slot_order="algorithm",
                                      include_logical_to_physical=True)
        except NotFound:  # the server lost the scratch model (restart with another db): once more
            self._shapes.discard(name)
            name = self._scratch(L, N, P, int(num_groups), int(num_nodes), int(num_ranks))
            r = self.client.rebalance(name, logical_load=w.astype(np.int64), dry_run=True, slot_order="algorithm",
                                      include_logical_to_physical=True)
        phy2log, log2phy, logcnt = r.placement.to_torch(device=dev)
        return phy2log, log2phy, logcnt
