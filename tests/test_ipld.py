"""IPLD formats: CIDs, dag-pb, UnixFS (unixfs-v1-2025), HAMT, CARv1 — against the
shared vectors and against ipfs-car itself."""

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import counter_stream, load_vectors, run_tool
from packerfs.errors import CorruptBlock, FormatError, TruncatedInput
from packerfs.ipld import car, hamt
from packerfs.ipld.cid import DAG_PB, RAW, cid_to_str, decode_uvarint, encode_uvarint, make_cid, parse_cid, read_cid
from packerfs.ipld.dagpb import DIRECTORY, FILE, HAMT_SHARD, PBLink, UnixFSData, decode_node, encode_link, encode_node
from packerfs.ipld.unixfs import (
    CHUNK_SIZE,
    SHARD_THRESHOLD_BYTES,
    Entry,
    FileBuilder,
    directory_blocks,
    raw_leaf,
    shard_like_ipfs_car,
    symlink_block,
)

UNIXFS = load_vectors("unixfs.json")


def build_counter_file(length: int):
    builder = FileBuilder()
    blocks = []
    for offset in range(0, length, CHUNK_SIZE):
        blocks += builder.add_leaf(raw_leaf(counter_stream(offset, min(CHUNK_SIZE, length - offset))))
    tail, root = builder.finish()
    return blocks + tail, root


# ---------------------------------------------------------------- vectors


@pytest.mark.parametrize("vector", UNIXFS["raw_blocks"], ids=lambda v: repr(v["bytes_utf8"]))
def test_raw_block_vectors(vector):
    assert cid_to_str(raw_leaf(vector["bytes_utf8"].encode()).cid) == vector["cid"]


@pytest.mark.parametrize("vector", UNIXFS["dagpb_blocks"], ids=lambda v: v["what"])
def test_dagpb_block_vectors(vector):
    block = bytes.fromhex(vector["block_hex"])
    assert cid_to_str(make_cid(DAG_PB, block)) == vector["cid"]
    node = decode_node(block)
    assert encode_node(node.links, node.data) == block
    unixfs = UnixFSData.decode(node.data)
    assert unixfs.type in (DIRECTORY, FILE)
    assert unixfs.encode() == node.data


@pytest.mark.parametrize("vector", UNIXFS["files"], ids=lambda v: str(v["length"]))
def test_file_vectors(vector):
    blocks, root = build_counter_file(vector["length"])
    assert cid_to_str(root.cid) == vector["cid"]
    assert root.filesize == vector["length"]
    # post-order: the root is the last intermediate block emitted, when there is one
    if blocks:
        assert blocks[-1].cid == root.cid


def test_directory_vector():
    vector = UNIXFS["directories"][0]

    def file_entry(name, data):
        _, node = build_file(data)
        return Entry(name, node.cid, node.tsize)

    def build_file(data):
        builder = FileBuilder()
        for offset in range(0, len(data), CHUNK_SIZE):
            builder.add_leaf(raw_leaf(data[offset : offset + CHUNK_SIZE]))
        return builder.finish()

    _, deeper = directory_blocks([file_entry(b"c", counter_stream(0, 1))])
    _, sub = directory_blocks(
        [file_entry(b"b.bin", counter_stream(0, 1048577)), Entry(b"deeper", deeper.cid, deeper.tsize)]
    )
    _, root = directory_blocks(
        [file_entry(b"zero", b""), Entry(b"sub", sub.cid, sub.tsize), file_entry(b"a.txt", b"hello world\n")]
    )
    assert cid_to_str(deeper.cid) == vector["children"]["sub/deeper"]
    assert cid_to_str(sub.cid) == vector["children"]["sub"]
    assert cid_to_str(root.cid) == vector["cid"]


# ---------------------------------------------------------------- primitives


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_uvarint_round_trip(n):
    encoded = encode_uvarint(n)
    assert decode_uvarint(encoded + b"\xff") == (n, len(encoded))


def test_uvarint_rejects_truncated_and_overlong():
    with pytest.raises(ValueError):
        decode_uvarint(b"\x80")
    with pytest.raises(ValueError):
        decode_uvarint(b"\x81\x00")  # non-minimal encoding of 1


