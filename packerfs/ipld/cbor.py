"""A small, strict DAG-CBOR codec for the values packerfs writes.

Supported: None, bool, int (64-bit), bytes, str, list, dict with str keys, and
CIDs (tag 42, held as `Link`). Encoding is canonical DAG-CBOR (shortest
integer heads, map keys sorted by length then bytes, no floats). Decoding
accepts exactly that and nothing looser.

The `dag_cbor` package does the same job, but validates types on every call
at a cost of tens of microseconds per value; with one manifest entry and one
index record per file that dominated the scan of small files. The tests check
this codec against `dag_cbor` on random values.
"""

from __future__ import annotations

import struct
from typing import Any


class Link(bytes):
    """A binary CID, encoded as CBOR tag 42 (with the 0x00 multibase prefix)."""

    __slots__ = ()


class CBORError(ValueError):
    pass


class CBORTruncated(CBORError):
    """The data ends inside a value: a streaming reader should feed more and retry."""


# Heads of every major type for 0..23, the common case (small ints, short strings, short lists).
_SMALL_HEADS = tuple(tuple(bytes([(major << 5) | n]) for n in range(24)) for major in range(8))


def _head(major: int, n: int) -> bytes:
    if 0 <= n < 24:
        return _SMALL_HEADS[major][n]
    if n < 24:
        return bytes([(major << 5) | n])  # negative: raises, as it always did
    if n < 0x100:
        return bytes(((major << 5) | 24, n))
    if n < 0x10000:
        return _PACK_H(((major << 5) | 25) << 16 | n)[1:]
    if n < 0x100000000:
        return _PACK_Q(((major << 5) | 26) << 32 | n)[3:]
    if n < 0x10000000000000000:
        return _HEAD_27[major] + _PACK_Q(n)
    raise CBORError("integer too large for CBOR")


_PACK_H = struct.Struct(">I").pack  # a 2-byte argument packed with its initial byte: one call
_PACK_Q = struct.Struct(">Q").pack
_HEAD_27 = tuple(bytes([(major << 5) | 27]) for major in range(8))


def _key_order(key: str) -> tuple[int, bytes]:
    raw = key.encode()
    return len(raw), raw


# Records of one shape repeat by the million; their canonical key order and key
# encodings are worked out once per shape.
_KEY_ORDERS: dict[tuple, list[tuple[str, bytes]]] = {}


def _sorted_keys(keys: tuple) -> list[tuple[str, bytes]]:
    order = _KEY_ORDERS.get(keys)
    if order is None:
        if not all(isinstance(k, str) for k in keys):
            raise CBORError("map keys must be strings")
        order = [(k, _head(3, len(k.encode())) + k.encode()) for k in sorted(keys, key=_key_order)]
        if len(_KEY_ORDERS) < 1024:
            _KEY_ORDERS[keys] = order
    return order


def encode(value: Any) -> bytes:
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def _encode(value: Any, out: bytearray) -> None:
    # The exact built-in types first, by identity of their type (one dict-free test each); anything
    # else (bool, Link, subclasses, bytearray, memoryview, tuples) takes the general path below,
    # which is what decides the encoding: both give the same bytes.
    kind = type(value)
    if kind is int:
        if 0 <= value < 24:
            out.append(value)
        else:
            out += _head(0, value) if value >= 0 else _head(1, -1 - value)
        return
    if kind is bytes:
        n = len(value)
        out += _SMALL_HEADS[2][n] if n < 24 else _head(2, n)
        out += value
        return
    if kind is str:
        data = value.encode()
        n = len(data)
        out += _SMALL_HEADS[3][n] if n < 24 else _head(3, n)
        out += data
        return
    if kind is list:
        n = len(value)
        out += _SMALL_HEADS[4][n] if n < 24 else _head(4, n)
        for item in value:
            # small non-negative ints and short byte strings inline: no call per item
            kind = type(item)
            if kind is int and 0 <= item < 0x10000000000000000:
                out += _SMALL_HEADS[0][item] if item < 24 else _head(0, item)
            elif kind is bytes and len(item) < 24:
                out += _SMALL_HEADS[2][len(item)]
                out += item
            else:
                _encode(item, out)
        return
    if kind is dict:
        n = len(value)
        out += _SMALL_HEADS[5][n] if n < 24 else _head(5, n)
        for key, encoded_key in _sorted_keys(tuple(value)):
            out += encoded_key
            item = value[key]
            kind = type(item)
            if kind is int and 0 <= item < 0x10000000000000000:
                out += _SMALL_HEADS[0][item] if item < 24 else _head(0, item)
            elif kind is bytes and len(item) < 24:
                out += _SMALL_HEADS[2][len(item)]
                out += item
            else:
                _encode(item, out)
        return
    _encode_general(value, out)


