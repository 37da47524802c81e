"""One EP rank of test_vllm_engine.py: a model runner with its own
RemoteEplbController(execution="engine") and its own expert tensors (plain
torch, this rank's slots only), gloo on loopback, eplbd as the authority.

Run: python3 vllm_engine_worker.py SPEC.json RANK  (writes OUT/rank<R>.json)
"""
import datetime
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import eplb  # noqa: E402
from eplb.vllm import RemoteEplbController  # noqa: E402
from models import Cfg, TinyMoE, expert_value  # noqa: E402


def main():
    spec = json.load(open(sys.argv[1]))
    rank = int(sys.argv[2])
    res = {"rank": rank, "ok": False}
    try:
        dist.init_process_group("gloo", init_method=spec["init"], rank=rank, world_size=spec["world"],
                                timeout=datetime.timedelta(seconds=20))
        world = spec["world"]
        moe = TinyMoE(layers=3, logical=8, redundant=4, ep=world, shm=False)
        S = moe.num_local_physical_experts
        moe.ep_rank = rank
        moe.expert_weights = [[torch.zeros((S, 8, 8)), torch.zeros((S, 8, 4), dtype=torch.bfloat16)]
                              for _ in range(3)]

        def fill(p2l):
            for li, ts in enumerate(moe.expert_weights):
                for ti, t in enumerate(ts):
                    for i in range(S):
                        t[i].fill_(expert_value(li, ti, int(p2l[li][rank * S + i])))

        def wrong(p2l):
            return [[li, i, ti] for li, ts in enumerate(moe.expert_weights) for ti, t in enumerate(ts)
                    for i in range(S)
                    if not torch.all(t[i].float() == expert_value(li, ti, int(p2l[li][rank * S + i])))]

        client = eplb.Client(spec["addr"], timeout=30)
        cfg = Cfg(enable_eplb=True, enable_elastic_ep=False,
                  eplb_config=Cfg(window_size=100, step_interval=spec["step_interval"], num_redundant_experts=4))
        ctl = RemoteEplbController(cfg, "cpu", client=client, model_name="eng", num_nodes=spec["nodes"],
                                   execution="engine", layers_per_step=spec.get("layers_per_step", 0))
        assert ctl.maybe_register_model(moe, Cfg(model="eng"))
        st = ctl.state
        assert not st.weights_attached
        fill(st.placement.physical_to_logical)
        ptr = st.physical_to_logical_map.data_ptr()
        for step in range(spec["step_interval"]):
            moe.eplb_state[0].add_(moe.forward_load(step * world + rank))
            ctl.step()
        served = client.get_placement("eng")
        res["epoch"] = served.epoch
        res["local_epoch"] = st.placement.epoch
        res["bad"] = wrong(served.physical_to_logical)
        res["maps"] = bool(torch.equal(st.physical_to_logical_map, torch.from_numpy(served.physical_to_logical)))
        res["same_tensor"] = st.physical_to_logical_map.data_ptr() == ptr
        r = ctl.last_rearrangement
        res["rearranged"] = len(r)
        res["engine_moves_weights"] = r[0].engine_moves_weights if r else None
        res["committed"] = bool(r and r[0].result is not None and r[0].result.committed)
        res["sent"] = st.recorder.sent
        res["reason"] = r[0].result.reason if r and r[0].result is not None else None
        ctl.close()
        res["ok"] = True
    except Exception:
        res["error"] = traceback.format_exc()
    out = os.path.join(spec["out"], "rank%d.json" % rank)
    with open(out + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(out + ".tmp", out)
    os._exit(0)


if __name__ == "__main__":
    main()
