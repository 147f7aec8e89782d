"""The mount's life: detach, mount, scan in the background, serve, unmount.

    serve()       mounts the pack view and serves it until the file system is
                  unmounted (`packerfs umount`, fusermount3 -u) or the process gets
                  SIGINT/SIGTERM/SIGHUP, then unmounts and stops the scan. Used as
                  is by `mount --foreground`.
    serve_view()  the part any view shares: mount, run its services beside the
                  FUSE loop, watch the signals, unmount.
    detach()      runs serve() in a daemon (double fork, new session, stdio on
                  /dev/null and the log file) and returns in the caller once the
                  file system is mounted, or raises the daemon's one-line error.

The scan runs in a plain thread so it can be joined before the index is
closed; it is stopped by its progress callback raising ScanStopped at the next
chunk it reads (what it had not sealed is redone, identically, next time).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time
from typing import Awaitable, Callable, Sequence

from packerfs.errors import PackerfsError, UsageError
from packerfs.index import lock as index_lock

log = logging.getLogger("packerfs.fs")

LOG_NAME = "mount.log"
PROCESSES = max(2, min(4, os.cpu_count() or 2))  # worker processes regenerating bytes (packerfs.fs.workers)
THREADS = 2  # threads regenerating bytes if every worker process died
WINDOW = 1 << 20  # bytes regenerated per request to a worker (packerfs.fs.blocks)
CACHE_BYTES = 64 << 20  # windows kept in memory
LEAVES = 16  # verified leaves kept by each BinReader
SCAN_JOIN_TIMEOUT = 30.0
READAHEAD_KB = 1024


class ScanStopped(BaseException):
    """Raised inside the scan (through its progress callback) to stop it at unmount."""


class _Progress:
    """The scan's `advance` callback: counts bytes for the status file, and stops the scan on request."""

    def __init__(self, state, stop: threading.Event):
        self.state = state
        self.stop = stop

    def __call__(self, n: int) -> None:
        if self.stop.is_set():
            raise ScanStopped()
        self.state.bytes_scanned += n

    def set_total(self, total: int) -> None:
        self.state.bytes_total = total


# ---------------------------------------------------------------- checks


def check_mountpoint(mountpoint: str) -> None:
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"{mountpoint}: mount point does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"{mountpoint}: a dead FUSE mount is left here; run `packerfs umount {mountpoint}` first"
            ) from None
        raise UsageError(f"{mountpoint}: cannot use as mount point: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: mount point is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint}: something is already mounted here; unmount it first")


def lock_state(state_dir: str, mountpoint: str) -> int:
    """One mount (or pack) per state directory; returns the lock's fd, to close at exit."""
    return index_lock.lock_state(state_dir, f"serving {mountpoint}")


def _tune_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead READAHEAD_KB of a bin, in requests of up to 1 MiB (it asks FUSE for
    128 KiB at a time by default). Best effort: the mount's backing device info is tuned through sysfs,
    which needs root. Call it once the session is initialized (its INIT reply resets the read-ahead)."""
    from packerfs.fs.mounts import mount_entry

    kb = READAHEAD_KB
    entry = mount_entry(mountpoint)
    if entry is None:
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        log.info("read-ahead of %s set to %d KiB", mountpoint, kb)
    except OSError as exc:
        log.info("read-ahead of %s left at the kernel's default (%s)", mountpoint, exc.strerror)


def _stable_mtime(state_dir: str) -> int:
    """Bins get the state directory's creation time (its dataset key's mtime): the same on every mount,
    so `rsync -a` skips bins it already copied."""
    from packerfs.crypt.secrets import DATASET_KEY_NAME

    try:
        return os.stat(os.path.join(state_dir, DATASET_KEY_NAME)).st_mtime_ns
    except OSError:
        return time.time_ns()


# ---------------------------------------------------------------- serving


def unwind_on_signals() -> None:
    """Until trio takes the signals over, SIGTERM/SIGHUP unwind like SIGINT does, through the caller's finally."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)


