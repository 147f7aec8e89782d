"""zstd through the `zstandard` package: pinned parameters, one-pass framing, the sample
decision and the compressor identity that regeneration depends on.

Why `zstandard` (measured in tools/bench_compress.py; see the comment in pyproject.toml): its
wheels carry their own libzstd, so the compressor's bytes are a function of one pinned package
version, on every Python. pyzstd >= 0.20 delegates to `compression.zstd`, which from Python
3.14 on is the interpreter's, linked against whatever libzstd the system has.

Every frame is compressed alone, one-shot, from its whole plaintext, with these parameters
set explicitly (so that a change of the library's defaults cannot change the output unseen):

- the seven compression parameters of libzstd 1.5.7's table for the level (_CPARAMS below,
  the row for large inputs), with window_log lowered to cover one frame (it cannot reach into
  another frame anyway);
- content size in the header (the decoder's allocation is checked against it first), no
  dictionary and no dictionary ID, no long-distance matching, no worker threads (output of the
  single-threaded compressor; threads would change the bytes);
- the content checksum ON: 4 octets a frame (0.0004% of a 1 MiB frame) so that stock
  `zstd -d` verifies the plaintext it writes, independently of the CAR's block CIDs.

What the library still decides on its own (internal heuristics that are resolved from these
parameters: match finder variant, block splitting, literal compression) is covered by
recording the library and libzstd versions and a probe digest (compressor_id) and refusing
any other (check_compressor); the per-frame length check in CompressedView and the block
CIDs catch whatever that misses, as EIO, never as wrong bytes.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache

import zstandard

from packerfs.compress.frames import parse_header, frame_length
from packerfs.compress.table import MAX_FRAME_SIZE, MAX_LEVEL, FrameTable
from packerfs.errors import FormatError, PackerfsError, SourceChanged, UsageError

__all__ = [
    "LIBRARY",
    "DEFAULT_LEVEL",
    "DEFAULT_FRAME_SIZE",
    "MIN_SAVING",
    "CompressorMismatch",
    "parse_compress_option",
    "compress_file",
    "compress_frame",
    "decompress_frame",
    "should_compress",
    "compressor_id",
    "check_compressor",
]

LIBRARY = "zstandard"
DEFAULT_LEVEL = 3
DEFAULT_FRAME_SIZE = 1 << 20  # plaintext per frame; see README/bench: ratio vs random-read cost
MIN_SAVING = 0.03  # data that does not shrink by at least 3% is stored uncompressed
SAMPLE_SIZE = 64 << 10
SAMPLE_COUNT = 8
CHECKSUM = True

# libzstd 1.5.7 ZSTD_defaultCParameters[0] (inputs > 256 KiB), levels 1..22:
# (window_log, chain_log, hash_log, search_log, min_match, target_length, strategy)
_CPARAMS = {
    1: (19, 13, 14, 1, 7, 0, 1),
    2: (20, 15, 16, 1, 6, 0, 1),
    3: (21, 16, 17, 1, 5, 0, 2),
    4: (21, 18, 18, 1, 5, 0, 2),
    5: (21, 18, 19, 3, 5, 2, 3),
    6: (21, 18, 19, 3, 5, 4, 4),
    7: (21, 19, 20, 4, 5, 8, 4),
    8: (21, 19, 20, 4, 5, 16, 5),
    9: (22, 20, 21, 4, 5, 16, 5),
    10: (22, 21, 22, 5, 5, 16, 5),
    11: (22, 21, 22, 6, 5, 16, 5),
    12: (22, 22, 23, 6, 5, 32, 5),
    13: (22, 22, 22, 4, 5, 32, 6),
    14: (22, 22, 23, 5, 5, 32, 6),
    15: (22, 23, 23, 6, 5, 32, 6),
    16: (22, 22, 22, 5, 5, 48, 7),
    17: (23, 23, 22, 5, 4, 64, 7),
    18: (23, 23, 22, 6, 3, 64, 8),
    19: (23, 24, 22, 7, 3, 256, 9),
    20: (25, 25, 23, 7, 3, 256, 9),
    21: (26, 26, 24, 7, 3, 512, 9),
    22: (27, 27, 25, 9, 3, 999, 9),
}
assert set(_CPARAMS) == set(range(1, MAX_LEVEL + 1))


class CompressorMismatch(PackerfsError):
    """Recompressing does not give the recorded bytes: another zstd library/version or level.

    The caller turns it into EIO with a log line (never serving the bytes)."""


def check_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= MAX_LEVEL:
        raise UsageError(f"zstd level {level!r} is not an integer in 1..{MAX_LEVEL}")
    return level


def check_frame_size(frame_size: int) -> int:
    if isinstance(frame_size, bool) or not isinstance(frame_size, int) or not (64 << 10) <= frame_size <= MAX_FRAME_SIZE:
        raise UsageError(f"zstd frame size {frame_size!r} is outside 64 KiB..{MAX_FRAME_SIZE >> 20} MiB")
    return frame_size


def parse_compress_option(text: str) -> int:
    """`zstd` or `zstd:LEVEL` (the --compress value) -> level."""
    name, sep, level = text.partition(":")
    if name != "zstd":
        raise UsageError(f"--compress {text!r}: the only compressor is zstd (zstd or zstd:LEVEL)")
    if not sep:
        return DEFAULT_LEVEL
    try:
        return check_level(int(level, 10))
    except ValueError:
        raise UsageError(f"--compress {text!r}: LEVEL must be an integer in 1..{MAX_LEVEL}") from None


def window_log_for(frame_size: int) -> int:
    return max(10, (frame_size - 1).bit_length())


def _pinned(level: int, frame_size: int) -> tuple[int, ...]:
    w, c, h, s, m, t, st = _CPARAMS[check_level(level)]
    return (min(w, window_log_for(frame_size)), c, h, s, m, t, st)


def compression_params(level: int, frame_size: int) -> zstandard.ZstdCompressionParameters:
    w, c, h, s, m, t, st = _pinned(level, frame_size)
    return zstandard.ZstdCompressionParameters(
        format=zstandard.FORMAT_ZSTD1,
        compression_level=level,
        window_log=w,
        chain_log=c,
        hash_log=h,
        search_log=s,
        min_match=m,
        target_length=t,
        strategy=st,
        write_content_size=True,
        write_checksum=CHECKSUM,
        write_dict_id=False,
        threads=0,
        force_max_window=0,
        enable_ldm=False,
    )


_local = threading.local()


def _compressor(level: int, frame_size: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and parameter set (a ZstdCompressor is not thread-safe)."""
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get((level, frame_size))
    if cctx is None:
        if len(cache) > 8:
            cache.clear()
        cctx = cache[(level, frame_size)] = zstandard.ZstdCompressor(compression_params=compression_params(level, frame_size))
    return cctx


