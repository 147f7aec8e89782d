"""FileReader: random access to the plaintext of any restored file, straight from the CARs.

    reader = FileReader(carset, keyring)
    reader.read(b"dir/file", offset, size)        # plaintext bytes
    for entry in reader.entries(): ...             # the tree (TreeEntry)

A read maps the plaintext range to the stream range (the decryptor from
crypt.open_plaintext does that, over a RandomAccess view of the stream), the
stream range to parts (manifest offsets), each part range to leaves (walking
the part's UnixFS DAG from its root by blocksizes, reading only the nodes on
the way), and reads those blocks from the CARs. Every block is checked against
its CID before any byte of it is used; age chunks and OpenPGP CFB add their own
checks on top (see crypt).

Missing bins: a range that needs a part no present bin holds raises
IncompleteSet naming the part and the bin. Encrypted files also need their
first part (the header) and, for age, their last part (the final chunk
authenticates the length) before anything can be read.

Thread-safe: the tree is read-only, blocks are read with pread, and the caches
(verified leaves, decoded nodes, opened decryptors) are locked LRUs.
"""

from __future__ import annotations

import bisect
import errno
import os
from typing import Iterator

from packerfs.cache import LRU
from packerfs.crypt import KeyRing, iter_plaintext, open_plaintext
from packerfs.crypt.base import range_end
from packerfs.errors import FormatError, IncompleteSet
from packerfs.unpack.carset import CarSet
from packerfs.unpack.dag import FileDag, FileNode, decode_file_node
from packerfs.unpack.tree import DIR, FILE, FileVersion, PartRef, TreeEntry, show


class _StreamView:
    """RandomAccess over one file version's stored stream: its parts, end to end."""

    def __init__(self, reader: "FileReader", fv: FileVersion):
        self.reader = reader
        self.fv = fv
        self.refs = fv.ordered()
        self.starts = [r.offset for r in self.refs]

    @property
    def size(self) -> int:
        return self.fv.stream

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self.fv.stream)
        out = []
        pos = offset
        while pos < end:
            i = bisect.bisect_right(self.starts, pos) - 1
            ref = self.refs[i] if i >= 0 else None
            if ref is None or pos >= ref.offset + ref.length:
                raise self._missing(i, pos)
            stop = min(end, ref.offset + ref.length)
            out.append(self.reader._read_part(self.fv, ref, pos - ref.offset, stop - ref.offset))
            pos = stop
        return b"".join(out)

    def _missing(self, i: int, pos: int) -> IncompleteSet:
        """The parts between known refs i and i+1 are not in the set."""
        fv = self.fv
        first = self.refs[i].part + 1 if i >= 0 else 1
        last = self.refs[i + 1].part - 1 if i + 1 < len(self.refs) else fv.parts
        parts = f"part {first}" if first == last else f"parts {first}-{last}"
        if fv.missing_bins:
            bins = ", ".join(str(b) for b in fv.missing_bins)
            where = f"missing bin{'s' if len(fv.missing_bins) > 1 else ''} {bins}"
        else:
            where = "a bin that is not in the set"
        return IncompleteSet(
            f"{os.fsdecode(fv.path)}: stream offset {pos} lies in {parts} of {fv.parts}, which is in {where}; "
            f"this file cannot be read there"
        )


