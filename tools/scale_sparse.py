"""`scale.py sparse`: the mount's background scan over a large sparse source (see scale.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scale_common import (
    GiB, KiB, MiB, call_with_timeout, check_free_space, cipher_options, default_cache_dir, load_average,
    packerfs_command, print_processes, rejected_option, shell_line, size_type, workers_note,
)
from scale_proc import Proc, TreeSampler, alive, proc, terminate, wait_gone

MOUNT_TIMEOUT = 120.0  # `packerfs mount` returns once mounted
STATUS_TIMEOUT = 20.0  # one read of MNT/.packerfs-status
CLI_TIMEOUT = 60.0  # `packerfs status --json`
FUSERMOUNT_TIMEOUT = 30.0
DAEMON_EXIT_TIMEOUT = 60.0  # the daemon stops its scan (packerfs waits up to 30 s for it) and exits
MIN_FREE = 2 * GiB  # the index grows ~64 bytes per MiB scanned; plus the log
MIN_STEPS = 4  # a counter that moved in fewer intervals than this (whole bins at a time) gives no rate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=size_type, default=size_type("1TiB"), help="total size of the sparse source (default 1TiB)")
    p.add_argument("--run", type=size_type, help="stop once this many bytes are scanned or read (default: when the scan ends)")
    p.add_argument("--bin-size", default="32GiB-sector", help="passed to packerfs as is (default 32GiB-sector)")
    p.add_argument("--files", type=int, default=16, help="sparse files the size is spread over (default 16)")
    p.add_argument("--workers", type=int, help="passed to `packerfs mount --workers` (only if given)")
    p.add_argument("--no-encryption", action="store_true", help="scan without encryption (default: age)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--stall", type=float, default=180.0, help="give up after this many seconds in which nothing is scanned or read (default 180)")
    p.add_argument("--max-seconds", type=float, help="give up after this long in all")
    p.add_argument("--dir", type=Path, default=default_cache_dir(), help="where the temporary work directory goes")
    p.add_argument("--keep", action="store_true", help="keep the sparse files, the state and the log")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every figure")


@dataclass
class Row:
    elapsed: float  # s since the mount returned
    bytes_scanned: int  # the status file's counter
    bytes_read: int  # read()/pread() bytes of the daemon's process tree since the first row (/proc/PID/io)
    cpu_s: float  # CPU time of the tree since the first row
    bins_sealed: int
    state: str
    rss_kib: int  # the daemon and its children, summed
    pss_kib: int
    daemon_rss_kib: int
    processes: int
    errors: list[str]  # the status file's `errors` (why a scan failed)


class MountRejected(SystemExit):
    pass


# ------------------------------------------------------------------ source and mount


def make_sparse_source(src: Path, size: int, files: int) -> list[int]:
    """`files` sparse files summing to `size` (ftruncate only: no data blocks); returns their sizes."""
    src.mkdir(parents=True)
    sizes = [size // files] * files
    sizes[-1] += size - sum(sizes)
    for i, n in enumerate(sizes):
        path = src / f"sparse-{i:03d}.bin"
        with open(path, "wb") as f:
            f.truncate(n)
        if os.stat(path).st_blocks * 512 > 1 * MiB:
            raise SystemExit(f"scale: {path}: the file system at {src} does not keep files sparse")
    return sizes


def mount_command(args: argparse.Namespace, src: Path, mnt: Path, state: Path, cipher: list[str]) -> list[str]:
    argv = packerfs_command() + ["mount", str(src), str(mnt), "--temp", str(state), "--bin-size", args.bin_size, *cipher]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    return argv


def mount(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    if result.returncode == 0:
        return
    stderr = result.stderr.strip()
    if rejected_option(stderr, "--workers"):
        raise MountRejected(f"scale: `packerfs mount` does not take --workers (yet): {stderr.splitlines()[-1]}")
    raise SystemExit(f"scale: packerfs mount failed (exit {result.returncode}): {stderr}")


def read_status(mnt: Path) -> dict:
    """The mount's MNT/.packerfs-status (bytes_scanned, bins_sealed, state, pid, …)."""
    return call_with_timeout(lambda: json.loads((mnt / ".packerfs-status").read_bytes()), STATUS_TIMEOUT)


