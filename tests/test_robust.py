"""Issue 9: hostile or odd inputs to verify, ls, unpack and the CAR index give one-line errors.

One test per defect: FIFOs and other non-regular files named *.car, long names and temporary
names, root and manifest CIDs of unknown codecs, --dataset / --bin-size usage errors, bin numbers
and part counts that would size huge lists, negative sizes, empty sets, bytes reprs in messages,
and modes applied to an existing output directory or carrying setuid/setgid/world-write bits.

The sets are hand-built by tools/fuzz.py's builder (small, plain, three bins). Anything that
could hang or allocate without bound on the code before the fix runs in a subprocess with a
timeout and an address-space limit.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import fuzz  # noqa: E402  (tools/fuzz.py: the CAR builder)
from conftest import within  # noqa: E402
from test_mount import OP_TIMEOUT, mount  # noqa: E402  (the mount helpers)

from packerfs import manifest as manifest_format  # noqa: E402
from packerfs.errors import FormatError, PackerfsError, UsageError  # noqa: E402
from packerfs.ipld.car import CarReader  # noqa: E402
from packerfs.ipld.cid import cid_to_str, encode_uvarint  # noqa: E402
from packerfs.ipld.unixfs import raw_leaf  # noqa: E402
from packerfs.unpack import CarSet, ls, restore, verify  # noqa: E402

TIMEOUT = 60
MEMORY = 1536 << 20
ENV = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH") or str(ROOT), NO_COLOR="1", COLUMNS="200")


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def cli(*args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """The CLI in a subprocess: a hang fails the test (TimeoutExpired) instead of hanging it."""
    return subprocess.run(
        [sys.executable, "-m", "packerfs.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env=ENV, preexec_fn=_limit, stdin=subprocess.DEVNULL,
    )


def python(code: str, timeout: float = TIMEOUT, limit: bool = True) -> subprocess.CompletedProcess:
    """A snippet in a subprocess, under a timeout and (unless it maps LMDB) the address-space limit."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=ENV,
        preexec_fn=_limit if limit else None, stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("packerfs: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def seed_cars(dest: Path, big: bool = False, **manifests) -> Path:
    """The fuzzer's seed set in `dest`; `bin2=callable(manifest)` edits a manifest before building."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, (manifest, contents, links, extra) in fuzz.seed_set(big).items():
        edit = manifests.get(name.replace("-", "").removesuffix(".car"))
        if edit is not None:
            manifest = fuzz.json_copy(manifest)
            edit(manifest)
        (dest / name).write_bytes(fuzz.build_car(manifest, contents, links, extra))
    return dest


def one_file_car(dest: Path, entries: list[dict], contents: dict[bytes, bytes], number: int = 1) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    m = {"packerfs": 1, "dataset": fuzz.DATASET, "bin": number, "cipher": "plain", "recipients": [], "entries": entries}
    (dest / f"bin-{number}.car").write_bytes(fuzz.build_car(m, contents))
    return dest


def _entry(path: bytes, data: bytes, mode: int = 0o644) -> dict:
    return fuzz._file(path, data, version=sum(path), mode=mode)  # a version number per path


# codec 0x1032: in no multicodec table
UNKNOWN_CODEC_CID = b"\x01" + encode_uvarint(0x1032) + b"\x12\x20" + bytes(32)
ROOT_DIR = {"path": b"", "kind": "dir", "mode": 0o755, "mtime_ns": fuzz.NS}


# ---------------------------------------------------------------- section 2: non-regular *.car


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory"])
@pytest.mark.parametrize("command", ["ls", "verify", "unpack"])
def test_non_regular_car_is_skipped_not_waited_on(tmp_path, kind, command):
    cars = seed_cars(tmp_path / "cars")
    odd = cars / "bin-4.car"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(odd))
    else:
        odd.mkdir()
    args = [command, cars] + ([tmp_path / "out"] if command == "unpack" else [])
    proc = cli(*args)  # hung forever on a FIFO before
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (1, 3), proc.stderr
    assert "bin-4.car: not a regular file" in proc.stderr


def test_fifo_is_skipped_by_the_lmdb_index(tmp_path):
    cars = seed_cars(tmp_path / "cars")
    os.mkfifo(cars / "bin-4.car")
    proc = python(f"""
        from packerfs.unpack import CarSet
        from packerfs.unpack.lmdb_index import LmdbBlockIndex
        for _ in range(2):  # the second run takes the regular CARs from the index
            s = CarSet.open({str(cars)!r}, index=LmdbBlockIndex.open({str(tmp_path / 'state')!r}))
            print(len(s.cars), s.problems)
            s.close()
    """, limit=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("3 [") and "not a regular file (a FIFO)" in line for line in lines)


# ---------------------------------------------------------------- section 2: temporary names


@pytest.mark.parametrize("length", [239, 250, 255])
def test_long_names_restore(tmp_path, length):
    name = b"n" * length
    data = b"long name\n"
    cars = one_file_car(tmp_path / "cars", [ROOT_DIR, _entry(name, data)], {name: data})
    with CarSet.open(cars) as carset:
        report = restore(carset, str(tmp_path / "out"), None)  # ENAMETOOLONG on `NAME.packerfs-partial` before
    assert report.files == 1
    assert (tmp_path / "out" / os.fsdecode(name)).read_bytes() == data
    assert os.listdir(tmp_path / "out") == [os.fsdecode(name)]


def test_failed_file_leaves_no_temporary_file(tmp_path):
    good, bad = b"fine\n", b"will be damaged\n"
    cars = one_file_car(tmp_path / "cars", [ROOT_DIR, _entry(b"good", good), _entry(b"bad", bad)],
                        {b"good": good, b"bad": bad})
    car = cars / "bin-1.car"
    blob = car.read_bytes()
    car.write_bytes(blob.replace(bad, b"WILL be damaged\n"))  # same length, wrong hash
    with CarSet.open(cars) as carset, pytest.raises(PackerfsError):
        restore(carset, str(tmp_path / "out"), None)
    left = os.listdir(tmp_path / "out")
    assert not [n for n in left if n.endswith(".partial")], left


# ---------------------------------------------------------------- section 3: CIDs of unknown codecs


def test_root_cid_of_unknown_codec_is_one_problem(tmp_path):
    cars = seed_cars(tmp_path / "cars")
    car = cars / "bin-3.car"
    blob = bytearray(car.read_bytes())
    blob[15] ^= 0xFF  # the root CID's codec
    car.write_bytes(bytes(blob))
    with CarSet.open(cars) as carset:  # a multiformats exception broke the whole set before
        assert [c.bin for c in carset.cars] == [1, 2]
        assert len(carset.problems) == 1 and "bin-3.car" in carset.problems[0]
        lines = verify(carset).lines()
        assert any("bin-3.car" in line for line in lines)
    for command in ("ls", "verify"):
        proc = cli(command, cars)
        assert "Traceback" not in proc.stderr and proc.returncode in (0, 1, 3), proc.stderr


def test_cid_to_str_never_raises():
    assert cid_to_str(UNKNOWN_CODEC_CID).startswith("b")
    assert cid_to_str(b"\x01\x70\xb2\x20\x20" + bytes(32)).startswith("b")  # unknown hash code
    assert cid_to_str(b"\xff\xff").startswith("<malformed CID")
    cid = raw_leaf(b"x").cid
    from multiformats import CID

    assert cid_to_str(cid) == str(CID.decode(cid).set(base="base32"))


def test_manifest_cid_of_unknown_codec_is_a_problem_line(tmp_path):
    def edit(m):
        m["entries"][0]["cid"] = UNKNOWN_CODEC_CID

    cars = seed_cars(tmp_path / "cars", bin3=edit)
    with CarSet.open(cars) as carset:
        report = verify(carset)  # cid_to_str raised a multiformats error before
    assert not report.ok and any("other.dat" in p for p in report.problems)
    proc = cli("verify", cars)
    assert "Traceback" not in proc.stderr and proc.returncode == 1, proc.stderr
    proc = cli("unpack", cars, tmp_path / "out")
    assert "Traceback" not in proc.stderr and proc.returncode in (1, 3), proc.stderr


# ---------------------------------------------------------------- section 3: usage errors


@pytest.mark.parametrize("dataset", ["zz", "0011", "0" * 31])
def test_bad_dataset_is_a_usage_error(tmp_path, dataset):
    cars = seed_cars(tmp_path / "cars")
    for command in ("ls", "verify"):
        proc = cli(command, cars, "--dataset", dataset)  # ValueError traceback before ("zz")
        assert proc.returncode == 2, proc.stderr
        assert "data set id" in one_line_error(proc)
    with pytest.raises(UsageError):
        CarSet.open(cars, dataset=bytes(3))


def test_bin_size_with_too_many_digits_is_a_usage_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    proc = cli("pack", src, tmp_path / "out", "--no-encryption", "-t", tmp_path / "state", "--bin-size", "1" * 5000)
    assert proc.returncode == 2, proc.stderr
    assert len(one_line_error(proc)) < 300


# ---------------------------------------------------------------- section 4: unbounded claims


def test_empty_car_with_a_huge_bin_number_in_its_name(tmp_path):
    cars = seed_cars(tmp_path / "cars")
    (cars / "bin-99999999999.car").write_bytes(b"")
    for command in ("ls", "verify"):
        proc = cli(command, cars)  # range(1, 99999999999) before: MemoryError or tens of GB
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode in (1, 3) and "bin-99999999999.car" in proc.stderr


@pytest.mark.parametrize("field,value", [("bin", 10**12), ("bin", 2**32 + 1), ("parts", 10**12), ("parts", 2**32)])
def test_huge_manifest_numbers_are_refused(tmp_path, field, value):
    def edit(m):
        if field == "bin":
            m["bin"] = value
        else:
            m["entries"][0]["parts"] = value

    cars = seed_cars(tmp_path / "cars", bin3=edit)
    proc = python(f"""
        from packerfs.unpack import CarSet, verify, ls
        s = CarSet.open({str(cars)!r})
        print([c.bin for c in s.cars])
        print(s.problems)
        verify(s)
        ls(s)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bins, problems = proc.stdout.splitlines()[:2]
    assert bins == "[1, 2]" and "bin-3.car" in problems and "bad manifest" in problems


def test_bin_gap_is_bounded(tmp_path):
    """A bin number below MAX_BIN but absurdly far above the rest is refused, not listed as missing."""
    def edit(m):
        m["bin"] = 2**31

    cars = seed_cars(tmp_path / "cars", bin3=edit)
    proc = python(f"""
        from packerfs.unpack import CarSet
        s = CarSet.open({str(cars)!r})
        print([c.bin for c in s.cars], len(s.missing_bins))
        print(s.problems)
    """)  # a list of 2**31 missing bins before
    assert proc.returncode == 0, proc.stderr[-2000:]
    bins, problems = proc.stdout.splitlines()[:2]
    assert bins == "[1, 2] 0" and "implausibly many missing bins" in problems


def test_manifest_bounds_in_decode():
    def manifest(**entry):
        e = dict(fuzz._file(b"f", b"data", version=1), **entry)
        m = {"packerfs": 1, "dataset": fuzz.DATASET, "bin": 1, "cipher": "plain", "recipients": [], "entries": [e]}
        return fuzz.encode_manifest_obj(m)

    assert manifest_format.decode_manifest(manifest())["entries"][0]["size"] == 4
    for bad in (
        {"size": -1}, {"stream": -4}, {"offset": -1}, {"length": -1}, {"version": -1}, {"mode": 0o17777},
        {"mode": -1}, {"parts": 10**12}, {"parts": 3}, {"path": b"x" * 256}, {"name": b"y" * 400},
        {"path": b"a/" * 40000 + b"b"}, {"length": 65 << 30, "stream": 65 << 30, "size": 65 << 30},
    ):
        with pytest.raises(manifest_format.ManifestError):
            manifest_format.decode_manifest(manifest(**bad))


# ---------------------------------------------------------------- section 4: negative sizes


def test_negative_size_is_refused_at_decode(tmp_path):
    def edit(m):
        m["entries"][0]["size"] = -5

    cars = seed_cars(tmp_path / "cars", bin3=edit)
    with CarSet.open(cars) as carset:
        assert [c.bin for c in carset.cars] == [1, 2]
        report = verify(carset)  # min() of an empty sequence before
    assert any("bin-3.car" in p and "size" in p for p in report.problems)


# ---------------------------------------------------------------- section 4: empty sets


@pytest.mark.parametrize("command", ["verify", "ls", "unpack"])
def test_empty_directory_is_an_error(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [command, empty] + ([tmp_path / "out"] if command == "unpack" else [])
    proc = cli(*args)  # verify said OK and exited 0 before
    assert proc.returncode != 0
    assert "no *.car files" in one_line_error(proc)
    with pytest.raises(PackerfsError):
        CarSet.open(empty)


def test_set_of_only_unusable_cars_has_no_tree(tmp_path):
    cars = tmp_path / "cars"
    cars.mkdir()
    (cars / "bin-1.car").write_bytes(b"garbage")
    with CarSet.open(cars) as carset:
        with pytest.raises(PackerfsError, match="no usable packerfs CAR"):
            ls(carset)  # an empty listing, exit 0 before
        assert not verify(carset).ok


# ---------------------------------------------------------------- section 5: messages


def test_messages_show_paths_not_bytes_reprs(tmp_path):
    junk = tmp_path / "junk.car"
    junk.write_bytes(b"\x05hello")
    with pytest.raises(FormatError) as caught:
        CarReader(os.fsencode(junk))
    assert "b'" not in str(caught.value) and str(junk) in str(caught.value)
    assert "b'" not in str(FormatError("bad", path=os.fsencode(junk)))
    cars = seed_cars(tmp_path / "cars")
    (tmp_path / "file").write_bytes(b"")
    with CarSet.open([os.fsencode(cars)]) as carset, pytest.raises(PackerfsError) as caught:
        restore(carset, str(tmp_path / "file" / "out"), None)  # a raw NotADirectoryError (b'...') before
    assert "b'" not in str(caught.value)


# ---------------------------------------------------------------- section 5: modes


def _mode_set(tmp_path: Path) -> Path:
    data = b"#!/bin/sh\n"
    entries = [
        dict(ROOT_DIR, mode=0o7777),
        {"path": b"d", "kind": "dir", "mode": 0o2777, "mtime_ns": fuzz.NS},
        _entry(b"suid", data, mode=0o6777),
    ]
    return one_file_car(tmp_path / "cars", entries, {b"suid": data})


def test_existing_output_keeps_its_mode_and_unsafe_bits_are_dropped(tmp_path):
    cars = _mode_set(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o750)
    with CarSet.open(cars) as carset:
        restore(carset, str(out), None)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750  # 7777 before
    assert stat.S_IMODE(os.stat(out / "suid").st_mode) == 0o775
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o775
    fresh = tmp_path / "fresh"
    with CarSet.open(cars) as carset:
        restore(carset, str(fresh), None)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o1775  # a new out_dir gets the root's mode, made safe


@pytest.mark.skipif(os.geteuid() != 0, reason="keeping setuid/setgid bits needs root")
def test_same_permissions_keeps_every_bit(tmp_path):
    cars = _mode_set(tmp_path)
    with CarSet.open(cars) as carset:
        restore(carset, str(tmp_path / "out"), None, same_permissions=True)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "suid").st_mode) == 0o6777
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "d").st_mode) == 0o2777


