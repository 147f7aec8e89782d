"""Issue 13, part 1: `packerfs pack SRC s3://…|gs://…|az://…`, against real local servers.

Every server (moto, Azurite, fake-gcs-server) and proxy comes from tests/objstores.py (127.0.0.1,
a free port, stopped in a finally); packerfs runs as a user runs it, the CLI in a subprocess
configured through the SDKs' environment variables, every subprocess with a timeout.

What is proved: the objects are byte-identical to a local `pack` of the same state; to S3 and
Azure each CAR is uploaded while the scan lays it out, so the source is read once (an s3:// SOURCE
counts what it fetched), while gs:// CARs and those of bins sealed on Dask workers are uploaded
after the scan, generated again; an object appears only once complete (a pack killed with SIGKILL
mid-scan, mid-upload, leaves none, the rerun uploads only the missing bins, reading only what they
need, and drops the unfinished multipart upload); complete objects already there are kept (no
write request at all); 403, a missing bucket, a server that dies or throttles mid-upload each give
one line naming the URL, key and part, and no object half-written, and a rerun completes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import PACKERFS, ROOT, packerfs
from objstores import FaultProxy  # the server and proxy fixtures come with conftest (pytest_plugins)
from packerfs.crypt import write_age_identity

MiB = 1 << 20
BIN = "12MiB"  # > one 8 MiB upload part: every full bin is a two-part upload
TIMEOUT = 120
WRITES = ("PUT", "POST", "DELETE")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """About 30 MiB: three bins of 12 MiB, a file split across two of them, a few small files."""
    root = tmp_path_factory.mktemp("src")
    rng = random.Random(13)
    (root / "big.bin").write_bytes(rng.randbytes(17 * MiB + 4321))
    (root / "sub").mkdir()
    (root / "sub" / "mid.bin").write_bytes(rng.randbytes(9 * MiB))
    for i in range(20):
        (root / "sub" / f"small-{i:02d}.txt").write_bytes(rng.randbytes(rng.randrange(0, 5000)))
    return root


@pytest.fixture(scope="module")
def recipient(tmp_path_factory) -> str:
    return write_age_identity(str(tmp_path_factory.mktemp("key") / "key.txt"))


@pytest.fixture(scope="module")
def s3_source(s3_server, source) -> tuple[str, int]:
    """The same tree as an s3:// SOURCE (moto), and its size: `pack --json` reports what it fetched."""
    bucket = s3_server.new_bucket("src")
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    s3_server.upload_tree(bucket, "tree/", files)
    return f"s3://{bucket}/tree", sum(len(data) for data in files.values())


def pack_args(source: Path | str, out: str, state: Path, recipient: str, workers: int = 1) -> list[str]:
    return ["pack", str(source), out, "-t", str(state), "-r", recipient, "--bin-size", BIN, "--workers", str(workers),
            "--json"]


def env_of(settings: dict[str, str], retry: str = "4") -> dict[str, str]:
    return {**os.environ, **settings, "PACKERFS_RETRY_SECONDS": retry}


