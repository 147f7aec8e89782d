"""The tail locator: the last section of every packerfs CAR, so a remote reader finds the bin's
metadata with ranged requests instead of walking every section header.

A CAR is a chain of length-prefixed sections that can only be walked from the front: over HTTP or
S3 that is one request per block. So each bin ends with one fixed-size raw block, outside the
UnixFS DAG (no directory links it, so ipfs-car and other tools ignore it; its bytes count towards
the piece like any block):

    section  = uvarint(36 + 32) || CIDv1(raw, sha2-256 of content) || content     (69 bytes)
    content  = b"packerfs-tail/1\\n"                 16 bytes, the magic and format version
               meta_start  u64 big-endian            section offset of the manifest's first block
               snapshot_at u64 big-endian            section offset of this bin's snapshot part's
                                                     root block, 0 if the bin holds none

From `meta_start` to the locator lie, in this order, the manifest file's blocks, the `.packerfs`
directory and the root directory's blocks (the root last), so one ranged read of the CAR's tail
gets everything needed to decode the manifest. Each manifest entry's `at` is then the section
offset of the part's (or symlink's) root block, and the blocks below a part's root are found
arithmetically from that node (children precede their parent, leaves are whole 1 MiB chunks but
the stream's last). Every block found that way is still checked against its CID before use.
"""

from __future__ import annotations

import hashlib
import struct

from packerfs.ipld.car import section_prefix
from packerfs.ipld.cid import RAW, make_cid

MAGIC = b"packerfs-tail/1\n"
_FIELDS = struct.Struct(">QQ")
CONTENT_LENGTH = len(MAGIC) + _FIELDS.size
CID_PREFIX = b"\x01\x55\x12\x20"  # CIDv1, raw, sha2-256, 32 bytes
SECTION_LENGTH = 1 + len(CID_PREFIX) + 32 + CONTENT_LENGTH


def encode(meta_start: int, snapshot_at: int) -> tuple[bytes, bytes]:
    """(cid, block) of the locator."""
    block = MAGIC + _FIELDS.pack(meta_start, snapshot_at)
    return make_cid(RAW, block), block


def section(meta_start: int, snapshot_at: int) -> bytes:
    cid, block = encode(meta_start, snapshot_at)
    return section_prefix(cid, len(block)) + block


def decode(tail: bytes, car_size: int) -> tuple[int, int] | None:
    """(meta_start, snapshot_at) from the CAR's last SECTION_LENGTH bytes, or None if they are not a
    valid locator (a CAR from another tool, or from packerfs before the locator existed)."""
    if len(tail) != SECTION_LENGTH:
        return None
    prefix_len = 1 + len(CID_PREFIX)
    if tail[0] != len(CID_PREFIX) + 32 + CONTENT_LENGTH or tail[1:prefix_len] != CID_PREFIX:
        return None
    content = tail[prefix_len + 32 :]
    if not content.startswith(MAGIC) or hashlib.sha256(content).digest() != tail[prefix_len : prefix_len + 32]:
        return None
    meta_start, snapshot_at = _FIELDS.unpack_from(content, len(MAGIC))
    end = car_size - SECTION_LENGTH
    if not 0 < meta_start < end or not 0 <= snapshot_at < end:
        return None
    return meta_start, snapshot_at


assert SECTION_LENGTH == len(section(1, 0))
