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

The engine, its workers and the background scan are packerfs.fs.service's
PackService, which the HTTP gateway shares.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from typing import Awaitable, Callable, Sequence

from packerfs.errors import PackerfsError, UsageError
from packerfs.fs.service import PackService
from packerfs.index import lock as index_lock

log = logging.getLogger("packerfs.fs")

LOG_NAME = "mount.log"
READAHEAD_KB = 1024


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


# ---------------------------------------------------------------- serving


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
    pool_factory=None,
    ready: Callable[[], None] = lambda: None,
    log_path: str | None = None,
) -> int:
    """Mount the pack view of the engine at `mountpoint` and serve it until unmounted or signalled."""
    from packerfs.fs.packview import ROOT, PackView
    from packerfs.pack.writer import car_name

    check_mountpoint(mountpoint)

    def forget(numbers: list[int]) -> None:
        import pyfuse3

        for number in numbers:
            pyfuse3.invalidate_entry_async(ROOT, car_name(number).encode(), ignore_enoent=True)

    with PackService(
        open_engine, state_dir, mountpoint, skip_unreadable=skip_unreadable, repack_below=repack_below,
        pool_factory=pool_factory,
        info={"mountpoint": mountpoint, "log": log_path}, on_retired=forget,
    ) as service:
        serve_view(PackView(service.state, service.cache), mountpoint, allow_other=allow_other, ready=ready,
                   services=service.services)
    return 0


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
