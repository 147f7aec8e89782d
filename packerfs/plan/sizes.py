"""Bin sizes: parsing with units, defaults and limits."""

from __future__ import annotations

import re

from packerfs.errors import UsageError
from packerfs.plan import costs

SECTOR_32G_PAYLOAD = 32 * 2**30 * 127 // 128  # 34,091,302,912: the most a 32 GiB sector takes
SECTOR_64G_PAYLOAD = 64 * 2**30 * 127 // 128  # 68,182,605,824
# The PDP cap: the most a 1 GiB piece takes (1 GiB x 127/128), the largest piece PDP proves.
PDP_PAYLOAD = 2**30 * 127 // 128  # 1,065,353,216
# Names --bin-size takes besides sizes (matched without regard to case).
BIN_SIZE_PRESETS = {
    "pdp": PDP_PAYLOAD,
    "32gib-sector": SECTOR_32G_PAYLOAD,
    "64gib-sector": SECTOR_64G_PAYLOAD,
}
DEFAULT_BIN_SIZE = SECTOR_32G_PAYLOAD
# One full leaf plus the fixed overhead of a bin (header, root, manifest, one link).
MIN_BIN_SIZE = costs.file_bound(1 << 20) + 4096

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str) -> int:
    """`34091302912`, `32GiB`, `31.5GiB`, `1GB`, `8MiB` -> bytes (fractions round down)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read size {text!r}: use a number of bytes or a unit such as 8MiB, 1GB, 31.5GiB")
    number, unit = match.groups()
    from fractions import Fraction

    return int(Fraction(number) * _UNITS[unit.lower()])


def check_bin_size(size: int) -> int:
    if size > SECTOR_64G_PAYLOAD:
        raise UsageError(
            f"bin size {size} exceeds {SECTOR_64G_PAYLOAD} bytes, the most a 64 GiB sector can take"
        )
    if size < MIN_BIN_SIZE:
        raise UsageError(
            f"bin size {size} is too small to hold one 1 MiB leaf with its CAR overhead; "
            f"the smallest is {MIN_BIN_SIZE} bytes"
        )
    return size
