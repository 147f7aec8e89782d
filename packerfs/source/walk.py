"""A deterministic walk of a POSIX tree.

Order: depth-first, each directory's entries sorted by name bytes, a directory
before its contents. Every directory's contents are therefore contiguous, and
the order is the same on every run and every machine, which is what makes bins
reproducible and resumable.

Regular files, directories and symlinks are kept; symlinks are recorded, never
followed. Sockets, devices and FIFOs are reported and skipped. Unreadable
entries are collected as problems, so the caller can list every one of them at
once instead of failing on the first.

Nothing under the root is ever reached through a path: every directory is
opened relative to its parent's descriptor with O_NOFOLLOW, so a directory
swapped for a symlink while the walk runs is refused instead of followed out of
the tree, and depth is not limited by PATH_MAX. The walk is iterative (no
recursion limit); at most OPEN_DIRS directory descriptors are held at once,
deeper ancestors are re-opened through ".." and checked by device and inode.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
from typing import Collection, Iterator, NamedTuple

from packerfs.errors import UsageError

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# Directory descriptors held open at once besides the root's; ancestors above are re-opened when needed.
OPEN_DIRS = 64


class Fingerprint(NamedTuple):
    """What identifies one version of a file without reading it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Fingerprint":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Entry(NamedTuple):
    path: bytes  # relative to the source root, '/'-separated; b"" is the root itself
    kind: str  # FILE | DIR | SYMLINK
    mode: int  # permission bits (stat.S_IMODE)
    mtime_ns: int
    size: int  # plaintext bytes for files, 0 otherwise
    fingerprint: Fingerprint
    target: bytes = b""  # symlink target, verbatim

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parts(self) -> tuple[bytes, ...]:
        return tuple(self.path.split(b"/")) if self.path else ()


class ScanProblem(NamedTuple):
    path: bytes
    reason: str
    fatal: bool  # unreadable data (fatal unless skipped) vs. an unsupported file type (always skipped)


def kind_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


_kind_name = kind_name


def excluded_paths(source: str | bytes, *others) -> set[bytes]:
    """The source-relative paths of those of `others` that lie inside `source`, for walk(exclude=).

    Each of `others` is a path, a (what, path) pair naming it for messages (e.g. ("output
    directory", OUT)), or None. Paths are compared by their real paths, so a relative result
    is exactly what the walk, which follows no symlink, meets. One of them being the source
    itself or an ancestor of it is refused with a UsageError: packerfs would pack its own
    output, state or mount into the tree it is reading.
    """
    src = os.path.realpath(os.fsencode(source))
    prefix = src if src.endswith(b"/") else src + b"/"
    found: set[bytes] = set()
    for other in others:
        if other is None:
            continue
        what, path = other if isinstance(other, tuple) else ("directory", other)
        if path is None:
            continue
        real = os.path.realpath(os.fsencode(path))
        shown = os.fsdecode(path)
        if real == src:
            raise UsageError(
                f"{what} {shown} is the source directory {os.fsdecode(src)} itself; use a directory outside the source"
            )
        if prefix.startswith(real if real.endswith(b"/") else real + b"/"):
            raise UsageError(
                f"{what} {shown} contains the source directory {os.fsdecode(src)}; use a directory outside the source"
            )
        if real.startswith(prefix):
            found.add(real[len(prefix) :])
    return found


class _Frame:
    """One directory being listed: its descriptor (None while closed), path, sorted names, position."""

    __slots__ = ("fd", "path", "names", "next", "resume", "dev", "ino")

    def __init__(self, fd: int | None, path: bytes, names: list[bytes], st: os.stat_result, resume):
        self.fd = fd
        self.path = path
        self.names = names
        self.next = 0
        self.resume = resume  # components of the resume point below this directory, or None
        self.dev = st.st_dev
        self.ino = st.st_ino
        if resume is not None:
            # this directory's entries wholly before the resume point were handled before the interruption
            self.next = bisect.bisect_left(names, resume[0])

    def same(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)


def _entry(path: bytes, st: os.stat_result) -> Entry | None:
    mode = st.st_mode
    fp = Fingerprint.of(st)
    if stat.S_ISREG(mode):
        return Entry(path, FILE, stat.S_IMODE(mode), st.st_mtime_ns, st.st_size, fp)
    if stat.S_ISDIR(mode):
        return Entry(path, DIR, stat.S_IMODE(mode), st.st_mtime_ns, 0, fp)
    if stat.S_ISLNK(mode):
        return Entry(path, SYMLINK, stat.S_IMODE(mode), st.st_mtime_ns, 0, fp)
    return None


def _list(fd: int) -> list[bytes]:
    return sorted(os.fsencode(name) for name in os.listdir(fd))


def _readable(name: bytes, dir_fd: int) -> bool:
    try:
        return os.access(name, os.R_OK, dir_fd=dir_fd, follow_symlinks=False)
    except NotImplementedError:
        return os.access(name, os.R_OK, dir_fd=dir_fd)


