"""Sealing bins on Dask: a LocalCluster of this machine's cores, or an existing cluster.

The scan (the coordinator) plans each bin from metadata and hands it here as
its list of operations. Each task seals one bin on a worker with a BinSealer
(packerfs.pack.seal): it reads only that bin's source ranges, encrypts, hashes,
lays out and computes commP, writes the CAR to OUT when OUT is a path the
workers share, and returns the bin's result, leaf digests, byte map and
params. The coordinator commits the results in bin order, one transaction per
bin, so the index after an interruption is what a one-process scan leaves.

A file cut across bins links them. age and plain parts are independent (each
gets its stream's params up front), so those bins are separate tasks. An
OpenPGP stream is one CFB chain with one MDC hash over the whole file: the
bins a split OpenPGP file links are sealed by one task, one after another on
one worker, continuing the open stream (no part is read twice).

The dataset secret, the run seed and the recipients' keys travel inside the
task payloads and live only in the workers' memory. Spilling task data to disk
is turned off on the workers this module starts; on a remote cluster use a
`tls://` scheduler address, and configure its workers the same way.

With `collect`, the workers write each CAR to their own temporary directory and
the coordinator copies it into OUT in pieces (COLLECT_PIECE bytes per request),
then deletes the worker's copy: for workers that do not share OUT.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from packerfs.errors import PackerfsError, UsageError
from packerfs.pack.seal import BinSealer, Results, SealContext, SyncingFile, reads_from_start
from packerfs.piece import set_kernel_threads

log = logging.getLogger("packerfs.parallel")

COLLECT_PIECE = 16 << 20
PROGRESS_TOPIC = "packerfs-read"
REPORT_EVERY = 16 << 20
WAIT_STEP = 0.25  # seconds between progress updates (and checks for a stop) while waiting
# Dask settings for the workers this module starts: nothing a task holds is ever written to disk,
# and a worker is never paused or restarted for memory (a task's memory is bounded by its bin).
# Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which turns off glibc's adaptive mmap
# threshold: every 1 MiB leaf buffer is then a fresh mmap, zeroed by the kernel, and sealing
# costs twice the CPU (measured: 1.9 s against 4.4 s of system time per GiB). Left unset.
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
    "distributed.scheduler.allowed-failures": 3,
}
CONNECT_TIMEOUT = 30


@dataclass
class Placement:
    """Where one bin is sealed: its number, operations, and where its CAR goes."""

    number: int
    ops: list
    car_path: str | None  # OUT/bin-N.car.partial on a path the workers share
    collect: bool  # write to the worker's own temporary directory instead
    kernel_threads: int = 0  # commP kernel threads on the worker (0: one per CPU)
    upload: tuple | None = None  # (store spec, options, object name): upload the CAR there instead


def seal_bins(ctx: SealContext, bins: list[Placement]) -> list[tuple[dict, Results, tuple | None]]:
    """A task: seal these bins one after another (consecutive bins a stream runs through, or one bin).

    -> for each bin (result, results, (worker address, CAR path) when collected)."""
    source = _worker_source(ctx)
    if bins:
        # the local cluster's workers already fill the cores: a kernel threaded over all of them in
        # each worker only adds switching (measured: 0.3 s of 7.7 s on 2 GiB with 2 workers)
        set_kernel_threads(bins[0].kernel_threads)
    out = []
    carry = None
    seams: dict = {}
    for placement in bins:
        results = Results(on_read=_ReadReporter(placement.number))
        where = None
        path = placement.car_path
        if placement.collect:
            path = os.path.join(_worker_tmp(), f"packerfs-{uuid.uuid4().hex}-{placement.number}.car")
            where = (_worker_address(), path)
        if placement.upload is not None:
            spec, options, name = placement.upload
            sink = _worker_store(spec, options).writer(name)
        else:
            sink = SyncingFile(path) if path is not None else None
        sealer = BinSealer(ctx, placement.number, source, results, sink, seams=seams, carry=carry)
        try:
            ops = placement.ops
            starts = {op[1].path for op in ops if reads_from_start(op)}
            entries = source.read_ahead((op[1] for op in ops if op[0] != "sync"), lambda e: e.path in starts)
            for op in ops:
                if op[0] != "sync":
                    next(entries)
                sealer.apply(op)
            result = sealer.seal()
            result["sealed_on"] = _worker_address()
            if sink is not None:
                sink.close()  # an upload: every part stored, the object not yet visible
            if placement.upload is not None:
                result["upload"] = sink.detach()  # the coordinator completes it after the index commit
        except BaseException:
            if placement.upload is not None:
                sink.abort()  # first: the layout's writer thread then drops what is still queued
            sealer.abandon()
            raise
        results.on_read.flush()
        results.on_read = None  # not sent back
        carry, seams = sealer.carry_out, results.params
        out.append((result, results, where))
    if carry is not None:
        carry.close()
    return out


class _ReadReporter:
    """Tells the coordinator, every REPORT_EVERY bytes, how much a bin's sealing has read (Dask events)."""

    def __init__(self, number: int):
        self.number = number
        self.pending = 0

    def __call__(self, count: int) -> None:
        self.pending += count
        if self.pending >= REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            try:
                from distributed import get_worker

                get_worker().log_event(PROGRESS_TOPIC, (self.number, self.pending))
            except ValueError:  # not on a worker
                pass
            self.pending = 0