def _encode_general(value: Any, out: bytearray) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        out += _head(0, value) if value >= 0 else _head(1, -1 - value)
    elif isinstance(value, Link):
        payload = b"\x00" + bytes(value)
        out += b"\xd8\x2a" + _head(2, len(payload)) + payload
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out += _head(2, len(data)) + data
    elif isinstance(value, str):
        data = value.encode()
        out += _head(3, len(data)) + data
    elif isinstance(value, (list, tuple)):
        out += _head(4, len(value))
        for item in value:
            _encode(item, out)
    elif isinstance(value, dict):
        out += _head(5, len(value))
        for key, encoded_key in _sorted_keys(tuple(value)):
            out += encoded_key
            _encode(value[key], out)
    else:
        raise CBORError(f"cannot encode {type(value).__name__}")


# A CBOR item head, for splicing pre-encoded items (e.g. an array of n entries): _head itself, since
# the hand-written encoders call it once per field.
encode_head = _head


def decode(data: bytes) -> Any:
    value, pos = _decode(memoryview(data), 0, 0)
    if pos != len(data):
        raise CBORError(f"{len(data) - pos} trailing bytes after the CBOR value")
    return value


def decode_prefix(data, pos: int = 0) -> tuple[Any, int]:
    """The value starting at `pos` and where it ends: for CBOR sequences (RFC 8742)."""
    return _decode(memoryview(data), pos, 0)


_MAX_DEPTH = 64


def _read_head(buf: memoryview, pos: int) -> tuple[int, int, int, int]:
    if pos >= len(buf):
        raise CBORTruncated("truncated CBOR")
    initial = buf[pos]
    major, info = initial >> 5, initial & 31
    pos += 1
    if info < 24:
        return major, info, info, pos
    sizes = {24: 1, 25: 2, 26: 4, 27: 8}
    if info not in sizes:
        raise CBORError("indefinite lengths and reserved values are not DAG-CBOR")
    size = sizes[info]
    if pos + size > len(buf):
        raise CBORTruncated("truncated CBOR")
    n = int.from_bytes(buf[pos : pos + size], "big")
    minimal = {1: 24, 2: 0x100, 4: 0x10000, 8: 0x100000000}[size]
    if n < minimal:
        raise CBORError("non-canonical integer encoding")
    return major, info, n, pos + size


def _decode(buf: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise CBORError("CBOR nested too deeply")
    major, info, n, pos = _read_head(buf, pos)
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major in (2, 3):
        end = pos + n
        if end > len(buf):
            raise CBORTruncated("truncated CBOR string")
        raw = bytes(buf[pos:end])
        if major == 2:
            return raw, end
        try:
            return raw.decode(), end
        except UnicodeDecodeError:
            raise CBORError("text string is not UTF-8") from None
    if major == 4:
        items = []
        for _ in range(n):
            item, pos = _decode(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        result = {}
        previous = None
        for _ in range(n):
            key, pos = _decode(buf, pos, depth + 1)
            if not isinstance(key, str):
                raise CBORError("map keys must be strings")
            order = _key_order(key)
            if previous is not None and order <= previous:
                raise CBORError("map keys out of canonical order or repeated")
            previous = order
            result[key], pos = _decode(buf, pos, depth + 1)
        return result, pos
    if major == 6:
        if n != 42:
            raise CBORError(f"unsupported CBOR tag {n}")
        payload, pos = _decode(buf, pos, depth + 1)
        if not isinstance(payload, bytes) or not payload.startswith(b"\x00") or len(payload) < 3:
            raise CBORError("malformed CID link")
        return Link(payload[1:]), pos
    if major == 7:
        simple = {20: False, 21: True, 22: None}
        if info in simple:
            return simple[info], pos
        raise CBORError("floats and other simple values are not used here")
    raise CBORError("unknown CBOR major type")
