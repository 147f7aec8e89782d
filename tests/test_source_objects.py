"""Issue 10: object-store sources (s3://, gs://, az://), against real local servers.

Every server (moto, Azurite, fake-gcs-server) is started by tests/objstores.py on 127.0.0.1 and
stopped in a finally; packerfs runs as a user runs it, the CLI in a subprocess, configured the way
the SDKs are (environment variables).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import packerfs, run_tool, within
from packerfs.crypt import write_age_identity

MiB = 1 << 20
BIN = "8MiB"


def tricky_tree(seed: int = 7, small: int = 2000) -> dict[str, bytes]:
    """Unicode and space names, nested prefixes, an empty object, a folder marker, a file larger
    than a bin and `small` small objects."""
    rng = random.Random(seed)
    files = {
        "read me.txt": b"hello, bucket\n",
        "ünïcödé/naïve café.bin": rng.randbytes(3000),
        "nested/deeper/deepest/leaf.dat": rng.randbytes(70_000),
        "nested/empty-object": b"",
        "folder-marker-only/": b"",
        "nested/marker/": b"",
        "big/larger-than-a-bin.bin": rng.randbytes(11 * MiB + 12345),
        "a-b/x": b"sorts before a/ as a key, after it as a path",
        "a/x": b"a/",
    }
    for i in range(small):
        files[f"small/{i // 500:02d}/obj-{i:05d}"] = rng.randbytes(rng.randrange(0, 2048))
    return files


def upload(server, bucket: str, files: dict[str, bytes], prefix: str = "") -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: server.put_object(bucket, prefix + item[0], item[1]), files.items()))


def expected_tree(files: dict[str, bytes]) -> dict[str, bytes | str]:
    """What unpacking must give: files with their bytes, every directory (markers included) as "dir"."""
    out: dict[str, bytes | str] = {}
    for key, data in files.items():
        parts = key.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            out["/".join(parts[:depth])] = "dir"
        if key.endswith("/"):
            out[key.rstrip("/")] = "dir"
        else:
            out[key] = data
    return out


def tree_of(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


@pytest.fixture
def env(monkeypatch):
    """Point packerfs subprocesses at a server the way users do: the SDKs' environment variables."""

    def use(settings: dict[str, str]) -> None:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PACKERFS_RETRY_SECONDS", "4")

    return use


@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("key") / "key.txt"
    return path, write_age_identity(str(path))


BACKENDS = ["s3", "s3-versioned", "azure", "gcs"]


@pytest.fixture
def store(request, env):
    """(server, URL of a fresh bucket holding the tricky tree, the tree)."""
    kind = request.param
    server = request.getfixturevalue({"s3": "s3_server", "s3-versioned": "s3_server", "azure": "azure_server",
                                      "gcs": "gcs_server"}[kind])
    bucket = server.new_bucket("src", versioned=kind == "s3-versioned")
    # moto takes ~13 ms per PUT here: the versioned run, which differs only in how reads are
    # pinned, gets 200 small objects instead of 2,000
    files = tricky_tree(small=200 if kind == "s3-versioned" else 2000)
    if kind == "gcs":  # fake-gcs-server's filesystem backend keeps no empty folder marker
        files = {k: v for k, v in files.items() if not k.endswith("/")}
    upload(server, bucket, files, "data/set/")
    env(server.env)
    scheme = {"s3": "s3", "s3-versioned": "s3", "azure": "az", "gcs": "gs"}[kind]
    return server, f"{scheme}://{bucket}/data/set", files


@pytest.mark.interop
@pytest.mark.parametrize("store", BACKENDS, indirect=True)
def test_pack_verify_unpack_round_trip(store, identity, tmp_path, ipfs_car):
    server, url, files = store
    key, recipient = identity
    out, state = tmp_path / "out", tmp_path / "state"
    result = packerfs("pack", url, out, "-t", state, "--recipient", recipient, "--bin-size", BIN, "--json")
    report = json.loads(result.stdout)
    data_size = sum(len(v) for v in files.values())
    assert report["source"] == url
    assert report["bytes_read"] == data_size
    # one read of the source: what was fetched is the data, within 2 %
    assert data_size <= report["bytes_fetched"] <= 1.02 * data_size, report["bytes_fetched"]
    cars = sorted(out.glob("bin-*.car"))
    assert len(cars) >= 2
    packerfs("verify", out, "--identity", key)
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored, "--identity", key)
    assert tree_of(restored) == expected_tree(files)
    for car in cars:
        listed = run_tool(ipfs_car, "ls", car, "--verbose", timeout=120)
        assert listed.returncode == 0, listed.stderr.decode()
    # a second pack with the same state reads nothing again
    again = json.loads(packerfs("pack", url, out, "-t", state, "--recipient", recipient, "--bin-size", BIN,
                                "--json").stdout)
    assert again["files_packed"] == 0 and again["new_bins"] == [] and again["bytes_fetched"] == 0
    status = json.loads(packerfs("status", url, "-t", state, "--json").stdout)
    assert status["source"] == url and status["state"] == "ready"
    if url.startswith("s3://") and "small/00/obj-00250" not in files:  # the versioned run: a rescan after changes
        bucket = url.split("/")[2]
        server.client().delete_object(Bucket=bucket, Key="data/set/read me.txt")
        server.put_object(bucket, "data/set/a/x", b"changed")
        changed = json.loads(packerfs("pack", url, out, "-t", state, "--recipient", recipient, "--bin-size", BIN,
                                      "--json").stdout)
        assert (changed["files_deleted"], changed["files_changed"], changed["files_packed"]) == (1, 1, 1)
        files = {k: v for k, v in files.items() if k != "read me.txt"} | {"a/x": b"changed"}
        again_restored = tmp_path / "again"
        packerfs("unpack", out, again_restored, "--identity", key)
        assert tree_of(again_restored) == expected_tree(files)


