"""The pack engine end to end: bins, CARs, manifests, commP, determinism, faults."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from conftest import ROOT, find_tool, make_small_tree, packerfs, run_tool, write_random
from packerfs import manifest as manifest_format
from packerfs.crypt import make_cipher, write_age_identity
from packerfs.errors import SourceChanged, UsageError
from packerfs.ipld import car
from packerfs.ipld.cid import RAW, cid_to_str, make_cid
from packerfs.ipld.dagpb import HAMT_SHARD, UnixFSData, decode_node
from packerfs.pack import Engine
from packerfs.pack.writer import CSV_COLUMNS
from packerfs.piece import commp_file, piece_cid_v1
from packerfs.piece.reference import commp as reference_commp
from packerfs.plan.sizes import DEFAULT_BIN_SIZE, SECTOR_64G_PAYLOAD, check_bin_size, parse_size

MiB = 1 << 20
BIN = 4 * MiB


@pytest.fixture
def source(tmp_path):
    return make_small_tree(tmp_path / "src")


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def cars_in(out: Path) -> list[Path]:
    return sorted(out.glob("bin-*.car"))


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text,expected",
    [("34091302912", 34091302912), ("32GiB", 32 << 30), ("31.5GiB", int(31.5 * (1 << 30))), ("1GB", 10**9), ("8MiB", 8 << 20)],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


def test_bin_size_limits():
    assert DEFAULT_BIN_SIZE == 34_091_302_912
    assert check_bin_size(SECTOR_64G_PAYLOAD) == 68_182_605_824
    with pytest.raises(UsageError, match="64 GiB sector"):
        check_bin_size(SECTOR_64G_PAYLOAD + 1)
    with pytest.raises(UsageError, match="too small"):
        check_bin_size(MiB)
    with pytest.raises(UsageError, match="cannot read size"):
        parse_size("12 parsecs")


# ---------------------------------------------------------------- plain packs


@pytest.mark.interop
def test_plain_pack_is_read_by_ipfs_car_and_commp_matches(tmp_path, source, ipfs_car):
    out = tmp_path / "out"
    result = json.loads(
        packerfs("pack", source, out, "--bin-size", "4MiB", "--no-encryption", "-t", tmp_path / "state", "--json").stdout
    )
    cars = cars_in(out)
    assert len(cars) >= 4, "a 9 MiB file in 4 MiB bins must split across bins"
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0].keys())[:5] == CSV_COLUMNS[:5]
    assert [r["car_file"] for r in rows] == [c.name for c in cars]
    unpacked = tmp_path / "unpacked"
    for car_path, row in zip(cars, rows):
        assert car_path.stat().st_size <= BIN
        assert int(row["car_size"]) == car_path.stat().st_size
        info = commp_file(car_path)
        assert (info.piece_cid, info.piece_size) == (row["piece_cid"], int(row["piece_size"]))
        roots = run_tool(ipfs_car, "roots", car_path, check=True).stdout.decode().split()
        assert roots == [row["payload_cid"]]
        assert run_tool(ipfs_car, "blocks", car_path, "--verify").returncode == 0
        unpack = run_tool(ipfs_car, "unpack", car_path, "-o", unpacked)
        assert unpack.returncode == 0, unpack.stderr
    # Every bin but the last is as full as 1 MiB leaves allow in a 4 MiB bin.
    assert all(c["fill"] > 0.74 for c in result["cars"][:-1])
    # Unsplit files come out of ipfs-car as they went in; parts concatenate to the original.
    assert (unpacked / "sub" / "mib-plus").read_bytes() == (source / "sub" / "mib-plus").read_bytes()
    parts = sorted((unpacked / "sub").glob("big.bin.part*"))
    assert len(parts) >= 3
    assert b"".join(p.read_bytes() for p in parts) == (source / "sub" / "big.bin").read_bytes()
    # ipfs-car 3.1 writes UnixFS symlinks as empty files; packerfs unpack restores them as links.
    assert (unpacked / "sub" / "link").exists()
    assert (unpacked / "empty-dir").is_dir()


@pytest.mark.interop
def test_commp_equals_independent_implementations(tmp_path, source):
    """data-segment (npm) and our pure-Python reference agree with manifest.csv."""
    node_modules = ROOT / "node_modules" / "@web3-storage" / "data-segment"
    if not node_modules.exists():
        pytest.skip("@web3-storage/data-segment not installed (./run setup installs it)")
    out = tmp_path / "out"
    packerfs("pack", source, out, "--bin-size", "4MiB", "--no-encryption", "-t", tmp_path / "state")
    rows = {r["car_file"]: r for r in read_csv(out / "manifest.csv")}
    script = (
        "import { Piece } from '@web3-storage/data-segment';\n"
        "import { readFileSync } from 'node:fs';\n"
        "for (const f of process.argv.slice(2)) {\n"
        "  const p = Piece.fromPayload(readFileSync(f));\n"
        "  console.log(JSON.stringify({file: f, v2: p.link.toString(), size: Number(p.size)}));\n"
        "}\n"
    )
    script_path = ROOT / "node_modules" / ".packerfs-commp-test.mjs"
    script_path.write_text(script)
    try:
        cars = cars_in(out)
        result = run_tool("node", script_path, *cars, check=True)
    finally:
        script_path.unlink()
    for line in result.stdout.decode().splitlines():
        theirs = json.loads(line)
        row = rows[Path(theirs["file"]).name]
        assert theirs["size"] == int(row["piece_size"])
        assert theirs["v2"] == row["piece_cid_v2"]  # FRC-0069: root, height and padding in one CID
    smallest = min(cars, key=lambda p: p.stat().st_size)
    root, piece_size = reference_commp(smallest.read_bytes())
    assert (piece_cid_v1(root), piece_size) == (rows[smallest.name]["piece_cid"], int(rows[smallest.name]["piece_size"]))


@pytest.mark.interop
def test_plain_subdirectory_cid_equals_ipfs_car(tmp_path, ipfs_car):
    src = tmp_path / "src"
    write_random(src / "d" / "x.bin", 3 * MiB + 11, 1)
    write_random(src / "d" / "nested" / "y", 5000, 2)
    (src / "d" / "nested" / "empty").write_bytes(b"")
    packerfs("pack", src, tmp_path / "out", "--no-encryption", "--bin-size", "64MiB", "-t", tmp_path / "state")
    with car.CarReader(cars_in(tmp_path / "out")[0]) as reader:
        blocks = {s.cid: reader.read_block(s) for s in reader.sections()}
        root = decode_node(blocks[reader.roots[0]])
    ours = next(link.cid for link in root.links if link.name == b"d")
    run_tool(ipfs_car, "pack", src / "d", "--no-wrap", "-o", tmp_path / "d.car", check=True)
    theirs = run_tool(ipfs_car, "roots", tmp_path / "d.car", check=True).stdout.decode().split()
    assert theirs == [cid_to_str(ours)]


def test_large_directory_is_hamt_sharded(tmp_path):
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(5000):
        (src / "big" / f"entry-with-a-longish-name-{i:05d}").write_bytes(b"%d" % i)
    engine = Engine.open(str(src), str(tmp_path / "state"), make_cipher(no_encryption=True), 64 * MiB)
    engine.scan()
    paths = engine.write(str(tmp_path / "out")).written
    engine.close()
    with car.CarReader(paths[0]) as reader:
        blocks = {s.cid: reader.read_block(s) for s in reader.sections()}
        root = decode_node(blocks[reader.roots[0]])
    big = next(link.cid for link in root.links if link.name == b"big")
    assert UnixFSData.decode(decode_node(blocks[big]).data).type == HAMT_SHARD


# ---------------------------------------------------------------- determinism


def _age_engine(tmp_path, src, bin_size=BIN):
    key = tmp_path / "key.txt"
    recipient = write_age_identity(str(key)) if not key.exists() else None
    if recipient is None:
        recipient = key.read_text().split("public key: ")[1].split()[0]
    return Engine.open(str(src), str(tmp_path / "state"), make_cipher([recipient]), bin_size)


def test_packing_twice_with_one_state_gives_identical_cars(tmp_path, source):
    """CARs written during the scan equal what BinReader regenerates later, and a rescan changes nothing."""
    engine = _age_engine(tmp_path, source)
    engine.scan(car_dir=str(tmp_path / "one"))
    first = [p.read_bytes() for p in cars_in(tmp_path / "one")]
    assert len(first) == len(engine.bins())
    report = engine.scan()
    assert report.bins_sealed == [] and report.files_placed == 0
    second = [Path(p).read_bytes() for p in engine.write(str(tmp_path / "two")).written]
    engine.close()
    assert first == second
    assert all(len(data) <= BIN for data in first)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bin_reader_ranges_equal_written_files(tmp_path_factory, data):
    tmp_path = tmp_path_factory.mktemp("ranges")
    global _RANGES_CACHE
    if "_RANGES_CACHE" not in globals():
        src = make_small_tree(tmp_path / "src")
        engine = _age_engine(tmp_path, src)
        engine.scan()
        written = [Path(p).read_bytes() for p in engine.write(str(tmp_path / "out")).written]
        _RANGES_CACHE = (engine, written)
    engine, written = _RANGES_CACHE
    number = data.draw(st.integers(1, len(written)))
    blob = written[number - 1]
    offset = data.draw(st.integers(0, len(blob)))
    size = data.draw(st.integers(0, 3 * MiB))
    assert engine.reader().read(number, offset, size) == blob[offset : offset + size]


# ---------------------------------------------------------------- faults


def test_changed_source_is_refused_and_other_bins_still_read(tmp_path, source):
    engine = _age_engine(tmp_path, source)
    engine.scan()
    reader = engine.reader()
    sizes = {b["bin"]: b["car_size"] for b in engine.bins()}
    target = source / "sub" / "mib-plus"
    holding = _bins_holding(engine, b"sub/mib-plus")
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.write_bytes(bytes(data))  # same size
    for number, size in sizes.items():
        if number in holding:
            with pytest.raises(SourceChanged, match="mib-plus") as err:
                reader.read(number, 0, size)
            assert "\n" not in str(err.value)
        else:
            assert len(reader.read(number, 0, size)) == size
    engine.close()


def _bins_holding(engine: Engine, path: bytes) -> set[int]:
    version = engine.index.latest_version(path)
    return set(engine.index.file(version)["bins"])


def test_rescan_keeps_sealed_bins_and_reports_changes(tmp_path, source):
    engine = _age_engine(tmp_path, source)
    engine.scan()
    before = {b["bin"]: (b["piece_cid"], b["car_size"]) for b in engine.bins()}
    changed_bins = _bins_holding(engine, b"sub/mib-minus")
    (source / "sub" / "mib-minus").write_bytes(b"different content")
    write_random(source / "new" / "file", 2 * MiB, 9)
    report = engine.scan()
    after = {b["bin"]: b for b in engine.bins()}
    for number, (piece, size) in before.items():
        assert (after[number]["piece_cid"], after[number]["car_size"]) == (piece, size)
        # the bin that held the old version still holds other live files: current, but not regenerable
        assert after[number]["status"] == "current"
        assert after[number]["regenerable"] == (number not in changed_bins)
    assert report.bins_sealed and min(report.bins_sealed) > max(before)
    assert b"sub/mib-minus" in report.changed_paths and report.changed == 1
    assert report.snapshot["id"] == 2 and report.snapshot["bins"] == [max(report.bins_sealed)]
    assert report.files_placed == 2
    engine.close()


def test_missing_and_reserved_source_names(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        Engine.open(str(tmp_path / "nope"), str(tmp_path / "state"), make_cipher(no_encryption=True), BIN)
    src = tmp_path / "src"
    (src / ".packerfs").mkdir(parents=True)
    result = packerfs("pack", src, tmp_path / "out", "--no-encryption", "-t", tmp_path / "state", check=False)
    assert result.returncode == 2
    assert b"reserved" in result.stderr and len(result.stderr.decode().strip().splitlines()) == 1


def test_state_directory_for_other_options_is_refused(tmp_path, source):
    packerfs("pack", source, tmp_path / "out", "--no-encryption", "--bin-size", "4MiB", "-t", tmp_path / "state")
    result = packerfs("pack", source, tmp_path / "out", "--no-encryption", "--bin-size", "8MiB", "-t", tmp_path / "state", check=False)
    assert result.returncode == 2 and b"different bin_size" in result.stderr


def test_no_recipient_is_refused_with_advice(tmp_path, source):
    result = packerfs("pack", source, tmp_path / "out", "-t", tmp_path / "state", check=False)
    assert result.returncode == 2
    message = result.stderr.decode()
    assert "--recipient" in message and "--no-encryption" in message and "keygen" in message


def _without_dac_override() -> list[str]:
    """Root reads every file; dropping CAP_DAC_OVERRIDE/READ_SEARCH makes mode 000 mean unreadable again."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        return []
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to drop root's file-permission override")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_source_files_are_listed_or_skipped(tmp_path):
    prefix = _without_dac_override()
    src = tmp_path / "src"
    write_random(src / "ok", 100, 1)
    write_random(src / "secret-1", 100, 2)
    write_random(src / "deep" / "secret-2", 100, 3)
    (src / "secret-1").chmod(0)
    (src / "deep" / "secret-2").chmod(0)
    base = prefix + [sys.executable, "-m", "packerfs.cli", "pack", str(src), str(tmp_path / "out")]
    base += ["--no-encryption", "-t", str(tmp_path / "state")]
    failed = subprocess.run(base, capture_output=True, cwd=ROOT, timeout=120)
    assert failed.returncode == 1, failed.stderr
    message = failed.stderr.decode()
    assert "secret-1" in message and "deep/secret-2" in message and len(message.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.car"))
    skipped = subprocess.run(base + ["--skip-unreadable", "--json"], capture_output=True, cwd=ROOT, timeout=120)
    assert skipped.returncode == 3, skipped.stderr
    listed = {s["path"] for s in json.loads(skipped.stdout)["skipped"]}
    assert {"secret-1", "deep/secret-2"} <= listed


def test_interrupted_pack_resumes_to_identical_output(tmp_path):
    """SIGKILL after the second sealed bin; the rerun resumes and matches an uninterrupted pack."""
    src = tmp_path / "src"
    for i in range(12):
        write_random(src / f"d{i % 3}" / f"f{i:02d}", 700_000 + 1000 * i, i)
    state = tmp_path / "state"
    engine = Engine.open(str(src), str(state), make_cipher(no_encryption=True), BIN)
    engine.close()
    shutil.copytree(state, tmp_path / "state-copy")
    killer = (
        "import os, signal, sys\n"
        "from packerfs.pack import Engine\n"
        "from packerfs.crypt import make_cipher\n"
        "seals = []\n"
        "def on_seal(result):\n"
        "    seals.append(result)\n"
        "    if len(seals) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"e = Engine.open({str(src)!r}, {str(state)!r}, make_cipher(no_encryption=True), {BIN})\n"
        "e.scan(on_seal=on_seal)\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer], cwd=ROOT, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    resumed = Engine.open(str(src), str(state), make_cipher(no_encryption=True), BIN)
    assert len(resumed.bins()) == 2
    report = resumed.scan()
    assert report.bins_sealed[0] == 3 and report.skipped > 0
    resumed_cars = [Path(p).read_bytes() for p in resumed.write(str(tmp_path / "resumed")).written]
    resumed.close()
    straight = Engine.open(str(src), str(tmp_path / "state-copy"), make_cipher(no_encryption=True), BIN)
    straight.scan()
    straight_cars = [Path(p).read_bytes() for p in straight.write(str(tmp_path / "straight")).written]
    straight.close()
    assert resumed_cars == straight_cars


def test_manifest_describes_every_entry(tmp_path, source):
    out = tmp_path / "out"
    packerfs("pack", source, out, "--bin-size", "4MiB", "--no-encryption", "-t", tmp_path / "state")
    parts: dict[bytes, list] = {}
    kinds = {}
    for car_path in cars_in(out):
        with car.CarReader(car_path) as reader:
            blocks = {s.cid: reader.read_block(s) for s in reader.sections()}
            root = decode_node(blocks[reader.roots[0]])
            meta = decode_node(blocks[next(l.cid for l in root.links if l.name == b".packerfs")])
            mroot = next(l.cid for l in meta.links if l.name == b"manifest.cbor")
            data = blocks[mroot]  # small manifests are a single raw leaf
            decoded = manifest_format.decode_manifest(data)
        for entry in decoded["entries"]:
            kinds[entry["path"]] = entry["kind"]
            if entry["kind"] == "file":
                parts.setdefault(entry["path"], []).append((entry["part"], entry["parts"], entry["offset"], entry["length"], entry["stream"]))
    assert kinds[b"empty-dir"] == "dir" and kinds[b"sub/link"] == "symlink" and kinds[b"dangling"] == "symlink"
    for path, pieces in parts.items():
        pieces.sort()
        assert [p[0] for p in pieces] == list(range(1, pieces[0][1] + 1))
        assert sum(p[3] for p in pieces) == pieces[0][4]
        assert all(a[2] + a[3] == b[2] for a, b in zip(pieces, pieces[1:]))
    assert len(parts[b"sub/big.bin"]) >= 3


def test_bins_fill_to_the_leaf_granularity(tmp_path):
    """With bins much larger than a leaf, every bin but the last is at least 99% full."""
    src = tmp_path / "src"
    import random

    rng = random.Random(5)
    for i in range(80):
        path = src / f"d{i % 4}" / f"f{i:02d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(rng.choice([rng.randrange(1, 200_000), rng.randrange(MiB, 20 * MiB)]))
    engine = Engine.open(str(src), str(tmp_path / "state"), make_cipher(no_encryption=True), 100 * MiB)
    engine.scan()
    bins = engine.bins()
    engine.close()
    assert len(bins) >= 3
    for b in bins:
        assert b["car_size"] <= 100 * MiB
    for b in bins[:-1]:
        assert b["car_size"] / (100 * MiB) >= 0.99, b


def test_packer_front_end_help_and_pack(tmp_path, source):
    result = run_tool(sys.executable, "-m", "packerfs.packer_cli", "-h", cwd=ROOT)
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "SYNOPSIS" in text and "-p|-u" in text and "-b BIN_SIZE" in text
    done = run_tool(
        sys.executable, "-m", "packerfs.packer_cli", "-p", "-s", source, "-t", tmp_path / "state",
        "-o", tmp_path / "out", "-b", "4MiB", cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "manifest.csv").exists() and cars_in(tmp_path / "out")


def _kill_after_seals(src: Path, state: Path, recipients: list[str], seals: int, cipher: str | None = None) -> None:
    if cipher is None:
        cipher = f"make_cipher({recipients!r})" if recipients else "make_cipher(no_encryption=True)"
    script = (
        "import os, signal\n"
        "from packerfs.pack import Engine\n"
        "from packerfs.crypt import make_cipher\n"
        "count = []\n"
        "def on_seal(result):\n"
        "    count.append(result)\n"
        f"    if len(count) == {seals}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"e = Engine.open({str(src)!r}, {str(state)!r}, {cipher}, {BIN})\n"
        "e.scan(on_seal=on_seal)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_interrupted_inside_a_split_file_continues_it(tmp_path, encrypted):
    """Killed right after sealing the first part of a split file: the rerun continues that file."""
    src = tmp_path / "src"
    original = write_random(src / "huge.bin", 10 * MiB + 3, 1)
    write_random(src / "z-after", 5000, 2)
    recipients = [write_age_identity(str(tmp_path / "key.txt"))] if encrypted else []
    cipher = make_cipher(recipients) if encrypted else make_cipher(no_encryption=True)
    state = tmp_path / "state"
    Engine.open(str(src), str(state), cipher, BIN).close()
    shutil.copytree(state, tmp_path / "state-copy")
    _kill_after_seals(src, state, recipients, 1)
    engine = Engine.open(str(src), str(state), cipher, BIN)
    sealed_before = engine.reader().read(1, 0, engine.reader().size(1))
    record = engine.index.file(engine.index.latest_version(b"huge.bin"))
    assert not record["complete"] and record["leaves_sealed"] == 3
    report = engine.scan()
    assert report.bins_sealed[0] == 2
    cars = [Path(p) for p in engine.write(str(tmp_path / "out")).written]
    engine.close()
    assert cars[0].read_bytes() == sealed_before
    if encrypted:
        parts = []
        for car_path in cars:
            run_tool(find_tool("ipfs-car") or "ipfs-car", "unpack", car_path, "-o", tmp_path / "un", check=True)
        parts = sorted((tmp_path / "un").glob("huge.bin.age.part*"))
        assert len(parts) == 4
        stream = b"".join(p.read_bytes() for p in parts)
        decrypted = subprocess.run(
            ["age", "-d", "-i", str(tmp_path / "key.txt")], input=stream, capture_output=True, timeout=60
        )
        assert decrypted.returncode == 0, decrypted.stderr
        assert decrypted.stdout == original
    else:
        straight = Engine.open(str(src), str(tmp_path / "state-copy"), cipher, BIN)
        straight.scan()
        expected = [Path(p).read_bytes() for p in straight.write(str(tmp_path / "straight")).written]
        straight.close()
        assert [c.read_bytes() for c in cars] == expected


@pytest.mark.interop
def test_interrupted_openpgp_split_file_resumes_at_its_last_sealed_leaf(tmp_path, gpg_ed_key, ipfs_car):
    """OpenPGP's MDC is sequential: the stored SHA-1 state lets the rerun skip the sealed prefix."""
    src = tmp_path / "src"
    original = write_random(src / "huge.bin", 10 * MiB + 3, 1)
    home = str(gpg_ed_key["home"])
    expr = f"make_cipher(gpg_recipients=[{gpg_ed_key['fpr']!r}], gpg_homedir={home!r})"
    cipher = make_cipher(gpg_recipients=[gpg_ed_key["fpr"]], gpg_homedir=home)
    state = tmp_path / "state"
    Engine.open(str(src), str(state), cipher, BIN).close()
    _kill_after_seals(src, state, [], 1, cipher=expr)
    engine = Engine.open(str(src), str(state), cipher, BIN)
    sealed = engine.index.file(engine.index.latest_version(b"huge.bin"))["leaves_sealed"]
    report = engine.scan()
    # the rerun read the rest of the file and (about) one leaf of the sealed prefix, not all of it
    assert report.bytes_read <= len(original) - (sealed - 1) * MiB, (report.bytes_read, sealed)
    cars = [Path(p) for p in engine.write(str(tmp_path / "out")).written]
    engine.close()
    for car_path in cars:
        run_tool(ipfs_car, "unpack", car_path, "-o", tmp_path / "un", check=True)
    stream = b"".join(p.read_bytes() for p in sorted((tmp_path / "un").glob("huge.bin.gpg.part*")))
    decrypted = subprocess.run(
        ["gpg", "--homedir", home, "--batch", "-d"], input=stream, capture_output=True, timeout=60
    )
    assert decrypted.returncode == 0, decrypted.stderr
    assert decrypted.stdout == original


def test_source_changed_between_interruption_and_resume(tmp_path):
    """A split file edited after its first part was sealed: the file starts over and that bin retires."""
    src = tmp_path / "src"
    write_random(src / "huge.bin", 10 * MiB, 1)
    state = tmp_path / "state"
    cipher = make_cipher(no_encryption=True)
    Engine.open(str(src), str(state), cipher, BIN).close()
    _kill_after_seals(src, state, [], 1)
    changed = write_random(src / "huge.bin", 10 * MiB, 2)
    os.utime(src / "huge.bin", ns=(1, 1))
    engine = Engine.open(str(src), str(state), cipher, BIN)
    report = engine.scan()
    assert report.retired_bins == [1] and b"huge.bin" in report.changed_paths
    assert engine.index.bin(1)["status"] == "retired"  # it held nothing but the abandoned version
    record = engine.index.file(engine.index.latest_version(b"huge.bin"))
    assert record["complete"] and 1 not in record["bins"]
    out = [Path(p) for p in engine.write(str(tmp_path / "out")).written]
    engine.close()
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    # the retired bin is not needed (and cannot be generated any more), so it is neither written nor listed
    assert [r["car_file"] for r in rows] == [p.name for p in out] and "bin-000001.car" not in rows[0]["car_file"]
    cids = set()
    for car_path in out:
        with car.CarReader(car_path) as reader:
            cids.update(section.cid for section in reader.sections())
    assert all(make_cid(RAW, changed[i : i + MiB]) in cids for i in range(0, len(changed), MiB))


@pytest.mark.parametrize("length", [0, 1, 23, 24, 255, 256, 65535, 65536])
@pytest.mark.parametrize("kind", manifest_format.KINDS)
def test_manifest_entry_bound_is_exact_for_the_worst_case(kind, length):
    """The planner's bound equals the encoding of an entry with every number at its widest."""
    text = b"x" * length
    worst = manifest_format._worst_case(kind)
    worst["path"] = text
    if kind == "file":
        worst["name"] = text
    if kind == "symlink":
        worst["target"] = text
    name = text if kind == "file" else b""
    target = text if kind == "symlink" else b""
    assert len(manifest_format.encode_entry(worst)) == manifest_format.entry_bound(kind, text, name, target)


def test_concurrent_reads_survive_file_cache_eviction(tmp_path, source):
    """Eight threads over many files with one open source file allowed: evictions never break a read."""
    import concurrent.futures
    import random

    from packerfs.pack.reader import BinReader

    engine = _age_engine(tmp_path, source)
    engine.scan()
    written = {b["bin"]: Path(p).read_bytes() for b, p in zip(engine.bins(), engine.write(str(tmp_path / "out")).written)}
    reader = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=1, open_files=1)
    rng = random.Random(3)
    jobs = []
    for _ in range(200):
        number = rng.choice(list(written))
        offset = rng.randrange(len(written[number]))
        jobs.append((number, offset, rng.randrange(1, 300_000)))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: reader.read(*job), jobs))
    for (number, offset, size), data in zip(jobs, results):
        assert data == written[number][offset : offset + size]
    engine.close()


