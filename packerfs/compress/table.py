"""FrameTable: where each independent zstd frame of a compressed stream lies.

A compressed stream is the concatenation of frames; frame i holds plaintext octets
[i*F, min((i+1)*F, P)) for the frame size F and plaintext size P, so the plaintext side is
arithmetic and only each frame's compressed length is stored. A file of P octets has
max(1, ceil(P/F)) frames (an empty file is one empty frame, so that `zstd -d` accepts it).

Serialized (FrameTable.to_bytes), stored per file version:

    0x01 (format) ‖ uvarint(level) ‖ uvarint(F) ‖ uvarint(P) ‖ uvarint(compressed length) per frame

That is about 10 octets plus 3 per frame (a frame of at most 2 MiB compresses to < 2^21
octets, a 3-octet uvarint; 2 octets when it shrinks below 16 KiB): 3 octets per MiB of
plaintext with 1 MiB frames. from_bytes() validates everything a hostile CAR could set: the
frame count must match P and F, F is at most MAX_FRAME_SIZE, and every compressed length lies
between the shortest possible frame and zstd's compress bound for its plaintext, so that the
table bounds every read and every allocation made from it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from dataclasses import dataclass

from packerfs.compress.frames import MIN_FRAME_LENGTH, compress_bound, frame_length, parse_header
from packerfs.errors import FormatError
from packerfs.ipld.cid import decode_uvarint, encode_uvarint

__all__ = ["Frame", "FrameTable", "MAX_FRAME_SIZE", "TABLE_FORMAT"]

TABLE_FORMAT = 1
MAX_FRAME_SIZE = 16 << 20  # bounds one frame's plaintext: what one decompression may allocate
MAX_LEVEL = 22


@dataclass(frozen=True)
class Frame:
    index: int
    plain_offset: int
    plain_length: int
    offset: int  # in the compressed stream
    length: int  # compressed


class FrameTable:
    """Frames of one compressed stream. Immutable; cheap lookups both ways."""

    __slots__ = ("level", "frame_size", "plaintext_size", "_ends")

    def __init__(self, level: int, frame_size: int, plaintext_size: int, lengths):
        if not 0 <= level <= MAX_LEVEL:  # 0: unknown (a table rebuilt from the stream, read-only)
            raise FormatError(f"frame table: compression level {level} is outside 0..{MAX_LEVEL}")
        if not 0 < frame_size <= MAX_FRAME_SIZE:
            raise FormatError(f"frame table: frame size {frame_size} is outside 1..{MAX_FRAME_SIZE}")
        if not 0 <= plaintext_size < 1 << 63:
            raise FormatError(f"frame table: plaintext size {plaintext_size} is out of range")
        self.level = level
        self.frame_size = frame_size
        self.plaintext_size = plaintext_size
        count = self.count_for(plaintext_size, frame_size)
        ends = array("Q", [0])
        total = 0
        for i, n in enumerate(lengths):
            if i >= count:
                raise FormatError(f"frame table: more than the {count} frames of {plaintext_size} octets in {frame_size}-octet frames")
            plain = min(frame_size, plaintext_size - i * frame_size)
            if not MIN_FRAME_LENGTH <= n <= compress_bound(plain):
                raise FormatError(
                    f"frame table: frame {i} claims {n} compressed octets for {plain} plaintext octets "
                    f"(possible: {MIN_FRAME_LENGTH}..{compress_bound(plain)})"
                )
            total += n
            ends.append(total)
        if len(ends) - 1 != count:
            raise FormatError(f"frame table: {len(ends) - 1} frames listed, {count} expected for {plaintext_size} octets")
        self._ends = ends

    @staticmethod
    def count_for(plaintext_size: int, frame_size: int) -> int:
        return max(1, -(-plaintext_size // frame_size))

    # -- sizes and lookups -------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return len(self._ends) - 1

    @property
    def compressed_size(self) -> int:
        return self._ends[-1]

    def __len__(self) -> int:
        return self.frame_count

    def frame(self, i: int) -> Frame:
        if not 0 <= i < self.frame_count:
            raise IndexError(f"frame {i} of {self.frame_count}")
        p = i * self.frame_size
        return Frame(i, p, min(self.frame_size, self.plaintext_size - p), self._ends[i], self._ends[i + 1] - self._ends[i])

    def __iter__(self):
        return (self.frame(i) for i in range(self.frame_count))

    def lengths(self) -> list[int]:
        e = self._ends
        return [e[i + 1] - e[i] for i in range(len(e) - 1)]

    def frame_at_compressed(self, offset: int) -> int:
        """The frame holding compressed octet `offset` (0 <= offset < compressed_size)."""
        if not 0 <= offset < self.compressed_size:
            raise IndexError(f"compressed offset {offset} is outside 0..{self.compressed_size}")
        return bisect_right(self._ends, offset) - 1

    def frame_at_plaintext(self, offset: int) -> int:
        """The frame holding plaintext octet `offset` (0 <= offset < plaintext_size)."""
        if not 0 <= offset < self.plaintext_size:
            raise IndexError(f"plaintext offset {offset} is outside 0..{self.plaintext_size}")
        return offset // self.frame_size

    def frames_for_compressed(self, offset: int, size: int) -> range:
        """Frames covering compressed [offset, offset+size), clipped to the stream."""
        end = min(offset + size, self.compressed_size)
        if offset >= end:
            return range(0)
        return range(self.frame_at_compressed(offset), self.frame_at_compressed(end - 1) + 1)

    def frames_for_plaintext(self, offset: int, size: int) -> range:
        end = min(offset + size, self.plaintext_size)
        if offset >= end:
            return range(0)
        return range(offset // self.frame_size, (end - 1) // self.frame_size + 1)

    @classmethod
    def scan(cls, read, compressed_size: int, level: int = 0, name: str = "compressed stream") -> "FrameTable":
        """Rebuild the table of a stream of independent frames by walking it (reads all of it,
        one frame at a time; for a stream whose table is lost). The level is not in the stream:
        0 (unknown) makes a table for reading only."""
        lengths, sizes = [], []
        pos = 0
        while pos < compressed_size:
            where = f"{name}, frame {len(lengths)} at offset {pos}"
            header = parse_header(read(pos, min(18, compressed_size - pos)), where)
            fcs = header.content_size
            if fcs is None or fcs > MAX_FRAME_SIZE:
                raise FormatError(f"{where}: content size {fcs} is missing or above {MAX_FRAME_SIZE}")
            if sizes and sizes[-1] != sizes[0]:
                raise FormatError(f"{where}: follows a short frame of {sizes[-1]} octets")
            if sizes and fcs > sizes[0]:
                raise FormatError(f"{where}: {fcs} octets, more than the first frame's {sizes[0]}")
            n = frame_length(read(pos, min(compress_bound(fcs), compressed_size - pos)), header, where)
            lengths.append(n)
            sizes.append(fcs)
            pos += n
        if not lengths:
            raise FormatError(f"{name}: empty (a compressed stream has at least one frame)")
        frame_size = sizes[0] if len(sizes) > 1 else min(MAX_FRAME_SIZE, max(sizes[0], 1 << 16))
        return cls(level, frame_size, sum(sizes), lengths)

    # -- serialization -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        out = bytearray((TABLE_FORMAT,))
        out += encode_uvarint(self.level)
        out += encode_uvarint(self.frame_size)
        out += encode_uvarint(self.plaintext_size)
        for n in self.lengths():
            out += encode_uvarint(n)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "FrameTable":
        data = memoryview(data)
        if not data or data[0] != TABLE_FORMAT:
            raise FormatError(f"frame table: unknown format {data[0] if data else 'empty'}")
        try:
            level, pos = decode_uvarint(data, 1)
            frame_size, pos = decode_uvarint(data, pos)
            plaintext_size, pos = decode_uvarint(data, pos)
            if not 0 < frame_size <= MAX_FRAME_SIZE:
                raise FormatError(f"frame table: frame size {frame_size} is outside 1..{MAX_FRAME_SIZE}")
            count = cls.count_for(plaintext_size, frame_size)
            if count > len(data) - pos:  # every length takes at least one octet: refuse before allocating
                raise FormatError(f"frame table: {len(data) - pos} octets cannot list {count} frames")
            lengths = []
            for _ in range(count):
                n, pos = decode_uvarint(data, pos)
                lengths.append(n)
        except ValueError as exc:
            raise FormatError(f"frame table: {exc}") from None
        if pos != len(data):
            raise FormatError(f"frame table: {len(data) - pos} trailing octets")
        return cls(level, frame_size, plaintext_size, lengths)

    def __eq__(self, other) -> bool:
        return isinstance(other, FrameTable) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return (
            f"FrameTable(level={self.level}, frame_size={self.frame_size}, plaintext_size={self.plaintext_size}, "
            f"frames={self.frame_count}, compressed_size={self.compressed_size})"
        )