def walk(
    root: str | bytes,
    problems: list[ScanProblem],
    *,
    start_after: bytes | None = None,
    exclude: Collection[bytes] = (),
) -> Iterator[Entry]:
    """Yield the tree under `root` in canonical order, root directory first.

    Problems are appended to `problems` as they are met. With `start_after`,
    entries up to and including that path are skipped without listing the
    directories wholly before it, which is how an interrupted scan resumes.
    Paths in `exclude` (relative to root, see excluded_paths) are left out with
    everything below them, without being looked at.
    """
    root_b = os.fsencode(root)
    excluded = frozenset(os.fsencode(p) for p in exclude)
    try:
        root_fd = os.open(root_b, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise NotADirectoryError(f"{os.fsdecode(root_b)} is not a directory") from None
        if exc.errno != errno.EACCES:
            raise
        st = os.lstat(root_b)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"{os.fsdecode(root_b)} is not a directory") from None
        if not start_after:
            yield _entry(b"", st)
        problems.append(ScanProblem(b"", f"cannot list directory: {exc.strerror}", True))
        return
    stack: list[_Frame] = []
    try:
        st = os.fstat(root_fd)
        resume = tuple(start_after.split(b"/")) if start_after else None
        if resume is None:
            yield _entry(b"", st)
        try:
            names = _list(root_fd)
        except OSError as exc:
            problems.append(ScanProblem(b"", f"cannot list directory: {exc.strerror}", True))
            return
        stack.append(_Frame(root_fd, b"", names, st, resume))
        root_fd = -1  # owned by the frame now
        yield from _walk(stack, problems, excluded)
    finally:
        if root_fd >= 0:
            os.close(root_fd)
        for frame in stack:
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None


def _walk(stack: list[_Frame], problems: list[ScanProblem], excluded: frozenset[bytes]) -> Iterator[Entry]:
    closed_below = 1  # stack[1:closed_below] have their descriptors closed to stay within OPEN_DIRS
    while stack:
        if len(stack) - closed_below > OPEN_DIRS:
            closing = stack[closed_below]
            if closing.fd is not None:
                os.close(closing.fd)
                closing.fd = None
            closed_below += 1
        frame = stack[-1]
        if frame.fd is None or frame.next >= len(frame.names):
            stack.pop()
            if len(stack) > 1 and stack[-1].fd is None:
                _reopen(stack, frame, problems)
                closed_below = min(closed_below, len(stack) - 1)
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None
            continue
        name = frame.names[frame.next]
        frame.next += 1
        resume = frame.resume
        on_resume_path = resume is not None and name == resume[0]
        frame.resume = None
        path = frame.path + b"/" + name if frame.path else name
        if path in excluded:
            continue
        try:
            st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
        except OSError as exc:
            problems.append(ScanProblem(path, f"cannot stat: {exc.strerror}", True))
            continue
        entry = _entry(path, st)
        if entry is None:
            problems.append(ScanProblem(path, f"skipped {kind_name(st.st_mode)}", False))
            continue
        if entry.kind == SYMLINK:
            try:
                entry = entry._replace(target=os.readlink(name, dir_fd=frame.fd))
            except OSError as exc:
                problems.append(ScanProblem(path, f"cannot read symlink: {exc.strerror}", True))
                continue
        if on_resume_path:
            # The entry itself was handled; whatever lies below it and after it is new.
            if entry.kind == DIR:
                child = _open_child(frame, name, path, st, problems, resume[1:] or None)
                if child is not None:
                    stack.append(child)
            continue
        if entry.kind == FILE and not _readable(name, frame.fd):
            problems.append(ScanProblem(path, "permission denied", True))
            continue
        yield entry
        if entry.kind == DIR:
            child = _open_child(frame, name, path, st, problems, None)
            if child is not None:
                stack.append(child)


def _open_child(
    parent: _Frame, name: bytes, path: bytes, st: os.stat_result, problems: list[ScanProblem], resume
) -> _Frame | None:
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent.fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            reason = "cannot list directory: it was replaced during the scan by something else (not followed)"
        else:
            reason = f"cannot list directory: {exc.strerror}"
        problems.append(ScanProblem(path, reason, True))
        return None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            problems.append(ScanProblem(path, "cannot list directory: it was replaced during the scan", True))
            os.close(fd)
            return None
        names = _list(fd)
    except OSError as exc:
        problems.append(ScanProblem(path, f"cannot list directory: {exc.strerror}", True))
        os.close(fd)
        return None
    return _Frame(fd, path, names, st, resume)


def _reopen(stack: list[_Frame], child: _Frame, problems: list[ScanProblem]) -> None:
    """Give stack[-1] (closed to save descriptors) its descriptor back, verified by device and inode.

    Through the child's "..", else down from the nearest open ancestor by name; if the directory
    is no longer where it was, the rest of its entries are reported and left out.
    """
    frame = stack[-1]
    if child.fd is not None:
        fd = _try_open(b"..", child.fd, frame)
        if fd is not None:
            frame.fd = fd
            return
    top = len(stack) - 1
    base = top - 1
    while base > 0 and stack[base].fd is None:
        base -= 1
    fd = stack[base].fd
    owned = False
    for level in range(base + 1, top + 1):
        below = stack[level]
        nfd = _try_open(below.path.rsplit(b"/", 1)[-1], fd, below) if fd is not None else None
        if owned:
            os.close(fd)
        fd, owned = nfd, True
        if fd is None:
            break
    if fd is not None:
        frame.fd = fd
        return
    problems.append(
        ScanProblem(frame.path, "directory moved during the scan; its remaining entries are left out", True)
    )
    frame.next = len(frame.names)


def _try_open(name: bytes, dir_fd: int, expect: _Frame) -> int | None:
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if expect.same(os.fstat(fd)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None
