"""How a file's bytes are stored before encryption: as they are, as seekable zstd frames
(--compress), padded to a PADMÉ size (--pad-sizes), or both.

A Coding belongs to one file version. The pack side turns the source's plaintext into the
coded stream (source_view: any range, regenerated on read); the unpack side turns the
decrypted coded stream back into the plaintext (plaintext_view for ranges, decode for one
authenticated pass). Every coded stream is a valid zstd file, so `zstd -d` restores it:

    compressed            frames of the FrameTable                       NAME.zst.age
    padded, compressed    those frames, then skippable frames            NAME.zst.age
    padded, not           one stored (raw-block) frame, then skippable   NAME.zst.age
    neither               the plaintext itself (no Coding at all)        NAME.age

What the manifest entry of a file's first part records: `zstd` (the FrameTable's bytes) and/or
`padded` (true). `size` stays the plaintext size, `stream` the stored stream's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from packerfs.compress.table import FrameTable
from packerfs.compress.views import CompressedView, PlaintextView
from packerfs.compress.zstd import CompressorMismatch, compress_frame, decompress_frame
from packerfs.crypt.base import range_end
from packerfs.errors import FormatError, SourceChanged
from packerfs.privacy.padding import BLOCK, STORED_HEADER_SIZE, Padded, Padding, StoredFrame, padded_size

__all__ = ["Coding", "SUFFIX"]

SUFFIX = ".zst"
_BLOCK_HEADER = 3
MAX_TABLE = 64 << 20  # a frame table's bytes: 3 per MiB of plaintext, so this covers 16 TiB files


@dataclass(frozen=True)
class Coding:
    plain_size: int
    table: FrameTable | None = None  # zstd frames (None: stored as it is, or as a stored frame when padded)
    padded: bool = False

    def __post_init__(self):
        if self.table is None and not self.padded:
            raise ValueError("a Coding compresses, pads or both (no coding is None)")
        if self.table is not None and self.table.plaintext_size != self.plain_size:
            raise FormatError(f"frame table is for {self.table.plaintext_size} bytes, the file has {self.plain_size}")

    # ------------------------------------------------------------ sizes and names

    @property
    def inner_size(self) -> int:
        """The zstd stream before padding."""
        if self.table is not None:
            return self.table.compressed_size
        return StoredFrame.size_for(self.plain_size)

    @property
    def size(self) -> int:
        """The coded stream's size: what the cipher encrypts."""
        return padded_size(self.inner_size) if self.padded else self.inner_size

    suffix = SUFFIX

    # ------------------------------------------------------------ records

    def to_record(self) -> dict:
        out: dict = {}
        if self.table is not None:
            out["zstd"] = self.table.to_bytes()
        if self.padded:
            out["padded"] = True
        return out

    @classmethod
    def from_record(cls, record: dict | None, plain_size: int) -> "Coding | None":
        """The Coding a manifest entry or index record describes (None: stored as it is).
        FormatError for a table that is malformed or does not fit the file."""
        if not record:
            return None
        raw, padded = record.get("zstd"), record.get("padded", False)
        if raw is None and not padded:
            return None
        if raw is not None and (not isinstance(raw, bytes) or len(raw) > MAX_TABLE):
            raise FormatError("the frame table is not a byte string of at most 64 MiB")
        if not isinstance(padded, bool):
            raise FormatError("'padded' is not true or false")
        table = FrameTable.from_bytes(raw) if raw is not None else None
        return cls(plain_size, table, padded)

    @staticmethod
    def record_bound(plain_size: int, frame_size: int, compressing: bool, padding: bool) -> int:
        """Bytes the record's fields may add to a manifest entry (CBOR keys, heads and the table)."""
        extra = 0
        if compressing:
            frames = FrameTable.count_for(plain_size, frame_size)
            table = 1 + 3 * 9 + 4 * frames  # format, three uvarints, lengths below 2^28
            extra += 5 + 9 + table  # "zstd" key, a byte-string head
        if padding:
            extra += 7 + 1  # "padded" key, true
        return extra

    # ------------------------------------------------------------ pack side

    def source_view(self, read, level: int, name: str = "file"):
        """RandomAccess of the coded stream, made from the plaintext `read(offset, n)`."""
        if self.table is not None:
            inner = CompressedView(read, self.plain_size, self.table, level, name=name)
        else:
            inner = StoredFrame(read, self.plain_size)
        return Padded(inner) if self.padded else inner

    def encode_from(self, plaintext_from, start: int, name: str = "file") -> Iterator[bytes]:
        """The coded stream from offset `start` to its end, in order, for one sequential read:
        `plaintext_from(offset)` yields the plaintext from `offset` on (the source's stream). Each
        frame is compressed once; one whose length differs from the table raises CompressorMismatch."""
        inner = self.inner_size
        if start < inner:
            if self.table is not None:
                yield from _frames_from(self.table, plaintext_from, start, name)
            else:
                yield from _stored_from(self.plain_size, plaintext_from, start)
        if self.padded:
            pad = Padding(self.size - inner)
            pos = max(start, inner) - inner
            while pos < pad.size:
                piece = pad.read(pos, 1 << 20)
                pos += len(piece)
                yield piece

    # ------------------------------------------------------------ unpack side

    def plaintext_view(self, read_coded, name: str = "compressed stream"):
        """RandomAccess of the plaintext, from the decrypted coded stream `read_coded(offset, n)`."""
        if self.table is not None:
            return PlaintextView(read_coded, self.table, name=name)
        return _StoredPlaintext(read_coded, self.plain_size, name)

    def decode(self, pieces: Iterator[bytes], name: str = "compressed stream") -> Iterator[bytes]:
        """The plaintext from the coded stream given in order (an authenticated pass); the padding
        after the zstd stream is skipped."""
        if self.table is not None:
            yield from _decode_frames(pieces, self.table, name)
        else:
            yield from _decode_stored(pieces, self.plain_size, name)


