"""RemoteEplbController played by a fake model runner against a real eplbd:
a multimodal wrapper around an MoE with shm weights, an MoE drafter; register,
record with the LoadRecorder, rearrange, installed tensors equal
GetPlacement, weights moved in shm and checked per slot."""
import numpy as np
import pytest
import torch

import eplb
from eplb.vllm import RemoteEplbController
from models import Cfg, Drafter, KimiLikeVLM, TinyMoE


def parallel(step_interval=10, window=100, enable=True):
    return Cfg(enable_eplb=enable, enable_elastic_ep=False,
               eplb_config=Cfg(window_size=window, step_interval=step_interval, num_redundant_experts=4,
                               log_balancedness=False))


def assert_installed(test_client, st):
    p = test_client.get_placement(st.model_id, include_logical_to_physical=True)
    m = p.to_numpy()
    assert torch.equal(st.physical_to_logical_map, torch.from_numpy(m.physical_to_logical_map))
    assert torch.equal(st.logical_to_physical_map, torch.from_numpy(m.logical_to_physical_map))
    assert torch.equal(st.logical_replica_count, torch.from_numpy(m.logical_replica_count))
    return p


def run_passes(ctl, moe, n, start=0):
    for step in range(start, start + n):
        load_view = moe.eplb_state[0]            # what the MoE layers add into
        load_view.add_(moe.forward_load(step))
        ctl.step()


def test_model_runner_with_attached_weights(client):
    lm = TinyMoE(layers=3, logical=8, redundant=4, ep=4)
    draft_lm = TinyMoE(layers=1, logical=8, redundant=4, ep=4, shm=False)
    try:
        lm.fill(eplb.Placement.from_arrays([[e % 8 for e in range(12)]] * 3, 8).physical_to_logical)
        ctl = RemoteEplbController(parallel(step_interval=10), "cpu", client=client)
        assert not ctl.maybe_register_model(KimiLikeVLM(lm), Cfg(model="x/y"), load_dummy_weights=True)
        assert ctl.maybe_register_model(KimiLikeVLM(lm), Cfg(model="moonshot/Kimi K2.5"), False)
        drafter = Drafter(KimiLikeVLM(draft_lm))
        assert ctl.maybe_register_speculator(drafter, Cfg(draft_model_config=Cfg(model="moonshot/Kimi-draft")), False)
        main, draft = ctl.state, ctl.models["moonshot/Kimi-draft.draft"]
        assert main.model_id == "moonshot/Kimi-K2.5" and main.weights_attached and not draft.weights_attached
        assert drafter.state is draft
        summary = {m.model_id: m for m in client.list_models()}
        assert summary["moonshot/Kimi-draft.draft"].role == "MODEL_ROLE_SPECULATOR"
        assert summary["moonshot/Kimi-draft.draft"].main_model_id == main.model_id
        # EplbState shapes and dtypes, handed to the model
        assert main.physical_to_logical_map.shape == (3, 12) and main.logical_to_physical_map.shape == (3, 8, 5)
        assert main.logical_replica_count.dtype == torch.int64 and main.expert_load_pass.shape == (3, 12)
        assert lm.eplb_state[1] is main.logical_to_physical_map
        ptrs = [t.data_ptr() for t in (main.physical_to_logical_map, main.logical_to_physical_map,
                                       main.logical_replica_count)]
        ctl.step(is_dummy=True)                   # not counted
        run_passes(ctl, lm, 9)
        assert main.placement.epoch == 0
        draft_lm.eplb_state[0].add_(5)
        run_passes(ctl, lm, 1, start=9)           # the 10th: rearrange
        assert main.placement.epoch == 1 and draft.placement.epoch == 1
        assert [t.data_ptr() for t in (main.physical_to_logical_map, main.logical_to_physical_map,
                                       main.logical_replica_count)] == ptrs
        p = assert_installed(client, main)
        assert_installed(client, draft)
        assert not np.array_equal(p.physical_to_logical, [[e % 8 for e in range(12)]] * 3)
        assert lm.check(p.physical_to_logical) == []   # eplbd moved the bytes
        assert ctl.last_rearrangement[0].engine_moves_weights is False
        assert ctl.last_rearrangement[1].engine_moves_weights is True
        # the server counted exactly the 10 real passes of the main model
        assert main.recorder.sent == 10 and main.recorder.dropped == 0
        # vLLM's profile rearrange is a dry run
        out = ctl.rearrange(is_profile=True)
        assert not out[0].result.committed and main.placement.epoch == 1
        ctl.close()
        client.detach_weights(main.model_id)
    finally:
        lm.release()


