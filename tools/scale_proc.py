"""Memory of a process tree, read from /proc, for tools/scale.py.

A packerfs run is several processes: the mount daemon forks worker processes before anything
else, and bins may be sealed by Dask worker processes. TreeSampler walks the tree under one root
every `period` seconds and keeps, per process, the kernel's own high-water mark (VmHWM, so a peak
between two samples is not missed while the process lives), its CPU time and the bytes it has
passed to read()/pread() (rchar in /proc/PID/io: reads of the source and of sockets, where Dask's
messages are small, not of the mmap-ed index); and for the tree the largest sum of VmRSS and of PSS seen at one sample, and the CPU
time and bytes read of every process it has seen (the last values seen of those that exited;
a parent's rchar, which Linux grows by the counters of each child it reaps, less those). RSS summed over forked processes counts the pages they share
once per process; PSS (from smaps_rollup) splits shared pages between them, so the tree's PSS is
the honest total and its RSS sum an upper bound.

Processes are named by (pid, start time), so a reused pid is never taken for the same process,
and terminate() signals only processes it was given, by pid, after checking their start time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time in clock ticks since boot (/proc/PID/stat field 22)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def proc(pid: int) -> Proc | None:
    """The live process with this pid, or None."""
    fields = _stat_fields(pid)
    return Proc(pid, int(fields[19])) if fields else None


def alive(p: Proc) -> bool:
    """p is still running (a zombie counts as gone) and its pid has not been reused."""
    fields = _stat_fields(p.pid)
    return bool(fields) and int(fields[19]) == p.start and fields[0] != "Z"


def tree(root: Proc) -> list[Proc]:
    """root (if alive) and all its live descendants, root first."""
    if not alive(root):
        return []
    children: dict[int, list[Proc]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(Proc(int(entry), int(fields[19])))
    found, todo = [root], [root.pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def cpu_seconds(p: Proc) -> float | None:
    """User plus system CPU time of p so far."""
    fields = _stat_fields(p.pid)
    if not fields or int(fields[19]) != p.start:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def bytes_read(p: Proc) -> int | None:
    """rchar: bytes p has passed to read(), pread() and the like."""
    try:
        with open(f"/proc/{p.pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def parent_pid(p: Proc) -> int | None:
    fields = _stat_fields(p.pid)
    return int(fields[1]) if fields else None


def label(p: Proc, width: int = 70) -> str:
    """p's command line without the interpreter's path, cut to `width` characters."""
    try:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python"):
        argv = argv[1:]
    if argv:
        argv[0] = os.path.basename(argv[0])
    text = " ".join(argv)
    return text if len(text) <= width else text[: width - 1] + "…"


def memory_kib(p: Proc) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB, or None if the process is gone."""
    values = {}
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0])
    except OSError:
        return None
    if "VmRSS" not in values:  # a zombie has no memory lines
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def pss_kib(p: Proc) -> int | None:
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class TreeSample:
    """One look at the tree: the root's RSS, the sums over its live processes, how many there were,
    and the CPU time and bytes read by every process seen so far."""

    time: float
    root_rss_kib: int
    tree_rss_kib: int
    tree_pss_kib: int
    processes: int
    cpu_s: float
    read_bytes: int