def compress_frame(data: bytes, level: int, frame_size: int) -> bytes:
    """One independent frame of `data` (at most frame_size octets)."""
    if len(data) > frame_size:
        raise ValueError(f"{len(data)} octets do not fit a {frame_size}-octet frame")
    return _compressor(level, frame_size).compress(data)


def _decompressor(max_window: int) -> zstandard.ZstdDecompressor:
    cache = getattr(_local, "dctx", None)
    if cache is None:
        cache = _local.dctx = {}
    dctx = cache.get(max_window)
    if dctx is None:
        if len(cache) > 8:
            cache.clear()
        dctx = cache[max_window] = zstandard.ZstdDecompressor(max_window_size=max_window)
    return dctx


def decompress_frame(data: bytes, plain_length: int, frame_size: int, where: str = "zstd frame") -> bytes:
    """The plaintext of exactly one frame, which must decompress to `plain_length` octets.

    The header is checked before the library sees the frame: content size present and equal to
    `plain_length` (<= frame_size <= MAX_FRAME_SIZE, 16 MiB: the only allocation), no dictionary, a window no
    larger than one frame's, and the block walk ending exactly at the end of `data`. The
    library then checks the blocks and the content checksum. Any failure is FormatError.
    Independent of which zstd version compressed the frame."""
    header = parse_header(data, where)
    if header.content_size is None:
        raise FormatError(f"{where}: the frame header records no content size")
    if header.content_size != plain_length:
        raise FormatError(f"{where}: the frame header claims {header.content_size} octets, the table {plain_length}")
    if header.dictionary_id:
        raise FormatError(f"{where}: the frame needs dictionary {header.dictionary_id}")
    max_window = 1 << window_log_for(frame_size)
    if header.window_size > max_window:
        raise FormatError(f"{where}: window of {header.window_size} octets exceeds {max_window}")
    length = frame_length(data, header, where)
    if length != len(data):
        raise FormatError(f"{where}: the frame is {length} octets, the table says {len(data)}")
    try:
        out = _decompressor(max_window).decompress(data)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where}: {exc}") from None
    if len(out) != plain_length:
        raise FormatError(f"{where}: decompressed to {len(out)} octets, expected {plain_length}")
    return out


def _read_exact(read, offset: int, size: int) -> bytes:
    data = read(offset, size)
    if len(data) != size:
        raise SourceChanged(f"the file is shorter than scanned ({len(data)} of {size} octets at offset {offset})")
    return data


def compress_file(read, size: int, level: int = DEFAULT_LEVEL, frame_size: int = DEFAULT_FRAME_SIZE, sink=None) -> FrameTable:
    """One pass over a file's plaintext -> its FrameTable.

    `read(offset, n)` returns exactly n plaintext octets; `size` is the plaintext size. Memory
    is one frame at a time. `sink(frame_bytes)`, when given, receives each compressed frame in
    order: their concatenation is the compressed stream (`NAME.zst`), a valid multi-frame zstd
    file. The same bytes are what CompressedView regenerates."""
    check_level(level)
    check_frame_size(frame_size)
    lengths = []
    for i in range(FrameTable.count_for(size, frame_size)):
        off = i * frame_size
        frame = compress_frame(_read_exact(read, off, min(frame_size, size - off)), level, frame_size)
        lengths.append(len(frame))
        if sink is not None:
            sink(frame)
    return FrameTable(level, frame_size, size, lengths)


