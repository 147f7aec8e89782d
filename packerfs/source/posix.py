"""A source tree in a local (POSIX) directory."""

from __future__ import annotations

import os
from typing import Collection, Iterable, Iterator

from packerfs.errors import SourceChanged
from packerfs.source.base import Source, SourceFile
from packerfs.source.files import lstat_source, open_source_file
from packerfs.source.walk import Entry, Fingerprint, ScanProblem, excluded_paths, walk

READ_SIZE = 1 << 20


class PosixFile(SourceFile):
    """An open source file, read with pread.

    Opened below the source root without following any symlink, and only if it is still a
    regular file (open_source_file): a directory swapped for a symlink out of the tree, or a
    FIFO or device put in the file's place, is refused with SourceChanged, never read or waited on.
    A file's version is not pinned by POSIX: the caller verifies what it reads (block CIDs).
    """

    def __init__(self, source: "PosixSource", relpath: bytes):
        self.shown = source.display(relpath)
        try:
            self.fd = open_source_file(source.root, relpath)
        except OSError as exc:
            raise SourceChanged(f"{self.shown}: cannot open source file: {exc.strerror}", path=self.shown) from None

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise SourceChanged(
                f"{self.shown}: source file is shorter than at scan time "
                f"(wanted {size} bytes at offset {offset}, got {len(data)})",
                path=self.shown,
            )
        return data

    def close(self) -> None:
        os.close(self.fd)


class PosixSource(Source):
    def __init__(self, path: str | bytes):
        self.root = os.fsencode(os.path.realpath(os.path.abspath(path)))
        self.url = os.fsdecode(self.root)
        self._fetched = 0

    def display(self, relpath: bytes) -> str:
        return os.fsdecode(self.root + b"/" + relpath) if relpath else self.url

    def walk(
        self,
        problems: list[ScanProblem],
        *,
        start_after: bytes | None = None,
        exclude: Collection[bytes] = (),
        keep: bool = False,
        replay: bool = False,
    ) -> Iterator[Entry]:
        return walk(self.root, problems, start_after=start_after, exclude=exclude)

    def open(self, relpath: bytes, fingerprint: Iterable = ()) -> PosixFile:
        return PosixFile(self, relpath)

    def stream(self, entry: Entry, start: int = 0) -> Iterator[bytes]:
        shown = self.display(entry.path)
        try:
            fd = open_source_file(self.root, entry.path)
        except OSError as exc:
            raise SourceChanged(f"{shown}: cannot open: {exc.strerror}", path=shown) from None
        try:
            if start:
                os.lseek(fd, start, os.SEEK_SET)
            remaining = entry.size - start
            while remaining:
                data = os.read(fd, min(READ_SIZE, remaining))
                if not data:
                    raise SourceChanged(
                        f"{shown}: file shrank while being read (offset {entry.size - remaining} of {entry.size}); "
                        f"run again to resume",
                        path=shown,
                    )
                remaining -= len(data)
                self._fetched += len(data)
                yield data
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns) != (entry.size, entry.mtime_ns):
                raise SourceChanged(f"{shown}: file changed while being read; run again to resume", path=shown)
        finally:
            os.close(fd)

    def describe_change(self, relpath: bytes, fingerprint: Iterable) -> str:
        try:
            now = Fingerprint.of(lstat_source(self.root, relpath))
        except OSError as exc:
            return exc.strerror.lower()
        except SourceChanged:
            return "a directory on its path is no longer a directory"
        return "its size or times differ" if tuple(now) != tuple(fingerprint) else "its bytes differ"

    def excluded(self, *others) -> set[bytes]:
        return excluded_paths(self.root, *others)

    @property
    def bytes_fetched(self) -> int:
        return self._fetched
