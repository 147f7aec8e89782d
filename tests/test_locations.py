"""Issue 13: CAR objects wherever the CARs are (packerfs.unpack.locations), read from real servers.

One small CAR set made by a real `packerfs pack` is read through open_locations from a local
directory, S3 (moto), Azure (Azurite), `packerfs serve` and nginx serving the CAR files under
/piece/{piece CID}; every range read must equal the local file's bytes. Servers are subprocesses
on free loopback ports, stopped in a finally.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import packerfs, write_random
from nginx import NginxPieces, nginx_binary
from test_serve import gateway
from packerfs.errors import PackerfsError, UsageError
from packerfs.source import objects
from packerfs.unpack import locations
from packerfs.unpack.locations import open_locations

MiB = 1 << 20
OPTIONS = ["--no-encryption", "--bin-size", "4MiB"]
START_TIMEOUT = 30


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """A server that is gone is given up on after 1.5 s, not a minute."""
    monkeypatch.setattr(objects, "RETRY_SECONDS", 1.5)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("locations")
    src, out, state = base / "src", base / "out", base / "state"
    write_random(src / "big.bin", 9 * MiB + 5, 1)
    write_random(src / "dir" / "small.txt", 5000, 2)
    write_random(src / "dir" / "mid.bin", 2 * MiB + 3, 3)
    packerfs("pack", src, out, "-t", state, *OPTIONS)
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cars = {row["car_file"]: (out / row["car_file"]).read_bytes() for row in rows}
    assert len(cars) >= 3
    by_cid = {row["piece_cid"]: row["car_file"] for row in rows}
    return SimpleNamespace(base=base, src=src, out=out, state=state, rows=rows, cars=cars, by_cid=by_cid)


def check_reads(found, cars: dict[str, bytes], seed: int = 0) -> None:
    """Every object reads exactly like its local file, on edge and random ranges, one by one and batched."""
    rnd = random.Random(seed)
    page = locations.PAGE
    for obj in found.objects:
        data = cars[obj.name]
        assert obj.size == len(data), obj
        size = len(data)
        ranges = [(0, 100), (size - 50, 100), (size, 10), (size + 5, 10), (page - 3, 10), (page, page),
                  (3 * page - 1, 2 * page + 2), (7, 0), (0, size)]
        ranges += [(rnd.randrange(size), rnd.randrange(3 * MiB)) for _ in range(25)]
        for offset, length in ranges:
            assert obj.read(offset, length) == data[offset : offset + length], (obj.display, offset, length)
        batch = [(rnd.randrange(size), rnd.randrange(MiB)) for _ in range(12)]
        assert obj.read_ranges(batch) == [data[o : o + n] for o, n in batch]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------- local


def test_local_directory_files_and_what_is_skipped(packed, tmp_path):
    with open_locations([str(packed.out)]) as found:
        assert [o.name for o in found.objects] == sorted(packed.cars)
        assert found.problems == [] and not any(o.remote for o in found.objects)
        st = os.stat(packed.out / "bin-000001.car")
        assert found.objects[0].identity == f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        assert found.objects[0].display == str(packed.out / "bin-000001.car")
        check_reads(found, packed.cars)
        assert found.stats() == {"requests": 0, "bytes": 0}

    # a file given twice (itself and through its directory) is one object; a FIFO is skipped, never opened
    odd = tmp_path / "odd"
    odd.mkdir()
    os.symlink(packed.out / "bin-000001.car", odd / "bin-000001.car")
    os.mkfifo(odd / "bin-000009.car")
    with open_locations([str(packed.out / "bin-000001.car"), str(odd)]) as found:
        assert [o.name for o in found.objects] == ["bin-000001.car"]
        assert found.problems == [f"{odd / 'bin-000009.car'}: not a regular file (a FIFO) (skipped)"]

    with pytest.raises(UsageError, match="no such file or directory"):
        open_locations([str(tmp_path / "nowhere")])
    with pytest.raises(UsageError, match="-o options"):
        open_locations([str(packed.out)], options={"anon": "true"})


def test_a_local_car_that_vanishes_gives_one_line(packed, tmp_path):
    copy = tmp_path / "bin-000001.car"
    copy.write_bytes(packed.cars["bin-000001.car"])
    with open_locations([str(copy)]) as found:
        copy.unlink()
        with pytest.raises(PackerfsError) as caught:
            found.objects[0].read(1000, 10)
        assert str(copy) in one_line(caught.value) and "offset 1000" in str(caught.value)


# ---------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_bucket_prefix(kind, packed, request, monkeypatch):
    server = request.getfixturevalue({"s3": "s3_server", "azure": "azure_server"}[kind])
    scheme = {"s3": "s3", "azure": "az"}[kind]
    bucket = server.new_bucket("cars")
    files = {name: data for name, data in packed.cars.items()}
    files["notes.txt"] = b"not a CAR"
    files["sub/bin-000009.car"] = b"below the prefix: not listed"
    server.upload_tree(bucket, "set/", files)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)

    with open_locations([f"{scheme}://{bucket}/set"]) as found:
        assert [o.name for o in found.objects] == sorted(packed.cars)
        assert found.problems == []
        first = found.objects[0]
        assert first.remote and first.display == f"{scheme}://{bucket}/set/bin-000001.car"
        assert first.identity.startswith("e:") and first.identity.endswith(f":{first.size}")
        before = found.stats()
        assert before["requests"] >= 2  # the bucket check and the listing
        check_reads(found, packed.cars, seed=1)
        after = found.stats()
        assert after["requests"] > before["requests"] and after["bytes"] >= sum(map(len, packed.cars.values()))

    # an object overwritten after the listing is never read as a mix of two versions
    with open_locations([f"{scheme}://{bucket}/set"]) as found:
        changed = next(o for o in found.objects if o.name == "bin-000002.car")
        assert changed.read(0, 10) == packed.cars["bin-000002.car"][:10]
        server.put_object(bucket, "set/bin-000002.car", b"x" * len(packed.cars["bin-000002.car"]))
        with pytest.raises(PackerfsError) as caught:
            changed.read(2 * MiB, 100)
        text = one_line(caught.value)
        assert text.startswith(f"{scheme}://{bucket}/set/bin-000002.car: the object changed since it was listed")
        assert text.endswith(f"not read at offset {2 * MiB}"), text
        assert found.objects[0].read(5, 5) == packed.cars[found.objects[0].name][5:10]

    # a prefix that is one object's key is that object
    with open_locations([f"{scheme}://{bucket}/set/bin-000001.car"]) as found:
        assert [o.name for o in found.objects] == ["bin-000001.car"]
        check_reads(found, packed.cars, seed=2)


# ---------------------------------------------------------------------------------------------- gateways


@contextmanager
def packerfs_serve(packed, tmp_path: Path, options=None):
    """`packerfs serve` of the pack `packed` (src, state; the pack's `options`), ready, until the block ends."""
    with gateway(packed.src, packed.state, tmp_path, *(OPTIONS if options is None else options)) as g:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with urllib.request.urlopen(g.url + "/status", timeout=10) as answer:
                status = json.loads(answer.read())
            if status["state"] == "ready":
                break
            assert status["state"] != "failed" and time.monotonic() < deadline, status
            time.sleep(0.1)
        yield g.url


@pytest.fixture(scope="module")
def serve(packed, tmp_path_factory):
    with packerfs_serve(packed, tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def pieces_dir(packed):
    """The CARs named by piece CID, as a static server would hold them."""
    folder = packed.base / "pieces"
    folder.mkdir(exist_ok=True)
    for row in packed.rows:
        link = folder / row["piece_cid"]
        if not link.exists():
            os.symlink(packed.out / row["car_file"], link)
    return folder


@contextmanager
def nginx(tmp_path: Path, pieces: Path, **kwargs):
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; ./run setup installs nginx-light")
        pytest.skip("nginx is not installed")
    server = NginxPieces(tmp_path / f"nginx-{time.monotonic_ns()}", pieces, **kwargs)
    try:
        yield server.start()
    finally:
        server.stop()


def test_packerfs_serve_by_manifest_pieces_and_piece_urls(packed, serve, tmp_path):
    manifest = str(packed.out / "manifest.csv")
    for kwargs in ({"manifest": manifest}, {"manifest": serve + "/manifest.csv"}, {}):
        with open_locations([serve], **kwargs) as found:
            assert [o.name for o in found.objects] == sorted(packed.cars), kwargs
            assert found.problems == []
            assert all(o.remote and o.display.startswith(serve + "/piece/baga") for o in found.objects)
            # the gateway's ETag is the piece CID
            assert all(o.identity.startswith('etag:"baga') for o in found.objects)
    with open_locations([serve], manifest=manifest) as found:
        check_reads(found, packed.cars, seed=3)

    cid = packed.rows[0]["piece_cid"]
    cars_by_cid = {c: packed.cars[name] for c, name in packed.by_cid.items()}
    with open_locations([serve + "/piece/" + cid]) as found:
        assert [o.name for o in found.objects] == [cid] and found.stats()["requests"] == 1
        check_reads(found, cars_by_cid, seed=4)
    with open_locations([serve], pieces=[cid]) as found:
        assert [o.name for o in found.objects] == [cid]

    # an unknown piece is a problem line, the others are opened
    missing = "baga6ea4seaq" + "a" * 52
    with open_locations([serve], pieces=[cid, missing]) as found:
        assert [o.name for o in found.objects] == [cid]
        assert len(found.problems) == 1 and found.problems[0].startswith(f"{serve}/piece/{missing}: not found (404")


def test_read_ahead_for_sequential_readers_only(packed, serve):
    manifest = str(packed.out / "manifest.csv")
    with open_locations([serve], manifest=manifest) as found:
        obj = next(o for o in found.objects if o.name == "bin-000001.car")
        data = packed.cars[obj.name]
        start = found.stats()
        # browsing a 1 MiB file in 128 KiB reads fetches about 2 MiB, not a window of 8
        chunk = 128 << 10
        assert b"".join(obj.read(o, chunk) for o in range(0, MiB, chunk)) == data[:MiB]
        browsed = found.stats()
        assert browsed["bytes"] - start["bytes"] <= 2 * MiB + locations.PAGE
        # a long sequential read is served mostly from read-ahead: far fewer requests than reads
        reads = 0
        for offset in range(MiB, obj.size, 64 << 10):
            assert obj.read(offset, 64 << 10) == data[offset : offset + (64 << 10)]
            reads += 1
        done = found.stats()
        assert done["requests"] - browsed["requests"] <= obj.size // locations.PAGE + 2 < reads
        assert done["bytes"] - start["bytes"] == obj.size  # each byte fetched once


def test_many_threads_through_a_small_cache(packed, serve, monkeypatch):
    """Concurrent readers, evictions and read-ahead racing each other: every byte still right, the cache
    within its bound."""
    import concurrent.futures

    monkeypatch.setattr(locations, "CACHE_BYTES", 2 * MiB)
    with open_locations([serve], manifest=str(packed.out / "manifest.csv")) as found:
        def reader(seed: int) -> int:
            rnd = random.Random(seed)
            for _ in range(40):
                obj = rnd.choice(found.objects)
                data = packed.cars[obj.name]
                if rnd.random() < 0.5:  # a sequential run
                    offset = rnd.randrange(obj.size)
                    for _ in range(6):
                        assert obj.read(offset, 100_000) == data[offset : offset + 100_000]
                        offset += 100_000
                else:
                    offset, length = rnd.randrange(obj.size), rnd.randrange(2 * MiB)
                    assert obj.read(offset, length) == data[offset : offset + length]
            return seed

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(reader, range(8))) == list(range(8))
        deadline = time.monotonic() + 10  # the last read-ahead may still be on its way: it settles
        while (found.pages.inflight or found.pages.ahead) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert found.pages.inflight == {} and found.pages.ahead == 0
        assert found.pages.cached <= 2 * MiB


def test_nginx_static_pieces(packed, pieces_dir, tmp_path):
    missing = "baga6ea4seaq" + "b" * 52
    with nginx(tmp_path, pieces_dir) as server:
        with open_locations([server.url], manifest=str(packed.out / "manifest.csv"), pieces=[missing]) as found:
            assert [o.name for o in found.objects] == sorted(packed.cars)
            assert found.problems == [f"{server.url}/piece/{missing}: not found (404 Not Found) (skipped)"]
            assert all(o.identity.startswith('etag:"') for o in found.objects)
            check_reads(found, packed.cars, seed=5)


def test_a_server_that_ignores_range_is_refused_unread(packed, pieces_dir, tmp_path):
    with nginx(tmp_path, pieces_dir, max_ranges=0) as server:
        with open_locations([server.url], manifest=str(packed.out / "manifest.csv")) as found:
            assert found.objects == []
            assert len(found.problems) == len(packed.rows)
            for line in found.problems:
                assert line.startswith(f"{server.url}/piece/baga") and "ignored the Range header" in line, line
            assert found.stats()["bytes"] == 0  # not a byte of the whole-piece answers was read


def test_a_killed_server_fails_its_pieces_only_and_recovers(packed, pieces_dir, serve, tmp_path):
    first, second = packed.rows[0], packed.rows[1]
    with nginx(tmp_path, pieces_dir) as server:
        specs = [f"{server.url}/piece/{first['piece_cid']}", f"{serve}/piece/{second['piece_cid']}"]
        with open_locations(specs) as found:
            static = next(o for o in found.objects if o.display.startswith(server.url))
            gateway = next(o for o in found.objects if o.display.startswith(serve))
            static_data, gateway_data = packed.cars[first["car_file"]], packed.cars[second["car_file"]]
            assert static.read(0, 1000) == static_data[:1000]

            # the server dies while a reader walks through its piece
            errors: list[BaseException] = []
            offset = 0
            for offset in range(0, static.size, 200 << 10):
                if offset >= MiB and server.proc is not None:
                    server.kill()
                try:
                    assert static.read(offset, 100 << 10) == static_data[offset : offset + (100 << 10)]
                except PackerfsError as exc:
                    errors.append(exc)
                    break
            assert errors, "reads went on after the server was killed"
            text = one_line(errors[0])
            assert text.startswith(f"{static.display} (offset ") and "cannot reach the server" in text, text

            # the other server's piece reads on, cached or not
            assert gateway.read(gateway.size - 5000, 5000) == gateway_data[-5000:]
            assert gateway.read(MiB, 300_000) == gateway_data[MiB : MiB + 300_000]

            # back on the same port: the piece reads again
            server.start()
            assert static.read(offset, 100 << 10) == static_data[offset : offset + (100 << 10)]


def test_bad_gateway_specs_are_usage_errors(packed, tmp_path):
    with pytest.raises(UsageError, match="piece CIDs and a manifest.csv go with"):
        open_locations([str(packed.out)], pieces=["baga6ea4seaqxxxxxxxx"])
    with pytest.raises(UsageError, match="not a piece CID"):
        open_locations(["http://127.0.0.1:1"], pieces=["../../etc/passwd"])
    with pytest.raises(UsageError, match="not an option for http"):
        open_locations(["http://127.0.0.1:1"], pieces=["baga6ea4seaqxxxxxxxx"], options={"anon": "true"})
    bad = tmp_path / "manifest.csv"
    bad.write_text("car_file,size\nbin-000001.car,3\n")
    with pytest.raises(UsageError, match="no piece_cid column"):
        open_locations(["http://127.0.0.1:1"], manifest=str(bad))