def test_cid_text_round_trip():
    cid = make_cid(RAW, b"x")
    assert parse_cid(cid_to_str(cid)) == cid
    assert read_cid(cid + b"tail") == (cid, len(cid))
    with pytest.raises(ValueError):
        parse_cid("not-a-cid")


@given(
    st.lists(
        st.tuples(st.binary(max_size=40), st.integers(min_value=0, max_value=1 << 40)), max_size=20
    ),
    st.one_of(st.none(), st.binary(max_size=100)),
)
def test_dagpb_round_trip(links, data):
    pblinks = sorted(
        (PBLink(make_cid(RAW, name), name, size) for name, size in links), key=lambda link: link.name
    )
    block = encode_node(pblinks, data)
    node = decode_node(block)
    assert node.links == pblinks
    assert node.data == data


def test_dagpb_rejects_data_before_links():
    link = encode_node([PBLink(make_cid(RAW, b"a"), b"a", 1)], None)
    data_first = encode_node([], b"\x08\x01") + link
    with pytest.raises(ValueError):
        decode_node(data_first)


def test_symlink_block_decodes():
    block = symlink_block(b"../target")
    unixfs = UnixFSData.decode(decode_node(block.data).data)
    assert unixfs.data == b"../target"


# ---------------------------------------------------------------- streaming builder


def test_builder_memory_is_bounded_by_depth_times_width():
    builder = FileBuilder(width=4)
    emitted = []
    peak = 0
    for i in range(1000):
        emitted += builder.add_leaf(raw_leaf(i.to_bytes(4, "little")))
        peak = max(peak, sum(len(level) for level in builder.levels))
    tail, root = builder.finish()
    emitted += tail
    depth = len(builder.levels)
    assert peak <= depth * 4
    assert emitted[-1].cid == root.cid
    assert root.filesize == 4000
    # every block appears after all of its children (post-order)
    seen = set()
    for block in emitted:
        for link in decode_node(block.data).links:
            assert link.cid in seen or link.cid[:2] == b"\x01\x55"
        seen.add(block.cid)


def test_builder_matches_reference_reduction_on_odd_counts():
    """Width 3 with 10 leaves: leaves group (3,3,3,1), those nodes group (3,1), then the root (2).

    The first level-2 node is complete as soon as the ninth leaf arrives, so it
    is emitted before the one-leaf node that finish() makes.
    """
    builder = FileBuilder(width=3)
    blocks = []
    leaves = [raw_leaf(bytes([i])) for i in range(10)]
    for leaf in leaves:
        blocks += builder.add_leaf(leaf)
    tail, root = builder.finish()
    blocks += tail
    shapes = [len(decode_node(b.data).links) for b in blocks]
    assert shapes == [3, 3, 3, 3, 1, 1, 2]
    assert root.filesize == 10


# ---------------------------------------------------------------- directories and HAMT


def test_murmur3_known_values():
    assert hamt.murmur3_x64_128(b"").hex() == "0" * 32
    assert hamt.murmur3_x64_128(b"The quick brown fox jumps over the lazy dog").hex() == (
        "e34bbc7bbc071b6c7a433ca9c49a9347"
    )


def _entries_with_node_size(target: int) -> list[Entry]:
    """Entries whose basic directory node is exactly `target` bytes.

    A node's size is the sum of its encoded links plus the Data field, so it is
    tracked incrementally and checked once against the real encoder at the end.
    """
    leaf = raw_leaf(b"x")
    data_field = len(encode_node([], UnixFSData(type=DIRECTORY).encode()))
    entries, size, i = [], data_field, 0
    while size < target - 200:
        entry = Entry(b"%08d" % i + b"n" * 52, leaf.cid, leaf.tsize)
        entries.append(entry)
        size += len(encode_link(PBLink(entry.cid, entry.name, entry.tsize)))
        i += 1
    last = entries.pop()
    size -= len(encode_link(PBLink(last.cid, last.name, last.tsize)))
    name = last.name
    while size + len(encode_link(PBLink(last.cid, name, last.tsize))) < target:
        name += b"n"
    entries.append(Entry(name, last.cid, last.tsize))
    assert len(directory_blocks(entries, lambda n, s: False)[0][0].data) == target
    return entries


