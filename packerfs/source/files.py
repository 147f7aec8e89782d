"""Opening a source file without following symlinks or blocking on what replaced it.

A source file is reached from the source root one component at a time
(openat with O_NOFOLLOW|O_DIRECTORY), so a directory swapped for a symlink
after the scan is refused instead of followed out of the tree, and paths
longer than PATH_MAX work. The file itself is opened O_NONBLOCK|O_NOFOLLOW and
checked with fstat: a FIFO, socket, device, directory or symlink put in its
place is an error naming the path, never a hang.

Where the kernel has openat2 (Linux 5.6 and later), the common case is one
resolution instead of a walk: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS from a
descriptor of the root gives the same guarantee in the kernel, the file is
first reached as O_PATH (which opens nothing, so a device swapped in is never
opened) and reopened for reading only once fstat says it is regular. Anything
unusual (no openat2, a symlink met, a path over PATH_MAX) takes the walk, which
also words the error.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import threading

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


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (the unified syscall table)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_O_PATH = getattr(os, "O_PATH", 0)
try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # not glibc-like: the walk serves
    _syscall = None
_openat2_works = _syscall is not None and bool(_O_PATH)
_roots: dict[bytes, tuple[int, int, int]] = {}  # source root -> (descriptor, st_dev, st_ino)
_roots_lock = threading.Lock()


def _root_fd(root: bytes) -> int:
    """A descriptor of the directory now at `root` (reopened if another directory took its place)."""
    now = os.stat(root)
    with _roots_lock:
        known = _roots.get(root)
        if known is not None and known[1:] == (now.st_dev, now.st_ino):
            return known[0]
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        # the old descriptor stays open: another thread may be resolving through it right now
        _roots[root] = (fd, st.st_dev, st.st_ino)
        return fd


def _open_beneath(root: bytes, relpath: bytes) -> int | None:
    """A read descriptor of a regular file below root in one kernel resolution, or None to take the walk."""
    global _openat2_works
    if not _openat2_works or len(relpath) >= 4096:
        return None
    how = _OpenHow(_O_PATH | getattr(os, "O_CLOEXEC", 0), 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall(_SYS_OPENAT2, _root_fd(root), relpath, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # no openat2, or a seccomp filter refuses it
            _openat2_works = False
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # the walk says what it is, and never opens it
        try:  # reopen the resolved file itself for reading: no path is looked up again
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | O_NOATIME | getattr(os, "O_CLOEXEC", 0))
        except PermissionError:
            if not O_NOATIME:
                raise
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:  # no /proc
            _openat2_works = False
            return None
    finally:
        os.close(fd)


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
    fd = _open_beneath(root_b, relpath)
    if fd is not None:
        return fd
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
