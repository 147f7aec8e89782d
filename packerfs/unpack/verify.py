"""verify() and ls(): checking a CAR set end to end, and listing what it holds.

verify reads every byte of every usable CAR and checks each block against its
CID, then checks the manifests against the CARs and each other, and (given
manifest.csv) each CAR's size, root, piece CID and status against its row. Data
problems never raise: each is one line, naming the file and, where there is
one, the offset. It judges the set by the tree unpack would restore (the chosen
snapshot's): damage is a problem (exit 1), a lost bin or incomplete file is
missing (exit 3), a retired bin is a note.

What verify checks that unpack does not: every block of every CAR (unpack reads
only the blocks of the files it restores), the UnixFS directory trees (unpack
reads parts by their manifest CIDs), the snapshot parts' names, and commP.
What unpack checks that verify cannot without the key: decryption (age tags,
the OpenPGP MDC) and an OpenPGP file's plaintext size.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from packerfs import manifest as manifest_format
from packerfs import snapshot as snapshot_format
from packerfs.errors import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, FormatError, IncompleteSet, PackerfsError, UsageError
from packerfs.ipld.car import CarReader
from packerfs.ipld.cid import DAG_PB, cid_codec, cid_to_str
from packerfs.ipld.dagpb import SYMLINK as UNIXFS_SYMLINK
from packerfs.ipld.dagpb import UnixFSData, decode_node
from packerfs.unpack import dag
from packerfs.unpack.carset import CAR_NAME, SEALED_SUFFIX, CarSet
from packerfs.unpack.snapshots import find_snapshots, iso_local
from packerfs.unpack.tree import DIR, FILE, SYMLINK, Tree, path_problem, show


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)  # damage or inconsistency: exit 1
    missing: list[str] = field(default_factory=list)  # lost bins, incomplete files or snapshots: exit 3
    notes: list[str] = field(default_factory=list)  # retired bins, warnings: not errors
    cars: int = 0
    blocks: int = 0
    bytes: int = 0
    file_versions: int = 0
    commp_checked: int = 0
    snapshot: int | None = None  # the snapshot the set was checked against
    retired_bins: list[int] = field(default_factory=list)
    lost_bins: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing

    @property
    def exit_code(self) -> int:
        return EXIT_ERROR if self.problems else EXIT_INCOMPLETE if self.missing else EXIT_OK

    def lines(self) -> list[str]:
        against = f", snapshot {self.snapshot}" if self.snapshot is not None else ""
        if self.ok:
            verdict = "OK"
        else:
            counts = []
            if self.problems:
                counts.append(f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}")
            if self.missing:
                counts.append(f"{len(self.missing)} missing")
            verdict = ", ".join(counts)
        head = (
            f"checked {self.cars} CARs, {self.blocks} blocks ({self.bytes} bytes), "
            f"{self.file_versions} file versions, {self.commp_checked} piece CIDs{against}: {verdict}"
        )
        return [head, *self.problems, *self.missing, *self.notes]


def verify(
    carset: CarSet, manifest_csv: str | None = None, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check everything; progress(n) is called with block bytes read (and again with bytes hashed for commP).

    The tree is the one unpack restores (the chosen snapshot's, else the merged manifests): a bin
    that snapshot needs and the set lacks is lost (report.missing, exit 3, its files listed by
    path); a present bin it does not need is retired (a note); a file version it does not use may
    be incomplete without that being an error. Every block of every present CAR is checked."""
    advance = progress or (lambda n: None)
    report = VerifyReport()
    report.problems += carset.problems
    pieces: dict[int, object] = {}  # car id -> PieceInfo of a remote CAR, hashed while its blocks are read
    for car in carset.cars:
        _check_blocks(car, report, advance, carset, pieces if manifest_csv is not None else None)
    if carset.foreign:
        return _verify_foreign(carset, report, advance)
    try:
        tree = Tree.build(carset, strict=False)
    except (IncompleteSet, UsageError) as exc:  # --snapshot names one that cannot be used
        report.missing.append(str(exc)) if isinstance(exc, IncompleteSet) else report.problems.append(str(exc))
        return report
    report.problems += tree.problems
    report.missing += tree.lost
    report.notes += tree.notes
    _check_snapshots(carset, tree, report)
    if tree.snapshot is not None:
        report.snapshot = tree.snapshot.id
        report.lost_bins = list(tree.missing_bins)
        report.retired_bins = list(tree.retired_bins)
        lost = _files_by_bin(tree)
        for number in tree.missing_bins:
            paths = lost.get(number, [])
            report.missing.append(
                f"bin {number} (bin-{number:06d}.car) is missing: snapshot {tree.snapshot.id} needs it "
                f"({len(paths)} file{'s' if len(paths) != 1 else ''} with a part in it)"
            )
        if tree.retired_bins:
            report.notes.append(
                f"retired (present, not needed by snapshot {tree.snapshot.id}): bin "
                + ", ".join(map(str, tree.retired_bins))
            )
        if tree.unused_versions:
            report.notes.append(
                f"{tree.unused_versions} file version{'s' if tree.unused_versions != 1 else ''} in the manifests "
                f"{'are' if tree.unused_versions != 1 else 'is'} not used by snapshot {tree.snapshot.id} "
                "(older versions or deleted files)"
            )
    else:
        for number in tree.missing_bins:
            report.missing.append(f"bin {number} is missing from the set")
    _check_manifests(carset, tree, report)
    _check_sizes(carset, tree, report)
    if manifest_csv is not None:
        _check_csv(carset, tree, manifest_csv, report, advance, pieces)
    return report


