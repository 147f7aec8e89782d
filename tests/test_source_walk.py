"""The source walk and source file opens: no symlink followed, no hang, no depth limit, no self-packing.

Every test that could hang on a regression runs the risky part in a subprocess with a timeout
or in a daemon thread joined with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, packerfs, within, write_random
from packerfs.crypt import make_cipher
from packerfs.errors import PackerfsError, SourceChanged, UsageError
from packerfs.pack import Engine
from packerfs.source.files import open_source_file
from packerfs.source.walk import excluded_paths, walk
from packerfs.source.walk import DIR, FILE, SYMLINK

MiB = 1 << 20
BIN = 8 * MiB
MARKER = b"OUTSIDE-THE-SOURCE-7f3c9b1e"  # only ever written outside SRC
TIMEOUT = 60




def run_python(code: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=timeout
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("packerfs: error: ")]
    assert len(lines) == 1, text
    return lines[0]


def engine_pack(src: Path, state: Path, out: Path | None = None, advance=None):
    engine = Engine.open(str(src), str(state), make_cipher(no_encryption=True), BIN)
    try:
        engine.scan(advance=advance, car_dir=str(out) if out else None)
        if out is not None:
            engine.write(str(out))
        return engine.bins()
    finally:
        engine.close()


def car_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.glob("*.car")))


def outside_tree(tmp_path: Path) -> Path:
    """A directory outside SRC, readable by root only, holding a marker file named like a source file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(MARKER * 100)
    (outside / "secret").chmod(0o600)
    outside.chmod(0o700)
    return outside


class Swapper(threading.Thread):
    """Swaps SRC/sub between the real directory and a symlink to `outside`, `rounds` times."""

    def __init__(self, src: Path, outside: Path, rounds: int = 200):
        super().__init__(daemon=True)
        self.src, self.outside, self.rounds = src, outside, rounds
        self.done = 0

    def run(self):
        sub, away = self.src / "sub", self.src / "sub.away"
        for _ in range(self.rounds):
            os.rename(sub, away)
            os.symlink(self.outside, sub)
            time.sleep(0.0005)
            os.unlink(sub)
            os.rename(away, sub)
            time.sleep(0.0005)
            self.done += 1


# ---------------------------------------------------------------- symlink races


def test_walk_never_follows_a_directory_swapped_for_a_symlink(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / "sub" / f"f{i:02d}").write_bytes(b"inside")
    (src / "sub" / "secret").write_bytes(b"inside, same name")
    outside = outside_tree(tmp_path)
    swapper = Swapper(src, outside)
    swapper.start()
    walks = 0
    deadline = time.monotonic() + TIMEOUT
    while swapper.is_alive() and time.monotonic() < deadline:
        problems: list = []
        for entry in walk(str(src), problems):
            assert not entry.path.startswith(b"sub/") or entry.name != b"secret" or entry.size == 17, entry
            if entry.path == b"sub" and entry.kind == SYMLINK:
                assert entry.target == os.fsencode(outside)
        # a swap between the lstat and the open is a problem for that directory, never a followed link
        assert all(p.path in (b"sub", b"sub.away") for p in problems), problems
        walks += 1
    swapper.join(TIMEOUT)
    assert not swapper.is_alive() and swapper.done == 200
    assert walks > 10


def test_pack_never_includes_bytes_from_outside_while_swapping(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / "sub" / f"f{i:02d}").write_bytes(b"inside %d" % i)
    (src / "sub" / "secret").write_bytes(b"inside" * 100)
    outside = outside_tree(tmp_path)
    swapper = Swapper(src, outside)
    swapper.start()
    packs = 0
    deadline = time.monotonic() + TIMEOUT
    while swapper.is_alive() and time.monotonic() < deadline:
        out = tmp_path / f"out{packs}"
        try:
            within(TIMEOUT, engine_pack, src, tmp_path / f"state{packs}", out)
        except PackerfsError as exc:  # a race the scan saw (e.g. a directory that changed) is one line
            assert "\n" not in str(exc)
        if out.exists():
            assert MARKER not in car_bytes(out)
            assert MARKER not in b"".join(p.read_bytes() for p in out.glob("*.partial"))
        packs += 1
    swapper.join(TIMEOUT)
    assert not swapper.is_alive()
    assert packs >= 1


