"""Hand bytes to a consumer on its own thread, so hashing, disk writes and the
scan overlap on two cores.

The consumers used here (the commP kernel, file writes) release the GIL, so a
worker thread is real parallelism. At most `limit` bytes wait in the queue,
which bounds memory. An exception in the worker (a full disk, say) is raised
again in the producer at its next put() or drain(), so it is never lost.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable


class Pipe:
    def __init__(self, consume: Callable[[bytes], object], *, limit: int = 32 << 20, name: str = "pipe"):
        self._consume = consume
        self._limit = limit
        self._queue: collections.deque = collections.deque()
        self._queued = 0
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        """Queue immutable bytes for the consumer; blocks while `limit` bytes are already waiting."""
        with self._cond:
            while self._queued >= self._limit and self._error is None:
                self._cond.wait()
            self._raise_error()
            self._queue.append(data)
            self._queued += len(data)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until everything queued has been consumed."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()
            self._raise_error()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._queue.clear()
            self._queued = 0
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                data = self._queue.popleft()
                self._busy = True
            try:
                self._consume(data)
            except BaseException as exc:  # handed to the producer, not swallowed
                with self._cond:
                    self._error = exc
            with self._cond:
                self._busy = False
                self._queued -= len(data)
                self._cond.notify_all()
