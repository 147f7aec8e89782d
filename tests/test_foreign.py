"""CAR sets packerfs did not write: ipfs-car output, @ipld/unixfs sets split across CARs, CIDv0, CARv2.

The sets are made by the real tools (ipfs-car, and tests/js/unixfs_set.mjs over the npm
@ipld/unixfs importer); the tree is built by packerfs.unpack.foreign over a minimal block source
made of CarReaders (what CarSet is for such a set), and read back through FileReader and restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
from pathlib import Path

import pytest

from conftest import ROOT, find_tool, run_tool
from packerfs.errors import CorruptBlock, FormatError, IncompleteSet, UsageError
from packerfs.ipld import car as carfmt
from packerfs.ipld.cid import (
    DAG_PB,
    IDENTITY,
    RAW,
    check_block,
    cid_multihash,
    cid_to_str,
    encode_uvarint,
    make_cid,
    parse_cid,
    read_cid,
)
from packerfs.ipld.dagpb import DIRECTORY, FILE as UNIXFS_FILE, HAMT_SHARD, PBLink, UnixFSData, decode_node, encode_node
from packerfs.unpack import dag
from packerfs.unpack.foreign import build_foreign_tree, inspect
from packerfs.unpack.reader import FileReader
from packerfs.unpack.restore import restore
from packerfs.unpack.tree import DIR, FILE, SYMLINK

MiB = 1 << 20
SCRIPT = ROOT / "tests" / "js" / "unixfs_set.mjs"


class Blocks:
    """Every block of a set of CARs, verified on read: a dag.BlockSource with has() and locate()."""

    cipher = "plain"

    def __init__(self, paths):
        self.readers = []
        self.index: dict[bytes, tuple] = {}
        self.roots: list[bytes] = []
        self.problems: list[str] = []
        for path in sorted(paths):
            reader = carfmt.CarReader(path)
            self.readers.append(reader)
            self.roots += reader.roots
            for section in reader.sections():
                self.index.setdefault(section.cid, (reader, section))
        self.cars = self.readers  # restore() only asks whether there are any
        self._tree = None
        self.lines: list[str] = []

    def has(self, cid: bytes) -> bool:
        return cid in self.index or cid_multihash(cid)[0] == IDENTITY

    def locate(self, cid: bytes):
        found = self.index.get(cid)
        return found[1] if found else None

    def where(self, cid: bytes):
        found = self.index.get(cid)
        return (found[0].path, found[1].offset) if found else (None, None)

    def read_block(self, cid: bytes) -> bytes:
        found = self.index.get(cid)
        if found is None:
            code, digest = cid_multihash(cid)
            if code == IDENTITY:
                return digest
            raise FormatError(f"block {cid_to_str(cid)} is in none of the CARs")
        reader, section = found
        return reader.read_block(section, verify=True)

    def build(self, **kw):
        self._tree, self.lines = build_foreign_tree(self, self.roots, car_of=lambda c: self.where(c)[0], **kw)
        return self._tree

    def tree(self):
        if self._tree is None:
            self.build()
        return self._tree

    def close(self):
        for reader in self.readers:
            reader.close()


# ---------------------------------------------------------------- sources and tools


def _write(path: Path, data: bytes, mode: int | None = None, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def make_source(root: Path, *, symlinks: bool, many: int = 1100, big: int = 5 * MiB + 12345) -> Path:
    """Nested dirs, a large file, an empty one, `many` entries in one directory; with `symlinks`
    also symlinks and an empty directory (ipfs-car 3.1 leaves both out of its CARs)."""
    rng = random.Random(13)
    _write(root / "big.bin", rng.randbytes(big), mtime_ns=1_600_000_000_123_456_789)
    _write(root / "empty", b"")
    _write(root / "a" / "b" / "c" / "deep.txt", b"deep\n", mtime_ns=1_500_000_000_000_000_000)
    _write(root / "a" / "secret", rng.randbytes(300_000), mode=0o600)
    _write(root / "a" / "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    _write(root / "name with spaces é", b"unicode\n")
    for i in range(many):
        _write(root / "many" / f"f{i:05d}", f"entry {i}\n".encode() * (i % 7))
    if symlinks:
        (root / "empty-dir").mkdir()
        os.symlink("../big.bin", root / "a" / "link")
        os.symlink("/nonexistent/target", root / "dangling")
    os.utime(root / "a", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    return root


def source_tree(root: Path) -> dict[bytes, tuple]:
    """path -> (kind, payload, mode, mtime_ns) of everything under root (not root itself)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = os.fsencode(full.relative_to(root))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = (SYMLINK, os.fsencode(os.readlink(full)), None, st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = (DIR, None, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = (FILE, full.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def assert_same_tree(src: Blocks, root: Path, *, metadata: bool, unrecorded=(b"many",)) -> None:
    """The tree (and with `metadata` the modes and mtimes, except of `unrecorded` paths: @ipld/unixfs
    writes none for a sharded directory) equals the directory `root`; every file's bytes too."""
    tree = src.tree()
    expected = source_tree(root)
    got = {e.path: e for e in tree if e.path}
    assert sorted(got) == sorted(expected)
    reader = FileReader(src)
    for path, (kind, payload, mode, mtime_ns) in expected.items():
        entry = got[path]
        assert entry.kind == kind, path
        if kind == FILE:
            assert entry.complete and entry.size == len(payload), path
            data = b"".join(reader.iter_verified(path))
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest(), path
            if payload:
                mid = len(payload) // 3
                assert reader.read(path, mid, 70_000) == payload[mid : mid + 70_000], path
        elif kind == SYMLINK:
            assert entry.target == payload, path
        if metadata and kind != SYMLINK and path not in unrecorded:
            assert entry.mode == mode, path
            assert entry.mtime_ns == mtime_ns, path


def node_tool() -> str:
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "@ipld" / "unixfs").exists():
        if os.environ.get("CI"):
            pytest.fail("node and @ipld/unixfs are needed; ./run setup installs them")
        pytest.skip("node or @ipld/unixfs not installed (./run setup installs them)")
    return node


def unixfs_set(src: Path, out: Path, *args) -> dict:
    result = run_tool(node_tool(), SCRIPT, src, out, *args, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def ipfs_car_pack(src: Path, out: Path) -> Path:
    tool = find_tool("ipfs-car")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("ipfs-car is not installed; ./run setup installs it")
        pytest.skip("ipfs-car not installed (./run setup installs it)")
    result = run_tool(tool, "pack", src, "--output", out)
    assert result.returncode == 0, result.stderr.decode()
    return out


# ---------------------------------------------------------------- fixtures (built once)


@pytest.fixture(scope="module")
def ipfs_car_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("ipfs-car")
    src = make_source(base / "src", symlinks=False)
    return src, ipfs_car_pack(src, base / "set.car")


@pytest.fixture(scope="module")
def split_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("unixfs")
    src = make_source(base / "src", symlinks=True, many=600)
    out = base / "cars"
    info = unixfs_set(src, out, "--chunk", 262144, "--car-size", MiB, "--layout", "trickle", "--shard-above", 500)
    return src, out, info


# ---------------------------------------------------------------- the sets, read back


@pytest.mark.interop
def test_ipfs_car_output_reads_back(ipfs_car_set):
    src_dir, car_path = ipfs_car_set
    src = Blocks([car_path])
    try:
        tree = src.build()
        assert src.lines == []
        many = dag.resolve(src, src.roots[0], b"many")
        assert inspect(src, many).shard, "1100 entries: ipfs-car shards the directory (HAMT)"
        assert tree.lookup("big.bin").size == 5 * MiB + 12345
        assert tree.lookup("empty").size == 0 and tree.lookup("a/b").kind == DIR
        assert_same_tree(src, src_dir, metadata=False)
    finally:
        src.close()


@pytest.mark.interop
def test_unixfs_set_split_across_cars(split_set, tmp_path):
    src_dir, out, info = split_set
    cars = sorted(out.glob("*.car"))
    assert len(cars) >= 6
    big = parse_cid(info["files"]["big.bin"])
    spanning = [c for c in info["cars"] if "big.bin" in c["paths"]]
    assert len(spanning) >= 4, "the big file's DAG spans several CARs"
    src = Blocks(cars)
    try:
        assert len(set(src.roots)) == len(cars), "each CAR names a root; the directory CAR's is chosen"
        tree = src.build()
        assert src.lines == []
        assert tree.files[b"big.bin"].ordered()[0].cid == big
        # dag-pb leaves, 256 KiB, trickle: the root links some leaves directly and deeper subtrees after
        files = dag.FileDag(src)
        leaves = list(files.leaves(big, tree.lookup("big.bin").size))
        assert all(cid_multihash(c)[0] == 0x12 and c[1] == DAG_PB for c, _ in leaves)
        assert {size for _, size in leaves[:-1]} == {262144}
        root_node = dag.decode_file_node(src, big, src.read_block(big))
        assert len(root_node.links) < len(leaves)
        assert dag.cid_codec(root_node.links[0]) == DAG_PB and len(src.read_block(root_node.links[0])) < 262144 + 64
        sizes = root_node.sizes
        assert sizes[:4] == [262144] * 4 and max(sizes) > 262144, "trickle: direct leaves first, then subtrees"
        assert inspect(src, dag.resolve(src, info_root(info), b"many")).shard
        assert_same_tree(src, src_dir, metadata=True)
        # restore (what `unpack` runs) writes the same tree, with modes and mtimes
        report = restore(src, tmp_path / "out", None)
        assert not report.incomplete
        restored = source_tree(tmp_path / "out")
        expected = source_tree(src_dir)
        assert restored.keys() == expected.keys()
        for path, (kind, payload, mode, mtime_ns) in expected.items():
            assert restored[path][:2] == (kind, payload), path
            if kind != SYMLINK and path != b"many":
                assert restored[path][2:] == (mode, mtime_ns), path
    finally:
        src.close()


def info_root(info: dict) -> bytes:
    return parse_cid(info["root"])


@pytest.mark.interop
def test_cidv0_set(tmp_path):
    src_dir = make_source(tmp_path / "src", symlinks=True, many=40, big=3 * MiB + 5)
    info = unixfs_set(src_dir, tmp_path / "cars", "--cid-version", 0, "--layout", "balanced", "--car-size", 2 * MiB)
    assert info["root"].startswith("Qm")
    src = Blocks(sorted((tmp_path / "cars").glob("*.car")))
    try:
        tree = src.build()
        assert src.lines == []
        assert all(cid[:2] == b"\x12\x20" for cid in src.index), "every block is CIDv0"
        assert cid_to_str(tree.files[b"big.bin"].ordered()[0].cid).startswith("Qm")
        assert_same_tree(src, src_dir, metadata=True)
    finally:
        src.close()


def carv2(v1: bytes, *, padding: int = 13, index: bytes = b"\x00\x01garbage index") -> bytes:
    """A CARv2 file per the spec: pragma, header (characteristics, data offset, size, index offset),
    the CARv1 payload (after some padding), then an index the readers ignore."""
    pragma = bytes.fromhex("0aa16776657273696f6e02")
    data_offset = len(pragma) + 40 + padding
    index_offset = data_offset + len(v1) + 3
    header = bytes(16) + data_offset.to_bytes(8, "little") + len(v1).to_bytes(8, "little") + index_offset.to_bytes(8, "little")
    return pragma + header + bytes(padding) + v1 + bytes(3) + index


@pytest.mark.interop
def test_carv2_file(ipfs_car_set, tmp_path):
    src_dir, car_path = ipfs_car_set
    v1 = car_path.read_bytes()
    v2_path = tmp_path / "set-v2.car"
    v2_path.write_bytes(carv2(v1))
    shift = 11 + 40 + 13
    with carfmt.CarReader(car_path) as r1, carfmt.CarReader(v2_path) as r2:
        assert (r2.version, r2.roots, r2.data_offset, r2.data_end) == (2, r1.roots, shift, shift + len(v1))
        first1, first2 = next(r1.sections()), next(r2.sections())
        assert first2.offset == first1.offset + shift and first2.data_offset == first1.data_offset + shift
        assert sum(1 for _ in r2.blocks()) == sum(1 for _ in r1.sections())
    src = Blocks([v2_path])
    try:
        src.build()
        assert src.lines == []
        assert_same_tree(src, src_dir, metadata=False)
    finally:
        src.close()


def test_carv2_header_damage(tmp_path):
    blocks = [(make_cid(RAW, b"x"), b"x")]
    v1 = _car_bytes(tmp_path / "v1.car", blocks[0][0], blocks)
    path = tmp_path / "bad.car"
    good = carv2(v1)
    path.write_bytes(good[: len(good) - len(v1) // 2 - 40])  # the payload is cut short
    with pytest.raises(FormatError, match=r"offset 11: CARv2 header announces data up to offset \d+"):
        carfmt.CarReader(path)
    path.write_bytes(good[:30])
    with pytest.raises(FormatError, match="ends inside the CARv2 header"):
        carfmt.CarReader(path)
    inner = bytearray(good)
    inner[64 + 2] ^= 0xFF  # inside the inner CARv1 header
    path.write_bytes(bytes(inner))
    with pytest.raises(FormatError, match=f"{path}, offset \\d+: the CARv2 payload is not a CARv1"):
        carfmt.CarReader(path)


# ---------------------------------------------------------------- missing and damaged blocks


def _missing_blocks(src: Blocks, cid: bytes, size: int) -> list[str]:
    """What verify does for each file: walk its DAG, every node and leaf must be in the set."""
    try:
        return [cid_to_str(leaf) for leaf, _ in dag.FileDag(src).leaves(cid, size) if not src.has(leaf)]
    except FormatError as exc:
        assert "in none of the CARs" in str(exc)
        return [str(exc)]


def _read_all(reader: FileReader, path: bytes) -> bytes:
    return b"".join(reader.iter_verified(path))


@pytest.mark.interop
def test_missing_car_mid_file(split_set):
    """A data CAR holding only the middle of the big file is lost: the tree is whole, the big file
    fails to read naming its path (and a verify-style walk of its leaves finds the gap), the rest reads."""
    src_dir, out, info = split_set
    victim = next(c for c in info["cars"] if c["paths"] == ["big.bin"])
    src = Blocks([out / c["name"] for c in info["cars"] if c is not victim])
    try:
        tree = src.build()
        expected = source_tree(src_dir)
        assert sorted(e.path for e in tree if e.path) == sorted(expected)
        assert src.lines == [] and all(e.complete for e in tree)
        reader = FileReader(src)
        for path, (kind, payload, _, _) in expected.items():
            if kind != FILE:
                continue
            missing = _missing_blocks(src, tree.files[path].ordered()[0].cid, len(payload))
            if path == b"big.bin":
                assert missing
                with pytest.raises(FormatError) as err:
                    _read_all(reader, path)
                assert "'big.bin'" in str(err.value) and "in none of the CARs" in str(err.value)
                assert reader.read(path, 0, 1000) == payload[:1000], "the ranges that are there still read"
            else:
                assert not missing and _read_all(reader, path) == payload, path
    finally:
        src.close()


@pytest.mark.interop
def test_missing_car_with_file_roots(split_set, tmp_path):
    """The last data CAR (the big file's root, many small files) is lost: every path is still listed,
    the files whose root block is gone are incomplete and named (tree.lost), restore writes the rest."""
    src_dir, out, info = split_set
    data_cars = [c for c in info["cars"] if c["name"] != "dirs.car"]
    victim = data_cars[-1]
    src = Blocks([out / c["name"] for c in info["cars"] if c is not victim])
    try:
        tree = src.build()
        expected = source_tree(src_dir)
        assert sorted(e.path for e in tree if e.path) == sorted(expected), "every path is still listed"
        gone = {os.fsencode(p) for p, cid in info["files"].items() if parse_cid(cid) not in src.index}
        assert b"big.bin" in gone and len(gone) > 10
        assert {e.path for e in tree.incomplete()} == gone
        assert not tree.problems and src.lines == tree.lost and len(tree.lost) == len(gone)
        for line in tree.lost:
            assert "missing block" in line and "\n" not in line
        lost = "\n".join(tree.lost)
        assert all(repr(os.fsdecode(p)) in lost for p in gone)
        assert tree.lookup("big.bin").size == 0, "the size of a file whose root is lost is not known"
        report = restore(src, tmp_path / "out", None)
        assert {e.path for e in report.incomplete} == gone
        restored = source_tree(tmp_path / "out")
        for path, (kind, payload, _, _) in expected.items():
            if path in gone:
                assert path not in restored
            else:
                assert restored[path][:2] == (kind, payload), path
    finally:
        src.close()


@pytest.mark.interop
def test_corrupt_blocks_name_car_and_offset(ipfs_car_set, tmp_path):
    src_dir, car_path = ipfs_car_set
    src = Blocks([car_path])
    try:
        tree = src.build()
        ref = tree.files[b"big.bin"].ordered()[0]
        leaf = list(dag.FileDag(src).leaves(ref.cid, ref.length))[2][0]
        leaf_section = src.locate(leaf)
        deep_section = src.locate(dag.resolve(src, src.roots[0], b"a/b"))
    finally:
        src.close()
    copy = tmp_path / "damaged.car"
    data = bytearray(car_path.read_bytes())
    data[leaf_section.data_offset + 100] ^= 1
    data[deep_section.data_offset + deep_section.length - 1] ^= 1
    copy.write_bytes(bytes(data))
    src = Blocks([copy])
    try:
        tree = src.build()
        # the damaged directory: one problem line naming the CAR and the block's section offset
        assert len(tree.problems) == 1 and not tree.lost, tree.problems
        line = tree.problems[0]
        assert "\n" not in line and f"{copy}, offset {deep_section.offset}" in line and "'a/b'" in line
        assert not tree.lookup("a/b").complete and tree.lookup("a/b/c") is None
        assert tree.lookup("many/f01099").complete
        # the damaged leaf: reading the file fails naming the CAR and offset; other ranges read
        reader = FileReader(src)
        with pytest.raises(CorruptBlock) as err:
            _read_all(reader, b"big.bin")
        assert f"{copy}, offset {leaf_section.offset}" in str(err.value) and "\n" not in str(err.value)
        assert reader.read("big.bin", 0, 1000) == (src_dir / "big.bin").read_bytes()[:1000]
        with pytest.raises(FormatError, match=f"{copy}, offset {deep_section.offset}"):
            src.build(strict=True)
    finally:
        src.close()


# ---------------------------------------------------------------- roots, names, bounds (hand-made DAGs)


def _car_bytes(path: Path, root: bytes, blocks) -> bytes:
    with open(path, "wb") as f:
        writer = carfmt.CarWriter(f, root)
        seen = set()
        for cid, data in blocks:
            if cid not in seen:
                seen.add(cid)
                writer.add(cid, data)
    return path.read_bytes()


def _dir(entries: dict[bytes, bytes], **meta) -> tuple[bytes, bytes]:
    block = encode_node(sorted((PBLink(c, n, 1) for n, c in entries.items()), key=lambda l: l.name),
                        UnixFSData(type=DIRECTORY, **meta).encode())
    return make_cid(DAG_PB, block), block


def _raw(data: bytes) -> tuple[bytes, bytes]:
    return make_cid(RAW, data), data


def _hand_set(tmp_path: Path, blocks, roots) -> Blocks:
    path = tmp_path / "hand.car"
    _car_bytes(path, roots[0], blocks)
    src = Blocks([path])
    src.roots = list(roots)
    return src


def test_root_choice(tmp_path):
    f1, f2 = _raw(b"one"), _raw(b"two")
    sub = _dir({b"f2": f2[0]})
    top = _dir({b"f1": f1[0], b"sub": sub[0]}, mode=0o750, mtime=(1234, 5))
    other = _dir({b"x": f1[0]})
    blocks = [f1, f2, sub, top, other]
    missing = make_cid(DAG_PB, b"not in the set")
    identity = b"\x01\x55\x00\x00"

    src = _hand_set(tmp_path, blocks, [f2[0], sub[0], identity, top[0], missing])
    tree = src.build()  # `sub` lies inside `top`; the file root and the absent root are ignored
    assert [e.path for e in tree] == [b"", b"f1", b"sub", b"sub/f2"]
    assert (tree.lookup("").mode, tree.lookup("").mtime_ns) == (0o750, 1234 * 10**9 + 5)
    assert tree.lookup("f1").mode == 0o644 and tree.lookup("f1").mtime_ns is None
    assert any("inside it" in n for n in tree.notes)

    src.roots = [top[0], other[0]]
    with pytest.raises(UsageError, match="2 root directories .*--root"):
        src.build()
    assert [e.path for e in src.build(root=other[0])] == [b"", b"x"]
    with pytest.raises(UsageError, match="no CAR of the set holds"):
        src.build(root=missing)

    src.roots = [f2[0]]
    tree = src.build()
    name = cid_to_str(f2[0]).encode()
    assert [e.path for e in tree] == [b"", name] and FileReader(src).read(name, 0, 10) == b"two"
    src.roots = [f1[0], f2[0]]
    with pytest.raises(UsageError, match="2 file roots"):
        src.build()
    src.roots = [missing, f1[0]]
    with pytest.raises(IncompleteSet, match=f"no root directory.*{cid_to_str(missing)}"):
        src.build()
    src.roots = []
    with pytest.raises(UsageError, match="no root"):
        src.build()
    cbor_root = make_cid(0x71, b"\xa0")  # a DAG-CBOR root (no CAR holds it: codec decides first)
    src.index[cbor_root] = src.index[f1[0]]
    src.roots = [cbor_root, top[0]]
    assert len(src.build().files) == 2 and any("not UnixFS" in n for n in src.tree().notes)
    src.roots = [cbor_root]
    with pytest.raises(UsageError, match="not UnixFS; choose one with --root"):
        src.build()
    with pytest.raises(UsageError, match="not UnixFS"):
        src.build(root=cbor_root)
    src.close()


def test_bad_names_and_missing_children(tmp_path):
    good = _raw(b"fine")
    absent = make_cid(RAW, b"gone")
    link = encode_node([], UnixFSData(type=4, data=b"target").encode())
    link = (make_cid(DAG_PB, link), link)
    nul = encode_node([], UnixFSData(type=4, data=b"a\0b").encode())
    nul = (make_cid(DAG_PB, nul), nul)
    entries = {b"ok": good[0], b"..": good[0], b"a/b": good[0], b"": good[0], b"n\0l": good[0],
               b"x" * 256: good[0], b"gone": absent, b"link": link[0], b"badlink": nul[0], b".": good[0]}
    top = _dir(entries)
    src = _hand_set(tmp_path, [good, link, nul, top], [top[0]])
    tree = src.build()
    assert sorted(e.path for e in tree) == [b"", b"gone", b"link", b"ok"]
    assert tree.lookup("link").target == b"target" and tree.lookup("link").kind == SYMLINK
    assert not tree.lookup("gone").complete and len(tree.lost) == 1 and "'gone': missing block" in tree.lost[0]
    assert len(tree.problems) == 7, tree.problems
    assert all(str(tmp_path / "hand.car") in p for p in tree.problems)
    with pytest.raises(FormatError):
        src.build(strict=True)
    src.close()


def test_entry_bound_and_shared_directories(tmp_path):
    leaf = _raw(b"z")
    level = _dir({b"a": leaf[0], b"b": leaf[0]})
    blocks = [leaf, level]
    for _ in range(12):  # each level links the one below twice: 2**13 paths from 14 blocks
        level = _dir({b"l": level[0], b"r": level[0]})
        blocks.append(level)
    src = _hand_set(tmp_path, blocks, [level[0]])
    with pytest.raises(FormatError, match="more than 1000 entries"):
        src.build(max_entries=1000)
    assert len(src.build(max_entries=100_000).files) == 2**13
    src.close()


def test_hand_made_hamt_and_trickle_like_file(tmp_path):
    """A HAMT built by packerfs's own builder, and a file node with inline data and uneven children."""
    from packerfs.ipld import hamt

    leaves = [_raw(bytes([i]) * (i + 1)) for i in range(5)]
    inner = encode_node([PBLink(c, b"", len(d)) for c, d in leaves[1:3]],
                        UnixFSData(type=UNIXFS_FILE, filesize=5, blocksizes=[2, 3]).encode())
    inner = (make_cid(DAG_PB, inner), inner)
    root = encode_node([PBLink(leaves[0][0], b"", 1), PBLink(inner[0], b"", 9), PBLink(leaves[3][0], b"", 4)],
                       UnixFSData(type=UNIXFS_FILE, data=b"head", filesize=4 + 1 + 5 + 4, blocksizes=[1, 5, 4],
                                  mode=0o4755, mtime=(-5, 7)).encode())
    root = (make_cid(DAG_PB, root), root)
    shard_blocks = []
    names = [PBLink(root[0] if i == 0 else leaves[4][0], f"n{i:04d}".encode(), 1) for i in range(700)]
    top = hamt.build_shard(names, emit=lambda c, d: shard_blocks.append((c, d)))
    src = _hand_set(tmp_path, leaves + [inner, root] + shard_blocks, [top.cid])
    tree = src.build()
    assert len(tree.files) == 700 and not src.lines
    e = tree.lookup("n0000")
    assert (e.size, e.mode, e.mtime_ns) == (14, 0o4755, -5 * 10**9 + 7)
    assert FileReader(src).read("n0000", 0, 100) == b"head" + b"\x00" + b"\x01" * 2 + b"\x02" * 3 + b"\x03" * 4
    assert decode_node(shard_blocks[-1][1]).data and UnixFSData.decode(decode_node(shard_blocks[-1][1]).data).type == HAMT_SHARD
    # a missing sub-shard: its entries cannot be listed, the line says so (incomplete, not damage)
    sub = next(c for c, _ in shard_blocks[:-1])
    src.index.pop(sub)
    tree = src.build()
    assert len(tree.files) < 700 and any("HAMT shard" in line and "cannot be listed" in line for line in tree.lost)
    src.close()


# ---------------------------------------------------------------- CIDs


def test_cidv0_and_other_hashes():
    block = encode_node([], UnixFSData(type=UNIXFS_FILE, data=b"hello", filesize=5).encode())
    v0 = b"\x12\x20" + hashlib.sha256(block).digest()
    assert read_cid(v0) == (v0, 34)
    text = cid_to_str(v0)
    assert text.startswith("Qm") and parse_cid(text) == v0
    from multiformats import CID

    assert str(CID.decode(v0)) == text
    check_block(v0, block)
    with pytest.raises(CorruptBlock):
        check_block(v0, block + b"x")
    # a dag-pb link naming a CIDv0 child decodes to the same bytes
    parent = encode_node([PBLink(v0, b"child", len(block))], UnixFSData(type=DIRECTORY).encode())
    assert decode_node(parent).links[0].cid == v0
    for code, digest in [(0x13, hashlib.sha512(block).digest()), (0xB220, hashlib.blake2b(block, digest_size=32).digest()),
                         (0x16, hashlib.sha3_256(block).digest())]:
        cid = b"\x01\x70" + encode_uvarint(code) + encode_uvarint(len(digest)) + digest
        check_block(cid, block)
        with pytest.raises(CorruptBlock):
            check_block(cid, b"other")
    unknown = b"\x01\x70" + encode_uvarint(0x1E) + b"\x20" + bytes(32)  # blake3
    with pytest.raises(FormatError, match="unsupported hash function 0x1e") as err:
        check_block(unknown, block, path="x.car", offset=7)
    assert not isinstance(err.value, CorruptBlock) and "x.car, offset 7" in str(err.value)
    short = b"\x01\x70\x13\x20" + bytes(32)
    with pytest.raises(FormatError, match="sha2-512 digest of 32 bytes"):
        check_block(short, block)


def test_unixfs_mode_and_mtime_round_trip():
    for mtime in [(0, 0), (1_700_000_000, 999_999_999), (-1, 1), (2**40, 0)]:
        data = UnixFSData(type=UNIXFS_FILE, filesize=0, mode=0o100644, mtime=mtime).encode()
        back = UnixFSData.decode(data)
        assert (back.mode, back.mtime) == (0o100644, mtime)


# ---------------------------------------------------------------- through the commands a user runs


def _restored(out: Path) -> dict[bytes, tuple]:
    return {p: (kind, payload) for p, (kind, payload, _, _) in source_tree(out).items()}


@pytest.mark.interop
@pytest.mark.parametrize("which", ["ipfs-car", "split", "carv2"])
def test_ls_unpack_and_reverse_mount_of_foreign_sets(which, ipfs_car_set, split_set, tmp_path):
    from conftest import packerfs, within
    from test_mount import OP_TIMEOUT, mount

    if which == "split":
        src_dir, cars, _ = split_set
    else:
        src_dir, cars = ipfs_car_set
        if which == "carv2":
            (tmp_path / "v2").mkdir()
            (tmp_path / "v2" / "set.car").write_bytes(carv2(cars.read_bytes()))
            cars = tmp_path / "v2"
    expected = _restored(src_dir)

    listed = json.loads(packerfs("ls", cars, "--json", timeout=120).stdout)
    rows = listed["entries"] if isinstance(listed, dict) else listed
    assert {os.fsencode(r["path"]) for r in rows if r["path"] not in ("", ".")} == set(expected)

    out = tmp_path / "out"
    packerfs("unpack", cars, out, timeout=180)
    assert _restored(out) == expected

    report = json.loads(packerfs("verify", cars, "--json", timeout=180).stdout)
    assert report["ok"], report

    with mount(cars, tmp_path / "mnt", tmp_path / "state", "--reverse") as m:
        assert within(OP_TIMEOUT, _restored, m.mnt) == expected


@pytest.mark.interop
def test_foreign_set_in_a_bucket(ipfs_car_set, s3_server, monkeypatch, tmp_path):
    """No tail locator: the remote CAR is indexed by walking its sections through 8 MiB windows."""
    from conftest import packerfs

    src_dir, car_path = ipfs_car_set
    bucket = s3_server.new_bucket("foreign")
    s3_server.upload_tree(bucket, "set/", {"set.car": car_path.read_bytes()})
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    result = packerfs("unpack", f"s3://{bucket}/set", out, timeout=180)
    assert _restored(out) == _restored(src_dir)
    fetched = int(result.stderr.decode().split("fetched ")[1].split(" bytes")[0].replace(",", ""))
    assert fetched < 3 * car_path.stat().st_size, fetched
