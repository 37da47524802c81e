"""RemoteEplbController(execution="engine"): one controller per EP rank (2
processes, gloo on loopback), each with only its own expert
tensors; every step_interval steps rearrange is collective: eplbd plans, the
ranks move the bytes with torch.distributed, every rank installs the maps."""
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(tmp_path, addr, **spec):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dict(dict(addr=addr, init="tcp://127.0.0.1:%d" % port, world=2, nodes=1, step_interval=6,
                     out=str(tmp_path)), **spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "vllm_engine_worker.py"),
                               str(tmp_path / "spec.json"), str(r)]) for r in range(spec["world"])]
    try:
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads((tmp_path / ("rank%d.json" % r)).read_text()) for r in range(spec["world"])]


@pytest.mark.parametrize("layers_per_step", [0, 1])
def test_engine_execution_moves_every_ranks_weights(eplbd, tmp_path, layers_per_step):
    import eplb

    with eplb.Client(eplbd.addr) as c:
        try:
            c.get_transfer_plan("x", "0", 0)
        except eplb.Unimplemented:  # pragma: no cover
            pytest.skip("this eplbd does not implement engine-executed rebalances")
        except eplb.EplbError:
            pass
    res = _run(tmp_path, eplbd.addr, layers_per_step=layers_per_step)
    for r in res:
        assert r["ok"], r.get("error")
        assert r["rearranged"] == 1 and r["committed"] and r["engine_moves_weights"] is False
        assert r["epoch"] >= 1 and r["local_epoch"] == r["epoch"]
        assert r["bad"] == [] and r["maps"] and r["same_tensor"]
        assert r["sent"] == 6
    if layers_per_step:
        assert res[0]["epoch"] > 1  # one commit per changed layer
