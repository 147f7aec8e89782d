"""A real, local Dask cluster for tests: one ``dask scheduler`` and N ``dask worker`` processes.

Everything listens on 127.0.0.1 only.  Every process runs in its own process group (so a kill takes the
worker's nanny *and* its worker child), logs to a file under ``tmp_path``, and is stopped in a
``finally``: SIGTERM to every group, wait up to 10 s, then SIGKILL.

Use from tests through the fixture (loaded for every module by ``pytest_plugins`` in conftest.py)::

    def test_something(dask_scheduler):
        with dask_scheduler.client() as client:        # a Client with set_as_default=False
            assert client.submit(pow, 2, 10).result(timeout=30) == 1024

or directly, for another worker count::

    with dask_cluster(workers=3, tmp_path=tmp_path) as cluster:
        cluster.workers[0].kill()                       # SIGKILL to that worker's process group

The worker processes get (through ``DASK_*`` environment variables, which the nanny hands on to its
worker child) memory target/spill/pause/terminate = False: task data stays in memory (``Worker.data``
is a plain dict, no SpillBuffer, nothing written under the local directory) and neither the worker
nor its nanny pauses or kills on memory use.  The scheduler gets ``allowed-failures`` = 3 and a short
``worker-ttl``.  A SIGKILLed worker's TCP connections close, so the scheduler removes it and
reschedules its tasks at once (well under a second here); ``worker-ttl`` is only the fallback for a
worker that hangs without closing its sockets (SIGSTOP, a frozen host).  Workers get
``--death-timeout`` so that, if the scheduler vanishes, they exit on their own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from objstores import _tail, free_port  # one free-port picker and log tail for every test server

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
STOP_GRACE = 10.0
WORKER_TTL = "10s"
DEATH_TIMEOUT = "15s"
ALLOWED_FAILURES = 3

# Environment for every process of the cluster.  dask.config turns DASK_A__B_C=V into a.b-c = V, with V
# parsed by ast.literal_eval (so "False" is the boolean False).
DASK_ENV = {
    # Workers (and their nannies): never spill task data to disk, never pause, never terminate on memory.
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "False",
    # Scheduler: how often a task may be on a worker that dies before it is marked KilledWorker,
    # and how long a worker may miss heartbeats (every 0.5 s with <= 10 workers) before removal.
    "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(ALLOWED_FAILURES),
    "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": WORKER_TTL,
    # No access to the internet, nothing to connect to but loopback: fail connections fast.
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
}

# Scheduler and worker always start an HTTP server (/health, /metrics, …) even with --no-dashboard, on
# --dashboard-address, whose defaults (":8787", ":0") mean ALL interfaces: pin it to loopback.  No
# dashboard app itself: bokeh is not installed.
_HTTP_ARGS = ["--no-dashboard", "--dashboard-address", f"{LOOPBACK}:0"]


class ClusterStartError(RuntimeError):
    """The cluster did not come up (the message carries the log tails)."""


def dask_command() -> list[str]:
    """The ``dask`` CLI of this venv (beside sys.executable), else ``python -m distributed.cli``."""
    for candidate in (Path(sys.executable).parent / "dask", ROOT / ".venv" / "bin" / "dask"):
        if candidate.exists():
            return [str(candidate)]
    return [sys.executable, "-m", "dask"]


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # packerfs is installed editable, but the repo root and tests/ (helpers pickled by reference) must
    # be importable in the workers too.
    paths = [str(ROOT), str(TESTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(DASK_ENV)
    env.update(extra or {})
    return env



def _live_group_members(pgid: int) -> list[int]:
    """Pids of the processes in process group ``pgid`` that are not zombies (from /proc)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


