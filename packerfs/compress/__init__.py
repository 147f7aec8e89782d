"""Seekable zstd compression of a file's plaintext, before encryption (`--compress zstd[:LEVEL]`).

A compressed stream (`NAME.zst`, encrypted to `NAME.zst.age` / `.zst.gpg`) is a plain
concatenation of independent zstd frames, one per `frame_size` octets of plaintext (1 MiB by
default), so `age -d f.zst.age | zstd -d` restores the file with stock tools, and any range can
be regenerated, or decompressed, from the few frames it touches. Where the frames lie is the
FrameTable, stored per file version (about 3 octets per frame); the stream itself carries no
seek table.

Pack side:
    should_compress(read, size, level) -> bool     sample decision (pure function of the bytes);
                                                   False: store the file as it is, no .zst
    compress_file(read, size, level, frame_size=DEFAULT_FRAME_SIZE, sink=None) -> FrameTable
                                                   one pass, one frame in memory; sink(frame)
                                                   receives the compressed stream in order
    CompressedView(read, size, table, level)       RandomAccess (.size = compressed size, .read)
                                                   over the compressed stream; recompresses only
                                                   touched frames; CompressorMismatch when a frame
                                                   does not come out at its recorded length
    compressor_id(level, frame_size) -> dict       record in the state when packing
    check_compressor(recorded)                     before regenerating: CompressorMismatch if this
                                                   machine's compressor is another
Unpack side:
    PlaintextView(read_compressed, table)          RandomAccess over the plaintext; bounded,
                                                   checked decompression (FormatError)
    FrameTable.from_bytes(b) / .to_bytes()         validated against hostile input
    FrameTable.scan(read, compressed_size)         rebuild a lost table from the frames
"""

from packerfs.compress.table import MAX_FRAME_SIZE, Frame, FrameTable
from packerfs.compress.views import CompressedView, PlaintextView
from packerfs.compress.zstd import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_LEVEL,
    LIBRARY,
    MIN_SAVING,
    CompressorMismatch,
    check_compressor,
    compress_file,
    compressor_id,
    parse_compress_option,
    should_compress,
)

SUFFIX = ".zst"

__all__ = [
    "SUFFIX",
    "LIBRARY",
    "DEFAULT_LEVEL",
    "DEFAULT_FRAME_SIZE",
    "MAX_FRAME_SIZE",
    "MIN_SAVING",
    "Frame",
    "FrameTable",
    "CompressedView",
    "PlaintextView",
    "CompressorMismatch",
    "check_compressor",
    "compress_file",
    "compressor_id",
    "parse_compress_option",
    "should_compress",
]
