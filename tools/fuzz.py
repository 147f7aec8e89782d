#!/usr/bin/env python3
"""A seeded mutation fuzzer for the read side: CarSet, Tree, verify, ls, restore and the CLI.

    .venv/bin/python tools/fuzz.py --seconds 300 --seed 7        # a campaign
    .venv/bin/python tools/fuzz.py --seconds 20 --seed 1 --json  # what tests/test_fuzz.py runs

Every case starts from a small, valid, hand-built CAR set (three bins: directories, a file split
over bins 1 and 2, small files, a symlink, a zero-length file) and damages it in one of many ways:

* bytes: bit flips, byte changes, truncation, insertion, splicing ranges of one CAR into another,
  edits of a section's length varint, a header root CID with another codec or hash code;
* manifests: decoded, one field of the top level or of an entry replaced (huge or negative
  integers, wrong types, long or hostile byte strings, CIDs of unknown codecs), removed or
  duplicated, entries dropped or repeated; then re-encoded, with every CID above it recomputed
  (manifest leaf, `.packerfs` directory, root directory, CAR header), so the mutated manifest
  passes the block checks and reaches the decoder;
* the set: a FIFO, a directory or an empty file named like a CAR, `bin-99999999999.car`, an
  empty directory.

Each case is run in-process through what `verify`, `ls` and `unpack` use (CarSet.open, Tree.build,
verify, ls, restore into a temporary directory), under SIGALRM (per-case timeout); every few cases,
and for each set-level case, the CLI runs too (subprocess, RLIMIT_AS, timeout). A finding is an
exception other than packerfs's own (PackerfsError and subclasses), a traceback on the CLI's
stderr, an exit code other than 0/1/2/3, a timeout, or a MemoryError / the address-space limit.

Findings whose innermost packerfs frame is in a file listed in KNOWN_FILES are reported apart, as
`known` (the read-side code another engineer owns, whose fixes are proposed as patches); empty
the list once those patches are merged. Run the campaign itself under a memory limit:
`--memory-mb` (default 2048) sets RLIMIT_AS for this process.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH and the installed package

from packerfs import manifest as manifest_format  # noqa: E402
from packerfs.errors import PackerfsError  # noqa: E402
from packerfs.ipld import cbor  # noqa: E402
from packerfs.ipld.car import CarWriter  # noqa: E402
from packerfs.ipld.cid import decode_uvarint, encode_uvarint, make_cid  # noqa: E402
from packerfs.ipld.dagpb import PBLink, UnixFSData, decode_node, encode_node  # noqa: E402
from packerfs.ipld.unixfs import Entry, directory_blocks, file_root_from_leaves, raw_leaf, symlink_block  # noqa: E402

# Source files whose crashes are reported as `known` rather than as failures (see the docstring).
KNOWN_FILES: list[str] = []

DATASET = bytes(range(16))
NS = 1_600_000_000_123_456_789
LEAF = 1 << 20
EXIT_CODES = {0, 1, 2, 3}


# ---------------------------------------------------------------- building CARs


def build_car(manifest: dict | bytes, contents: dict[bytes, bytes], links: dict[bytes, tuple[bytes, bytes]] = {},
              extra: list[tuple[bytes, bytes]] = (), root_override: bytes | None = None) -> bytes:
    """CAR bytes: a root directory linking `contents` (raw leaves by name), `links` (name ->
    (cid, block)), and `.packerfs/manifest.cbor` holding `manifest` (a dict, encoded here with CIDs
    as links, or bytes as they are); `extra` (cid, block) pairs are stored too, unlinked."""
    data = manifest if isinstance(manifest, bytes) else encode_manifest_obj(manifest)
    blocks: dict[bytes, bytes] = {}
    for cid, block in extra:
        blocks.setdefault(cid, block)
    entries = []
    for name, payload in contents.items():
        leaf = raw_leaf(payload)
        blocks.setdefault(leaf.cid, payload)
        entries.append(Entry(name, leaf.cid, len(payload)))
    for name, (cid, block) in links.items():
        blocks.setdefault(cid, block)
        entries.append(Entry(name, cid, len(block)))
    mleaf = raw_leaf(data)
    blocks.setdefault(mleaf.cid, data)
    meta_blocks, meta = directory_blocks([Entry(manifest_format.NAME, mleaf.cid, len(data))])
    for b in meta_blocks:
        blocks.setdefault(b.cid, b.data)
    entries.append(Entry(manifest_format.DIRNAME, meta.cid, meta.tsize))
    root_blocks, root = directory_blocks(entries)
    for b in root_blocks:
        blocks.setdefault(b.cid, b.data)
    import io

    out = io.BytesIO()
    writer = CarWriter(out, root_override or root.cid)
    for cid, block in blocks.items():
        writer.add(cid, block)
    return out.getvalue()


def encode_manifest_obj(obj) -> bytes:
    def linkify(value, key=None):
        if isinstance(value, dict):
            return {k: linkify(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [linkify(v) for v in value]
        if key == "cid" and isinstance(value, bytes) and not isinstance(value, cbor.Link):
            return cbor.Link(value)
        return value

    return cbor.encode(linkify(obj))


def _file(path: bytes, payload: bytes, *, version: int, part: int = 1, parts: int = 1, offset: int = 0,
          length: int | None = None, stream: int | None = None, name: bytes | None = None, mode: int = 0o644) -> dict:
    length = len(payload) if length is None else length
    stream = len(payload) if stream is None else stream
    return {
        "path": path, "kind": "file", "mode": mode, "mtime_ns": NS, "name": name or path, "version": version,
        "size": stream, "stream": stream, "part": part, "parts": parts, "offset": offset, "length": length,
        "cid": raw_leaf(payload).cid,
    }


def seed_set(big: bool = True) -> dict[str, tuple[dict, dict, dict]]:
    """The valid set every case starts from: file name -> (manifest, contents, links)."""
    rng = random.Random(12345)
    small = b"hello, world\n"
    other = rng.randbytes(3000)
    split1 = rng.randbytes(LEAF if big else 4096)
    split2 = rng.randbytes(777)
    total = len(split1) + len(split2)
    link = symlink_block(b"hello.txt")
    dir_blocks, empty_dir = directory_blocks([])
    empty = (empty_dir.cid, dir_blocks[-1].data)
    root = {"path": b"", "kind": "dir", "mode": 0o755, "mtime_ns": NS}
    a = {"path": b"a", "kind": "dir", "mode": 0o750, "mtime_ns": NS}
    m1 = {
        "packerfs": 1, "dataset": DATASET, "bin": 1, "cipher": "plain", "recipients": [],
        "entries": [
            root, a,
            _file(b"hello.txt", small, version=1),
            _file(b"empty", b"", version=2),
            _file(b"big.bin", split1, version=3, part=1, parts=2, length=len(split1), stream=total,
                  name=b"big.bin.part0001of0002"),
        ],
    }
    m2 = {
        "packerfs": 1, "dataset": DATASET, "bin": 2, "cipher": "plain", "recipients": [],
        "entries": [
            _file(b"big.bin", split2, version=3, part=2, parts=2, offset=len(split1), length=len(split2),
                  stream=total, name=b"big.bin.part0002of0002"),
            {"path": b"b", "kind": "dir", "mode": 0o755, "mtime_ns": NS},
            {"path": b"link", "kind": "symlink", "mode": 0o777, "mtime_ns": NS, "target": b"hello.txt",
             "cid": link.cid},
        ],
    }
    # a file whose part is a dag-pb node over three leaves (the target of the node mutations)
    leaves = [rng.randbytes(n) for n in (1000, 1000, 500)]
    node_blocks, node = file_root_from_leaves(raw_leaf(x) for x in leaves)
    tree_file = _file(b"tree.dat", b"".join(leaves), version=5)
    tree_file["cid"] = node.cid
    m3 = {
        "packerfs": 1, "dataset": DATASET, "bin": 3, "cipher": "plain", "recipients": [],
        "entries": [_file(b"other.dat", other, version=4), tree_file],
    }
    tree_extra = [(raw_leaf(x).cid, x) for x in leaves] + [(b.cid, b.data) for b in node_blocks[:-1]]
    if not big:  # a small seed cannot split a file (every part but the last holds whole leaves)
        e = m1["entries"][-1]
        e.update(parts=1, stream=len(split1), size=len(split1))
        m2["entries"].pop(0)
    return {
        "bin-1.car": (m1, {b"hello.txt": small, b"empty": b"", b"big.bin.part0001of0002": split1}, {b"a": empty}, []),
        "bin-2.car": (m2, {b"big.bin.part0002of0002": split2}, {b"link": (link.cid, link.data), b"b": empty}, []),
        "bin-3.car": (m3, {b"other.dat": other}, {b"tree.dat": (node.cid, node_blocks[-1].data)}, tree_extra),
    }


def write_seed(dest: Path, big: bool = True) -> dict[str, bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (manifest, contents, links, extra) in seed_set(big).items():
        data = build_car(manifest, contents, links, extra)
        (dest / name).write_bytes(data)
        out[name] = data
    return out


# ---------------------------------------------------------------- mutations

INTERESTING_INTS = [0, 1, -1, 2, 255, 256, 0o7777, 0o177777, 2**31, 2**32, 2**32 + 1, 10**12, 2**53, 2**63 - 1,
                    2**64 - 1, -(2**63), -(2**64), -5, 99999999999]


def _random_cid(rng: random.Random) -> bytes:
    codec = rng.choice([0x55, 0x70, 0x71, 0x99, 0x0129, 0x300000, 0x12])
    code = rng.choice([0x12, 0x12, 0x00, 0x13, 0xB220, 0x99])
    digest = rng.randbytes(rng.choice([32, 32, 0, 5, 64]))
    return b"\x01" + encode_uvarint(codec) + encode_uvarint(code) + encode_uvarint(len(digest)) + digest


def interesting_value(rng: random.Random):
    pick = rng.randrange(14)
    if pick < 5:
        return rng.choice(INTERESTING_INTS)
    if pick == 5:
        return rng.choice([b"", b"..", b"../x", b"/etc/passwd", b"a//b", b"a\0b", b"x" * 256, b"y" * 300,
                           b"z/" * 40000, b"\xff\xfe", b".", b"a/./b"])
    if pick == 6:
        return rng.choice(["", "plain", "age", "openpgp", "dir", "file", "symlink", "x" * 5000, "\u202e"])
    if pick == 7:
        return rng.choice([None, True, False])
    if pick == 8:
        return rng.choice([[], [1], {}, {"a": 1}, [b"x"] * 3])
    if pick == 9:
        return cbor.Link(_random_cid(rng))
    if pick == 10:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 32]))
    if pick == 11:
        return rng.randint(-(2**64), 2**64 - 1)
    if pick == 12:
        return rng.choice([-1, -100, -(2**40)])
    return rng.randint(0, 5000)


def mutate_manifest(rng: random.Random, manifest: dict) -> dict:
    m = json_copy(manifest)
    entries = m.get("entries")
    how = rng.randrange(10)
    if how <= 3 and isinstance(entries, list) and entries:
        e = rng.choice(entries)
        if isinstance(e, dict):
            key = rng.choice(list(e) + ["cid", "target", "name", "extra"])
            if rng.random() < 0.15:
                e.pop(key, None)
            else:
                e[key] = interesting_value(rng)
    elif how == 4:
        key = rng.choice(list(m) + ["snapshot", "extra"])
        if rng.random() < 0.2:
            m.pop(key, None)
        else:
            m[key] = interesting_value(rng)
    elif how == 5 and isinstance(entries, list) and entries:
        if rng.random() < 0.5:
            entries.pop(rng.randrange(len(entries)))
        else:
            entries.append(json_copy(rng.choice(entries)))
    elif how == 6 and isinstance(entries, list) and entries:
        # a second version or part, or a path under a file/symlink
        e = json_copy(rng.choice(entries))
        if isinstance(e, dict):
            e["path"] = rng.choice([b"hello.txt/x", b"link/evil", b"big.bin/x", b"a", b"new", b"b"])
            if "version" in e:
                e["version"] = rng.choice([1, 3, 5, 2**40])
            entries.append(e)
    elif how == 7 and isinstance(entries, list) and entries:
        e = rng.choice(entries)
        if isinstance(e, dict) and e.get("kind") == "file":
            e["parts"] = rng.choice([10**12, 2**32, 2**20, 3, 0, -1])
            e["part"] = rng.choice([1, 2, e["parts"] if isinstance(e["parts"], int) else 1])
            e["stream"] = rng.choice([e.get("stream", 0), 2**62, 10**15, 2**63 - 1])
    elif how == 8:
        m["bin"] = rng.choice([0, -1, 2**32, 2**32 + 1, 10**12, 2**63 - 1, 4, 10, 1000])
    else:
        if isinstance(entries, list):
            for e in entries:
                if isinstance(e, dict) and rng.random() < 0.3:
                    e[rng.choice(["size", "offset", "length", "mode", "mtime_ns"])] = interesting_value(rng)
    return m


def json_copy(value):
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def _sections(data: bytes) -> list[tuple[int, int]]:
    """(offset, end) of the header and each section, as far as they parse."""
    out = []
    pos = 0
    while pos < len(data):
        try:
            n, p = decode_uvarint(data, pos)
        except ValueError:
            break
        end = p + n
        if n == 0 or end > len(data):
            break
        out.append((pos, end))
        pos = end
    return out


def mutate_bytes(rng: random.Random, data: bytes, donor: bytes) -> bytes:
    buf = bytearray(data)
    spans = _sections(data) or [(0, len(data))]
    start, end = rng.choice(spans)
    if end - start > 4096 and rng.random() < 0.8:
        end = start + 4096  # the structure is at the start of a section, not in the leaf bytes
    how = rng.randrange(9)
    if not buf:
        return bytes(rng.randbytes(rng.randrange(1, 64)))
    if how == 0:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start, max(start + 1, end))
            buf[i] ^= 1 << rng.randrange(8)
    elif how == 1:  # byte changes
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start, max(start + 1, end))
            buf[i] = rng.choice([0, 0xFF, 0x80, 0x7F, rng.randrange(256)])
    elif how == 2:  # truncation
        cut = rng.randrange(0, len(buf))
        del buf[cut:]
    elif how == 3:  # insertion
        i = rng.randrange(start, max(start + 1, end))
        buf[i:i] = rng.randbytes(rng.randint(1, 16))
    elif how == 4:  # splice a range of the donor in
        if donor:
            a = rng.randrange(len(donor))
            piece = donor[a : a + rng.randint(1, 512)]
            i = rng.randrange(len(buf))
            buf[i : i + len(piece)] = piece
    elif how in (5, 6):  # a section's length varint
        try:
            n, p = decode_uvarint(data, start)
        except ValueError:
            n, p = 0, start + 1
        new = rng.choice([0, 1, n - 1, n + 1, n * 2, 2**23 + 1, 2**31, 2**63 - 1, rng.randrange(2**20)])
        buf[start:p] = encode_uvarint(max(new, 0))
    elif how == 7:  # the header root CID: another codec or hash code (byte 15 is the codec)
        if len(buf) > 16:
            buf[rng.choice([14, 15, 16, 17])] = rng.randrange(256)
    else:  # drop or duplicate a section
        if len(spans) > 1:
            s, e = rng.choice(spans[1:])
            if rng.random() < 0.5:
                del buf[s:e]
            else:
                buf[e:e] = data[s:e]
    return bytes(buf)


# ---------------------------------------------------------------- running a case


STATS: Counter = Counter()  # how far the cases got: a fuzzer whose cases all die early finds nothing


class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def _innermost_packerfs(tb) -> str:
    where = "?"
    for frame in traceback.extract_tb(tb):
        fn = frame.filename
        if "/packerfs/" in fn:
            where = f"{os.path.relpath(fn, ROOT)}:{frame.lineno}"
    return where


def run_library(cars: Path, out: Path, timeout: float) -> dict | None:
    """CarSet.open, Tree.build, verify, ls, restore. None if only packerfs errors (or nothing) came out."""
    from packerfs.unpack import CarSet, ls, restore, verify
    from packerfs.unpack.tree import Tree

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    stage = "CarSet.open"
    carset = None
    try:
        try:
            carset = CarSet.open(str(cars))
        except PackerfsError:
            STATS["CarSet.open refused the set"] += 1
            return None
        STATS[f"usable CARs: {len(carset.cars)}"] += 1
        for stage, step in (
            ("Tree.build", lambda: Tree.build(carset, strict=False)),
            ("verify", lambda: verify(carset).lines()),
            ("ls", lambda: ls(carset)),
            ("restore", lambda: restore(carset, str(out), None, force=True).lines()),
        ):
            try:
                step()
                STATS[f"{stage}: ran"] += 1
            except PackerfsError:
                STATS[f"{stage}: packerfs error"] += 1
        return None
    except CaseTimeout:
        return {"kind": "timeout", "stage": stage, "where": stage, "error": f"more than {timeout} s"}
    except (Exception, RecursionError, MemoryError) as exc:  # noqa: B902 - what we are looking for
        return {
            "kind": "exception", "stage": stage, "where": _innermost_packerfs(exc.__traceback__),
            "error": f"{type(exc).__name__}: {str(exc)[:300]}",
            "traceback": "".join(traceback.format_exception(exc))[-3000:],
        }
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if carset is not None:
            with contextlib.suppress(Exception):
                carset.close()


def _limit_memory(mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))

    return apply


def run_cli(cars: Path, work: Path, timeout: float, memory_mb: int) -> dict | None:
    """ls, verify and unpack through the CLI, each in a subprocess under RLIMIT_AS and a timeout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")
    for command in (["ls", str(cars)], ["verify", str(cars)], ["unpack", str(cars), str(work / "cli-out"), "--force"]):
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "packerfs.cli", *command], capture_output=True, timeout=timeout, env=env,
                preexec_fn=_limit_memory(memory_mb), stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return {"kind": "cli-timeout", "stage": command[0], "where": f"cli {command[0]}",
                    "error": f"more than {timeout} s"}
        err = proc.stderr.decode(errors="replace")
        if "Traceback" in err or "MemoryError" in err or proc.returncode not in EXIT_CODES:
            where = "cli " + command[0]
            lines = [ln for ln in err.splitlines() if 'File "' in ln and "/packerfs/" in ln]
            if lines:
                part = lines[-1].split('"')[1]
                where = f"{os.path.relpath(part, ROOT)}:{lines[-1].split('line ')[-1].split(',')[0]}"
            return {"kind": "cli", "stage": command[0], "where": where, "exit": proc.returncode,
                    "error": err.strip().splitlines()[-1][:300] if err.strip() else f"exit {proc.returncode}",
                    "traceback": err[-3000:]}
    return None


