"""CAR sets read where they are: an S3 or Azure prefix, `packerfs serve`, and nginx serving
/piece/{cid}. `ls`, `verify`, `unpack` and `mount --reverse` give the source back, indexing reads
only each CAR's head and tail, and browsing one file fetches little more than that file."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import packerfs, write_random
from packerfs.crypt import KeyRing, write_age_identity
from packerfs.source import objects
from packerfs.unpack import CarSet, FileReader
from test_locations import nginx, packerfs_serve
from test_mount import OP_TIMEOUT, mount
from conftest import within

MiB = 1 << 20
BIN = "32MiB"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """A server that is gone is given up on after 1.5 s (here and in the daemons started here)."""
    monkeypatch.setattr(objects, "RETRY_SECONDS", 1.5)
    monkeypatch.setenv("PACKERFS_RETRY_SECONDS", "1.5")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("remote")
    src, out, state = base / "src", base / "out", base / "state"
    write_random(src / "media" / "big.bin", 45 * MiB + 3, 1)
    write_random(src / "media" / "other.bin", 20 * MiB, 2)
    for i in range(4):
        write_random(src / "docs" / f"one-mib-{i}.bin", MiB, 10 + i)
    for i in range(30):
        write_random(src / "docs" / "small" / f"s{i:02d}.txt", 100 * i, 100 + i)
    os.symlink("../media/big.bin", src / "docs" / "link")
    key = base / "key.txt"
    recipient = write_age_identity(str(key))
    options = ["--bin-size", BIN, "-r", recipient]
    packerfs("pack", src, out, "-t", state, *options, timeout=180)
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 3
    cars = {row["car_file"]: (out / row["car_file"]).read_bytes() for row in rows}
    return SimpleNamespace(base=base, src=src, out=out, state=state, key=key, options=options, rows=rows, cars=cars)


def tree_of(root: Path) -> dict[str, object]:
    """path -> file bytes, or ("link", target), or "dir"."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes()
    return found


def upload(server, packed, prefix: str = "set/") -> str:
    bucket = server.new_bucket("cars")
    server.upload_tree(bucket, prefix, {**packed.cars, "manifest.csv": (packed.out / "manifest.csv").read_bytes()})
    return bucket


@contextmanager
def environment(monkeypatch, env: dict[str, str]):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield


# ---------------------------------------------------------------------------------------------- buckets


def test_s3_set_ls_verify_unpack_and_few_bytes_to_browse(packed, s3_server, monkeypatch, tmp_path):
    bucket = upload(s3_server, packed)
    url = f"s3://{bucket}/set"
    with environment(monkeypatch, s3_server.env):
        listed = json.loads(packerfs("ls", url, "-i", packed.key, "--json", timeout=120).stdout)
        paths = {e["path"] for e in (listed["entries"] if isinstance(listed, dict) else listed)}
        assert "media/big.bin" in paths and "docs/small/s29.txt" in paths

        result = packerfs(
            "verify", url, "-i", packed.key, "--manifest", str(packed.out / "manifest.csv"), "--json", timeout=180
        )
        report = json.loads(result.stdout)
        assert report["ok"] and report["cars"] == len(packed.rows), report
        assert report["commp_checked"] == len(packed.rows) if "commp_checked" in report else True
        # one streaming read of every CAR (the blocks and commP checked from the same bytes), then the
        # first leaf of each file again, for its age header: (4 + 30 + 2) files here, at most 1 MiB each
        fetched = int(re.search(r"fetched ([\d,]+) bytes", result.stderr.decode()).group(1).replace(",", ""))
        total = sum(len(c) for c in packed.cars.values())
        assert total <= fetched < total + 12 * MiB, (fetched, total)

        out = tmp_path / "restored"
        packerfs("unpack", url, out, "-i", packed.key, timeout=180)
        assert tree_of(out) == tree_of(packed.src)

        # indexing fetches each CAR's head and tail; reading one 1 MiB file fetches about that file
        with CarSet.open(url, keyring=KeyRing([str(packed.key)])) as carset:  # names hidden: the key opens them
            opened = carset.stats()
            assert len(carset.cars) == len(packed.rows)
            metadata = opened["bytes"]
            assert opened["requests"] <= 2 + 3 * len(packed.rows), opened
            reader = FileReader(carset, KeyRing([str(packed.key)]))
            data = reader.read(b"docs/one-mib-2.bin", 0, 2 * MiB)
            assert data == (packed.src / "docs" / "one-mib-2.bin").read_bytes()
            browsed = carset.stats()["bytes"] - metadata
        total = sum(len(c) for c in packed.cars.values())
        print(f"index: {opened['requests']} requests, {metadata} bytes for {len(packed.rows)} CARs of {total} bytes; "
              f"one 1 MiB file: {browsed} bytes")
        assert metadata < 2 * MiB * len(packed.rows)
        assert browsed < 4 * MiB, browsed


def test_azure_set_unpacks(packed, azure_server, monkeypatch, tmp_path):
    bucket = upload(azure_server, packed, "retrieved/")
    with environment(monkeypatch, azure_server.env):
        out = tmp_path / "restored"
        packerfs("unpack", f"az://{bucket}/retrieved", out, "-i", packed.key, timeout=180)
        assert tree_of(out) == tree_of(packed.src)


