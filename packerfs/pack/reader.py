"""BinReader: any byte range of any sealed bin's CAR, regenerated from the
index and the source files.

Every block is hashed and matched to the CID recorded at scan time before any
of its bytes are returned (invariant 2). A source file that changed since the
scan therefore fails here, with SourceChanged naming the file, and never
yields wrong bytes — which is also what makes deterministic re-encryption
safe: a keystream is never served over plaintext other than the one it was
first used for.

The FUSE pack view and the batch `pack` writer both read through this class,
so a copied CAR is byte-identical to a written one.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from typing import Iterator

from packerfs.cache import LRU
from packerfs.compress.coding import Coding
from packerfs.compress.zstd import CompressorMismatch, check_compressor
from packerfs.crypt.base import Cipher, RandomAccess
from packerfs.errors import PackerfsError, SourceChanged
from packerfs.index.store import DIGEST, Index
from packerfs.ipld import car
from packerfs.ipld.cid import RAW, block_matches, cid_from_digest, decode_uvarint, read_cid
from packerfs.ipld.unixfs import CHUNK_SIZE, Node, file_node
from packerfs.plan import costs
from packerfs.source.base import Source, SourceFile

FULL_LEAF_SECTION = costs.section_length(CHUNK_SIZE)


class BinReader:
    def __init__(
        self, index: Index, source: Source, cipher: Cipher, secret: bytes, *, cache_leaves: int = 16, open_files: int = 32
    ):
        self.index = index
        self.source = source
        self.cipher = cipher
        self.secret = secret
        self.leaves = LRU(cache_leaves)  # (version, leaf) -> verified leaf section
        self.nodes = LRU(64)  # (bin, start) -> verified section bytes
        self.files = LRU(open_files, on_evict=lambda opened: opened.evict())  # version -> _OpenStream
        self.files_lock = threading.Lock()
        self.records = LRU(1024)
        self.sealed = LRU(4)  # bin -> (head, regenerated stream) of its sealed manifest
        self.compressor_ok = False

    # ---------------------------------------------------------------- API

    def size(self, number: int) -> int:
        result = self.index.bin(number)
        if result is None:
            raise PackerfsError(f"bin {number} is not sealed")
        return result["car_size"]

    def read(self, number: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of bin `number`'s CAR, clipped to its end."""
        end = min(offset + size, self.size(number))
        out = bytearray()
        while offset < end:
            start, seg_end, record = self.index.segment_at(number, offset)
            data = self._segment_bytes(number, start, seg_end, record, offset, min(end, seg_end))
            out += data
            offset += len(data)
        return bytes(out)

    def iter_bin(self, number: int) -> Iterator[bytes]:
        """The whole CAR in order, in pieces; what `pack` writes."""
        for start, end, record in self.index.segments_of(number):
            position = start
            while position < end:
                piece_end = min(end, position + 4 * CHUNK_SIZE)
                data = self._segment_bytes(number, start, end, record, position, piece_end)
                yield data
                position += len(data)

    # ---------------------------------------------------------------- segments

    def _segment_bytes(self, number: int, start: int, end: int, record: list, lo: int, hi: int) -> bytes:
        kind = record[0]
        if kind == "R":
            return record[1][lo - start : hi - start]
        if kind in ("S", "Z"):
            section = self._verified_section(number, start, record[1], compressed=kind == "Z")
            return section[lo - start : hi - start]
        if kind == "N":
            section = self._file_node_section(number, start, *record[1:])
            return section[lo - start : hi - start]
        if kind == "L":
            return self._leaf_run_bytes(start, record[1], record[2], record[3], lo, hi)
        if kind == "M":
            section = self._sealed_leaf_section(number, start, record[1], record[3])
            return section[lo - start : hi - start]
        raise PackerfsError(f"bin {number}: unknown segment kind {kind!r} at offset {start}")

    def _verified_section(self, number: int, start: int, stored: bytes, compressed: bool) -> bytes:
        cached = self.nodes.get((number, start))
        if cached is not None:
            return cached
        section = zlib.decompress(stored) if compressed else stored
        _, pos = decode_uvarint(section)
        cid, data_pos = read_cid(section, pos)
        if not block_matches(cid, memoryview(section)[data_pos:]):
            raise PackerfsError(f"index is damaged: stored block at offset {start} of bin {number} fails its CID")
        self.nodes.put((number, start), section)
        return section

    def _file_node_section(self, number: int, start: int, version: int, first: int, count: int, cid: bytes) -> bytes:
        cached = self.nodes.get((number, start))
        if cached is not None:
            return cached
        record = self._record(version)
        digests = self.index.digests_of(version, first, count)
        children = []
        for i in range(count):
            length = self._leaf_length(record, first + i)
            children.append(Node(cid_from_digest(RAW, digests[i * DIGEST : (i + 1) * DIGEST]), length, length))
        block = file_node(children)
        if not block_matches(cid, block):
            raise PackerfsError(f"index is damaged: file node at offset {start} of bin {number} fails its CID")
        section = car.section_prefix(cid, len(block)) + block
        self.nodes.put((number, start), section)
        return section

    def _leaf_run_bytes(self, start: int, version: int, first: int, count: int, lo: int, hi: int) -> bytes:
        """Leaf sections are all FULL_LEAF_SECTION long but the stream's last, so offsets are arithmetic."""
        out = bytearray()
        record = self._record(version)
        position = lo
        while position < hi:
            k, within = divmod(position - start, FULL_LEAF_SECTION)
            section = self._leaf_section(record, version, first + k)
            piece = section[within : within + hi - position]
            out += piece
            position += len(piece)
        return bytes(out)

    # ---------------------------------------------------------------- sealed manifests

    def _sealed_leaf_section(self, number: int, start: int, leaf: int, head) -> bytes:
        """A sealed manifest's leaf section: its plaintext encrypted again, checked against its digest."""
        key = ("sealed", number, leaf)
        section = self.leaves.get(key)
        if section is not None:
            return section
        head, stream = self._sealed_stream(number, head)
        offset = leaf * CHUNK_SIZE
        data = stream.read(offset, min(CHUNK_SIZE, stream.size - offset))
        digest = bytes(head["digests"][leaf * DIGEST : (leaf + 1) * DIGEST])
        if hashlib.sha256(data).digest() != digest:
            raise PackerfsError(
                f"index is damaged: the sealed manifest's leaf {leaf} at offset {start} of bin {number} "
                f"fails its digest"
            )
        section = car.section_prefix(cid_from_digest(RAW, digest), len(data)) + data
        self.leaves.put(key, section)
        return section

    def _sealed_stream(self, number: int, head) -> tuple[dict, RandomAccess]:
        """(head, regenerated stream) of bin `number`'s sealed manifest, once per bin while cached.
        `head`: leaf 0's head, or (later leaves) leaf 0's section offset, whose record holds it."""
        cached = self.sealed.get(number)
        if cached is None:
            if not isinstance(head, dict):
                head = self.index.segment_at(number, head)[2][3]
            leaves = head["leaves"]

            def read_plain(offset: int, size: int) -> bytes:
                out = bytearray()
                end = min(offset + size, head["plain"])
                while offset < end:
                    j, within = divmod(offset, CHUNK_SIZE)
                    chunk = self._sealed_plaintext(number, leaves[j])
                    piece = chunk[within : within + end - offset]
                    if not piece:
                        raise PackerfsError(f"index is damaged: bin {number}'s sealed manifest ends early")
                    out += piece
                    offset += len(piece)
                return bytes(out)

            cached = head, self.cipher.open_stream(head["params"], head["plain"], read_plain, self.secret)
            self.sealed.put(number, cached)
        return cached

    def _sealed_plaintext(self, number: int, section_start: int) -> bytes:
        key = (number, "plain", section_start)
        chunk = self.nodes.get(key)
        if chunk is None:
            try:
                chunk = zlib.decompress(self.index.segment_at(number, section_start)[2][2])
            except (zlib.error, IndexError, TypeError):
                raise PackerfsError(
                    f"index is damaged: bin {number}'s sealed manifest at offset {section_start}"
                ) from None
            self.nodes.put(key, chunk)
        return chunk

    # ---------------------------------------------------------------- leaves

    def _record(self, version: int) -> dict:
        record = self.records.get(version)
        if record is None:
            record = self.index.file(version)
            # A file still being split across bins gains parts (and, for OpenPGP, params) at each seal.
            if record.get("complete"):
                self.records.put(version, record)
        return record

    @staticmethod
    def _leaf_length(record: dict, leaf_index: int) -> int:
        return min(CHUNK_SIZE, record["stream_size"] - leaf_index * CHUNK_SIZE)

    def _read_stream(self, version: int, record: dict, offset: int, size: int) -> bytes:
        """Stream bytes of a file version; the source file stays open across reads (LRU)."""
        with self.files_lock:
            opened = self.files.get(version)
            if opened is None or not record.get("complete"):
                source = self.source.open(record["path"], record["fp"])
                read, plain_size = source.read, record["size"]
                coding = Coding.from_record(record.get("coding"), plain_size)
                if coding is not None:  # the cipher's plaintext is the coded stream, made from the file's
                    self._check_compressor(coding)
                    level = coding.table.level if coding.table else 0
                    view = coding.source_view(read, level, self.source.display(record["path"]))
                    read, plain_size = view.read, coding.size
                stream = self.cipher.open_stream(record["params"], plain_size, read, self.secret)
                opened = _OpenStream(source, stream)
                self.files.put(version, opened)
            opened.users += 1
        try:
            return opened.stream.read(offset, size)
        except SourceChanged as exc:
            if exc.path is not None:
                raise
            path = self.source.display(record["path"])
            raise SourceChanged(f"{path}: {exc}", path=path) from None
        finally:
            with self.files_lock:
                opened.users -= 1
                if opened.evicted and not opened.users:
                    opened.source.close()

    def _check_compressor(self, coding) -> None:
        """Compressed streams are regenerated only by the compressor the state recorded (once per reader)."""
        if coding.table is None or self.compressor_ok:
            return
        recorded = self.index.get_meta(b"compressor")
        if recorded is None:
            raise CompressorMismatch("the state records no compressor for its compressed files")
        check_compressor(recorded)
        self.compressor_ok = True

    def _leaf_section(self, record: dict, version: int, leaf_index: int) -> bytes:
        """A leaf's whole CAR section, its bytes verified against the digest recorded at scan time."""
        key = (version, leaf_index)
        section = self.leaves.get(key)
        if section is not None:
            return section
        length = self._leaf_length(record, leaf_index)
        digest = self.index.digests_of(version, leaf_index, 1)
        data = self._read_stream(version, record, leaf_index * CHUNK_SIZE, length)
        if len(data) != length or hashlib.sha256(data).digest() != digest:
            raise SourceChanged(
                self._changed_message(record, leaf_index), path=self.source.display(record["path"])
            )
        section = car.section_prefix(cid_from_digest(RAW, digest), length) + data
        self.leaves.put(key, section)
        return section

    def _changed_message(self, record: dict, leaf_index: int) -> str:
        how = self.source.describe_change(record["path"], record["fp"])
        return (
            f"{self.source.display(record['path'])}: source changed since the scan ({how}); refusing to serve "
            f"stream bytes at offset {leaf_index * CHUNK_SIZE}"
        )


class _OpenStream:
    """A source file and its stream; closed when evicted from the cache and no read is using it."""

    def __init__(self, source: SourceFile, stream: RandomAccess):
        self.source = source
        self.stream = stream
        self.users = 0
        self.evicted = False

    def evict(self) -> None:
        # called by the LRU under BinReader.files_lock's protection of `users`
        self.evicted = True
        if not self.users:
            self.source.close()