def _files_by_bin(tree: Tree) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for path in sorted(tree.files):
        entry = tree.entries[path]
        for number in entry.missing_bins:
            out.setdefault(number, []).append(path)
    return out


def _check_snapshots(carset: CarSet, tree: Tree, report: VerifyReport) -> None:
    """Every snapshot part a manifest names is linked from its CAR's `.packerfs` directory."""
    for info in find_snapshots(carset):
        report.problems += info.problems
        if not info.complete and (tree.snapshot is None or info.id < tree.snapshot.id):
            report.notes.append(f"snapshot {info.id} ({iso_local(info.time_ns)}) is incomplete: {info.describe_missing()}")
        for part in info.found.values():
            car = carset.by_bin.get(part.bin)
            if car is None:
                continue
            name = snapshot_format.NAME + SEALED_SUFFIX.get(info.sealed, "").encode()
            name += _part_suffix(part.part, info.parts) if info.parts > 1 else b""
            try:
                found = dag.resolve(carset, car.root, manifest_format.DIRNAME + b"/" + name)
            except FormatError as exc:
                report.problems.append(f"{exc} ({car.path}: snapshot {info.id} part {part.part})")
                continue
            if found != part.cid:
                what = "is not in the CAR's directory tree" if found is None else f"links {cid_to_str(found)}"
                report.problems.append(
                    f"{car.path}: .packerfs/{name.decode()} {what}; the manifest says snapshot {info.id} "
                    f"part {part.part} is {cid_to_str(part.cid)}"
                )


def _part_suffix(part: int, parts: int) -> bytes:
    width = max(4, len(str(parts)))
    return f".part{part:0{width}d}of{parts:0{width}d}".encode()


def _verify_foreign(carset: CarSet, report: VerifyReport, advance) -> VerifyReport:
    """A set packerfs did not write: every block was checked above; now every file of the tree
    must be readable to its end (each leaf there, of the size its parent says)."""
    try:
        tree = carset.tree()
    except (FormatError, UsageError) as exc:
        report.problems.append(str(exc))
        return report
    report.problems += tree.problems
    report.missing += tree.lost
    files = dag.FileDag(carset)
    for fv in tree.files.values():
        report.file_versions += 1
        if not fv.complete:
            continue
        ref = fv.ordered()[0]
        try:
            for leaf, _ in files.leaves(ref.cid, ref.length):
                if not carset.has(leaf):
                    raise IncompleteSet(f"{show(fv.path)}: block {cid_to_str(leaf)} is in none of the CARs")
        except IncompleteSet as exc:
            report.missing.append(str(exc))
        except FormatError as exc:
            report.problems.append(f"{show(fv.path)}: {exc}")
    return report


