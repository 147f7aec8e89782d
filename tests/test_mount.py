"""The FUSE pack view, through real mounts.

Rules that keep these tests from ever hanging CI:
- the mount daemon is always another process (`packerfs mount`, daemonized or
  --foreground); this process only reads, and every read of a mount runs in a
  subprocess with a timeout or in a daemon thread joined with a timeout;
- every mount is undone in `finally`: `packerfs umount`, then SIGKILL of the
  daemon and `fusermount3 -uz` if that did not work.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import PACKERFS, ROOT, packerfs, run_tool, within, write_random
from packerfs.crypt import write_age_identity
from packerfs.piece import commp_file

pytestmark = pytest.mark.fuse

MiB = 1 << 20
OP_TIMEOUT = 20.0  # any single operation on a mount
STATUS = ".packerfs-status"


# ---------------------------------------------------------------- helpers


def mounted_at(mnt: Path) -> bool:
    target = os.fsencode(str(mnt)).replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)


def read_bytes(path: Path) -> bytes:
    return within(OP_TIMEOUT, Path.read_bytes, path)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Mount:
    def __init__(self, src: Path, mnt: Path, state: Path, options: list):
        self.src, self.mnt, self.state, self.options = src, mnt, state, [str(o) for o in options]
        self.pid: int | None = None

    def start(self, check: bool = True) -> subprocess.CompletedProcess:
        self.mnt.mkdir(parents=True, exist_ok=True)
        result = packerfs("mount", self.src, self.mnt, "-t", self.state, *self.options, check=False, timeout=60)
        if check:
            assert result.returncode == 0, result.stderr.decode()
            assert mounted_at(self.mnt)
            self.pid = self.status()["pid"]
        return result

    def status(self) -> dict:
        return json.loads(read_bytes(self.mnt / STATUS))

    def wait_ready(self, timeout: float = 30) -> dict:
        def ready():
            status = self.status()
            assert status["state"] != "failed", status["errors"]
            return status if status["state"] == "ready" else None

        return wait_for(ready, timeout, "the scan to finish")

    def cars(self) -> list[str]:
        return sorted(n for n in within(OP_TIMEOUT, os.listdir, self.mnt) if n.endswith(".car"))

    def stop(self) -> None:
        """Unmount for sure: `packerfs umount`, else kill the daemon and detach the mount."""
        try:
            if mounted_at(self.mnt):
                packerfs("umount", self.mnt, "--timeout", "15", check=False, timeout=30)
        except subprocess.TimeoutExpired:
            pass
        if self.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if mounted_at(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, timeout=30)


@contextmanager
def mount(src: Path, mnt: Path, state: Path, *options):
    m = Mount(src, mnt, state, list(options))
    try:
        m.start()
        yield m
    finally:
        m.stop()
    assert not mounted_at(mnt)


def read_csv_text(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def make_tree(root: Path) -> Path:
    """Several bins at 4 MiB, a file split across bins, small files and empty ones."""
    write_random(root / "a.txt", 100, 1)
    write_random(root / "big" / "split.bin", 9 * MiB + 123, 2)
    write_random(root / "big" / "two.bin", 2 * MiB, 3)
    for i in range(12):
        write_random(root / "small" / f"s{i:02d}", 7000 * i, 10 + i)
    (root / "empty").write_bytes(b"")
    os.symlink("a.txt", root / "link")
    return root


# ---------------------------------------------------------------- copies are exact


def test_copies_equal_pack_and_are_standard(tmp_path, ipfs_car):
    src = make_tree(tmp_path / "src")
    recipient = write_age_identity(tmp_path / "key.txt")
    state = tmp_path / "state"
    options = ["--bin-size", "4MiB", "-r", recipient]
    copied, synced, packed = tmp_path / "cp", tmp_path / "rsync", tmp_path / "pack"
    copied.mkdir()
    with mount(src, tmp_path / "mnt", state, *options) as m:
        status = m.wait_ready()
        for key in ("state", "bins_sealed", "bytes_scanned", "bytes_total", "stale", "errors"):
            assert key in status
        assert status["stale"] == [] and status["errors"] == []
        assert status["bytes_scanned"] == status["bytes_total"] > 0
        cars = m.cars()
        assert len(cars) == status["bins_sealed"] >= 4
        names = set(within(OP_TIMEOUT, os.listdir, m.mnt))
        assert names == set(cars) | {"manifest.csv", "manifest.json", STATUS}

        # exact sizes and a stable mtime
        rows = read_csv_text(read_bytes(m.mnt / "manifest.csv").decode())
        assert [r["car_file"] for r in rows] == cars
        stats = {c: within(OP_TIMEOUT, os.stat, m.mnt / c) for c in cars}
        for row in rows:
            assert stats[row["car_file"]].st_size == int(row["car_size"])
            assert stats[row["car_file"]].st_mode & 0o777 == 0o444
        assert len({s.st_mtime_ns for s in stats.values()}) == 1

        # cp and rsync --inplace, as users copy bins out
        run_tool("cp", *[m.mnt / c for c in cars], m.mnt / "manifest.csv", m.mnt / "manifest.json", copied,
                 check=True, timeout=60)
        if shutil.which("rsync"):
            run_tool("rsync", "-a", "--inplace", f"{m.mnt}/", synced, check=True, timeout=60)

        # reads are stable: random pread ranges, twice, agree with the copy
        rng = random.Random(5)
        for car_file in cars:
            whole = (copied / car_file).read_bytes()

            def preads(path=m.mnt / car_file, size=len(whole)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    out = []
                    for _ in range(40):
                        offset = rng.randrange(0, size)
                        length = rng.choice([1, 100, 4096, 65536, 131072 + 17, MiB + 3, 3 * MiB])
                        out.append((offset, length, os.pread(fd, length, offset)))
                    return out
                finally:
                    os.close(fd)

            for offset, length, data in within(OP_TIMEOUT, preads):
                assert data == whole[offset : offset + length]
            assert hashlib.sha256(read_bytes(m.mnt / car_file)).digest() == hashlib.sha256(whole).digest()

        # read-only
        def try_writes():
            codes = []
            for action in (
                lambda: open(m.mnt / cars[0], "r+b"),
                lambda: open(m.mnt / "new-file", "wb"),
                lambda: os.mkdir(m.mnt / "new-dir"),
                lambda: os.unlink(m.mnt / cars[0]),
                lambda: os.rename(m.mnt / cars[0], m.mnt / "x.car"),
                lambda: os.utime(m.mnt / cars[0], (0, 0)),
                lambda: os.chmod(m.mnt / cars[0], 0o644),
            ):
                try:
                    action()
                    codes.append(None)
                except OSError as exc:
                    codes.append(exc.errno)
            return codes

        assert within(OP_TIMEOUT, try_writes) == [errno.EROFS] * 7

    # `pack` of the same source with the same state writes exactly what the mount served
    packerfs("pack", src, packed, "-t", state, *options, timeout=120)
    expected = sorted(p.name for p in packed.iterdir())
    assert expected == sorted(cars + ["manifest.csv", "manifest.json"])
    for name in expected:
        assert (copied / name).read_bytes() == (packed / name).read_bytes(), name
        if shutil.which("rsync"):
            assert (synced / name).read_bytes() == (packed / name).read_bytes(), name

    # stock tools read the copies, and their commP is the manifest's
    for row in read_csv_text((copied / "manifest.csv").read_text()):
        car_path = copied / row["car_file"]
        listing = run_tool(ipfs_car, "ls", car_path, timeout=60)
        assert listing.returncode == 0, listing.stderr.decode()
        assert b".packerfs" in listing.stdout
        info = commp_file(str(car_path))
        assert info.piece_cid == row["piece_cid"]
        assert info.piece_size == int(row["piece_size"])


# ---------------------------------------------------------------- progressive


GATE_FS = r'''
import errno, os, stat, sys
import pyfuse3, trio

backing, mountpoint, gate = sys.argv[1:4]


class Gate(pyfuse3.Operations):
    """A flat read-only view of `backing` whose file reads wait while the file `gate` exists."""

    def _names(self):
        return sorted(os.listdir(backing))

    def _attr(self, inode):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.attr_timeout = attr.entry_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            return attr
        st = os.stat(os.path.join(backing, self._names()[inode - 2]))
        attr.st_mode = stat.S_IFREG | 0o644
        attr.st_nlink = 1
        attr.st_size = st.st_size
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = st.st_mtime_ns
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        names = self._names()
        if parent != pyfuse3.ROOT_INODE or os.fsdecode(name) not in names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(names.index(os.fsdecode(name)) + 2)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start, token):
        for i, name in enumerate(self._names()[start:], start):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(i + 2), i + 1):
                break

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        if os.path.exists(gate):
            open(gate + ".waiting", "w").close()  # tells the test a reader is held here
        while os.path.exists(gate):
            await trio.sleep(0.01)
        with open(os.path.join(backing, self._names()[fh - 2]), "rb") as f:
            f.seek(off)
            return f.read(size)


pyfuse3.init(Gate(), mountpoint, {"fsname=gate", "ro"})
try:
    trio.run(pyfuse3.main)
except KeyboardInterrupt:
    pass
finally:
    pyfuse3.close(unmount=True)
'''


@contextmanager
def gate_fs(backing: Path, mnt: Path, gate: Path):
    """A FUSE directory whose file reads block while `gate` exists: a scan that waits for the test."""
    mnt.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", GATE_FS, backing, mnt, gate], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: mounted_at(mnt) or process.poll() is not None, 10, "the gate file system")
        assert process.poll() is None, process.stderr.read().decode()
        yield
    finally:
        gate.unlink(missing_ok=True)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if mounted_at(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)


def test_bins_are_served_while_later_ones_are_scanned(tmp_path):
    src, backing, gate = tmp_path / "src", tmp_path / "backing", tmp_path / "gate-closed"
    waiting = tmp_path / "gate-closed.waiting"
    for i in range(3):
        write_random(src / f"a{i}.bin", 5 * MiB, 20 + i)
    write_random(backing / "gated.bin", 3 * MiB + 5, 30)
    (src / "zz").mkdir()
    state = tmp_path / "state"
    gate.write_bytes(b"")
    with gate_fs(backing, src / "zz", gate):
        with mount(src, tmp_path / "mnt", state, "--bin-size", "4MiB", "--no-encryption") as m:
            # the scan is held reading zz/gated.bin, after sealing the bins before it
            wait_for(waiting.exists, 20, "the scan to reach the gated file")
            status = m.status()
            assert status["state"] == "scanning" and status["bins_sealed"] >= 3
            early = m.cars()
            assert early == [f"bin-{n:06d}.car" for n in range(1, len(early) + 1)]
            rows = read_csv_text(read_bytes(m.mnt / "manifest.csv").decode())
            assert [r["car_file"] for r in rows] == early  # a row once its bin is sealed
            first = read_bytes(m.mnt / early[0])
            assert len(first) == int(rows[0]["car_size"])
            assert m.status()["state"] == "scanning"  # really served before the scan ended

            gate.unlink()
            status = m.wait_ready()
            later = m.cars()
            assert len(later) > len(early) and later[: len(early)] == early
            assert read_bytes(m.mnt / early[0]) == first
            final_rows = read_csv_text(read_bytes(m.mnt / "manifest.csv").decode())
            assert final_rows[: len(rows)] == rows and len(final_rows) == len(later)

        # Remount after gated.bin changed: the bins sealed before are visible at once, while the rescan waits.
        waiting.unlink()
        gate.write_bytes(b"")
        os.utime(backing / "gated.bin", ns=(1, 10**18))
        with mount(src, tmp_path / "mnt", state, "--bin-size", "4MiB", "--no-encryption") as m:
            assert m.cars() == later
            wait_for(waiting.exists, 20, "the rescan to reach the changed gated file")
            assert m.status()["state"] == "scanning"
            assert read_bytes(m.mnt / early[0]) == first
            gate.unlink()
            m.wait_ready()


# ---------------------------------------------------------------- faults


def test_changed_source_file_gives_eio_for_its_bin_only(tmp_path):
    src, state, ref = tmp_path / "src", tmp_path / "state", tmp_path / "ref"
    for i in range(4):
        write_random(src / f"f{i}.bin", 3 * MiB, 40 + i)
    write_random(src / "g" / "victim.txt", 5000, 50)
    for i in range(4):
        write_random(src / "h" / f"f{i}.bin", 3 * MiB, 60 + i)
    options = ["--bin-size", "4MiB", "--no-encryption"]
    packerfs("pack", src, ref, "-t", state, *options)
    copies = tmp_path / "copies"
    copies.mkdir()
    with mount(src, tmp_path / "mnt", state, *options) as m:
        m.wait_ready()
        cars = m.cars()
        assert cars == sorted(p.name for p in ref.glob("*.car"))
        victim = src / "g" / "victim.txt"
        before = victim.stat()
        data = bytearray(victim.read_bytes())
        data[100] ^= 1
        victim.write_bytes(bytes(data))
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only bytes differ

        failed, served = [], []
        for car_file in cars:
            result = run_tool("cp", m.mnt / car_file, copies / car_file, timeout=60)
            if result.returncode == 0:
                served.append(car_file)
                assert (copies / car_file).read_bytes() == (ref / car_file).read_bytes()
            else:
                assert b"Input/output error" in result.stderr
                failed.append(car_file)
        assert len(failed) == 1 and len(served) == len(cars) - 1
        status = m.status()
        assert status["stale"] == ["g/victim.txt"]
        assert any("victim.txt" in e for e in status["errors"])
        assert status["state"] == "ready"
    log = (state / "mount.log").read_text()
    assert "victim.txt" in log and "EIO" in log


def test_state_from_other_options_is_refused(tmp_path):
    src = tmp_path / "src"
    write_random(src / "x", 1000, 1)
    state = tmp_path / "state"
    packerfs("pack", src, tmp_path / "out", "-t", state, "--bin-size", "4MiB", "--no-encryption")
    m = Mount(src, tmp_path / "mnt", state, ["--bin-size", "8MiB", "--no-encryption"])
    try:
        result = m.start(check=False)
        assert result.returncode == 2
        message = result.stderr.decode().strip()
        assert len(message.splitlines()) == 1 and "different bin_size" in message
        assert not mounted_at(m.mnt)
        result = packerfs("mount", src, tmp_path / "nowhere", "-t", state, check=False)
        assert result.returncode == 2 and "does not exist" in result.stderr.decode()
    finally:
        m.stop()


# ---------------------------------------------------------------- lifecycle


def test_sigterm_unmounts_cleanly_and_mounting_again_works(tmp_path):
    src = make_tree(tmp_path / "src")
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    options = ["--bin-size", "4MiB", "--no-encryption"]
    m = Mount(src, mnt, state, options)
    try:
        m.start()
        m.wait_ready()
        cars = m.cars()
        digests = {c: hashlib.sha256(read_bytes(mnt / c)).hexdigest() for c in cars}
        # one mount per state directory, one file system per mount point
        (tmp_path / "mnt2").mkdir()
        again = packerfs("mount", src, tmp_path / "mnt2", "-t", state, *options, check=False)
        assert again.returncode == 2 and "in use" in again.stderr.decode()
        again = packerfs("mount", src, mnt, "-t", tmp_path / "state2", *options, check=False)
        assert again.returncode == 2 and "already mounted" in again.stderr.decode()

        os.kill(m.pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(m.pid), 20, "the daemon to exit on SIGTERM")
        assert not mounted_at(mnt)
        assert "SIGTERM: unmounting" in (state / "mount.log").read_text()

        m.start()  # again, with the same state: every bin is there at once, same bytes
        assert m.cars() == cars
        # many concurrent readers (two per bin), on a fresh mount: nothing comes from the page cache yet
        readers = [
            subprocess.Popen(["sha256sum", mnt / c], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for c in cars for _ in range(2)
        ]
        try:
            for process, car_file in zip(readers, [c for c in cars for _ in range(2)]):
                out, err = process.communicate(timeout=60)
                assert process.returncode == 0, err.decode()
                assert out.split()[0].decode() == digests[car_file]
        finally:
            for process in readers:
                if process.poll() is None:
                    process.kill()
        m.wait_ready()
        pid = m.pid
        result = packerfs("umount", mnt, timeout=60)
        assert result.returncode == 0
        assert not mounted_at(mnt) and not pid_alive(pid)
    finally:
        m.stop()

    # --foreground serves until SIGINT, then unmounts and exits 0
    process = subprocess.Popen(
        [*PACKERFS, "mount", src, mnt, "-t", state, *options, "--foreground"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: mounted_at(mnt) or process.poll() is not None, 20, "the foreground mount")
        assert process.poll() is None, process.stderr.read().decode()
        assert Mount(src, mnt, state, options).wait_ready()["pid"] == process.pid
        assert hashlib.sha256(read_bytes(mnt / cars[0])).hexdigest() == digests[cars[0]]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
        assert process.returncode == 0, err.decode()
        assert b"unmounted" in err
        assert not mounted_at(mnt)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if mounted_at(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)


def test_killed_daemon_leaves_no_workers_and_umount_clears_the_dead_mount(tmp_path):
    src = tmp_path / "src"
    write_random(src / "x.bin", 3 * MiB, 7)
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    m = Mount(src, mnt, state, ["--bin-size", "4MiB", "--no-encryption"])
    try:
        m.start()
        m.wait_ready()
        workers = [
            int(name) for name in os.listdir("/proc")
            if name.isdigit() and _ppid(int(name)) == m.pid
        ]
        assert workers, "the daemon serves through worker processes"
        os.kill(m.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(m.pid), 10, "the daemon to die")
        wait_for(lambda: not any(pid_alive(p) for p in workers), 20, "its workers to exit")
        assert mounted_at(mnt)  # the kernel keeps a dead mount until it is detached
        refused = packerfs("mount", src, mnt, "-t", state, "--bin-size", "4MiB", "--no-encryption", check=False)
        assert refused.returncode == 2 and "umount" in refused.stderr.decode()
        assert packerfs("umount", mnt, timeout=60).returncode == 0
        assert not mounted_at(mnt)
        m.start()  # and the state directory is free again
        assert m.cars() == ["bin-000001.car"]
    finally:
        m.stop()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
