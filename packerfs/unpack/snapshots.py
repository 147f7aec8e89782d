"""The data-set snapshots a CAR set holds (see packerfs/snapshot.py for the format).

    snaps = find_snapshots(carset)          # every snapshot any bin names, by id
    chosen, notes, lost = choose(carset, wanted=None)
    reader = SnapshotReader(carset, chosen)
    for entry in reader.entries(): ...      # validated entries, streamed
    reader.trailer                          # after the loop: counts checked

A snapshot is found from the `snapshot` map of each bin manifest that holds one
of its parts. Parts are grouped by id; a snapshot is complete when every part
1..parts is present and all of them agree on id, time, size and counts, and
their offsets tile the body. Its body is read by walking each part's UnixFS
file leaf by leaf (every block checked against its CID) into snapshot.Decoder:
memory is one leaf plus one item, whatever the number of files.

Which snapshot decides the tree (choose): the one asked for (`--snapshot ID`),
else the newest complete one. A newer snapshot that is incomplete, or bins newer
than the chosen snapshot that no snapshot describes, are reported as lost (the
caller exits 3); a set without any snapshot (older packerfs, or the bin holding
it is missing) falls back to merging the manifests, with a warning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from packerfs import manifest as manifest_format
from packerfs import snapshot as snapshot_format
from packerfs.crypt import iter_plaintext, open_plaintext
from packerfs.errors import FormatError, IncompleteSet, UsageError
from packerfs.ipld import cbor
from packerfs.ipld.cid import cid_to_str
from packerfs.unpack import dag

LEGACY = "legacy"  # a choice: no snapshot, merge the manifests (a worker following a daemon that found none)
_TAIL_TRIES = (64 << 10, 16 << 20)  # bytes read from the end of a body to find its trailer (listing only)


@dataclass
class SnapshotPart:
    part: int
    bin: int
    car: str  # CAR path
    offset: int
    length: int
    cid: bytes


@dataclass
class SnapshotInfo:
    id: int
    time_ns: int
    entries: int
    files: int
    bytes: int
    size: int
    parts: int
    found: dict[int, SnapshotPart] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # disagreements between the bins naming it
    sealed: str = ""  # hidden names: the cipher its body is encrypted with (`size` is the stream's)

    @property
    def complete(self) -> bool:
        return len(self.found) == self.parts and not self.problems

    @property
    def bins(self) -> list[int]:
        """Bins holding its parts (those present)."""
        return sorted({p.bin for p in self.found.values()})

    @property
    def cid(self) -> bytes | None:
        first = self.found.get(1)
        return first.cid if first else None

    def missing_parts(self) -> list[int]:
        return [p for p in range(1, self.parts + 1) if p not in self.found]  # parts <= 2**20 (check_descriptor)

    def missing_bins(self) -> list[int]:
        """Bins the missing parts are in: the parts of a snapshot lie in consecutive bins."""
        if not self.found:
            return []
        out = set()
        for p in self.missing_parts():
            near = min(self.found.values(), key=lambda r: abs(r.part - p))
            guess = near.bin + (p - near.part)
            if guess >= 1:
                out.add(guess)
        return sorted(out)

    def describe_missing(self) -> str:
        parts = ", ".join(map(str, self.missing_parts()))
        bins = ", ".join(map(str, self.missing_bins())) or "unknown"
        return f"part {parts} of {self.parts} missing (bin {bins})"

    def summary(self) -> dict:
        return {
            "id": self.id,
            "time_ns": self.time_ns,
            "time": iso_local(self.time_ns),
            "entries": self.entries,
            "files": self.files,
            "bytes": self.bytes,
            "size": self.size,
            "parts": self.parts,
            "complete": self.complete,
            "cid": cid_to_str(self.cid) if self.cid else None,
            "snapshot_bins": self.bins,
            "missing_parts": self.missing_parts(),
            "missing_bins": self.missing_bins(),
            "problems": list(self.problems),
        }


def iso_local(time_ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time_ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return f"{time_ns} ns"


# ---------------------------------------------------------------- finding


def descriptor_of(carset, car) -> dict | None:
    """The car's `snapshot` map. A Car from an index that did not record it (False) is looked up in
    its `.packerfs` directory (two blocks) and, only if it holds a snapshot part, its manifest re-read."""
    if car.snapshot is not False:
        return car.snapshot
    found = None
    meta = dag.dir_lookup(carset, car.root, manifest_format.DIRNAME)
    if meta is not None:
        node = dag.decode_dir_node(carset, meta, carset.read_block(meta))
        if node.shard or any(name.startswith(snapshot_format.NAME) for name in node.links):  # (clear names only)
            mcid = dag.dir_lookup(carset, meta, manifest_format.NAME)
            if mcid is not None:
                files = dag.FileDag(carset)
                size = files.root_size(mcid)
                data = files.read(mcid, size, 0, size)
                try:
                    top = cbor.decode(data)
                    raw = top.get("snapshot") if isinstance(top, dict) else None
                    found = snapshot_format.check_descriptor(raw) if raw is not None else None
                except (cbor.CBORError, snapshot_format.SnapshotError) as exc:
                    raise FormatError(f"bad manifest: {exc}", path=car.path, offset=car.manifest_offset) from None
    car.snapshot = found
    return found


def find_snapshots(carset) -> list[SnapshotInfo]:
    """Every snapshot some present bin names, oldest first (cached on the CarSet)."""
    cached = getattr(carset, "_packerfs_snapshots", None)
    if cached is not None:
        return cached
    by_id: dict[int, SnapshotInfo] = {}
    for car in carset.cars:
        d = descriptor_of(carset, car)
        if d is None:
            continue
        info = by_id.get(d["id"])
        if info is None:
            info = by_id[d["id"]] = SnapshotInfo(
                d["id"], d["time_ns"], d["entries"], d["files"], d["bytes"], d["size"], d["parts"],
                sealed=car.sealed,
            )
        else:
            mine = (info.time_ns, info.entries, info.files, info.bytes, info.size, info.parts)
            theirs = (d["time_ns"], d["entries"], d["files"], d["bytes"], d["size"], d["parts"])
            if mine != theirs:
                info.problems.append(
                    f"{car.path}: its manifest's snapshot {d['id']} disagrees with the other bins holding "
                    f"snapshot {d['id']} (time, size or counts)"
                )
                continue
        old = info.found.get(d["part"])
        part = SnapshotPart(d["part"], car.bin, car.path, d["offset"], d["length"], d["cid"])
        if old is not None:
            if (old.cid, old.offset, old.length) != (part.cid, part.offset, part.length):
                info.problems.append(
                    f"{car.path}: part {part.part} of snapshot {info.id} differs from the one in bin {old.bin}"
                )
            continue
        info.found[part.part] = part
    for info in by_id.values():
        if len(info.found) == info.parts and not info.problems:
            pos = 0
            for p in range(1, info.parts + 1):
                ref = info.found[p]
                if ref.offset != pos:
                    info.problems.append(
                        f"{ref.car}: part {p} of snapshot {info.id} starts at {ref.offset}, not at {pos}"
                    )
                    break
                pos += ref.length
            else:
                if pos != info.size:
                    info.problems.append(f"snapshot {info.id}: its parts hold {pos} bytes, not {info.size}")
    out = [by_id[i] for i in sorted(by_id)]
    carset._packerfs_snapshots = out
    return out


def choose(carset, wanted: int | str | None = None) -> tuple[SnapshotInfo | None, list[str], list[str]]:
    """(snapshot, notes, lost): the snapshot that decides the tree (None: merge the manifests), warnings,
    and lines that make the result incomplete (exit 3). `wanted`: an id, LEGACY, or None (the newest).

    UsageError if `wanted` is an id no bin names; IncompleteSet if it names an incomplete one."""
    snaps = find_snapshots(carset)
    notes: list[str] = []
    lost: list[str] = []
    if wanted == LEGACY:
        return None, notes, lost
    if wanted is not None:
        chosen = next((s for s in snaps if s.id == int(wanted)), None)
        if chosen is None:
            have = ", ".join(str(s.id) for s in snaps) or "none"
            raise UsageError(f"there is no snapshot {wanted} in the CAR set (snapshots: {have})")
        if not chosen.complete:
            why = "; ".join(chosen.problems) or chosen.describe_missing()
            raise IncompleteSet(f"snapshot {chosen.id} cannot be used: {why}")
        return chosen, notes, lost
    if not snaps:
        notes.append(
            "warning: the CAR set holds no snapshot (packed by an older packerfs, or the bin holding it is "
            "missing): the tree is merged from the bin manifests, so deleted files may reappear"
        )
        return None, notes, lost
    complete = [s for s in snaps if s.complete]
    chosen = complete[-1] if complete else None
    for s in snaps:
        if chosen is None or s.id > chosen.id:
            why = "; ".join(s.problems) or s.describe_missing()
            instead = f"using snapshot {chosen.id} instead" if chosen else "merging the bin manifests instead"
            lost.append(f"snapshot {s.id} ({iso_local(s.time_ns)}) is incomplete: {why}; {instead}")
    if chosen is None:
        notes.append("warning: no complete snapshot: deleted files may reappear")
        return None, notes, lost
    top = max(chosen.bins)
    newer = sorted(b for b in carset.by_bin if b > top and not any(b in s.bins for s in snaps if s.id > chosen.id))
    if newer:
        lost.append(
            f"bin{'s' if len(newer) > 1 else ''} {_ranges(newer)} {'are' if len(newer) > 1 else 'is'} newer than "
            f"snapshot {chosen.id} and no snapshot in the set describes {'them' if len(newer) > 1 else 'it'} "
            f"(the bin holding a later snapshot is missing, or that scan never finished); using snapshot {chosen.id}"
        )
    return chosen, notes, lost


def _ranges(numbers: list[int]) -> str:
    out = []
    start = prev = None
    for n in numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(out)


# ---------------------------------------------------------------- reading


class SnapshotReader:
    """Streams a complete snapshot's body: entries() yields validated entries; then .trailer."""

    def __init__(self, carset, info: SnapshotInfo):
        if not info.complete:
            raise IncompleteSet(f"snapshot {info.id}: {info.describe_missing()}")
        self.carset = carset
        self.info = info
        self.trailer: dict | None = None
        self.header: dict | None = None

    def pieces(self) -> Iterator[bytes]:
        """The body in order: the parts' leaves, decrypted (and authenticated) when it is sealed."""
        if self.info.sealed:
            yield from iter_plaintext(sealed_body(self.carset, self.info))
            return
        files = dag.FileDag(self.carset)
        for p in range(1, self.info.parts + 1):
            ref = self.info.found[p]
            if files.root_size(ref.cid) != ref.length:
                raise FormatError(
                    f"part {p} of snapshot {self.info.id} is {files.root_size(ref.cid)} bytes, its manifest says "
                    f"{ref.length}", path=ref.car,
                )
            for leaf, size in files.leaves(ref.cid, ref.length):
                block = self.carset.read_block(leaf) if size else b""
                if len(block) != size:
                    raise FormatError(
                        f"a leaf of snapshot {self.info.id} is {len(block)} bytes, its file node says {size}",
                        path=ref.car,
                    )
                yield block

    def entries(self) -> Iterator[dict]:
        decoder = snapshot_format.Decoder(self.carset.dataset, self.info.id)
        try:
            for piece in self.pieces():
                yield from decoder.feed(piece)
            trailer = decoder.finish()
        except snapshot_format.SnapshotError as exc:
            part = self.info.found[1]
            raise FormatError(f"snapshot {self.info.id}: {exc}", path=part.car) from None
        self.header = decoder.header
        counts = (self.info.entries, self.info.files, self.info.bytes)
        if (trailer["entries"], trailer["files"], trailer["bytes"]) != counts:
            raise FormatError(
                f"snapshot {self.info.id}: its body counts {trailer['entries']} entries, {trailer['files']} files, "
                f"{trailer['bytes']} bytes; its bins' manifests say {counts[0]}, {counts[1]}, {counts[2]}",
                path=self.info.found[1].car,
            )
        if decoder.header.get("time_ns") != self.info.time_ns:
            raise FormatError(
                f"snapshot {self.info.id}: its header's time differs from its bins' manifests",
                path=self.info.found[1].car,
            )
        self.trailer = trailer


