"""Private by default: hidden names and sealed manifests (--hide-names, the default for encrypted
packs), size padding (--pad-sizes) and seekable zstd compression (--compress), end to end.

Every CAR is checked byte by byte for the source's names and mtimes, and node by node for exact
sizes; the tree comes back through `unpack`, the FUSE mounts and stock tools alone
(tools/stock_restore.sh: ipfs-car, age, zstd, python3-cbor2, jq)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, packerfs, run_tool, within
from packerfs.crypt import make_cipher, write_age_identity
from packerfs.index import Index
from packerfs.ipld.car import CarReader
from packerfs.ipld.cid import DAG_PB, cid_codec
from packerfs.ipld.dagpb import UnixFSData, decode_node
from packerfs.privacy.padding import StoredFrame
from test_mount import OP_TIMEOUT, mount, read_bytes
from test_reverse_mount import preads

MiB = 1 << 20
BIN = "4MiB"
MTIME_NS = 1_234_567_890_123_456_789  # every entry's mtime: searched for in every CAR byte
TOOLS = ROOT / "tools"

# Path components a CAR must never show (each long enough not to turn up in random bytes by chance).
SECRET_WORDS = [
    "patients", "Smith-John-1961", "scan ünïcödé.dcm", "projects", "ACME-merger", "quarter3", "secret plan.txt",
    "ledger-2026.csv", "events.json", "noise-random.bin", "empty-file-Zorro", "empty-dir-Quixote",
    "latest-link", "server-logs", "access.log",
]


def private_tree(root: Path) -> dict[str, int]:
    """Names worth hiding, text that compresses, random data split across bins, an empty file, an
    empty directory and a symlink; every mtime MTIME_NS. Returns each regular file's size."""
    rng = random.Random(14)
    files = {
        "patients/Smith-John-1961/scan ünïcödé.dcm": rng.randbytes(70_000),
        "projects/ACME-merger/quarter3/secret plan.txt": b"merge on the first of the month\n" * 300,
        "projects/ACME-merger/ledger-2026.csv": b"".join(b"%d,ACME,%d.%02d\n" % (i, i * 7 % 1000, i % 100) for i in range(200_000)),
        "projects/events.json": b"\n".join(b'{"id": %d, "kind": "event-%d"}' % (i, i % 13) for i in range(60_000)),
        "noise-random.bin": rng.randbytes(9 * MiB + 4321),
        "server-logs/access.log": b"".join(b"10.0.%d.%d - - GET /item/%d 200\n" % (i % 200, i % 250, i) for i in range(40_000)),
        "empty-file-Zorro": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "patients/Smith-John-1961/scan ünïcödé.dcm").chmod(0o640)
    (root / "empty-dir-Quixote").mkdir()
    os.symlink("projects/ACME-merger/quarter3/secret plan.txt", root / "latest-link")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))
    return {rel: len(data) for rel, data in files.items()}


