"""Bech32 (BIP 173 checksum, no length limit), as age uses it for its keys.

age encodes X25519 recipients as ``age1…`` and identities as
``AGE-SECRET-KEY-1…``. A string is either all lowercase or all uppercase; the
checksum is always computed over the lowercase form.
"""

from __future__ import annotations

__all__ = ["Bech32Error", "encode", "decode"]

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_VALUE = {c: i for i, c in enumerate(_CHARSET)}
_GENERATORS = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


class Bech32Error(ValueError):
    """The string is not valid Bech32 (the message says why)."""


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ v
        for i, g in enumerate(_GENERATORS):
            if (top >> i) & 1:
                chk ^= g
    return chk


def _hrp_values(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _regroup(data: bytes | list[int], from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = 0
    nbits = 0
    out: list[int] = []
    mask = (1 << to_bits) - 1
    for v in data:
        acc = (acc << from_bits) | v
        nbits += from_bits
        while nbits >= to_bits:
            nbits -= to_bits
            out.append((acc >> nbits) & mask)
    if pad:
        if nbits:
            out.append((acc << (to_bits - nbits)) & mask)
    elif nbits >= from_bits or (acc << (to_bits - nbits)) & mask:
        raise Bech32Error("non-zero or excess padding bits")
    return out


def encode(hrp: str, data: bytes, *, upper: bool = False) -> str:
    hrp = hrp.lower()
    values = _regroup(data, 8, 5, pad=True)
    pm = _polymod(_hrp_values(hrp) + values + [0] * 6) ^ 1
    checksum = [(pm >> (5 * (5 - i))) & 31 for i in range(6)]
    s = hrp + "1" + "".join(_CHARSET[v] for v in values + checksum)
    return s.upper() if upper else s


def decode(s: str) -> tuple[str, bytes]:
    """Return (lowercase hrp, data bytes); raise Bech32Error if anything is off."""
    if s.lower() != s and s.upper() != s:
        raise Bech32Error("mixed case")
    if any(ord(c) < 33 or ord(c) > 126 for c in s):
        raise Bech32Error("invalid character")
    s = s.lower()
    pos = s.rfind("1")
    if pos < 1 or pos + 7 > len(s):
        raise Bech32Error("missing separator or checksum")
    hrp = s[:pos]
    try:
        values = [_VALUE[c] for c in s[pos + 1 :]]
    except KeyError:
        raise Bech32Error("invalid data character") from None
    if _polymod(_hrp_values(hrp) + values) != 1:
        raise Bech32Error("bad checksum")
    return hrp, bytes(_regroup(values[:-6], 5, 8, pad=False))
