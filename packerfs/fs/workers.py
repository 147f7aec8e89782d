"""Where a view's bytes are regenerated: in worker processes, or in threads.

Regenerating a window means reading the source, encrypting it and hashing
every block. hashlib and pread release the GIL, but the stream ciphers of the
`cryptography` package and Python's own copies do not, so worker *threads*
share one core's worth of the GIL: two readers go no faster than one.
ProcessReaders therefore forks worker processes, each with its own Engine on
the same state directory (LMDB serves any number of reader processes, and sees
the bins the daemon's scan seals). A request is a few integers and a key on a
socket; the worker writes the bytes into a slot of a shared memory buffer (a
reader with read_into() writes them there directly) and answers with their
length, so the daemon copies each window once.

A worker holds up to SLOTS requests, so the next window is already queued
while it computes one. While a bin (a key) has requests in flight, its next
windows go to the same worker, in order: neighbouring windows share a leaf,
which that worker then finds in its reader's cache instead of regenerating or
verifying it again. A key with nothing in flight goes to the least loaded
worker, so readers of different bins or files run on different cores.

The mechanism knows nothing about bins or files: a request carries an opaque
key (bytes, made by the daemon's `encode(key)`) that the worker-side reader
understands. A worker's reader is made by `open_reader()` in the worker, after
fork: bin_readers() makes BinReaders for the pack view, packerfs.fs.reverse
makes FileReaders for the reverse view. control() sends a message to every
worker (the reverse view opens and closes its generations that way).

ThreadReaders is the same interface over one in-process BinReader.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import signal
import socket
import struct
import time
from typing import Callable, Hashable

import trio

from packerfs.errors import PackerfsError, SourceChanged

log = logging.getLogger("packerfs.fs")

_REQUEST = struct.Struct("<BBQQI")  # op, slot, offset, size, length of the key that follows
OPEN, READ, CONTROL = range(3)  # OPEN: open_reader() in the worker; CONTROL: reader.control(key)
_REPLY = struct.Struct("<BBQ")  # status, slot, length of the data or message in the slot
OK, CHANGED, FAILED, BROKEN = range(4)
SLOTS = 2
_MESSAGE_ROOM = 4096
# Windows of one key within one span keep to one worker (they share leaves); other spans of the same
# key (another HTTP range, another reader of the bin) go to the least loaded worker.
AFFINITY_SPAN = 32 << 20
_AFFINITY_ENTRIES = 4096


class ThreadReaders:
    """read(bin, offset, size) on a shared BinReader, in trio worker threads."""

    def __init__(self, reader, threads: int):
        self.reader = reader
        self.limiter = trio.CapacityLimiter(threads)

    async def read(self, number: int, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.reader.read, number, offset, size, limiter=self.limiter)


class _Call:
    __slots__ = ("slot", "done", "status", "length")

    def __init__(self, slot: int):
        self.slot = slot
        self.done = trio.Event()
        self.status: int | None = None
        self.length = 0


class _Worker:
    def __init__(self, pid: int, sock: socket.socket, shm: mmap.mmap, slot_size: int):
        self.pid = pid
        self.sock = sock
        self.shm = shm
        self.slot_size = slot_size
        self.stream: trio.lowlevel.FdStream | None = None
        self.sending = trio.Lock()
        self.free_slots = list(range(SLOTS))
        self.calls: collections.deque[_Call] = collections.deque()  # in flight, in the order sent
        self.bins: dict = {}  # key (a bin, a file) -> requests in flight
        self.alive = True

    @property
    def load(self) -> int:
        return SLOTS - len(self.free_slots)

    async def call(self, op: int, key: bytes, offset: int, size: int) -> bytes:
        """Send one request (a slot must be free) and wait for its answer."""
        call = _Call(self.free_slots.pop())
        self.calls.append(call)
        try:
            async with self.sending:
                await self.stream.send_all(_REQUEST.pack(op, call.slot, offset, size, len(key)) + key)
            await call.done.wait()
        except BaseException:
            self.alive = False  # a request half sent or never answered: never reuse this worker
            raise
        if call.status is None:
            raise OSError(f"worker process {self.pid} exited")
        start = call.slot * self.slot_size
        data = self.shm[start : start + call.length]
        self.free_slots.append(call.slot)
        if call.status == OK:
            return data
        message = data.decode(errors="replace")
        if call.status == CHANGED:
            raise SourceChanged(message)
        if call.status == FAILED:
            name, _, message = message.partition("\0")
            raise _error_class(name)(message)
        raise OSError(message)

    async def receive(self) -> None:
        """Hand each answer to its call; answers come in the order the requests were sent."""
        pending = b""
        try:
            while True:
                while len(pending) < _REPLY.size:
                    chunk = await self.stream.receive_some(4096)
                    if not chunk:
                        return
                    pending += chunk
                status, slot, length = _REPLY.unpack(pending[: _REPLY.size])
                pending = pending[_REPLY.size :]
                call = self.calls.popleft()
                if call.slot != slot:
                    raise OSError(f"worker process {self.pid} answered slot {slot}, expected {call.slot}")
                call.status, call.length = status, length
                call.done.set()
        except (OSError, trio.ClosedResourceError) as exc:
            if self.alive:
                log.error("worker process %d: %s", self.pid, exc)
        finally:
            self.alive = False
            while self.calls:
                self.calls.popleft().done.set()  # status None: the worker is gone


def _error_class(name: str) -> type:
    """The packerfs.errors class a worker's FAILED answer names (PackerfsError if unknown)."""
    from packerfs import errors

    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, PackerfsError):
        return lambda message: _plain_error(cls, message)
    return PackerfsError