def snapshot_of(root: Path) -> dict:
    """Every path under root: (kind, mode, mtime_ns, bytes or target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_mtime_ns, path.read_bytes())
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    sizes = private_tree(root / "src")
    recipient = write_age_identity(root / "key.txt")
    return {"root": root, "src": root / "src", "key": root / "key.txt", "recipient": recipient, "sizes": sizes}


def pack(work, name: str, *options, check=True):
    out, state = work["root"] / f"out-{name}", work["root"] / f"state-{name}"
    result = packerfs(
        "pack", work["src"], out, "-t", state, "-r", work["recipient"], "--bin-size", BIN, "--json", *options,
        timeout=180, check=check,
    )
    return out, state, result


def car_blocks(car: Path):
    with CarReader(str(car)) as reader:
        for section in reader.sections():
            yield section.cid, reader.read_block(section, verify=True)


OPTION_SETS = {
    "hidden": [],
    "compress": ["--compress", "zstd"],
    "pad": ["--pad-sizes"],
    "both": ["--compress", "zstd:9", "--pad-sizes"],
    "clear-both": ["--show-names", "--compress", "zstd", "--pad-sizes"],
}


@pytest.fixture(scope="module")
def packs(work):
    return {name: pack(work, name, *options)[:2] for name, options in OPTION_SETS.items()}


# ---------------------------------------------------------------- nothing leaks


def test_hidden_names_padded_sizes_leak_nothing(work, packs, ipfs_car):
    out, _ = packs["both"]
    cars = sorted(out.glob("*.car"))
    assert len(cars) >= 3
    mtime_patterns = [str(MTIME_NS).encode(), str(MTIME_NS // 10**9).encode(), b"\x1b" + MTIME_NS.to_bytes(8, "big")]
    words = [w.encode() for w in SECRET_WORDS]
    listing_re = re.compile(
        r"\.(/\.packerfs(/(manifest|snapshot)\.cbor\.age(\.part\d{4,}of\d{4,})?)?|/[0-9a-f]{32}(\.zst)?\.age)?"
    )
    cipher = make_cipher([work["recipient"]])
    revealing = set()  # what would give a file's exact size away: the size, and its unpadded stream sizes
    for size in work["sizes"].values():
        if size > 1024:
            revealing |= {size, cipher.stream_size(size), cipher.stream_size(StoredFrame.size_for(size))}
    for car in cars:
        data = car.read_bytes()
        for word in words + mtime_patterns:
            assert word not in data, (car.name, word)
        strings = run_tool("strings", "-n", "4", car).stdout
        for word in words + [str(MTIME_NS // 10**9).encode()]:
            assert word not in strings
        listing = run_tool(ipfs_car, "ls", car).stdout.decode().split()
        assert listing and all(listing_re.fullmatch(line) for line in listing), listing
        sizes = set()
        for cid, block in car_blocks(car):
            if cid_codec(cid) == DAG_PB:
                fs = UnixFSData.decode(decode_node(block).data or b"")
                sizes.add(fs.filesize)
                sizes.update(fs.blocksizes)
        assert not (sizes & revealing), (car.name, sorted(sizes & revealing))
    for name in ("manifest.csv", "manifest.json"):
        text = (out / name).read_bytes()
        for word in words + mtime_patterns:
            assert word not in text, (name, word)


def test_names_in_clear_with_show_names(packs, ipfs_car):
    out, _ = packs["clear-both"]
    listing = b"".join(run_tool(ipfs_car, "ls", car).stdout for car in sorted(out.glob("*.car"))).decode()
    assert "projects/ACME-merger/ledger-2026.csv.zst.age" in listing
    assert ".packerfs/manifest.cbor\n" in listing + "\n"


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_round_trip_through_unpack_and_ls(name, work, packs, tmp_path):
    out, _ = packs[name]
    restored = tmp_path / "restored"
    packerfs("unpack", out, restored, "-i", work["key"], timeout=120)
    assert snapshot_of(restored) == snapshot_of(work["src"])
    rows = json.loads(packerfs("ls", out, "-i", work["key"], "--json", timeout=60).stdout)
    listed = {r["path"] for r in (rows if isinstance(rows, list) else rows["entries"])}
    assert set(work["sizes"]) <= listed and "latest-link" in listed
    verify = packerfs("verify", out, "-i", work["key"], check=False, timeout=120)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()


@pytest.mark.parametrize("name", ["hidden", "both", "gpg-both"])
def test_stock_tools_alone_restore_a_hidden_pack(name, work, packs, tmp_path, request):
    env = dict(os.environ, PATH=f"{ROOT / 'node_modules' / '.bin'}:/usr/bin:/bin")
    if name == "gpg-both":  # OpenPGP: `gpg` as the key, gpg's keyring from GNUPGHOME
        gpg_key = request.getfixturevalue("gpg_ed_key")
        out = tmp_path / "gpg-cars"
        packerfs("pack", work["src"], out, "-t", tmp_path / "gpg-state", "--gpg-recipient", gpg_key["fpr"],
                 "--gpg-homedir", gpg_key["home"], "--bin-size", BIN, "--compress", "zstd", "--pad-sizes", timeout=180)
        key, env["GNUPGHOME"] = "gpg", str(gpg_key["home"])
    else:
        out, key = packs[name][0], work["key"]
    restored = tmp_path / "stock"
    result = subprocess.run(
        ["bash", TOOLS / "stock_restore.sh", key, out, restored], env=env, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()
    mine, theirs = snapshot_of(restored), snapshot_of(work["src"])
    assert mine.keys() == theirs.keys()
    for rel, value in theirs.items():
        if value[0] == "file":
            assert mine[rel][3] == value[3] and mine[rel][1] == value[1], rel
            assert abs(mine[rel][2] - value[2]) < 10_000, rel  # jq reads numbers as doubles: ~µs
        elif value[0] == "link":
            assert mine[rel] == value


def test_readme_shows_the_stock_restore_script():
    readme = (ROOT / "README.md").read_text()
    script = (TOOLS / "stock_restore.sh").read_text()
    body = script.split("set -euo pipefail\n", 1)[1]
    assert body.strip() in readme, "README's stock restore differs from tools/stock_restore.sh"


def test_a_compressed_file_restores_with_age_and_zstd(work, packs, tmp_path, ipfs_car):
    out, _ = packs["clear-both"]
    unpacked = tmp_path / "u"
    for car in sorted(out.glob("*.car")):
        run_tool(ipfs_car, "unpack", car, "--output", unpacked / car.stem)
    found = list(unpacked.glob("*/projects/ACME-merger/ledger-2026.csv.zst.age"))
    assert len(found) == 1
    age = subprocess.run(["age", "-d", "-i", work["key"], found[0]], capture_output=True, check=True, timeout=60)
    plain = subprocess.run(["zstd", "-d", "-q", "-c"], input=age.stdout, capture_output=True, check=True, timeout=60)
    assert plain.stdout == (work["src"] / "projects/ACME-merger/ledger-2026.csv").read_bytes()
    assert len(age.stdout) < len(plain.stdout) // 3  # it did compress


def test_compression_makes_text_smaller_and_media_costs_nothing(work, packs):
    def car_bytes(name):
        return sum(c.stat().st_size for c in packs[name][0].glob("*.car"))

    assert car_bytes("compress") < 0.6 * car_bytes("hidden")
    plan = json.loads((packs["compress"][0] / "manifest.json").read_text())
    assert plan["cars"]


def test_without_the_key_one_line_and_plain_packs_cannot_hide(work, packs, tmp_path):
    out, _ = packs["hidden"]
    for command in (["ls", out], ["verify", out], ["snapshots", out], ["unpack", out, tmp_path / "x"]):
        result = packerfs(*command, check=False, timeout=60)
        err = result.stderr.decode()
        assert result.returncode == 1 and "manifest.cbor.age" in err and "identity" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.txt"
    write_age_identity(other)
    result = packerfs("ls", out, "-i", other, check=False, timeout=60)
    assert result.returncode == 1 and "none of the identities" in result.stderr.decode()
    result = packerfs("pack", work["src"], tmp_path / "o", "-t", tmp_path / "s", "--no-encryption", "--hide-names",
                      check=False, timeout=60)
    assert result.returncode == 2 or result.returncode == 1
    assert "--hide-names needs encryption" in result.stderr.decode()
    # a state keeps its choice
    _, state = packs["hidden"]
    result = packerfs("pack", work["src"], tmp_path / "o2", "-t", state, "-r", work["recipient"], "--bin-size", BIN,
                      "--show-names", check=False, timeout=60)
    assert result.returncode != 0 and "different names" in result.stderr.decode()


# ---------------------------------------------------------------- the mounts


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_mounts_serve_the_same_bytes_and_the_tree(name, work, packs, tmp_path):
    """The pack view of SRC (same state, so same bins) gives the CARs `pack` wrote, byte for byte;
    the reverse mount of them gives the whole tree, and random reads of a (compressed, padded) file."""
    out, state = packs[name]
    options = ["-r", work["recipient"], "--bin-size", BIN, *OPTION_SETS[name]]
    with mount(work["src"], tmp_path / "mnt", state, *options) as m:
        m.wait_ready()
        names = m.cars()
        assert names == sorted(c.name for c in out.glob("*.car"))
        for name in names:
            assert within(OP_TIMEOUT * 3, read_bytes, m.mnt / name) == (out / name).read_bytes(), name
    rel = "projects/ACME-merger/ledger-2026.csv"
    original = (work["src"] / rel).read_bytes()
    rng = random.Random(3)
    ranges = [(rng.randrange(0, len(original)), rng.choice([1, 4096, 128 << 10, MiB + 7])) for _ in range(60)]
    with mount(out, tmp_path / "rev", tmp_path / "rstate", "--reverse", "-i", work["key"]) as m:
        got = preads(m.mnt / rel, ranges)
        assert got == [original[o : o + n] for o, n in ranges]
        assert within(OP_TIMEOUT * 3, snapshot_of, m.mnt) == snapshot_of(work["src"])
        assert within(OP_TIMEOUT, read_bytes, m.mnt / "noise-random.bin") == (work["src"] / "noise-random.bin").read_bytes()
        assert within(OP_TIMEOUT, os.readlink, m.mnt / "latest-link") == os.readlink(work["src"] / "latest-link")
        assert within(OP_TIMEOUT, os.listdir, m.mnt / "empty-dir-Quixote") == []
        st = within(OP_TIMEOUT, os.stat, m.mnt / "patients/Smith-John-1961/scan ünïcödé.dcm")
        assert st.st_mode & 0o777 == 0o640 and st.st_mtime_ns == MTIME_NS


def test_parallel_sealing_round_trips(work, tmp_path):
    out, _, result = pack(work, "parallel", "--compress", "zstd", "--pad-sizes", "--workers", "2")
    assert len(json.loads(result.stdout)["cars"]) >= 3
    restored = tmp_path / "r"
    packerfs("unpack", out, restored, "-i", work["key"], timeout=120)
    assert snapshot_of(restored) == snapshot_of(work["src"])


# ---------------------------------------------------------------- the compressor is pinned


def test_another_compressor_gives_eio_and_one_line(work, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(pack(work, "pinned", "--compress", "zstd")[1], state)
    index = Index(str(state))
    try:
        recorded = dict(index.get_meta(b"compressor"))
        assert recorded["library"] == "zstandard" and recorded["level"] == 3
        index.commit(meta=[(b"compressor", {**recorded, "version": "0.0.1"})])  # as if made elsewhere
    finally:
        index.close()
    # writing the CARs again needs the compressed streams regenerated: refused, in one line
    result = packerfs("pack", work["src"], tmp_path / "again", "-t", state, "-r", work["recipient"], "--bin-size",
                      BIN, "--compress", "zstd", check=False, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and "zstandard 0.0.1" in err and "Traceback" not in err, err
    # the pack view serves EIO for the bins holding compressed files, and says why
    options = ["-r", work["recipient"], "--bin-size", BIN, "--compress", "zstd"]
    with mount(work["src"], tmp_path / "mnt", state, *options) as m:
        m.wait_ready()
        failed = 0
        for name in m.cars():
            try:
                within(OP_TIMEOUT * 3, read_bytes, m.mnt / name)
            except OSError as exc:
                assert exc.errno == 5
                failed += 1
        assert failed >= 1
        status = m.status()
        assert any("zstandard 0.0.1" in line for line in json.dumps(status).split("\\n")), status
    # another level is another state
    result = packerfs("pack", work["src"], tmp_path / "o3", "-t", state, "-r", work["recipient"], "--bin-size", BIN,
                      "--compress", "zstd:7", check=False, timeout=60)
    assert result.returncode != 0 and "different compress" in result.stderr.decode()


# ---------------------------------------------------------------- the sealed manifest in the index


@pytest.mark.parametrize("cipher_kind", ["age", "openpgp"])
def test_a_sealed_manifest_of_several_leaves_is_generated_again_exactly(cipher_kind, tmp_path, gpg_ed_key):
    """The index keeps a sealed manifest's plaintext (compressed) and its params, not its ciphertext:
    BinReader encrypts it again to the bytes pack wrote, at any offset, and a damaged plaintext chunk
    is refused (index damaged), never served."""
    from packerfs.errors import PackerfsError
    from packerfs.index.store import pack as pack_value, unpack as unpack_value
    from packerfs.pack import Engine
    from packerfs.pack.reader import BinReader

    src = tmp_path / "src"
    for d in range(6):  # about 3.3 MiB of manifest entries: four leaves, the plaintext lagging the stream
        folder = src / f"customer-{d:02d}-{'x' * 150}"
        folder.mkdir(parents=True)
        for i in range(1000):
            (folder / f"invoice-{i:05d}-{'y' * 200}.txt").write_bytes(b"%d" % i)
    if cipher_kind == "age":
        cipher = make_cipher([write_age_identity(tmp_path / "key.txt")])
    else:
        cipher = make_cipher(gpg_recipients=[gpg_ed_key["fpr"]], gpg_homedir=gpg_ed_key["home"])
    engine = Engine.open(str(src), str(tmp_path / "state"), cipher, 64 * MiB, hide_names=True)
    try:
        engine.scan(car_dir=str(tmp_path / "cars"))
        written = (tmp_path / "cars" / "bin-000001.car").read_bytes()
        kinds = [record[0] for _, _, record in engine.index.segments_of(1)]
        assert kinds.count("M") >= 4 and "S" not in kinds[kinds.index("M") : kinds.index("M") + 4]
        reader = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=1)
        assert b"".join(reader.iter_bin(1)) == written
        manifest_at = [start for start, _, record in engine.index.segments_of(1) if record[0] == "M"]
        rng = random.Random(5)
        for start in manifest_at + [rng.randrange(manifest_at[0], len(written)) for _ in range(20)]:
            fresh = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=1)
            assert fresh.read(1, start, 300_000) == written[start : start + 300_000], start
        # a flipped byte in the stored plaintext of the second chunk
        start, end, record = next((s, e, r) for s, e, r in engine.index.segments_of(1) if r[0] == "M" and r[1] == 1)
        damaged = zlib_flip(record[2])
        key = (1).to_bytes(4, "big") + end.to_bytes(8, "big")
        with engine.index.env.begin(write=True) as txn:
            db = engine.index.segments
            stored = unpack_value(txn.get(key, db=db))
            stored[3] = damaged
            txn.put(key, pack_value(stored), db=db)
        fresh = BinReader(engine.index, engine.source, engine.cipher, engine.secret, cache_leaves=1)
        with pytest.raises(PackerfsError, match="index is damaged"):
            fresh.read(1, start, 100)
    finally:
        engine.close()


def zlib_flip(packed: bytes) -> bytes:
    import zlib

    plain = bytearray(zlib.decompress(packed))
    plain[len(plain) // 2] ^= 0x01
    return zlib.compress(bytes(plain))
