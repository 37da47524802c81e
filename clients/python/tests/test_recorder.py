"""LoadRecorder: batching into RecordLoad(num_passes=k), drops, flush, errors."""
import os
import signal
import time

import numpy as np
import pytest
import torch

import eplb

MOE = {"architecture": "X", "interfaces": ["MIXTURE_OF_EXPERTS"],
       "moe": {"num_moe_layers": 2, "num_logical_experts": 4, "num_physical_experts": 6,
               "num_local_physical_experts": 3, "num_redundant_experts": 2}}


def test_records_every_pass_torch_and_numpy(client):
    client.register_model("m", MOE, ep_size=2)
    with eplb.LoadRecorder(client, "m", max_pending=512) as rec:  # 300 passes faster than any RPC
        assert rec.shape == (2, 6)
        total = np.zeros((2, 6), dtype=np.int64)
        for i in range(300):
            load = torch.full((2, 6), i % 7, dtype=torch.int32) if i % 2 else np.full((2, 6), i % 5)
            total += np.asarray(load)
            assert rec.record(load)
            if i == 11:
                load.fill_(0)  # a torch pass: the recorder kept its own copy
        rec.flush()
        assert rec.sent == 300 and rec.dropped == 0 and rec.failed == 0
        assert rec.calls < 300  # packed
        assert rec.last_passes_recorded == 300
    # the server counted exactly the recorded load: a rebalance from its window
    # equals one from the summed load
    a = client.rebalance("m", dry_run=True)
    b = client.rebalance("m", physical_load=total, dry_run=True)
    assert a.placement == b.placement and a.balancedness_before == b.balancedness_before


def test_drops_instead_of_blocking(client):
    client.register_model("m", MOE, ep_size=2)
    rec = eplb.LoadRecorder(client, "m", max_pending=4, max_batch=2)
    os.kill(rec.pid, signal.SIGSTOP)  # the sender takes nothing: the ring fills
    try:
        t0 = time.perf_counter()
        ok = [rec.record(np.ones((2, 6))) for _ in range(20)]
        assert time.perf_counter() - t0 < 1.0
        assert ok == [True] * 4 + [False] * 16 and rec.dropped == 16
    finally:
        os.kill(rec.pid, signal.SIGCONT)
    rec.close()
    assert rec.sent == 4 and rec.calls == 2
    assert client.record_load("m", np.zeros((2, 6))).passes_recorded == 5


def test_sender_process_gone(client):
    client.register_model("m", MOE, ep_size=2)
    rec = eplb.LoadRecorder(client, "m")
    os.kill(rec.pid, signal.SIGKILL)
    rec._proc.wait()
    rec.record(np.ones((2, 6)))
    with pytest.raises(RuntimeError, match="sender exited"):
        rec.flush()


def test_errors_surface_in_flush(client):
    rec = eplb.LoadRecorder(client, "unknown-model", shape=(2, 6))
    rec.record(np.zeros((2, 6)))
    with pytest.raises(eplb.NotFound, match="unknown-model"):
        rec.flush()
    assert rec.failed == 1
    rec.flush()  # the error was reported once
    with pytest.raises(ValueError, match="shape"):
        rec.record(np.zeros((3, 6)))
    rec.close()
    with pytest.raises(RuntimeError):
        rec.record(np.zeros((2, 6)))


def test_negative_load_rejected_by_server(client):
    client.register_model("m", MOE, ep_size=2)
    with eplb.LoadRecorder(client, "m") as rec:
        rec.record(np.full((2, 6), -1))
        with pytest.raises(eplb.InvalidArgument):
            rec.flush()