class _Proc:
    """One CLI process in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # own session => own process group, pgid == pid
            )
        self.pid = self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        # The group can outlive its leader (the nanny's worker child), so signal it even if the leader
        # has exited; ProcessLookupError means nobody is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def group_alive(self) -> bool:
        """Any live (non-zombie) process left in the group?  Orphaned zombies (the nanny's
        multiprocessing resource_tracker, reparented to init) are not counted: init reaps them late."""
        return self.alive or bool(_live_group_members(self.pid))

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def tail(self) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n{_tail(self.log_path)}"


def _stop(procs: list[_Proc], grace: float = STOP_GRACE) -> None:
    """SIGTERM every group, wait up to ``grace`` s in total, SIGKILL what is left.  Never hangs."""
    for p in procs:
        if p.group_alive():
            p.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.group_alive() for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.signal_group(signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(5)


@dataclass(eq=False)
class DaskWorker:
    """A ``dask worker`` process (its nanny; the worker runs in a child process of the same group)."""

    name: str
    local_directory: Path
    _proc: _Proc = field(repr=False)
    address: str | None = None  # tcp://127.0.0.1:port of the Worker (not the nanny), once it registered

    @property
    def pid(self) -> int:
        """Pid of the ``dask worker`` (nanny) process == its process group id."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.alive

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (nanny and worker at once: nothing restarts it)."""
        self._proc.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.proc.wait(5)
        deadline = time.monotonic() + 5
        while self._proc.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def log(self) -> str:
        return self._proc.log()


class DaskCluster:
    """What :func:`dask_cluster` yields."""

    def __init__(self, address: str, scheduler: _Proc, workers: list[DaskWorker], workdir: Path):
        self.address = address
        self._scheduler = scheduler
        self.workers = workers
        self.workdir = workdir

    @property
    def scheduler_pid(self) -> int:
        return self._scheduler.pid

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def log(self, name: str) -> str:
        """Captured stdout+stderr of ``"scheduler"`` or of a worker by name (``"w1"``, ``"w2"``, …)."""
        if name == "scheduler":
            return self._scheduler.log()
        for w in self.workers:
            if w.name == name:
                return w.log()
        raise KeyError(f"no process named {name!r}; have scheduler, {', '.join(w.name for w in self.workers)}")

    def worker(self, key: str) -> DaskWorker:
        """The worker handle by name or by Worker address (as in ``client.processing()``)."""
        for w in self.workers:
            if key in (w.name, w.address):
                return w
        raise KeyError(key)

    def client(self, timeout: float = 30, **kwargs):
        """A new ``distributed.Client`` to this cluster, NOT set as the global default; close it (``with``)."""
        from distributed import Client

        kwargs.setdefault("set_as_default", False)
        return Client(self.address, timeout=timeout, **kwargs)

    def log_tails(self) -> str:
        return "\n".join(p.tail() for p in [self._scheduler, *(w._proc for w in self.workers)])

    def __repr__(self) -> str:
        return f"<DaskCluster {self.address} workers={[w.name for w in self.workers]}>"


_LIVE: set[tuple[_Proc, ...]] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:  # safety net; the finally below is the real mechanism
    with _LIVE_LOCK:
        live = list(_LIVE)
    for procs in live:
        with contextlib.suppress(Exception):
            _stop(list(procs), grace=2)


def _wait_listening(proc: _Proc, port: int, deadline: float) -> bool:
    """Until the scheduler itself says it listens on `port` and accepts TCP connections: True; False if
    it exited or time ran out. (A connect alone is not proof: another process may have taken the port
    between free_port() and the scheduler's bind, and the scheduler then exits with EADDRINUSE.)"""
    listening = re.compile(rf"Scheduler at:\s+tcp://{re.escape(LOOPBACK)}:{port}\b")
    while time.monotonic() < deadline and proc.alive:
        if listening.search(proc.log()):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex((LOOPBACK, port)) == 0:
                    return proc.alive
        time.sleep(0.05)
    return False


def _wait_for_workers(cluster: DaskCluster, deadline: float) -> None:
    """Until all workers are registered with the scheduler; fills in each handle's ``.address``."""
    from distributed import Client

    n = len(cluster.workers)
    remaining = max(1.0, deadline - time.monotonic())
    client = Client(cluster.address, timeout=remaining, set_as_default=False)
    try:
        # Short slices, so that a worker or scheduler that died fails at once rather than at the deadline.
        while True:
            dead = [p.name for p in [cluster._scheduler, *(w._proc for w in cluster.workers)] if not p.alive]
            if dead:
                raise ClusterStartError(f"exited during startup: {', '.join(dead)}")
            try:
                client.wait_for_workers(n, timeout=1)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        info = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(ws["name"]): addr for addr, ws in info.items()}
        for w in cluster.workers:
            w.address = by_name.get(w.name)
        missing = [w.name for w in cluster.workers if w.address is None]
        if missing:
            raise ClusterStartError(f"workers not registered under their names: {missing}; scheduler has {sorted(by_name)}")
    finally:
        client.close(timeout=10)