def store_files(server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under bucket/prefix, by name, with its bytes (through fsspec, straight to the server)."""
    fs = server.fs()
    return {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in sorted(fs.find(f"{bucket}/{prefix}"))}


def local_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("packerfs: error:")]
    assert len(lines) == 1, err
    return lines[0]


def unfinished_uploads(server, bucket: str) -> list[str]:
    return [u["Key"] for u in server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


class HoldingProxy(FaultProxy):
    """A FaultProxy that holds the first request matching `when(method, target)` until release():
    the test then acts (SIGKILL the pack, kill the proxy, deny) at a known point of the upload.
    (It hooks FaultProxy._decide, which runs once per request before it is forwarded.)"""

    def __init__(self, server, when):
        super().__init__(server)
        self.when = when
        self.reached = threading.Event()
        self.released = threading.Event()

    def _decide(self, method: str, target: str):
        if not self.reached.is_set() and self.when(method, target):
            self.reached.set()
            self.released.wait(30)
        return super()._decide(method, target)

    def release(self) -> None:
        self.released.set()


def holding(server, when) -> HoldingProxy:
    return HoldingProxy(server, when).start()


def part_of(key: str, number: int):
    return lambda method, target: method == "PUT" and key in target and f"partNumber={number}" in target


BACKENDS = {"s3": ("s3_server", "s3_proxy"), "azure": ("azure_server", "azure_proxy"), "gcs": ("gcs_server", "gcs_proxy")}
SCHEMES = {"s3": "s3", "azure": "az", "gcs": "gs"}


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_round_trip_identical_to_local_pack_and_kept_on_rerun(kind, request, source, recipient, tmp_path):
    server = request.getfixturevalue(BACKENDS[kind][0])
    proxy = request.getfixturevalue(BACKENDS[kind][1])
    scheme = SCHEMES[kind]
    bucket = server.new_bucket("cars")
    url = f"{scheme}://{bucket}/sets/one"
    state = tmp_path / "state"
    env = env_of(proxy.env)

    first = json.loads(packerfs(*pack_args(source, url, state, recipient), env=env, timeout=TIMEOUT).stdout)
    assert first["output"] == url
    current = [car["car_file"] for car in first["cars"] if car["status"] == "current"]
    assert len(current) == 3
    assert first["uploaded_bins"] == [1, 2, 3] and first["kept_bins"] == []
    assert [car["url"] for car in first["cars"]] == [f"{url}/{name}" for name in current]

    # the same state written to a directory: the same bytes, CARs and manifests
    local = tmp_path / "local"
    packerfs(*pack_args(source, str(local), state, recipient), timeout=TIMEOUT)
    expected = local_files(local)
    assert sorted(expected) == sorted(current + ["manifest.csv", "manifest.json"])
    assert store_files(server, bucket, "sets/one") == expected  # nothing else under the prefix either
    if kind == "s3":
        assert unfinished_uploads(server, bucket) == []
        # each part went with its SHA-256: the object's composite checksum is that of 8 MiB parts
        name = current[0]
        parts = [expected[name][i : i + 8 * MiB] for i in range(0, len(expected[name]), 8 * MiB)]
        composite = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
        head = server.client().head_object(Bucket=bucket, Key=f"sets/one/{name}", ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"].partition("-")[0] == base64.b64encode(composite).decode()
        assert len(parts) == 2 and head["ContentType"] == "application/vnd.ipld.car"

    # a rerun keeps every object: reads (one ranged GET per CAR, the manifests), no write at all
    proxy.reset_counters()
    again = json.loads(packerfs(*pack_args(source, url, state, recipient), env=env, timeout=TIMEOUT).stdout)
    assert again["uploaded_bins"] == [] and again["kept_bins"] == [1, 2, 3]
    writes = [ex for ex in proxy.history if ex.method in WRITES]
    assert writes == [], writes
    assert store_files(server, bucket, "sets/one") == expected


def block_of(key: str):
    """An Azure Put Block (not the Put Block List) to `key`."""
    return lambda method, target: method == "PUT" and key in target and re.search(r"comp=block(&|$)", target)


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_bucket_out_is_uploaded_during_the_one_read_of_the_source(kind, request, s3_server, s3_source, recipient,
                                                                   tmp_path):
    src, size = s3_source
    server = request.getfixturevalue(BACKENDS[kind][0])
    bucket = server.new_bucket("once")
    url = f"{SCHEMES[kind]}://{bucket}/cars"
    env = env_of({**s3_server.env, **server.env})
    state = tmp_path / "state"
    report = json.loads(packerfs(*pack_args(src, url, state, recipient), env=env, timeout=TIMEOUT).stdout)
    assert report["bytes_read"] == size
    # one read: what the source gave is its data (within 2 %), not that again for the upload
    assert size <= report["bytes_fetched"] <= 1.02 * size, (report["bytes_fetched"], size)
    assert report["new_bins"] == report["uploaded_bins"] == [1, 2, 3] and report["kept_bins"] == []
    local = tmp_path / "local"
    packerfs(*pack_args(src, str(local), state, recipient), env=env, timeout=TIMEOUT)
    assert store_files(server, bucket, "cars") == local_files(local)
    if kind == "s3":
        assert unfinished_uploads(server, bucket) == []


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_killed_mid_scan_rerun_uploads_only_the_missing_bins(kind, request, s3_server, s3_source, recipient,
                                                              tmp_path):
    src, _ = s3_source
    server = request.getfixturevalue(BACKENDS[kind][0])
    bucket = server.new_bucket("killed")
    url = f"{SCHEMES[kind]}://{bucket}/cars"
    state = tmp_path / "state"
    # held: bin 2's second part (S3) or first block staged (Azure), sent when bin 2 is sealed, before
    # its first part (which holds the header) and before the bin is committed: bin 1 is complete
    proxy = holding(server, part_of("bin-000002.car", 2) if kind == "s3" else block_of("bin-000002.car"))
    env = env_of({**s3_server.env, **proxy.env})
    try:
        log = (tmp_path / "first.log").open("wb")
        pack = subprocess.Popen(
            [*PACKERFS, *pack_args(src, url, state, recipient)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            assert proxy.reached.wait(TIMEOUT), (tmp_path / "first.log").read_text()
            pack.kill()  # SIGKILL: no cleanup of any kind runs
            pack.wait(30)
        finally:
            if pack.poll() is None:
                pack.kill()
                pack.wait(30)
            log.close()
            proxy.release()

        # killed mid-scan: bin 1 sealed and complete in the bucket, bin 2 nowhere under its name
        status = json.loads(packerfs("status", src, "-t", state, "--json", env=env, timeout=TIMEOUT).stdout)
        assert status["state"] == "scanning" and status["bins_sealed"] == 1, status
        assert list(store_files(server, bucket, "cars")) == ["bin-000001.car"]
        if kind == "s3":
            before = server.client().head_object(Bucket=bucket, Key="cars/bin-000001.car")["LastModified"]
            assert unfinished_uploads(server, bucket) == ["cars/bin-000002.car"]

        proxy.reset_counters()
        again = json.loads(packerfs(*pack_args(src, url, state, recipient), env=env, timeout=TIMEOUT).stdout)
    finally:
        proxy.close()
    assert again["kept_bins"] == [1] and again["uploaded_bins"] == [2, 3] == again["new_bins"]
    written = {ex.target.split("?")[0].rsplit("/", 1)[1] for ex in proxy.history if ex.method in WRITES}
    assert written == {"bin-000002.car", "bin-000003.car", "manifest.csv", "manifest.json"}, written
    # the rerun read only what bins 2 and 3 hold, once (and the last sealed leaf of the file it continues)
    assert again["bytes_fetched"] <= 1.02 * again["bytes_read"] + 2 * MiB, again
    if kind == "s3":
        assert unfinished_uploads(server, bucket) == []  # the killed run's upload was aborted
        assert server.client().head_object(Bucket=bucket, Key="cars/bin-000001.car")["LastModified"] == before

    local = tmp_path / "local"
    packerfs(*pack_args(src, str(local), state, recipient), env=env_of(s3_server.env), timeout=TIMEOUT)
    assert store_files(server, bucket, "cars") == local_files(local)


def test_bins_sealed_on_dask_workers_are_uploaded_by_the_workers(s3_server, s3_source, recipient, tmp_path):
    """Each worker uploads the CAR of the bin it seals as it lays it out, and the coordinator completes
    the upload after the bin's index commit; the last bin (the snapshot's) is sealed and uploaded by
    packerfs itself. Nothing is generated again after the scan."""
    src, size = s3_source
    bucket = s3_server.new_bucket("dask")
    url = f"s3://{bucket}/cars"
    state = tmp_path / "state"
    env = env_of(s3_server.env)
    report = json.loads(packerfs(*pack_args(src, url, state, recipient, workers=2), env=env, timeout=300).stdout)
    sealed_on = {car["car_file"]: car["sealed_on"] for car in report["cars"]}
    assert sealed_on["bin-000001.car"] and sealed_on["bin-000003.car"] is None, sealed_on
    assert report["uploaded_bins"] == [1, 2, 3] and report["kept_bins"] == []
    # what this process fetched: only what it sealed itself (the last bin); the workers read the rest,
    # and no bin was generated again from the source after the scan (that would fetch about `size`)
    assert report["bytes_fetched"] < 0.5 * size, (report["bytes_fetched"], size)
    local = tmp_path / "local"
    packerfs(*pack_args(src, str(local), state, recipient), env=env, timeout=TIMEOUT)
    assert store_files(s3_server, bucket, "cars") == local_files(local)
    assert unfinished_uploads(s3_server, bucket) == []


@pytest.mark.parametrize("fault", ["server dies", "denied", "throttled"])
def test_fault_mid_upload(fault, s3_server, source, recipient, tmp_path):
    """At bin 2's second part: the proxy dies, starts refusing (403), or throttles for a while."""
    bucket = s3_server.new_bucket("fault")
    url = f"s3://{bucket}/cars"
    proxy = holding(s3_server, part_of("bin-000002.car", 2))
    result: dict = {}

    def run():
        result["done"] = packerfs(*pack_args(source, url, tmp_path / "state", recipient), check=False,
                                  env=env_of(proxy.env, retry="2"), timeout=TIMEOUT)

    runner = threading.Thread(target=run, daemon=True)
    try:
        runner.start()
        assert proxy.reached.wait(TIMEOUT)
        if fault == "server dies":
            proxy.kill()  # resets the held connection and refuses every later one
        elif fault == "denied":
            proxy.deny()  # the held part (and all after it) refused
        else:
            proxy.throttle(3)  # the next three requests get 503 SlowDown, then all is well
        proxy.release()
        runner.join(TIMEOUT)
    finally:
        proxy.release()
        proxy.close()
    assert not runner.is_alive()
    done = result["done"]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    if fault == "throttled":
        assert done.returncode == 0, done.stderr.decode()
        assert keys == [f"cars/{n}" for n in ("bin-000001.car", "bin-000002.car", "bin-000003.car",
                                              "manifest.csv", "manifest.json")]
        return
    line = one_error_line(done)
    if fault == "server dies":  # part 1 may still have been on its way: either part is named
        assert re.search(rf"{url}/bin-000002.car \(part (1, offset 0|2, offset {8 * MiB})\): cannot reach the server",
                         line), line
    else:
        assert f"{url}/bin-000002.car (part 2, offset {8 * MiB}): access denied (403 AccessDenied)" in line, line
    assert "bin-000002.car was not completed (nothing of this upload is left under its name)" in line, line
    assert keys == ["cars/bin-000001.car"]  # bin 1 complete, bin 2 nowhere, no manifest

    # once the server answers again, a rerun completes: bin 1 kept, the others uploaded
    again = json.loads(packerfs(*pack_args(source, url, tmp_path / "state", recipient), env=env_of(s3_server.env),
                                timeout=TIMEOUT).stdout)
    assert again["kept_bins"] == [1] and again["uploaded_bins"] == [2, 3], again
    assert unfinished_uploads(s3_server, bucket) == []
    local = tmp_path / "local"
    packerfs(*pack_args(source, str(local), tmp_path / "state", recipient), timeout=TIMEOUT)
    assert store_files(s3_server, bucket, "cars") == local_files(local)


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_denied_or_missing_bucket_is_one_line_before_any_work(kind, request, source, recipient, tmp_path):
    server = request.getfixturevalue(BACKENDS[kind][0])
    proxy = request.getfixturevalue(BACKENDS[kind][1])
    scheme = {"s3": "s3", "azure": "az"}[kind]
    bucket = server.new_bucket("denied")
    state = tmp_path / "state"

    proxy.deny()
    line = one_error_line(packerfs(*pack_args(source, f"{scheme}://{bucket}/p", state, recipient), check=False,
                                   env=env_of(proxy.env), timeout=TIMEOUT))
    assert line.startswith(f"packerfs: error: {scheme}://{bucket}/p: access denied (403"), line
    assert not state.exists()  # refused before the state was made or anything read

    line = one_error_line(packerfs(*pack_args(source, f"{scheme}://no-such-{bucket}/p", state, recipient),
                                   check=False, env=env_of(server.env), timeout=TIMEOUT))
    assert f"{scheme}://no-such-{bucket}/p: the bucket 'no-such-{bucket}' does not exist" in line, line
    assert not state.exists()