class _Decoded:
    """A coded file's plaintext (compress.coding): ranges through its frame table, and one
    authenticated pass (iter_verified) through the decryptor's own."""

    def __init__(self, decrypted, coding, name: str):
        self._decrypted = decrypted
        self._coding = coding
        self._view = coding.plaintext_view(decrypted.read, name=name)
        self._name = name
        self.size = self._view.size

    def read(self, offset: int, size: int) -> bytes:
        return self._view.read(offset, size)

    def iter_verified(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._coding.decode(iter_plaintext(self._decrypted, chunk_size), self._name)


class FileReader:
    """Plaintext of the files a CarSet holds, by path, any range, any thread."""

    def __init__(
        self,
        carset: CarSet,
        keyring: KeyRing | None = None,
        *,
        leaf_cache_bytes: int = 32 << 20,
        node_cache_entries: int = 1024,
        open_files: int = 64,
    ):
        self.carset = carset
        self.tree = carset.tree()
        self._keyring = keyring
        self._leaves = LRU(leaf_cache_bytes, weigh=len)
        self._nodes = LRU(node_cache_entries)
        self._plain = LRU(open_files)
        self._dag = FileDag(carset, self._leaf, self._node)

    # ------------------------------------------------------------ the tree

    def entries(self) -> Iterator[TreeEntry]:
        """Every path in the tree, sorted, the root (b"") first."""
        return iter(self.tree)

    def lookup(self, path: bytes | str) -> TreeEntry | None:
        return self.tree.lookup(path)

    def listdir(self, path: bytes | str) -> list[TreeEntry]:
        entry = self._entry(path)
        if entry.kind != DIR:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fsdecode(path))
        return self.tree.listdir(path)

    def _entry(self, path: bytes | str) -> TreeEntry:
        entry = self.tree.lookup(path)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, "no such file in the CAR set", os.fsdecode(path))
        return entry

    # ------------------------------------------------------------ content

    def keyring(self) -> KeyRing:
        if self._keyring is None:
            self._keyring = KeyRing()
        return self._keyring

    def version(self, path: bytes | str) -> FileVersion:
        entry = self._entry(path)
        if entry.kind == DIR:
            raise IsADirectoryError(errno.EISDIR, "is a directory", os.fsdecode(path))
        if entry.kind != FILE:
            raise OSError(errno.EINVAL, "is a symlink", os.fsdecode(path))
        return self.tree.files[entry.path]

    def stream(self, path: bytes | str) -> _StreamView:
        """The stored stream (an age file, an OpenPGP message, or the plaintext) as RandomAccess."""
        return _StreamView(self, self.version(path))

    def plaintext(self, path: bytes | str):
        """RandomAccess of the file's plaintext (the decryptor; cached per file version).

        KeyProblem if the keyring cannot open it; IncompleteSet if a part the
        decryptor needs up front (header, final chunk) is missing.
        """
        fv = self.version(path)
        key = (fv.path, fv.version)
        plain = self._plain.get(key)
        if plain is None:
            plain = self._open(fv)
            self._plain.put(key, plain)
        return plain

    def _open(self, fv: FileVersion):
        stream = _StreamView(self, fv)
        cipher = self.carset.cipher
        keyring = self.keyring() if cipher != "plain" else None
        plain = open_plaintext(stream, keyring, cipher, name=os.fsdecode(fv.path))
        if fv.coding is not None:
            if plain.size != fv.coding.size:
                raise FormatError(
                    f"{show(fv.path)} decrypts to {plain.size} bytes, but its coding (zstd frames, padding) "
                    f"takes {fv.coding.size}", path=fv.ordered()[0].car,
                )
            plain = _Decoded(plain, fv.coding, os.fsdecode(fv.path))
        if plain.size != fv.size:
            first = fv.ordered()[0]
            raise FormatError(
                f"{show(fv.path)} decrypts to {plain.size} bytes, but the manifest says {fv.size}",
                path=first.car,
            )
        return plain

    def read(self, path: bytes | str, offset: int, size: int) -> bytes:
        """Plaintext bytes [offset, offset+size) of a file, clipped to its end."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        fv = self.version(path)
        if size == 0 or offset >= fv.size:
            return b""
        return self.plaintext(path).read(offset, size)

    def read_into(self, path: bytes | str, offset: int, buffer) -> int:
        """Plaintext from `offset` into the writable `buffer` (up to its length, clipped to the file's
        end); returns the length. The age decryptor writes whole chunks there without a copy."""
        buffer = memoryview(buffer).cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        fv = self.version(path)
        if not len(buffer) or offset >= fv.size:
            return 0
        plain = self.plaintext(path)
        read_into = getattr(plain, "read_into", None)
        if read_into is not None:
            return read_into(offset, buffer)
        data = plain.read(offset, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def iter_verified(self, path: bytes | str, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """The whole plaintext in order, authenticated as it streams (age tags, OpenPGP MDC at the end)."""
        return iter_plaintext(self.plaintext(path), chunk_size)

    # ------------------------------------------------------------ blocks

    def _leaf(self, cid: bytes) -> bytes:
        data = self._leaves.get(cid)
        if data is None:
            data = self.carset.read_block(cid)
            self._leaves.put(cid, data)
        return data

    def _node(self, cid: bytes) -> FileNode:
        node = self._nodes.get(cid)
        if node is None:
            node = decode_file_node(self.carset, cid, self.carset.read_block(cid))
            self._nodes.put(cid, node)
        return node

    def _read_part(self, fv: FileVersion, ref: PartRef, start: int, end: int) -> bytes:
        try:
            return self._dag.read(ref.cid, ref.length, start, end)
        except FormatError as exc:
            if exc.path is not None:
                raise
            raise FormatError(
                f"{exc} (needed by part {ref.part} of {show(fv.path)}, which its manifest places here)",
                path=ref.car,
            ) from None
