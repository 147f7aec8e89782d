"""A deterministic walk of a POSIX tree.

Order: depth-first, each directory's entries sorted by name bytes, a directory
before its contents. Every directory's contents are therefore contiguous, and
the order is the same on every run and every machine, which is what makes bins
reproducible and resumable.

Regular files, directories and symlinks are kept; symlinks are recorded, never
followed. Sockets, devices and FIFOs are reported and skipped. Unreadable
entries are collected as problems, so the caller can list every one of them at
once instead of failing on the first.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator, NamedTuple

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"


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


def _entry(path: bytes, st: os.stat_result, full: bytes) -> Entry | None:
    mode = st.st_mode
    fp = Fingerprint.of(st)
    if stat.S_ISREG(mode):
        return Entry(path, FILE, stat.S_IMODE(mode), st.st_mtime_ns, st.st_size, fp)
    if stat.S_ISDIR(mode):
        return Entry(path, DIR, stat.S_IMODE(mode), st.st_mtime_ns, 0, fp)
    if stat.S_ISLNK(mode):
        return Entry(path, SYMLINK, stat.S_IMODE(mode), st.st_mtime_ns, 0, fp, os.readlink(full))
    return None


def _kind_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def walk(root: str | bytes, problems: list[ScanProblem], *, start_after: bytes | None = None) -> Iterator[Entry]:
    """Yield the tree under `root` in canonical order, root directory first.

    Problems are appended to `problems` as they are met. With `start_after`,
    entries up to and including that path are skipped without listing the
    directories wholly before it, which is how an interrupted scan resumes.
    """
    root_b = os.fsencode(root)
    st = os.lstat(root_b)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{os.fsdecode(root_b)} is not a directory")
    resume = tuple(start_after.split(b"/")) if start_after else None
    if resume is None:
        yield _entry(b"", st, root_b)
    yield from _walk_dir(root_b, b"", problems, resume)


def _walk_dir(root: bytes, rel: bytes, problems: list[ScanProblem], resume: tuple[bytes, ...] | None) -> Iterator[Entry]:
    """`resume` holds the components of the resume point below this directory, if it lies here."""
    full_dir = os.path.join(root, rel) if rel else root
    try:
        names = sorted(os.listdir(full_dir))
    except OSError as exc:
        problems.append(ScanProblem(rel, f"cannot list directory: {exc.strerror}", True))
        return
    for name in names:
        on_resume_path = False
        if resume is not None:
            if name < resume[0]:
                continue  # this whole subtree was handled before the interruption
            on_resume_path = name == resume[0]
        path = rel + b"/" + name if rel else name
        full = os.path.join(root, path)
        try:
            st = os.lstat(full)
        except OSError as exc:
            problems.append(ScanProblem(path, f"cannot stat: {exc.strerror}", True))
            continue
        entry = _entry(path, st, full)
        if entry is None:
            problems.append(ScanProblem(path, f"skipped {_kind_name(st.st_mode)}", False))
            continue
        if on_resume_path:
            # The entry itself was handled; whatever lies below it and after it is new.
            if entry.kind == DIR:
                yield from _walk_dir(root, path, problems, resume[1:] or None)
            resume = None
            continue
        resume = None
        if entry.kind == FILE and not os.access(full, os.R_OK):
            problems.append(ScanProblem(path, "permission denied", True))
            continue
        yield entry
        if entry.kind == DIR:
            yield from _walk_dir(root, path, problems, None)
