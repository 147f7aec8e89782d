"""Issue 9 §1: after a change, the current bins restore the current source exactly.

Every scenario changes the source between runs (delete, change, add, append
while packing, repack), runs packerfs as a user would (the CLI in a
subprocess, or a real mount copied out with rsync), then unpacks what a user
would hold and compares it with the source: no file lost, none resurrected.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, packerfs, write_random
from packerfs.crypt import write_age_identity
from packerfs.pack.scan import NAME_MAX, name_in_car

MiB = 1 << 20
BIN = "8MiB"


def tree_of(root: Path) -> dict[str, bytes | str]:
    """Relative path -> content (files), "dir", or "-> target" (symlinks)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
                if name in dirnames:
                    dirnames.remove(name)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


def csv_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def key(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "key.txt"
    return path, write_age_identity(str(path))


def reproduction(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_random(src / "a.bin", 12_000_000, 1)
    write_random(src / "sub" / "b.bin", 2_000_000, 2)
    (src / "sub" / "c.txt").write_bytes(b"keep\n")
    return src


def pack(src, out, state, recipient, *extra, check=True):
    return packerfs("pack", src, out, "-r", recipient, "--bin-size", BIN, "-t", state, "--json", *extra, check=check)


def unpack(cars, dest, key_path, *extra, check=True):
    return packerfs("unpack", cars, dest, "-i", key_path, *extra, check=check)


def test_deleting_a_file_loses_nothing_and_resurrects_nothing(tmp_path, key):
    """The issue's reproduction, with OUT reused as a user would keep it."""
    key_path, recipient = key
    src = reproduction(tmp_path)
    out, state = tmp_path / "out", tmp_path / "st"
    first = json.loads(pack(src, out, state, recipient).stdout)
    assert first["snapshot"]["id"] == 1
    (src / "sub" / "c.txt").unlink()
    second = json.loads(pack(src, out, state, recipient).stdout)
    assert second["files_deleted"] == 1 and second["deleted_paths"] == ["sub/c.txt"]
    assert second["snapshot"]["id"] == 2 and second["snapshot"]["files"] == 2
    # the bins holding a.bin and sub/b.bin stay current: nothing they hold is lost
    rows = {r["car_file"]: r for r in csv_rows(out)}
    assert all(r["status"] == "current" for r in rows.values()), rows
    unpack(out, tmp_path / "restored", key_path)
    assert tree_of(tmp_path / "restored") == tree_of(src)
    verified = packerfs("verify", out, "-i", key_path, "--json", check=False)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()


def test_fresh_out_after_a_deletion_names_the_bin_it_cannot_generate_and_repack_fixes_it(tmp_path, key):
    key_path, recipient = key
    src = reproduction(tmp_path)
    state = tmp_path / "st"
    pack(src, tmp_path / "out1", state, recipient)
    (src / "sub" / "c.txt").unlink()
    result = pack(src, tmp_path / "out2", state, recipient, check=False)
    assert result.returncode == 3, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["unavailable_bins"], report
    # what out2 lacks is listed by name on unpack, never silently dropped
    partial = unpack(tmp_path / "out2", tmp_path / "r2", key_path, check=False)
    assert partial.returncode == 3
    assert b"sub/b.bin" in partial.stdout + partial.stderr
    # out1 + out2 together are the current bins: exactly the current source
    merged = tmp_path / "merged"
    merged.mkdir()
    for car in [*(tmp_path / "out1").glob("*.car"), *(tmp_path / "out2").glob("*.car")]:
        os.link(car, merged / car.name) if not (merged / car.name).exists() else None
    unpack(merged, tmp_path / "r-merged", key_path)
    assert tree_of(tmp_path / "r-merged") == tree_of(src)
    # --repack-below 1 moves the live files out of the bin that cannot be generated any more
    repacked = json.loads(pack(src, tmp_path / "out2", state, recipient, "--repack-below", "1").stdout)
    assert repacked["files_repacked"] >= 1 and not repacked["unavailable_bins"]
    assert set(report["unavailable_bins"]) <= set(repacked["retired_bins"])
    unpack(tmp_path / "out2", tmp_path / "r3", key_path, "--force")
    assert tree_of(tmp_path / "r3") == tree_of(src)
    verified = packerfs("verify", tmp_path / "out2", "-i", key_path, "--json", check=False)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()


def test_change_add_and_delete_across_several_runs(tmp_path, key):
    key_path, recipient = key
    src = tmp_path / "src"
    for i in range(6):
        write_random(src / f"d{i % 2}" / f"f{i}", 1_500_000 + i, i)
    os.symlink("d0/f0", src / "link")
    (src / "empty").mkdir()
    out, state = tmp_path / "out", tmp_path / "st"
    pack(src, out, state, recipient)
    write_random(src / "d0" / "f0", 700_000, 99)  # changed
    (src / "d1" / "f1").unlink()  # deleted
    write_random(src / "d2" / "new", 3 * MiB, 7)  # added
    os.unlink(src / "link")
    os.symlink("d2/new", src / "link")  # symlink retargeted
    (src / "empty").rmdir()  # empty directory deleted
    report = json.loads(pack(src, out, state, recipient).stdout)
    assert report["files_changed"] >= 1 and report["files_deleted"] >= 1
    unpack(out, tmp_path / "r1", key_path)
    assert tree_of(tmp_path / "r1") == tree_of(src)
    # a third run with no change seals nothing and keeps the same snapshot
    again = json.loads(pack(src, out, state, recipient).stdout)
    assert again["new_bins"] == [] and again["snapshot"] is None
    # the older snapshot restores the older tree: nothing resurrected in the new one, nothing lost in the old
    listed = json.loads(packerfs("snapshots", out, "-i", key_path, "--json").stdout)
    ids = sorted(s["id"] for s in (listed["snapshots"] if isinstance(listed, dict) else listed))
    assert ids == [1, 2]
    unpack(out, tmp_path / "r-old", key_path, "--snapshot", "1")
    old = tree_of(tmp_path / "r-old")
    assert "d1/f1" in old and "d2/new" not in old and "empty" in old
    verified = packerfs("verify", out, "-i", key_path, "--json", check=False)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()


def test_file_appended_to_during_the_pack_then_rerun_verifies_clean(tmp_path):
    """The abandoned version's sealed bin retires; the finished set verifies and restores exactly."""
    src = tmp_path / "src"
    write_random(src / "a-first", 3 * MiB, 1)
    write_random(src / "growing", 20 * MiB, 2)
    state, out = tmp_path / "st", tmp_path / "out"
    appender = (
        "import sys\n"
        "from packerfs.pack import Engine\n"
        "from packerfs.crypt import make_cipher\n"
        f"src, state, out = {str(src)!r}, {str(state)!r}, {str(out)!r}\n"
        "def on_seal(result):\n"
        "    if result['bin'] == 1:\n"
        "        with open(src + '/growing', 'ab') as f:\n"
        "            f.write(b'appended while packing')\n"
        f"e = Engine.open(src, state, make_cipher(no_encryption=True), {8 * MiB})\n"
        "try:\n"
        "    e.scan(on_seal=on_seal, car_dir=out)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "    sys.exit(9)\n"
    )
    run = subprocess.run([sys.executable, "-c", appender], cwd=ROOT, capture_output=True, timeout=120)
    assert run.returncode == 9 and b"changed while being read" in run.stdout, run.stdout + run.stderr
    packerfs("pack", src, out, "--no-encryption", "--bin-size", BIN, "-t", state)
    verified = packerfs("verify", out, "--json", check=False)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()
    packerfs("unpack", out, tmp_path / "restored")
    assert tree_of(tmp_path / "restored") == tree_of(src)


def test_interrupted_snapshot_is_sealed_by_the_rerun(tmp_path):
    """A run killed before its snapshot: the rerun seals one, without the file deleted in between."""
    src = tmp_path / "src"
    write_random(src / "one", 5 * MiB, 1)
    write_random(src / "two", 5 * MiB, 2)
    state = tmp_path / "st"
    packerfs("pack", src, tmp_path / "out", "--no-encryption", "--bin-size", BIN, "-t", state)
    (src / "two").unlink()
    write_random(src / "three", 12 * MiB, 3)  # split: its first part seals, then the run is killed
    killer = (
        "import os, signal\n"
        "from packerfs.pack import Engine\n"
        "from packerfs.crypt import make_cipher\n"
        "def on_seal(result):\n"
        "    if result.get('snapshot'):\n"
        "        return\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"e = Engine.open({str(src)!r}, {str(state)!r}, make_cipher(no_encryption=True), {8 * MiB})\n"
        f"e.scan(on_seal=on_seal, car_dir={str(tmp_path / 'out')!r})\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer], cwd=ROOT, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    report = json.loads(
        packerfs("pack", src, tmp_path / "out", "--no-encryption", "--bin-size", BIN, "-t", state, "--json").stdout
    )
    assert report["snapshot"] is not None and report["snapshot"]["files"] == 2
    packerfs("unpack", tmp_path / "out", tmp_path / "restored")
    assert tree_of(tmp_path / "restored") == tree_of(src)


def test_snapshot_larger_than_a_bin_is_split_over_bins(tmp_path):
    """With tiny bins and many files, the snapshot takes several bins, and still restores everything."""
    src = tmp_path / "src"
    for i in range(6000):
        (src / f"d{i // 1000}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i // 1000}" / (f"file-with-a-long-name-{i:05d}-" + "x" * 150)).write_bytes(b"%d" % i)
    out = tmp_path / "out"
    report = json.loads(
        packerfs("pack", src, out, "--no-encryption", "--bin-size", "1100000", "-t", tmp_path / "st", "--json").stdout
    )
    assert len(report["snapshot"]["bins"]) >= 2, report["snapshot"]
    assert all(c["car_size"] <= 1_100_000 for c in report["cars"])
    packerfs("unpack", out, tmp_path / "restored")
    assert tree_of(tmp_path / "restored") == tree_of(src)


# ---------------------------------------------------------------- names (§3)


def test_names_in_cars_are_at_most_255_bytes_and_ipfs_car_unpacks_them(tmp_path, key, ipfs_car):
    key_path, recipient = key
    src = tmp_path / "src"
    names = ["n" * 255, "é" * 127, "p" * 240, "q" * 240 + "-twin"]
    for i, name in enumerate(names):
        write_random(src / name, 5 * MiB + i, i)  # split over bins: .age.partNNNNofNNNN suffixes
    out = tmp_path / "out"
    # --show-names: the long clear names (and their truncation to NAME_MAX) are what is checked in the CARs
    pack(src, out, tmp_path / "st", recipient, "--show-names")
    listed = subprocess.run(
        [ipfs_car, "ls", str(next(out.glob("bin-000001.car")))], capture_output=True, timeout=60
    )
    assert listed.returncode == 0
    for car in sorted(out.glob("*.car")):
        dest = tmp_path / "ipfs" / car.stem
        dest.parent.mkdir(exist_ok=True)
        run = subprocess.run([ipfs_car, "unpack", str(car), "--output", str(dest)], capture_output=True, timeout=120)
        assert run.returncode == 0, run.stderr.decode()
        for path in dest.rglob("*"):
            assert len(path.name.encode()) <= NAME_MAX
    unpack(out, tmp_path / "restored", key_path)
    assert tree_of(tmp_path / "restored") == tree_of(src)


def test_name_in_car_scheme():
    assert name_in_car(b"short", b".age") == b"short.age"
    long = "é".encode() * 127
    shortened = name_in_car(long, b".age.part0001of0002")
    assert len(shortened) <= NAME_MAX and shortened.endswith(b".age.part0001of0002")
    shortened.decode()  # never cuts a UTF-8 character in half
    assert name_in_car(b"x" * 250 + b"a", b".age") != name_in_car(b"x" * 250 + b"b", b".age")


# ---------------------------------------------------------------- through the mount


@pytest.mark.fuse
def test_mount_remount_after_changes_copies_out_a_set_that_restores_the_source(tmp_path):
    """rsync from the mount, change the source, remount and rsync again into the same drive."""
    from test_mount import mount, read_csv_text, read_bytes

    src = tmp_path / "src"
    write_random(src / "a.bin", 12_000_000, 1)
    write_random(src / "sub" / "b.bin", 2_000_000, 2)
    (src / "sub" / "c.txt").write_bytes(b"keep\n")
    write_random(src / "z" / "old.bin", 9 * MiB, 3)
    state, drive = tmp_path / "state", tmp_path / "drive"
    drive.mkdir()
    options = ["--bin-size", BIN, "--no-encryption"]

    def copy_out(m):
        m.wait_ready()
        run = subprocess.run(
            ["rsync", "-a", f"{m.mnt}/", f"{drive}/"], capture_output=True, timeout=120
        )
        assert run.returncode == 0, run.stderr.decode()
        return m.status(), read_csv_text(read_bytes(m.mnt / "manifest.csv").decode())

    with mount(src, tmp_path / "mnt", state, *options) as m:
        copy_out(m)
    (src / "sub" / "c.txt").unlink()  # shares a bin with b.bin and a part of a.bin
    write_random(src / "z" / "old.bin", 100, 4)  # rewritten: its old bins hold nothing current
    write_random(src / "new.bin", 3 * MiB, 5)
    with mount(src, tmp_path / "mnt", state, *options) as m:
        status, rows = copy_out(m)
        shown = set(m.cars())
    assert status["retired_bins"], status  # the bins that held only z/old.bin's first version
    assert not shown & {f"bin-{n:06d}.car" for n in status["retired_bins"]}
    assert {r["status"] for r in rows} == {"current"} and {r["car_file"] for r in rows} == shown
    assert status["unavailable_bins"], status  # the bin shared with the deleted c.txt: still needed
    run = packerfs("unpack", drive, tmp_path / "restored", check=False)
    assert run.returncode == 0, run.stderr.decode()
    assert tree_of(tmp_path / "restored") == tree_of(src)
    verified = packerfs("verify", drive, "--json", check=False)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()


def test_an_entry_that_becomes_unreadable_keeps_its_earlier_version(tmp_path):
    """--skip-unreadable skips it, but unreadable is not deleted: the snapshot keeps the packed version."""
    from test_pack import _without_dac_override

    prefix = _without_dac_override()
    src = tmp_path / "src"
    kept = write_random(src / "d" / "inside", 3000, 1)
    write_random(src / "f", 2000, 2)
    write_random(src / "other", 1000, 3)
    out, state = tmp_path / "out", tmp_path / "st"
    packerfs("pack", src, out, "--no-encryption", "--bin-size", BIN, "-t", state)
    (src / "other").unlink()  # a real change, so the rerun seals a snapshot
    (src / "d").chmod(0)
    (src / "f").chmod(0)
    try:
        base = prefix + [sys.executable, "-m", "packerfs.cli", "pack", str(src), str(out), "--no-encryption",
                         "--bin-size", BIN, "-t", str(state), "--skip-unreadable", "--json"]
        run = subprocess.run(base, capture_output=True, cwd=ROOT, timeout=120)
        assert run.returncode == 3, run.stderr
        report = json.loads(run.stdout)
        assert report["files_deleted"] == 1 and report["deleted_paths"] == ["other"]
        assert report["snapshot"]["files"] == 2
    finally:
        (src / "d").chmod(0o755)
        (src / "f").chmod(0o644)
    packerfs("unpack", out, tmp_path / "restored")
    restored = tree_of(tmp_path / "restored")
    assert restored["d/inside"] == kept and "f" in restored and "other" not in restored


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["dir", "symlink", "file"]),
    path=st.binary(max_size=300),
    target=st.binary(max_size=300),
    mode=st.integers(0, 0o7777),
    mtime=st.integers(-(2**63), 2**63 - 1),
    size=st.integers(0, 2**63 - 1),
    version=st.integers(1, 2**63 - 1),
    bins=st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=30),
)
def test_snapshot_entry_encoder_is_canonical_dag_cbor(kind, path, target, mode, mtime, size, version, bins):
    from packerfs import snapshot
    from packerfs.ipld import cbor

    record = {"path": path, "kind": kind, "mode": mode, "mtime_ns": mtime, "size": size, "stream_size": size + 7,
              "target": target, "bins": bins}
    encoded = snapshot.encode_entry(record, version)
    assert encoded == snapshot._encode_entry_generic(record, version)
    assert cbor.decode(encoded)["path"] == path