def test_stepped_rearrange_between_passes(client):
    lm = TinyMoE(layers=3, logical=8, redundant=4, ep=4)
    try:
        lm.fill(eplb.Placement.from_arrays([[e % 8 for e in range(12)]] * 3, 8).physical_to_logical)
        ctl = RemoteEplbController(parallel(step_interval=5), "cpu", client=client, model_name="stepped",
                                   layers_per_step=1)
        assert ctl.maybe_register_model(lm, Cfg(model="ignored"), False)
        st = ctl.state
        run_passes(ctl, lm, 5)                    # rearrange: first changed layer only
        assert st.pending is not None and st.placement.epoch == 1
        assert_installed(client, st)
        assert lm.check(st.placement.physical_to_logical) == []
        epochs = [st.placement.epoch]
        for step in range(5, 9):
            run_passes(ctl, lm, 1, start=step)    # each step continues one layer
            assert_installed(client, st)
            assert lm.check(st.placement.physical_to_logical) == []
            epochs.append(st.placement.epoch)
        assert st.pending is None and st.placement.pending_rebalance_id == ""
        assert epochs[:3] == [1, 2, 3]
        ctl.close()
        client.detach_weights("stepped")
    finally:
        lm.release()


def test_without_weights_engine_gets_maps(client):
    lm = TinyMoE(shm=False)
    ctl = RemoteEplbController(parallel(), "cpu", client=client, model_name="noweights")
    assert ctl.maybe_register_model(lm, Cfg(model="m"), False)
    logical = np.zeros((3, 8), dtype=np.int64)
    logical[:, 2] = 1000
    logical[:, 5] = 10
    (r,) = ctl.rearrange(global_expert_loads=[logical])
    assert r.engine_moves_weights and r.result.committed
    assert r.old_physical_to_logical.tolist() == [[e % 8 for e in range(12)]] * 3
    assert (r.new_physical_to_logical == 2).sum() > 3  # the hot expert got replicas
    assert_installed(client, ctl.state)
    ctl.close()


def test_setup_from_mapping_and_disabled(client):
    lm = TinyMoE(shm=False)
    ctl = RemoteEplbController(parallel(), "cpu", client=client, model_name="elastic")
    assert ctl.maybe_register_model(KimiLikeVLM(lm), Cfg(model="m"), False)
    lm.num_physical_experts, lm.num_local_physical_experts = 16, 4     # the engine grew to 16 slots
    expanded = np.array([[e % 8 for e in range(12)] + [-1] * 4] * 3)
    ctl.setup_from_mapping(KimiLikeVLM(lm), Cfg(model="m"), torch.from_numpy(expanded), 12)
    st = ctl.state
    assert st.physical_to_logical_map.shape == (3, 16) and st.logical_to_physical_map.shape == (3, 8, 9)
    assert lm.eplb_state[0] is st.expert_load_pass and st.expert_load_pass.shape == (3, 16)
    assert_installed(client, st)
    ctl.close()
    off = RemoteEplbController(parallel(enable=False), "cpu", client=client)
    assert not off.maybe_register_model(lm, Cfg(model="m"), False)
    off.step()
    on = RemoteEplbController(parallel(), "cpu", client=client)
    assert not on.maybe_register_model(object(), Cfg(model="m"), False)   # no MoE anywhere
    assert not on.maybe_register_model(KimiLikeVLM(object()), Cfg(model="m"), False)
    assert client.list_models()[0].model_id == "elastic" and len(client.list_models()) == 1


def test_errors_reach_the_runner(client):
    ctl = RemoteEplbController(parallel(), "cpu", client=client, model_name="bad name!")
    with pytest.raises(eplb.InvalidArgument):
        ctl.maybe_register_model(TinyMoE(shm=False), Cfg(model="m"), False)


def test_step_resyncs_after_a_commit_elsewhere(client):
    ctl = RemoteEplbController(parallel(step_interval=3), "cpu", client=client, model_name="shared")
    lm = TinyMoE(shm=False)
    assert ctl.maybe_register_model(lm, Cfg(model="m"), False)
    load = np.zeros((3, 12), dtype=np.int64)
    load[:, 1] = 999
    other = client.rebalance("shared", physical_load=load)          # an operator commits epoch 1
    run_passes(ctl, lm, 3)                                           # the controller's rebalance is ABORTED
    assert ctl.state.placement.epoch == 1
    assert_installed(client, ctl.state)
    assert other.placement.epoch == 1
    ctl.close()
