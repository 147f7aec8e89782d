"""Reading data-set snapshots: unpack, ls, verify, snapshots and mount --reverse on sets that
`packerfs pack` wrote over two scans (a change, a delete and an add in between).

The history (age-encrypted, 4 MiB bins): scan 1 packs `src1`; then `aaa/huge.bin` (9 MiB, over
three bins) changes, `sub/c.txt` is deleted, `sub/d.txt` changes and `new.txt` is added, and
scan 2 packs into the same OUT. The bins that held only the old huge.bin are retired.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from conftest import packerfs
from packerfs.crypt import write_age_identity
from test_unpack import BASE_NS, ROOT_ENTRY, assert_same_tree, craft_car, file_entry, make_writable

MiB = 1 << 20
BIN = "4MiB"


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def pack(src: Path, out: Path, state: Path, *options) -> dict:
    result = packerfs("pack", src, out, "-t", state, "--bin-size", BIN, "--json", *options, timeout=180)
    return json.loads(result.stdout)


def copy_cars(cars: Path, dest: Path, skip=()) -> Path:
    dest.mkdir(parents=True)
    for car in sorted(cars.glob("*.car")):
        if car.name not in skip:
            shutil.copy2(car, dest / car.name)
    shutil.copy2(cars / "manifest.csv", dest / "manifest.csv")
    return dest


def car_name(number: int) -> str:
    return f"bin-{number:06d}.car"


def stderr_lines(result) -> list[str]:
    return result.stderr.decode(errors="replace").splitlines()


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    key = root / "key.txt"
    recipient = write_age_identity(str(key))
    src = root / "src"
    rng = random.Random(9)
    write(src / "aaa" / "huge.bin", rng.randbytes(9 * MiB))
    write(src / "keep" / "a.txt", b"unchanged\n")
    write(src / "sub" / "c.txt", b"deleted later\n")
    write(src / "sub" / "d.txt", b"version one\n")
    write(src / "sub" / "e.txt", b"unchanged too\n")
    (src / "emptydir").mkdir()
    os.symlink("keep/a.txt", src / "link")
    cars, state = root / "cars", root / "state"
    first = pack(src, cars, state, "-r", recipient)
    src1 = root / "src1"
    shutil.copytree(src, src1, symlinks=True)
    cars1 = copy_cars(cars, root / "cars1")

    write(src / "aaa" / "huge.bin", rng.randbytes(9 * MiB))
    os.unlink(src / "sub" / "c.txt")
    write(src / "sub" / "d.txt", b"version two, longer\n")
    write(src / "new.txt", b"added\n")
    second = pack(src, cars, state, "-r", recipient)
    yield {"root": root, "src": src, "src1": src1, "cars": cars, "cars1": cars1, "key": key,
           "first": first, "second": second}
    make_writable(root)


def unpack(cars, out, key, *options, check=False):
    return packerfs("unpack", cars, out, "-i", key, *options, check=check, timeout=180)


def test_the_history_is_what_the_tests_assume(history):
    first, second = history["first"], history["second"]
    assert first["snapshot"]["id"] == 1 and second["snapshot"]["id"] == 2
    assert second["retired_bins"], second  # the bins holding only the old huge.bin
    assert max(first["snapshot"]["bins"]) < min(second["new_bins"])


def test_unpack_restores_the_current_source_exactly(history, tmp_path):
    out = tmp_path / "out"
    result = unpack(history["cars"], out, history["key"])
    assert result.returncode == 0, result.stderr.decode()
    assert_same_tree(history["src"], out)  # nothing lost (keep/a.txt shares a bin with sub/c.txt), nothing resurrected
    assert not (out / "sub" / "c.txt").exists()
    assert b"retired" in result.stderr


def test_snapshot_1_restores_the_older_tree(history, tmp_path):
    out = tmp_path / "out"
    result = unpack(history["cars"], out, history["key"], "--snapshot", "1")
    assert result.returncode == 0, result.stderr.decode()
    assert_same_tree(history["src1"], out)
    ls = json.loads(packerfs("ls", history["cars"], "-i", history["key"], "--snapshot", "1", "--json").stdout)
    assert "sub/c.txt" in {r["path"] for r in ls} and "new.txt" not in {r["path"] for r in ls}


def test_unknown_snapshot_is_a_usage_error(history, tmp_path):
    for command in (["ls", "-i", history["key"]], ["verify", "-i", history["key"]], ["unpack", "-i", history["key"]]):
        args = [*command[:1], history["cars"], *([tmp_path / "o"] if command[0] == "unpack" else []), *command[1:]]
        result = packerfs(*args, "--snapshot", "7", check=False)
        assert result.returncode == 2, result.stderr
        lines = stderr_lines(result)
        assert len(lines) == 1 and "no snapshot 7" in lines[0] and "1, 2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_verify_reports_retired_bins_and_passes(history):
    retired = history["second"]["retired_bins"]
    result = packerfs("verify", history["cars"], "-i", history["key"], "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["ok"] and report["snapshot"] == 2 and report["retired_bins"] == retired
    assert report["lost_bins"] == [] and report["problems"] == [] and report["missing"] == []
    assert any("retired" in n for n in report["notes"])
    csv_text = (history["cars"] / "manifest.csv").read_text()
    assert csv_text.splitlines()[0].endswith(",status") and ",retired" in csv_text
    text = packerfs("verify", history["cars"], "-i", history["key"], check=False)
    assert text.returncode == 0 and b"snapshot 2: OK" in text.stdout


def test_retired_bins_may_be_left_behind(history, tmp_path):
    """Only the current bins retrieved: unpack is complete; the gaps are not `missing bins`."""
    retired = history["second"]["retired_bins"]
    cars = copy_cars(history["cars"], tmp_path / "cars", skip={car_name(n) for n in retired})
    out = tmp_path / "out"
    result = unpack(cars, out, history["key"])
    assert result.returncode == 0, result.stderr.decode()
    assert b"missing" not in result.stderr
    assert_same_tree(history["src"], out)
    checked = packerfs("verify", cars, "-i", history["key"], "--json", check=False)
    assert checked.returncode == 0, checked.stdout.decode()
    assert json.loads(checked.stdout)["retired_bins"] == []
    # the older snapshot needed them: asking for it says so, exit 3
    older = unpack(cars, tmp_path / "older", history["key"], "--snapshot", "1")
    assert older.returncode == 3 and b"snapshot 1" in older.stderr


def _bin_holding(cars: Path, path: bytes, key: Path) -> int:
    rows = json.loads(packerfs("ls", cars, "-i", key, "--json").stdout)
    row = next(r for r in rows if base64.b64decode(r["path_b64"]) == path)
    assert len(row["bins"]) == 1
    return row["bins"][0]


def test_a_lost_needed_bin_lists_its_files(history, tmp_path):
    gone = _bin_holding(history["cars"], b"keep/a.txt", history["key"])
    assert gone not in history["second"]["retired_bins"]
    cars = copy_cars(history["cars"], tmp_path / "cars", skip={car_name(gone)})
    out = tmp_path / "out"
    result = unpack(cars, out, history["key"])
    assert result.returncode == 3
    err = result.stderr.decode()
    assert f"bin {gone} is missing" in err and "keep/a.txt" in err and "sub/e.txt" in err
    assert "incomplete, not restored: keep/a.txt" in err  # wholly in the lost bin, still listed by name
    assert (out / "new.txt").read_bytes() == b"added\n" and not (out / "keep" / "a.txt").exists()
    checked = packerfs("verify", cars, "-i", history["key"], "--json", check=False)
    assert checked.returncode == 3
    report = json.loads(checked.stdout)
    assert report["lost_bins"] == [gone] and report["problems"] == []
    assert any("keep/a.txt" in line for line in report["missing"])
    listed = packerfs("ls", cars, "-i", history["key"], check=False)
    assert listed.returncode == 3 and b"keep/a.txt" in listed.stdout and b"(incomplete)" in listed.stdout


def test_newest_snapshot_lost_falls_back_with_exit_3(history, tmp_path):
    last = max(history["second"]["snapshot"]["bins"])
    cars = copy_cars(history["cars"], tmp_path / "cars", skip={car_name(last)})
    out = tmp_path / "out"
    result = unpack(cars, out, history["key"])
    assert result.returncode == 3, result.stderr.decode()
    assert b"newer than snapshot 1" in result.stderr
    assert_same_tree(history["src1"], out)  # the newest complete snapshot, exactly


def test_snapshots_listing(history):
    result = packerfs("snapshots", history["cars"], "-i", history["key"], "--json")
    listing = json.loads(result.stdout)
    rows = listing["snapshots"]
    assert [r["id"] for r in rows] == [1, 2] and listing["current"] == 2
    assert all(r["complete"] and r["cid"].startswith("baf") for r in rows)
    assert rows[0]["files"] == 5 and rows[1]["files"] == 5
    assert rows[1]["snapshot_bins"] == history["second"]["snapshot"]["bins"]
    assert rows[0]["snapshot_bins"] == history["first"]["snapshot"]["bins"]
    assert not set(history["second"]["retired_bins"]) & set(rows[1]["bins_needed"])
    text = packerfs("snapshots", history["cars"], "-i", history["key"]).stdout.decode().splitlines()
    assert len(text) == 3 and "complete" in text[2] and "(current)" in text[2] and "T" in text[1].split()[1]


def test_legacy_set_without_snapshot_still_works(tmp_path):
    cars = tmp_path / "cars"
    cars.mkdir()
    data = b"from an older packerfs\n"
    craft_car(cars / "bin-000001.car", [ROOT_ENTRY, file_entry(b"old.txt", data)], {b"old.txt": data})
    result = packerfs("ls", cars, check=False)
    assert result.returncode == 0 and b"old.txt" in result.stdout
    assert b"no snapshot" in result.stderr and b"deleted files may reappear" in result.stderr
    out = tmp_path / "out"
    restored = packerfs("unpack", cars, out, check=False)
    assert restored.returncode == 0 and (out / "old.txt").read_bytes() == data
    assert packerfs("verify", cars, check=False).returncode == 0


def test_verify_and_unpack_agree_on_manifest_directories(tmp_path):
    """A directory the manifest names but the CAR's UnixFS tree lacks: unpack creates it, so verify
    passes it too (with a note)."""
    cars = tmp_path / "cars"
    cars.mkdir()
    extra = {"path": b"only-in-manifest", "kind": "dir", "mode": 0o755, "mtime_ns": BASE_NS}
    craft_car(cars / "bin-000001.car", [ROOT_ENTRY, extra, file_entry(b"f", b"x")], {b"f": b"x"})
    checked = packerfs("verify", cars, "--json", check=False)
    assert checked.returncode == 0, checked.stdout
    assert any("only-in-manifest" in n for n in json.loads(checked.stdout)["notes"])
    assert packerfs("unpack", cars, tmp_path / "out", check=False).returncode == 0
    assert (tmp_path / "out" / "only-in-manifest").is_dir()


# ---------------------------------------------------------------- ls: names and damage


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    src = root / "src"
    names = [b"evil\n\x1b[31mred\x1b[0m", b"latin1-\xe9.txt", b"back\\slash", b"bidi-\xe2\x80\xae-txt", b"plain.txt"]
    src.mkdir()
    for i, name in enumerate(names):
        with open(os.fsencode(src) + b"/" + name, "wb") as f:
            f.write(b"%d\n" % i)
    os.symlink(os.fsdecode(b"target-\x07\xff"), src / "link")
    write(src / "big.bin", random.Random(3).randbytes(5 * MiB))  # more than one bin
    cars = root / "cars"
    pack(src, cars, root / "state", "--no-encryption")
    return {"src": src, "cars": cars, "names": names}


def test_ls_escapes_names(odd_names):
    result = packerfs("ls", odd_names["cars"])
    out = result.stdout
    assert b"\x1b" not in out and b"\xe9" not in out and b"\x07" not in out and b"\xe2\x80\xae" not in out
    lines = out.decode("utf-8").splitlines()
    assert len(lines) == len(odd_names["names"]) + 3  # root, link, big.bin: one line each
    assert any(line.endswith("evil\\n\\x1b[31mred\\x1b[0m") for line in lines)
    assert any(line.endswith("latin1-\\xe9.txt") for line in lines)
    assert any(line.endswith("back\\\\slash") for line in lines)
    assert any("target-\\x07\\xff" in line for line in lines)


def test_ls_json_round_trips_raw_names(odd_names):
    rows = json.loads(packerfs("ls", odd_names["cars"], "--json").stdout)
    paths = {base64.b64decode(r["path_b64"]) for r in rows}
    assert paths == {b"", b"link", b"big.bin", *odd_names["names"]}
    link = next(r for r in rows if r["path"] == "link")
    assert base64.b64decode(link["target_b64"]) == b"target-\x07\xff"


def test_ls_reports_a_truncated_car_with_exit_3(odd_names, tmp_path):
    cars = copy_cars(odd_names["cars"], tmp_path / "cars")
    victim = cars / car_name(1)
    os.truncate(victim, victim.stat().st_size // 2)
    result = packerfs("ls", cars, check=False)
    assert result.returncode == 3
    assert str(victim).encode() in result.stderr
    assert b"Traceback" not in result.stderr


# ---------------------------------------------------------------- mount --reverse --snapshot


@pytest.mark.fuse
def test_mount_reverse_snapshot(history, tmp_path):
    from conftest import within
    from test_mount import OP_TIMEOUT
    from test_reverse_mount import reverse_mount

    mnt, state = tmp_path / "mnt", tmp_path / "state"
    with reverse_mount(history["cars"], mnt, state, "-i", history["key"], "--snapshot", "1") as m:
        status = m.status()
        assert status["snapshot"] == 1 and status["complete"], status
        assert set(status["retired_bins"]) >= set(history["second"]["new_bins"])
        within(60, assert_same_tree, history["src1"], mnt)
        assert within(OP_TIMEOUT, (mnt / "sub" / "c.txt").read_bytes) == b"deleted later\n"
    (tmp_path / "mnt2").mkdir()
    bad = packerfs("mount", "--reverse", history["cars"], tmp_path / "mnt2", "-t", tmp_path / "state2",
                   "-i", history["key"], "--snapshot", "9", check=False, timeout=60)
    assert bad.returncode == 2 and len(stderr_lines(bad)) == 1 and b"no snapshot 9" in bad.stderr


def test_huge_part_counts_from_a_manifest_cost_nothing(tmp_path):
    """Part numbers come from untrusted manifests: no allocation or loop per missing part or bin."""
    import time

    from packerfs.unpack import CarSet

    cars = tmp_path / "cars"
    cars.mkdir()
    data = b"part one"
    entry = dict(file_entry(b"f", data), parts=2**20, size=2**40, stream=2**40)  # as many as the manifest format allows
    craft_car(cars / "bin-000001.car", [ROOT_ENTRY, entry], {b"f": data})
    started = time.monotonic()
    carset = CarSet.open(str(cars))
    tree = carset.tree()
    entry = tree.lookup(b"f")
    assert not entry.complete and len(entry.missing_parts) <= 1000 and len(entry.missing_bins) <= 1000
    assert time.monotonic() - started < 10
    listed = packerfs("ls", cars, check=False, timeout=60)
    assert listed.returncode == 3 and b"(incomplete)" in listed.stdout
