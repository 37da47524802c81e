"""Placement's vLLM shapes/dtypes and in-place install; handle_from_module."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import eplb
from eplb._proto.eplb.v1 import eplb_pb2
from models import Drafter, KimiLikeVLM, TinyMoE

# deepseek-ai/EPLB README worked example (docs/api.md, eplb-semantics.md)
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_from_arrays_vllm_shapes():
    p = eplb.Placement.from_arrays(PHY2LOG, 12)
    assert p.logical_replica_count.tolist() == LOGCNT
    m = p.to_numpy()
    assert m.physical_to_logical_map.shape == (2, 16) and m.physical_to_logical_map.dtype == np.int64
    assert m.logical_to_physical_map.shape == (2, 12, 5)  # R = redundant (4) + 1
    assert m.logical_replica_count.shape == (2, 12)
    l2p = m.logical_to_physical_map
    assert l2p[0, 5].tolist() == [0, 2, -1, -1, -1] and l2p[1, 1].tolist() == [11, 15, -1, -1, -1]
    for layer in range(2):  # every slot appears once, ascending, -1 padded
        for e in range(12):
            slots = [s for s in l2p[layer, e] if s >= 0]
            assert slots == [s for s in range(16) if PHY2LOG[layer][s] == e]
            assert all(x == -1 for x in l2p[layer, e, len(slots):])
    t = p.to_torch()
    assert all(x.dtype == torch.int64 for x in t) and t.logical_to_physical_map.shape == (2, 12, 5)


def test_server_l2p_equals_derived(client):
    client.register_model("m", {"architecture": "X", "interfaces": ["MIXTURE_OF_EXPERTS"],
                                "moe": {"num_moe_layers": 2, "num_logical_experts": 12, "num_physical_experts": 16,
                                        "num_local_physical_experts": 2, "num_redundant_experts": 4,
                                        "num_expert_groups": 4}}, ep_size=8, num_nodes=2)
    load = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    r = client.rebalance("m", logical_load=load, dry_run=True, slot_order="algorithm",
                         include_logical_to_physical=True)
    assert r.placement.physical_to_logical.tolist() == PHY2LOG
    derived = eplb.Placement.from_arrays(PHY2LOG, 12).to_numpy().logical_to_physical_map
    assert np.array_equal(r.placement.to_numpy().logical_to_physical_map, derived)


def test_install_into_in_place():
    p = eplb.Placement.from_arrays(PHY2LOG, 12)
    st = {"physical_to_logical_map": torch.zeros(2, 16, dtype=torch.int64),
          "logical_to_physical_map": torch.zeros(2, 12, 5, dtype=torch.int64),
          "logical_replica_count": torch.zeros(2, 12, dtype=torch.int64)}
    ptrs = {k: v.data_ptr() for k, v in st.items()}
    p.install_into(st)
    assert {k: v.data_ptr() for k, v in st.items()} == ptrs
    assert st["physical_to_logical_map"].tolist() == PHY2LOG
    assert st["logical_replica_count"].tolist() == LOGCNT
    assert torch.equal(st["logical_to_physical_map"], p.to_torch().logical_to_physical_map)
    # only some rows
    q = eplb.Placement.from_arrays([PHY2LOG[1], PHY2LOG[0]], 12)
    q.install_into(st, layers=[1])
    assert st["physical_to_logical_map"].tolist() == [PHY2LOG[0], PHY2LOG[0]]
    # numpy targets too
    arr = {k: v.numpy().copy() for k, v in st.items()}
    p.install_into(arr)
    assert arr["physical_to_logical_map"].tolist() == PHY2LOG


def test_install_into_refuses_wrong_shapes():
    p = eplb.Placement.from_arrays(PHY2LOG, 12)
    good = {"physical_to_logical_map": torch.zeros(2, 16, dtype=torch.int64),
            "logical_to_physical_map": torch.zeros(2, 12, 5, dtype=torch.int64),
            "logical_replica_count": torch.zeros(2, 12, dtype=torch.int64)}
    for name, shape, msg in (("physical_to_logical_map", (2, 15), "physical_to_logical_map has shape (2, 15)"),
                             ("logical_replica_count", (3, 12), "logical_replica_count has shape (3, 12)"),
                             ("logical_to_physical_map", (2, 12, 1), "R = 1")):
        bad = dict(good, **{name: torch.full(shape, 7, dtype=torch.int64)})
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            p.install_into(bad)
        assert bad["physical_to_logical_map"].sum() in (0, 7 * 30)  # nothing written
    with pytest.raises(ValueError, match="no logical_replica_count"):
        p.install_into({k: v for k, v in good.items() if k != "logical_replica_count"})


def test_handle_from_module():
    lm = TinyMoE(shm=False)
    h = eplb.handle_from_module(KimiLikeVLM(lm))
    assert h.architecture == "KimiLikeVLM" and list(h.interfaces) == [eplb_pb2.SUPPORTS_MULTIMODAL]
    assert h.language_model.architecture == "TinyMoE"
    assert list(h.language_model.interfaces) == [eplb_pb2.MIXTURE_OF_EXPERTS]
    m = h.language_model.moe
    assert (m.num_moe_layers, m.num_logical_experts, m.num_physical_experts, m.num_local_physical_experts,
            m.num_routed_experts, m.num_shared_experts, m.num_redundant_experts, m.num_expert_groups) == \
        (3, 8, 12, 3, 8, 1, 4, 2)
    h2 = eplb.handle_from_module(KimiLikeVLM(KimiLikeVLM(lm)))
    assert h2.language_model.language_model.moe.num_moe_layers == 3
    assert eplb.unwrap_moe(Drafter(KimiLikeVLM(lm)).model) is lm
    plain = eplb.handle_from_module(object())
    assert plain.architecture == "object" and not plain.interfaces


def test_handle_needs_no_torch():
    code = ("import sys; sys.path.insert(0, %r); import eplb\n"
            "class M:\n"
            "    num_moe_layers=2; num_logical_experts=4; num_physical_experts=6; num_local_physical_experts=3\n"
            "    num_routed_experts=4; num_shared_experts=0; num_redundant_experts=2; num_expert_groups=1\n"
            "h = eplb.handle_from_module(M()); assert h.moe.num_physical_experts == 6\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % eplb.__path__[0].rsplit("/", 1)[0])
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_from_module(client):
    r = client.register_model("vlm", KimiLikeVLM(TinyMoE(shm=False)), ep_size=4)
    assert r.registered and r.resolved_path == "KimiLikeVLM.language_model"