def test_shard_threshold_is_strictly_greater_than_256_kib():
    entries = _entries_with_node_size(SHARD_THRESHOLD_BYTES)
    blocks, _ = directory_blocks(entries)
    assert len(blocks) == 1 and UnixFSData.decode(decode_node(blocks[0].data).data).type == DIRECTORY
    leaf = raw_leaf(b"x")
    last = entries[-1]
    entries[-1] = Entry(last.name + b"n", leaf.cid, leaf.tsize)
    blocks, root = directory_blocks(entries)
    top = UnixFSData.decode(decode_node(blocks[-1].data).data)
    assert top.type == HAMT_SHARD and top.fanout == 256 and top.hash_type == 0x22
    assert blocks[-1].cid == root.cid


@pytest.mark.interop
def test_hamt_matches_ipfs_car(tmp_path, ipfs_car):
    """ipfs-car shards above 1000 entries; with the same policy our CID must be theirs."""
    source = tmp_path / "d"
    source.mkdir()
    rng = random.Random(7)
    entries = []
    for i in range(1500):
        name = f"f{i:05d}-é-{rng.randrange(10**6)}"
        data = rng.randbytes(rng.randrange(0, 300))
        (source / name).write_bytes(data)
        leaf = raw_leaf(data)
        entries.append(Entry(name.encode(), leaf.cid, leaf.tsize))
    blocks, root = directory_blocks(entries, shard_like_ipfs_car)
    assert len(blocks) > 1, "1500 entries over 256 slots must produce sub-shards"
    result = run_tool(ipfs_car, "pack", source, "--no-wrap", "-o", tmp_path / "d.car", check=True)
    roots = run_tool(ipfs_car, "roots", tmp_path / "d.car", check=True).stdout.decode().split()
    assert roots == [cid_to_str(root.cid)], result.stderr


# ---------------------------------------------------------------- CAR writer and reader


def _write_tree_car(tree: dict, path: Path) -> bytes:
    """Write a nested {name: bytes | dict} tree as a CAR in post-order; return the root CID."""
    sections = []

    def add_file(data: bytes):
        builder = FileBuilder()
        for offset in range(0, len(data), CHUNK_SIZE):
            piece = data[offset : offset + CHUNK_SIZE]
            leaf = raw_leaf(piece)
            sections.append((leaf.cid, piece))
            sections.extend(builder.add_leaf(leaf))
        tail, root = builder.finish()
        if not data:
            sections.append((root.cid, b""))
        sections.extend(tail)
        return root

    def add_dir(children: dict):
        entries = []
        for name, value in children.items():
            node = add_dir(value) if isinstance(value, dict) else add_file(value)
            entries.append(Entry(name.encode(), node.cid, node.tsize))
        blocks, root = directory_blocks(entries)
        sections.extend(blocks)
        return root

    root = add_dir(tree)
    with open(path, "wb") as out:
        writer = car.CarWriter(out, root.cid)
        for section in sections:
            writer.add(section[0], section[1])
    return root.cid


TREE = {
    "a.txt": b"hello world\n",
    "empty": b"",
    "sub": {"big.bin": counter_stream(0, 3 * CHUNK_SIZE + 5), "deep": {"one": b"1"}},
    "uni cödé name": b"\x00" * 1000,
}


def _assert_tree_equal(tree: dict, path: Path):
    assert sorted(os.listdir(path)) == sorted(tree)
    for name, value in tree.items():
        if isinstance(value, dict):
            _assert_tree_equal(value, path / name)
        else:
            assert (path / name).read_bytes() == value


@pytest.mark.interop
def test_ipfs_car_verifies_lists_and_unpacks_our_car(tmp_path, ipfs_car):
    car_path = tmp_path / "t.car"
    root = _write_tree_car(TREE, car_path)
    assert run_tool(ipfs_car, "roots", car_path, check=True).stdout.decode().split() == [cid_to_str(root)]
    blocks = run_tool(ipfs_car, "blocks", car_path, "--verify")
    assert blocks.returncode == 0, blocks.stderr
    listing = run_tool(ipfs_car, "ls", car_path, check=True).stdout.decode().splitlines()
    assert "./sub/deep/one" in listing and "./uni cödé name" in listing
    out = tmp_path / "out"
    unpacked = run_tool(ipfs_car, "unpack", car_path, "-o", out)
    assert unpacked.returncode == 0, unpacked.stderr
    _assert_tree_equal(TREE, out)