def _check_blocks(car, report: VerifyReport, advance, carset: CarSet, pieces: dict | None) -> None:
    """Every block of `car` against its CID. A remote CAR is streamed once: with `pieces`, its commP
    is hashed from the same bytes (into pieces[car.id])."""
    from packerfs.piece import MAX_PAYLOAD, MIN_PAYLOAD, CommP

    path = car.path
    report.cars += 1
    remote = car.obj is not None and car.obj.remote
    hasher = CommP() if remote and pieces is not None and MIN_PAYLOAD <= car.size <= MAX_PAYLOAD else None
    try:
        with CarReader(car.obj if remote else path, window_sink=hasher.write if hasher else None) as reader:
            for section in reader.sections():
                try:
                    block = reader.read_block(section, verify=True)
                    if not car.located:  # a remote CAR indexed from its tail: now every block is known
                        carset.learn(car, section, block)
                except FormatError as exc:
                    report.problems.append(str(exc))
                report.blocks += 1
                report.bytes += section.length
                advance(section.length)
            if hasher is not None:
                reader.finish()
                pieces[car.id] = hasher.finish()
    except FormatError as exc:
        report.problems.append(str(exc))
    except OSError as exc:
        report.problems.append(f"{path}: cannot read: {exc.strerror or exc}")


class _Checker:
    """Block access for the consistency checks; decoded directories are cached."""

    def __init__(self, carset: CarSet):
        self.carset = carset
        self.dirs: dict[bytes, dag.DirNode] = {}
        self.files = dag.FileDag(carset)

    def load_dir(self, cid: bytes) -> dag.DirNode:
        node = self.dirs.get(cid)
        if node is None:
            node = dag.decode_dir_node(self.carset, cid, self.carset.read_block(cid))
            if len(self.dirs) > 4096:
                self.dirs.clear()
            self.dirs[cid] = node
        return node

    def resolve(self, root: bytes, name: bytes) -> bytes | None:
        return dag.resolve(self.carset, root, name, self.load_dir)