@dataclass
class TreeSampler:
    """Samples the tree under `root` every `period` s in a thread, between start() and stop()."""

    root: Proc
    period: float = 0.5
    latest: TreeSample | None = None
    peak_tree_rss_kib: int = 0
    peak_tree_pss_kib: int = 0
    peak_processes: int = 0
    hwm_kib: dict[Proc, int] = field(default_factory=dict)  # each process's VmHWM, last seen
    members: set[Proc] = field(default_factory=set)  # every process seen in the tree
    cpu_s: dict[Proc, float] = field(default_factory=dict)  # each process's CPU time, last seen
    read: dict[Proc, int] = field(default_factory=dict)  # each process's rchar, last seen
    labels: dict[Proc, str] = field(default_factory=dict)  # each process's command line, shortened
    parents: dict[Proc, int] = field(default_factory=dict)  # each process's parent pid when first seen
    # rchar a process took over from children it reaped: Linux adds a reaped child's I/O counters to
    # its parent's /proc/PID/io, which would count the child's reads twice
    absorbed: dict[Proc, int] = field(default_factory=dict)
    _alive: set[Proc] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "TreeSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> TreeSample | None:
        """Look at the tree now (called by the thread, and by callers that want a fresh figure)."""
        with self._lock:
            return self._sample()

    def _sample(self) -> TreeSample | None:
        members = tree(self.root)
        if not members:
            return None
        root_rss = tree_rss = tree_pss = 0
        by_pid = {p.pid: p for p in members}
        for gone in self._alive - set(members):
            parent = by_pid.get(self.parents.get(gone))
            if parent is not None:
                self.absorbed[parent] = self.absorbed.get(parent, 0) + self.read.get(gone, 0)
        self._alive = set(members)
        for p in members:
            mem = memory_kib(p)
            if mem is None:
                continue
            rss, hwm = mem
            if p not in self.members:
                self.members.add(p)
                self.labels[p] = label(p)
                self.parents[p] = parent_pid(p)
            self.hwm_kib[p] = max(hwm, self.hwm_kib.get(p, 0))
            self.cpu_s[p] = cpu_seconds(p) or self.cpu_s.get(p, 0.0)
            own = (bytes_read(p) or 0) - self.absorbed.get(p, 0)
            self.read[p] = max(own, self.read.get(p, 0))
            tree_rss += rss
            tree_pss += pss_kib(p) or rss
            if p == self.root:
                root_rss = rss
        sample = TreeSample(
            time.monotonic(), root_rss, tree_rss, tree_pss, len(members), sum(self.cpu_s.values()), sum(self.read.values())
        )
        self.latest = sample
        self.peak_tree_rss_kib = max(self.peak_tree_rss_kib, tree_rss)
        self.peak_tree_pss_kib = max(self.peak_tree_pss_kib, tree_pss)
        self.peak_processes = max(self.peak_processes, len(members))
        return sample

    def root_peak_kib(self) -> int:
        return self.hwm_kib.get(self.root, 0)

    def largest_child(self) -> tuple[Proc | None, int]:
        """The descendant with the highest VmHWM seen, and that peak (KiB)."""
        children = [(hwm, p) for p, hwm in self.hwm_kib.items() if p != self.root]
        if not children:
            return None, 0
        hwm, p = max(children, key=lambda item: item[0])
        return p, hwm

    def children_seen(self) -> int:
        return len(self.members - {self.root})

    def per_process(self) -> list[dict]:
        """Every process seen, root first: pid, parent, command, peak RSS, CPU s, bytes read."""
        order = sorted(self.members, key=lambda p: (p != self.root, p.start, p.pid))
        return [
            {
                "pid": p.pid, "ppid": self.parents.get(p), "command": self.labels.get(p, "?"),
                "peak_rss_mib": round(self.hwm_kib.get(p, 0) / 1024, 1), "cpu_s": round(self.cpu_s.get(p, 0.0), 1),
                "read_bytes": self.read.get(p, 0),
            }
            for p in order
        ]


def terminate(processes: list[Proc], grace: float = 10.0) -> list[Proc]:
    """SIGTERM each given live process, SIGKILL those still alive after `grace` s; returns those killed."""
    targets = [p for p in processes if alive(p)]
    for p in targets:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.2)
    for p in targets:
        if alive(p):
            _signal(p, signal.SIGKILL)
    return targets


def _signal(p: Proc, signum: int) -> None:
    if alive(p):
        try:
            os.kill(p.pid, signum)
        except ProcessLookupError:
            pass


def wait_gone(processes: list[Proc], timeout: float) -> bool:
    """Wait up to `timeout` s for all to exit; True if they did."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in processes):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True
