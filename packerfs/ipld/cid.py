"""CIDs as the bytes they are on the wire.

Hot paths (one CID per 1 MiB leaf, thousands per second) keep CIDs as plain
`bytes` in binary form; the `multiformats` package is used at the edges, for
decoding text CIDs, where its validation is worth its cost. Text is encoded
here (cid_to_str), since it must also show CIDs of codecs no table knows.
"""

from __future__ import annotations

import base64
import hashlib

from multiformats import CID

from packerfs.errors import CorruptBlock, FormatError

RAW = 0x55
DAG_PB = 0x70
DAG_CBOR = 0x71

SHA2_256 = 0x12
IDENTITY = 0x00

# Identity-hashed CIDs may inline at most this many bytes; more is a malformed CID.
MAX_IDENTITY_DIGEST = 128


_SMALL_UVARINTS = tuple(bytes([n]) for n in range(0x80))


def encode_uvarint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL_UVARINTS[n]
    if 0x80 <= n < 0x4000:  # two bytes: every block and section length up to 16 KiB
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0:
        raise ValueError("uvarint cannot encode a negative number")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_uvarint(buf: bytes | memoryview, pos: int = 0) -> tuple[int, int]:
    """Return (value, position after it). Raises ValueError on truncation or overlong input."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            # Minimal encoding only: a trailing zero byte would make two encodings of one value.
            if byte == 0 and pos - start > 1:
                raise ValueError("non-minimal varint")
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


_CID_PREFIXES = {codec: b"\x01" + encode_uvarint(codec) + b"\x12\x20" for codec in (RAW, DAG_PB, DAG_CBOR)}


def cid_from_digest(codec: int, digest: bytes) -> bytes:
    """CIDv1 bytes for a sha2-256 digest."""
    prefix = _CID_PREFIXES.get(codec)
    if prefix is None:
        prefix = b"\x01" + encode_uvarint(codec) + b"\x12\x20"
    return prefix + digest


def make_cid(codec: int, data: bytes | memoryview) -> bytes:
    """CIDv1 (sha2-256) of a block."""
    return cid_from_digest(codec, hashlib.sha256(data).digest())


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _base58btc(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def cid_to_str(cid: bytes) -> str:
    """Canonical text form: base32 for CIDv1, base58btc for CIDv0.

    Never raises, whatever the bytes: it is used in error messages about CIDs
    that came from untrusted input (unknown codecs and hash functions are still
    CIDs; bytes that are not a CID at all are shown in hex). Encoded here rather
    than by `multiformats`, which refuses codes missing from its table.
    """
    try:
        cid = bytes(cid)
        if len(cid) == 34 and cid[:2] == b"\x12\x20":
            return _base58btc(cid)
        _, end = read_cid(cid)
        if end != len(cid) or cid[:1] != b"\x01":
            raise ValueError("not a CID")
    except (ValueError, TypeError):
        return f"<malformed CID 0x{bytes(cid)[:64].hex()}{'…' if len(cid) > 64 else ''}>"
    return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")


def parse_cid(text_or_bytes: str | bytes) -> bytes:
    """Binary CID from its text or binary form; ValueError if malformed."""
    try:
        cid = CID.decode(text_or_bytes)
    except Exception as exc:  # multiformats raises a variety of types
        shown = text_or_bytes[:120] if isinstance(text_or_bytes, str) else "0x" + bytes(text_or_bytes)[:64].hex()
        raise ValueError(f"not a CID: {shown!r}: {exc}") from None
    return bytes(cid)


def read_cid(buf: bytes | memoryview, pos: int = 0) -> tuple[bytes, int]:
    """Parse one binary CID at `pos`; return (cid bytes, position after it).

    Accepts CIDv0 (a bare sha2-256 multihash) and CIDv1. Raises ValueError.
    """
    start = pos
    if len(buf) - pos >= 2 and buf[pos] == 0x12 and buf[pos + 1] == 0x20:
        end = pos + 34
        if end > len(buf):
            raise ValueError("truncated CIDv0")
        return bytes(buf[start:end]), end
    version, pos = decode_uvarint(buf, pos)
    if version != 1:
        raise ValueError(f"unsupported CID version {version}")
    _codec, pos = decode_uvarint(buf, pos)
    _hash_code, pos = decode_uvarint(buf, pos)
    length, pos = decode_uvarint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise ValueError("truncated CID digest")
    return bytes(buf[start:end]), end


def cid_codec(cid: bytes) -> int:
    if cid[:2] == b"\x12\x20":
        return DAG_PB
    _, pos = decode_uvarint(cid, 0)
    codec, _ = decode_uvarint(cid, pos)
    return codec


def cid_multihash(cid: bytes) -> tuple[int, bytes]:
    """(hash function code, digest)."""
    if cid[:2] == b"\x12\x20":
        return SHA2_256, cid[2:]
    _, pos = decode_uvarint(cid, 0)
    _, pos = decode_uvarint(cid, pos)
    code, pos = decode_uvarint(cid, pos)
    length, pos = decode_uvarint(cid, pos)
    return code, cid[pos : pos + length]


# Hash functions a block's CID may use: multicodec code -> (name, digest length, hashlib constructor).
# Foreign CAR sets are mostly sha2-256; the others cost nothing with hashlib.
HASHES = {
    SHA2_256: ("sha2-256", 32, hashlib.sha256),
    0x13: ("sha2-512", 64, hashlib.sha512),
    0x16: ("sha3-256", 32, hashlib.sha3_256),
    0x14: ("sha3-512", 64, hashlib.sha3_512),
    0xB220: ("blake2b-256", 32, lambda data: hashlib.blake2b(data, digest_size=32)),
    0xB240: ("blake2b-512", 64, lambda data: hashlib.blake2b(data, digest_size=64)),
    0xB260: ("blake2s-256", 32, lambda data: hashlib.blake2s(data, digest_size=32)),
}


def block_matches(cid: bytes, data: bytes | memoryview) -> bool:
    """True if `data` hashes to `cid`. Unknown hash functions (and wrong digest lengths) never match."""
    code, digest = cid_multihash(cid)
    if code == SHA2_256:
        return hashlib.sha256(data).digest() == digest
    if code == IDENTITY:
        return len(digest) <= MAX_IDENTITY_DIGEST and bytes(data) == digest
    known = HASHES.get(code)
    if known is None or len(digest) != known[1]:
        return False
    return known[2](data).digest() == digest


def hash_problem(cid: bytes) -> str | None:
    """Why blocks named by `cid` cannot be checked (an unknown hash function, a digest of the wrong
    length), or None."""
    code, digest = cid_multihash(cid)
    if code == IDENTITY:
        return None if len(digest) <= MAX_IDENTITY_DIGEST else f"identity CID inlines {len(digest)} bytes"
    known = HASHES.get(code)
    if known is None:
        return f"uses unsupported hash function 0x{code:x}"
    if len(digest) != known[1]:
        return f"has a {known[0]} digest of {len(digest)} bytes, not {known[1]}"
    return None


def check_block(cid: bytes, data: bytes | memoryview, *, path: str | None = None, offset: int | None = None) -> None:
    """Raise CorruptBlock unless `data` hashes to `cid` (FormatError if the CID's hash cannot be checked)."""
    if not block_matches(cid, data):
        why = hash_problem(cid)
        if why is not None:
            raise FormatError(f"block {cid_to_str(cid)} {why}", path=path, offset=offset)
        raise CorruptBlock(f"block does not match its CID {cid_to_str(cid)}", path=path, offset=offset)
