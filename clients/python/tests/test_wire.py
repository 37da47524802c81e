"""The LoadRecorder's numpy-built RecordLoadRequest bytes equal protobuf's."""
import numpy as np

from eplb._proto.eplb.v1 import eplb_pb2
from eplb._wire import packed_varints, record_load_request


def ref(model_id, load, num_passes, is_dummy=False):
    req = eplb_pb2.RecordLoadRequest(model_id=model_id, num_passes=num_passes, is_dummy=is_dummy)
    req.physical_load.extend(np.asarray(load).ravel().tolist())
    return req.SerializeToString()


def test_edges_and_random():
    edges = np.array([0, 1, 127, 128, 255, 16383, 16384, 2 ** 21 - 1, 2 ** 21, 2 ** 35, 2 ** 56 - 1])
    assert record_load_request("m", edges, 1) == ref("m", edges, 1)
    rng = np.random.default_rng(3)
    for hi in (2, 128, 1 << 14, 1 << 30, 1 << 50):
        a = rng.integers(0, hi, (3, 58, 288))
        assert record_load_request("deepseek-ai/DeepSeek-V3", a, 3) == ref("deepseek-ai/DeepSeek-V3", a, 3)
    z = np.zeros((2, 6), dtype=np.int64)
    assert record_load_request("x", z, 0, True) == ref("x", z, 0, True)


def test_fallbacks():
    for a in (np.array([[-1, 5]]), np.array([[2 ** 63 - 1, 0]])):
        assert packed_varints(a) is None
        assert record_load_request("m", a, 1) == ref("m", a, 1)
    assert packed_varints(np.zeros((0,), dtype=np.int64)) == b""
