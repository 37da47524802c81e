"""The LoadRecorder's sender process (internal): reads passes from the shm
ring, packs them into RecordLoad(num_passes=k), and reports each call's
outcome in the ring's header (eplb._ring), so that the engine's process
needs no thread to hear it.  Started by eplb.recorder with its config as
JSON in argv[1]; the doorbell is stdin (one byte per pass; EOF = drain and
exit).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from ._ring import CALLS, EPOCH, ERR_AT, ERR_END, ERRORS, FAILED, HEAD, HEADER, READY, RECORDED, SENT, TAIL, WORDS


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if cfg.get("nice"):
        os.nice(cfg["nice"])  # background work: do not preempt the engine when woken
    import grpc

    from ._proto.eplb.v1 import eplb_pb2
    from ._wire import record_load_request
    from .client import Client
    from .errors import from_rpc_error

    L, P = cfg["shape"]
    cap = cfg["capacity"]
    mm = np.memmap(cfg["path"], dtype=np.uint8, mode="r+")  # the parent owns (and unlinks) it
    hdr = mm[:WORDS * 8].view(np.int64)
    ring = mm[HEADER:HEADER + cap * L * P * 8].view(np.int64).reshape(cap, L, P)
    client = Client(cfg["target"], timeout=cfg["timeout"], tls=cfg["tls"], read_retries=0)
    call = client.channel.unary_unary("/eplb.v1.ExpertBalancer/RecordLoad", request_serializer=None,
                                      response_deserializer=eplb_pb2.RecordLoadResponse.FromString)
    hdr[READY] = 1
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    eof = False
    try:
        while True:
            head, tail = int(hdr[HEAD]), int(hdr[TAIL])
            if head == tail:
                if eof:
                    break
                if not os.read(stdin.fileno(), 65536):
                    eof = True
                continue
            k = min(head - tail, cfg["max_batch"])
            idx = [(tail + j) % cap for j in range(k)]
            packed = ring[idx]          # a copy: the slots can be reused now
            hdr[TAIL] = tail + k
            err = None
            try:
                r = call(record_load_request(cfg["model_id"], packed, k), timeout=cfg["timeout"])
            except grpc.RpcError as e:
                ee = from_rpc_error(e, "RecordLoad")
                err = (ee.code.name, ee.message)
            except Exception as e:  # noqa: BLE001
                err = ("UNKNOWN", "%s: %s" % (type(e).__name__, e))
            if err is None:
                hdr[RECORDED], hdr[EPOCH] = r.passes_recorded, r.epoch
                hdr[SENT] += k
            else:
                text = (err[0] + "\0" + err[1]).encode()[:ERR_END - ERR_AT - 1] + b"\0"
                mm[ERR_AT:ERR_AT + len(text)] = np.frombuffer(text, dtype=np.uint8)
                hdr[ERRORS] += 1
                hdr[FAILED] += k
            hdr[CALLS] += 1
    finally:
        client.close()
        del hdr, ring, mm
    return 0


if __name__ == "__main__":
    sys.exit(main())