class _StoredBody:
    """RandomAccess over a complete snapshot's stored body, across its parts."""

    def __init__(self, carset, info: SnapshotInfo):
        self.carset, self.info, self.size = carset, info, info.size

    def read(self, offset: int, size: int) -> bytes:
        return _read_body(self.carset, self.info, offset, min(offset + size, self.size))


def sealed_body(carset, info: SnapshotInfo):
    """The plaintext (RandomAccess) of a sealed snapshot's body, opened with the set's keyring."""
    from packerfs.crypt import KeyRing

    if carset.keyring is None:
        carset.keyring = KeyRing()
    name = f"{info.found[1].car}: snapshot {info.id}"
    return open_plaintext(_StoredBody(carset, info), carset.keyring, info.sealed, name=name)


def _read_body(carset, info: SnapshotInfo, start: int, end: int) -> bytes:
    files = dag.FileDag(carset)
    out = []
    for p in range(1, info.parts + 1):
        ref = info.found[p]
        lo, hi = max(start, ref.offset), min(end, ref.offset + ref.length)
        if lo < hi:
            out.append(files.read(ref.cid, ref.length, lo - ref.offset, hi - ref.offset))
    return b"".join(out)


def peek_trailer(carset, info: SnapshotInfo) -> dict | None:
    """The trailer of a complete snapshot from the end of its body, without reading the rest (for
    listing; the tree reads and checks the whole body). None if it cannot be found that way."""
    if not info.complete:
        return None
    body = sealed_body(carset, info) if info.sealed else _StoredBody(carset, info)
    for tail in _TAIL_TRIES:
        start = max(0, body.size - tail)
        data = body.read(start, body.size - start)
        pos = len(data)
        while True:
            pos = data.rfind(b"\x63end\xf5", 0, pos)
            if pos <= 0:
                break
            head = pos - 1
            if 0xA0 <= data[head] <= 0xB7:
                try:
                    item, end = cbor.decode_prefix(data, head)
                except cbor.CBORError:
                    item, end = None, -1
                if end == len(data) and isinstance(item, dict) and item.get("end") is True:
                    bins = item.get("bins")
                    if isinstance(bins, list) and all(isinstance(b, int) for b in bins):
                        return item
        if start == 0:
            break
    return None