def test_scan_refuses_a_directory_swapped_for_a_symlink_before_its_files_are_opened(tmp_path):
    """Deterministic: while the scan reads sub/a, sub becomes a symlink to an outside copy with the same
    names, sizes and mtimes, but other bytes. The scan opens files through PosixSource (open_source_file)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_random(src / "sub" / "a", 3 * MiB, 1)
    (src / "sub" / "b").write_bytes(b"inside" * 1000)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a").write_bytes((src / "sub" / "a").read_bytes())
    (outside / "b").write_bytes(MARKER + b"x" * (6000 - len(MARKER)))
    for name in ("a", "b"):
        st = os.stat(src / "sub" / name)
        os.utime(outside / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = tmp_path / "out"
    code = f"""
import os, sys
from packerfs.crypt import make_cipher
from packerfs.errors import PackerfsError
from packerfs.pack import Engine
src, outside = {str(src)!r}, {str(outside)!r}
swapped = []
def advance(n):
    if not swapped:
        os.rename(os.path.join(src, "sub"), os.path.join(src, "sub.away"))
        os.symlink(outside, os.path.join(src, "sub"))
        swapped.append(1)
e = Engine.open(src, {str(tmp_path / "state")!r}, make_cipher(no_encryption=True), {BIN})
try:
    e.scan(advance=advance, car_dir={str(out)!r})
    e.write({str(out)!r})
    print("packed")
except PackerfsError as exc:
    print("refused:", exc)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    everything = b"".join(p.read_bytes() for p in out.iterdir()) if out.exists() else b""
    assert MARKER not in everything
    assert result.stdout.startswith(b"refused:"), result.stdout
    assert b"sub/b" in result.stdout


def test_reader_refuses_a_directory_swapped_for_a_symlink_to_an_identical_copy(tmp_path):
    src = tmp_path / "src"
    write_random(src / "sub" / "deeper" / "file", 2 * MiB + 5, 7)
    (src / "top").write_bytes(b"top")
    engine = Engine.open(str(src), str(tmp_path / "state"), make_cipher(no_encryption=True), BIN)
    try:
        engine.scan()
        [result] = [b for b in engine.bins() if b["files"]]
        size = result["car_size"]
        assert len(engine.reader().read(result["bin"], 0, size)) == size  # the source as scanned reads fine
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(src / "sub"), str(copy)], check=True, timeout=TIMEOUT)
        os.rename(src / "sub", tmp_path / "sub.away")
        os.symlink(copy, src / "sub")
        with pytest.raises(SourceChanged) as caught:
            within(TIMEOUT, engine.reader().read, result["bin"], 0, size)
        assert caught.value.path == os.fsdecode(os.path.realpath(src)) + "/sub/deeper/file"
        assert "\n" not in str(caught.value) and "sub/deeper/file" in str(caught.value)
        with pytest.raises(SourceChanged):
            open_source_file(os.fsencode(src), b"sub/deeper/file")
        # the last component a symlink (to an identical file) is refused the same way
        os.unlink(src / "sub")
        os.rename(tmp_path / "sub.away", src / "sub")
        os.rename(src / "sub" / "deeper" / "file", tmp_path / "file.away")
        os.symlink(copy / "deeper" / "file", src / "sub" / "deeper" / "file")
        with pytest.raises(SourceChanged, match="symbolic link"):
            within(TIMEOUT, engine.reader().read, result["bin"], 0, size)
    finally:
        engine.close()


# ---------------------------------------------------------------- FIFOs and other special files