def test_listing_order_is_canonical_and_needs_no_request_per_object(s3_proxy, env, tmp_path, monkeypatch):
    """Keys list in the POSIX walk's order (a/ before a-b), one request per page of keys per level."""
    from packerfs.source import s3

    monkeypatch.setattr(s3, "PAGE", 100)  # pages of 100 keys instead of 1,000: the same paging, 10x fewer PUTs
    server = s3_proxy.server
    bucket = server.new_bucket("order")
    files = {f"flat/{i:05d}": b"" for i in range(250)}
    files.update({"a-b": b"1", "a/c": b"2", "a.txt": b"3", "a b/d": b"4"})
    upload(server, bucket, files)
    env(s3_proxy.env)
    from packerfs.source import open_source

    s3_proxy.reset_counters()
    source = within(60, open_source, f"s3://{bucket}")
    try:
        problems: list = []
        paths = within(60, lambda: [e.path for e in source.walk(problems)])
    finally:
        source.close()
    assert problems == []
    top = [p for p in paths if b"/" not in p and p]
    assert top == [b"a", b"a b", b"a-b", b"a.txt", b"flat"]
    assert paths.index(b"a/c") == paths.index(b"a") + 1
    assert len([p for p in paths if p.startswith(b"flat/")]) == 250
    # 3 pages for flat/, one each for the root, a/ and a b/, plus the bucket checks at open
    assert s3_proxy.requests <= 10, s3_proxy.requests


BAD_KEYS = {
    "x//double-slash": b"1",
    "./dot": b"2",
    "../dotdot": b"3",
    "long/" + "n" * 256: b"4",
    "both": b"5",
    "both/inside": b"6",
}


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs-memory"])
def test_keys_that_are_no_posix_path_are_problems(kind, request, env, tmp_path):
    server = request.getfixturevalue({"s3": "s3_server", "azure": "azure_server", "gcs-memory": "gcs_memory_server"}[kind])
    bucket = server.new_bucket("bad")
    bad = dict(BAD_KEYS)
    if kind == "azure":  # Azurite, like Azure, resolves "./" and "../" in blob names itself
        bad = {k: v for k, v in bad.items() if not k.startswith(".")}
    upload(server, bucket, {**bad, "fine/file": b"ok"})
    env(server.env)
    scheme = {"s3": "s3", "azure": "az", "gcs-memory": "gs"}[kind]
    url = f"{scheme}://{bucket}"
    out, state = tmp_path / "out", tmp_path / "state"
    refused = packerfs("pack", url, out, "-t", state, "--no-encryption", "--bin-size", BIN, check=False)
    assert refused.returncode == 1
    message = refused.stderr.decode()
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    assert "--skip-unreadable" in message and "both" in message and "empty path component" in message
    skipped = packerfs("pack", url, out, "-t", state, "--no-encryption", "--bin-size", BIN, "--skip-unreadable",
                       "--json", check=False)
    assert skipped.returncode == 3, skipped.stderr.decode()
    report = json.loads(skipped.stdout)
    reasons = " ".join(s["reason"] for s in report["skipped"])
    assert "both an object and a prefix" in reasons and "256 bytes" in reasons
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored)
    assert tree_of(restored) == {"fine": "dir", "fine/file": b"ok", "long": "dir", "x": "dir"}