def listing(carset) -> list[dict]:
    """Every snapshot, oldest first, as summary() dicts plus `bins_needed` (None when unknown)."""
    out = []
    for info in find_snapshots(carset):
        row = info.summary()
        try:
            trailer = peek_trailer(carset, info)
        except FormatError as exc:
            row["problems"].append(str(exc))
            trailer = None
        row["bins_needed"] = sorted(trailer["bins"]) if trailer else None
        if trailer:
            present = set(carset.by_bin)
            row["bins_missing"] = [b for b in sorted(trailer["bins"]) if b not in present]
        else:
            row["bins_missing"] = None
        out.append(row)
    return out


def open_carset(sources, *, dataset=None, snapshot=None, index=None, keyring=None):
    """CarSet.open, with the snapshot that decides its tree (an id, LEGACY, or None for the newest).
    An id no bin names is a UsageError here, before anything else is done."""
    from packerfs.unpack.carset import CarSet

    carset = CarSet.open(sources, dataset=dataset, index=index, keyring=keyring)
    try:
        set_choice(carset, snapshot)
    except BaseException:
        carset.close()
        raise
    return carset


def set_choice(carset, snapshot) -> None:
    if snapshot is not None and snapshot != LEGACY:
        try:
            snapshot = int(snapshot)
        except (TypeError, ValueError):
            raise UsageError(f"--snapshot {snapshot!r}: not a snapshot id (a number; `packerfs snapshots` lists them)") from None
        if snapshot not in {s.id for s in find_snapshots(carset)}:
            choose(carset, snapshot)  # the UsageError naming the ids there are
    carset.snapshot_choice = snapshot