def test_open_source_file_refuses_a_fifo_promptly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    start = time.monotonic()
    with pytest.raises(SourceChanged, match="FIFO") as caught:
        within(10, open_source_file, os.fsencode(src), b"pipe")
    assert time.monotonic() - start < 5
    assert caught.value.path == str(src / "pipe") and "\n" not in str(caught.value)
    (src / "dir").mkdir()
    with pytest.raises(SourceChanged, match="directory"):
        open_source_file(os.fsencode(src), b"dir")
    with pytest.raises(FileNotFoundError):
        open_source_file(os.fsencode(src), b"absent")
    (src / "ok").write_bytes(b"data")
    fd = open_source_file(os.fsencode(src), b"ok")
    try:
        import fcntl

        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)


def test_reader_refuses_a_file_swapped_for_a_fifo(tmp_path):
    src = tmp_path / "src"
    write_random(src / "f", MiB + 3, 2)
    engine = Engine.open(str(src), str(tmp_path / "state"), make_cipher(no_encryption=True), BIN)
    try:
        engine.scan()
        [result] = [b for b in engine.bins() if b["files"]]
        os.unlink(src / "f")
        os.mkfifo(src / "f")
        with pytest.raises(SourceChanged, match="FIFO"):
            within(10, engine.reader().read, result["bin"], 0, result["car_size"])
    finally:
        engine.close()


def test_scan_reports_a_file_swapped_for_a_fifo_instead_of_hanging(tmp_path):
    """`a` fills the first bin, so the scan seals it after walking `b` and before opening `b`; the seal
    callback puts a FIFO in b's place. The scan opens files through PosixSource (open_source_file)."""
    src = tmp_path / "src"
    write_random(src / "a", BIN - 600 * 1024, 1)
    write_random(src / "b", MiB + 1000, 2)
    code = f"""
import os
from packerfs.crypt import make_cipher
from packerfs.errors import PackerfsError
from packerfs.pack import Engine
b = {str(src / "b")!r}
def on_seal(result):
    if os.path.isfile(b):
        os.unlink(b)
        os.mkfifo(b)
e = Engine.open({str(src)!r}, {str(tmp_path / "state")!r}, make_cipher(no_encryption=True), {BIN})
try:
    e.scan(on_seal=on_seal)
    print("packed", os.path.isfile(b))
except PackerfsError as exc:
    print(type(exc).__name__, exc)
"""
    try:
        result = run_python(code, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the scan hung opening a FIFO put in place of a source file")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"SourceChanged "), result.stdout
    assert b"/b: is now a FIFO" in result.stdout


def test_walk_skips_special_files_with_a_warning(tmp_path):
    import socket

    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))
        (src / "file").write_bytes(b"x")
        problems: list = []
        entries = list(walk(str(src), problems))
    finally:
        sock.close()
    assert [e.path for e in entries] == [b"", b"file"]
    assert sorted((p.path, p.reason, p.fatal) for p in problems) == [
        (b"fifo", "skipped FIFO", False),
        (b"sock", "skipped socket", False),
    ]


# ---------------------------------------------------------------- depth


DEPTH = 1000
LEVEL = b"level"  # 1000 levels of "level/": a path of 6000 bytes, beyond PATH_MAX (4096)


