"""OpenPGP packet framing (RFC 4880 §3.2, §4.2, §6) used by packerfs.crypt.openpgp.

Everything here is pure byte arithmetic: encoding lengths and MPIs, reading
packet headers, removing ASCII armor, and `Framing`, the byte layout of one
packet whose body may be split with partial body lengths. The layout of a
packerfs OpenPGP stream is built from two Framings (SEIPD outside, Literal
inside) so that it stays a pure function of the plaintext size.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Callable, Iterator

from packerfs.errors import FormatError

# Packet tags (RFC 4880 §4.3)
TAG_PKESK = 1
TAG_SIG = 2
TAG_SKESK = 3
TAG_OPS = 4
TAG_SECRET_KEY = 5
TAG_PUBLIC_KEY = 6
TAG_SECRET_SUBKEY = 7
TAG_COMPRESSED = 8
TAG_SED = 9
TAG_MARKER = 10
TAG_LITERAL = 11
TAG_TRUST = 12
TAG_USER_ID = 13
TAG_PUBLIC_SUBKEY = 14
TAG_USER_ATTR = 17
TAG_SEIPD = 18
TAG_MDC = 19
TAG_AEAD = 20

MAX_DEFINITE = 0xFFFFFFFF  # largest body a five-octet length can state
MAX_PARTIAL_LOG2 = 30  # partial lengths are 2**0 .. 2**30
MIN_FIRST_PARTIAL = 512  # RFC 4880 §4.2.2.4: the first partial length is at least 512


def definite_length(n: int) -> bytes:
    """New-format definite body length octets (RFC 4880 §4.2.2.1-3)."""
    if n < 0 or n > MAX_DEFINITE:
        raise ValueError(f"body length {n} cannot be stated as a definite length")
    if n < 192:
        return bytes([n])
    if n < 8384:
        m = n - 192
        return bytes([(m >> 8) + 192, m & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


def packet(tag: int, body: bytes) -> bytes:
    """A complete new-format packet with a definite length."""
    return bytes([0xC0 | tag]) + definite_length(len(body)) + body


def mpi(x: int) -> bytes:
    """RFC 4880 §3.2: two-octet bit count, then the big-endian value without leading zeros."""
    bits = x.bit_length()
    return bits.to_bytes(2, "big") + x.to_bytes((bits + 7) // 8, "big")


def read_mpi(body: bytes, pos: int) -> tuple[bytes, int]:
    """Return (value bytes, next position); raises ValueError on a short body."""
    if pos + 2 > len(body):
        raise ValueError("MPI header runs past the packet")
    bits = int.from_bytes(body[pos : pos + 2], "big")
    n = (bits + 7) // 8
    if pos + 2 + n > len(body):
        raise ValueError("MPI runs past the packet")
    return body[pos + 2 : pos + 2 + n], pos + 2 + n


# --- packet headers ---------------------------------------------------------------

class PacketError(ValueError):
    """Malformed framing at position `pos` of whatever was being parsed (caller maps it)."""

    def __init__(self, msg: str, pos: int):
        super().__init__(msg)
        self.msg = msg
        self.pos = pos


# What a length header says: a definite body length, a partial chunk, or "to end of input".
DEFINITE, PARTIAL, INDETERMINATE = "definite", "partial", "indeterminate"


@dataclass(frozen=True)
class Header:
    tag: int
    kind: str  # DEFINITE | PARTIAL | INDETERMINATE
    length: int  # body length (DEFINITE) or first chunk length (PARTIAL); 0 if INDETERMINATE
    header_len: int  # octets of tag + length


def parse_new_length(read: Callable[[int, int], bytes], pos: int) -> tuple[str, int, int]:
    """Parse new-format length octets at `pos`: (kind, length, octets used)."""
    b = read(pos, 1)
    if not b:
        raise PacketError("stream ends inside a packet length", pos)
    c = b[0]
    if c < 192:
        return DEFINITE, c, 1
    if c < 224:
        b2 = read(pos + 1, 1)
        if not b2:
            raise PacketError("stream ends inside a packet length", pos)
        return DEFINITE, ((c - 192) << 8) + b2[0] + 192, 2
    if c == 255:
        b4 = read(pos + 1, 4)
        if len(b4) != 4:
            raise PacketError("stream ends inside a packet length", pos)
        return DEFINITE, int.from_bytes(b4, "big"), 5
    return PARTIAL, 1 << (c & 0x1F), 1


def parse_header(read: Callable[[int, int], bytes], pos: int) -> Header:
    """Parse an old- or new-format packet header at `pos` (RFC 4880 §4.2)."""
    b = read(pos, 1)
    if not b:
        raise PacketError("stream ends where a packet header was expected", pos)
    c = b[0]
    if not c & 0x80:
        raise PacketError(f"not an OpenPGP packet header (octet 0x{c:02x})", pos)
    if c & 0x40:  # new format
        kind, length, n = parse_new_length(read, pos + 1)
        return Header(c & 0x3F, kind, length, 1 + n)
    tag = (c >> 2) & 0x0F
    lt = c & 3
    if lt == 3:
        return Header(tag, INDETERMINATE, 0, 1)
    n = (1, 2, 4)[lt]
    lb = read(pos + 1, n)
    if len(lb) != n:
        raise PacketError("stream ends inside a packet length", pos)
    return Header(tag, DEFINITE, int.from_bytes(lb, "big"), 1 + n)


def iter_packets(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(tag, body, offset) for each packet of an in-memory packet sequence (keys).

    Partial lengths are joined. Malformed input raises FormatError.
    """

    def read(off: int, n: int) -> bytes:
        return data[off : off + n]

    pos = 0
    while pos < len(data):
        try:
            h = parse_header(read, pos)
        except PacketError as e:
            raise FormatError(e.msg, offset=e.pos) from None
        start = pos
        pos += h.header_len
        if h.kind == INDETERMINATE:
            body, pos = data[pos:], len(data)
        elif h.kind == DEFINITE:
            if pos + h.length > len(data):
                raise FormatError("packet runs past the end of the data", offset=start)
            body = data[pos : pos + h.length]
            pos += h.length
        else:
            parts = []
            kind, length = h.kind, h.length
            while True:
                if pos + length > len(data):
                    raise FormatError("packet runs past the end of the data", offset=start)
                parts.append(data[pos : pos + length])
                pos += length
                if kind != PARTIAL:
                    break
                try:
                    kind, length, n = parse_new_length(read, pos)
                except PacketError as e:
                    raise FormatError(e.msg, offset=e.pos) from None
                pos += n
            body = b"".join(parts)
        yield h.tag, body, start


