"""eplb.weights: shm tensors, AttachWeights from tensors (moved by a real
eplbd, checked per slot), CUDA IPC request building with a fake tensor."""
import os

import numpy as np
import pytest
import torch

import eplb
from eplb import weights
from eplb._proto.eplb.v1 import eplb_pb2
from models import TinyMoE


def test_shm_tensor_is_shared_memory():
    t = weights.shm_tensor((3, 4), torch.bfloat16)
    reg = weights.shm_region_of(t)
    assert reg.name.startswith("/eplb-") and reg.size == 3 * 4 * 2
    assert os.path.exists("/dev/shm" + reg.name)
    t.fill_(2.5)
    raw = np.memmap("/dev/shm" + reg.name, dtype=np.uint8, mode="r")
    assert torch.equal(torch.from_numpy(np.array(raw)).view(torch.bfloat16).view(3, 4), t)
    assert weights.shm_region_of(t[2]) == reg
    weights.release(t)
    assert not os.path.exists("/dev/shm" + reg.name)
    assert weights.shm_region_of(torch.zeros(2)) is None


def test_request_layout():
    m = TinyMoE(layers=2, logical=4, redundant=2, ep=2)
    try:
        req = weights.build_attach_request("m", m.expert_weights_per_rank)
        assert req.kind == eplb_pb2.BUFFER_KIND_SHM and len(req.ranks) == 2 and len(req.layers) == 2
        assert len(req.ranks[0].regions) == 4  # one per tensor storage: 2 layers x (w13, w2)
        w13 = req.layers[1].tensors[0]
        assert w13.name == "w13" and w13.bytes_per_expert == 8 * 8 * 4
        assert w13.ranks[1].stride == 8 * 8 * 4 and w13.ranks[1].offset == 0
        # a view at an offset inside a storage: offset from storage_offset
        big = weights.shm_tensor((10, 4), torch.float32)
        req2 = weights.build_attach_request("m", [[{"a": big[2:5], "b": big[6:9]}]])
        assert len(req2.ranks[0].regions) == 1
        assert [t.ranks[0].offset for t in req2.layers[0].tensors] == [2 * 16, 6 * 16]
        weights.release(big)
        with pytest.raises(ValueError, match="shm"):
            weights.build_attach_request("m", [[{"w": torch.zeros(2, 2)}]])
    finally:
        m.release()


class FakeStorage:
    def __init__(self, handle, size, offset):
        self.info = (0, handle, size, offset, b"rc", 0, b"ev", False)

    def _share_cuda_(self):
        return self.info


class FakeCudaTensor:
    """What build_attach_request reads of a CUDA tensor (no GPU here)."""

    is_cuda = True

    def __init__(self, shape, itemsize, storage, storage_offset=0):
        self.shape = shape
        self._item = itemsize
        self._storage = storage
        self._off = storage_offset

    def dim(self):
        return len(self.shape)

    def __getitem__(self, i):
        return FakeCudaTensor(self.shape[1:], self._item, self._storage)

    def is_contiguous(self):
        return True

    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self):
        return self._item

    def stride(self, d):
        n = 1
        for x in self.shape[d + 1:]:
            n *= x
        return n

    def storage_offset(self):
        return self._off

    def untyped_storage(self):
        return self._storage


def test_cuda_ipc_request_from_share_cuda():
    h1, h2 = bytes(range(64)), bytes(range(64, 128))
    block = FakeStorage(h1, 1 << 20, 4096)          # storage at 4096 in its allocator block
    other = FakeStorage(h2, 1 << 16, 0)
    layers = [{"w13": FakeCudaTensor((3, 16, 8), 2, block, storage_offset=64),
               "w2": FakeCudaTensor((3, 8, 8), 2, block, storage_offset=64 + 3 * 128),
               "scale": FakeCudaTensor((3, 4), 4, other)}]
    req = weights.build_attach_request("m", [layers], first_rank=2, num_ranks=1)
    assert req.kind == eplb_pb2.BUFFER_KIND_CUDA_IPC and req.first_rank == 2 and req.num_ranks == 1
    regs = req.ranks[0].regions
    assert [r.ipc_handle for r in regs] == [h1, h2]  # the shared block is one region
    assert regs[0].size == 4096 + (1 << 20) and regs[0].device == 0
    t = req.layers[0].tensors
    assert (t[0].bytes_per_expert, t[0].ranks[0].stride, t[0].ranks[0].offset, t[0].ranks[0].region) == \
        (256, 256, 4096 + 128, 0)
    assert (t[1].ranks[0].offset, t[1].ranks[0].region) == (4096 + 128 + 3 * 256, 0)
    assert (t[2].bytes_per_expert, t[2].ranks[0].offset, t[2].ranks[0].region) == (16, 0, 1)


def test_attach_and_move_in_shm(client):
    m = TinyMoE(layers=3, logical=8, redundant=4, ep=4)
    try:
        client.register_model("w", m, ep_size=4)
        p0 = client.get_placement("w")
        m.fill(p0.physical_to_logical)
        res = weights.attach(client, "w", ranks=m.expert_weights_per_rank)
        assert res.backend == "cpu" and res.bytes_per_slot == 3 * (8 * 8 * 4 + 8 * 4 * 2)
        load = np.ones((3, 12), dtype=np.int64)
        load[:, 0] = 500
        r = client.rebalance("w", physical_load=load)
        assert r.committed and r.bytes_moved > 0
        assert m.check(r.placement.physical_to_logical) == []
        assert r.experts_moved > 0 and m.check(p0.physical_to_logical) != []  # the bytes did change
        assert client.list_models()[0].weights_attached
        assert client.detach_weights("w")
    finally:
        m.release()


def test_attach_errors_from_server(client):
    m = TinyMoE(layers=3, logical=8, redundant=4, ep=4)
    try:
        client.register_model("w", m, ep_size=4)
        with pytest.raises(eplb.InvalidArgument):  # 2 of 3 layers
            weights.attach(client, "w", ranks=[r[:2] for r in m.expert_weights_per_rank])
    finally:
        m.release()
