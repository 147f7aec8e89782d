"""Unpack: CarSet scanning, FileReader, restore, verify, ls, end to end on CARs the pack engine wrote.

No mocks: packs are made with the real Engine (plain, age X25519, OpenPGP with a
throwaway cv25519 gpg key), and damaged or malicious sets are made by editing
or crafting real CAR files.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from packerfs import manifest as manifest_format
from packerfs.crypt import KeyRing, make_cipher, write_age_identity
from packerfs.errors import CorruptBlock, FormatError, IncompleteSet, KeyProblem, PackerfsError, UsageError
from packerfs.ipld.car import CarReader, CarWriter
from packerfs.ipld.cid import RAW, cid_codec
from packerfs.ipld.dagpb import HAMT_SHARD, UnixFSData, decode_node
from packerfs.ipld.unixfs import Entry, directory_blocks, raw_leaf, symlink_block
from packerfs.pack import Engine
from packerfs.unpack import CarSet, FileReader, ls, restore, verify
from packerfs.unpack import dag

MiB = 1 << 20
BIN = 4 * MiB
BASE_NS = 1_600_000_000_123_456_789
HUGE = b"big/huge.bin"


# ---------------------------------------------------------------- source trees


def data_of(n: int, seed: int) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def make_tree(root: Path, *, many: int = 5000) -> Path:
    """The torture tree: odd names, empty things, leaf-boundary sizes, a file larger than a bin,
    30 levels of nesting, a 5000-entry directory, and relative/absolute/dangling symlinks."""
    root.mkdir(parents=True)
    _write(root / "uni" / "ünïcødé name with spaces.txt", "héllo wörld\n".encode() * 100)
    _write(root / "uni" / "tab\tin name", b"tab\n", 0o600)
    _write(Path(os.fsdecode(bytes(root) + b"/uni/latin1-\xe9.txt")), b"not utf-8 name\n")
    _write(root / "empty", b"")
    (root / "emptydir").mkdir()
    (root / "nested" / "empty-sub").mkdir(parents=True)
    _write(root / "sizes" / "exact1m", data_of(MiB, 1))
    _write(root / "sizes" / "1m-minus1", data_of(MiB - 1, 2), 0o755)
    _write(root / "sizes" / "1m-plus1", data_of(MiB + 1, 3), 0o444)
    _write(root / os.fsdecode(HUGE), data_of(10 * MiB + 12345, 4))  # > a 4 MiB bin: split in >= 3 parts
    deep = root / "deep"
    for level in range(1, 31):
        deep = deep / f"d{level:02d}"
    _write(deep / "leaf.txt", b"thirty levels down\n")
    for i in range(many):
        _write(root / "many" / f"entry-{i:05d}-{'x' * 60}.txt", b"small file %d\n" % i)
    links = root / "links"
    links.mkdir()
    os.symlink("../sizes/exact1m", links / "rel")
    os.symlink("/etc/hostname", links / "abs")
    os.symlink("does/not/exist", links / "dangling")
    os.symlink("../deep", links / "dirlink")
    (root / "ro").mkdir()
    _write(root / "ro" / "inside", b"in a read-only dir\n")
    os.chmod(root / "ro", 0o555)
    _set_times(root)
    return root


def _set_times(root: Path) -> None:
    """Distinct nanosecond mtimes everywhere, directories last (deepest first)."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            paths.append(os.path.join(dirpath, name))
    paths.sort(key=lambda p: -p.count(os.sep))
    paths.append(str(root))
    for i, p in enumerate(paths):
        ns = BASE_NS + i * 1_000_003
        os.utime(p, ns=(ns, ns), follow_symlinks=False)


def all_paths(root: Path) -> dict[str, os.stat_result]:
    out = {"": os.lstat(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def assert_same_tree(src: Path, out: Path) -> None:
    r = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(out)], capture_output=True)
    assert r.returncode == 0, r.stdout.decode(errors="replace")[:3000] + r.stderr.decode(errors="replace")
    a, b = all_paths(src), all_paths(out)
    assert sorted(a) == sorted(b)
    for rel, sa in a.items():
        sb = b[rel]
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), rel
        if not stat.S_ISLNK(sa.st_mode):
            assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), rel
        else:
            assert os.readlink(src / rel) == os.readlink(out / rel), rel
        assert sa.st_mtime_ns == sb.st_mtime_ns, rel


