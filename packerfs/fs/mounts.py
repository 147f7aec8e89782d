"""What the kernel says is mounted where (/proc/self/mountinfo), without touching the mount itself."""

from __future__ import annotations

import os
from typing import NamedTuple


class MountEntry(NamedTuple):
    device: str  # "major:minor", also the name of the mount's backing device info in /sys/class/bdi
    fstype: str  # "fuse.packerfs" for ours
    source: str  # the fsname: "packerfs"


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as \\040, \\011, \\012 and \\134."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mount_entry(mountpoint: str) -> MountEntry | None:
    """The topmost mount at `mountpoint` (an absolute path), or None."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    target = os.fsencode(mountpoint)
    found = None
    for line in lines:
        fields = line.split(b" ")
        try:
            dash = fields.index(b"-", 6)
            if _unescape(fields[4]) != target:
                continue
            found = MountEntry(
                fields[2].decode(), fields[dash + 1].decode(errors="replace"), _unescape(fields[dash + 2]).decode(errors="replace")
            )
        except (IndexError, ValueError):
            continue
    return found