def read_piece(path: str, offset: int, size: int) -> bytes:
    """A task pinned to the worker holding a collected CAR: one piece of it."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_SOURCES: dict = {}
_STORES: dict = {}


def _worker_store(spec: str, options: dict):
    """One open ObjectStore per worker process and output prefix."""
    from packerfs.source.upload import ObjectStore

    key = (spec, repr(sorted(options.items())))
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ObjectStore(spec, options).open()
    return store


def _worker_source(ctx: SealContext):
    """One open Source per worker process and source (opening an object store costs a round trip)."""
    from packerfs.source import open_source

    key = (ctx.source_url, repr(sorted((ctx.source_options or {}).items())))
    source = _SOURCES.get(key)
    if source is None:
        source = _SOURCES[key] = open_source(ctx.source_url, ctx.source_options)
    return source


def _worker_tmp() -> str:
    try:
        from distributed import get_worker

        return get_worker().local_directory
    except ValueError:  # not on a worker (tests calling seal_bins directly)
        return tempfile.gettempdir()


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None


class Pool:
    """Bins sealed by Dask workers, handed back in bin order."""

    def __init__(self, *, workers: int | None = None, scheduler: str | None = None, collect: bool = False):
        import dask
        import distributed

        self.collect = collect
        self.cluster = None
        self.client = None
        self.in_flight: deque = deque()  # (works, future), in bin order
        self.group: list = []  # consecutive bins one stream links, not yet submitted
        self._config = dask.config.set(WORKER_CONFIG)
        self._config.__enter__()
        try:
            if scheduler:
                try:
                    timeout = dask.config.get("distributed.comm.timeouts.connect", CONNECT_TIMEOUT)
                    self.client = distributed.Client(scheduler, timeout=timeout, set_as_default=False)
                except (OSError, TimeoutError) as exc:
                    raise PackerfsError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc})") from None
                except ValueError as exc:
                    raise UsageError(f"--scheduler {scheduler}: {exc}") from None
                self.nworkers = max(1, len(self.client.scheduler_info().get("workers", {})))
            else:
                self.cluster = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL, memory_limit=0,
                )
                self.client = distributed.Client(self.cluster, set_as_default=False)
                self.nworkers = workers
        except BaseException:
            self.close()
            raise
        # Bins handed over and not yet committed: one running per worker and one waiting. Each holds
        # its records here until it is committed (about 3 KiB per file), so more in flight would only
        # cost memory: a 256 MiB bin of 4 KiB files is 65,000 files.
        self.limit = self.nworkers + 1
        # a local cluster shares this machine's cores; a remote worker keeps the kernel's default
        self.kernel_threads = max(1, (os.cpu_count() or 1) // self.nworkers) if self.cluster is not None else 0
        self.advance = lambda n: None  # the scan's progress (it may raise to stop the wait)
        self.reported: dict[int, int] = {}  # bin -> bytes its worker said it read (event thread writes)
        self.advanced: dict[int, int] = {}  # bin -> bytes counted on the progress bar
        self.planned: dict[int, int] = {}  # bin -> the plaintext the plan gives it
        self.client.subscribe_topic(PROGRESS_TOPIC, self._on_event)

    def _on_event(self, event) -> None:
        number, count = event[1]
        self.reported[number] = self.reported.get(number, 0) + count

    def _tick(self) -> None:
        """Count on the progress bar what the workers have read, never more than their bins' share."""
        delta = 0
        for number, reported in list(self.reported.items()):
            planned = self.planned.get(number)
            if planned is None:
                continue
            done = self.advanced.get(number, 0)
            step = min(reported, planned) - done
            if step > 0:
                self.advanced[number] = done + step
                delta += step
        self.advance(delta)

    def _wait(self, future) -> None:
        while not future.done():
            try:
                future.result(timeout=WAIT_STEP)
            except TimeoutError:
                pass
            except Exception:  # noqa: BLE001 - the task failed: _take() reports it
                break
            self._tick()

    def submit(self, ctx: SealContext, work, *, continues: bool = False) -> None:
        """Seal `work` (a scan.BinWork) on a worker; its results come back from ready() or drain().

        `continues`: its first part continues a stream the previous bin cut, from that bin's state at
        the seam (OpenPGP), so both go to the worker in one task."""
        if not (continues and self.group):
            self._send(ctx)
        self.group.append(work)
        self.planned[work.number] = work.planned_read
        self._ctx = ctx

    def _send(self, ctx: SealContext) -> None:
        if not self.group:
            return
        works, self.group = self.group, []
        placements = [
            Placement(w.number, w.ops, None if self.collect else w.partial, self.collect and w.partial is not None,
                      self.kernel_threads, w.upload)
            for w in works
        ]
        future = self.client.submit(seal_bins, ctx, placements, pure=False, key=f"seal-bin-{works[0].number}-{uuid.uuid4().hex[:8]}")
        for w in works:
            w.ops = []  # the task holds them now
        self.in_flight.append((works, future))

    def ready(self) -> Iterator:
        """(work, result) of bins sealed so far, in bin order; waits while too many are in flight."""
        while self.in_flight and (self.in_flight[0][1].done() or len(self.in_flight) > self.limit):
            yield from self._take()

    def drain(self) -> Iterator:
        """(work, result) of every bin handed over, in bin order."""
        if self.group:
            self._send(self._ctx)
        while self.in_flight:
            yield from self._take()

    def _take(self) -> Iterator:
        works, future = self.in_flight[0]
        self._wait(future)
        self.in_flight.popleft()
        try:
            outcome = future.result()
        except PackerfsError:
            raise
        except Exception as exc:
            numbers = ", ".join(str(w.number) for w in works)
            raise PackerfsError(
                f"sealing bin{'s' if len(works) > 1 else ''} {numbers} on the Dask cluster failed "
                f"({type(exc).__name__}: {exc}); run again: sealed bins are kept"
            ) from None
        for work, (result, results, where) in zip(works, outcome):
            work.results = results
            if where is not None:
                self._fetch(work, result, where)
            rest = self.planned.pop(work.number, 0) - self.advanced.pop(work.number, 0)
            self.reported.pop(work.number, None)
            self.advance(max(0, rest))
            yield work, result

    def _fetch(self, work, result: dict, where: tuple) -> None:
        """Copy a CAR a worker wrote to its own directory into OUT (as OUT/bin-N.car.partial)."""
        address, path = where
        if address not in self.client.scheduler_info().get("workers", {}):
            raise PackerfsError(
                f"bin {work.number}: the Dask worker {address} that sealed it is gone before its CAR was "
                f"collected; run again: sealed bins are kept"
            )
        sink = SyncingFile(work.partial)
        try:
            offset = 0
            while offset < result["car_size"]:
                piece = self.client.submit(
                    read_piece, path, offset, COLLECT_PIECE, workers=[address], allow_other_workers=False, pure=False
                ).result(timeout=600)
                if not piece:
                    raise PackerfsError(f"bin {work.number}: the CAR on worker {address} ends at offset {offset}")
                sink.write(piece)
                offset += len(piece)
        except BaseException:
            sink.close()
            os.unlink(work.partial)
            raise
        sink.close()
        try:
            self.client.submit(
                remove_file, path, workers=[address], allow_other_workers=False, pure=False
            ).result(timeout=60)
        except Exception as exc:  # noqa: BLE001 - the CAR is safe in OUT; only the worker's copy is left
            log.warning("bin %d: could not remove the collected copy %s on worker %s: %s", work.number, path, address, exc)

    def close(self) -> None:
        """Stop: bins still in flight are cancelled and their partial CARs removed (they are resealed
        by the next run)."""
        unfinished = [w for works, _ in self.in_flight for w in works] + self.group
        for _, future in self.in_flight:
            future.cancel()
        self.in_flight.clear()
        self.group = []
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            self._config.__exit__(None, None, None)
            for work in unfinished:
                if work.partial is not None:
                    try:
                        os.unlink(work.partial)
                    except FileNotFoundError:
                        pass
