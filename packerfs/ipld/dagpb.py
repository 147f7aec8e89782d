"""dag-pb nodes and the UnixFS Data message inside them.

Encoding follows the dag-pb spec's canonical form: Links (field 2) come before
Data (field 1), links are sorted by name bytes, and every link carries its Hash,
Name (explicitly, even when empty) and Tsize. Decoding is strict: anything a
canonical encoder would not produce is a FormatError, because a block we cannot
re-encode identically is one whose meaning we cannot be sure of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from packerfs.ipld.cid import decode_uvarint, encode_uvarint, read_cid

# UnixFS Data.Type values
RAW_TYPE = 0
DIRECTORY = 1
FILE = 2
METADATA = 3
SYMLINK = 4
HAMT_SHARD = 5

MURMUR3_X64_64 = 0x22


class PBLink(NamedTuple):
    cid: bytes
    name: bytes
    tsize: int


class PBNode(NamedTuple):
    links: list[PBLink]
    data: bytes | None


def _field(number: int, wire_type: int) -> bytes:
    return encode_uvarint((number << 3) | wire_type)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _field(number, 2) + encode_uvarint(len(value)) + value


def encode_link(link: PBLink) -> bytes:
    body = (
        _bytes_field(1, link.cid)
        + _bytes_field(2, link.name)
        + _field(3, 0)
        + encode_uvarint(link.tsize)
    )
    return _bytes_field(2, body)


def encode_node(links: list[PBLink], data: bytes | None) -> bytes:
    """Canonical dag-pb bytes. `links` must already be in name order."""
    parts = [encode_link(link) for link in links]
    if data is not None:
        parts.append(_bytes_field(1, data))
    return b"".join(parts)


def sort_links(links: list[PBLink]) -> list[PBLink]:
    return sorted(links, key=lambda link: link.name)


def _read_key(buf, pos):
    key, pos = decode_uvarint(buf, pos)
    return key >> 3, key & 7, pos


def _read_bytes(buf, pos):
    length, pos = decode_uvarint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise ValueError("length runs past the end of the block")
    return bytes(buf[pos:end]), end


def _decode_link(buf: bytes) -> PBLink:
    pos = 0
    cid = name = tsize = None
    last = 0
    while pos < len(buf):
        number, wire, pos = _read_key(buf, pos)
        if number <= last:
            raise ValueError("link fields out of order or repeated")
        last = number
        if number == 1 and wire == 2:
            raw, pos = _read_bytes(buf, pos)
            cid, end = read_cid(raw)
            if end != len(raw):
                raise ValueError("trailing bytes after link CID")
        elif number == 2 and wire == 2:
            name, pos = _read_bytes(buf, pos)
        elif number == 3 and wire == 0:
            tsize, pos = decode_uvarint(buf, pos)
        else:
            raise ValueError(f"unexpected link field {number}/{wire}")
    if cid is None:
        raise ValueError("link without Hash")
    return PBLink(cid, name if name is not None else b"", tsize if tsize is not None else 0)


def decode_node(block: bytes | memoryview) -> PBNode:
    """Parse a dag-pb block. Raises ValueError for anything non-canonical."""
    buf = bytes(block)
    pos = 0
    links: list[PBLink] = []
    data = None
    while pos < len(buf):
        number, wire, pos = _read_key(buf, pos)
        if wire != 2:
            raise ValueError(f"unexpected wire type {wire}")
        value, pos = _read_bytes(buf, pos)
        if number == 2:
            if data is not None:
                raise ValueError("link after Data")
            links.append(_decode_link(value))
        elif number == 1:
            if data is not None:
                raise ValueError("repeated Data")
            data = value
        else:
            raise ValueError(f"unexpected node field {number}")
    return PBNode(links, data)


@dataclass
class UnixFSData:
    type: int
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)
    hash_type: int | None = None
    fanout: int | None = None
    mode: int | None = None
    mtime: tuple[int, int] | None = None  # (seconds, nanoseconds)

    def encode(self) -> bytes:
        out = [_field(1, 0), encode_uvarint(self.type)]
        if self.data is not None:
            out.append(_bytes_field(2, self.data))
        if self.filesize is not None:
            out += [_field(3, 0), encode_uvarint(self.filesize)]
        for size in self.blocksizes:
            out += [_field(4, 0), encode_uvarint(size)]
        if self.hash_type is not None:
            out += [_field(5, 0), encode_uvarint(self.hash_type)]
        if self.fanout is not None:
            out += [_field(6, 0), encode_uvarint(self.fanout)]
        if self.mode is not None:
            out += [_field(7, 0), encode_uvarint(self.mode)]
        if self.mtime is not None:
            seconds, nanos = self.mtime
            body = _field(1, 0) + encode_uvarint(seconds & 0xFFFFFFFFFFFFFFFF)
            if nanos:
                body += _field(2, 5) + nanos.to_bytes(4, "little")
            out.append(_bytes_field(8, body))
        return b"".join(out)

    @classmethod
    def decode(cls, buf: bytes) -> "UnixFSData":
        pos = 0
        result = cls(type=-1)
        while pos < len(buf):
            number, wire, pos = _read_key(buf, pos)
            if wire == 0:
                value, pos = decode_uvarint(buf, pos)
                if number == 1:
                    result.type = value
                elif number == 3:
                    result.filesize = value
                elif number == 4:
                    result.blocksizes.append(value)
                elif number == 5:
                    result.hash_type = value
                elif number == 6:
                    result.fanout = value
                elif number == 7:
                    result.mode = value
                else:
                    raise ValueError(f"unexpected UnixFS field {number}")
            elif wire == 2:
                value, pos = _read_bytes(buf, pos)
                if number == 2:
                    result.data = value
                elif number == 8:
                    result.mtime = _decode_mtime(value)
                else:
                    raise ValueError(f"unexpected UnixFS field {number}")
            else:
                raise ValueError(f"unexpected UnixFS wire type {wire}")
        if result.type not in (RAW_TYPE, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD):
            raise ValueError(f"unknown UnixFS type {result.type}")
        return result


def _decode_mtime(buf: bytes) -> tuple[int, int]:
    pos = 0
    seconds, nanos = 0, 0
    while pos < len(buf):
        number, wire, pos = _read_key(buf, pos)
        if number == 1 and wire == 0:
            seconds, pos = decode_uvarint(buf, pos)
            if seconds >= 1 << 63:
                seconds -= 1 << 64
        elif number == 2 and wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated mtime nanoseconds")
            nanos = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise ValueError("unexpected mtime field")
    return seconds, nanos