@contextlib.contextmanager
def dask_cluster(
    workers: int = 2,
    tmp_path: str | os.PathLike | None = None,
    *,
    timeout: float = STARTUP_TIMEOUT,
    env: dict[str, str] | None = None,
    worker_args: list[str] | None = None,
) -> Iterator[DaskCluster]:
    """Start a scheduler and ``workers`` single-threaded worker processes; yield a :class:`DaskCluster`.

    ``tmp_path`` holds the logs (``scheduler.log``, ``wN.log``) and each worker's local directory
    (``wN/``); without it a temporary directory is used and removed afterwards.  ``env`` is added to
    every process's environment (after :data:`DASK_ENV`); ``worker_args`` to every ``dask worker``
    (not ``--no-nanny``: a nanny-less worker with ``--death-timeout`` does not exit on SIGTERM here, so
    every stop would wait out the 10 s grace before the SIGKILL).
    Startup raises :class:`ClusterStartError` with the log tails after ``timeout`` s.
    """
    own = tmp_path is None
    workdir = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="dask-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[_Proc] = []
    key = None
    try:
        proc_env = cluster_env(env)
        dask = dask_command()
        deadline = time.monotonic() + timeout
        scheduler = None
        for attempt in range(3):  # another process may grab the free port before the scheduler binds it
            port = free_port()
            scheduler = _Proc(
                "scheduler",
                [*dask, "scheduler", "--host", LOOPBACK, "--port", str(port), *_HTTP_ARGS],
                workdir / "scheduler.log",
                workdir,
                proc_env,
            )
            procs.append(scheduler)
            key = tuple(procs)
            with _LIVE_LOCK:
                _LIVE.add(key)
            if _wait_listening(scheduler, port, deadline):
                break
            if scheduler.alive or attempt == 2 or "in use" not in scheduler.log().lower():
                raise ClusterStartError(f"the scheduler did not listen on {LOOPBACK}:{port}\n{scheduler.tail()}")
        address = f"tcp://{LOOPBACK}:{port}"
        handles = []
        for i in range(1, workers + 1):
            name = f"w{i}"
            local = workdir / name
            local.mkdir(exist_ok=True)
            proc = _Proc(
                name,
                [
                    *dask, "worker", address,
                    "--host", LOOPBACK,
                    "--nworkers", "1",
                    "--nthreads", "1",
                    *_HTTP_ARGS,
                    "--local-directory", str(local),
                    "--name", name,
                    "--death-timeout", DEATH_TIMEOUT,
                    *(worker_args or []),
                ],
                workdir / f"{name}.log",
                workdir,
                proc_env,
            )
            procs.append(proc)
            handles.append(DaskWorker(name, local, proc))
        with _LIVE_LOCK:
            _LIVE.discard(key)
            key = tuple(procs)
            _LIVE.add(key)
        cluster = DaskCluster(address, scheduler, handles, workdir)
        try:
            _wait_for_workers(cluster, deadline)
        except Exception as exc:
            raise ClusterStartError(
                f"{workers} workers did not connect to {address} (timeout {timeout:.0f} s): "
                f"{type(exc).__name__}: {exc}\n{cluster.log_tails()}"
            ) from exc
        yield cluster
    finally:
        try:
            _stop(procs)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(key)
            if own:
                import shutil

                shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def dask_scheduler(tmp_path) -> Iterator[DaskCluster]:
    """A fresh cluster with 2 single-threaded workers (``w1``, ``w2``), logs under tmp_path/dask."""
    with dask_cluster(workers=2, tmp_path=tmp_path / "dask") as cluster:
        yield cluster
