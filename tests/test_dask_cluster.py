"""The real-Dask-cluster fixtures themselves (tests/dask_cluster.py), and LocalCluster on this machine."""

import os
import time
from pathlib import Path

import psutil

from conftest import within
from dask_cluster import LOOPBACK, _live_group_members, dask_cluster

RESULT_TIMEOUT = 30


def _worker_name():
    import distributed

    return distributed.get_worker().name


def _sleep_and_name(seconds):
    time.sleep(seconds)
    return _worker_name()


def _worker_facts():
    """Run as a task: what the worker process sees."""
    import dask
    import distributed

    import packerfs

    worker = distributed.get_worker()
    keys = ("target", "spill", "pause", "terminate")
    return {
        "name": worker.name,
        "config": {k: dask.config.get(f"distributed.worker.memory.{k}") for k in keys},
        "data": type(worker.data).__name__,
        "manager": (worker.memory_manager.memory_target_fraction, worker.memory_manager.memory_spill_fraction,
                    worker.memory_manager.memory_pause_fraction),
        "packerfs": packerfs.__file__,
    }


def _nanny_terminate(dask_worker):  # client.run(..., nanny=True) passes the Nanny as dask_worker
    return dask_worker.memory_manager.memory_terminate_fraction


def _scheduler_facts(dask_scheduler):
    return dask_scheduler.allowed_failures, dask_scheduler.worker_ttl


def _slow_double(marker_dir, value, seconds):
    """Mark that it started (on which worker, when), sleep, return 2*value with the runner's name."""
    name = _worker_name()
    started = time.time()
    Path(marker_dir, f"{name}.started").write_text(str(started))
    time.sleep(seconds)
    return value * 2, name, started