def serve_view(
    view,
    mountpoint: str,
    *,
    allow_other: bool = False,
    ready: Callable[[], None] = lambda: None,
    services: Sequence[Callable] = (),
    on_hangup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Mount `view` (a pyfuse3.Operations) at `mountpoint` and serve it until the file system is
    unmounted or the process gets SIGINT/SIGTERM (and SIGHUP, unless `on_hangup` handles it); then
    unmount. `ready()` is called once mounted. `services` are async functions run beside the FUSE
    loop, each started with nursery.start (they call task_status.started()) and cancelled at the end;
    `on_hangup` is started on every SIGHUP."""
    import pyfuse3
    import trio

    options = set(pyfuse3.default_options) | {"fsname=packerfs", "subtype=packerfs", "ro"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(view, mountpoint, options)
    except RuntimeError as exc:
        hint = " (allow_other needs user_allow_other in /etc/fuse.conf)" if allow_other else ""
        raise PackerfsError(f"{mountpoint}: cannot mount: {exc}{hint}") from None
    try:
        ready()
        trio.run(_main, mountpoint, list(services), on_hangup)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # let the cleanup finish
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def serve(
    open_engine: Callable[[], object],
    mountpoint: str,
    state_dir: str,
    *,
    allow_other: bool = False,
    skip_unreadable: bool = False,
    repack_below: float | None = None,
    ready: Callable[[], None] = lambda: None,
    log_path: str | None = None,
) -> int:
    """Mount the pack view of the engine at `mountpoint` and serve it until unmounted or signalled."""
    import trio

    from packerfs.fs.blocks import WindowCache
    from packerfs.fs.packview import PackView, ViewState
    from packerfs.fs.workers import ProcessReaders, ThreadReaders, bin_readers
    from packerfs.pack.reader import BinReader

    check_mountpoint(mountpoint)
    lock_fd = lock_state(state_dir, mountpoint)
    # Forked first: before the index is opened, any thread started or /dev/fuse opened.
    open_reader, encode = bin_readers(open_engine, LEAVES)
    workers = ProcessReaders(open_reader, PROCESSES, WINDOW, encode) if PROCESSES else None
    unwind_on_signals()
    engine = None
    scan = None
    stop = threading.Event()
    try:
        engine = open_engine()
        info = {
            "source": engine.source.url,
            "state_dir": engine.state_dir,
            "mountpoint": mountpoint,
            "pid": os.getpid(),
            "log": log_path,
            "bin_size": engine.bin_size,
            "cipher": engine.cipher.name,
        }
        state = ViewState(engine.bins(), info, _stable_mtime(engine.state_dir))
        reader = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=LEAVES)
        threads = ThreadReaders(reader, THREADS)
        if workers is not None:
            workers.open_engines()
            workers.fallback = threads
        cache = WindowCache(
            (workers or threads).read, window=WINDOW, capacity=CACHE_BYTES // WINDOW, serialize=workers is None
        )
        view = PackView(state, cache)

        async def start_scan(task_status=trio.TASK_STATUS_IGNORED) -> None:
            """The scan starts once the session exists (its end may invalidate names in the kernel)."""
            nonlocal scan
            scan = threading.Thread(
                target=_scan, args=(engine, state, stop, skip_unreadable, repack_below), name="packerfs-scan", daemon=True
            )
            scan.start()
            task_status.started()

        log.info(
            "mounting %s at %s: %d sealed bins visible, %d worker processes, state %s",
            engine.source.url, mountpoint, len(state.bins), PROCESSES, engine.state_dir,
        )
        # The scan thread is busy in Python; let the FUSE loop have the GIL back sooner than every 5 ms.
        sys.setswitchinterval(0.001)
        serve_view(
            view, mountpoint, allow_other=allow_other, ready=ready,
            services=[cache.run, *([workers.run] if workers is not None else []), start_scan],
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # let the cleanup below finish
        stop.set()
        if workers is not None:
            workers.close()
        if scan is not None:
            scan.join(SCAN_JOIN_TIMEOUT)
        if engine is not None:
            if scan is not None and scan.is_alive():
                log.warning("the scan did not stop within %d s; leaving it (the next run resumes it)", SCAN_JOIN_TIMEOUT)
            else:
                engine.close()
        os.close(lock_fd)
    return 0


class _Interrupted(KeyboardInterrupt):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


async def _main(mountpoint: str, services: list, on_hangup) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        for service in services:
            await nursery.start(service)
        nursery.start_soon(_watch_signals, nursery, on_hangup)
        nursery.start_soon(_after_init, mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _after_init(mountpoint: str) -> None:
    """The kernel caps the read-ahead when the session starts: raise it once the mount answers."""
    import trio

    await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    _tune_readahead(mountpoint)


async def _watch_signals(nursery, on_hangup) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP and on_hangup is not None:
                nursery.start_soon(on_hangup)
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _scan(engine, state, stop: threading.Event, skip_unreadable: bool, repack_below: float | None = None) -> None:
    import pyfuse3

    from packerfs.fs.packview import ROOT
    from packerfs.pack.writer import car_name

    try:
        report = engine.scan(
            skip_unreadable=skip_unreadable, advance=_Progress(state, stop), on_seal=state.sealed,
            repack_below=repack_below,
        )
    except ScanStopped:
        log.info("scan stopped at unmount; the next mount or pack resumes it")
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
    for number in gone:
        pyfuse3.invalidate_entry_async(ROOT, car_name(number).encode(), ignore_enoent=True)
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
            "those ranges fail; keep the copies made earlier, or mount with --repack-below 1",
            sorted(state.unavailable_bins),
        )
    log.info(
        "scan finished: %d new bins, %d files packed, %d unchanged, %d bytes read; %d bins visible",
        len(report.bins_sealed), report.files_placed, report.skipped, report.bytes_read, len(state.bins),
    )


# ---------------------------------------------------------------- daemon


def configure_logging(stream) -> None:
    logging.basicConfig(
        stream=stream, level=logging.INFO, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def detach(job: Callable[[Callable[[], None]], int], log_path: str) -> int:
    """Run `job(ready)` in a daemon; return its pid once it has called ready(), or raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        os.waitpid(pid, 0)
        if message.startswith("OK "):
            return int(message.split()[1])
        if message.startswith("ERR "):
            _, code, text = message.rstrip("\n").split(" ", 2)
            error = PackerfsError(text)
            error.exit_code = int(code)
            raise error
        raise PackerfsError(f"the mount daemon exited before the file system was mounted; see {log_path}")

    # first child: a new session, then the daemon itself, so it has no controlling terminal
    code = 1
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(logfd, 2)
        os.close(devnull)
        os.close(logfd)
        configure_logging(sys.stderr)
        pipe = [w]

        def ready() -> None:
            os.write(pipe[0], f"OK {os.getpid()}\n".encode())
            os.close(pipe.pop())
            os.chdir("/")  # keep no directory busy

        try:
            code = job(ready)
        except PackerfsError as exc:
            log.error("%s", exc)
            code = exc.exit_code
            if pipe:
                os.write(pipe[0], f"ERR {code} {' '.join(str(exc).split())}\n".encode())
        except KeyboardInterrupt as exc:  # a signal before trio took them over
            log.info("interrupted (%s)", exc)
            code = 0
        except BaseException:
            log.exception("the mount daemon failed")
            if pipe:
                os.write(pipe[0], f"ERR 1 the mount daemon failed; see {log_path}\n".encode())
    finally:
        logging.shutdown()
        os._exit(code)