def test_missing_bucket_and_bad_credentials_give_one_line(s3_proxy, env, tmp_path):
    server = s3_proxy.server
    env(s3_proxy.env)
    missing = packerfs("pack", "s3://no-such-bucket-here/x", tmp_path / "out", "-t", tmp_path / "st",
                       "--no-encryption", check=False)
    assert missing.returncode == 1
    line = missing.stderr.decode().strip()
    assert line.count("\n") == 0 and "s3://no-such-bucket-here" in line and "does not exist" in line, line
    bucket = server.new_bucket("deny")
    upload(server, bucket, {"f": b"x"})
    s3_proxy.deny(403)
    denied = packerfs("pack", f"s3://{bucket}", tmp_path / "out", "-t", tmp_path / "st", "--no-encryption", check=False)
    assert denied.returncode == 1
    line = denied.stderr.decode().strip()
    assert line.count("\n") == 0 and f"s3://{bucket}" in line and "access denied" in line and "403" in line, line


def test_throttling_is_retried_then_worded(s3_proxy, env, tmp_path):
    server = s3_proxy.server
    bucket = server.new_bucket("slow")
    files = {f"f{i}": bytes([i]) * 1000 for i in range(20)}
    upload(server, bucket, files)
    env(s3_proxy.env)
    s3_proxy.throttle(3, status=503)
    ok = packerfs("pack", f"s3://{bucket}", tmp_path / "out", "-t", tmp_path / "st", "--no-encryption", "--json")
    assert json.loads(ok.stdout)["files_packed"] == 20
    assert s3_proxy.refused == 3
    restored = tmp_path / "restored"
    packerfs("unpack", tmp_path / "out", restored)
    assert tree_of(restored) == files
    s3_proxy.throttle(10**6, status=429)
    started = time.monotonic()
    failed = packerfs("pack", f"s3://{bucket}", tmp_path / "out2", "-t", tmp_path / "st2", "--no-encryption",
                      check=False, timeout=120)
    assert failed.returncode == 1
    line = failed.stderr.decode().strip()
    assert line.count("\n") == 0 and f"s3://{bucket}" in line and "throttling" in line and "429" in line, line
    assert time.monotonic() - started < 60


def _bins(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("bin-*.car"))}