def _plain_error(cls: type, message: str) -> PackerfsError:
    """An instance of `cls` whose str() is `message` (already complete: path and offset included)."""
    exc = PackerfsError.__new__(cls)
    PackerfsError.__init__(exc, message)
    exc.path = exc.offset = None  # FormatError's and SourceChanged's; already in the message
    return exc


def _encode_bin(number: int) -> bytes:
    return _BIN.pack(number)


_BIN = struct.Struct("<Q")


class _BinReaders:
    """The pack view's worker-side reader: a BinReader over the worker's own engine."""

    def __init__(self, open_engine: Callable[[], object], cache_leaves: int):
        from packerfs.pack.reader import BinReader

        self.engine = open_engine()
        try:
            engine = self.engine
            self.reader = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=cache_leaves)
        except BaseException:
            self.engine.close()
            raise

    def read(self, key: bytes, offset: int, size: int) -> bytes:
        return self.reader.read(_BIN.unpack(key)[0], offset, size)

    def control(self, message: bytes) -> bytes:
        raise PackerfsError("the pack view's workers take no control messages")

    def close(self) -> None:
        self.engine.close()


def bin_readers(open_engine: Callable[[], object], cache_leaves: int) -> tuple[Callable[[], object], Callable]:
    """(open_reader, encode) for ProcessReaders serving the pack view: keys are bin numbers."""
    return (lambda: _BinReaders(open_engine, cache_leaves)), _encode_bin


