"""LoadRecorder: expert load off the engine thread, batched into RecordLoad."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from . import errors

__all__ = ["LoadRecorder"]

from ._ring import CALLS, EPOCH, ERR_AT, ERR_END, ERRORS, FAILED, HEAD, HEADER, READY, RECORDED, SENT, TAIL, WORDS
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LoadRecorder:
    """Records forward passes' expert load [L, P] with RecordLoad, in the background.

    ``record(load)`` costs the engine thread one copy into a ring of
    ``max_pending`` pass buffers in shared memory and a one-byte doorbell
    write: numpy and CPU tensors are copied (``np.copyto`` /
    ``Tensor.copy_``, dtype converted to int64); CUDA tensors are copied
    non-blocking into pinned host buffers with an event on the current
    stream, and moved into the ring by a later ``record``/``flush`` once the
    event has completed (the engine never waits for the GPU).

    A sender *process* (``python -m eplb._sender``, started here) packs what
    the ring holds, up to ``max_batch`` passes, into one
    ``RecordLoad(num_passes=k)``.  A process, not a thread: building and
    serializing ~17k int64 per pass holds the GIL for milliseconds, which
    would stall the engine thread (measured in docs/benchmarks.md).  Its
    answers come back through the ring's header: this process runs no
    thread of its own.

    When the ring is full ``record`` drops the pass and counts it in
    :attr:`dropped` rather than blocking.  A failed RecordLoad is not
    retried (the server may have counted it): its passes are counted in
    :attr:`failed` and :meth:`flush` (or :meth:`close`) raises the error, as
    the :class:`eplb.EplbError` subclass of its status.

    Args:
        client: an :class:`eplb.Client` (its target, TLS and timeout are used
            by the sender process's own channel).
        model_id: the registered model.
        shape: (L, P); default: the model's, from GetPlacement.
        max_batch: passes per RecordLoad at most.
        max_pending: passes recorded and not yet taken by the sender, at most.
        timeout: seconds per RecordLoad (default the client's).
        nice: the sender process's niceness increment (background work: on a
            busy host it should not preempt the engine thread when woken).
    """

    def __init__(self, client: Any, model_id: str, *, shape: Optional[Sequence[int]] = None,
                 max_batch: int = 32, max_pending: int = 64, timeout: Optional[float] = None,
                 nice: int = 10) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        self.client = client
        self.model_id = model_id
        if shape is None:
            p = client.get_placement(model_id)
            shape = (p.num_layers, p.num_physical_experts)
        self.shape: Tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.max_batch = max_batch
        self.max_pending = max_pending
        L, P = self.shape
        self._path = "/dev/shm/eplb-recorder-%d-%s" % (os.getpid(), secrets.token_hex(6))
        size = HEADER + max_pending * L * P * 8
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self._mm = np.memmap(self._path, dtype=np.uint8, mode="r+", shape=(size,))
        self._hdr = self._mm[:WORDS * 8].view(np.int64)
        self._ring = self._mm[HEADER:].view(np.int64).reshape(max_pending, L, P)
        self._ring.fill(0)  # fault every page in now, not on the engine thread's first lap
        self._head = 0                              # passes published (the engine's own copy)
        self._torch_ring: Optional[List[Any]] = None  # CPU tensors over the ring's slots
        self._pinned: List[Any] = []                # free pinned buffers (CUDA loads)
        self._inflight: List[Tuple[Any, Any]] = []  # (event, pinned) not yet in the ring
        self.recorded = 0        # passes accepted by record()
        self.dropped = 0         # passes dropped: ring full
        self._errors_seen = 0
        self._closed = False
        tls = getattr(client, "tls", None)
        cfg = {"path": self._path, "shape": [L, P], "capacity": max_pending, "max_batch": max_batch,
               "model_id": model_id, "target": client.target,
               "timeout": timeout if timeout is not None else getattr(client, "timeout", 30.0),
               "tls": asdict(tls) if tls is not None else None, "nice": nice}
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen([sys.executable, "-m", "eplb._sender", json.dumps(cfg)], env=env,
                                      stdin=subprocess.PIPE, bufsize=0)
        assert self._proc.stdin is not None
        self._bell = self._proc.stdin.fileno()
        os.set_blocking(self._bell, False)
        deadline = time.monotonic() + 30
        while not self._hdr[READY]:  # passes recorded before the sender is up would pile up
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the LoadRecorder's sender did not start (exit status %s)"
                                   % self._proc.returncode)
            time.sleep(0.005)

    @property
    def sent(self) -> int:
        """Passes the server accepted."""
        return int(self._hdr[SENT])

    @property
    def failed(self) -> int:
        """Passes in RecordLoad calls that failed (not retried)."""
        return int(self._hdr[FAILED])

    @property
    def calls(self) -> int:
        """RecordLoad calls answered."""
        return int(self._hdr[CALLS])

    @property
    def last_passes_recorded(self) -> int:
        """passes_recorded of the last successful RecordLoad (the server's count for the model)."""
        return int(self._hdr[RECORDED])

    @property
    def last_epoch(self) -> int:
        """epoch of the last successful RecordLoad's answer."""
        return int(self._hdr[EPOCH])

    @property
    def pid(self) -> int:
        """The sender process's id."""
        return self._proc.pid

    # ---- engine thread ------------------------------------------------------------

    def record(self, load: Any) -> bool:
        """Queue one pass's load [L, P] (numpy array or torch tensor, any
        integer dtype, CPU or CUDA).  Returns at once: True if queued, False
        if dropped (ring full; counted in :attr:`dropped`)."""
        if self._closed:
            raise RuntimeError("LoadRecorder is closed")
        if tuple(load.shape) != self.shape:
            raise ValueError("load has shape %s, expected %s" % (tuple(load.shape), self.shape))
        if self._inflight:
            self._publish_cuda()
        if not isinstance(load, np.ndarray) and load.is_cuda:
            return self._record_cuda(load)
        if self._head - int(self._hdr[TAIL]) >= self.max_pending:
            self.dropped += 1
            return False
        i = self._head % self.max_pending
        if isinstance(load, np.ndarray):
            np.copyto(self._ring[i], load, casting="unsafe")
        else:
            if self._torch_ring is None:
                import torch

                self._torch_ring = [torch.from_numpy(self._ring[k]) for k in range(self.max_pending)]
            self._torch_ring[i].copy_(load)
        self._publish()
        return True

    def _publish(self) -> None:
        # x86-64 keeps stores in order: the slot's bytes are visible before head.
        self._head += 1
        self._hdr[HEAD] = self._head
        self.recorded += 1
        try:
            os.write(self._bell, b"\x01")
        except BlockingIOError:  # the sender has a backlog of doorbells: it will see head
            pass
        except BrokenPipeError:  # the sender is gone: flush() says so
            pass

    def _record_cuda(self, load: Any) -> bool:
        import torch

        if len(self._inflight) >= self.max_pending:
            self.dropped += 1
            return False
        buf = self._pinned.pop() if self._pinned else torch.empty(self.shape, dtype=torch.int64).pin_memory()
        buf.copy_(load, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(load.device))
        self._inflight.append((ev, buf))
        return True

    def _publish_cuda(self, wait: bool = False) -> None:
        while self._inflight:
            ev, buf = self._inflight[0]
            if wait:
                ev.synchronize()
            elif not ev.query():
                return
            self._inflight.pop(0)
            if self._head - int(self._hdr[TAIL]) >= self.max_pending:
                self.dropped += 1
            else:
                np.copyto(self._ring[self._head % self.max_pending], buf.numpy())
                self._publish()
            self._pinned.append(buf)

    def _take_error(self) -> Optional[BaseException]:
        n = int(self._hdr[ERRORS])
        if n == self._errors_seen:
            return None
        self._errors_seen = n
        raw = bytes(self._mm[ERR_AT:ERR_END]).split(b"\0")
        code, message = raw[0].decode(errors="replace"), raw[1].decode(errors="replace") if len(raw) > 1 else ""
        cls = next((c for c in errors._BY_CODE.values() if c.code.name == code), errors.EplbError)
        return cls(message, method="RecordLoad")

    # ---- control ----------------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> None:
        """Return when every pass recorded so far has been answered by the
        server.  Raises the first RecordLoad error since the last flush (the
        passes of that call are lost: :attr:`failed`), or TimeoutError."""
        if self._inflight:
            self._publish_cuda(wait=True)
        target = self.recorded
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0002
        while self.sent + self.failed < target:
            if self._proc.poll() is not None:
                if self.sent + self.failed < target:
                    raise RuntimeError("the LoadRecorder's sender exited with %s; %d passes unsent"
                                       % (self._proc.returncode, target - self.sent - self.failed))
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("LoadRecorder.flush: %d of %d passes still pending"
                                   % (target - self.sent - self.failed, target))
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        err = self._take_error()
        if err is not None:
            raise err

    def close(self, timeout: Optional[float] = None) -> None:
        """Send what is queued, stop the sender; raises as :meth:`flush`."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            assert self._proc.stdin is not None
            self._proc.stdin.close()   # EOF: the sender drains and exits
            try:
                self._proc.wait(timeout if timeout is not None else 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._torch_ring = None
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "LoadRecorder":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original exception
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._proc.kill()
                os.unlink(self._path)
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return ("LoadRecorder(%r, recorded=%d, sent=%d, dropped=%d, failed=%d)"
                % (self.model_id, self.recorded, self.sent, self.dropped, self.failed))