def make_deep_tree(root: Path) -> bytes:
    """root/level/level/…/level/{bottom, link}, made through directory descriptors; the bottom file's path."""
    root.mkdir()
    (root / "top").write_bytes(b"top file")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir(LEVEL, dir_fd=fd)
            below = os.open(LEVEL, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        bottom = os.open(b"bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(bottom, b"at the bottom\n" * 1000)
        os.close(bottom)
        os.symlink(b"bottom", b"link", dir_fd=fd)
    finally:
        os.close(fd)
    return b"/".join([LEVEL] * DEPTH + [b"bottom"])


@pytest.fixture
def deep(tmp_path):
    made = []
    yield lambda name: made.append(tmp_path / name) or (tmp_path / name)
    for path in made:  # shutil.rmtree recurses once per level
        subprocess.run(["rm", "-rf", str(path)], timeout=TIMEOUT)


def test_walk_handles_a_tree_deeper_than_the_recursion_limit_and_path_max(deep):
    src = deep("src")
    bottom = make_deep_tree(src)
    assert len(os.fsencode(src)) + 1 + len(bottom) > 4096
    problems: list = []
    entries = within(TIMEOUT, lambda: list(walk(str(src), problems)))
    assert problems == []
    paths = [e.path for e in entries]
    assert paths[:3] == [b"", b"level", b"level/level"]
    link = bottom.rsplit(b"/", 1)[0] + b"/link"
    assert paths[-3:] == [bottom, link, b"top"]  # "top" sorts after "level": last at the root
    kinds = {e.path: e for e in entries}
    assert kinds[bottom].kind == FILE and kinds[bottom].size == 14000
    assert kinds[link].kind == SYMLINK and kinds[link].target == b"bottom"
    assert sum(e.kind == DIR for e in entries) == DEPTH + 1
    fd = open_source_file(os.fsencode(src), bottom)
    try:
        assert os.read(fd, 14) == b"at the bottom\n"
    finally:
        os.close(fd)
    # resuming deep inside the tree
    resume = b"/".join([LEVEL] * 500)
    again = list(walk(str(src), [], start_after=resume))
    assert again == entries[paths.index(resume) + 1 :]


def test_walk_order_is_canonical_with_few_open_directories(tmp_path, monkeypatch):
    """With 2 descriptors the walk re-opens ancestors through ".."; order and entries stay the same."""
    import importlib

    walk_module = importlib.import_module("packerfs.source.walk")

    src = tmp_path / "src"
    for path in ("a/b/c/d/e/f", "a/b/x/y", "a/c", "b/c/d", "z"):
        (src / path).mkdir(parents=True)
        (src / path / "file").write_bytes(path.encode())
    (src / "a" / "b" / "c" / "name\xe9").write_bytes(b"")
    expected = list(walk(str(src), []))
    monkeypatch.setattr(walk_module, "OPEN_DIRS", 2)
    assert list(walk(str(src), [])) == expected
    assert [e.path for e in expected] == sorted(
        (e.path for e in expected), key=lambda p: p.split(b"/")
    )


def test_deep_tree_packs_and_unpacks(deep, tmp_path):
    src = deep("src")
    bottom = make_deep_tree(src)
    out, state, restored = tmp_path / "out", tmp_path / "state", deep("restored")
    packerfs("pack", src, out, "--no-encryption", "--bin-size", "8MiB", "-t", state, timeout=300)
    listing = json.loads(packerfs("ls", out, "--json", timeout=120).stdout)
    assert any(row["path"] == os.fsdecode(bottom) for row in listing)
    result = packerfs("unpack", out, restored, check=False, timeout=300)
    assert b"Traceback" not in result.stderr, result.stderr.decode()[-3000:]
    if result.returncode != 0:
        pytest.xfail(f"unpack of a path longer than PATH_MAX fails: {one_line(result)}")
    fd = open_source_file(os.fsencode(restored), bottom)
    try:
        assert os.read(fd, 20000) == b"at the bottom\n" * 1000
    finally:
        os.close(fd)
    original = [(e.path, e.kind, e.size, e.target) for e in walk(str(src), [])]
    back = [(e.path, e.kind, e.size, e.target) for e in walk(str(restored), [])]
    assert back == original


# ---------------------------------------------------------------- OUT, STATE, MNT inside SRC


def test_excluded_paths():
    assert excluded_paths(b"/data", b"/data/out", "/elsewhere", None, ("state directory", "/data/a/b")) == {
        b"out", b"a/b"
    }
    assert excluded_paths("/", "/x/y") == {b"x/y"}
    with pytest.raises(UsageError, match="output directory /data/ is the source directory /data itself"):
        excluded_paths("/data", ("output directory", "/data/"))
    with pytest.raises(UsageError, match="contains the source directory"):
        excluded_paths("/data/sub", "/data")
    with pytest.raises(UsageError, match="contains the source directory"):
        excluded_paths("/data", "/")
    assert excluded_paths("/data", "/data2") == set()  # a sibling sharing a prefix


def test_walk_excludes(tmp_path):
    src = tmp_path / "src"
    for path in ("keep/x", "out/bin-000001.car", "a/state/dataset.key"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(b"x")
    paths = [e.path for e in walk(str(src), [], exclude={b"out", b"a/state"})]
    assert paths == [b"", b"a", b"keep", b"keep/x"]


def test_out_and_state_inside_the_source_are_not_packed(tmp_path):
    """Needs the scan.py patch (Scan passes exclude= to walk)."""
    src = tmp_path / "src"
    write_random(src / "data" / "f", 3 * MiB, 1)
    (src / "small").write_bytes(b"small")
    out, state = src / "out", src / "state"
    for run in (1, 2):  # the second run finds the first run's CARs in OUT
        (src / "small").write_bytes(b"small %d" % run)
        result = packerfs("pack", src, out, "--no-encryption", "--bin-size", "8MiB", "-t", state, timeout=300)
        assert b"left out of the scan" in result.stderr
        listing = json.loads(packerfs("ls", out, "--json", timeout=120).stdout)
        paths = {row["path"] for row in listing}
        assert {"data/f", "small"} <= paths
        assert not any(p == "out" or p.startswith(("out/", "state")) for p in paths), paths
    key = (state / "dataset.key").read_bytes()
    assert key and key not in car_bytes(out)
    assert b"bin-000001.car" not in b"".join(p.read_bytes() for p in out.glob("*.car"))


def test_out_or_state_being_the_source_or_above_it_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"f")
    before = sorted(p.name for p in src.iterdir())
    for out, state in ((src, tmp_path / "s1"), (tmp_path, tmp_path / "s2"), (tmp_path / "o3", src)):
        result = packerfs("pack", src, out, "--no-encryption", "-t", state, check=False, timeout=60)
        assert result.returncode == 2, result.stderr.decode()
        assert "source directory" in one_line(result)
    assert not list(src.glob("*.car")) and not list(src.glob("*.partial"))
    assert sorted(p.name for p in src.iterdir() if p.name != ".lock") == before


@pytest.mark.fuse
def test_mount_point_inside_the_source_is_left_out(tmp_path):
    import shutil

    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("FUSE is not available (/dev/fuse, fusermount3)")
    from test_mount import mount, read_bytes

    src = tmp_path / "src"
    write_random(src / "f", 1000, 1)
    mnt = src / "the-mount-point"
    refused = packerfs("mount", src, src, "--no-encryption", "-t", tmp_path / "st0", check=False, timeout=60)
    assert refused.returncode == 2 and "source directory" in one_line(refused)
    with mount(src, mnt, tmp_path / "state", "--no-encryption", "--bin-size", "8MiB") as m:
        status = m.wait_ready()
        assert not status["errors"], status
        cars = m.cars()
        assert cars
        served = b"".join(read_bytes(mnt / name) for name in cars)
        assert (src / "f").read_bytes() in served
        assert b"the-mount-point" not in served
    # umount returned (no deadlock on the mount point inside the source) and the mount is gone: checked by mount()


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
def test_open_source_file_both_ways(tmp_path, monkeypatch, openat2):
    """The one-resolution openat2 path and the component walk agree: regular files open, nothing else does."""
    from packerfs.errors import SourceChanged
    from packerfs.source import files

    if openat2 and not files._openat2_works:
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(files, "_openat2_works", openat2)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(MARKER)
    os.symlink(outside, src / "link")
    os.mkfifo(src / "d" / "pipe")
    fd = files.open_source_file(os.fsencode(src), b"d/f")
    try:
        assert os.read(fd, 100) == b"inside"
    finally:
        os.close(fd)
    for relpath in (b"link/f", b"d/pipe", b"d", b"link"):
        with pytest.raises(SourceChanged):
            within(10, files.open_source_file, os.fsencode(src), relpath)
    # a directory that replaced the root is the one read from, not the one first seen
    os.rename(src, tmp_path / "src-old")
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"new root")
    fd = files.open_source_file(os.fsencode(src), b"d/f")
    try:
        assert os.read(fd, 100) == b"new root"
    finally:
        os.close(fd)