def find_daemon(mnt: Path, state: Path) -> Proc:
    """The mount daemon: the pid in its status file, else the one in STATE/lock (`pid N serving MNT`)."""
    try:
        pid = int(read_status(mnt)["pid"])
    except (OSError, TimeoutError, KeyError, ValueError):
        pid = lock_holder(state)
    daemon = proc(pid) if pid else None
    if daemon is None:
        raise SystemExit("scale: cannot find the mount daemon's pid (status file and STATE/lock)")
    return daemon


def lock_holder(state: Path) -> int | None:
    """The pid STATE/lock names (`pid N serving MNT`); the lock file outlives its holder, so check it lives."""
    try:
        words = (state / "lock").read_text().split()
    except OSError:
        return None
    return int(words[1]) if len(words) > 1 and words[0] == "pid" and words[1].isdigit() else None


def cli_status(src: Path, state: Path) -> dict | None:
    """`packerfs status SRC --temp STATE --json` (read from the index; no bytes_scanned), or None."""
    argv = packerfs_command() + ["status", str(src), "--temp", str(state), "--json"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        return json.loads(result.stdout) if result.returncode == 0 else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return None


def is_mounted(mnt: Path) -> bool:
    """From /proc/self/mounts, which never blocks on a wedged FUSE daemon (os.path.ismount can)."""
    target = os.path.abspath(mnt)
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].encode().decode("unicode_escape")  # \040 for a space, …
            if point == target:
                return True
    return False


def unmount(mnt: Path, daemon: Proc | None, known: list[Proc]) -> list[str]:
    """Unmount, let the daemon exit, and kill what is left of its tree; returns notes on what it took."""
    notes = []
    if is_mounted(mnt):
        for flags in ("-u", "-uz"):
            try:
                subprocess.run(["fusermount3", flags, str(mnt)], capture_output=True, timeout=FUSERMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                notes.append(f"fusermount3 {flags} timed out")
            if not is_mounted(mnt):
                break
            notes.append(f"fusermount3 {flags} left it mounted")
    processes = ([daemon] if daemon else []) + known
    if daemon is not None and not wait_gone([daemon], DAEMON_EXIT_TIMEOUT):
        notes.append(f"daemon {daemon.pid} still running {DAEMON_EXIT_TIMEOUT:.0f} s after the unmount: terminated")
        terminate([daemon])
    if not wait_gone(processes, 10):
        killed = terminate(processes, grace=5)
        notes.append(f"killed leftover processes {[p.pid for p in killed]}")
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=FUSERMOUNT_TIMEOUT)
    return notes


# ------------------------------------------------------------------ sampling


def sample_row(mnt: Path, sampler: TreeSampler, start: float) -> Row:
    """Status and memory now; bytes read and CPU time as totals over every process seen so far."""
    status = read_status(mnt)
    memory = sampler.sample() or sampler.latest
    return Row(
        elapsed=time.monotonic() - start,
        bytes_scanned=int(status.get("bytes_scanned", 0)),
        bytes_read=memory.read_bytes if memory else 0,
        cpu_s=memory.cpu_s if memory else 0.0,
        bins_sealed=int(status.get("bins_sealed", 0)),
        state=str(status.get("state", "?")),
        rss_kib=memory.tree_rss_kib if memory else 0,
        pss_kib=memory.tree_pss_kib if memory else 0,
        daemon_rss_kib=memory.root_rss_kib if memory else 0,
        processes=memory.processes if memory else 0,
        errors=[str(e) for e in status.get("errors", [])],
    )


def watch_scan(
    args: argparse.Namespace, mnt: Path, sampler: TreeSampler, start: float, goal: int | None
) -> tuple[list[Row], str, bool]:
    """Sample every --interval s until `goal` bytes are scanned (by the status counter or the source
    reads, whichever is ahead; None: until the scan ends), the scan ends, nothing moves for --stall s,
    or the daemon dies.

    Prints each row as it comes; returns the rows, why sampling stopped, and whether that is a
    normal end (goal reached, or the scan finished)."""
    print_header()
    rows: list[Row] = []
    origin = (0, 0.0)  # the first row's totals: bytes read and CPU time count from there
    last_progress = time.monotonic()
    while True:
        if not alive(sampler.root):
            return rows, "the mount daemon exited", False
        try:
            row = sample_row(mnt, sampler, start)
        except (OSError, TimeoutError, ValueError) as exc:
            return rows, f"MNT/.packerfs-status unreadable: {exc}", False
        if not rows:
            origin = (row.bytes_read, row.cpu_s)
        row.bytes_read, row.cpu_s = row.bytes_read - origin[0], row.cpu_s - origin[1]
        previous = rows[-1] if rows else None
        if previous and (row.bytes_scanned > previous.bytes_scanned or row.bytes_read > previous.bytes_read):
            last_progress = time.monotonic()
        rows.append(row)
        print_row(row, previous)
        if goal is not None and max(row.bytes_scanned, row.bytes_read) >= goal:
            return rows, f"--run reached ({row.bytes_scanned / GiB:.2f} GiB scanned, {row.bytes_read / GiB:.2f} GiB read)", True
        if row.state != "scanning":
            errors = f" ({'; '.join(row.errors)})" if row.errors else ""
            return rows, f"the scan ended: state {row.state}{errors}", row.state == "ready"
        if time.monotonic() - last_progress > args.stall:
            return rows, f"nothing scanned or read for {args.stall:.0f} s", False
        if args.max_seconds and row.elapsed > args.max_seconds:
            return rows, f"--max-seconds {args.max_seconds:.0f} reached", False
        time.sleep(max(0.0, args.interval - (time.monotonic() - start - row.elapsed)))