def test_repeated_leaf_cannot_expand_a_small_car(tmp_path):
    """A part whose DAG links one 4 KiB leaf 1000 times claims 4 MB that the 5 KB CAR cannot hold."""
    from packerfs.ipld.cid import DAG_PB, make_cid
    from packerfs.ipld.dagpb import FILE as UNIXFS_FILE, PBLink, UnixFSData, encode_node

    leaf = os.urandom(4096)
    leaf_cid = raw_leaf(leaf).cid
    node = encode_node([PBLink(leaf_cid, b"", len(leaf))] * 1000,
                       UnixFSData(type=UNIXFS_FILE, filesize=4096 * 1000, blocksizes=[4096] * 1000).encode())
    cid = make_cid(DAG_PB, node)
    entry = dict(fuzz._file(b"bomb", b"", version=1), size=4096000, stream=4096000, length=4096000, cid=cid)
    m = {"packerfs": 1, "dataset": fuzz.DATASET, "bin": 1, "cipher": "plain", "recipients": [],
         "entries": [ROOT_DIR, entry]}
    cars = tmp_path / "cars"
    cars.mkdir()
    (cars / "bin-1.car").write_bytes(fuzz.build_car(m, {}, {b"bomb": (cid, node)}, [(leaf_cid, leaf)]))
    with CarSet.open(cars) as carset:
        assert not carset.cars and "bytes of file parts in a CAR of" in carset.problems[0]


@pytest.mark.fuse
def test_reverse_mount_skips_a_fifo(tmp_path):
    """`mount --reverse` over a CAR directory holding a FIFO: it mounts (it hung in the scan before)."""
    cars = seed_cars(tmp_path / "cars")
    os.mkfifo(cars / "bin-4.car")
    with mount(cars, tmp_path / "mnt", tmp_path / "state", "--reverse"):
        names = within(OP_TIMEOUT, os.listdir, tmp_path / "mnt")
        assert "hello.txt" in names and "other.dat" in names
        assert within(OP_TIMEOUT, (tmp_path / "mnt" / "hello.txt").read_bytes) == b"hello, world\n"