# --- ASCII armor (RFC 4880 §6) -------------------------------------------------------


def crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def dearmor(text: bytes) -> bytes:
    """Binary packets from ASCII armor (first armored block); ValueError if malformed."""
    lines = text.decode("ascii", "replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("-----BEGIN PGP"))
    except StopIteration:
        raise ValueError("no '-----BEGIN PGP' line") from None
    i = start + 1
    # armor headers end at the first empty line
    while i < len(lines) and lines[i].strip() and ":" in lines[i]:
        i += 1
    if i < len(lines) and not lines[i].strip():
        i += 1
    b64, checksum = [], None
    for ln in lines[i:]:
        s = ln.strip()
        if s.startswith("-----END PGP"):
            break
        if s.startswith("=") and len(s) == 5:
            checksum = s[1:]
            continue
        b64.append(s)
    else:
        raise ValueError("no '-----END PGP' line")
    try:
        data = base64.b64decode("".join(b64), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64 in armor") from None
    if checksum is not None:
        try:
            want = int.from_bytes(base64.b64decode(checksum), "big")
        except (binascii.Error, ValueError):
            raise ValueError("bad armor checksum line") from None
        if want != crc24(data):
            raise ValueError("armor checksum mismatch")
    return data


# --- partial body length layout ---------------------------------------------------


class Framing:
    """Byte layout of one new-format packet: tag octet, then its body in chunks.

    If the body is longer than `threshold` (and than one chunk), it is cut into
    chunks of 2**chunk_log2 octets, each announced by a one-octet partial length,
    and a final chunk of 1..2**chunk_log2 octets with a definite length (so the
    final length is never zero). Otherwise the packet has one definite length.
    Positions below are relative to the tag octet; the layout depends only on
    (body_len, threshold, chunk_log2).
    """

    __slots__ = ("body_len", "n", "P", "part_hdr", "last_hdr", "last_len", "size", "tag_octet")

    def __init__(self, tag: int, body_len: int, threshold: int, chunk_log2: int):
        if not (9 <= chunk_log2 <= MAX_PARTIAL_LOG2):
            raise ValueError("partial chunk must be 2**9 .. 2**30 octets")
        if not (0 <= threshold <= MAX_DEFINITE):
            raise ValueError("partial threshold must be 0 .. 2**32-1")
        self.tag_octet = bytes([0xC0 | tag])
        self.body_len = body_len
        P = 1 << chunk_log2
        if body_len > threshold and body_len > P:
            self.P = P
            self.n = (body_len - 1) // P + 1
        else:
            self.P = max(body_len, 1)
            self.n = 1
        self.part_hdr = bytes([224 + chunk_log2])
        self.last_len = body_len - (self.n - 1) * self.P
        self.last_hdr = definite_length(self.last_len)
        self.size = 1 + (self.n - 1) * (1 + self.P) + len(self.last_hdr) + self.last_len

    @property
    def partial(self) -> bool:
        return self.n > 1

    def _chunk(self, i: int) -> tuple[int, bytes, int]:
        """(start position, header octets, body length) of chunk i."""
        if i < self.n - 1:
            return 1 + i * (1 + self.P), self.part_hdr, self.P
        return 1 + i * (1 + self.P), self.last_hdr, self.last_len

    def body_pos(self, b: int) -> int:
        """Position of body octet b (b == body_len gives the packet end)."""
        if b >= self.body_len:
            return self.size
        i = min(b // self.P, self.n - 1)
        start, hdr, _ = self._chunk(i)
        return start + len(hdr) + (b - i * self.P)

    def body_before(self, pos: int) -> int:
        """How many body octets lie at positions < pos."""
        if pos <= 1:
            return 0
        if pos >= self.size:
            return self.body_len
        i = min((pos - 1) // (1 + self.P), self.n - 1)
        start, hdr, clen = self._chunk(i)
        return i * self.P + min(max(pos - start - len(hdr), 0), clen)

    def header_bytes(self) -> bytes:
        """Tag octet and first length header (the part before body octet 0)."""
        return self.tag_octet + self._chunk(0)[1]

    def pieces(self, a: int, c: int) -> Iterator[tuple[bytes | None, int, int]]:
        """Cover [a, c) in order: (header octets, 0, 0) or (None, body offset, length)."""
        a = max(a, 0)
        c = min(c, self.size)
        if a >= c:
            return
        if a == 0:
            yield self.tag_octet, 0, 0
            a = 1
        i = min((a - 1) // (1 + self.P), self.n - 1)
        while a < c and i < self.n:
            start, hdr, clen = self._chunk(i)
            hend = start + len(hdr)
            if a < hend:
                yield hdr[a - start : min(c, hend) - start], 0, 0
                a = hend
            bend = hend + clen
            if a < c and a < bend:
                e = min(c, bend)
                yield None, i * self.P + (a - hend), e - a
                a = e
            i += 1