def rate(row: Row, previous: Row | None, counter: str) -> float | None:
    """Bytes per second of `counter` over the interval ending at row."""
    if previous is None or row.elapsed <= previous.elapsed:
        return None
    return (getattr(row, counter) - getattr(previous, counter)) / (row.elapsed - previous.elapsed)


def print_header() -> None:
    print(
        f"{'elapsed':>8} {'scanned':>8} {'':>7} {'read':>8} {'':>7} {'bins':>6} {'CPU':>5} "
        f"{'RSS':>7} {'PSS':>7} {'daemon':>7} {'procs':>5}  state"
    )
    print(
        f"{'s':>8} {'GiB':>8} {'MiB/s':>7} {'GiB':>8} {'MiB/s':>7} {'sealed':>6} {'%':>5} "
        f"{'MiB':>7} {'MiB':>7} {'RSS MiB':>7} {'':>5}"
    )


def print_row(row: Row, previous: Row | None) -> None:
    def per_s(counter: str) -> str:
        value = rate(row, previous, counter)
        return f"{value / MiB:7.1f}" if value is not None else f"{'':>7}"

    cpu = f"{100 * (row.cpu_s - previous.cpu_s) / (row.elapsed - previous.elapsed):5.0f}" if previous else f"{'':>5}"
    print(
        f"{row.elapsed:8.1f} {row.bytes_scanned / GiB:8.2f} {per_s('bytes_scanned')} {row.bytes_read / GiB:8.2f} "
        f"{per_s('bytes_read')} {row.bins_sealed:6d} {cpu} {row.rss_kib / KiB:7.1f} {row.pss_kib / KiB:7.1f} "
        f"{row.daemon_rss_kib / KiB:7.1f} {row.processes:5d}  {row.state}",
        flush=True,
    )


# ------------------------------------------------------------------ summary


def steady_rows(rows: list[Row], counter: str) -> list[Row]:
    """The rows bounding the intervals of steady scanning, by `counter`: from the first row at which
    the counter has moved 1% of its whole run (the interval before it holds the start-up: the daemon's
    workers starting, the first reads) to the last row still scanning (a final interval in which the
    scan finished holds idle time)."""
    if not rows:
        return []
    total = getattr(rows[-1], counter) - getattr(rows[0], counter)
    first = next((i for i, r in enumerate(rows) if total > 0 and getattr(r, counter) - getattr(rows[0], counter) >= total / 100), len(rows))
    last = len(rows) - 1
    if rows[last].state != "scanning" and last - 1 > first:
        last -= 1
    return rows[first : last + 1]


def over(rows: list[Row], counter: str) -> tuple[float, float, float] | None:
    """(bytes of counter, CPU seconds, wall seconds) from rows[0] to rows[-1]."""
    if len(rows) < 2 or rows[-1].elapsed <= rows[0].elapsed:
        return None
    return (
        getattr(rows[-1], counter) - getattr(rows[0], counter), rows[-1].cpu_s - rows[0].cpu_s, rows[-1].elapsed - rows[0].elapsed,
    )


