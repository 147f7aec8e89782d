"""`packerfs mount` (the pack view, or --reverse) and `packerfs umount`."""

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


def register(commands) -> None:
    from packerfs.commands.options import (
        EPILOG, SRC_HELP, add_car_location_options, add_pack_options, add_parallel_options,
    )

    p = commands.add_parser(
        "mount",
        help="serve SRC's bins as CAR files at MNT, generated on read (--reverse: CARs as the original tree)",
        description="Mount a read-only view of SRC packed into bins: MNT/bin-NNNNNN.car (one per sealed "
        "bin, byte-identical to what `pack` writes with the same state), MNT/manifest.csv and "
        "MNT/manifest.json (a row per bin shown), and MNT/.packerfs-status (JSON: scan state and progress, "
        "stale files, errors). SRC is scanned in the background and bins appear as they are sealed; "
        "copy them out with cp or rsync. Returns once mounted and keeps serving in the background, "
        "logging to STATE/mount.log; `packerfs umount MNT` (or SIGTERM to the daemon) unmounts. "
        "With --reverse, SRC is where the retrieved CARs are (CARS: a directory, a bucket prefix, a piece "
        "gateway, as for `unpack`) and MNT shows the original, decrypted "
        "tree, read-only, each read checked against the blocks' CIDs; MNT/.packerfs-status (not listed) "
        "names missing bins and incomplete files. The CARs are indexed into STATE once; a remount with "
        "unchanged CARs reads none of them again, and SIGHUP to the daemon picks up added CARs.",
        epilog=EPILOG,
    )
    p.add_argument("source", metavar="SRC|CARS", help=SRC_HELP + "; with --reverse, the CARs")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--reverse", action="store_true", help="show the CAR files in CARS as the original tree")
    p.add_argument(
        "-i", "--identity", action="append", metavar="FILE",
        help="--reverse: age identity or OpenSSH private key (repeatable)",
    )
    p.add_argument("--dataset", metavar="HEX", help="--reverse: use only the CARs of this data set (when several are mixed)")
    p.add_argument("--snapshot", metavar="ID", help="--reverse: show the tree of snapshot ID (default: the newest complete one)")
    add_pack_options(p)
    add_car_location_options(p, object_options=False)  # -o comes with the pack options
    add_parallel_options(p)
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
    if args.reverse:
        return cmd_mount_reverse(args)
    if args.identity or args.dataset or args.snapshot:
        raise UsageError("--identity, --dataset and --snapshot go with --reverse (mounting CARs as the original tree)")
    from packerfs.commands.options import serving_engine
    from packerfs.fs.daemon import LOG_NAME, check_mountpoint, serve

    from packerfs.commands.options import pool_factory

    make_pool = pool_factory(args)
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    # Now, before mounting: afterwards a stat of MNT is the mount's root.
    state_dir, shown, mount_engine = serving_engine(args, ("mount point", mountpoint))
    log_path = os.path.join(state_dir, LOG_NAME)

    def job(ready) -> int:
        return serve(
            mount_engine, mountpoint, state_dir,
            allow_other=args.allow_other, skip_unreadable=args.skip_unreadable,
            repack_below=args.repack_below, ready=ready, pool_factory=make_pool,
            log_path=None if args.foreground else log_path,
        )

    return _start(job, args.foreground, log_path, f"{shown} at {mountpoint}")


def cmd_mount_reverse(args: argparse.Namespace) -> int:
    from packerfs.crypt import KeyRing
    from packerfs.fs.daemon import LOG_NAME, check_mountpoint
    from packerfs.fs.reverse import default_reverse_state_dir, serve_reverse

    pack_only = [
        flag for flag, given in (
            ("--bin-size", args.bin_size), ("--recipient", args.recipient), ("--recipients-file", args.recipients_file),
            ("--gpg-recipient", args.gpg_recipient), ("--no-encryption", args.no_encryption),
            ("--skip-unreadable", args.skip_unreadable), ("--repack-below", args.repack_below is not None),
        ) if given
    ]
    if pack_only:
        raise UsageError(f"{', '.join(pack_only)}: not an option of mount --reverse (the CARs say how they were made)")
    from packerfs.commands.options import car_sources

    cars = args.source
    if "://" not in cars and not os.path.exists(cars):
        raise UsageError(f"{cars}: no such file or directory")
    dataset = None
    if args.dataset:
        try:
            dataset = bytes.fromhex(args.dataset)
        except ValueError:
            raise UsageError(f"data set id {args.dataset!r} is not hexadecimal") from None
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    gpg_homedir = os.path.abspath(args.gpg_homedir) if args.gpg_homedir else None  # the daemon works in /
    keyring = KeyRing(args.identity or (), gpg_homedir)  # a missing or unreadable identity: here, in one line
    cars = car_sources(args, [cars if "://" in cars else os.path.abspath(cars)])
    state_dir = os.path.abspath(args.temp or default_reverse_state_dir(cars))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(state_dir, LOG_NAME)

    def job(ready) -> int:
        return serve_reverse(
            cars, mountpoint, state_dir, keyring, dataset=dataset, snapshot=args.snapshot, allow_other=args.allow_other, ready=ready,
            log_path=None if args.foreground else log_path,
        )

    return _start(job, args.foreground, log_path, f"the tree in {cars} at {mountpoint}")


def _start(job, foreground: bool, log_path: str, what: str) -> int:
    """Serve in this process (--foreground, logging to stderr) or in a detached daemon logging to log_path."""
    from packerfs.fs.daemon import configure_logging, detach

    if foreground:
        configure_logging(sys.stderr)
        return job(lambda: None)
    pid = detach(job, log_path)
    print(f"packerfs: serving {what} (pid {pid}, log {log_path})", file=sys.stderr)
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