def sample_offsets(size: int) -> list[tuple[int, int]]:
    """Where should_compress samples: the whole file up to SAMPLE_COUNT*SAMPLE_SIZE octets, else
    SAMPLE_COUNT pieces of SAMPLE_SIZE spread evenly from the first octet to the last."""
    if size <= SAMPLE_COUNT * SAMPLE_SIZE:
        return [(0, size)] if size else []
    span = size - SAMPLE_SIZE
    return [(span * i // (SAMPLE_COUNT - 1), SAMPLE_SIZE) for i in range(SAMPLE_COUNT)]


def should_compress(read, size: int, level: int = DEFAULT_LEVEL, frame_size: int = DEFAULT_FRAME_SIZE) -> bool:
    """Is the file worth a .zst? A pure function of its bytes, the level and the compressor.

    Each sample (sample_offsets) is compressed alone, as one frame with the pack's parameters;
    the file is compressed only if the samples shrink by at least MIN_SAVING (3%) in total,
    frame headers and checksums included. A file of at most 512 KiB is its own sample, so for it
    the decision is exact. Otherwise the file is stored as it is: no .zst suffix and no frame
    table, so already-compressed media costs nothing extra. Reads at most 512 KiB."""
    check_level(level)
    plain = packed = 0
    for off, n in sample_offsets(size):
        if n > frame_size:  # a small frame size: sample it frame by frame, as compress_file would
            chunks = [(o, min(frame_size, off + n - o)) for o in range(off, off + n, frame_size)]
        else:
            chunks = [(off, n)]
        for o, m in chunks:
            plain += m
            packed += len(compress_frame(_read_exact(read, o, m), level, frame_size))
    return plain > 0 and packed * 100 <= plain * round(100 * (1 - MIN_SAVING))


# -- identity of the compressor -------------------------------------------------------------


def _probe_sample() -> bytes:
    """A fixed, text-like 64 KiB, the smallest frame (never change it: its digest is recorded in states)."""
    out = bytearray()
    i = 0
    while len(out) < 64 << 10:
        h = hashlib.sha256(i.to_bytes(8, "little")).digest()
        out += b"%d,%s,%d,item-%d\n" % (i, h[: 2 + i % 5].hex().encode(), (i * 7919) % 10007, i % 97)
        i += 1
    return bytes(out[: 64 << 10])


def _libzstd() -> str:
    return ".".join(map(str, zstandard.ZSTD_VERSION))


@lru_cache(maxsize=32)
def _identity(level: int, frame_size: int) -> tuple:
    probe = hashlib.sha256(compress_frame(_probe_sample(), level, frame_size)).hexdigest()[:16]
    params = "w%d c%d h%d s%d m%d t%d st%d" % _pinned(level, frame_size)
    return (
        ("compressor", "zstd"),
        ("library", LIBRARY),
        ("version", zstandard.__version__),
        ("libzstd", _libzstd()),
        ("level", level),
        ("frame_size", frame_size),
        ("params", params + (" crc" if CHECKSUM else "")),
        ("probe", probe),
    )


def compressor_id(level: int = DEFAULT_LEVEL, frame_size: int = DEFAULT_FRAME_SIZE) -> dict:
    """What regeneration depends on, for the state: library, versions, level, frame size, the
    pinned parameters and a digest of a fixed probe compressed with them (about 15 ms at level
    19, cached). Plain str/int values, ready for CBOR or JSON."""
    check_level(level)
    check_frame_size(frame_size)
    return dict(_identity(level, frame_size))


def _describe(cid: dict) -> str:
    return (
        f"{cid.get('library', '?')} {cid.get('version', '?')} (libzstd {cid.get('libzstd', '?')}), "
        f"level {cid.get('level', '?')}, {cid.get('frame_size', '?')}-octet frames"
        + (f", probe {cid.get('probe')}" if cid.get("probe") else "")
    )


def check_compressor(recorded: dict) -> None:
    """Refuse to regenerate compressed streams with any compressor but the recorded one.

    Raises CompressorMismatch, one line naming both, if this machine's compressor (for the
    recorded level and frame size) is not the recorded one in every field."""
    try:
        level, frame_size = int(recorded["level"]), int(recorded["frame_size"])
        here = compressor_id(level, frame_size)
    except (KeyError, TypeError, ValueError, UsageError):
        raise CompressorMismatch(f"the state records an unusable compressor {recorded!r}") from None
    if dict(recorded) != here:
        raise CompressorMismatch(
            f"compressed streams were made with {_describe(recorded)}; this machine has {_describe(here)}, "
            f"which does not regenerate them byte for byte (install {recorded.get('library')}=="
            f"{recorded.get('version')}, or pack the changed files into new bins)"
        )
