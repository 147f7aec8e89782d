"""What the scanner, BinReader and the views need from a source tree, whatever holds it.

A Source lists its tree in canonical order (walk), gives each entry a fingerprint that
identifies one version of it without reading it, and reads byte ranges of exactly the
version a fingerprint names (open, stream). Everything about where the bytes live (a
POSIX directory, a bucket) stays behind this interface, in packerfs/source/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Collection, Iterable, Iterator

from packerfs.source.walk import Entry, ScanProblem


class SourceFile(ABC):
    """One version of one source file, open for ranged reads."""

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset` of the pinned version, or SourceChanged naming the file."""

    def close(self) -> None:
        pass


class Source(ABC):
    """A tree of directories, regular files and symlinks to pack."""

    #: What messages, the index and the status file call the source: a real path or a URL
    #: (never with credentials).
    url: str

    def display(self, relpath: bytes) -> str:
        """The full name of a source-relative path, for messages."""
        from os import fsdecode

        return self.url.rstrip("/") + "/" + fsdecode(relpath) if relpath else self.url

    @abstractmethod
    def walk(
        self,
        problems: list[ScanProblem],
        *,
        start_after: bytes | None = None,
        exclude: Collection[bytes] = (),
        keep: bool = False,
        replay: bool = False,
    ) -> Iterator[Entry]:
        """The tree in canonical order (see packerfs.source.walk), root first; problems appended as met.

        A scan walks twice: once to count, once to pack. `keep` asks the source to keep this
        listing, and `replay` to give the kept one back if it has it, for a source where listing is
        costly (a bucket: one listing per scan). A local tree is simply walked again, which also
        catches entries that became unreadable in between."""

    @abstractmethod
    def open(self, relpath: bytes, fingerprint: Iterable) -> SourceFile:
        """The version of `relpath` that `fingerprint` names, for ranged reads (SourceChanged if it is gone)."""

    @abstractmethod
    def stream(self, entry: Entry, start: int = 0) -> Iterator[bytes]:
        """The file's bytes from `start` to entry.size, in pieces of at most 1 MiB, read once.

        SourceChanged (naming the file) if what is read is not the version the entry describes."""

    @abstractmethod
    def describe_change(self, relpath: bytes, fingerprint: Iterable) -> str:
        """How the file now differs from `fingerprint`, in a few words, for an error message."""

    def excluded(self, *others) -> set[bytes]:
        """The source-relative paths of those of `others` (paths or (what, path) pairs) inside the source."""
        return set()

    def read_ahead(self, entries: Iterator[Entry], will_read: Callable[[Entry], bool]) -> Iterator[Entry]:
        """`entries` unchanged, after announcing each file that will_read() says stream() will read.

        A source with latency starts fetching those files ahead of stream(), within a bounded budget."""
        return entries

    @property
    def bytes_fetched(self) -> int:
        """Bytes read from the source so far (for benchmarks and tests)."""
        return 0

    def close(self) -> None:
        pass