def _special_case(rng: random.Random, cars: Path) -> str:
    """Set-level damage that byte mutations cannot make."""
    how = rng.randrange(6)
    if how == 0:
        os.mkfifo(cars / "bin-4.car")
        return "fifo named bin-4.car"
    if how == 1:
        (cars / "bin-99999999999.car").write_bytes(b"")
        return "empty bin-99999999999.car"
    if how == 2:
        (cars / "bin-5.car").mkdir()
        return "directory named bin-5.car"
    if how == 3:
        for p in cars.iterdir():
            p.unlink()
        return "no CARs at all"
    if how == 4:
        os.symlink("bin-6.car", cars / "bin-6.car")
        return "symlink loop named bin-6.car"
    (cars / "bin-4294967297.car").write_bytes(b"not a car")
    return "garbage bin-4294967297.car"


def make_case(rng: random.Random, seeds: dict, cars: Path) -> str:
    """Write one damaged set into `cars`; return a description."""
    cars.mkdir(parents=True)
    built = {name: build_car(m, c, l, x) for name, (m, c, l, x) in seeds.items()}
    for name, data in built.items():
        (cars / name).write_bytes(data)
    target = rng.choice(list(seeds))
    roll = rng.random()
    if roll < 0.12:
        return _node_case(rng, seeds, cars)
    if roll < 0.45:
        m, c, l, x = seeds[target]
        mutated = mutate_manifest(rng, m)
        if rng.random() < 0.2:
            mutated = mutate_manifest(rng, mutated)
        try:
            data = build_car(mutated, c, l, x)
        except (cbor.CBORError, ValueError, OverflowError):
            data = build_car(m, c, l, x)
        (cars / target).write_bytes(data)
        return f"manifest of {target}: {_short(mutated)}"
    if roll < 0.9:
        donor = built[rng.choice(list(built))]
        data = built[target]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data = mutate_bytes(rng, data, donor)
        (cars / target).write_bytes(data)
        return f"bytes of {target}"
    return _special_case(rng, cars)


