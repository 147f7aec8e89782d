"""Where the view's bytes are regenerated: BinReader in worker processes, or in threads.

Regenerating a window means reading the source, encrypting it and hashing
every block. hashlib and pread release the GIL, but the stream ciphers of the
`cryptography` package and Python's own copies do not, so worker *threads*
share one core's worth of the GIL: two readers go no faster than one.
ProcessReaders therefore forks worker processes, each with its own Engine on
the same state directory (LMDB serves any number of reader processes, and sees
the bins the daemon's scan seals). A request is three integers on a socket;
the worker writes the bytes into a shared memory buffer and answers with
their length, so the daemon copies each window once.

A bin's windows are sent to the worker that produced its previous window
while that worker is free, so neighbouring windows, which share a leaf, find
it in that worker's BinReader cache instead of regenerating it.

ThreadReaders is the same interface over one in-process BinReader.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import struct
import time
from typing import Callable

import trio

from packerfs.errors import PackerfsError, SourceChanged

log = logging.getLogger("packerfs.fs")

_REQUEST = struct.Struct("<QQQ")  # bin, offset, size; bin OPEN opens the engine
OPEN = 0  # bins are numbered from 1
_REPLY = struct.Struct("<BQ")  # status, length of the data or message in the shared buffer
OK, CHANGED, FAILED, BROKEN = range(4)


class ThreadReaders:
    """read(bin, offset, size) on a shared BinReader, in trio worker threads."""

    def __init__(self, reader, threads: int):
        self.reader = reader
        self.limiter = trio.CapacityLimiter(threads)

    async def read(self, number: int, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.reader.read, number, offset, size, limiter=self.limiter)

    def close(self) -> None:
        pass


class _Worker:
    def __init__(self, pid: int, sock: socket.socket, shm: mmap.mmap):
        self.pid = pid
        self.sock = sock
        self.shm = shm
        self.stream: trio.lowlevel.FdStream | None = None
        self.busy = False
        self.alive = True

    async def call(self, number: int, offset: int, size: int) -> bytes:
        if self.stream is None:
            self.stream = trio.lowlevel.FdStream(os.dup(self.sock.fileno()))
        try:
            await self.stream.send_all(_REQUEST.pack(number, offset, size))
            reply = b""
            while len(reply) < _REPLY.size:
                chunk = await self.stream.receive_some(_REPLY.size - len(reply))
                if not chunk:
                    raise OSError(f"worker process {self.pid} exited")
                reply += chunk
        except BaseException:
            self.alive = False  # a request half sent or half answered: never reuse this worker
            raise
        status, length = _REPLY.unpack(reply)
        data = self.shm[:length]
        if status == OK:
            return data
        message = data.decode(errors="replace")
        if status == CHANGED:
            raise SourceChanged(message)
        if status == FAILED:
            raise PackerfsError(message)
        raise OSError(message)


class ProcessReaders:
    """read(bin, offset, size) by BinReaders in `processes` forked worker processes.

    Construct it before any thread is started, the index opened or the FUSE
    session opened (workers must not inherit /dev/fuse); then open_engines()
    has each worker open its engine with `open_engine`.
    """

    def __init__(self, open_engine: Callable[[], object], processes: int, max_size: int, cache_leaves: int):
        self.workers: list[_Worker] = []
        self.affinity: dict[int, _Worker] = {}
        self._released = trio.lowlevel.ParkingLot()
        self.fallback = None  # ThreadReaders over the daemon's own BinReader, if every worker died
        for _ in range(processes):
            shm = mmap.mmap(-1, max_size + 4096)
            parent_sock, child_sock = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the worker: nothing inherited but its socket, its buffer and stdio
                code = 1
                try:
                    parent_sock.close()
                    _close_fds_except({0, 1, 2, child_sock.fileno()})
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop
                    for signum in (signal.SIGTERM, signal.SIGHUP):
                        signal.signal(signum, signal.SIG_DFL)
                    _serve_requests(open_engine, child_sock, shm, cache_leaves)
                    code = 0
                except BaseException:  # noqa: BLE001 - logged; the daemon sees the worker gone
                    log.exception("worker process %d failed", os.getpid())
                finally:
                    os._exit(code)
            child_sock.close()
            self.workers.append(_Worker(pid, parent_sock, shm))

    def open_engines(self, timeout: float = 120.0) -> None:
        """Have every worker open its engine now (after the daemon opened its own, so a new state
        directory is created once) and leave the caller's working directory."""
        for worker in self.workers:
            worker.sock.settimeout(timeout)
            try:
                worker.sock.sendall(_REQUEST.pack(OPEN, 0, 0))
                reply = _receive_exactly(worker.sock, _REPLY.size)
            except OSError as exc:
                raise PackerfsError(f"worker process {worker.pid} did not start: {exc}") from None
            finally:
                worker.sock.settimeout(None)
            if reply is None:
                raise PackerfsError(f"worker process {worker.pid} exited at start; see the log")
            status, length = _REPLY.unpack(reply)
            if status != OK:
                raise PackerfsError(worker.shm[:length].decode(errors="replace"))

    async def read(self, number: int, offset: int, size: int) -> bytes:
        worker = await self._acquire(number)
        if worker is None:
            return await self.fallback.read(number, offset, size)
        try:
            return await worker.call(number, offset, size)
        finally:
            worker.busy = False
            self._released.unpark_all()

    async def _acquire(self, number: int) -> _Worker | None:
        while True:
            alive = [w for w in self.workers if w.alive]
            if not alive:
                if self.fallback is None:
                    raise OSError("every worker process has exited")
                return None
            worker = self.affinity.get(number)
            if worker is None or worker.busy or not worker.alive:
                worker = next((w for w in alive if not w.busy), None)
            if worker is not None:
                worker.busy = True
                self.affinity[number] = worker
                return worker
            await self._released.park()

    async def aclose_streams(self) -> None:
        """Close the trio side of the sockets (at the end of trio.run)."""
        for worker in self.workers:
            if worker.stream is not None:
                await worker.stream.aclose()
                worker.stream = None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers: they exit when their socket closes; one stuck in a read is killed."""
        for worker in self.workers:
            worker.sock.close()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            while True:
                try:
                    pid, _ = os.waitpid(worker.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                if time.monotonic() > deadline:
                    os.kill(worker.pid, signal.SIGKILL)
                    os.waitpid(worker.pid, 0)
                    break
                time.sleep(0.01)


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _serve_requests(open_engine, sock: socket.socket, shm: mmap.mmap, cache_leaves: int) -> None:
    from packerfs.pack.reader import BinReader

    reader = None
    engine = None
    try:
        while True:
            request = _receive_exactly(sock, _REQUEST.size)
            if request is None:
                return
            number, offset, size = _REQUEST.unpack(request)
            try:
                if number == OPEN:
                    if engine is None:
                        engine = open_engine()
                        reader = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=cache_leaves)
                        os.chdir("/")  # keep no directory busy
                    data = b""
                elif reader is None:
                    raise PackerfsError("worker process asked to read before it opened its engine")
                else:
                    data = reader.read(number, offset, size)
                status = OK
            except SourceChanged as exc:
                data, status = str(exc).encode(), CHANGED
            except PackerfsError as exc:
                data, status = str(exc).encode(), FAILED
            except Exception as exc:  # noqa: BLE001 - becomes EIO for this read, logged by the daemon
                data, status = f"{type(exc).__name__}: {exc}".encode(), BROKEN
            data = data[: len(shm)]
            shm[: len(data)] = data
            sock.sendall(_REPLY.pack(status, len(data)))
    finally:
        if engine is not None:
            engine.close()


def _receive_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
