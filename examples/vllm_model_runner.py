#!/usr/bin/python3
"""A model runner using eplbd for EPLB, the way vLLM's Model Runner V2 uses its
EPLBController: a toy MoE (vLLM's MixtureOfExperts attributes, expert weights
in POSIX shm so eplbd moves them), forward passes that count tokens per
expert slot, and a rebalance every 20 passes.

Run against a local eplbd (bash scripts/run.sh, or $EPLBD_ADDR):
    PYTHONPATH=clients/python /usr/bin/python3 examples/vllm_model_runner.py
"""
import types

import torch

from eplb import weights
from eplb.vllm import RemoteEplbController


class ToyMoE(torch.nn.Module):
    num_moe_layers, num_logical_experts, num_physical_experts = 4, 8, 12
    num_local_physical_experts, num_routed_experts, num_redundant_experts = 3, 8, 4
    num_shared_experts, num_expert_groups = 0, 1

    def __init__(self):
        super().__init__()  # one process holds all 4 EP ranks' weights here
        self.expert_weights_per_rank = [[[weights.shm_tensor((3, 16), torch.float32)] for _ in range(4)]
                                        for _ in range(4)]
        self.expert_weights = self.expert_weights_per_rank[0]

    def set_eplb_state(self, expert_load_view, logical_to_physical_map, logical_replica_count):
        self.load = expert_load_view  # the MoE layers add tokens per slot into it

    def forward(self, step):
        self.load[:, step % 3] += 100  # the first GPU's experts are hot


model = ToyMoE()
cfg = types.SimpleNamespace(enable_eplb=True, eplb_config=types.SimpleNamespace(window_size=100, step_interval=20))
eplb = RemoteEplbController(cfg, "cpu", model_name="toy-moe-example")
eplb.maybe_register_model(model, types.SimpleNamespace(model="toy-moe"), load_dummy_weights=False)
for layer in range(4):  # each slot's bytes say which expert it holds
    for s, e in enumerate(eplb.state.physical_to_logical_map[layer].tolist()):
        model.expert_weights_per_rank[s // 3][layer][0][s % 3].fill_(e)
for step in range(20):
    model(step)
    eplb.step()  # records the pass; the 20th rebalances (eplbd moves the weights)
p2l = eplb.state.physical_to_logical_map
print("epoch %d, layer 0 slots -> experts: %s" % (eplb.state.placement.epoch, p2l[0].tolist()))
for layer in range(4):
    for s, e in enumerate(p2l[layer].tolist()):
        assert torch.all(model.expert_weights_per_rank[s // 3][layer][0][s % 3] == e)
print("weights checked: every slot holds its expert")
eplb.client.delete_model("toy-moe-example", force=True)
eplb.close()
for rank in model.expert_weights_per_rank:
    for layer in rank:
        weights.release(layer[0])