def test_reader_round_trip_and_offsets(tmp_path):
    car_path = tmp_path / "t.car"
    root = _write_tree_car(TREE, car_path)
    raw = car_path.read_bytes()
    with car.CarReader(car_path) as reader:
        assert reader.roots == [root]
        count = 0
        for section, data in reader.blocks():
            assert raw[section.data_offset : section.data_offset + section.length] == data
            assert raw[section.offset : section.data_offset] == car.section_prefix(section.cid, len(data))
            count += 1
    assert count > 5


def test_header_length_is_fixed_by_root_length():
    placeholder = car.placeholder_header(36)
    real = car.header(make_cid(DAG_PB, b"anything"))
    assert len(placeholder) == len(real)


def _flip(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_reader_reports_corrupt_block_with_offset(tmp_path):
    car_path = tmp_path / "t.car"
    _write_tree_car(TREE, car_path)
    with car.CarReader(car_path) as reader:
        victim = list(reader.sections())[3]
    _flip(car_path, victim.data_offset + victim.length // 2)
    with car.CarReader(car_path) as reader, pytest.raises(CorruptBlock) as err:
        for _ in reader.blocks():
            pass
    message = str(err.value)
    assert "\n" not in message
    assert str(car_path) in message and f"offset {victim.offset}" in message


@pytest.mark.parametrize("cut", ["mid-block", "mid-prefix", "header"])
def test_reader_reports_truncation_with_offset(tmp_path, cut):
    car_path = tmp_path / "t.car"
    _write_tree_car(TREE, car_path)
    with car.CarReader(car_path) as reader:
        last = list(reader.sections())[-1]
        header_length = reader.header_length
    size = {"mid-block": last.data_offset + 3, "mid-prefix": last.offset + 1, "header": header_length - 5}[cut]
    with open(car_path, "r+b") as f:
        f.truncate(size)
    with pytest.raises(FormatError) as err:
        with car.CarReader(car_path) as reader:
            for _ in reader.blocks():
                pass
    message = str(err.value)
    assert "\n" not in message and str(car_path) in message and "offset" in message
    if cut != "header":
        assert isinstance(err.value, TruncatedInput)


def test_reader_rejects_non_car(tmp_path):
    path = tmp_path / "x.car"
    path.write_bytes(b"\x05hello world")
    with pytest.raises(FormatError, match="not a CARv1"):
        car.CarReader(path)


# ---------------------------------------------------------------- DAG-CBOR


def _cbor_values():
    from packerfs.ipld.cbor import Link

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.binary(max_size=40),
        st.text(max_size=20),
        st.binary(min_size=32, max_size=32).map(lambda d: Link(b"\x01\x71\x12\x20" + d)),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
        max_leaves=20,
    )


def _to_dag_cbor(value):
    from multiformats import CID

    from packerfs.ipld.cbor import Link

    if isinstance(value, Link):
        return CID.decode(bytes(value))
    if isinstance(value, list):
        return [_to_dag_cbor(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_dag_cbor(v) for k, v in value.items()}
    return value


@settings(max_examples=200)
@given(_cbor_values())
def test_cbor_codec_agrees_with_dag_cbor_package(value):
    import dag_cbor

    from packerfs.ipld import cbor

    encoded = cbor.encode(value)
    assert encoded == dag_cbor.encode(_to_dag_cbor(value))
    assert cbor.decode(encoded) == value


@pytest.mark.parametrize(
    "blob",
    [b"\x18\x05", b"\xa2\x61b\x01\x61a\x02", b"\x9f\xff", b"\xf9\x3c\x00", b"\xd8\x2b\x41\x00", b"\x62ab\x00", b"\x42a"],
    ids=["non-minimal int", "unsorted keys", "indefinite", "float", "other tag", "trailing", "truncated"],
)
def test_cbor_decoder_refuses_non_canonical(blob):
    from packerfs.ipld import cbor

    with pytest.raises(cbor.CBORError):
        cbor.decode(blob)