def _regroup(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The bytes of `pieces` again, cut into pieces of exactly `size` (the last one shorter)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def _frames_from(table: FrameTable, plaintext_from, start: int, name: str) -> Iterator[bytes]:
    first = table.frame_at_compressed(start)
    skip = start - table.frame(first).offset
    frames = _regroup(plaintext_from(first * table.frame_size), table.frame_size)
    for i in range(first, table.frame_count):
        f = table.frame(i)
        plain = next(frames, b"") if f.plain_length else b""
        if len(plain) != f.plain_length:
            raise SourceChanged(f"{name}: the file is shorter than scanned (frame {i} has {len(plain)} bytes)")
        data = compress_frame(plain, table.level, table.frame_size)
        if len(data) != f.length:
            raise CompressorMismatch(
                f"{name}: frame {i} (plaintext offset {f.plain_offset}) compresses to {len(data)} bytes, the frame "
                f"table records {f.length}: the zstd compressor or the file changed since it was measured"
            )
        yield data[skip:] if skip else data
        skip = 0


def _stored_from(plain_size: int, plaintext_from, start: int) -> Iterator[bytes]:
    step = BLOCK + _BLOCK_HEADER
    header = StoredFrame(lambda o, n: b"", plain_size).read(0, STORED_HEADER_SIZE)
    if start < STORED_HEADER_SIZE:
        yield header[start:]
        start = STORED_HEADER_SIZE
    block = (start - STORED_HEADER_SIZE) // step
    skip = start - STORED_HEADER_SIZE - block * step
    blocks = max(1, -(-plain_size // BLOCK))
    pieces = _regroup(plaintext_from(block * BLOCK), BLOCK)
    for i in range(block, blocks):
        n = min(BLOCK, plain_size - i * BLOCK)
        data = next(pieces, b"") if n else b""
        if len(data) != n:
            raise SourceChanged(f"the file is shorter than scanned (block {i} has {len(data)} bytes)")
        out = ((n << 3) | (1 if i == blocks - 1 else 0)).to_bytes(3, "little") + data
        yield out[skip:] if skip else out
        skip = 0


def _take(pieces: Iterator[bytes], buffer: bytearray, n: int, name: str) -> bytes:
    while len(buffer) < n:
        piece = next(pieces, None)
        if piece is None:
            raise FormatError(f"{name}: ends {n - len(buffer)} bytes early")
        buffer += piece
    out = bytes(buffer[:n])
    del buffer[:n]
    return out


def _decode_frames(pieces, table: FrameTable, name: str) -> Iterator[bytes]:
    buffer = bytearray()
    for f in table:
        data = _take(pieces, buffer, f.length, name)
        yield decompress_frame(data, f.plain_length, table.frame_size, f"{name}, frame {f.index} at offset {f.offset}")
    for _ in pieces:  # the padding: read to the end, so the stream is authenticated whole
        pass


def _decode_stored(pieces, plain_size: int, name: str) -> Iterator[bytes]:
    buffer = bytearray()
    header = _take(pieces, buffer, STORED_HEADER_SIZE, name)
    if int.from_bytes(header[6:14], "little") != plain_size:
        raise FormatError(f"{name}: the stored frame holds {int.from_bytes(header[6:14], 'little')} bytes, not {plain_size}")
    left = plain_size
    while True:
        block = min(BLOCK, left)
        head = int.from_bytes(_take(pieces, buffer, _BLOCK_HEADER, name), "little")
        if head >> 3 != block or head & 6:
            raise FormatError(f"{name}: a stored block's header does not match the file's size")
        yield _take(pieces, buffer, block, name)
        left -= block
        if left == 0:
            break
    for _ in pieces:
        pass


class _StoredPlaintext:
    """The plaintext inside one stored frame, located arithmetically (the inverse of StoredFrame)."""

    def __init__(self, read_coded, plain_size: int, name: str):
        self._read = read_coded
        self.size = plain_size
        self._name = name

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self.size)
        out = []
        pos = offset
        while pos < end:
            take = min(end, (pos // BLOCK + 1) * BLOCK) - pos
            data = self._read(StoredFrame.stream_offset(pos), take)
            if len(data) != take:
                raise FormatError(f"{self._name}: cut short at plaintext offset {pos}")
            out.append(data)
            pos += take
        return b"".join(out)