def test_server_dying_mid_pack_resumes_with_identical_bins(fresh_azure_server, env, tmp_path):
    """Azurite keeps its data across a restart: kill it while the pack reads, start it again, rerun."""
    server = fresh_azure_server
    bucket = server.new_bucket("die")
    rng = random.Random(3)
    # more than the read-ahead (objects.AHEAD_BYTES) beyond the second bin, so reads are still due
    files = {f"part-{i:02d}.bin": rng.randbytes(10 * MiB) for i in range(10)}
    upload(server, bucket, files)
    env(server.env)
    url = f"az://{bucket}"
    out, state = tmp_path / "out", tmp_path / "state"
    args = ["pack", url, out, "-t", state, "--no-encryption", "--bin-size", BIN]
    from conftest import PACKERFS
    from packerfs.crypt import make_cipher
    from packerfs.pack import Engine

    # The same state (dataset secret) for a straight run to compare with: copied before any scan.
    Engine.open(url, str(state), make_cipher(no_encryption=True), 8 * MiB).close()
    shutil.copytree(state, tmp_path / "state2")

    process = subprocess.Popen([*PACKERFS, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("bin-000002.car")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert process.poll() is None, "the pack finished before the server could be killed"
        server.stop()
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    line = stderr.decode().strip().splitlines()[-1]
    assert "Traceback" not in stderr.decode() and url in line and "cannot reach" in line, stderr.decode()
    sealed = _bins(out)
    assert sealed
    server.start()
    packerfs(*args)
    resumed = _bins(out)
    for name, data in sealed.items():
        assert resumed[name] == data, f"{name} changed on resume"
    straight = tmp_path / "straight"
    packerfs("pack", url, straight, "-t", tmp_path / "state2", "--no-encryption", "--bin-size", BIN)
    assert _bins(straight) == resumed
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored)
    assert tree_of(restored) == files


def test_versioned_bucket_pins_reads_to_the_version_packed(s3_server, env, tmp_path):
    """With versioning on, an object overwritten after the scan still serves the packed bytes."""
    server = s3_server
    bucket = server.new_bucket("ver", versioned=True)
    files = {"keep": random.Random(1).randbytes(3 * MiB), "other": b"x" * 100}
    upload(server, bucket, files)
    env(server.env)
    from packerfs.crypt import make_cipher
    from packerfs.pack import Engine

    url = f"s3://{bucket}"
    out = tmp_path / "out"
    engine = Engine.open(url, str(tmp_path / "state"), make_cipher(no_encryption=True), 8 * MiB)
    try:
        engine.scan(car_dir=str(out))
        server.put_object(bucket, "keep", b"overwritten")
        reader = engine.reader()
        for path in out.glob("bin-*.car"):
            number = int(path.stem.split("-")[1])
            assert reader.read(number, 0, path.stat().st_size) == path.read_bytes()
    finally:
        engine.close()


def test_credentials_never_reach_state_output_or_logs(s3_proxy, env, tmp_path):
    server = s3_proxy.server
    bucket = server.new_bucket("secret")
    upload(server, bucket, {"a/b": b"data" * 1000, "c": b"more"})
    secret_key = "SeCrEtKeY-" + os.urandom(8).hex()
    key_id = "AKIDPACKERFS" + os.urandom(4).hex().upper()
    env({**s3_proxy.env, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key})
    out, state = tmp_path / "out", tmp_path / "state"
    results = [
        packerfs("pack", f"s3://{bucket}", out, "-t", state, "--no-encryption", "--json",
                 "-o", f"secret={secret_key}", "-o", f"key={key_id}"),
        packerfs("status", f"s3://{bucket}", "-t", state, "--json"),
    ]
    s3_proxy.deny(403)
    results.append(packerfs("pack", f"s3://{bucket}", out, "-t", state, "--no-encryption", "--json", check=False))
    s3_proxy.allow()
    seen = b"".join(r.stdout + r.stderr for r in results)
    for root in (out, state):
        for path in root.rglob("*"):
            if path.is_file():
                seen += path.read_bytes()
    assert b"s3://" + bucket.encode() in seen  # the URL is there, so the search is looking in the right place
    assert secret_key.encode() not in seen and key_id.encode() not in seen


def test_source_option_must_be_key_value(tmp_path):
    bad = packerfs("pack", "s3://bucket", tmp_path / "out", "-t", tmp_path / "st", "--no-encryption",
                   "-o", "novalue", check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr.decode()
    local = packerfs("pack", tmp_path, tmp_path / "out", "--no-encryption", "-o", "a=b", check=False)
    assert local.returncode == 2 and "object-store" in local.stderr.decode()


@pytest.mark.fuse
def test_mount_serves_pack_bytes_and_an_overwritten_object_fails_its_bin_only(s3_server, env, tmp_path):
    from test_mount import mount

    server = s3_server
    bucket = server.new_bucket("mnt")
    rng = random.Random(5)
    # bin 1: a/victim and the first part of b; bins 2 and 3: the rest of b
    files = {"a/victim": rng.randbytes(2 * MiB), "b": rng.randbytes(20 * MiB)}
    upload(server, bucket, files)
    env(server.env)
    url = f"s3://{bucket}"
    out, state = tmp_path / "out", tmp_path / "state"
    options = ["--no-encryption", "--bin-size", BIN]
    packerfs("pack", url, out, "-t", state, *options)
    written = _bins(out)
    with mount(url, tmp_path / "mnt", state, *options) as m:
        m.wait_ready()
        assert m.cars() == sorted(written)
        # nothing read yet (the mount caches what it served): every bin but the victim's must match
        server.put_object(bucket, "a/victim", rng.randbytes(2 * MiB))  # same size, new bytes
        failed = []
        for name, data in written.items():
            result = run_tool("cp", m.mnt / name, tmp_path / name, timeout=60)
            if result.returncode:
                assert b"Input/output error" in result.stderr
                failed.append(name)
            else:
                assert (tmp_path / name).read_bytes() == data
        assert failed == ["bin-000001.car"]
        status = m.status()
        assert status["stale"] == ["a/victim"], status
        assert any(f"{url}/a/victim" in e and "source changed" in e for e in status["errors"])
    # A rescan puts the new version in a new bin. The old bin also holds the first part of b,
    # which is current, so it is not retired (it can no longer be generated; OUT keeps its copy).
    report = json.loads(packerfs("pack", url, out, "-t", state, *options, "--json").stdout)
    assert report["files_changed"] == 1 and report["new_bins"]
    statuses = {car["car_file"]: car["status"] for car in report["cars"]}
    assert statuses["bin-000001.car"] == "current" and (out / "bin-000001.car").read_bytes() == written["bin-000001.car"]
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored)
    now = server.client().get_object(Bucket=bucket, Key="a/victim")["Body"].read()
    assert tree_of(restored) == {"a": "dir", "a/victim": now, "b": files["b"]}


def test_empty_objects_leave_the_read_ahead_alone(s3_proxy, env, tmp_path):
    """One GET per non-empty object, however the empty ones fall (an empty file once dropped the
    whole read-ahead queue, and every later file was then fetched alone, some twice)."""
    server = s3_proxy.server
    bucket = server.new_bucket("empty")
    rng = random.Random(9)
    files = {f"d/{i:04d}": (b"" if i % 10 == 0 else rng.randbytes(rng.randrange(1, 4000))) for i in range(300)}
    upload(server, bucket, files)
    env(s3_proxy.env)
    s3_proxy.reset_counters()
    s3_proxy.history.clear()
    packerfs("pack", f"s3://{bucket}", tmp_path / "out", "-t", tmp_path / "st", "--no-encryption")
    gets = [e for e in s3_proxy.history if e.method == "GET" and "/d/" in e.target]
    assert len(gets) == sum(1 for v in files.values() if v), len(gets)