def test_index_of_another_format_is_refused(tmp_path, source):
    from packerfs.index.store import FORMAT, Index, pack

    engine = Engine.open(str(source), str(tmp_path / "state"), make_cipher(no_encryption=True), BIN)
    with engine.index.env.begin(write=True) as txn:
        txn.put(b"format", pack(FORMAT - 1), db=engine.index.meta)
    engine.close()
    with pytest.raises(UsageError, match="format"):
        Index(str(tmp_path / "state"))


@pytest.mark.parametrize("hide_names", [False, True])
def test_state_holds_no_usable_key_material(tmp_path, source, hide_names):
    """Invariant 5: the index never contains the dataset secret, nor (hidden names: the sealed
    manifests' params are kept there) the keys derived from it; the secret file is 0600."""
    from packerfs.privacy.names import names_key
    from packerfs.privacy.sealed_manifest import seed_key

    engine = _age_engine(tmp_path, source)
    state = tmp_path / "state"
    if hide_names:
        engine.close()
        state = tmp_path / "hidden-state"
        engine = Engine.open(str(source), str(state), engine.cipher, BIN, hide_names=True)
    engine.scan()
    secret = engine.secret
    sealed = [r for b in engine.bins() for _, _, r in engine.index.segments_of(b["bin"]) if r[0] == "M"]
    assert bool(sealed) == hide_names
    engine.close()
    key_file = state / "dataset.key"
    assert (key_file.stat().st_mode & 0o777) == 0o600
    index_bytes = b"".join(p.read_bytes() for p in (state / "index.lmdb").iterdir())
    assert len(index_bytes) > 0
    derived = [secret, names_key(secret), seed_key(secret)]
    for key in derived:
        for i in range(0, len(key) - 7):
            assert key[i : i + 8] not in index_bytes
