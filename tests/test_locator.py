"""The tail locator and the manifest's `at` offsets (packerfs/locator.py): what lets a remote
reader index a packerfs CAR with a few ranged requests instead of walking its sections."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import make_small_tree, write_random
from packerfs import locator
from packerfs.crypt import make_cipher, write_age_identity
from packerfs.ipld.car import CarReader
from packerfs.pack import Engine
from packerfs.unpack.carset import parse_sections

MiB = 1 << 20


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    work = tmp_path_factory.mktemp("locator")
    src = make_small_tree(work / "src")
    write_random(src / "split" / "big", 11 * MiB + 5, 9)
    recipient = write_age_identity(str(work / "key.txt"))
    engine = Engine.open(str(src), str(work / "state"), make_cipher([recipient]), 4 * MiB)
    try:
        engine.scan()
        engine.write(str(work / "cars"))
    finally:
        engine.close()
    return work / "cars"


def _cars(cars: Path) -> list[Path]:
    return sorted(p for p in cars.iterdir() if p.suffix == ".car")


def test_every_car_ends_with_a_locator_that_points_at_its_metadata(packed):
    from packerfs import manifest

    for path in _cars(packed):
        data = path.read_bytes()
        found = locator.decode(data[-locator.SECTION_LENGTH:], len(data))
        assert found is not None, path
        meta_start, _ = found
        with CarReader(path) as reader:
            sections = list(reader.sections())
            root = reader.roots[0]
        # the locator is the last section and lies outside the DAG; the root directory just before it
        assert sections[-1].offset == len(data) - locator.SECTION_LENGTH
        assert sections[-2].cid == root
        assert meta_start in {s.offset for s in sections}
        blocks = parse_sections(str(path), 0, data[meta_start : len(data) - locator.SECTION_LENGTH], meta_start)
        assert root in blocks
        # the manifest's blocks all lie in the range: the manifest decodes from it alone
        from packerfs.unpack import dag
        from packerfs.unpack.carset import _BufferBlocks

        src = _BufferBlocks(str(path), blocks)
        meta_dir = dag.dir_lookup(src, root, manifest.DIRNAME)
        manifest_cid = dag.dir_lookup(src, meta_dir, manifest.NAME)
        files = dag.FileDag(src)
        size = files.root_size(manifest_cid)
        decoded = manifest.decode_manifest(files.read(manifest_cid, size, 0, size))
        offsets = {s.cid: s.offset for s in sections}
        with_cid = [e for e in decoded["entries"] if "cid" in e]
        assert with_cid
        for entry in with_cid:
            assert entry["at"] == offsets[entry["cid"]], entry["path"]


def test_a_locator_is_recognised_only_when_intact():
    section = locator.section(1000, 0)
    assert locator.decode(section, 5000) == (1000, 0)
    for i in range(len(section)):
        bad = bytearray(section)
        bad[i] ^= 1
        assert locator.decode(bytes(bad), 5000) is None, i
    assert locator.decode(section, 1000) is None  # points past the CAR's end
    assert locator.decode(section[1:], 5000) is None


def test_ipfs_car_lists_a_car_with_a_locator(packed, ipfs_car):
    import subprocess

    for path in _cars(packed)[:2]:
        result = subprocess.run([ipfs_car, "ls", str(path)], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert b".packerfs/manifest.cbor" in result.stdout
    assert os.path.getsize(_cars(packed)[0]) <= 4 * MiB
