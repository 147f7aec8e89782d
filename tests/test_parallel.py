"""Parallel sealing on Dask, with real processes: a `dask scheduler` and `dask worker`s started by
the test (tests/dask_cluster.py), and LocalCluster through `--workers`; and `packerfs plan`.

What is proven:
- a pack on a real cluster verifies, unpacks to the source, and a mount of the same state serves
  CARs byte-identical to the ones the workers wrote;
- a worker SIGKILLed while it seals a bin: the bin is sealed again elsewhere, to the same bytes;
- `--workers 1` and `--workers 2` make byte-identical CARs from the same state (no encryption), and
  age and OpenPGP files split over three or more bins round-trip;
- `packerfs plan` agrees with what pack then does, bin for bin and file for file, and reads no file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import packerfs, write_random

MiB = 1 << 20

BIN = "3MiB"


def tree(root: Path) -> Path:
    """Three files split over several 3 MiB bins, small files, a symlink and an empty directory."""
    write_random(root / "big" / "one.bin", 9 * MiB + 17, 1)
    write_random(root / "big" / "two.bin", 4 * MiB + 3, 2)
    for i in range(40):
        write_random(root / "small" / f"f{i:03d}", 1000 * i + 1, 100 + i)
    (root / "empty").mkdir(parents=True)
    os.symlink("big/one.bin", root / "link")
    return root


def same_tree(a: Path, b: Path) -> None:
    result = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode()[-2000:]


def cars_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.car"))}


def fresh_state(tmp_path: Path, src: Path, *options) -> Path:
    """A state directory made (and planned) once, so that runs copied from it share the dataset secret."""
    state = tmp_path / "state0"
    packerfs("plan", src, "-t", state, "--bin-size", BIN, *options, "--json")
    return state


def copy_state(state: Path, to: Path) -> Path:
    shutil.copytree(state, to)
    return to


def reference_pack(tmp_path: Path, seed: int) -> tuple[Path, Path, Path]:
    """12 files of 8 MiB in 8 MiB bins (long enough that a worker or the coordinator is caught sealing
    one), a planned state, and the CARs a one-process pack makes from a copy of it: (src, state, OUT)."""
    src = tmp_path / "src"
    for i in range(12):
        write_random(src / f"f{i:02d}.bin", 8 * MiB + i, seed + i)
    state = tmp_path / "state0"
    packerfs("plan", src, "-t", state, "--bin-size", "8MiB", "--no-encryption", "--json")
    reference = tmp_path / "reference"
    packerfs("pack", src, reference, "-t", copy_state(state, tmp_path / "s1"), "--bin-size", "8MiB",
             "--no-encryption", "--workers", "1")
    return src, state, reference


@pytest.fixture
def age_key(tmp_path):
    key = tmp_path / "key.txt"
    out = subprocess.run(["age-keygen", "-o", str(key)], capture_output=True, text=True, timeout=30, check=True)
    recipient = [line.split()[-1] for line in out.stderr.splitlines() if "Public key" in line][0]
    return key, recipient


def test_workers_1_and_2_make_byte_identical_cars(tmp_path):
    src = tree(tmp_path / "src")
    state = fresh_state(tmp_path, src, "--no-encryption")
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        run_state = copy_state(state, tmp_path / f"state{workers}")
        result = json.loads(packerfs(
            "pack", src, out, "-t", run_state, "--bin-size", BIN, "--no-encryption", "--workers", str(workers), "--json"
        ).stdout)
        assert len(result["new_bins"]) >= 5
        outs[workers] = cars_of(out)
    assert outs[1] == outs[2]
    assert len(outs[1]) >= 5
    restored = tmp_path / "restored"
    packerfs("unpack", tmp_path / "out2", restored)
    same_tree(src, restored)


@pytest.mark.interop
def test_age_file_over_three_bins_on_two_workers_round_trips(tmp_path, age_key):
    key, recipient = age_key
    src = tree(tmp_path / "src")
    out = tmp_path / "out"
    packerfs("pack", src, out, "-t", tmp_path / "state", "--bin-size", BIN, "-r", recipient, "--workers", "2")
    listing = json.loads(packerfs("ls", out, "--identity", key, "--json").stdout)
    assert len([e for e in listing if e["path"] == "big/one.bin"][0]["bins"]) >= 3
    packerfs("verify", out, "--identity", key)
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored, "--identity", key)
    same_tree(src, restored)


@pytest.mark.interop
def test_openpgp_file_over_three_bins_on_two_workers_round_trips(tmp_path, gpg_ed_key):
    src = tree(tmp_path / "src")
    for i in range(100):  # bins after the split files that start at a small file: a second sealing task
        write_random(src / "tail" / f"t{i:03d}", 64 * 1024, 300 + i)
    out = tmp_path / "out"
    home = str(gpg_ed_key["home"])
    planned = json.loads(packerfs(
        "plan", src, "-t", tmp_path / "state", "--bin-size", BIN, "--gpg-recipient", gpg_ed_key["fpr"],
        "--gpg-homedir", home, "--json", "--files",
    ).stdout)
    packed = json.loads(packerfs(
        "pack", src, out, "-t", tmp_path / "state", "--bin-size", BIN, "--gpg-recipient", gpg_ed_key["fpr"],
        "--gpg-homedir", home, "--workers", "2", "--json",
    ).stdout)
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored, "--gpg-homedir", home)
    same_tree(src, restored)
    packerfs("verify", out, "--gpg-homedir", home)
    # the bins one.bin runs through are one CFB chain: the plan links them, and one worker seals them
    one_bins = [e["bins"] for e in planned["files_assigned"] if e["path"] == "big/one.bin"][0]
    assert len(one_bins) >= 3
    continues = {row["bin"]: row["continues"] for row in planned["table"]}
    assert [continues[b] for b in one_bins] == [False] + [True] * (len(one_bins) - 1)
    assert sum(1 for row in planned["table"] if row["continues"]) >= 3  # two.bin is cut too
    sealed_on = dict(zip(packed["new_bins"], (car["sealed_on"] for car in packed["cars"])))
    chain = {sealed_on[b] for b in one_bins if b != packed["new_bins"][-1]}
    assert len(chain) == 1 and None not in chain, sealed_on


@pytest.mark.interop
def test_openpgp_bins_that_form_one_chain_are_sealed_here_without_a_cluster(tmp_path, gpg_ed_key):
    """One OpenPGP file through every bin is one sealing task: a local cluster would only cost its start."""
    src = tmp_path / "src"
    write_random(src / "one.bin", 10 * MiB, 5)
    home = str(gpg_ed_key["home"])
    packed = json.loads(packerfs(
        "pack", src, tmp_path / "out", "-t", tmp_path / "state", "--bin-size", BIN,
        "--gpg-recipient", gpg_ed_key["fpr"], "--gpg-homedir", home, "--workers", "2", "--json",
    ).stdout)
    assert len(packed["cars"]) >= 4
    assert [car["sealed_on"] for car in packed["cars"]] == [None] * len(packed["cars"])
    restored = tmp_path / "restored"
    packerfs("unpack", tmp_path / "out", restored, "--gpg-homedir", home)
    same_tree(src, restored)


def test_pack_on_a_real_cluster_verifies_unpacks_and_the_mount_serves_the_same_bytes(
    tmp_path, dask_scheduler, age_key
):
    from test_mount import mount, read_bytes

    key, recipient = age_key
    src = tree(tmp_path / "src")
    out = tmp_path / "out"
    state = tmp_path / "state"
    packed = json.loads(packerfs(
        "pack", src, out, "-t", state, "--bin-size", BIN, "-r", recipient, "--scheduler", dask_scheduler.address,
        "--json",
    ).stdout)
    # both workers sealed bins; the last one (with the snapshot) is sealed by packerfs itself
    sealed_on = [car["sealed_on"] for car in packed["cars"]]
    assert set(sealed_on[:-1]) == {w.address for w in dask_scheduler.workers} and sealed_on[-1] is None
    packerfs("verify", out, "--identity", key)
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored, "--identity", key)
    same_tree(src, restored)
    written = cars_of(out)
    with mount(src, tmp_path / "mnt", state, "--bin-size", BIN, "-r", recipient) as m:
        m.wait_ready(60)
        served = {name: read_bytes(tmp_path / "mnt" / name) for name in written}
    assert served == written


def test_a_worker_killed_mid_bin_has_its_bin_sealed_again_with_the_same_bytes(tmp_path, dask_scheduler):
    src, state, reference = reference_pack(tmp_path, seed=10)
    out = tmp_path / "out"
    killed = []

    def kill_a_busy_worker():
        import distributed

        with distributed.Client(dask_scheduler.address, timeout=30, set_as_default=False) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                busy = [addr for addr, keys in client.processing().items() if any("seal-bin" in k for k in keys)]
                if busy:
                    worker = dask_scheduler.worker(busy[0])
                    worker.kill()
                    killed.append(worker.name)
                    return
                time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    packerfs("pack", src, out, "-t", copy_state(state, tmp_path / "s2"), "--bin-size", "8MiB", "--no-encryption",
             "--scheduler", dask_scheduler.address)
    killer.join(10)
    assert killed, "no worker was caught sealing a bin"
    assert cars_of(out) == cars_of(reference)


def test_plan_agrees_with_pack_and_reads_no_file(tmp_path, age_key):
    key, recipient = age_key
    # strictatime: any read of a file's content moves its atime, so an unchanged atime proves no read
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,strictatime", "tmpfs", str(where)], check=True, timeout=30)
    try:
        src = tree(where / "src")
        past = 1_000_000_000
        files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
        for p in files:
            os.utime(p, ns=(past * 10**9, p.stat().st_mtime_ns))
        planned = json.loads(packerfs(
            "plan", src, "-t", tmp_path / "state", "--bin-size", BIN, "-r", recipient, "--json", "--files"
        ).stdout)
        assert all(p.stat().st_atime_ns == past * 10**9 for p in files), "plan read a file"
        assert planned["bins"] == len(planned["table"]) >= 5
        assert planned["bytes_to_read"] == sum(p.stat().st_size for p in files)
        out = tmp_path / "out"
        packed = json.loads(packerfs(
            "pack", src, out, "-t", tmp_path / "state", "--bin-size", BIN, "-r", recipient, "--workers", "2", "--json"
        ).stdout)
    finally:
        subprocess.run(["umount", "-l", str(where)], timeout=30)
    assert packed["new_bins"] == [row["bin"] for row in planned["table"]]
    listing = json.loads(packerfs("ls", out, "--identity", key, "--json").stdout)
    actual = {e["path"]: e["bins"] for e in listing if e["kind"] == "file"}
    assert len(actual) == len(files)
    assert actual == {e["path"]: e["bins"] for e in planned["files_assigned"] if e["path"] in actual}
    for car, row in zip(packed["cars"], planned["table"]):
        assert car["car_size"] <= row["car_bound"] and car["piece_size"] <= row["piece_size"]
    status = json.loads(packerfs("status", src, "-t", tmp_path / "state", "--json").stdout)
    assert status["plan"]["bins"] == planned["bins"]


def test_bad_parallel_options_are_one_line_usage_errors(tmp_path):
    src = tree(tmp_path / "src")
    for options, words in (
        (["--scheduler", "127.0.0.1:1"], "tcp://"),
        (["--collect"], "--scheduler"),
        (["--workers", "0"], "at least 1"),
    ):
        result = packerfs("pack", src, tmp_path / "out", "-t", tmp_path / "state", *options, check=False)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr.decode()
    # a scheduler nobody listens on: one line naming it
    result = packerfs("pack", src, tmp_path / "out", "-t", tmp_path / "state", "--bin-size", BIN,
                      "--no-encryption", "--scheduler", "tcp://127.0.0.1:9", check=False,
                      env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "tcp://127.0.0.1:9" in lines[0], lines


def test_collect_brings_the_cars_back_from_the_workers(tmp_path, dask_scheduler):
    src = tree(tmp_path / "src")
    state = fresh_state(tmp_path, src, "--no-encryption")
    reference = tmp_path / "reference"
    packerfs("pack", src, reference, "-t", copy_state(state, tmp_path / "s1"), "--bin-size", BIN,
             "--no-encryption", "--workers", "1")
    out = tmp_path / "out"
    run = packerfs(
        "pack", src, out, "-t", copy_state(state, tmp_path / "s2"), "--bin-size", BIN, "--no-encryption",
        "--scheduler", dask_scheduler.address, "--collect", "--json",
    )
    assert not run.stderr, run.stderr.decode()
    packed = json.loads(run.stdout)
    assert {car["sealed_on"] for car in packed["cars"][:-1]} <= {w.address for w in dask_scheduler.workers}
    assert cars_of(out) == cars_of(reference)
    # the workers' copies are gone once collected
    deadline = time.monotonic() + 10
    while left := [p for w in dask_scheduler.workers for p in Path(w.local_directory).rglob("packerfs-*.car")]:
        assert time.monotonic() < deadline, f"a worker kept its copy of a collected CAR: {left}"
        time.sleep(0.1)


def test_a_coordinator_killed_mid_run_resumes_at_its_sealed_bins(tmp_path):
    import signal

    src, state, reference = reference_pack(tmp_path, seed=30)
    out = tmp_path / "out"
    run_state = copy_state(state, tmp_path / "s2")
    from conftest import PACKERFS, ROOT

    args = [*PACKERFS, "pack", src, out, "-t", run_state, "--bin-size", "8MiB", "--no-encryption", "--workers", "2"]
    pack = subprocess.Popen([str(a) for a in args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("bin-*.car"))) < 3:
            assert pack.poll() is None, pack.stderr.read().decode()
            assert time.monotonic() < deadline, "no bin was sealed"
            time.sleep(0.02)
        os.killpg(pack.pid, signal.SIGKILL)  # the coordinator and its LocalCluster's workers
        pack.wait(30)
    finally:
        if pack.poll() is None:
            os.killpg(pack.pid, signal.SIGKILL)
            pack.wait(30)
    sealed_before = cars_of(out)
    assert 3 <= len(sealed_before) < len(cars_of(reference))
    status = json.loads(packerfs("status", src, "-t", run_state, "--json").stdout)
    assert status["state"] == "scanning" and status["bins_sealed"] >= len(sealed_before)
    rerun = json.loads(packerfs("pack", src, out, "-t", run_state, "--bin-size", "8MiB", "--no-encryption",
                                "--workers", "2", "--json").stdout)
    assert min(rerun["new_bins"]) > max(int(name[4:10]) for name in sealed_before)  # sealed bins were kept
    assert cars_of(out) == cars_of(reference)
    packerfs("verify", out)


def test_the_mount_seals_its_bins_on_workers_too(tmp_path):
    from test_mount import mount, read_bytes

    src = tree(tmp_path / "src")
    state = fresh_state(tmp_path, src, "--no-encryption")
    reference = tmp_path / "reference"
    packerfs("pack", src, reference, "-t", copy_state(state, tmp_path / "s1"), "--bin-size", BIN,
             "--no-encryption", "--workers", "1")
    written = cars_of(reference)
    with mount(src, tmp_path / "mnt", copy_state(state, tmp_path / "s2"), "--bin-size", BIN, "--no-encryption",
               "--workers", "2") as m:
        m.wait_ready(120)
        served = {name: read_bytes(tmp_path / "mnt" / name) for name in m.cars()}
    assert served == written
    sealed_on = [b.get("sealed_on") for b in _bins(tmp_path / "s2")]
    assert any(sealed_on), "no bin of the mount's scan was sealed by a worker"


def _bins(state: Path) -> list[dict]:
    from packerfs.index import Index

    index = Index(str(state), readonly=True)
    try:
        return sorted(index.all_bins(), key=lambda b: b["bin"])
    finally:
        index.close()