def make_writable(root: Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)


def pack(src: Path, work: Path, cipher) -> Path:
    cars = work / "cars"
    engine = Engine.open(str(src), str(work / "state"), cipher, BIN)
    try:
        engine.scan()
        engine.write(str(cars))
    finally:
        engine.close()
    return cars


def copy_cars(cars: Path, dest: Path) -> Path:
    shutil.copytree(cars, dest)
    return dest


# ---------------------------------------------------------------- packs (made once)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("unpack")
    src = make_tree(root / "src")
    yield root, src
    make_writable(root)


@pytest.fixture(scope="module")
def plain_pack(work):
    root, src = work
    cars = pack(src, root / "plain", make_cipher(no_encryption=True))
    return {"src": src, "cars": cars, "keyring": None}


@pytest.fixture(scope="module")
def age_pack(work):
    root, src = work
    key = root / "age-key.txt"
    recipient = write_age_identity(str(key))
    cars = pack(src, root / "age", make_cipher([recipient]))
    return {"src": src, "cars": cars, "keyring": KeyRing([str(key)]), "key": key}


@pytest.fixture(scope="module")
def ssh_rsa_pack(work, ssh_rsa_key):
    root, src = work
    cars = pack(src, root / "ssh-rsa", make_cipher([str(ssh_rsa_key) + ".pub"]))
    return {"src": src, "cars": cars, "keyring": KeyRing([str(ssh_rsa_key)])}


@pytest.fixture(params=["plain", "age", "age-ssh-rsa-4096"])
def any_pack(request):
    return request.getfixturevalue({"plain": "plain_pack", "age": "age_pack", "age-ssh-rsa-4096": "ssh_rsa_pack"}[request.param])


# ---------------------------------------------------------------- round trips


def test_round_trip(any_pack, tmp_path):
    carset = CarSet.open(str(any_pack["cars"]))
    assert carset.problems == [] and carset.missing_bins == []
    assert len(carset.cars) >= 3 and [c.bin for c in carset.cars] == list(range(1, len(carset.cars) + 1))
    out = tmp_path / "out"
    seen = []
    report = restore(carset, str(out), any_pack["keyring"], progress=seen.append)
    try:
        assert report.complete and report.exit_code == 0 and not report.incomplete
        assert report.symlinks == 4 and report.files >= 5000
        assert sum(seen) == report.bytes
        assert_same_tree(any_pack["src"], out)
        assert not list(out.rglob(".pfs-*.partial"))
    finally:
        make_writable(out)


def test_layout_split_and_hamt(age_pack):
    carset = CarSet.open(str(age_pack["cars"]))
    rows = {r.path: r for r in ls(carset)}
    huge = rows[HUGE]
    assert huge.kind == "file" and huge.parts >= 3 and len(huge.bins) == huge.parts
    assert huge.size == 10 * MiB + 12345 and huge.complete
    assert rows[b"links/abs"].kind == "symlink" and rows[b"links/abs"].target == b"/etc/hostname"
    assert rows[b"emptydir"].kind == "dir" and rows[b"empty"].size == 0
    # the 5000-entry directory became a HAMT shard in at least one CAR
    types = []
    for car in carset.cars:
        many = dag.resolve(carset, car.root, b"many")
        if many is not None:
            node = decode_node(carset.read_block(many))
            types.append(UnixFSData.decode(node.data).type)
    assert HAMT_SHARD in types
    # part names in the bins carry the suffixes
    tree = carset.tree()
    names = [r.name for r in tree.files[HUGE].ordered()]
    assert names[0] == HUGE + b".age.part%04dof%04d" % (1, huge.parts)


