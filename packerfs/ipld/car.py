"""CARv1: a header naming one root, then sections `uvarint(len) || cid || block`.

The writer side is split in two so that a CAR can be *planned* without its
bytes: `section_prefix()` and `header()` give exact lengths and bytes for any
block, so the pack layout can place every block at its final offset and serve
any range later. The reader walks sections with their offsets and checks each
block against its CID; every problem is one FormatError naming file and offset.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import BinaryIO, Iterator, NamedTuple

from packerfs.errors import FormatError, TruncatedInput
from packerfs.ipld import cbor
from packerfs.ipld.cid import check_block, decode_uvarint, encode_uvarint, read_cid

# A section longer than this is not a block any IPFS tool would produce
# (they cap blocks at 1-4 MiB); refusing it keeps a corrupt length from
# making us allocate gigabytes.
MAX_SECTION = 8 << 20
MAX_HEADER = 1 << 16


def header(root: bytes) -> bytes:
    """The CARv1 header for one root. Its length depends only on the root CID's length."""
    body = cbor.encode({"roots": [cbor.Link(root)], "version": 1})
    return encode_uvarint(len(body)) + body


def placeholder_header(root_length: int) -> bytes:
    """A header of exactly the length the real one will have, for hashing before the root is known."""
    fake = b"\x01\x70\x12\x20" + bytes(32)
    assert len(fake) == root_length, "only CIDv1 dag-pb sha2-256 roots are produced"
    return header(fake)


def section_prefix(cid: bytes, block_length: int) -> bytes:
    return encode_uvarint(len(cid) + block_length) + cid


def section_length(cid: bytes, block_length: int) -> int:
    return len(section_prefix(cid, block_length)) + block_length


class CarWriter:
    """Streams a CAR to a binary file object."""

    def __init__(self, out: BinaryIO, root: bytes):
        self.out = out
        self.offset = 0
        self._write(header(root))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def add(self, cid: bytes, block: bytes | memoryview) -> int:
        """Append a section; returns the offset of the block's bytes."""
        self._write(section_prefix(cid, len(block)))
        data_offset = self.offset
        self._write(bytes(block))
        return data_offset


def first_line(exc: BaseException) -> str:
    """Library messages can span lines; ours are one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Section(NamedTuple):
    cid: bytes
    offset: int  # where the section (its length prefix) starts
    data_offset: int  # where the block bytes start
    length: int  # block length


_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"),
)


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"of type 0o{stat.S_IFMT(mode):o}"


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor on `path`, which must be a regular file (after following symlinks).

    A FIFO, socket or device named like a CAR must never block us or be read: the file is
    lstat'ed/stat'ed first (a device is not even opened), opened with O_NONBLOCK (a FIFO swapped
    in meanwhile returns at once), checked again with fstat, and only then made blocking.
    Raises NotRegularFile (a FormatError naming the file) or OSError.
    """
    shown = os.fsdecode(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"not a regular file ({file_kind(st.st_mode)})", path=shown)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"not a regular file ({file_kind(st.st_mode)})", path=shown)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class NotRegularFile(FormatError):
    """A path given or found as a CAR is a directory, FIFO, socket or device."""


class CarReader:
    """Sequential reader over one CARv1 file.

    sections() walks the section headers without reading block bytes (seeking
    past them), so a large set indexes quickly; blocks() reads and verifies.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fsdecode(path)
        self.file = os.fdopen(open_regular(path), "rb")
        try:
            self.size = os.fstat(self.file.fileno()).st_size
            self.roots, self.header_length = self._read_header()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "CarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, message: str, offset: int, cls=FormatError) -> FormatError:
        return cls(message, path=self.path, offset=offset)

    def _read_varint_at(self, offset: int, what: str) -> tuple[int, int]:
        self.file.seek(offset)
        head = self.file.read(10)
        if not head:
            raise self._fail(f"file ends where a {what} length was expected", offset, TruncatedInput)
        try:
            value, used = decode_uvarint(head)
        except ValueError as exc:
            if "truncated" in str(exc):
                raise self._fail(f"file ends inside a {what} length", offset, TruncatedInput) from None
            raise self._fail(f"bad {what} length: {first_line(exc)}", offset) from None
        return value, offset + used

    def _read_header(self) -> tuple[list[bytes], int]:
        length, pos = self._read_varint_at(0, "header")
        if length == 0 or length > MAX_HEADER:
            raise self._fail(f"not a CARv1 file: header length {length}", 0)
        self.file.seek(pos)
        body = self.file.read(length)
        if len(body) < length:
            raise self._fail("file ends inside the CAR header", pos, TruncatedInput)
        try:
            decoded = cbor.decode(body)
        except cbor.CBORError as exc:
            raise self._fail(f"not a CARv1 file: header is not DAG-CBOR ({exc})", pos) from None
        if not isinstance(decoded, dict) or decoded.get("version") != 1:
            raise self._fail("not a CARv1 file: header version is not 1", pos)
        roots = decoded.get("roots")
        if not isinstance(roots, list) or not roots or not all(isinstance(r, cbor.Link) for r in roots):
            raise self._fail("CAR header has no valid roots", pos)
        return [bytes(r) for r in roots], pos + length

    def sections(self) -> Iterator[Section]:
        offset = self.header_length
        while offset < self.size:
            length, pos = self._read_varint_at(offset, "section")
            if length == 0 or length > MAX_SECTION:
                raise self._fail(f"implausible section length {length}", offset)
            if pos + length > self.size:
                raise self._fail(
                    f"file ends inside a section: {length} bytes announced, {self.size - pos} present",
                    offset,
                    TruncatedInput,
                )
            self.file.seek(pos)
            head = self.file.read(min(length, 80))
            try:
                cid, cid_end = read_cid(head)
            except ValueError as exc:
                raise self._fail(f"bad CID in section: {first_line(exc)}", pos) from None
            data_offset = pos + cid_end
            yield Section(cid, offset, data_offset, length - cid_end)
            offset = pos + length

    def read_block(self, section: Section, verify: bool = True) -> bytes:
        self.file.seek(section.data_offset)
        data = self.file.read(section.length)
        if len(data) < section.length:
            raise self._fail("file ends inside a block", section.data_offset, TruncatedInput)
        if verify:
            check_block(section.cid, data, path=self.path, offset=section.offset)
        return data

    def blocks(self, verify: bool = True) -> Iterator[tuple[Section, bytes]]:
        for section in self.sections():
            yield section, self.read_block(section, verify)