def mutate_node(rng: random.Random, block: bytes) -> bytes:
    """A dag-pb/UnixFS node with one structural field changed (re-encoded, so it still parses)."""
    node = decode_node(block)
    links = list(node.links)
    try:
        fs = UnixFSData.decode(node.data or b"")
    except ValueError:
        fs = UnixFSData(type=2)
    how = rng.randrange(9)
    big = lambda: rng.choice([0, 1, 999, 1001, 2**31, 2**40, 2**63 - 1, 2**64 - 1, rng.randrange(5000)])  # noqa: E731
    if how == 0:
        fs.filesize = big()
    elif how == 1 and fs.blocksizes:
        i = rng.randrange(len(fs.blocksizes))
        fs.blocksizes[i] = big()
    elif how == 2:
        fs.type = rng.choice([0, 1, 2, 3, 4, 5, 6, 99])
    elif how == 3 and links:
        links.append(rng.choice(links))  # a link too many (and a blocksize too few)
    elif how == 4 and links:
        links.pop(rng.randrange(len(links)))
    elif how == 5 and links:
        i = rng.randrange(len(links))
        links[i] = PBLink(_random_cid(rng) if rng.random() < 0.5 else links[-1 - i].cid, links[i].name, links[i].tsize)
    elif how == 6:
        fs.data = rng.randbytes(rng.choice([1, 10, 1000]))
    elif how == 7:
        fs.blocksizes = fs.blocksizes * rng.choice([2, 100, 2000])  # many blocksizes, few links
    else:
        links = links * rng.choice([2, 50, 1024])  # the same leaves over and over: a DAG "bomb"
        fs.blocksizes = fs.blocksizes * (len(links) // max(len(node.links), 1))
        fs.filesize = sum(fs.blocksizes)
    return encode_node(links, fs.encode())


def _node_case(rng: random.Random, seeds: dict, cars: Path) -> str:
    """bin-3's tree.dat root node, or bin-2's symlink, mutated and re-hashed; manifest and directory follow."""
    name = rng.choice(["bin-3.car", "bin-2.car"])
    m, c, l, x = seeds[name]
    link_name = b"tree.dat" if name == "bin-3.car" else b"link"
    old_cid, block = l[link_name]
    new_block = mutate_node(rng, block)
    codec = 0x70 if rng.random() < 0.9 else rng.choice([0x55, 0x71, 0x1032])
    new_cid = make_cid(codec, new_block)
    m = json_copy(m)
    for e in m["entries"]:
        if e.get("cid") == old_cid:
            e["cid"] = new_cid
            if rng.random() < 0.3 and e["kind"] == "file":
                e["size"] = e["stream"] = e["length"] = rng.choice([0, 2500, 2**40])
    links = {**l, link_name: (new_cid, new_block)}
    (cars / name).write_bytes(build_car(m, c, links, x))
    return f"node {link_name.decode()} of {name}: {new_block[:200].hex()}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 400 else text[:400] + "…"


def campaign(seconds: float, seed: int, *, case_timeout: float = 10.0, cli_every: int = 25, cli_timeout: float = 60.0,
             memory_mb: int = 2048, max_cases: int | None = None, big: bool = True, verbose: bool = False) -> dict:
    rng = random.Random(seed)
    seeds = seed_set(big)
    findings: dict[str, dict] = {}
    known: dict[str, dict] = {}
    cases = cli_runs = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="packerfs-fuzz-") as tmp:
        tmp = Path(tmp)
        while time.monotonic() - started < seconds and (max_cases is None or cases < max_cases):
            case_dir = tmp / f"case-{cases}"
            cars = case_dir / "cars"
            case_seed = rng.randrange(2**32)
            case_rng = random.Random(case_seed)
            what = make_case(case_rng, seeds, cars)
            cases += 1
            result = run_library(cars, case_dir / "out", case_timeout)
            special = not what.startswith(("manifest", "bytes"))
            if result is None and (special or cases % cli_every == 0):
                cli_runs += 1
                result = run_cli(cars, case_dir, cli_timeout, memory_mb)
            if result is not None:
                result.update(case=what, case_seed=case_seed)
                key = f"{result['kind']} {result['where']} {result['error'].split(':')[0]}"
                table = known if any(result["where"].startswith(f) for f in KNOWN_FILES) else findings
                table.setdefault(key, dict(result, count=0))["count"] += 1
                if verbose:
                    print(f"[{cases}] {key}: {what}", file=sys.stderr)
            shutil.rmtree(case_dir, ignore_errors=True)
            if not case_dir.exists():
                continue
            for dirpath, dirnames, _ in os.walk(case_dir):  # restored modes may lock us out
                for d in dirnames:
                    with contextlib.suppress(OSError):
                        os.chmod(os.path.join(dirpath, d), 0o700)
            shutil.rmtree(case_dir, ignore_errors=True)
    return {"seed": seed, "cases": cases, "cli_runs": cli_runs, "seconds": round(time.monotonic() - started, 1),
            "findings": list(findings.values()), "known": list(known.values()), "stats": dict(sorted(STATS.items()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="how long to run (default 120)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1): a campaign is reproducible")
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--case-timeout", type=float, default=10.0, help="seconds per in-process case (default 10)")
    p.add_argument("--cli-every", type=int, default=25, help="run the CLI on every Nth case (default 25)")
    p.add_argument("--memory-mb", type=int, default=2048, help="RLIMIT_AS for this process and the CLI runs")
    p.add_argument("--small", action="store_true", help="a smaller seed set (no file split over bins)")
    p.add_argument("--replay", type=int, metavar="CASE_SEED", help="write the case of this case seed to --out and exit")
    p.add_argument("--out", default="fuzz-case", help="--replay: directory for the case's CARs (default fuzz-case)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.replay is not None:
        what = make_case(random.Random(args.replay), seed_set(not args.small), Path(args.out))
        print(f"{args.out}: {what}")
        return 0
    if args.memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_mb << 20, args.memory_mb << 20))
    result = campaign(args.seconds, args.seed, case_timeout=args.case_timeout, cli_every=args.cli_every,
                      memory_mb=args.memory_mb, max_cases=args.cases, big=not args.small, verbose=args.verbose)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['cases']} cases ({result['cli_runs']} with the CLI) in {result['seconds']} s, seed {args.seed}")
        print("  " + ", ".join(f"{k} {v}" for k, v in result["stats"].items()))
        for label in ("findings", "known"):
            for f in result[label]:
                print(f"{label[:-1] if label == 'findings' else 'known'}: {f['kind']} at {f['where']} x{f['count']}: "
                      f"{f['error']}\n    case: {f['case'][:300]} (case seed {f['case_seed']})")
                if args.verbose and f.get("traceback"):
                    print("    " + f["traceback"].replace("\n", "\n    "))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