class ProcessReaders:
    """read(key, offset, size) by readers in `processes` forked worker processes.

    `open_reader()` runs in each worker once the daemon asks (open_engines()) and
    returns its reader: read(key bytes, offset, size) -> bytes, control(message
    bytes) -> bytes, close(). `encode(key)` turns the daemon's (hashable) key into
    the bytes the worker's reader gets. Construct it before any thread is started,
    an index opened or the FUSE session opened (workers must not inherit /dev/fuse
    or an LMDB environment); then open_engines() has each worker make its reader,
    and run() (a trio service) connects them.
    """

    def __init__(self, open_reader: Callable[[], object], processes: int, max_size: int,
                 encode: Callable[[Hashable], bytes] = _encode_bin):
        self.encode = encode
        self.workers: list[_Worker] = []
        self.affinity: dict[Hashable, _Worker] = {}
        self._released = trio.lowlevel.ParkingLot()
        self.fallback = None  # ThreadReaders over the daemon's own BinReader, if every worker died
        slot_size = max_size + _MESSAGE_ROOM
        for _ in range(processes):
            shm = mmap.mmap(-1, SLOTS * slot_size)
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
                    _serve_requests(open_reader, child_sock, shm, slot_size)
                    code = 0
                except BaseException:  # noqa: BLE001 - logged; the daemon sees the worker gone
                    log.exception("worker process %d failed", os.getpid())
                finally:
                    os._exit(code)
            child_sock.close()
            self.workers.append(_Worker(pid, parent_sock, shm, slot_size))

    def open_engines(self, timeout: float = 120.0, message: bytes = b"") -> None:
        """Have every worker make its reader now (after the daemon opened its own, so a new state
        directory is created once) and leave the caller's working directory; a `message` is then
        passed to each reader's control()."""
        for worker in self.workers:
            worker.sock.settimeout(timeout)
            try:
                worker.sock.sendall(_REQUEST.pack(OPEN, 0, 0, 0, len(message)) + message)
                reply = _receive_exactly(worker.sock, _REPLY.size)
            except OSError as exc:
                raise PackerfsError(f"worker process {worker.pid} did not start: {exc}") from None
            finally:
                worker.sock.settimeout(None)
            if reply is None:
                raise PackerfsError(f"worker process {worker.pid} exited at start; see the log")
            status, _, length = _REPLY.unpack(reply)
            if status != OK:
                raise PackerfsError(worker.shm[:length].decode(errors="replace").partition("\0")[2])

    @property
    def alive(self) -> bool:
        return any(w.alive for w in self.workers)

    async def control(self, message: bytes) -> list[str]:
        """Send `message` to every live worker's reader (in order with the reads sent before it);
        returns the errors, one line per worker that failed."""
        errors = []

        async def one(worker: _Worker) -> None:
            while not worker.free_slots and worker.alive:
                await self._released.park()
            if not worker.alive:
                return
            try:
                await worker.call(CONTROL, message, 0, 0)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                errors.append(f"worker process {worker.pid}: {exc}")
            finally:
                self._released.unpark_all()

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                if worker.alive:
                    nursery.start_soon(one, worker)
        return errors

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The trio side of the workers' sockets: one task per worker receives its answers."""
        try:
            async with trio.open_nursery() as nursery:
                for worker in self.workers:
                    worker.stream = trio.lowlevel.FdStream(os.dup(worker.sock.fileno()))
                    nursery.start_soon(worker.receive)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                for worker in self.workers:
                    worker.alive = False
                    if worker.stream is not None:
                        await worker.stream.aclose()
                        worker.stream = None

    async def read(self, number: Hashable, offset: int, size: int) -> bytes:
        stream = (number, offset // AFFINITY_SPAN)
        worker = await self._acquire(stream)
        if worker is None:
            return await self.fallback.read(number, offset, size)
        worker.bins[stream] = worker.bins.get(stream, 0) + 1
        try:
            return await worker.call(READ, self.encode(number), offset, size)
        finally:
            worker.bins[stream] -= 1
            if not worker.bins[stream]:
                del worker.bins[stream]
            self._released.unpark_all()

    async def _acquire(self, number: Hashable) -> _Worker | None:
        while True:
            alive = [w for w in self.workers if w.alive]
            if not alive:
                if self.fallback is None:
                    raise OSError("every worker process has exited")
                return None
            owner = next((w for w in alive if number in w.bins), None)
            if owner is not None:
                if owner.free_slots:
                    return owner  # the bin's windows stay in order on one worker
            else:
                free = [w for w in alive if w.free_slots]
                if free:
                    previous = self.affinity.get(number)
                    worker = min(free, key=lambda w: (w.load, w is not previous))
                    self.affinity.pop(number, None)
                    self.affinity[number] = worker  # last: the oldest entries go first
                    if len(self.affinity) > _AFFINITY_ENTRIES:
                        del self.affinity[next(iter(self.affinity))]
                    return worker
            await self._released.park()

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


def _serve_requests(open_reader, sock: socket.socket, shm: mmap.mmap, slot_size: int) -> None:
    reader = read_into = None
    try:
        while True:
            request = _receive_exactly(sock, _REQUEST.size)
            if request is None:
                return
            op, slot, offset, size, key_length = _REQUEST.unpack(request)
            key = _receive_exactly(sock, key_length) if key_length else b""
            if key is None:
                return
            try:
                if op == OPEN:
                    if reader is None:
                        reader = open_reader()
                        read_into = getattr(reader, "read_into", None)  # writes into the slot: no copy
                        os.chdir("/")  # keep no directory busy
                    data = reader.control(key) if key else b""
                elif reader is None:
                    raise PackerfsError("worker process asked to read before it opened its reader")
                elif op == READ and read_into is not None and size <= slot_size:
                    start = slot * slot_size
                    length = read_into(key, offset, memoryview(shm)[start : start + size])
                    try:
                        sock.sendall(_REPLY.pack(OK, slot, length))
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    continue
                elif op == READ:
                    data = reader.read(key, offset, size)
                else:
                    data = reader.control(key)
                status = OK
            except SourceChanged as exc:
                data, status = str(exc).encode(), CHANGED
            except PackerfsError as exc:
                data, status = f"{type(exc).__name__}\0{exc}".encode(), FAILED
            except Exception as exc:  # noqa: BLE001 - becomes EIO for this read, logged by the daemon
                data, status = f"{type(exc).__name__}: {exc}".encode(), BROKEN
            length = min(len(data), slot_size)
            start = slot * slot_size
            shm[start : start + length] = data if length == len(data) else memoryview(data)[:length]
            try:
                sock.sendall(_REPLY.pack(status, slot, length))
            except (BrokenPipeError, ConnectionResetError):
                return  # the daemon stopped while this answer was being made
    finally:
        if reader is not None:
            reader.close()


def _receive_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
