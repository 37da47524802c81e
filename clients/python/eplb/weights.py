"""Expert weights for AttachWeights, from the engine's own tensors.

- :func:`shm_tensor` allocates a torch tensor in a POSIX shm object under the
  server's prefix (``/eplb-`` by default), so eplbd can map it (CPU backend).
- :func:`attach` builds and sends AttachWeights from per-layer tensors: one
  region per tensor storage (shm object, or CUDA IPC block), each tensor's
  offset from its storage offset, stride from its first dimension.

CUDA tensors become ``BUFFER_KIND_CUDA_IPC`` regions from
``storage._share_cuda_()``: the handle names the caching allocator's whole
block, the tensor's offset is the storage's offset in the block plus its own
byte offset in the storage, and ``device`` is the tensor's device index (the
server must see the same device numbering: same ``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._proto.eplb.v1 import eplb_pb2

__all__ = ["shm_tensor", "release", "shm_region_of", "build_attach_request", "attach", "ShmRegion",
           "DEFAULT_PREFIX"]

DEFAULT_PREFIX = "/eplb-"
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class ShmRegion:
    """A POSIX shm object holding tensors: its name ("/eplb-..."), base address and size."""

    name: str
    base: int
    size: int


_lock = threading.Lock()
_regions: Dict[int, ShmRegion] = {}   # base address -> region
_keep: Dict[int, Any] = {}            # base address -> the memmap (keeps the mapping alive)


def shm_tensor(shape: Sequence[int], dtype: Any, *, name_prefix: str = DEFAULT_PREFIX,
               name: Optional[str] = None) -> Any:
    """A zeroed torch tensor of ``shape``/``dtype`` in a new POSIX shm object.

    The object is ``/dev/shm/<name>``, named ``name_prefix`` + a random
    suffix unless ``name`` is given ("/eplb-..."; it must start with the
    server's ``--shm-prefix``).  The tensor maps the object shared (numpy
    memmap + torch.from_numpy), so writes by eplbd are seen in place.  Free
    it with :func:`release` (unmapped when the last view goes, the name is
    unlinked there).
    """
    import torch

    if name is None:
        name = "%s%d-%s" % (name_prefix, os.getpid(), secrets.token_hex(6))
    if not name.startswith("/") or "/" in name[1:]:
        raise ValueError("shm names are '/name' with no other '/': %r" % name)
    numel = 1
    for d in shape:
        numel *= int(d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = max(numel * itemsize, 1)
    path = SHM_DIR + name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
    t = torch.from_numpy(mm)[: numel * itemsize].view(dtype).view(*[int(d) for d in shape])
    base = int(mm.ctypes.data)
    with _lock:
        _regions[base] = ShmRegion(name=name, base=base, size=nbytes)
        _keep[base] = mm
    return t


def shm_region_of(tensor: Any) -> Optional[ShmRegion]:
    """The shm region (from :func:`shm_tensor`) that holds ``tensor``'s first byte, or None."""
    ptr = int(tensor.data_ptr())
    with _lock:
        for r in _regions.values():
            if r.base <= ptr < r.base + r.size:
                return r
    return None


def release(tensor: Any) -> None:
    """Unlink the shm object of a tensor from :func:`shm_tensor` (the memory
    stays mapped while tensors view it)."""
    r = shm_region_of(tensor)
    if r is None:
        raise ValueError("tensor is not in an eplb shm region")
    with _lock:
        _regions.pop(r.base, None)
        _keep.pop(r.base, None)
    try:
        os.unlink(SHM_DIR + r.name)
    except FileNotFoundError:
        pass


# ---- AttachWeights ------------------------------------------------------------------

LayerTensors = Union[Mapping[str, Any], Sequence[Any]]


def _named(layer: LayerTensors) -> List[Tuple[str, Any]]:
    if isinstance(layer, Mapping):
        return [(str(k), v) for k, v in layer.items()]
    return [("t%d" % i, t) for i, t in enumerate(layer)]


def _share_cuda(tensor: Any) -> Tuple[int, bytes, int, int]:
    """(device, 64-byte handle, storage size, storage offset in the block) of a CUDA tensor."""
    storage = tensor.untyped_storage() if hasattr(tensor, "untyped_storage") else tensor.storage()
    info = storage._share_cuda_()
    device, handle, size, offset = info[0], info[1], info[2], info[3]
    return int(device), bytes(handle), int(size), int(offset)