def test_ipfs_car_lists_unpacked_names(plain_pack):
    """Sanity: the names our reader resolves are the ones a stock tool sees."""
    tool = Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "ipfs-car"
    if not tool.exists():
        pytest.skip("ipfs-car not installed")
    carset = CarSet.open(str(plain_pack["cars"]))
    car = next(c for c in carset.cars if any(e["path"] == b"sizes/exact1m" for e in c.entries))
    r = subprocess.run([str(tool), "ls", car.path], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "sizes/exact1m" in r.stdout.decode()


# ---------------------------------------------------------------- OpenPGP


GPG = shutil.which("gpg")


@pytest.fixture(scope="module", params=["rsa4096", "cv25519"])
def gpg_key(request, gpg_rsa_key, gpg_ed_key):
    key = gpg_rsa_key if request.param == "rsa4096" else gpg_ed_key
    return key["home"], key["fpr"]


def test_openpgp_round_trip(gpg_key, tmp_path):
    """The torture tree through gpg keys; its 5000-entry directory shrinks to 20 because each
    restored OpenPGP file costs one gpg call (HAMT directories are covered by the plain and age packs)."""
    home, fpr = gpg_key
    src = make_tree(tmp_path / "src", many=20)
    try:
        cars = pack(src, tmp_path / "work", make_cipher(gpg_recipients=[fpr], gpg_homedir=home))
        carset = CarSet.open(str(cars))
        assert carset.cipher == "openpgp" and len(carset.tree().files[HUGE].refs) >= 3
        keyring = KeyRing(gpg_homedir=home)
        report = restore(carset, str(tmp_path / "out"), keyring)
        assert report.complete
        assert_same_tree(src, tmp_path / "out")
        reader = FileReader(carset, keyring)
        data = (src / os.fsdecode(HUGE)).read_bytes()
        for start, size in ((0, 10), (3 * MiB - 5, 2 * MiB), (len(data) - 100, 1000)):
            assert reader.read(HUGE, start, size) == data[start : start + size]
    finally:
        make_writable(tmp_path)


# ---------------------------------------------------------------- FileReader


@pytest.fixture(scope="module")
def age_reader(age_pack):
    carset = CarSet.open(str(age_pack["cars"]))
    return FileReader(carset, age_pack["keyring"]), age_pack["src"]


READ_FILES = [HUGE, b"sizes/exact1m", b"sizes/1m-minus1", b"sizes/1m-plus1", b"empty"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_file_reader_random_ranges(age_reader, data):
    reader, src = age_reader
    path = data.draw(st.sampled_from(READ_FILES))
    content = _source_bytes(src, path)
    offset = data.draw(st.integers(0, len(content) + 10))
    size = data.draw(st.one_of(st.integers(0, 70_000), st.integers(0, 3 * MiB)))
    assert reader.read(path, offset, size) == content[offset : offset + size]


_SOURCE_CACHE: dict = {}


def _source_bytes(src: Path, path: bytes) -> bytes:
    key = (str(src), path)
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE[key] = (Path(os.fsdecode(bytes(src) + b"/" + path))).read_bytes()
    return _SOURCE_CACHE[key]


def test_file_reader_part_boundaries_and_threads(age_reader):
    reader, src = age_reader
    content = _source_bytes(src, HUGE)
    fv = reader.tree.files[HUGE]
    # plaintext offsets near every part boundary (stream offsets shifted by the age header/tag overhead)
    points = []
    for ref in fv.ordered()[1:]:
        approx = ref.offset * 65536 // (65536 + 16)
        points += [approx - 70_000, approx - 1, approx, approx + 65_535]
    for p in points:
        assert reader.read(HUGE, p, 200_000) == content[p : p + 200_000]
    rng = random.Random(5)
    jobs = [(rng.randrange(len(content)), rng.randrange(1, 2 * MiB)) for _ in range(48)]

    def job(args):
        off, n = args
        return reader.read(HUGE, off, n) == content[off : off + n]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(job, jobs))
    with pytest.raises(IsADirectoryError):
        reader.read(b"sizes", 0, 1)
    with pytest.raises(FileNotFoundError):
        reader.read(b"nope", 0, 1)
    names = [e.name for e in reader.listdir(b"sizes")]
    assert names == [b"1m-minus1", b"1m-plus1", b"exact1m"]


# ---------------------------------------------------------------- missing bins


def _bin_of_part(carset: CarSet, path: bytes, part: int) -> int:
    return carset.tree().files[path].refs[part].bin


def _files_touching(carset: CarSet, number: int) -> set[bytes]:
    return {e["path"] for e in carset.by_bin[number].entries if e["kind"] == "file"}


def test_missing_bin_restores_complete_files(age_pack, tmp_path):
    full = CarSet.open(str(age_pack["cars"]))
    gone = _bin_of_part(full, HUGE, 2)
    # Files wholly inside the removed bin leave no trace in the other manifests; every file with a part
    # in it and a part elsewhere must be listed as incomplete. (The middle part of the huge file fills
    # its bin, so here that is exactly the set of files with parts in the bin.)
    touching = _files_touching(full, gone)
    vanishing = {p for p in touching if set(full.tree().files[p].bins) == {gone}}
    expected_incomplete = touching - vanishing
    assert vanishing == set()
    cars = copy_cars(age_pack["cars"], tmp_path / "cars")
    os.unlink(cars / f"bin-{gone:06d}.car")
    carset = CarSet.open(str(cars))
    assert carset.missing_bins == [gone]
    out = tmp_path / "out"
    report = restore(carset, str(out), age_pack["keyring"])
    try:
        assert not report.complete and report.exit_code == 3
        assert {e.path for e in report.incomplete} == expected_incomplete
        assert HUGE in expected_incomplete
        assert all(gone in e.missing_bins for e in report.incomplete)
        assert report.missing_bins == [gone]
        assert any("incomplete" in line and "huge.bin" in line for line in report.lines())
        src = age_pack["src"]
        restored = 0
        for path, entry in ((e.path, e) for e in carset.tree() if e.kind == "file"):
            target = Path(os.fsdecode(bytes(out) + b"/" + path))
            if entry.complete:
                assert target.read_bytes() == _source_bytes(src, path), path
                restored += 1
            else:
                assert not target.exists() and not list(target.parent.glob(".pfs-*.partial"))
        assert restored == report.files and restored > 5000 - len(vanishing)
        reader = FileReader(carset, age_pack["keyring"])
        content = _source_bytes(src, HUGE)
        assert reader.read(HUGE, 0, 1000) == content[:1000]  # header and final chunk are present: part 1 reads
        with pytest.raises(IncompleteSet, match=f"bin {gone}"):
            reader.read(HUGE, 0, len(content))
    finally:
        make_writable(out)


def test_missing_bin_plain_ranges(plain_pack, tmp_path):
    full = CarSet.open(str(plain_pack["cars"]))
    fv = full.tree().files[HUGE]
    gone = fv.refs[2].bin
    cars = copy_cars(plain_pack["cars"], tmp_path / "cars")
    os.unlink(cars / f"bin-{gone:06d}.car")
    reader = FileReader(CarSet.open(str(cars)))
    content = _source_bytes(plain_pack["src"], HUGE)
    p1, p2 = fv.refs[1], fv.refs[2]
    assert reader.read(HUGE, 0, p1.length) == content[: p1.length]  # part 1 still reads
    with pytest.raises(IncompleteSet, match=rf"part 2 of {fv.parts}.*missing bin {gone}"):
        reader.read(HUGE, p2.offset + 5, 10)
    entry = reader.lookup(HUGE)
    assert not entry.complete and entry.missing_bins == (gone,) and entry.missing_parts == (2,)


# ---------------------------------------------------------------- damage


def _leaf_section(car_path: Path, skip: int = 1):
    with CarReader(str(car_path)) as r:
        leaves = [s for s in r.sections() if cid_codec(s.cid) == RAW and s.length == MiB]
    return leaves[skip]


def test_flipped_byte(age_pack, tmp_path):
    full = CarSet.open(str(age_pack["cars"]))
    number = _bin_of_part(full, HUGE, 2)
    cars = copy_cars(age_pack["cars"], tmp_path / "cars")
    car_path = cars / f"bin-{number:06d}.car"
    section = _leaf_section(car_path, 1)
    with open(car_path, "r+b") as f:
        f.seek(section.data_offset + 1000)
        byte = f.read(1)
        f.seek(section.data_offset + 1000)
        f.write(bytes([byte[0] ^ 0x40]))
    carset = CarSet.open(str(cars))  # headers are fine: the damage shows on reading
    assert carset.problems == []
    out = tmp_path / "out"
    with pytest.raises(CorruptBlock) as info:
        restore(carset, str(out), age_pack["keyring"])
    message = str(info.value)
    assert str(car_path) in message and f"offset {section.offset}" in message and "\n" not in message
    assert not list(out.rglob(".pfs-*.partial"))
    assert not (out / os.fsdecode(HUGE)).exists()
    make_writable(out)
    reader = FileReader(carset, age_pack["keyring"])
    with pytest.raises(CorruptBlock, match=f"offset {section.offset}"):
        for chunk in reader.iter_verified(HUGE):
            pass
    report = verify(carset, str(cars / "manifest.csv"))
    assert not report.ok
    hits = [p for p in report.problems if str(car_path) in p and f"offset {section.offset}" in p]
    assert hits and "does not match its CID" in hits[0]


def test_truncated_and_foreign_cars(plain_pack, tmp_path):
    cars = copy_cars(plain_pack["cars"], tmp_path / "cars")
    full = CarSet.open(str(cars))
    victim = _bin_of_part(full, HUGE, 2)
    victim_path = cars / f"bin-{victim:06d}.car"
    size = victim_path.stat().st_size
    os.truncate(victim_path, size // 2)
    (cars / "junk.car").write_bytes(b"\x05hello this is not a car")
    # a well-formed UnixFS CAR without a packerfs manifest
    leaf = raw_leaf(b"just a file\n")
    blocks, root = directory_blocks([Entry(b"file.txt", leaf.cid, leaf.tsize)])
    with open(cars / "other.car", "wb") as f:
        writer = CarWriter(f, root.cid)
        writer.add(leaf.cid, b"just a file\n")
        for block in blocks:
            writer.add(block.cid, block.data)
    carset = CarSet.open(str(cars))
    assert len(carset.problems) == 3
    assert any("other.car" in p and "not a packerfs CAR" in p for p in carset.problems)
    for line in carset.problems:
        assert "\n" not in line and "offset" in line
    assert any(str(victim_path) in p for p in carset.problems)
    assert any("junk.car" in p for p in carset.problems)
    assert carset.missing_bins == [victim]  # known from the file name
    reader = FileReader(carset)
    assert reader.read(b"sizes/exact1m", 0, MiB) == _source_bytes(plain_pack["src"], b"sizes/exact1m")
    report = verify(carset)
    assert any(str(victim_path) in p for p in report.problems)


def test_wrong_identity(age_pack, tmp_path):
    other = tmp_path / "other-key.txt"
    write_age_identity(str(other))
    carset = CarSet.open(str(age_pack["cars"]))
    out = tmp_path / "out"
    with pytest.raises(KeyProblem):
        restore(carset, str(out), KeyRing([str(other)]))
    assert not out.exists()
    out.mkdir()
    with pytest.raises(KeyProblem):
        restore(carset, str(out), KeyRing())
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- malicious manifests


DATASET = bytes(range(16))


def craft_car(path: Path, entries: list[dict], contents: dict[bytes, bytes], number: int = 1, extra=()) -> None:
    """A CAR whose root directory links `contents` (raw leaves) and `extra` (name, Block) by plain
    names, with a hand-written manifest."""
    blocks = []
    root_entries = []
    for name, data in contents.items():
        leaf = raw_leaf(data)
        blocks.append((leaf.cid, data))
        root_entries.append(Entry(name, leaf.cid, len(data)))
    for name, block in extra:
        blocks.append((block.cid, block.data))
        root_entries.append(Entry(name, block.cid, len(block.data)))
    encoded = b"".join(manifest_format.encode_entry(e) for e in entries)
    m = manifest_format.encode_manifest(DATASET, number, "plain", [], encoded, len(entries))
    mleaf = raw_leaf(m)
    blocks.append((mleaf.cid, m))
    meta_blocks, meta = directory_blocks([Entry(manifest_format.NAME, mleaf.cid, len(m))])
    blocks += [(b.cid, b.data) for b in meta_blocks]
    root_entries.append(Entry(manifest_format.DIRNAME, meta.cid, meta.tsize))
    root_blocks, root = directory_blocks(root_entries)
    blocks += [(b.cid, b.data) for b in root_blocks]
    with open(path, "wb") as f:
        writer = CarWriter(f, root.cid)
        for cid, data in blocks:
            writer.add(cid, data)


def file_entry(path: bytes, data: bytes, name: bytes | None = None) -> dict:
    return {
        "path": path, "kind": "file", "mode": 0o644, "mtime_ns": BASE_NS, "name": name if name is not None else path,
        "version": 1, "size": len(data), "stream": len(data), "part": 1, "parts": 1, "offset": 0,
        "length": len(data), "cid": raw_leaf(data).cid,
    }


ROOT_ENTRY = {"path": b"", "kind": "dir", "mode": 0o755, "mtime_ns": BASE_NS}
PAYLOAD = b"pwned\n"


def _malicious(case: str, outside: Path) -> list[dict]:
    if case == "dotdot":
        return [ROOT_ENTRY, file_entry(b"../evil", PAYLOAD)]
    if case == "dotdot-inner":
        return [ROOT_ENTRY, {"path": b"a", "kind": "dir", "mode": 0o755, "mtime_ns": BASE_NS},
                file_entry(b"a/../../evil", PAYLOAD)]
    if case == "absolute":
        return [ROOT_ENTRY, file_entry(os.fsencode(outside) + b"/evil", PAYLOAD)]
    if case == "nul":
        return [ROOT_ENTRY, file_entry(b"a\0b", PAYLOAD)]
    if case == "empty-component":
        return [ROOT_ENTRY, file_entry(b"a//evil", PAYLOAD)]
    if case == "bad-name":
        return [ROOT_ENTRY, file_entry(b"fine", PAYLOAD, name=b"../../evil")]
    if case == "symlink-then-file":
        link = symlink_block(os.fsencode(outside))
        return [
            ROOT_ENTRY,
            {"path": b"a", "kind": "symlink", "mode": 0o777, "mtime_ns": BASE_NS, "target": os.fsencode(outside),
             "cid": link.cid},
            file_entry(b"a/evil", PAYLOAD),
        ]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["dotdot", "dotdot-inner", "absolute", "nul", "empty-component", "bad-name", "symlink-then-file"]
)
def test_malicious_manifest_refused(case, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    cars = tmp_path / "cars"
    cars.mkdir()
    entries = _malicious(case, outside)
    extra = [(b"a", symlink_block(os.fsencode(outside)))] if case == "symlink-then-file" else []
    craft_car(cars / "bin-000001.car", entries, {b"evil": PAYLOAD}, extra=extra)
    carset = CarSet.open(str(cars))
    assert carset.problems == []
    out = sandbox / "out"
    with pytest.raises(FormatError) as info:
        restore(carset, str(out), None)
    message = str(info.value)
    assert "bin-000001.car" in message and "manifest entry" in message and "\n" not in message
    assert not out.exists()
    assert sorted(os.listdir(sandbox)) == [] and list(outside.iterdir()) == []
    assert not Path("/evil").exists()
    with pytest.raises(FormatError):
        FileReader(carset)
    report = verify(carset)
    assert any("manifest entry" in p for p in report.problems)


def test_symlink_history_across_bins(tmp_path):
    """A symlink recorded in a later bin supersedes an older directory (its old contents are dropped);
    a file recorded under a symlink of an earlier bin is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    link = symlink_block(os.fsencode(outside))
    symlink = {"path": b"a", "kind": "symlink", "mode": 0o777, "mtime_ns": BASE_NS, "target": os.fsencode(outside),
               "cid": link.cid}
    dir_a = {"path": b"a", "kind": "dir", "mode": 0o755, "mtime_ns": BASE_NS}
    history = tmp_path / "history"
    history.mkdir()
    craft_car(history / "bin-000001.car", [ROOT_ENTRY, dir_a, file_entry(b"a/evil", PAYLOAD)], {b"evil": PAYLOAD}, 1)
    craft_car(history / "bin-000002.car", [ROOT_ENTRY, symlink], {}, 2, extra=[(b"a", link)])
    carset = CarSet.open(str(history))
    assert carset.tree().shadowed == [b"a/evil"]
    out = tmp_path / "out"
    report = restore(carset, str(out), None)
    assert report.symlinks == 1 and report.files == 0 and report.superseded == [b"a/evil"]
    assert os.readlink(out / "a") == str(outside) and list(outside.iterdir()) == []

    attack = tmp_path / "attack"
    attack.mkdir()
    craft_car(attack / "bin-000001.car", [ROOT_ENTRY, symlink], {}, 1, extra=[(b"a", link)])
    craft_car(attack / "bin-000002.car", [ROOT_ENTRY, file_entry(b"a/evil", PAYLOAD)], {b"evil": PAYLOAD}, 2)
    with pytest.raises(FormatError, match=r"bin-000002\.car.*'a/evil'.*symlink in bin 1"):
        restore(CarSet.open(str(attack)), str(tmp_path / "out2"), None)
    assert not (tmp_path / "out2").exists() and list(outside.iterdir()) == []


def test_writer_never_walks_through_symlinks(tmp_path):
    """Defence in depth below the manifest checks: directories are opened with O_NOFOLLOW."""
    from packerfs.unpack.restore import _Dirs

    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(outside), out / "a")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    dirs = _Dirs(fd, os.fsencode(out))
    try:
        with pytest.raises(PackerfsError, match="refusing to write through it"):
            dirs.get(b"a/b")
    finally:
        dirs.close()
        os.close(fd)


def test_crafted_benign_car_restores(tmp_path):
    """The crafting helper makes CARs the reader accepts: the refusals above are about the paths."""
    cars = tmp_path / "cars"
    cars.mkdir()
    craft_car(cars / "bin-000001.car", [ROOT_ENTRY, file_entry(b"evil", PAYLOAD)], {b"evil": PAYLOAD})
    carset = CarSet.open(str(cars))
    report = restore(carset, str(tmp_path / "out"), None)
    assert report.files == 1 and (tmp_path / "out" / "evil").read_bytes() == PAYLOAD
    assert verify(carset).ok


def test_preexisting_symlink_in_output_is_not_followed(plain_pack, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(outside), out / "sizes")
    carset = CarSet.open(str(plain_pack["cars"]))
    with pytest.raises(PackerfsError, match="already exists"):
        restore(carset, str(out), None)
    assert os.listdir(out) == ["sizes"] and list(outside.iterdir()) == []
    try:
        restore(carset, str(out), None, force=True)
        assert not os.path.islink(out / "sizes") and (out / "sizes" / "exact1m").is_file()
        assert list(outside.iterdir()) == []
    finally:
        make_writable(out)


# ---------------------------------------------------------------- existing output


def test_existing_output_needs_force(plain_pack, tmp_path):
    carset = CarSet.open(str(plain_pack["cars"]))
    out = tmp_path / "out"
    victim = out / "sizes" / "exact1m"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"mine")
    with pytest.raises(PackerfsError, match="exact1m") as info:
        restore(carset, str(out), None)
    assert "\n" not in str(info.value)
    assert victim.read_bytes() == b"mine"
    assert sorted(p.name for p in out.rglob("*")) == ["exact1m", "sizes"]  # nothing else written
    try:
        report = restore(carset, str(out), None, force=True)
        assert report.complete
        assert_same_tree(plain_pack["src"], out)
    finally:
        make_writable(out)


# ---------------------------------------------------------------- verify and commP


def test_verify_with_manifest_csv(plain_pack, tmp_path):
    cars = copy_cars(plain_pack["cars"], tmp_path / "cars")
    carset = CarSet.open(str(cars))
    report = verify(carset, str(cars / "manifest.csv"))
    assert report.ok, report.problems
    assert report.commp_checked == len(carset.cars) and report.blocks > 5000
    rows = list(csv.DictReader(open(cars / "manifest.csv")))
    bad = rows[1]["car_file"]
    rows[1]["piece_cid"] = rows[0]["piece_cid"]
    with open(cars / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = verify(CarSet.open(str(cars)), str(cars / "manifest.csv"))
    assert len(report.problems) == 1
    assert bad in report.problems[0] and "piece CID" in report.problems[0]


def test_mixed_datasets(tmp_path):
    srcs = []
    for i in range(2):
        src = tmp_path / f"src{i}"
        _write(src / f"file{i}", b"data %d\n" % i)
        srcs.append(src)
    a = pack(srcs[0], tmp_path / "a", make_cipher(no_encryption=True))
    b = pack(srcs[1], tmp_path / "b", make_cipher(no_encryption=True))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(a / "bin-000001.car", mixed / "a.car")
    shutil.copy(b / "bin-000001.car", mixed / "b.car")
    with pytest.raises(UsageError, match="2 different data sets"):
        CarSet.open(str(mixed))
    dataset = CarSet.open(str(a)).dataset
    chosen = CarSet.open(str(mixed), dataset=dataset.hex())
    assert [r.path for r in ls(chosen)] == [b"", b"file0"] and len(chosen.ignored) == 1
    # the same bin twice (a copy) is harmless
    dup = CarSet.open([str(a / "bin-000001.car"), str(mixed / "a.car")])
    assert len(dup.cars) == 1 and len(dup.duplicates) == 1 and dup.problems == []
