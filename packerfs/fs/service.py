"""The engine behind every server of generated bins: the mount's pack view and the HTTP gateway.

PackService holds what both share, so that their bytes are the same: one lock on the state, the
worker processes that regenerate bin windows (forked before anything else), the window cache,
the ViewState that says which bins exist, and the background scan that seals new ones.

    with PackService(open_engine, state_dir, "/mnt/cars", ...) as service:
        run_front_end(service.state, service.cache, services=service.services)

The front end (FUSE or HTTP) runs `services` in its trio nursery: the cache, the workers and
the scan are started there and stopped when it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable

from packerfs.errors import PackerfsError

log = logging.getLogger("packerfs.fs")

PROCESSES = max(2, min(4, os.cpu_count() or 2))  # worker processes regenerating bytes (packerfs.fs.workers)
THREADS = 2  # threads regenerating bytes if every worker process died
WINDOW = 1 << 20  # bytes regenerated per request to a worker (packerfs.fs.blocks)
CACHE_BYTES = 64 << 20  # windows kept in memory
LEAVES = 16  # verified leaves kept by each BinReader
SCAN_JOIN_TIMEOUT = 30.0
FOLLOW_SECONDS = 2.0  # how often a follower (see PackService) looks for bins sealed by the state's owner


class ScanStopped(BaseException):
    """Raised inside the scan (through its progress callback) to stop it at the end of serving."""


class _Progress:
    """The scan's `advance` callback: counts bytes for the status, and stops the scan on request."""

    def __init__(self, state, stop: threading.Event):
        self.state = state
        self.stop = stop

    def __call__(self, n: int) -> None:
        if self.stop.is_set():
            raise ScanStopped()
        self.state.bytes_scanned += n

    def set_total(self, total: int) -> None:
        self.state.bytes_total = total


def stable_mtime(state_dir: str) -> int:
    """Bins get the state directory's creation time (its dataset key's mtime): the same on every
    start, so `rsync -a` skips bins it already copied and HTTP clients' If-Range resumes work."""
    import time

    from packerfs.crypt.secrets import DATASET_KEY_NAME

    try:
        return os.stat(os.path.join(state_dir, DATASET_KEY_NAME)).st_mtime_ns
    except OSError:
        return time.time_ns()


