"""CARv1: a header naming one root, then sections `uvarint(len) || cid || block`.

The reader also opens CARv2 (an 11-byte pragma, a 40-byte header giving the
inner CARv1 payload's offset and size, then that payload, then an optional
index the reader ignores), reporting offsets in the outer file, and accepts any
number of roots: a check of exactly one root is the caller's (packerfs CARs).

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
# CARv2: a CARv1-style header {version: 2} of 10 bytes, then characteristics (16 bytes) and the
# data offset, data size and index offset (u64 little-endian each).
V2_PRAGMA = bytes.fromhex("0aa16776657273696f6e02")
V2_HEADER_LENGTH = 40


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


class _WindowedFile:
    """seek/read over a remote object's ranged reads, one WINDOW fetched at a time: walking the
    section headers of a remote CAR is then one request per WINDOW (a streaming read of the CAR),
    not one per block.

    With `window_sink`, windows are contiguous and each byte of the object is handed to it once, in
    order (finish() fetches what no read reached): verify hashes commP from the same pass."""

    WINDOW = 8 << 20

    def __init__(self, obj, window_sink=None):
        self.obj = obj
        self.size = obj.size
        self.sink = window_sink
        self.pos = 0
        self.start = 0
        self.data = b""

    def seek(self, pos: int) -> None:
        self.pos = pos

    def _next_window(self, at: int) -> None:
        # uncached where the object has a cache: a streaming read would only push out what is reused
        read = getattr(self.obj, "read_uncached", self.obj.read)
        data = read(at, min(self.WINDOW, max(self.size - at, 0)))
        if not data:
            raise TruncatedInput("the object ends before its listed size", path=self.obj.display, offset=at)
        self.start, self.data = at, data
        if self.sink is not None:
            self.sink(data)

    def read(self, n: int) -> bytes:
        end = min(self.pos + n, self.size)
        if self.sink is None and not (self.start <= self.pos and end <= self.start + len(self.data)) and n > self.WINDOW:
            data = self.obj.read(self.pos, n)
            self.pos += len(data)
            return data
        out = []
        while self.pos < end:
            if not self.start <= self.pos < self.start + len(self.data):
                if self.sink is None:
                    self._next_window(self.pos)
                else:
                    if self.pos < self.start:
                        raise AssertionError("a contiguous window reader only moves forward")
                    self._next_window(self.start + len(self.data))
                    continue
            piece = self.data[self.pos - self.start : end - self.start]
            out.append(piece)
            self.pos += len(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    def finish(self) -> None:
        """Hand the rest of the object to the sink."""
        while self.sink is not None and self.start + len(self.data) < self.size:
            self._next_window(self.start + len(self.data))

    def close(self) -> None:
        self.data = b""


class CarReader:
    """Sequential reader over one CAR file, v1 or v2 (`version`; for v2 the sections lie in
    [data_offset, data_end) and every offset is in the outer file). `roots` may hold any number.

    sections() walks the section headers without reading block bytes (seeking
    past them), so a large set indexes quickly; blocks() reads and verifies.
    """

    def __init__(self, path, *, window_sink=None):
        """`path`: a file's path, or an object with `display`, `size` and `read(offset, length)` (a
        remote CAR: packerfs.unpack.locations.CarObject), read in large sequential windows (each
        window handed to `window_sink` too, once; finish() hands over the rest)."""
        if hasattr(path, "read") and hasattr(path, "size"):
            self.path = path.display
            self.file = _WindowedFile(path, window_sink)
        else:
            self.path = os.fsdecode(path)
            self.file = os.fdopen(open_regular(path), "rb")
        try:
            self.size = self.file.size if isinstance(self.file, _WindowedFile) else os.fstat(self.file.fileno()).st_size
            self.version = 1
            self.data_offset = 0  # where the CARv1 payload starts (CARv2: inside the outer file)
            self.data_end = self.size  # and where it ends
            self._read_v2_header()
            # header_length: where the first section starts, in the outer file
            self.roots, self.header_length = self._read_header()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def finish(self) -> None:
        """Every byte of a remote CAR read with a window_sink has reached the sink."""
        if isinstance(self.file, _WindowedFile):
            self.file.finish()

    def __enter__(self) -> "CarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, message: str, offset: int, cls=FormatError) -> FormatError:
        return cls(message, path=self.path, offset=offset)

    def _read_varint_at(self, offset: int, what: str) -> tuple[int, int]:
        self.file.seek(offset)
        head = self.file.read(min(10, max(self.data_end - offset, 0)))
        if not head:
            raise self._fail(f"file ends where a {what} length was expected", offset, TruncatedInput)
        try:
            value, used = decode_uvarint(head)
        except ValueError as exc:
            if "truncated" in str(exc):
                raise self._fail(f"file ends inside a {what} length", offset, TruncatedInput) from None
            raise self._fail(f"bad {what} length: {first_line(exc)}", offset) from None
        return value, offset + used

    def _read_v2_header(self) -> None:
        """If the file starts with the CARv2 pragma, read its header and narrow the reader to the
        inner CARv1 payload."""
        self.file.seek(0)
        head = self.file.read(len(V2_PRAGMA) + V2_HEADER_LENGTH)
        if head[: len(V2_PRAGMA)] != V2_PRAGMA:
            return
        start = len(V2_PRAGMA)
        if len(head) < start + V2_HEADER_LENGTH:
            raise self._fail("file ends inside the CARv2 header", start, TruncatedInput)
        data_offset = int.from_bytes(head[start + 16 : start + 24], "little")
        data_size = int.from_bytes(head[start + 24 : start + 32], "little")
        index_offset = int.from_bytes(head[start + 32 : start + 40], "little")
        if data_offset < start + V2_HEADER_LENGTH or data_size == 0:
            raise self._fail(f"bad CARv2 header: data offset {data_offset}, data size {data_size}", start)
        if data_offset + data_size > self.size:
            raise self._fail(
                f"CARv2 header announces data up to offset {data_offset + data_size}, but the file has "
                f"{self.size} bytes",
                start,
                TruncatedInput,
            )
        if index_offset and index_offset < data_offset + data_size:
            raise self._fail(f"bad CARv2 header: index offset {index_offset} lies inside the data", start)
        self.version = 2
        self.data_offset, self.data_end = data_offset, data_offset + data_size

    def _read_header(self) -> tuple[list[bytes], int]:
        base = self.data_offset
        inner = "the CARv2 payload is not a CARv1" if self.version == 2 else "not a CARv1 or CARv2 file"
        length, pos = self._read_varint_at(base, "header")
        if length == 0 or length > MAX_HEADER:
            raise self._fail(f"{inner}: header length {length}", base)
        self.file.seek(pos)
        body = self.file.read(min(length, max(self.data_end - pos, 0)))
        if len(body) < length:
            raise self._fail("file ends inside the CAR header", pos, TruncatedInput)
        try:
            decoded = cbor.decode(body)
        except cbor.CBORError as exc:
            raise self._fail(f"{inner}: header is not DAG-CBOR ({exc})", pos) from None
        if not isinstance(decoded, dict) or decoded.get("version") != 1:
            version = decoded.get("version") if isinstance(decoded, dict) else None
            shown = f" (version {version!r})" if isinstance(version, int) else ""
            raise self._fail(f"{inner}: header version is not 1{shown}", pos)
        roots = decoded.get("roots")
        if not isinstance(roots, list) or not all(isinstance(r, cbor.Link) for r in roots):
            raise self._fail("CAR header has no valid roots", pos)
        return [bytes(r) for r in roots], pos + length

    def sections(self) -> Iterator[Section]:
        offset = self.header_length
        end = self.data_end
        while offset < end:
            length, pos = self._read_varint_at(offset, "section")
            if length == 0 or length > MAX_SECTION:
                raise self._fail(f"implausible section length {length}", offset)
            if pos + length > end:
                where = "the CARv2 payload" if self.version == 2 else "file"
                raise self._fail(
                    f"{where} ends inside a section: {length} bytes announced, {end - pos} present",
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
