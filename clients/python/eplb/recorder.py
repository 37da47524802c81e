"""LoadRecorder: expert load off the engine thread, batched into RecordLoad."""
from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .errors import EplbError

__all__ = ["LoadRecorder"]

_STOP = object()


class LoadRecorder:
    """Records forward passes' expert load [L, P] with RecordLoad, in the background.

    ``record(load)`` costs the engine thread one copy into a preallocated
    buffer and a queue put: numpy and CPU tensors are copied
    (``np.copyto`` / ``Tensor.copy_``); CUDA tensors are copied
    non-blocking into pinned host memory with an event recorded on the
    current stream (the background thread waits for the event, the engine
    never does).  A background thread packs whatever is queued, up to
    ``max_batch`` passes, into one ``RecordLoad(num_passes=k)``.

    There are ``max_pending`` buffers: when all hold passes not yet sent,
    ``record`` drops the pass and counts it in :attr:`dropped` rather than
    blocking the engine.  A failed RecordLoad is not retried (the server may
    have counted it): its passes are counted in :attr:`failed`, the error is
    kept, and :meth:`flush` (or :meth:`close`) raises it.

    Args:
        client: an :class:`eplb.Client`.
        model_id: the registered model.
        shape: (L, P); default: the model's, from GetPlacement.
        max_batch: passes per RecordLoad at most.
        max_pending: buffers (passes recorded and not yet sent) at most.
        device: for CUDA loads, the device of the pinned buffers' events
            (default: the first load's device).
    """

    def __init__(self, client: Any, model_id: str, *, shape: Optional[Sequence[int]] = None,
                 max_batch: int = 64, max_pending: int = 256, timeout: Optional[float] = None) -> None:
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
        self.timeout = timeout
        self._buf = np.zeros((max_pending,) + self.shape, dtype=np.int64)
        self._torch_views: Optional[List[Any]] = None   # CPU tensors over self._buf
        self._pinned: Optional[List[Any]] = None        # pinned host tensors (CUDA loads)
        self._events: Optional[List[Any]] = None
        self._free: collections.deque = collections.deque(range(max_pending))
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._cond = threading.Condition()
        self.recorded = 0        # passes accepted by record()
        self.dropped = 0         # passes dropped: no free buffer
        self.sent = 0            # passes the server accepted
        self.failed = 0          # passes in RecordLoad calls that failed
        self.calls = 0           # RecordLoad calls made
        self.last_response: Any = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="eplb-load-recorder", daemon=True)
        self._thread.start()

    # ---- engine thread ------------------------------------------------------------

    def record(self, load: Any) -> bool:
        """Queue one pass's load [L, P] (numpy array or torch tensor, any
        integer dtype, CPU or CUDA).  Returns at once: True if queued, False if
        dropped (no free buffer; counted in :attr:`dropped`)."""
        if self._closed:
            raise RuntimeError("LoadRecorder is closed")
        try:
            i = self._free.popleft()
        except IndexError:
            self.dropped += 1
            return False
        event = None
        if isinstance(load, np.ndarray):
            if load.shape != self.shape:
                self._free.appendleft(i)
                raise ValueError("load has shape %s, expected %s" % (load.shape, self.shape))
            np.copyto(self._buf[i], load, casting="unsafe")
        else:
            if tuple(load.shape) != self.shape:
                self._free.appendleft(i)
                raise ValueError("load has shape %s, expected %s" % (tuple(load.shape), self.shape))
            if load.is_cuda:
                event = self._copy_cuda(i, load)
            else:
                if self._torch_views is None:
                    import torch

                    self._torch_views = [torch.from_numpy(self._buf[k]) for k in range(self.max_pending)]
                self._torch_views[i].copy_(load)
        self.recorded += 1
        self._queue.put((i, event))
        return True

    def _copy_cuda(self, i: int, load: Any) -> Any:
        import torch

        if self._pinned is None:
            self._pinned = [torch.from_numpy(self._buf[k]).pin_memory() for k in range(self.max_pending)]
            self._events = [torch.cuda.Event() for _ in range(self.max_pending)]
        self._pinned[i].copy_(load, non_blocking=True)
        ev = self._events[i]  # type: ignore[index]
        ev.record(torch.cuda.current_stream(load.device))
        return ev

    # ---- background ------------------------------------------------------------------

    def _host(self, i: int, event: Any) -> np.ndarray:
        if event is not None:  # a CUDA load, copied into pinned buffer i
            return self._pinned[i].numpy()  # type: ignore[index]
        return self._buf[i]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._send(batch)
            if stop:
                return

    def _send(self, batch: List[Tuple[int, Any]]) -> None:
        k = len(batch)
        try:
            for _, ev in batch:
                if ev is not None:
                    ev.synchronize()
            packed = np.stack([self._host(i, ev) for i, ev in batch]) if k > 1 else self._host(*batch[0])
            packed = packed.copy()
        finally:
            for i, _ in batch:
                self._free.append(i)
        err: Optional[BaseException] = None
        resp = None
        try:
            resp = self.client.record_load(self.model_id, packed, num_passes=k, timeout=self.timeout)
        except EplbError as e:
            err = e
        except Exception as e:  # noqa: BLE001 -- kept for flush() to raise
            err = e
        with self._cond:
            self.calls += 1
            if err is None:
                self.sent += k
                self.last_response = resp
            else:
                self.failed += k
                if self._error is None:
                    self._error = err
            self._cond.notify_all()

    # ---- control ----------------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> None:
        """Return when every pass recorded so far has been answered by the
        server.  Raises the first RecordLoad error since the last flush (the
        passes of that call are lost: :attr:`failed`), or TimeoutError."""
        target = self.recorded
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.sent + self.failed < target:
                if not self._thread.is_alive():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("LoadRecorder.flush: %d of %d passes still pending"
                                       % (target - self.sent - self.failed, target))
                self._cond.wait(left)
            err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self, timeout: Optional[float] = None) -> None:
        """Send what is queued, stop the thread; raises as :meth:`flush`."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

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

    def __repr__(self) -> str:
        return ("LoadRecorder(%r, recorded=%d, sent=%d, dropped=%d, failed=%d)"
                % (self.model_id, self.recorded, self.sent, self.dropped, self.failed))
