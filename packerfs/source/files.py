"""Opening a source file without following symlinks or blocking on what replaced it.

A source file is reached from the source root one component at a time
(openat with O_NOFOLLOW|O_DIRECTORY), so a directory swapped for a symlink
after the scan is refused instead of followed out of the tree, and paths
longer than PATH_MAX work. The file itself is opened O_NONBLOCK|O_NOFOLLOW and
checked with fstat: a FIFO, socket, device, directory or symlink put in its
place is an error naming the path, never a hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from packerfs.errors import SourceChanged
from packerfs.source.walk import DIR_FLAGS, kind_name

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
O_NOATIME = getattr(os, "O_NOATIME", 0)


def _parts(root: bytes, relpath: bytes) -> list[bytes]:
    parts = relpath.split(b"/")
    if not relpath or any(part in (b"", b".", b"..") for part in parts):
        shown = os.fsdecode(root + b"/" + relpath)
        raise SourceChanged(f"{shown}: not a plain path below the source directory", path=shown)
    return parts


def _open_parent(root: bytes, parts: list[bytes]) -> int:
    """A descriptor of the directory holding the last of `parts`, reached without following symlinks."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for depth, part in enumerate(parts[:-1]):
            try:
                below = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                full = os.fsdecode(root + b"/" + b"/".join(parts))
                where = os.fsdecode(b"/".join(parts[: depth + 1]))
                raise SourceChanged(
                    f"{full}: {where} is no longer a directory (a symlink or file is in its place; not followed)",
                    path=full,
                ) from None
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def lstat_source(root: str | bytes, relpath: bytes) -> os.stat_result:
    """lstat of a path below root, reached without following symlinks (OSError or SourceChanged)."""
    root_b = os.fsencode(root)
    parts = _parts(root_b, relpath)
    fd = _open_parent(root_b, parts)
    try:
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def open_source_file(root: str | bytes, relpath: bytes) -> int:
    """A read-only, blocking descriptor of the regular file `relpath` below `root`.

    No component is followed if it is a symlink. Raises SourceChanged (with .path) if the file or
    one of its directories is no longer what the scan saw (a symlink, FIFO, socket, device or
    directory), and OSError (e.g. ENOENT, EACCES) for the rest, for the caller to word.
    """
    root_b = os.fsencode(root)
    parts = _parts(root_b, relpath)
    full = os.fsdecode(root_b + b"/" + relpath)

    def not_regular(mode: int) -> SourceChanged:
        return SourceChanged(f"{full}: is now a {kind_name(mode)}, not a regular file; not read", path=full)

    parent = _open_parent(root_b, parts)
    try:
        name = parts[-1]
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(st.st_mode)  # not even opened: opening a device can have effects
        try:
            fd = os.open(name, FILE_FLAGS | O_NOATIME, dir_fd=parent)
        except PermissionError:
            if not O_NOATIME:
                raise
            fd = os.open(name, FILE_FLAGS, dir_fd=parent)  # O_NOATIME needs the file's owner (EPERM)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise not_regular(stat.S_IFLNK) from None
        raise
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(st.st_mode)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
