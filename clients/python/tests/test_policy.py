"""RemoteEplbPolicy: vLLM's rebalance_experts signature, bit-exact with the
server's own Rebalance, vLLM's shapes/dtypes, callable on the class."""
import numpy as np
import pytest
import torch

import eplb
from eplb.vllm import RemoteEplbPolicy

LOAD = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_readme_example(eplbd):
    pol = RemoteEplbPolicy(target=eplbd.addr)
    phy2log, log2phy, logcnt = pol.rebalance_experts(torch.tensor(LOAD), 16, 4, 2, 8)
    assert phy2log.tolist() == PHY2LOG and logcnt.tolist() == LOGCNT
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (2, 16) and log2phy.shape == (2, 12, 5) and logcnt.shape == (2, 12)
    for layer in range(2):
        for e in range(12):
            row = log2phy[layer, e].tolist()
            n = LOGCNT[layer][e]
            assert sorted(row[:n]) == row[:n] and all(PHY2LOG[layer][s] == e for s in row[:n])
            assert row[n:] == [-1] * (5 - n)


def test_class_call_uses_default_instance(eplbd, monkeypatch):
    monkeypatch.setenv("EPLBD_ADDR", eplbd.addr)
    RemoteEplbPolicy.set_default(None)
    try:
        phy2log, _, _ = RemoteEplbPolicy.rebalance_experts(torch.tensor(LOAD), 16, 4, 2, 8)
        assert phy2log.tolist() == PHY2LOG
        assert RemoteEplbPolicy.default().client.target == eplbd.addr
    finally:
        RemoteEplbPolicy.set_default(None)


def test_matches_server_rebalance_deepseek_size(client):
    L, N, P, G, nodes, gpus = 58, 256, 288, 8, 4, 32
    rng = np.random.default_rng(7)
    load = rng.integers(0, 5000, size=(L, N)) * (1 + (rng.random((L, N)) < 0.05) * 20)
    client.register_model("ref", {"architecture": "DeepseekV3ForCausalLM", "interfaces": ["MIXTURE_OF_EXPERTS"],
                                  "moe": {"num_moe_layers": L, "num_logical_experts": N, "num_physical_experts": P,
                                          "num_local_physical_experts": P // gpus, "num_redundant_experts": P - N,
                                          "num_expert_groups": G}}, ep_size=gpus, num_nodes=nodes)
    ref = client.rebalance("ref", logical_load=load, dry_run=True, slot_order="algorithm",
                           include_logical_to_physical=True)
    pol = RemoteEplbPolicy(client=client)
    phy2log, log2phy, logcnt = pol.rebalance_experts(torch.from_numpy(load), P, G, nodes, gpus)
    maps = ref.placement.to_numpy()
    assert np.array_equal(phy2log.numpy(), maps.physical_to_logical_map)
    assert np.array_equal(log2phy.numpy(), maps.logical_to_physical_map)
    assert np.array_equal(logcnt.numpy(), maps.logical_replica_count)
    assert log2phy.shape == (L, N, P - N + 1)
    # stateless: a second call with other load on the same scratch model
    phy2, _, _ = pol.rebalance_experts(torch.from_numpy(load[::-1].copy()), P, G, nodes, gpus)
    assert not np.array_equal(phy2.numpy(), phy2log.numpy())
    assert [m.model_id for m in client.list_models()] == ["eplb.policy/L58-N256-P288-g8-n4-r32", "ref"]
    assert client.get_placement("eplb.policy/L58-N256-P288-g8-n4-r32").epoch == 0  # dry runs only


def test_bad_shapes(eplbd):
    pol = RemoteEplbPolicy(target=eplbd.addr)
    with pytest.raises(eplb.InvalidArgument):
        pol.rebalance_experts(torch.tensor(LOAD), 16, 4, 2, 3)  # 16 slots on 3 GPUs
    with pytest.raises(ValueError):
        pol.rebalance_experts(torch.tensor(LOAD) + 0.5, 16, 4, 2, 8)  # not token counts
