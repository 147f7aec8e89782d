"""The scan: one read of the source produces everything a bin needs.

For every file it reads the plaintext once, encrypts it, cuts the stream into
1 MiB leaves, hashes them, builds the UnixFS DAG, lays the bytes out in the
current bin and feeds them to that bin's commP. When a bin is full it is
sealed: directories, manifest and root are appended, the header is fixed up,
and the bin's results, byte map, leaf digests and file records are committed to
the index in one transaction. Nothing but the index is written.

A scan against a state directory that already holds sealed bins skips every
entry whose fingerprint matches its sealed record: that is how an interrupted
scan resumes (work since the last seal is redone, identically) and how a
rescan leaves sealed bins untouched while new and changed data goes into new
bins.

A scan that changed anything (and the first one) ends with a data-set
snapshot (packerfs/snapshot.py): every path the scan saw, each pointing at the
bins that hold its current version, sealed into the scan's last bin (or a new
one). From it follows each bin's status: *current* while it holds a file
version the snapshot uses, *retired* once it holds none. A current bin that
also holds superseded data can no longer be generated from the source (that
data is gone) but is still needed; --repack-below moves the live files out of
such bins so they can retire.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

from packerfs import manifest, snapshot
from packerfs.crypt.base import Cipher
from packerfs.errors import PackerfsError, SourceChanged, UsageError
from packerfs.index.store import DIGEST, DIGESTS_PER_CHUNK, Index
from packerfs.ipld.cid import RAW, cid_from_digest
from packerfs.ipld.unixfs import CHUNK_SIZE, FileBuilder, Node, symlink_block
from packerfs.plan import costs
from packerfs.pack.writer import car_name
from packerfs.plan.layout import BinLayout
from packerfs.source.base import Source
from packerfs.source.walk import DIR, FILE, SYMLINK, Entry, ScanProblem

log = logging.getLogger("packerfs.scan")

# ".part" + two numbers of up to 12 digits + "of"
PART_SUFFIX_MAX = 5 + 12 + 2 + 12
# Flush finished segments and file records to the index every this many, so memory stays flat.
SEGMENT_FLUSH = 4096
PENDING_FLUSH = 2048


NAME_MAX = 255  # bytes in one name: what stock tools (ipfs-car unpack) can write on POSIX systems
# "~" and 16 hex digits of the full name's SHA-256: what stands for the cut-off end of a long name.
SHORTENED_TAIL = 17


def name_in_car(name: bytes, suffix: bytes) -> bytes:
    """A file part's name inside a CAR: NAME + suffix, or, when that would exceed 255 bytes, a shortened
    NAME~HASH16 + suffix (the start of NAME, cut on a UTF-8 character boundary, then "~" and the first 16
    hex digits of SHA-256 of the whole NAME). The real name is in the manifest, so the scheme is
    reversible; the hash keeps names that share a long prefix apart."""
    if len(name) + len(suffix) <= NAME_MAX:
        return name + suffix
    keep = NAME_MAX - len(suffix) - SHORTENED_TAIL
    head = name[:keep]
    # don't cut a UTF-8 sequence in half: drop continuation bytes and the lead byte they belong to
    while head and 0x80 <= head[-1] < 0xC0:
        head = head[:-1]
    if head and head[-1] >= 0xC0:
        head = head[:-1]
    return head + b"~" + hashlib.sha256(name).hexdigest()[:16].encode() + suffix


def part_suffix(part: int, parts: int) -> bytes:
    """`.part0002of0013`: sortable, zero-padded to at least four digits."""
    if parts == 1:
        return b""
    width = max(4, len(str(parts)))
    return b".part%0*dof%0*d" % (width, part, width, parts)


@dataclass
class ScanReport:
    bins_sealed: list[int] = field(default_factory=list)
    files_placed: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    skipped: int = 0
    changed_paths: list[bytes] = field(default_factory=list)  # superseded by a new version (first REPORT_PATHS)
    deleted_paths: list[bytes] = field(default_factory=list)  # gone from the source (first REPORT_PATHS)
    changed: int = 0
    deleted: int = 0
    repacked: int = 0
    snapshot: dict | None = None  # the snapshot this scan sealed: id, entries, files, bytes, bins
    retired_bins: list[int] = field(default_factory=list)  # bins this scan retired
    problems: list[ScanProblem] = field(default_factory=list)


# Paths listed by name in a report; the counts are always complete.
REPORT_PATHS = 1000

class _TreeSpill:
    """The snapshot's entries as the scan settles each path, spilled to a file in the state directory.

    Every path the walk meets is written once, when its record is final (skipped as unchanged, or
    placed), so the snapshot costs one encoding per path and never re-reads the index. The totals
    and each bin's live files and bytes are kept alongside; memory is a counter per bin.
    """

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.size = 0
        self.totals = {"entries": 0, "files": 0, "bytes": 0}
        self.newest = 0  # the snapshot's time: the newest mtime in the tree, so its bytes depend on the source alone
        self.live_files: Counter = Counter()
        self.live_bytes: Counter = Counter()

    def add(self, version: int, record: dict) -> None:
        encoded = snapshot.encode_entry(record, version)
        self.file.write(encoded)
        self.size += len(encoded)
        self.newest = max(self.newest, record["mtime_ns"])
        self.totals["entries"] += 1
        if record["kind"] == FILE:
            self.totals["files"] += 1
            self.totals["bytes"] += record["size"]
            stream = record["stream_size"]
            first_leaf = 0
            for number, leaves in zip(record["bins"], record["parts"]):
                self.live_files[number] += 1
                self.live_bytes[number] += min(stream, (first_leaf + leaves) * CHUNK_SIZE) - first_leaf * CHUNK_SIZE
                first_leaf += leaves

    def pieces(self) -> Iterator[bytes]:
        self.file.close()
        with open(self.path, "rb") as f:
            while piece := f.read(CHUNK_SIZE):
                yield piece

    def close(self) -> None:
        self.file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Scan:
    def __init__(
        self,
        source: Source,
        index: Index,
        cipher: Cipher,
        secret: bytes,
        bin_size: int,
        *,
        skip_unreadable: bool = False,
        advance: Callable[[int], None] | None = None,
        on_seal: Callable[[dict], None] | None = None,
        car_dir: str | None = None,
        repack_below: float | None = None,
        exclude: Collection[bytes] = (),
    ):
        """With `car_dir`, each bin's CAR is also written there as it is laid out (one read of the source).

        With `repack_below`, the live files of current bins whose live share of their payload is below
        it are placed again (new versions in new bins), so that those bins retire.

        `exclude`: source-relative paths left out of the walk (packerfs's own output, state or
        mount point inside the source; see packerfs.source.excluded_paths).
        """
        self.car_dir = car_dir
        self.exclude = frozenset(exclude)
        self.source = source
        self.index = index
        self.cipher = cipher
        self.secret = secret
        self.bin_size = bin_size
        self.skip_unreadable = skip_unreadable
        self.advance = advance or (lambda n: None)
        self.on_seal = on_seal or (lambda result: None)
        self.dataset = index.dataset
        self.recipients = list(cipher.recipients)
        self.layout: BinLayout | None = None
        self.ancestors: list[Entry] = []  # directories above the entry being handled (root first)
        # Records, paths and digests waiting to be written to the index. Finished
        # ones are flushed in batches; a record only counts as packed once every
        # bin it names is sealed, so flushing early never makes a lost bin look done.
        self.pending_files: dict[int, dict] = {}
        self.pending_paths: dict[bytes, int] = {}
        self.pending_digests: list = []
        self.pending_touched: list[bytes] = []
        self.pending_bin_updates: list[tuple[int, dict]] = []
        self.index_is_new = not index.latest_versions_exist()
        self.report = ScanReport()
        scan_state = index.get_meta(b"scan", {}) or {}
        self.next_version = scan_state.get("next_version", 1)
        self.next_bin = scan_state.get("next_bin", 1)
        self.next_snapshot = scan_state.get("next_snapshot", 1)
        # Something changed since the last snapshot (possibly in an interrupted earlier run).
        self.dirty = scan_state.get("dirty", True) or self.index_is_new
        self.generation = scan_state.get("generation", 0) + 1
        index.generation = self.generation
        self.vacate = self._bins_to_vacate(repack_below) if repack_below is not None else set()
        self.tree: _TreeSpill | None = None

    # ================================================================ driver

    def run(self) -> ScanReport:
        problems: list[ScanProblem] = []
        total = 0
        for entry in self.source.walk(problems, exclude=self.exclude, keep=True):
            if entry.path == b"" or entry.kind != FILE:
                continue
            total += entry.size
        fatal = [p for p in problems if p.fatal]
        if fatal and not self.skip_unreadable:
            listing = "; ".join(f"{os.fsdecode(p.path) or '.'}: {p.reason}" for p in fatal)
            raise PackerfsError(
                f"{len(fatal)} source entr{'y' if len(fatal) == 1 else 'ies'} cannot be read ({listing}); "
                f"fix the permissions or pass --skip-unreadable"
            )
        for p in problems:
            log.warning("%s: %s", self.source.display(p.path), p.reason)
        self.report.problems = problems
        self.report.bytes_total = total
        set_total = getattr(self.advance, "set_total", None)
        if set_total is not None:
            set_total(total)
        self._save_state("scanning")

        self.tree = _TreeSpill(os.path.join(self.index.state_dir, "snapshot.spill"))
        try:
            self._scan_all()
        finally:
            self.tree.close()
            if self.layout is not None:
                self.layout.abandon()
                self.layout = None
        return self.report

    def _scan_all(self) -> None:
        late: list[ScanProblem] = []
        entries = self.source.walk(late, exclude=self.exclude, replay=True)
        for entry in self.source.read_ahead(entries, self._will_read):
            if entry.path == manifest.DIRNAME:
                raise UsageError(
                    f"{self.source.display(entry.path)}: this name is reserved for packerfs's own "
                    f"metadata in each CAR; rename it"
                )
            while self.ancestors and not _is_ancestor(self.ancestors[-1].path, entry.path):
                self.ancestors.pop()
            self._handle(entry)
            if entry.kind == DIR:
                self.ancestors.append(entry)
        self._late_problems(late)
        self._finish()
        self._save_state("ready")

    def _earlier(self, entry: Entry) -> tuple[int | None, dict | None, bool, bool]:
        """(version, record, same, moving): the entry's latest record, whether the entry is still that
        version, and whether it moves out of a bin being vacated."""
        version = record = None
        if not self.index_is_new:
            version = self.index.latest_version(entry.path)
            record = self.index.file(version) if version is not None else None
        same = record is not None and tuple(record["fp"]) == tuple(entry.fingerprint)
        moving = same and entry.kind == FILE and not self.vacate.isdisjoint(record["bins"])
        return version, record, same, moving

    def _kept(self, record: dict | None, same: bool, moving: bool) -> bool:
        """Is the entry's sealed record still it, so that nothing is read or placed again?"""
        sealed = record is not None and all(self.index.bin(b) is not None for b in record["bins"])
        return same and record["complete"] and sealed and not moving

    def _will_read(self, entry: Entry) -> bool:
        """Will the scan read this file from its first byte? (For the source's read-ahead.)"""
        if entry.kind != FILE or not entry.size:
            return False
        _, record, same, moving = self._earlier(entry)
        if self._kept(record, same, moving):
            return False
        return not (same and record.get("leaves_sealed"))  # a continued file is read from its seam

    def _handle(self, entry: Entry) -> None:
        version, record, same, moving = self._earlier(entry)
        if self._kept(record, same, moving):
            self.report.skipped += 1
            self.tree.add(version, record)
            self.pending_touched.append(entry.path)
            if len(self.pending_touched) >= PENDING_FLUSH:
                self._flush_finished()
            return
        self.dirty = True
        if moving:
            self.report.repacked += 1
            same = False
        elif record is not None and not same and record["kind"] != DIR and record["bins"]:
            self._note(self.report.changed_paths, "changed", entry.path)
        if entry.kind == DIR:
            self._place_dir(entry)
        elif entry.kind == SYMLINK:
            self._place_symlink(entry)
        else:
            self._place_file(entry, record if same else None)

    # ================================================================ bins

    def _new_bin(self) -> None:
        number = self.next_bin
        self.next_bin += 1
        sink = None
        if self.car_dir is not None:
            sink = SyncingFile(os.path.join(self.car_dir, car_name(number) + ".partial"))
        self.layout = self._fresh_layout(number, sink)
        self.index.clear_segments(number)

    def _fresh_layout(self, number: int, sink=None, *, hashing: bool = True) -> BinLayout:
        layout = BinLayout(
            number, self.bin_size, self.dataset, self.cipher.name, self.recipients, sink, hashing=hashing
        )
        root = layout.open_frame(b"", b"")
        layout.budget.add_link(root, len(manifest.DIRNAME))
        return layout

    def _chain(self) -> list[Entry]:
        return self.ancestors

    def _sync_frames(self, layout: BinLayout, chain: list[Entry]) -> None:
        """Make the layout's open directories exactly `chain` (root first), closing and opening frames."""
        keep = 0
        frames = layout.frames
        # frames[0] is the root, matched by chain[0] (the root entry, path b"")
        while keep + 1 < len(frames) and keep + 1 < len(chain) and frames[keep + 1].path == chain[keep + 1].path:
            keep += 1
        while len(frames) > keep + 1:
            layout.close_frame()
        if len(frames) == 1 and not _has_dir_entry(layout, b""):
            self._add_dir_entry(layout, chain[0])
        for dir_entry in chain[keep + 1 :]:
            layout.open_frame(dir_entry.path, dir_entry.name)
            self._add_dir_entry(layout, dir_entry)

    def _add_dir_entry(self, layout: BinLayout, dir_entry: Entry) -> None:
        entry = _manifest_base(dir_entry)
        layout.add_manifest_entry(entry, manifest.entry_bound("dir", dir_entry.path))
        layout.opened_dirs.add(dir_entry.path)

    def _ensure_room(self, cost_of: Callable[[BinLayout], int], what: bytes) -> None:
        """Open the chain for the next entry in the current bin, or in a new one if it does not fit."""
        if self.layout is None:
            self._new_bin()
        self._sync_frames(self.layout, self._chain())
        if cost_of(self.layout) <= self.layout.budget.available():
            return
        if not self.layout.is_empty:
            self._seal()
            self._new_bin()
            self._sync_frames(self.layout, self._chain())
            if cost_of(self.layout) <= self.layout.budget.available():
                return
        raise UsageError(
            f"bin size {self.bin_size} is too small to hold {os.fsdecode(what) or '.'} with its CAR overhead; "
            f"use a larger --bin-size"
        )

    def _seal(self) -> None:
        layout = self.layout
        result = layout.seal()
        segments = layout.take_segments()
        files = list(self.pending_files.items())
        self.index.commit(
            files=files,
            paths=list(self.pending_paths.items()),
            touched=self.pending_touched,
            digests=self.pending_digests,
            bins=[(layout.number, result)],
            bin_updates=self.pending_bin_updates,
            segments=[(layout.number, end, record) for end, record in segments],
            meta=[(b"scan", self._state("scanning"))],
        )
        self.pending_files = {v: r for v, r in files if not r["complete"]}
        self.pending_paths = {}
        self.pending_digests = []
        self.pending_touched = []
        self.pending_bin_updates = []
        self.report.bins_sealed.append(layout.number)
        self.layout = None
        if layout.sink is not None:
            # The index commit above came first: a CAR under its final name is always a sealed bin's.
            layout.sink.close()
            partial = layout.sink.name
            os.replace(partial, partial[: -len(".partial")])
        log.info(
            "sealed bin %d: %d bytes (%.2f%% of %d), piece %s",
            layout.number, result["car_size"], 100 * result["car_size"] / self.bin_size, self.bin_size,
            result["piece_cid"],
        )
        self.on_seal(result)

    def _flush_finished(self) -> None:
        """Write finished records and their digests now, so memory does not grow with a bin's file count."""
        done = [(v, r) for v, r in self.pending_files.items() if r["complete"]]
        if not done and not self.pending_touched:
            return
        self.index.commit(
            files=done, paths=list(self.pending_paths.items()), touched=self.pending_touched,
            digests=self.pending_digests,
        )
        for version, _ in done:
            del self.pending_files[version]
        self.pending_paths = {}
        self.pending_digests = []
        self.pending_touched = []

    def _flush_segments(self) -> None:
        if self.layout is not None:
            segments = self.layout.take_segments()
            if segments:
                self.index.commit(segments=[(self.layout.number, end, record) for end, record in segments])

    # ================================================================ entries

    def _new_record(self, entry: Entry) -> tuple[int, dict]:
        version = self.next_version
        self.next_version += 1
        record = {
            "path": entry.path,
            "kind": entry.kind,
            "mode": entry.mode,
            "mtime_ns": entry.mtime_ns,
            "size": entry.size,
            "fp": list(entry.fingerprint),
            "target": entry.target,
            "bins": [],
            "complete": True,
        }
        return version, record

    def _place_dir(self, entry: Entry) -> None:
        if entry.path == b"":
            if self.layout is None:
                self._new_bin()
            self._sync_frames(self.layout, [entry])
        else:
            bound = manifest.entry_bound("dir", entry.path)

            def cost(layout: BinLayout) -> int:
                return layout.budget.entry_cost(len(entry.name), bound, costs.DIR_NODE_FIXED)

            self._ensure_room(cost, entry.path)
            self.layout.open_frame(entry.path, entry.name)
            self._add_dir_entry(self.layout, entry)
        # A new or changed directory is data worth a bin of its own, even with nothing else in it.
        self.layout.is_empty = False
        version, record = self._new_record(entry)
        record["bins"].append(self.layout.number)
        self.pending_files[version] = record
        self.pending_paths[entry.path] = version
        self.tree.add(version, record)

    def _place_symlink(self, entry: Entry) -> None:
        block = symlink_block(entry.target)
        bound = manifest.entry_bound("symlink", entry.path, target=entry.target)

        def cost(layout: BinLayout) -> int:
            return layout.budget.entry_cost(len(entry.name), bound, costs.section_length(len(block.data)))

        self._ensure_room(cost, entry.path)
        layout = self.layout
        layout.emit_stored(block.cid, block.data)
        layout.add_entry(entry.name, block.cid, len(block.data))
        meta = _manifest_base(entry)
        meta.update(target=entry.target, cid=block.cid)
        layout.add_manifest_entry(meta, bound)
        version, record = self._new_record(entry)
        record["bins"].append(layout.number)
        self.pending_files[version] = record
        self.pending_paths[entry.path] = version
        self.tree.add(version, record)

    # ---------------------------------------------------------------- files

    def _name_bounds(self, entry: Entry) -> tuple[int, int]:
        name_bound = min(NAME_MAX, len(entry.name) + len(self.cipher.suffix) + PART_SUFFIX_MAX)
        parent = entry.path[: -len(entry.name)]
        bound = manifest.entry_bound("file", entry.path, b"\0" * (len(parent) + name_bound))
        return name_bound, bound

    def _plan(self, entry: Entry, stream_size: int) -> tuple[bool, list[int]]:
        """(seal the current bin first?, leaves per part): a pure function of sizes and budgets."""
        name_bound, bound = self._name_bounds(entry)
        leaves = costs.leaf_count(stream_size)
        first = None
        if self.layout is not None:
            self._sync_frames(self.layout, self._chain())
            first = self.layout.budget.max_leaves(name_bound, bound, stream_size)
            if first >= leaves:
                return False, [leaves]  # fits whole: the common case, no simulation needed
        fresh = self._fresh_layout(0, hashing=False)
        self._sync_frames(fresh, self._chain())
        per_bin = fresh.budget.max_leaves(name_bound, bound, stream_size)
        if per_bin == 0:
            raise UsageError(
                f"bin size {self.bin_size} is too small to hold one 1 MiB leaf of "
                f"{os.fsdecode(entry.path)} with its CAR overhead; use a larger --bin-size"
            )
        seal_first = first == 0
        if not first:
            first = per_bin
        parts = []
        left = leaves
        take = first
        while left:
            parts.append(min(take, left))
            left -= parts[-1]
            take = per_bin
        return seal_first, parts

    def _place_file(self, entry: Entry, earlier: dict | None) -> None:
        """Place a file, or continue one whose first parts were sealed before an interruption."""
        if earlier is not None and earlier.get("leaves_sealed"):
            version = self.index.latest_version(entry.path)
            if self._continue_file(entry, version, earlier):
                return
            # The source changed since those parts were sealed: the file starts over as a new version.
            self._note(self.report.changed_paths, "changed", entry.path)
        stream_size = self.cipher.stream_size(entry.size)
        seal_first, parts = self._plan(entry, stream_size)
        if self.layout is None:
            self._new_bin()
        elif seal_first:
            self._seal()
            self._new_bin()
        self._sync_frames(self.layout, self._chain())
        version, record = self._new_record(entry)
        record.update(stream_size=stream_size, parts=parts, complete=False, leaves_sealed=0)
        encryptor = self.cipher.new_file(entry.size, self.secret)
        self._lay_out(entry, version, record, encryptor, self._stream_leaves(entry, encryptor), 0)

    def _continue_file(self, entry: Entry, version: int, record: dict) -> bool:
        """Continue a file whose first parts are sealed, from the end of its sealed leaves.

        The caller matched the file's fingerprint (size, mtime_ns, ctime_ns, inode) with the record.
        The last sealed leaf is regenerated from the source and checked against its stored digest
        (False on a mismatch): that leaf holds every plaintext octet before the seam that the resumed
        encryptor reads again (the age chunk, or the OpenPGP octets after the stored SHA-1 state, that
        straddle the seam). Nothing before it is read or encrypted again (Cipher.resume_at)."""
        sealed = record["leaves_sealed"]
        offset = sealed * CHUNK_SIZE
        if not self._last_leaf_matches(entry, version, record, sealed):
            return False
        encryptor, plain_offset = self.cipher.resume_at(record["params"], entry.size, self.secret, offset)
        if self.layout is not None and not self.layout.is_empty:
            raise AssertionError("a continued file must start a fresh bin, as it did before the interruption")
        if self.layout is None:
            self._new_bin()
        self._sync_frames(self.layout, self._chain())
        leaves = self._stream_leaves(entry, encryptor, plain_offset)
        self._lay_out(entry, version, record, encryptor, leaves, sealed)
        return True

    def _last_leaf_matches(self, entry: Entry, version: int, record: dict, sealed: int) -> bool:
        """Does the source still produce the last sealed leaf (one leaf of reading and encryption)?"""
        opened = self.source.open(entry.path, entry.fingerprint)
        try:
            stream = self.cipher.open_stream(record["params"], entry.size, opened.read, self.secret)
            try:
                leaf = stream.read((sealed - 1) * CHUNK_SIZE, CHUNK_SIZE)
            except SourceChanged:  # the file is shorter than its fingerprint says, or no longer that version
                return False
        finally:
            opened.close()
        return hashlib.sha256(leaf).digest() == self.index.digests_of(version, sealed - 1, 1)

    def _stream_leaves(self, entry: Entry, encryptor, start: int = 0) -> Iterator[bytes]:
        """The file's stream, read once from the source and encrypted, cut into leaves.

        `start`: the plaintext offset a resumed encryptor (Cipher.resume_at) takes first; its
        stream starts at a leaf boundary, so the leaves are cut from there."""
        leaf = bytearray(CHUNK_SIZE)  # filled from the encryptor's output, then copied out once
        filled = 0

        def cut(data: bytes) -> Iterator[bytes]:
            nonlocal filled
            view = memoryview(data)
            while view:
                take = min(len(view), CHUNK_SIZE - filled)
                leaf[filled : filled + take] = view[:take]
                filled += take
                view = view[take:]
                if filled == CHUNK_SIZE:
                    filled = 0
                    yield bytes(leaf)

        if start:
            self.advance(start)  # the sealed prefix counts as done
        for data in self.source.stream(entry, start):
            self.report.bytes_read += len(data)
            self.advance(len(data))
            yield from cut(encryptor.update(data))
        yield from cut(encryptor.finish())
        if filled or self.cipher.stream_size(entry.size) == 0:
            yield bytes(leaf[:filled])  # the short last leaf, or the one empty leaf of an empty stream

    def _lay_out(self, entry: Entry, version: int, record: dict, encryptor, leaves: Iterator[bytes], first_leaf: int) -> None:
        """Emit leaves `first_leaf`… into bins part by part, sealing between parts."""
        parts = record["parts"]
        stream_size = record["stream_size"]
        self.pending_files[version] = record
        self.pending_paths[entry.path] = version
        if len(self.pending_files) >= PENDING_FLUSH:
            self._flush_finished()
        _, bound = self._name_bounds(entry)
        part, part_start = 0, 0
        while part_start < first_leaf:  # a continued file resumes at a part boundary
            part_start += parts[part]
            part += 1
        assert part_start == first_leaf
        builder = FileBuilder()
        leaf_index = first_leaf
        # Digests are stored per chunk of DIGESTS_PER_CHUNK leaves; a chunk is rewritten as it grows.
        chunk_first = first_leaf - first_leaf % DIGESTS_PER_CHUNK
        digests = bytearray(self.index.digests_of(version, chunk_first, first_leaf - chunk_first))

        def flush_digests() -> None:
            nonlocal digests, chunk_first
            if digests:
                self.pending_digests.append(((version, chunk_first // DIGESTS_PER_CHUNK), bytes(digests)))
            if len(digests) == DIGEST * DIGESTS_PER_CHUNK:
                digests = bytearray()
                chunk_first += DIGESTS_PER_CHUNK

        for leaf in leaves:
            layout = self.layout
            if leaf_index == part_start and layout.number not in record["bins"]:
                record["bins"].append(layout.number)
                layout.file_records += 1
            digest = hashlib.sha256(leaf).digest()
            digests += digest
            cid = cid_from_digest(RAW, digest)
            layout.emit_leaf(version, leaf_index, cid, leaf)
            leaf_index += 1
            for block in builder.add_leaf(Node(cid, len(leaf), len(leaf))):
                layout.emit_file_node(block, version, leaf_index)
            if leaf_index % DIGESTS_PER_CHUNK == 0:
                flush_digests()
            if len(layout.segments) >= SEGMENT_FLUSH:
                self._flush_segments()
            if leaf_index - part_start < parts[part]:
                continue
            # the part is complete: link it, describe it, and seal the bin if more parts follow
            tail, root = builder.finish()
            for block in tail:
                layout.emit_file_node(block, version, leaf_index)
            name = name_in_car(entry.name, self.cipher.suffix.encode() + part_suffix(part + 1, len(parts)))
            layout.add_entry(name, root.cid, root.tsize)
            meta = _manifest_base(entry)
            offset = part_start * CHUNK_SIZE
            meta.update(
                name=entry.path[: -len(entry.name)] + name, version=version, size=entry.size, stream=stream_size,
                part=part + 1, parts=len(parts), offset=offset,
                length=min(stream_size, leaf_index * CHUNK_SIZE) - offset, cid=root.cid,
            )
            layout.add_manifest_entry(meta, bound)
            part += 1
            part_start = leaf_index
            builder = FileBuilder()
            if part < len(parts):
                flush_digests()
                record["leaves_sealed"] = leaf_index
                record["params"] = encryptor.params()
                self._seal()
                self._new_bin()
                self._sync_frames(self.layout, self._chain())
        if leaf_index != costs.leaf_count(stream_size) or part != len(parts):
            raise AssertionError(f"{entry.path!r}: {leaf_index} leaves in {part} parts, planned {parts}")
        flush_digests()
        record["params"] = encryptor.params()
        record["complete"] = True
        self.tree.add(version, record)
        self.report.files_placed += 1

    # ================================================================ state

    def _state(self, state: str) -> dict:
        return {
            "state": state,
            "next_version": self.next_version,
            "next_bin": self.next_bin,
            "next_snapshot": self.next_snapshot,
            "generation": self.generation,
            "dirty": self.dirty,
            "bytes_total": self.report.bytes_total,
        }

    def _save_state(self, state: str) -> None:
        self.index.commit(meta=[(b"scan", self._state(state))])

    def _note(self, names: list[bytes], counter: str, path: bytes) -> None:
        setattr(self.report, counter, getattr(self.report, counter) + 1)
        if len(names) < REPORT_PATHS:
            names.append(path)

    # ================================================================ snapshot

    def _bins_to_vacate(self, below: float) -> set[int]:
        """Current bins whose live share is under `below` (at 1 or more: also every bin that cannot be generated)."""
        vacate = set()
        for result in self.index.all_bins():
            if result.get("status") != "current" or result.get("snapshot_only"):
                continue
            payload = result.get("payload_bytes", 0)
            files = result.get("files", 0)
            live = result.get("live_bytes", payload) / payload if payload else (
                result.get("live_files", files) / files if files else 1.0
            )
            if live < below or (below >= 1 and not result.get("regenerable", True)):
                vacate.add(result["bin"])
        return vacate

    def _drop_unseen(self) -> None:
        """Forget the paths this scan did not see: they are gone from the source."""
        dropped: list[bytes] = []
        for key, version, generation in self.index.iter_paths():
            if generation != self.generation:
                dropped.append((key, version))
                if len(dropped) >= PENDING_FLUSH:
                    self._drop(dropped)
        self._drop(dropped)

    def _drop(self, rows: list[tuple[bytes, int]]) -> None:
        """`dirty` is committed before anything is dropped, so a crash after this still ends in a snapshot."""
        if not rows:
            return
        if not self.dirty:
            self.dirty = True
            self._save_state("scanning")
        for key, version in rows:
            try:
                record = self.index.file(version)
            except PackerfsError:
                continue
            if record["kind"] != DIR:
                self._note(self.report.deleted_paths, "deleted", record["path"])
        self.index.commit(dropped=[key for key, _ in rows])
        rows.clear()

    def _late_problems(self, late: list[ScanProblem]) -> None:
        """Entries that became unreadable (or special) between the counting walk and this one."""
        known = {(p.path, p.reason) for p in self.report.problems}
        fresh = [p for p in late if (p.path, p.reason) not in known]
        for p in fresh:
            log.warning("%s: %s", self.source.display(p.path), p.reason)
        self.report.problems.extend(fresh)
        fatal = [p for p in fresh if p.fatal]
        if fatal and not self.skip_unreadable:
            listing = "; ".join(f"{os.fsdecode(p.path) or '.'}: {p.reason}" for p in fatal[:20])
            raise PackerfsError(
                f"{len(fatal)} source entr{'y' if len(fatal) == 1 else 'ies'} became unreadable during the scan "
                f"({listing}); run again (sealed bins are kept) or pass --skip-unreadable"
            )

    def _keep_skipped(self) -> None:
        """An entry skipped as unreadable keeps its earlier version in the snapshot: unreadable is not deleted."""
        for p in self.report.problems:
            if p.fatal:
                for version in self.index.touch_tree(p.path):
                    self.tree.add(version, self.index.file(version))

    def _finish(self) -> None:
        """After the walk: seal the last bin with a snapshot if anything changed, and settle bin statuses."""
        self._flush_finished()
        self._keep_skipped()
        self._drop_unseen()
        tree = self.tree
        live_files, live_bytes = tree.live_files, tree.live_bytes
        if not self.dirty:
            if self.layout is not None and not self.layout.is_empty:
                self._seal()  # cannot happen without a change, but never drop laid-out data
            return
        snapshot_bins = self._seal_snapshot(tree)
        updates = []
        for result in self.index.all_bins():
            number = result["bin"]
            files = result.get("files", 0)
            current = number in live_files or number in snapshot_bins
            fields = {
                "status": "current" if current else "retired",
                "live_files": live_files.get(number, 0),
                "live_bytes": live_bytes.get(number, 0),
                "regenerable": live_files.get(number, 0) == files,
                "snapshot_only": number in snapshot_bins and files == 0,
            }
            if result.get("status") != "retired" and not current:
                self.report.retired_bins.append(number)
            if any(result.get(k) != v for k, v in fields.items()):
                updates.append((number, fields))
        self.dirty = False
        self.index.commit(bin_updates=updates, meta=[(b"scan", self._state("scanning"))])

    def _seal_snapshot(self, tree: _TreeSpill) -> set[int]:
        """Lay the snapshot out after whatever the last bin holds, in parts over new bins if it must."""
        snapshot_id = self.next_snapshot
        entries_size, totals, live, time_ns = tree.size, tree.totals, set(tree.live_files), tree.newest
        header = snapshot.encode_header(self.dataset, snapshot_id, time_ns)
        # Which bins the snapshot needs depends on where it lands, so the trailer is bounded with the
        # widest bin numbers and then padded to exactly that bound: the plan never moves.
        parts_bound = 2 + (len(header) + entries_size + 10 * len(live)) // CHUNK_SIZE
        widest_bins = sorted(live) + [2**32 - 1] * parts_bound
        trailer_size = len(_padded_trailer(totals, widest_bins, [2**32 - 1] * parts_bound, 0))
        size = len(header) + entries_size + trailer_size
        extra = snapshot.descriptor_bound()
        widest_name = snapshot.NAME + b"x" * PART_SUFFIX_MAX
        if self.layout is None:
            self._new_bin()
        room = self.layout.budget.max_meta_bytes(widest_name, size, extra)
        if room < size and not self.layout.is_empty:
            self._seal()  # it does not fit beside the data: start it in a bin of its own
            self._new_bin()
            room = self.layout.budget.max_meta_bytes(widest_name, size, extra)
        if room == 0:
            raise UsageError(
                f"bin size {self.bin_size} is too small to hold the data-set snapshot; use a larger --bin-size"
            )
        # Later parts go to fresh bins, which have at least the room this one has.
        plan = [(self.layout.number, room)]
        while sum(length for _, length in plan) < size:
            plan.append((plan[-1][0] + 1, min(room, size - sum(length for _, length in plan))))
        if len(plan) > parts_bound:
            raise AssertionError(f"snapshot needs {len(plan)} parts, bounded by {parts_bound}")
        snapshot_bins = [number for number, _ in plan]
        trailer = _padded_trailer(totals, sorted(live | set(snapshot_bins)), snapshot_bins, trailer_size)
        body = _SnapshotBody(header, trailer, size, tree.pieces())
        offset = 0
        for part, (number, length) in enumerate(plan, 1):
            if self.layout is None:
                self._new_bin()
            if self.layout.number != number:
                raise AssertionError(f"snapshot part {part} planned for bin {number}, laid out in {self.layout.number}")
            name = snapshot.NAME + part_suffix(part, len(plan))
            entry = self.layout.emit_meta_file(name, body.take(length), length, extra)
            self.layout.snapshot = snapshot.descriptor(
                snapshot_id, time_ns, totals, size, part, len(plan), offset, length, entry.cid
            )
            offset += length
            if part == len(plan):
                self.next_snapshot = snapshot_id + 1
            self._seal()
        body.close()
        self.report.snapshot = {"id": snapshot_id, "time_ns": time_ns, **totals, "bins": snapshot_bins}
        log.info(
            "sealed snapshot %d in bin%s %s: %d entries, %d files, %d bytes",
            snapshot_id, "s" if len(plan) > 1 else "", ", ".join(map(str, snapshot_bins)),
            totals["entries"], totals["files"], totals["bytes"],
        )
        return set(snapshot_bins)


class _SnapshotBody:
    """The snapshot's bytes (header, the spilled entries, trailer), handed out part by part."""

    def __init__(self, header: bytes, trailer: bytes, size: int, entries: Iterator[bytes]):
        self.pieces = itertools.chain([header], entries, [trailer])
        self.buffer = bytearray()
        self.size = size
        self.handed = 0

    def take(self, length: int) -> Iterator[bytes]:
        while length:
            while not self.buffer:
                try:
                    self.buffer += next(self.pieces)
                except StopIteration:
                    raise AssertionError("the snapshot ended before its planned size") from None
            piece = bytes(self.buffer[:length])
            del self.buffer[: len(piece)]
            length -= len(piece)
            self.handed += len(piece)
            yield piece

    def close(self) -> None:
        rest = b"".join(self.pieces) + bytes(self.buffer)
        if rest or self.handed != self.size:
            raise AssertionError("the snapshot's size changed while it was written")


def _padded_trailer(totals: dict, bins: list[int], snapshot_bins: list[int], size: int) -> bytes:
    """The trailer, padded to exactly `size` bytes (0: unpadded)."""
    plain = snapshot.encode_trailer(totals["entries"], totals["files"], totals["bytes"], bins, snapshot_bins)
    if not size:
        return plain
    # A pad field's head grows in steps, so some totals need a longer key to be reached exactly.
    for key in ("pad", "pad_", "pad__", "pad___", "pad____"):
        for n in range(max(0, size - len(plain) - 16), size - len(plain) + 1):
            trailer = snapshot.cbor.encode(
                {**snapshot.cbor.decode(plain), key: bytes(n)}
            )
            if len(trailer) == size:
                return trailer
    raise AssertionError(f"cannot pad the snapshot trailer to {size} bytes")


class SyncingFile:
    """A CAR being written during the scan: flushed to disk as it grows, fsynced when closed.

    Syncing every SYNC_EVERY bytes (on the writer thread) keeps the disk busy
    while the scan computes, instead of leaving gigabytes of dirty pages for
    one long fsync at the end.
    """

    SYNC_EVERY = 64 << 20

    def __init__(self, path: str):
        self.name = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.unsynced = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
            self.unsynced += len(data)
            if self.unsynced >= self.SYNC_EVERY:
                os.fdatasync(self.fd)
                self.unsynced = 0
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.name) from None

    def pwrite(self, data: bytes, offset: int) -> None:
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.name) from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, self.name) from None
            finally:
                os.close(self.fd)
                self.fd = -1


def _is_ancestor(dir_path: bytes, path: bytes) -> bool:
    return dir_path == b"" or path.startswith(dir_path + b"/")


def _has_dir_entry(layout: BinLayout, path: bytes) -> bool:
    return path in layout.opened_dirs


def _manifest_base(entry: Entry) -> dict:
    return {"path": entry.path, "kind": entry.kind, "mode": entry.mode, "mtime_ns": entry.mtime_ns}
