"""A fake vLLM-shaped model zoo for the tests: a tiny MoE nn.Module with
per-layer w13/w2 expert tensors in shm (every EP rank's, one process), a
multimodal wrapper with get_language_model(), and an MoE drafter."""
from typing import Any, List

import torch
from torch import nn

from eplb import weights

H, I = 8, 4  # hidden, intermediate: w13 [local, 2I, H], w2 [local, H, I]


def expert_value(layer: int, tensor: int, expert: int, num_logical: int = 8) -> float:
    """What every element of expert `expert`'s tensor `tensor` (0 or 1) in
    `layer` holds: distinct per (layer, tensor, expert), and exact in bf16
    (an integer < 256) for the small models of the tests."""
    v = expert + num_logical * (tensor + 2 * layer)
    assert v < 256, "model too large for exact bf16 patterns"
    return float(v)


class TinyMoE(nn.Module):
    """MixtureOfExperts attributes + expert weights in shm for every rank."""

    def __init__(self, layers: int = 3, logical: int = 8, redundant: int = 4, ep: int = 4, groups: int = 2,
                 shm: bool = True) -> None:
        super().__init__()
        self.num_moe_layers = layers
        self.num_logical_experts = logical
        self.num_physical_experts = logical + redundant
        self.num_local_physical_experts = self.num_physical_experts // ep
        self.num_routed_experts = logical
        self.num_shared_experts = 1
        self.num_redundant_experts = redundant
        self.num_expert_groups = groups
        self.ep = ep
        self.eplb_state: Any = None
        self.expert_weights_per_rank: List[List[dict]] = []
        if shm:
            S = self.num_local_physical_experts
            for _ in range(ep):
                self.expert_weights_per_rank.append([
                    {"w13": weights.shm_tensor((S, 2 * I, H), torch.float32),
                     "w2": weights.shm_tensor((S, H, I), torch.bfloat16)} for _ in range(layers)])
            self.expert_weights = [list(d.values()) for d in self.expert_weights_per_rank[0]]

    def set_eplb_state(self, expert_load_view, logical_to_physical_map, logical_replica_count) -> None:
        self.eplb_state = (expert_load_view, logical_to_physical_map, logical_replica_count)

    def fill(self, phy2log) -> None:
        S = self.num_local_physical_experts
        for r, layers in enumerate(self.expert_weights_per_rank):
            for li, d in enumerate(layers):
                for ti, t in enumerate(d.values()):
                    for i in range(S):
                        t[i].fill_(expert_value(li, ti, int(phy2log[li][r * S + i]), self.num_logical_experts))

    def check(self, phy2log) -> List[str]:
        bad = []
        S = self.num_local_physical_experts
        for r, layers in enumerate(self.expert_weights_per_rank):
            for li, d in enumerate(layers):
                for ti, t in enumerate(d.values()):
                    for i in range(S):
                        want = expert_value(li, ti, int(phy2log[li][r * S + i]), self.num_logical_experts)
                        if not torch.all(t[i].float() == want):
                            bad.append("layer %d slot %d tensor %d" % (li, r * S + i, ti))
        return bad

    def forward_load(self, step: int) -> torch.Tensor:
        """A pass's expert load [L, P]: skewed, deterministic."""
        L, P = self.num_moe_layers, self.num_physical_experts
        g = torch.Generator().manual_seed(step)
        load = torch.randint(0, 10, (L, P), generator=g, dtype=torch.int64)
        load[:, 0] += 200  # expert 0's slot is hot
        load[:, 3] += 90
        return load

    def release(self) -> None:
        for layers in self.expert_weights_per_rank:
            for d in layers:
                for t in d.values():
                    weights.release(t)


class KimiLikeVLM(nn.Module):
    """A multimodal wrapper (not MoE itself) around an MoE language model."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.language_model = lm

    def get_language_model(self) -> nn.Module:
        return self.language_model


class Drafter(nn.Module):
    """A speculator whose .model is an MoE (wrapped in a VLM, to be unwrapped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.state = None

    def set_eplb_state(self, state) -> None:
        self.state = state


class Cfg:
    """Duck-typed vLLM configs."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