def throughput(rows: list[Row], counter: str) -> dict:
    """Mean MiB/s over the steady intervals; the last 10% of them against the first 10% (flatness),
    in MiB/s and in CPU seconds per GiB (less sensitive to other load on the machine)."""
    steady = steady_rows(rows, counter)
    intervals = max(len(steady) - 1, 0)
    k = max(1, round(intervals * 0.1))
    whole = over(steady, counter)
    first = over(steady[: k + 1], counter) if intervals >= 2 else None
    last = over(steady[-(k + 1) :], counter) if intervals >= 2 else None

    def mib_s(part):
        return part[0] / MiB / part[2] if part else None

    def cpu_per_gib(part):
        return part[1] / (part[0] / GiB) if part and part[0] else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    steps = sum(1 for a, b in zip(rows, rows[1:]) if getattr(b, counter) > getattr(a, counter))
    return {
        "steps": steps,  # intervals in which the counter moved at all
        "steady_intervals": intervals,
        "mean_mib_s": mib_s(whole),
        "first_10pct_mib_s": mib_s(first),
        "last_10pct_mib_s": mib_s(last),
        "flatness": ratio(mib_s(last), mib_s(first)),
        "cpu_s_per_gib": cpu_per_gib(whole),
        "first_10pct_cpu_s_per_gib": cpu_per_gib(first),
        "last_10pct_cpu_s_per_gib": cpu_per_gib(last),
        "cpu_flatness": ratio(cpu_per_gib(first), cpu_per_gib(last)),  # > 1 when bytes cost more CPU later
        "mean_cpu_pct": 100 * whole[1] / whole[2] if whole else None,
    }


def summarize(rows: list[Row], sampler: TreeSampler) -> dict:
    """Throughput by both counters, and memory."""
    # memory from the start of steady scanning on: before it, the workers may not have started
    with_memory = [r for r in steady_rows(rows, "bytes_read") if r.rss_kib] or [r for r in rows if r.rss_kib]
    started = next((r for r in rows if r.bytes_scanned > 0 or r.bytes_read > 0), None)
    return {
        "bytes_scanned": rows[-1].bytes_scanned if rows else 0,
        "bytes_read": rows[-1].bytes_read if rows else 0,
        "bins_sealed": rows[-1].bins_sealed if rows else 0,
        "seconds": rows[-1].elapsed if rows else 0.0,
        "cpu_s": rows[-1].cpu_s if rows else 0.0,
        "first_bytes_by_s": started.elapsed if started else None,
        "by_status": throughput(rows, "bytes_scanned"),
        "by_reads": throughput(rows, "bytes_read"),
        "peak_rss_mib": sampler.peak_tree_rss_kib / KiB,
        "peak_pss_mib": sampler.peak_tree_pss_kib / KiB,
        "daemon_peak_rss_mib": sampler.root_peak_kib() / KiB,
        "largest_child_peak_rss_mib": sampler.largest_child()[1] / KiB,
        "processes": sampler.peak_processes,
        "processes_seen": len(sampler.members),
        "first_rss_mib": with_memory[0].rss_kib / KiB if with_memory else None,
        "last_rss_mib": with_memory[-1].rss_kib / KiB if with_memory else None,
        "first_pss_mib": with_memory[0].pss_kib / KiB if with_memory else None,
        "last_pss_mib": with_memory[-1].pss_kib / KiB if with_memory else None,
    }


def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def print_throughput(name: str, t: dict) -> None:
    if t["steps"] < MIN_STEPS:
        print(f"{name}: moved in {t['steps']} steps only (whole bins at a time): no rate from it")
        return
    print(
        f"{name}: mean {fmt(t['mean_mib_s'])} MiB/s over {t['steady_intervals']} steady intervals; "
        f"flatness (last 10% / first 10%) {fmt(t['flatness'], '.3f')} "
        f"({fmt(t['last_10pct_mib_s'])} / {fmt(t['first_10pct_mib_s'])} MiB/s); "
        f"CPU {fmt(t['cpu_s_per_gib'], '.2f')} s/GiB, first/last 10% {fmt(t['first_10pct_cpu_s_per_gib'], '.2f')} / "
        f"{fmt(t['last_10pct_cpu_s_per_gib'], '.2f')} (ratio {fmt(t['cpu_flatness'], '.3f')}), "
        f"{fmt(t['mean_cpu_pct'], '.0f')}% CPU"
    )