def build_attach_request(model_id: str, ranks: Sequence[Sequence[LayerTensors]], *, first_rank: int = 0,
                         num_ranks: int = 0, backend: str = "",
                         share_cuda: Callable[[Any], Tuple[int, bytes, int, int]] = _share_cuda
                         ) -> "eplb_pb2.AttachWeightsRequest":
    """The AttachWeightsRequest for ``ranks[r][layer]`` = that rank's tensors of
    that layer (a dict name -> tensor, or a list, named t0, t1, ...), each
    [local_experts, ...] with the same names in the same order on every rank.

    Every tensor's storage becomes one region of its rank (shared storages
    are one region): an shm object from :func:`shm_tensor` (kind SHM), or a
    CUDA IPC block (kind CUDA_IPC; ``share_cuda`` is
    ``storage._share_cuda_()``, replaceable for tests).  Per tensor:
    ``bytes_per_expert`` = one expert's bytes (``tensor[0]`` must be
    contiguous), ``stride`` = ``tensor.stride(0)`` bytes, ``offset`` = its
    byte offset in the region.  ``first_rank``/``num_ranks``: the EP ranks
    the server holds (0, 0 = all ranks, then ``len(ranks)`` must be ep_size).
    """
    if not ranks:
        raise ValueError("no ranks")
    kinds = set()
    rank_msgs = []
    layouts: List[List[List[eplb_pb2.TensorLayout]]] = []   # [rank][layer][tensor]
    names: Optional[List[List[Tuple[str, int]]]] = None     # [layer][(name, bytes_per_expert)]
    for r, layers in enumerate(ranks):
        regions: List[eplb_pb2.MemoryRegion] = []
        region_index: Dict[Any, int] = {}
        per_layer = []
        these = []
        for li, layer in enumerate(layers):
            lay = []
            spec = []
            for name, t in _named(layer):
                if t.dim() < 1 or t.shape[0] < 1:
                    raise ValueError("rank %d layer %d %s: expected [local_experts, ...]" % (r, li, name))
                if not t[0].is_contiguous():
                    raise ValueError("rank %d layer %d %s: one expert's data must be contiguous" % (r, li, name))
                es = t.element_size()
                bpe = t[0].numel() * es
                stride = t.stride(0) * es
                if t.is_cuda:
                    kinds.add("cuda")
                    device, handle, size, st_off = share_cuda(t)
                    key = ("cuda", handle)
                    if key not in region_index:
                        region_index[key] = len(regions)
                        regions.append(eplb_pb2.MemoryRegion(ipc_handle=handle, device=device, size=st_off + size))
                    offset = st_off + t.storage_offset() * es
                else:
                    kinds.add("shm")
                    reg = shm_region_of(t)
                    if reg is None:
                        raise ValueError("rank %d layer %d %s: a CPU tensor must live in shm (eplb.weights.shm_tensor)"
                                         % (r, li, name))
                    key = ("shm", reg.name)
                    if key not in region_index:
                        region_index[key] = len(regions)
                        regions.append(eplb_pb2.MemoryRegion(shm_name=reg.name, size=reg.size))
                    offset = int(t.data_ptr()) - reg.base
                lay.append(eplb_pb2.TensorLayout(offset=offset, stride=stride, region=region_index[key]))
                spec.append((name, bpe))
            per_layer.append(lay)
            these.append(spec)
        if names is None:
            names = these
        elif these != names:
            raise ValueError("rank %d's tensors (names, sizes per layer) differ from rank 0's" % r)
        rank_msgs.append(eplb_pb2.RankBuffer(regions=regions))
        layouts.append(per_layer)
    if len(kinds) != 1:
        raise ValueError("tensors must all be CUDA or all shm-backed CPU tensors")
    kind = eplb_pb2.BUFFER_KIND_CUDA_IPC if kinds == {"cuda"} else eplb_pb2.BUFFER_KIND_SHM
    assert names is not None
    layer_msgs = []
    for li, spec in enumerate(names):
        layer_msgs.append(eplb_pb2.LayerWeights(tensors=[
            eplb_pb2.ExpertTensor(name=name, bytes_per_expert=bpe, ranks=[layouts[r][li][ti] for r in range(len(ranks))])
            for ti, (name, bpe) in enumerate(spec)]))
    return eplb_pb2.AttachWeightsRequest(model_id=model_id, kind=kind, ranks=rank_msgs, layers=layer_msgs,
                                         backend=backend, first_rank=first_rank, num_ranks=num_ranks)


def attach(client: Any, model_id: str, layers: Optional[Sequence[LayerTensors]] = None, *,
           ranks: Optional[Sequence[Sequence[LayerTensors]]] = None, first_rank: int = 0,
           num_ranks: Optional[int] = None, backend: str = "") -> Any:
    """AttachWeights from tensors; returns :class:`eplb.client.AttachResult`.

    ``layers``: one rank's tensors per layer (e.g. ``[{"w13": t, "w2": t2,
    "w13_scale": t3}, ...]``), the rank being ``first_rank`` (one process per
    GPU); or ``ranks``: a list of such lists, ranks ``first_rank`` on (one
    process holding several ranks).  ``num_ranks`` defaults to 0 (all) when
    ``first_rank`` is 0 and ``ranks`` covers them, else to the ranks given.
    """
    if (layers is None) == (ranks is None):
        raise ValueError("give layers (one rank) or ranks (a list per rank)")
    per_rank = [layers] if ranks is None else list(ranks)
    if num_ranks is None:
        num_ranks = len(per_rank)
    req = build_attach_request(model_id, per_rank, first_rank=first_rank, num_ranks=num_ranks, backend=backend)
    return client.attach_weights(request=req)
