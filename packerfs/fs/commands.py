"""`packerfs mount` and `packerfs umount`."""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import threading
import time

from packerfs.errors import PackerfsError, UsageError

STATUS_FILE = ".packerfs-status"


def register_mount_commands(commands) -> None:
    from packerfs.cli import EPILOG, add_pack_options

    p = commands.add_parser(
        "mount",
        help="serve SRC's bins as CAR files at MNT, generated on read",
        description="Mount a read-only view of SRC packed into bins: MNT/bin-NNNNNN.car (one per sealed "
        "bin, byte-identical to what `pack` writes with the same state), MNT/manifest.csv and "
        "MNT/manifest.json (a row per bin shown), and MNT/.packerfs-status (JSON: scan state and progress, "
        "stale files, errors). SRC is scanned in the background and bins appear as they are sealed; "
        "copy them out with cp or rsync. Returns once mounted and keeps serving in the background, "
        "logging to STATE/mount.log; `packerfs umount MNT` (or SIGTERM to the daemon) unmounts.",
        epilog=EPILOG,
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("mountpoint", metavar="MNT")
    add_pack_options(p)
    p.add_argument("--skip-unreadable", action="store_true", help="skip unreadable files (listed in the status file)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground and log to stderr")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount (FUSE allow_other)")
    p.set_defaults(func=cmd_mount)

    p = commands.add_parser(
        "umount",
        help="unmount a packerfs mount",
        description="Unmount MNT and wait for its daemon to exit. A mount whose daemon died is "
        "detached lazily.",
        epilog=EPILOG,
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("-z", "--lazy", action="store_true", help="detach now even if files are open (fusermount3 -z)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="how long to wait for the daemon (default 60)")
    p.set_defaults(func=cmd_umount)


def cmd_mount(args: argparse.Namespace) -> int:
    from packerfs.cli import open_engine
    from packerfs.fs.daemon import LOG_NAME, check_mountpoint, configure_logging, detach, serve
    from packerfs.pack import default_state_dir

    if not os.path.isdir(args.source):
        raise UsageError(f"{args.source}: source is not a directory")
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    state_dir = os.path.abspath(args.temp or default_state_dir(os.path.realpath(args.source)))
    args.temp = state_dir
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(state_dir, LOG_NAME)

    def job(ready) -> int:
        return serve(
            lambda: open_engine(args), mountpoint, state_dir,
            allow_other=args.allow_other, skip_unreadable=args.skip_unreadable, ready=ready,
            log_path=None if args.foreground else log_path,
        )

    if args.foreground:
        configure_logging(sys.stderr)
        return job(lambda: None)
    pid = detach(job, log_path)
    print(f"packerfs: serving {os.path.realpath(args.source)} at {mountpoint} (pid {pid}, log {log_path})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- umount


def _daemon_pid(mountpoint: str, timeout: float = 5.0) -> int | None:
    """The serving daemon's pid, from the status file, read in a thread so a hung daemon cannot hang us."""
    result: list = []

    def read() -> None:
        try:
            with open(os.path.join(mountpoint, STATUS_FILE)) as f:
                result.append(json.load(f).get("pid"))
        except (OSError, ValueError):
            result.append(None)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def _wait_exit(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (OSError, AttributeError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    from packerfs.fs.mounts import mount_entry

    entry = mount_entry(mountpoint)
    if entry is None:
        raise UsageError(f"{mountpoint}: not mounted")
    if entry.fstype != "fuse.packerfs":
        raise UsageError(f"{mountpoint}: not a packerfs mount ({entry.fstype} from {entry.source})")
    lazy = args.lazy
    try:
        os.stat(mountpoint)
        pid = _daemon_pid(mountpoint)
    except OSError:
        pid, lazy = None, True  # the daemon is gone; only the kernel's mount is left
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except FileNotFoundError:
        done = subprocess.run(["umount"] + (["-l"] if lazy else []) + [mountpoint], capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit {done.returncode}"
        if "busy" in why:
            raise PackerfsError(f"{mountpoint}: busy (files are open); close them, or use --lazy ({why})")
        raise PackerfsError(f"{mountpoint}: cannot unmount: {why}")
    if pid and not _wait_exit(int(pid), args.timeout):
        raise PackerfsError(f"{mountpoint}: unmounted, but its daemon (pid {pid}) has not exited after {args.timeout:g} s")
    return 0