def print_summary(s: dict, why: str, cli: dict | None) -> None:
    print(f"stopped: {why}")
    print(
        f"scanned {s['bytes_scanned'] / GiB:.2f} GiB (status), read {s['bytes_read'] / GiB:.2f} GiB (/proc io) "
        f"in {s['seconds']:.1f} s, first bytes by {fmt(s['first_bytes_by_s'], '.1f', ' s')}; "
        f"{s['bins_sealed']} bins sealed; {s['cpu_s']:.0f} CPU s"
    )
    print_throughput("by status bytes_scanned", s["by_status"])
    print_throughput("by source reads        ", s["by_reads"])
    print(
        f"peak RSS: {s['peak_rss_mib']:.1f} MiB summed over {s['processes']} processes (PSS {s['peak_pss_mib']:.1f} MiB); "
        f"daemon {s['daemon_peak_rss_mib']:.1f} MiB, largest of {s['processes_seen'] - 1} children "
        f"{s['largest_child_peak_rss_mib']:.1f} MiB (VmHWM)"
    )
    print(
        f"RSS first vs last steady sample: {fmt(s['first_rss_mib'])} -> {fmt(s['last_rss_mib'])} MiB "
        f"(PSS {fmt(s['first_pss_mib'])} -> {fmt(s['last_pss_mib'])} MiB)"
    )
    if cli is not None:
        print(
            f"packerfs status --json: state {cli.get('state')}, bins_sealed {cli.get('bins_sealed')}, "
            f"bytes_total {cli.get('bytes_total')}"
        )


# ------------------------------------------------------------------ the run


def clean_up(work: Path, daemon: Proc | None, sampler: TreeSampler | None, keep: bool) -> list[str]:
    """Stop sampling, unmount, make sure the daemon and its children are gone, remove `work` unless
    `keep`; prints and returns what it did."""
    mnt, state = work / "mnt", work / "state"
    known: list[Proc] = []
    if sampler is not None:
        sampler.stop()
        known = list(sampler.members)  # the daemon's workers too, should they outlive it
    if daemon is None and lock_holder(state):  # interrupted between the mount and find_daemon
        daemon = proc(lock_holder(state))
    stopping = time.monotonic()
    try:
        notes = unmount(mnt, daemon, known)
    except (OSError, subprocess.SubprocessError) as exc:
        notes = [f"unmount failed: {exc}"]
    notes.append(f"unmounted and the daemon gone in {time.monotonic() - stopping:.1f} s")
    if keep:
        notes.append(f"kept {work} (log: {state / 'mount.log'})")
    elif is_mounted(mnt):
        notes.append(f"{mnt} is still mounted: left {work} in place")
    else:
        shutil.rmtree(work, ignore_errors=True)
    for note in notes:
        print(f"cleanup: {note}")
    return notes


def run(args: argparse.Namespace) -> int:
    goal = min(args.run, args.size) if args.run else None  # None: the whole source, until the scan ends
    args.dir.mkdir(parents=True, exist_ok=True)
    check_free_space(args.dir, MIN_FREE, "the index and log")
    work = Path(tempfile.mkdtemp(prefix="sparse-", dir=args.dir))
    src, mnt, state = work / "src", work / "mnt", work / "state"
    mnt.mkdir()
    daemon: Proc | None = None
    sampler: TreeSampler | None = None
    try:
        sizes = make_sparse_source(src, args.size, args.files)
        cipher, cipher_name = cipher_options(args.no_encryption, work)
        argv = mount_command(args, src, mnt, state, cipher)
        target = f"{goal / GiB:,.2f} GiB" if goal else "all of it"
        print(f"source: {len(sizes)} sparse files, {args.size / GiB:,.2f} GiB in all, in {src}; scanning {target}")
        print(f"cipher {cipher_name}, bin size {args.bin_size}, {workers_note(args.workers)}, load average {load_average()}")
        print(f"$ {shell_line(argv)}", flush=True)
        mount(argv)
        start = time.monotonic()
        daemon = find_daemon(mnt, state)
        sampler = TreeSampler(daemon, period=0.5).start()
        rows, why, ok = watch_scan(args, mnt, sampler, start, goal)
        cli = cli_status(src, state)
        summary = summarize(rows, sampler)
        processes = sampler.per_process()
    finally:
        notes = clean_up(work, daemon, sampler, args.keep)
    print_summary(summary, why, cli)
    print_processes(processes)
    print(f"load average at the end: {load_average()}")
    if args.json:
        record = {
            "run": "sparse", "size": args.size, "goal": goal, "files": args.files, "bin_size": args.bin_size,
            "cipher": cipher_name, "workers": args.workers, "interval_s": args.interval, "stopped": why, "ok": ok,
            "command": argv, "cleanup": notes, **summary,
            "rows": [asdict(r) for r in rows], "packerfs_status": cli, "processes": processes,
        }
        print(json.dumps(record))
    return 0 if ok else 1
