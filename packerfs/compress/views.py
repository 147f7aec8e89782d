"""Random access both ways through a FrameTable.

CompressedView (pack side): ranges of the compressed stream, from the plaintext source, by
recompressing only the frames a range touches. It is a RandomAccess (.size, .read) over which a
cipher's open_stream() or Encryptor runs as over any plaintext.

PlaintextView (unpack side): ranges of the plaintext, from ranges of the compressed stream (the
decrypted stream), by decompressing only the frames needed.

Both keep a small LRU of whole frames (a sequential reader of 128 KiB pieces decodes each frame
once) and are safe to share between threads: frames are (de)compressed outside the lock, on
per-thread contexts (zstandard releases the GIL while it works). Memory: at most `cache_frames`
frames plus one per thread in flight.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from packerfs.compress.table import FrameTable
from packerfs.compress.zstd import CompressorMismatch, _read_exact, check_level, compress_frame, decompress_frame
from packerfs.crypt.base import range_end
from packerfs.errors import FormatError, UsageError

__all__ = ["CompressedView", "PlaintextView"]


class _FrameCache:
    def __init__(self, limit: int, make):
        self._limit = max(1, limit)
        self._make = make
        self._frames: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, i: int) -> bytes:
        with self._lock:
            data = self._frames.get(i)
            if data is not None:
                self._frames.move_to_end(i)
                return data
        data = self._make(i)  # outside the lock: two threads may both make frame i, identically
        with self._lock:
            self._frames[i] = data
            self._frames.move_to_end(i)
            while len(self._frames) > self._limit:
                self._frames.popitem(last=False)
        return data


def _gather(table_frames, offset: int, end: int, start_of, get) -> bytes:
    parts = []
    for i in table_frames:
        data = get(i)
        base = start_of(i)
        lo = max(offset, base) - base
        hi = min(end, base + len(data)) - base
        parts.append(data if lo == 0 and hi == len(data) else data[lo:hi])
    return parts[0] if len(parts) == 1 else b"".join(parts)


class CompressedView:
    """The compressed stream of a file, regenerated from its plaintext.

    `read(offset, n)` reads the plaintext source (exactly n octets, or raises SourceChanged);
    `size` is the plaintext size, `table` what compress_file() returned for it, `level` the
    level recorded in the state (refused at once if the table records another). A regenerated
    frame whose length differs from the table's raises CompressorMismatch: the compressor (or
    the file) changed, and the bytes are not served. Equal lengths with different bytes are
    left to the block CIDs."""

    def __init__(self, read, size: int, table: FrameTable, level: int, *, cache_frames: int = 4, name: str = "file"):
        if table.level != check_level(level):
            raise CompressorMismatch(f"{name}: the frame table was made at zstd level {table.level}, not {level}")
        if table.plaintext_size != size:
            raise UsageError(f"{name}: the frame table is for {table.plaintext_size} octets, the file has {size}")
        self._read = read
        self._table = table
        self._name = name
        self._cache = _FrameCache(cache_frames, self._frame)

    @property
    def size(self) -> int:
        return self._table.compressed_size

    @property
    def table(self) -> FrameTable:
        return self._table

    def _frame(self, i: int) -> bytes:
        f = self._table.frame(i)
        data = compress_frame(_read_exact(self._read, f.plain_offset, f.plain_length), self._table.level, self._table.frame_size)
        if len(data) != f.length:
            raise CompressorMismatch(
                f"{self._name}: frame {i} (plaintext offset {f.plain_offset}) recompresses to {len(data)} octets, "
                f"the frame table records {f.length}: the zstd compressor or the file changed since it was packed"
            )
        return data

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self.size)
        if offset >= end:
            return b""
        t = self._table
        return _gather(t.frames_for_compressed(offset, end - offset), offset, end, lambda i: t.frame(i).offset, self._cache.get)


class PlaintextView:
    """The plaintext of a compressed stream, read through its frame table.

    `read_compressed(offset, n)` reads the compressed stream (exactly n octets); every frame is
    checked before and after decompression (see zstd.decompress_frame), so a damaged or crafted
    stream or table gives FormatError naming the frame, never wrong or unbounded output. Works
    for any zstd version that made the frames (no compressor check needed here)."""

    def __init__(self, read_compressed, table: FrameTable, *, cache_frames: int = 2, name: str = "compressed stream"):
        self._read = read_compressed
        self._table = table
        self._name = name
        self._cache = _FrameCache(cache_frames, self._frame)

    @property
    def size(self) -> int:
        return self._table.plaintext_size

    @property
    def table(self) -> FrameTable:
        return self._table

    def _frame(self, i: int) -> bytes:
        f = self._table.frame(i)
        data = self._read(f.offset, f.length)
        if len(data) != f.length:
            raise FormatError(f"{self._name}: frame {i} is cut short ({len(data)} of {f.length} octets)", offset=f.offset)
        return decompress_frame(data, f.plain_length, self._table.frame_size, f"{self._name}, frame {i} at offset {f.offset}")

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self.size)
        if offset >= end:
            return b""
        t = self._table
        return _gather(t.frames_for_plaintext(offset, end - offset), offset, end, lambda i: i * t.frame_size, self._cache.get)