def _check_manifests(carset: CarSet, tree: Tree, report: VerifyReport) -> None:
    check = _Checker(carset)
    used = tree.used_versions
    # Every file the tree restores is complete (else it is listed by path: exit 3).
    for path in sorted(tree.files):
        fv = tree.files[path]
        if not fv.complete:
            bins = ", ".join(str(b) for b in fv.missing_bins) or "unknown"
            parts = ", ".join(str(p) for p in fv.missing_parts)
            report.missing.append(
                f"{show(fv.path)} (version {fv.version}): part {parts} of {fv.parts} missing (bin {bins})"
            )
    # Every part present: tiles the stream, DAG present with the right sizes.
    for fv in tree.versions:
        report.file_versions += 1
        if not fv.complete:
            if tree.snapshot is None and fv.version not in used:
                bins = ", ".join(str(b) for b in fv.missing_bins) or "unknown"
                parts = ", ".join(str(p) for p in fv.missing_parts)
                report.missing.append(
                    f"{show(fv.path)} (version {fv.version}): part {parts} of {fv.parts} missing (bin {bins})"
                )
        elif sum(r.length for r in fv.refs.values()) != fv.stream:
            report.problems.append(f"{show(fv.path)} (version {fv.version}): part lengths do not add up to the stream size {fv.stream}")
        for ref in fv.ordered():
            where = f"{ref.car}: part {ref.part} of {show(fv.path)}"
            if carset.locate(ref.cid) is None:
                report.problems.append(f"{where}: its root block {cid_to_str(ref.cid)} is in no CAR")
                continue
            try:
                for leaf, size in check.files.leaves(ref.cid, ref.length):
                    loc = carset.locate(leaf)
                    if loc is None:
                        report.problems.append(f"{where}: leaf {cid_to_str(leaf)} is in no CAR")
                    elif loc.length != size:
                        path = carset.car_by_id[loc.car].path
                        report.problems.append(
                            f"{path}: offset {loc.section_offset}: leaf of {show(fv.path)} is {loc.length} bytes, "
                            f"its file node says {size}"
                        )
            except FormatError as exc:
                report.problems.append(f"{exc} ({where})")
    # Every entry's name resolves in its own CAR's UnixFS tree to the manifest's CID.
    for car in carset.cars:
        for index, e in enumerate(car.entries):
            kind = e["kind"]
            name = e["name"] if kind == FILE else e["path"]
            if kind == DIR and name == b"" or car.sealed and kind != FILE:
                continue  # with hidden names, directories and symlinks are in the sealed manifest only
            if path_problem(e["path"]) or path_problem(name):
                continue  # reported by the tree build
            where = f"{car.path}: manifest entry {index} ({show(e['path'])})"
            try:
                found = check.resolve(car.root, name)
            except FormatError as exc:
                report.problems.append(f"{exc} ({where})")
                continue
            if found is None:
                if kind == DIR:
                    # unpack restores directories from the snapshot (or the manifests), never from the
                    # UnixFS tree: not an error, but stock tools (ipfs-car unpack) will not create it
                    report.notes.append(f"{where}: directory {show(name)} is not in the CAR's UnixFS tree "
                                        "(unpack creates it; ipfs-car unpack would not)")
                else:
                    report.problems.append(f"{where}: {show(name)} is not in the CAR's directory tree")
            elif kind == DIR:
                try:
                    check.load_dir(found)
                except FormatError as exc:
                    report.problems.append(f"{exc} ({where})")
            elif found != e["cid"]:
                report.problems.append(
                    f"{where}: the directory tree links {show(name)} to {cid_to_str(found)}, "
                    f"the manifest says {cid_to_str(e['cid'])}"
                )
            elif kind == SYMLINK:
                _check_symlink(carset, e, where, report)


def _check_symlink(carset: CarSet, e: dict, where: str, report: VerifyReport) -> None:
    try:
        block = carset.read_block(e["cid"])
    except FormatError as exc:
        report.problems.append(f"{exc} ({where})")
        return
    try:
        if cid_codec(e["cid"]) != DAG_PB:
            raise ValueError("not a dag-pb node")
        node = decode_node(block)
        fs = UnixFSData.decode(node.data or b"")
        if fs.type != UNIXFS_SYMLINK:
            raise ValueError(f"UnixFS type {fs.type}, not a symlink")
        if (fs.data or b"") != e["target"]:
            raise ValueError("its target differs from the manifest's")
    except ValueError as exc:
        path, offset = carset.where(e["cid"])
        report.problems.append(str(FormatError(f"symlink block: {exc} ({where})", path=path, offset=offset)))


class _PartsStream:
    """RandomAccess over a complete file version's stored stream (no key needed: age headers are plain)."""

    def __init__(self, carset: CarSet, fv):
        self.files = dag.FileDag(carset)
        self.refs = fv.ordered()
        self.size = fv.stream

    def read(self, offset: int, size: int) -> bytes:
        out = []
        end = min(offset + size, self.size)
        for ref in self.refs:
            lo, hi = max(offset, ref.offset), min(end, ref.offset + ref.length)
            if lo < hi:
                out.append(self.files.read(ref.cid, ref.length, lo - ref.offset, hi - ref.offset))
        return b"".join(out)


