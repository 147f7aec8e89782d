"""One bin under construction: its byte budget, and the CAR it lays out.

Budget keeps upper bounds (see costs.py) so the planner can decide, before a
file is read, how many leaves of it still fit. BinLayout emits the bin's CAR
byte stream into the commP hasher as the scan produces it, and records the
segments that let BinReader regenerate any byte range later:

  ["R", bytes]                         literal bytes (the CAR header)
  ["S", section]                       a stored section (prefix + block); the
                                       block is checked against its CID on read
  ["Z", compressed]                    the same, zlib-compressed (manifests and
                                       directories repeat themselves)
  ["L", version, first_leaf, count]    consecutive raw-leaf sections of a
                                       file version's stream
  ["N", version, first_leaf, count, cid]  a level-1 file node over those
                                       leaves, regenerated from their digests

Blocks are emitted in post-order (children before parents), the root
directory last, so the writer never buffers and the header, which names the
root, is fixed up at the end by recomputing commP's leftmost path.
"""

from __future__ import annotations

import os
import zlib

from dataclasses import dataclass, field

from packerfs import locator, manifest
from packerfs.ipld import car
from packerfs.ipld.unixfs import CHUNK_SIZE, Entry, FileBuilder, FileNodeBlock, directory_blocks, raw_leaf
from packerfs.ipld.cid import cid_to_str
from packerfs.piece import CommP
from packerfs.pipeline import Pipe
from packerfs.plan import costs

ROOT_CID_LEN = 36
HEADER_LEN = len(car.placeholder_header(ROOT_CID_LEN))
MAX_RUN = 1024  # leaves per "L" segment: one level-1 node's worth
COALESCE = 1 << 20  # bytes gathered before the commP and file threads are handed them


@dataclass
class Frame:
    """A directory open in this bin: its entries so far and their bound."""

    path: bytes
    name: bytes
    entries: list[Entry] = field(default_factory=list)
    links_bytes: int = 0
    count: int = 0

    def bound(self) -> int:
        return costs.directory_bound(self.links_bytes, self.count)


class Budget:
    """Upper bound of a bin's final size, kept as things are added.

    `sealing` (a packerfs.privacy.sealed_manifest.ManifestSealer, with --hide-names): the manifest
    is stored as an encrypted stream, whose size (and name) the bound takes instead."""

    def __init__(self, capacity: int, manifest_fixed: int, sealing=None):
        self.capacity = capacity
        self._manifest_stream = sealing.stream_size if sealing is not None else (lambda n: n)
        self._manifest_link = costs.DIR_NODE_FIXED + costs.dir_link_bound(manifest_file_name(sealing))
        self.emitted = HEADER_LEN  # exact bytes already laid out
        self.manifest_bytes = manifest_fixed  # bound on the manifest's encoding
        self.reserved = 0  # links in the .packerfs node besides the manifest's
        self.frames: list[Frame] = []
        self._overheads = (-1, 0, -1, 0)  # (manifest bytes, overhead) twice: see manifest_overhead

    def manifest_overhead(self, manifest_bytes: int | None = None) -> int:
        m = self.manifest_bytes if manifest_bytes is None else manifest_bytes
        # Each entry asks for the overhead at the current and at the grown manifest size, and then
        # the grown size becomes the current one: the two answers used last are kept.
        cached = self._overheads
        if m == cached[0]:
            return cached[1]
        if m == cached[2]:
            self._overheads = (m, cached[3], cached[0], cached[1])
            return cached[3]
        value = costs.file_bound(self._manifest_stream(m)) + self._manifest_link
        self._overheads = (m, value, cached[0], cached[1])
        return value

    def total(self) -> int:
        return (
            self.emitted + sum(f.bound() for f in self.frames) + self.manifest_overhead() + self.reserved
            + locator.SECTION_LENGTH
        )

    def available(self) -> int:
        return self.capacity - self.total()

    def entry_cost(self, link_name_bound: int, manifest_entry: int, content: int) -> int:
        """Bytes that adding one entry (a link in the top frame) would add to the bound."""
        top = self.frames[-1]
        link = costs.LINK_FIXED + link_name_bound
        dir_delta = costs.directory_bound(top.links_bytes + link, top.count + 1) - top.bound()
        current = self.manifest_overhead()
        manifest_delta = self.manifest_overhead(self.manifest_bytes + manifest_entry) - current
        return dir_delta + manifest_delta + content

    def manifest_entry_cost(self, manifest_entry: int) -> int:
        """Bytes one more manifest entry (and nothing in the UnixFS tree) adds to the bound."""
        return self.manifest_overhead(self.manifest_bytes + manifest_entry) - self.manifest_overhead()

    def open_frame(self, path: bytes, name: bytes) -> Frame:
        """A directory opened inside the top one: its link is reserved in the parent now."""
        if self.frames:
            self.add_link(self.frames[-1], len(name))
        frame = Frame(path, name)
        self.frames.append(frame)
        return frame

    def add_link(self, frame: Frame, link_name_bound: int) -> None:
        frame.links_bytes += costs.LINK_FIXED + link_name_bound
        frame.count += 1

    def meta_file_cost(self, name: bytes, length: int, manifest_extra: int) -> int:
        """Bytes a file of `length` bytes under `.packerfs/` adds, with `manifest_extra` bytes of manifest."""
        manifest_delta = self.manifest_overhead(self.manifest_bytes + manifest_extra) - self.manifest_overhead()
        return manifest_delta + costs.dir_link_bound(name) + costs.file_bound(length)

    def max_meta_bytes(self, name: bytes, length: int, manifest_extra: int) -> int:
        """Most bytes (whole leaves, or all `length`) of a `.packerfs/` file that still fit; 0 if none."""
        def fits(leaves: int) -> bool:
            return self.meta_file_cost(name, min(leaves * CHUNK_SIZE, length), manifest_extra) <= self.available()

        return min(_most(costs.leaf_count(length), fits) * CHUNK_SIZE, length)

    def max_leaves(self, link_name_bound: int, manifest_entry: int, stream_left: int) -> int:
        """Most leaves of a part (of at most `stream_left` stream bytes) that still fit."""

        def fits(leaves: int) -> bool:
            part = min(leaves * CHUNK_SIZE, stream_left)
            return self.entry_cost(link_name_bound, manifest_entry, costs.file_bound(part)) <= self.available()

        if stream_left == 0:
            return 1 if fits(1) else 0
        return _most(costs.leaf_count(stream_left), fits)