class PackService:
    def __init__(
        self,
        open_engine: Callable[[], object],
        state_dir: str,
        serving: str,
        *,
        skip_unreadable: bool = False,
        repack_below: float | None = None,
        pool_factory=None,
        info: dict | None = None,
        on_retired: Callable[[list[int]], None] = lambda numbers: None,
        follow: bool = False,
    ):
        """`serving` names what is served (a mount point, a listen address) for the lock and the logs;
        `info` adds facts to the status; `on_retired` is called from the scan thread with the bins the
        scan retired (now hidden).

        With `follow`, a state already held by another process (a mount, a pack) is not refused:
        this service then only serves, scanning nothing itself, and shows the bins the owner seals
        as they reach the index (the index takes any number of readers)."""
        self.open_engine = open_engine
        self.state_dir = state_dir
        self.serving = serving
        self.skip_unreadable = skip_unreadable
        self.repack_below = repack_below
        self.pool_factory = pool_factory  # seals the scan's bins on Dask workers (commands.options.pool_factory)
        self.extra_info = dict(info or {})
        self.on_retired = on_retired
        self.engine = None
        self.scan: threading.Thread | None = None
        self.stop = threading.Event()
        self.workers = None
        self.lock_fd: int | None = None
        self.follow = follow
        self.following: str | None = None  # the owner's lock message, when following

    def __enter__(self) -> "PackService":
        from packerfs.fs.blocks import WindowCache
        from packerfs.fs.packview import ViewState
        from packerfs.fs.workers import ProcessReaders, ThreadReaders, bin_readers
        from packerfs.index import lock as index_lock
        from packerfs.pack.reader import BinReader

        from packerfs.errors import UsageError

        try:
            self.lock_fd = index_lock.lock_state(self.state_dir, f"serving {self.serving}")
        except UsageError as exc:
            if not self.follow:
                raise
            self.following = str(exc)
            log.info("%s: serving its sealed bins without scanning, and following what its owner seals", exc)
        try:
            # Forked first: before the index is opened, any thread started or /dev/fuse opened.
            open_reader, encode = bin_readers(self.open_engine, LEAVES)
            self.workers = ProcessReaders(open_reader, PROCESSES, WINDOW, encode) if PROCESSES else None
            unwind_on_signals()
            engine = self.engine = self.open_engine()
            info = {
                "source": engine.source.url,
                "state_dir": engine.state_dir,
                "pid": os.getpid(),
                "bin_size": engine.bin_size,
                "cipher": engine.cipher.name,
                **self.extra_info,
            }
            self.state = ViewState(engine.bins(), info, stable_mtime(engine.state_dir))
            reader = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=LEAVES)
            threads = ThreadReaders(reader, THREADS)
            if self.workers is not None:
                self.workers.open_engines()
                self.workers.fallback = threads
            self.cache = WindowCache(
                (self.workers or threads).read, window=WINDOW, capacity=CACHE_BYTES // WINDOW,
                serialize=self.workers is None,
            )
            log.info(
                "serving %s at %s: %d sealed bins, %d worker processes, state %s",
                engine.source.url, self.serving, len(self.state.bins), PROCESSES, engine.state_dir,
            )
            # The scan thread is busy in Python; let the serving loop have the GIL back sooner than every 5 ms.
            sys.setswitchinterval(0.001)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def services(self) -> list[Callable]:
        """Async services for the front end's nursery (each calls task_status.started())."""
        return [self.cache.run, *([self.workers.run] if self.workers is not None else []), self._start_scan]

    async def _start_scan(self, task_status=None) -> None:
        import trio

        task_status = task_status or trio.TASK_STATUS_IGNORED
        if self.following is not None:
            self.state.state = "following"
            task_status.started()
            while True:  # cancelled with the front end
                await trio.sleep(FOLLOW_SECONDS)
                bins = await trio.to_thread.run_sync(self.engine.bins)
                known = {n for n in self.state.bins} | self.state.retired_bins
                for result in bins:
                    if result["bin"] not in known and result.get("status", "current") == "current":
                        self.state.sealed(result)
                gone = self.state.settle_all(bins)
                if gone:
                    self.on_retired(gone)
        self.scan = threading.Thread(target=self._scan, name="packerfs-scan", daemon=True)
        self.scan.start()
        task_status.started()

    def __exit__(self, *exc) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # let the cleanup finish
        self.stop.set()
        if self.workers is not None:
            self.workers.close()
        if self.scan is not None:
            self.scan.join(SCAN_JOIN_TIMEOUT)
        if self.engine is not None:
            if self.scan is not None and self.scan.is_alive():
                log.warning("the scan did not stop within %d s; leaving it (the next run resumes it)", SCAN_JOIN_TIMEOUT)
            else:
                self.engine.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _scan(self) -> None:
        engine, state = self.engine, self.state
        try:
            report = engine.scan(
                skip_unreadable=self.skip_unreadable, advance=_Progress(state, self.stop), on_seal=state.sealed,
                repack_below=self.repack_below, pool_factory=self.pool_factory,
            )
        except ScanStopped:
            log.info("scan stopped; the next mount, serve or pack resumes it")
            return
        except PackerfsError as exc:
            log.error("scan failed: %s", exc)
            state.failed(f"scan failed: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - the sealed bins keep serving; the failure is in status and log
            log.exception("scan failed")
            state.failed(f"scan failed: {type(exc).__name__}: {exc}")
            return
        problems = [f"{os.fsdecode(p.path) or '.'}: {p.reason}" for p in report.problems]
        gone = state.finished(engine.bins(), problems)
        if gone:
            self.on_retired(gone)
        for path in report.changed_paths:
            log.info("%s changed since an earlier scan: its new version is in new bins", os.fsdecode(path))
        for path in report.deleted_paths:
            log.info("%s was deleted from the source: the new snapshot no longer lists it", os.fsdecode(path))
        if report.snapshot:
            log.info("sealed snapshot %d in bins %s", report.snapshot["id"], report.snapshot["bins"])
        if report.retired_bins:
            log.info("retired bins (nothing in them is needed any more, now hidden): %s", report.retired_bins)
        if state.unavailable_bins:
            log.warning(
                "bins %s are still needed but also hold data that has since changed or been deleted: reads of "
                "those ranges fail; keep the copies made earlier, or repack with --repack-below 1",
                sorted(state.unavailable_bins),
            )
        log.info(
            "scan finished: %d new bins, %d files packed, %d unchanged, %d bytes read; %d bins visible",
            len(report.bins_sealed), report.files_placed, report.skipped, report.bytes_read, len(state.bins),
        )


class _Interrupted(KeyboardInterrupt):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def unwind_on_signals() -> None:
    """Until trio takes the signals over, SIGTERM/SIGHUP unwind like SIGINT does, through the caller's finally."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