def _check_sizes(carset: CarSet, tree: Tree, report: VerifyReport) -> None:
    """The plaintext size the manifests give each restored file agrees with its stream, as unpack
    will find it. Plain: equal (checked by the tree). age: header + nonce + chunks, readable
    without a key. OpenPGP: only decryption tells (unpack checks it)."""
    if carset.cipher != "age":
        return
    from packerfs.crypt import age

    for path in sorted(tree.files):
        fv = tree.files[path]
        if not fv.complete:
            continue
        first = fv.ordered()[0]
        try:
            header = age.read_header(_PartsStream(carset, fv))
        except FormatError as exc:
            report.problems.append(f"{first.car}: {show(fv.path)}: {exc}")
            continue
        stored = fv.coding.size if fv.coding is not None else fv.size  # what the cipher encrypted
        expected = age.stream_size_for(header.size, stored)
        if expected != fv.stream:
            payload = fv.stream - header.size - age.NONCE_SIZE
            chunks = max(1, -(-payload // age.ENC_CHUNK_SIZE)) if payload > 0 else 1
            holds = payload - age.TAG_SIZE * chunks
            report.problems.append(
                f"{first.car}: {show(fv.path)}: the manifest says {stored} plaintext bytes, but its age stream "
                f"of {fv.stream} bytes holds {holds} (unpack would refuse it)"
            )


def _bin_of_name(name: str) -> int | None:
    m = CAR_NAME.match(name)
    return int(m.group(1)) if m else None


def _check_csv(carset: CarSet, tree: Tree, manifest_csv: str, report: VerifyReport, advance, pieces: dict) -> None:
    from packerfs.piece import commp_file, commp_ranges

    try:
        with open(manifest_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        report.problems.append(f"{manifest_csv}: cannot read: {getattr(exc, 'strerror', None) or exc}")
        return
    needed = {"car_file", "piece_cid", "piece_size", "car_size"}
    if rows and not needed <= set(rows[0]):
        report.problems.append(f"{manifest_csv}: missing columns {', '.join(sorted(needed - set(rows[0])))}")
        return
    cars = {car.name: car for car in carset.cars}  # a gateway's piece without a csv name: its piece CID
    seen = set()
    # `status` (current | retired) says what the pack's newest snapshot needs; the older `stale`
    # column (true | false) is accepted as it is. Statuses are compared when the tree is that snapshot.
    newest = find_snapshots(carset)[-1].id if find_snapshots(carset) else None
    judge = tree.snapshot is not None and tree.snapshot.id == newest and not tree.lost
    needed = set(tree.needed_bins)
    for line, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        name = row.get("car_file", "")
        where = f"{manifest_csv} line {line}"
        status = row.get("status", "").lower()
        if status not in ("", "current", "retired"):
            report.problems.append(f"{where}: status {row.get('status')!r} is neither current nor retired")
        retired = status == "retired" or row.get("stale", "").lower() == "true"
        number = _bin_of_name(name)
        car = cars.get(name)
        if car is None and row.get("piece_cid") in cars:
            car, name = cars[row["piece_cid"]], row["piece_cid"]
        if car is None:
            if retired:
                report.notes.append(f"{where}: {name} is retired and not in the set")
            elif tree.snapshot is not None and number is not None and number not in needed:
                report.notes.append(f"{where}: {name} is not in the set, and snapshot {tree.snapshot.id} does not need it")
            elif tree.snapshot is not None and number in tree.missing_bins:
                pass  # reported as a lost bin
            else:
                report.problems.append(f"{where}: {name} is not among the usable CARs")
            continue
        if judge and status:
            if status == "retired" and car.bin in needed:
                report.problems.append(
                    f"{where}: {name} is marked retired, but snapshot {tree.snapshot.id} needs bin {car.bin}"
                )
            elif status == "current" and car.bin not in needed:
                report.problems.append(
                    f"{where}: {name} is marked current, but snapshot {tree.snapshot.id} does not need bin {car.bin}"
                )
        seen.add(name)
        size = car.size
        if str(size) != row["car_size"]:
            report.problems.append(f"{car.path}: {size} bytes, {where} says car_size {row['car_size']}")
        payload = row.get("payload_cid", "")
        if payload and payload != cid_to_str(car.root):
            report.problems.append(f"{car.path}: root {cid_to_str(car.root)}, {where} says payload_cid {payload}")
        try:
            if car.id in pieces:
                info = pieces[car.id]
            elif car.obj is not None and car.obj.remote:
                info = commp_ranges(car.obj.read, car.size, car.path)
            else:
                info = commp_file(car.path, progress=None)
        except PackerfsError as exc:
            report.problems.append(f"{car.path}: cannot compute the piece CID: {exc}")
            continue
        advance(size)
        report.commp_checked += 1
        if info.piece_cid != row["piece_cid"]:
            report.problems.append(f"{car.path}: piece CID is {info.piece_cid}, {where} says {row['piece_cid']}")
        if str(info.piece_size) != row["piece_size"]:
            report.problems.append(f"{car.path}: piece size is {info.piece_size}, {where} says {row['piece_size']}")
    for name, car in cars.items():
        if name in seen:
            continue
        if tree.snapshot is not None and car.bin not in needed:
            # a retired CAR kept from an earlier copy: the newer manifest.csv lists only what is current
            report.notes.append(f"{car.path}: retired, and not listed in {manifest_csv}")
        else:
            report.problems.append(f"{car.path}: has no row in {manifest_csv}")


class LsRow(NamedTuple):
    path: bytes
    kind: str  # "dir" | "file" | "symlink"
    size: int
    parts: int  # file parts (0 for dirs and symlinks)
    bins: tuple[int, ...]  # bins holding it (for a dir: the latest bin that describes it)
    complete: bool
    target: bytes | None


def ls(carset: CarSet) -> list[LsRow]:
    """The tree's entries, sorted by path (the root, b"", first); newest version of each path."""
    return [
        LsRow(e.path, e.kind, e.size, e.parts, e.bins, e.complete, e.target)
        for e in carset.tree()
    ]


def set_lines(carset: CarSet, tree: Tree) -> tuple[list[str], list[str]]:
    """(incomplete, notes) for ls and unpack: unusable CARs, lost snapshots and bins (with the
    files they hold, by path) make the result incomplete (exit 3); retired bins and warnings are notes."""
    incomplete = list(carset.problems) + list(tree.lost)
    notes = list(tree.notes)
    if tree.snapshot is not None:
        lost = _files_by_bin(tree)
        if tree.missing_bins:
            incomplete.append(
                "missing bins: " + ", ".join(map(str, tree.missing_bins)) + f" (needed by snapshot {tree.snapshot.id})"
            )
        for number in tree.missing_bins:
            paths = lost.get(number, [])
            listed = ", ".join(escape_name(p) for p in paths[:20]) + (f" and {len(paths) - 20} more" if len(paths) > 20 else "")
            incomplete.append(
                f"bin {number} is missing: snapshot {tree.snapshot.id} needs it for {len(paths)} "
                f"file{'s' if len(paths) != 1 else ''}" + (f": {listed}" if paths else "")
            )
        if tree.retired_bins:
            notes.append(
                f"retired (present, not needed by snapshot {tree.snapshot.id}): bin " + ", ".join(map(str, tree.retired_bins))
            )
    elif tree.missing_bins:
        incomplete.append("missing bins: " + ", ".join(map(str, tree.missing_bins)))
    return incomplete, notes


_BIDI = {0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def escape_name(path: bytes) -> str:
    """A name for a terminal: UTF-8 shown as is, except control characters (C0, DEL, C1), line and
    bidi controls and backslash, which are escaped like Python's (\\n, \\x1b, \\u202e); bytes that
    are not UTF-8 are shown as \\xNN. No byte of an untrusted name reaches the terminal raw."""
    text = path.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in _BIDI:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)