def _listening(pids):
    addrs = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        addrs += [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    return addrs


def test_tasks_run_on_both_workers(dask_scheduler):
    cluster = dask_scheduler
    assert cluster.address.startswith(f"tcp://{LOOPBACK}:")
    assert [w.name for w in cluster.workers] == ["w1", "w2"]
    assert all(w.alive and w.address.startswith(f"tcp://{LOOPBACK}:") for w in cluster.workers)
    assert psutil.pid_exists(cluster.scheduler_pid)
    with cluster.client() as client:
        futures = client.map(_sleep_and_name, [0.3] * 6, pure=False)
        names = client.gather(futures)
        assert set(names) == {"w1", "w2"}, names
        facts = client.submit(_worker_facts, pure=False).result(timeout=RESULT_TIMEOUT)
    # packerfs (editable install) and this test module (tests/ on PYTHONPATH) import on the workers.
    assert Path(facts["packerfs"]).resolve().is_relative_to(Path(__file__).resolve().parent.parent)
    # Everything of the cluster listens on loopback only (including the HTTP servers behind --no-dashboard).
    pids = [p for pgid in [cluster.scheduler_pid, *(w.pid for w in cluster.workers)] for p in _live_group_members(pgid)]
    listening = _listening(pids)
    assert len(listening) >= 1 + 2 * 3  # scheduler comm+http; per worker: nanny, worker comm, worker http
    assert {a.ip for a in listening} == {LOOPBACK}, listening
    assert "Register worker" in cluster.log("scheduler")
    assert "Worker name:" in cluster.log("w1")


def test_workers_do_not_spill(dask_scheduler):
    with dask_scheduler.client() as client:
        # One task per worker: read distributed.config inside a task, on each of them.
        facts = [
            client.submit(_worker_facts, pure=False, workers=[w.address]).result(timeout=RESULT_TIMEOUT)
            for w in dask_scheduler.workers
        ]
        terminate = client.run(_nanny_terminate, nanny=True)
        scheduler = client.run_on_scheduler(_scheduler_facts)
    assert sorted(f["name"] for f in facts) == ["w1", "w2"]
    for f in facts:
        assert f["config"] == {"target": False, "spill": False, "pause": False, "terminate": False}, f
        assert f["data"] == "dict", f  # no SpillBuffer: task data can never go to disk
        assert f["manager"] == (False, False, False), f
    assert list(terminate.values()) == [False, False], terminate
    assert scheduler == (3, 10.0)
    for w in dask_scheduler.workers:
        assert not list(w.local_directory.rglob("storage")), "a spill directory exists"


def test_sigkilled_worker_task_reruns_elsewhere(dask_scheduler, tmp_path):
    cluster = dask_scheduler
    markers = tmp_path / "markers"
    markers.mkdir()
    with cluster.client() as client:
        future = client.submit(_slow_double, str(markers), 21, 3.0, pure=False)
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not list(markers.iterdir()):
            assert time.monotonic() < deadline, "the task never started"
            assert future.status == "pending", future
            time.sleep(0.02)
        (first,) = [p.stem for p in markers.iterdir()]
        victim = cluster.worker(first)
        time.sleep(0.5)  # well inside the 3 s task
        killed_at = time.time()
        victim.kill()
        assert not victim.alive
        value, ran_on, restarted = future.result(timeout=RESULT_TIMEOUT)
        done_at = time.time()
        (survivor,) = [w for w in cluster.workers if w is not victim]
        assert (value, ran_on) == (42, survivor.name)
        assert survivor.alive
        assert len(client.scheduler_info()["workers"]) == 1
    reschedule = restarted - killed_at
    print(f"\nSIGKILL -> task restarted on {ran_on}: {reschedule:.3f} s; result after {done_at - killed_at:.3f} s")
    assert 0 <= reschedule < 5, reschedule
    assert f"Remove worker addr: {victim.address}" in cluster.log("scheduler")


def test_cluster_stops_everything(tmp_path):
    started = time.monotonic()
    with dask_cluster(workers=1, tmp_path=tmp_path) as cluster:
        up = time.monotonic() - started
        pgids = [cluster.scheduler_pid, cluster.workers[0].pid]
        assert all(_live_group_members(g) for g in pgids)
        started = time.monotonic()
    down = time.monotonic() - started
    print(f"\ndask scheduler + 1 worker: up in {up:.2f} s, stopped in {down:.2f} s")
    assert not any(_live_group_members(g) for g in pgids)
    assert not cluster.workers[0].alive


def _local_cluster():
    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)


def test_local_cluster():
    from distributed import Client

    started = time.monotonic()
    cluster = within(60, _local_cluster)
    up = time.monotonic() - started
    try:
        assert cluster.scheduler_address.startswith(f"tcp://{LOOPBACK}:")
        with Client(cluster, set_as_default=False, timeout=RESULT_TIMEOUT) as client:
            names = client.gather(client.map(_sleep_and_name, [0.2] * 4, pure=False), errors="raise")
            assert len(names) == 4
            assert client.submit(pow, 2, 10).result(timeout=RESULT_TIMEOUT) == 1024
            workers = client.run(os.getpid)
            nannies = client.run(os.getpid, nanny=True)
        # Real worker processes; the scheduler and the two nannies live in this (the client's) process.
        assert len(set(workers.values())) == 2 and os.getpid() not in workers.values()
        assert set(nannies.values()) == {os.getpid()}
        # Loopback only: worker comm + HTTP servers, nannies, the scheduler's comm and HTTP server.
        listening = _listening(workers.values())
        assert len(listening) == 4 and {a.ip for a in listening} == {LOOPBACK}, listening
        assert all(a.startswith(f"tcp://{LOOPBACK}:") for a in [*workers, *nannies])
        http = [s.getsockname()[0] for s in cluster.scheduler.http_server._sockets.values()]
        assert http and set(http) == {LOOPBACK}, http
    finally:
        started = time.monotonic()
        within(30, cluster.close, 10)
        down = time.monotonic() - started
    print(f"\nLocalCluster(2 workers, processes): up in {up:.2f} s, closed in {down:.2f} s")
