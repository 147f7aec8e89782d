"""The zstd frame format (RFC 8878, section 3.1.1), read without the library.

Used to check a frame taken from a CAR *before* any decompressor sees it: the header must
name exactly the content size the frame table expects (which bounds what decompression can
allocate), no dictionary, a bounded window and no reserved bits; walking the block headers
gives the frame's exact compressed length, so a frame that ends early or runs into the next
one is refused instead of being decoded from wrong boundaries. Nothing here allocates more
than the frame's own bytes.

    magic 28 B5 2F FD ‖ Frame_Header_Descriptor ‖ [Window_Descriptor] ‖ [Dictionary_ID]
          ‖ [Frame_Content_Size] ‖ blocks (3-octet header each) ‖ [Content_Checksum, 4 octets]
"""

from __future__ import annotations

from dataclasses import dataclass

from packerfs.errors import FormatError

__all__ = ["MAGIC", "FrameHeader", "parse_header", "frame_length", "compress_bound", "MIN_FRAME_LENGTH"]

MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK_MAX = 128 << 10  # Block_Maximum_Size: min(window, 128 KiB)
# The shortest frame: magic, descriptor, one FCS/window octet, one empty last block.
MIN_FRAME_LENGTH = 4 + 1 + 1 + 3


@dataclass(frozen=True)
class FrameHeader:
    header_length: int  # magic included
    content_size: int | None  # None: not recorded
    window_size: int
    dictionary_id: int
    has_checksum: bool
    single_segment: bool


def parse_header(data: bytes | memoryview, where: str = "zstd frame") -> FrameHeader:
    """The header at the start of `data`; FormatError if it is not a zstd frame header."""
    if len(data) < 6:
        raise FormatError(f"{where}: {len(data)} octets is too short for a zstd frame header")
    if bytes(data[:4]) != MAGIC:
        raise FormatError(f"{where}: not a zstd frame (magic {bytes(data[:4]).hex()})")
    fhd = data[4]
    fcs_flag = fhd >> 6
    single = bool(fhd & 0x20)
    if fhd & 0x08:
        raise FormatError(f"{where}: reserved bit set in the frame header descriptor")
    checksum = bool(fhd & 0x04)
    did_len = (0, 1, 2, 4)[fhd & 3]
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    pos = 5
    window = None
    if not single:
        wd = data[pos]
        pos += 1
        log = 10 + (wd >> 3)
        window = (1 << log) + ((1 << log) >> 3) * (wd & 7)
    end = pos + did_len + fcs_len
    if len(data) < end:
        raise FormatError(f"{where}: truncated frame header")
    did = int.from_bytes(data[pos : pos + did_len], "little")
    pos += did_len
    fcs = None
    if fcs_len:
        fcs = int.from_bytes(data[pos : pos + fcs_len], "little")
        if fcs_len == 2:
            fcs += 256
    if window is None:  # single segment: the window is the content
        window = fcs
    return FrameHeader(end, fcs, window, did, checksum, single)


def frame_length(data: bytes | memoryview, header: FrameHeader, where: str = "zstd frame") -> int:
    """The frame's compressed length, from walking its block headers (data starts at the frame)."""
    pos = header.header_length
    block_max = min(header.window_size, _BLOCK_MAX)
    n = len(data)
    while True:
        if pos + 3 > n:
            raise FormatError(f"{where}: the frame ends inside a block header at octet {pos}")
        bh = int.from_bytes(data[pos : pos + 3], "little")
        pos += 3
        last = bh & 1
        btype = (bh >> 1) & 3
        bsize = bh >> 3
        if btype == 3:
            raise FormatError(f"{where}: reserved block type at octet {pos - 3}")
        if bsize > block_max:
            raise FormatError(f"{where}: a block of {bsize} octets exceeds the maximum {block_max}")
        pos += 1 if btype == 1 else bsize
        if pos > n:
            raise FormatError(f"{where}: the frame ends inside a block (needs {pos} octets, has {n})")
        if last:
            break
    if header.has_checksum:
        pos += 4
        if pos > n:
            raise FormatError(f"{where}: the frame ends inside its checksum")
    return pos


def compress_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest frame zstd makes of `size` octets (header and checksum included)."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < (128 << 10) else 0)