def manifest_file_name(sealing=None) -> bytes:
    """`manifest.cbor`, or with --hide-names the sealed `manifest.cbor.age` / `.gpg`."""
    return manifest.NAME + (sealing.suffix.encode() if sealing is not None else b"")


def _most(limit: int, fits) -> int:
    """The largest n in 0..limit with fits(n), for a fits() that holds up to some n and fails after."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class BinLayout:
    """Lays out one bin's CAR bytes as the scan produces them."""

    def __init__(
        self,
        number: int,
        capacity: int,
        dataset: bytes,
        cipher_name: str,
        recipients: list[str],
        sink=None,
        *,
        hashing: bool = True,
        sealing=None,
    ):
        """`sink`, if given, receives the CAR bytes as they are laid out (write, pwrite, close, name).

        hashing=False makes a layout for planning only: it keeps the budget and
        emits nothing (no commP, no threads).
        `sealing` (--hide-names): a ManifestSealer; the manifest is stored encrypted, and the
        directories of the source are not laid out (they live in the manifest only).
        """
        self.number = number
        self.sink = sink
        self.dataset = dataset
        self.cipher_name = cipher_name
        self.recipients = recipients
        self.sealing = sealing
        self.hidden = sealing is not None
        self.budget = Budget(capacity, manifest.manifest_fixed_bound(recipients, cipher_name), sealing)
        # commP and the file sink each consume the byte stream on their own thread.
        self.commp = CommP() if hashing else None
        self.outputs = []
        if hashing:
            self.outputs.append(Pipe(self.commp.write, name=f"commp-{number}"))
            if sink is not None:
                self.outputs.append(Pipe(sink.write, name=f"car-{number}"))
        self.pending = bytearray()  # laid out, not yet handed to the outputs (see _write)
        self._put(car.placeholder_header(ROOT_CID_LEN))
        self.offset = HEADER_LEN
        self.segments: list[tuple[int, list]] = []  # (end, [start, kind, ...]) not yet handed out
        self.run: list | None = None  # [start, "L", version, first_leaf, count]
        self.manifest_entries = bytearray()
        self.manifest_count = 0
        self.versions: set[int] = set()
        self.opened_dirs: set[bytes] = set()  # directories with a manifest entry in this bin
        self.is_empty = True
        self.meta_entries: list[Entry] = []  # files under .packerfs/ besides the manifest (snapshot parts)
        self.snapshot: dict | None = None  # the manifest's `snapshot` map, when this bin holds a part
        self.file_records = 0  # file versions with a part here
        self.last_section = 0  # section offset of the block laid out last (a part's root, at its end)
        self.snapshot_at = 0  # section offset of the snapshot part's root block, for the tail locator
        self.payload_bytes = 0  # stream bytes of those parts

    @property
    def frames(self) -> list[Frame]:
        return self.budget.frames

    # ------------------------------------------------------------ emitting

    def _write(self, data: bytes) -> None:
        # Small pieces (section prefixes, small files' leaves) are gathered into one hand-over per
        # COALESCE bytes: each put() is a lock and a wake-up of both consumer threads.
        if not self.outputs:
            pass  # a planning layout: nothing consumes the bytes
        elif len(data) >= COALESCE and not self.pending:
            self._put(data)
        else:
            self.pending += data
            if len(self.pending) >= COALESCE:
                self._flush_pending()
        self.offset += len(data)
        self.budget.emitted = self.offset

    def _flush_pending(self) -> None:
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            self._put(data)

    def _put(self, data: bytes) -> None:
        for output in self.outputs:
            output.put(data)

    def _close_run(self) -> None:
        if self.run is not None:
            self.segments.append((self.offset, self.run))
            self.run = None

    def emit_stored(self, cid: bytes, block: bytes) -> None:
        self._close_run()
        start = self.last_section = self.offset
        section = car.section_prefix(cid, len(block)) + block
        self._write(section)
        packed = zlib.compress(section, 6)
        record = [start, "Z", packed] if len(packed) < len(section) * 0.9 else [start, "S", section]
        self.segments.append((self.offset, record))

    def emit_leaf(self, version: int, leaf_index: int, cid: bytes, data: bytes | memoryview) -> None:
        run = self.run
        if run is None or run[2] != version or run[3] + run[4] != leaf_index or run[4] == MAX_RUN:
            self._close_run()
            run = self.run = [self.offset, "L", version, leaf_index, 0]
        self.last_section = self.offset
        self._write(car.section_prefix(cid, len(data)))
        self._write(data)
        run[4] += 1
        self.payload_bytes += len(data)
        self.versions.add(version)
        self.is_empty = False

    def emit_file_node(self, block: FileNodeBlock, version: int, next_leaf: int) -> None:
        """A level-1 node links the `children` leaves just before `next_leaf`: regenerate it, don't store it."""
        if block.level != 1:
            self.emit_stored(block.cid, block.data)
            return
        self._close_run()
        start = self.last_section = self.offset
        self._write(car.section_prefix(block.cid, len(block.data)))
        self._write(block.data)
        self.segments.append((self.offset, [start, "N", version, next_leaf - block.children, block.children, block.cid]))

    def emit_meta_file(self, name: bytes, pieces, length: int, manifest_extra: int) -> Entry:
        """A file of `length` bytes (given as `pieces`) under `.packerfs/`, its blocks stored in the index.

        The caller has checked it fits (Budget.max_meta_bytes); `manifest_extra` is what it adds to
        the manifest's bound.
        """
        self.budget.manifest_bytes += manifest_extra
        self.budget.reserved += costs.dir_link_bound(name)
        builder = FileBuilder()
        leaf = bytearray()
        written = 0

        def emit(data: bytes) -> None:
            node = raw_leaf(data)
            self.emit_stored(node.cid, data)
            for block in builder.add_leaf(node):
                self.emit_stored(block.cid, block.data)

        for piece in pieces:
            leaf += piece
            while len(leaf) >= CHUNK_SIZE:
                emit(bytes(leaf[:CHUNK_SIZE]))
                written += CHUNK_SIZE
                del leaf[:CHUNK_SIZE]
        if leaf or written == 0:
            emit(bytes(leaf))
            written += len(leaf)
        if written != length:
            raise AssertionError(f"bin {self.number}: {name!r} has {written} bytes, planned {length}")
        tail, root = builder.finish()
        for block in tail:
            self.emit_stored(block.cid, block.data)
        entry = Entry(name, root.cid, root.tsize)
        self.snapshot_at = self.last_section  # the root is the block laid out last
        self.meta_entries.append(entry)
        self.is_empty = False
        return entry

    def take_segments(self) -> list[tuple[int, list]]:
        """Segments complete so far (the open leaf run stays until it closes)."""
        out, self.segments = self.segments, []
        return out

    # ------------------------------------------------------------ directories

    def open_frame(self, path: bytes, name: bytes) -> Frame:
        return self.budget.open_frame(path, name)

    def close_frame(self) -> None:
        frame = self.frames.pop()
        blocks, node = directory_blocks(frame.entries)
        for block in blocks:
            self.emit_stored(block.cid, block.data)
        # its link was reserved in the parent when the frame opened
        self.frames[-1].entries.append(Entry(frame.name, node.cid, node.tsize))

    def add_entry(self, name: bytes, cid: bytes, tsize: int) -> None:
        """Link a finished file part or symlink into the top frame."""
        self.budget.add_link(self.frames[-1], len(name))
        self.frames[-1].entries.append(Entry(name, cid, tsize))
        self.is_empty = False

    def add_manifest_entry(self, entry: dict, bound: int) -> None:
        encoded = manifest.encode_entry(entry)
        assert len(encoded) <= bound, "manifest entry exceeds its bound"
        self.manifest_entries += encoded
        self.manifest_count += 1
        self.budget.manifest_bytes += bound

    # ------------------------------------------------------------ sealing

    def abandon(self) -> None:
        """Stop an unsealed bin after an error: its partial CAR is removed, never renamed."""
        try:
            self.close_outputs()
        except Exception:
            pass  # the error that made us abandon the bin is the one to report
        if self.sink is not None:
            try:
                self.sink.close()
            except OSError:
                pass  # (a full disk refusing the final sync, say) the file goes anyway
            try:
                os.unlink(self.sink.name)
            except FileNotFoundError:
                pass

    def close_outputs(self) -> None:
        """Wait for commP and the sink to take every byte, then stop their threads."""
        try:
            self._flush_pending()
            for output in self.outputs:
                output.drain()
        finally:
            for output in self.outputs:
                output.close()
            self.outputs = []

    def seal(self) -> dict:
        """Finish the CAR: close directories, add the manifest and root, fix the header, finish commP."""
        self._close_run()
        while len(self.frames) > 1:
            self.close_frame()
        data = manifest.encode_manifest(
            self.dataset, self.number, self.cipher_name, self.recipients, self.manifest_entries, self.manifest_count,
            snapshot=self.snapshot,
        )
        if self.sealing is not None:
            data = self.sealing.seal(self.number, data)
        meta_start = self.offset
        builder = FileBuilder()
        for offset in range(0, max(len(data), 1), CHUNK_SIZE):
            piece = data[offset : offset + CHUNK_SIZE]
            leaf = raw_leaf(piece)
            self.emit_stored(leaf.cid, piece)
            for block in builder.add_leaf(leaf):
                self.emit_stored(block.cid, block.data)
        tail, manifest_root = builder.finish()
        for block in tail:
            self.emit_stored(block.cid, block.data)
        blocks, meta_dir = directory_blocks(
            [Entry(manifest_file_name(self.sealing), manifest_root.cid, manifest_root.tsize), *self.meta_entries]
        )
        for block in blocks:
            self.emit_stored(block.cid, block.data)
        root_frame = self.frames.pop()
        root_frame.entries.append(Entry(manifest.DIRNAME, meta_dir.cid, meta_dir.tsize))
        blocks, root = directory_blocks(root_frame.entries)
        for block in blocks:
            self.emit_stored(block.cid, block.data)
        self.emit_stored(*locator.encode(meta_start, self.snapshot_at))
        header = car.header(root.cid)
        assert len(header) == HEADER_LEN
        self.segments.insert(0, (HEADER_LEN, [0, "R", header]))
        self.close_outputs()
        self.commp.replace_prefix(header)
        if self.sink is not None:
            self.sink.pwrite(header, 0)
        piece = self.commp.finish()
        if self.offset > self.budget.capacity:
            raise AssertionError(
                f"bin {self.number}: CAR is {self.offset} bytes, over the bin size {self.budget.capacity}"
            )
        return {
            "bin": self.number,
            "car_size": self.offset,
            "root": root.cid,
            "root_cid": cid_to_str(root.cid),
            "piece_cid": piece.piece_cid,
            "piece_cid_v2": piece.piece_cid_v2,
            "piece_size": piece.piece_size,
            "bin_size": self.budget.capacity,
            "entries": self.manifest_count,
            "files": self.file_records,
            "payload_bytes": self.payload_bytes,
            "snapshot": self.snapshot["id"] if self.snapshot else None,
        }