def test_reverse_mount_of_an_s3_set_equals_the_source(packed, s3_server, monkeypatch, tmp_path):
    bucket = upload(s3_server, packed)
    with environment(monkeypatch, s3_server.env):
        with mount(f"s3://{bucket}/set", tmp_path / "mnt", tmp_path / "state", "--reverse", "-i", packed.key) as m:
            assert within(OP_TIMEOUT, tree_of, m.mnt) == tree_of(packed.src)


# ---------------------------------------------------------------------------------------------- gateways


def test_unpack_from_packerfs_serve(packed, tmp_path):
    with packerfs_serve(packed, tmp_path, packed.options) as url:
        out = tmp_path / "restored"
        packerfs("unpack", url, out, "-i", packed.key, timeout=180)  # the pieces its /manifest.csv names
        assert tree_of(out) == tree_of(packed.src)


def pieces_dir(packed, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for row in packed.rows:
        os.symlink(packed.out / row["car_file"], folder / row["piece_cid"])
    return folder


def test_reverse_mount_from_nginx_and_unpack(packed, tmp_path):
    pieces = pieces_dir(packed, tmp_path / "pieces")
    manifest = packed.out / "manifest.csv"
    with nginx(tmp_path, pieces) as server:
        with mount(server.url, tmp_path / "mnt", tmp_path / "state", "--reverse", "-i", packed.key,
                   "--pieces", manifest) as m:
            assert within(OP_TIMEOUT, tree_of, m.mnt) == tree_of(packed.src)
        out = tmp_path / "restored"
        packerfs("unpack", server.url, out, "-i", packed.key, "--pieces", manifest, timeout=180)
        assert tree_of(out) == tree_of(packed.src)


def test_a_killed_server_gives_eio_for_its_pieces_only(packed, tmp_path):
    """Bin 1 from nginx, the others from packerfs serve: nginx dies mid-read."""
    pieces = pieces_dir(packed, tmp_path / "pieces")
    first, rest = packed.rows[0], packed.rows[1:]
    with packerfs_serve(packed, tmp_path, packed.options) as gateway, nginx(tmp_path, pieces) as server:
        specs = [f"{server.url}/piece/{first['piece_cid']}"] + [f"{gateway}/piece/{r['piece_cid']}" for r in rest]
        with mount(specs[0], tmp_path / "mnt", tmp_path / "state", "--reverse", "-i", packed.key,
                   *[a for s in specs[1:] for a in ("--piece", s)]) as m:
            big = m.mnt / "media" / "big.bin"  # its first part is in bin 1
            expected = (packed.src / "media" / "big.bin").read_bytes()

            def pread(path, offset, size):
                fd = os.open(path, os.O_RDONLY)
                try:
                    return os.pread(fd, size, offset)
                except OSError as exc:
                    return exc.errno
                finally:
                    os.close(fd)

            assert within(OP_TIMEOUT, pread, big, 0, MiB) == expected[:MiB]
            server.kill()
            # far from what was read and read ahead: not cached, so it needs the dead server
            assert within(OP_TIMEOUT, pread, big, 20 * MiB, MiB) == errno.EIO
            # a file wholly in the other pieces reads on
            last = packed.rows[-1]["car_file"]
            assert last != first["car_file"]
            other = m.mnt / "media" / "other.bin"
            data = within(OP_TIMEOUT, pread, other, 19 * MiB, MiB)
            assert data == (packed.src / "media" / "other.bin").read_bytes()[19 * MiB :]
            server.start()
            assert within(OP_TIMEOUT, pread, big, 20 * MiB, MiB) == expected[20 * MiB : 21 * MiB]


def test_a_part_over_1024_leaves_is_located_through_two_levels(tmp_path, monkeypatch):
    """A part of more than 1024 leaves has a root over level-1 nodes: each node's place and its
    leaves' are found from the root's links (Tsize, blocksizes), never by walking the CAR. The CARs
    are local files here, read the way remote ones are (their objects say remote)."""
    from packerfs.unpack import locations

    leaves = 1024 + 7  # the root links two level-1 nodes, the second one short

    def leaf(i: int) -> bytes:
        return i.to_bytes(8, "big") * 8 + bytes(MiB - 64) if i < leaves else b"tail"

    def content(offset: int, n: int) -> bytes:
        out = b""
        while len(out) < n and offset // MiB <= leaves:
            out += leaf(offset // MiB)[offset % MiB :][: n - len(out)]
            offset = (offset // MiB + 1) * MiB
        return out

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        for i in range(leaves + 1):
            f.write(leaf(i))  # every leaf distinct, cheaply
    packerfs("pack", src, tmp_path / "cars", "-t", tmp_path / "state", "--no-encryption", "--bin-size", "2GiB",
             timeout=300)
    monkeypatch.setattr(locations.LocalCar, "remote", True)
    with CarSet.open(tmp_path / "cars") as carset:
        assert not carset.cars[0].located
        reader = FileReader(carset)
        size = leaves * MiB + 4
        for offset in (0, 1023 * MiB + 5, 1024 * MiB - 3, 1030 * MiB + 7, size - 10):
            assert reader.read(b"big.bin", offset, 10) == content(offset, 10), offset


def test_an_unreachable_store_is_one_line_without_pack_advice(s3_server, tmp_path):
    """Reading CARs from a store that does not answer: one line naming the URL; nothing about sealed bins."""
    from objstores import free_port

    env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "PACKERFS_RETRY_SECONDS": "1"}
    result = packerfs("ls", "s3://cars/set", env=env, check=False, timeout=120)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("packerfs: error: s3://cars/set: cannot reach the server"), lines
    assert "sealed bins" not in lines[0] and "Traceback" not in lines[0]
