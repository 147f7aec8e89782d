"""Sealing one bin from its plan: read, encrypt, hash, lay out, commP.

The scan (packerfs.pack.scan) decides everything from metadata and hands each
bin over as a list of operations. A BinSealer carries them out with a real
BinLayout, in this process or on a Dask worker (packerfs.pack.parallel):

  ("sync", chain)            open/close directories so the open ones are `chain`
  ("dir", entry)             a directory placed in this bin
  ("symlink", entry)
  ("part", entry, version, first_leaf, leaves, part, parts, params, coding)
                             leaves [first_leaf, first_leaf + leaves) of a file
                             version's stream, as part `part` (0-based) of `parts`;
                             `coding` (compress.coding, or None): how its plaintext
                             is stored before encryption

A part with `params` None starts its version's stream with a seed derived
from the run seed (crypt.secrets.file_seed) when it is the first part, and
continues from the `seams` handed in (the params the previous bin's sealer
returned) when it is not: OpenPGP's CFB chain and MDC hash run through the
whole file, so its parts after the first need the state at the seam. age and
the plain cipher give every part of a split file its params up front.

What the sealer finds goes to a Results object: leaf digests, the byte map
(segments), and each version's params at the end of its part here. The
sealer itself writes nothing but the CAR (when given a sink).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from packerfs import manifest
from packerfs.compress.coding import Coding
from packerfs.crypt.base import Cipher
from packerfs.crypt.secrets import file_seed
from packerfs.errors import FormatError
from packerfs.index.store import DIGESTS_PER_CHUNK
from packerfs.ipld.cid import RAW, cid_from_digest
from packerfs.ipld.unixfs import CHUNK_SIZE, FileBuilder, Node, symlink_block
from packerfs.plan.layout import BinLayout
from packerfs.plan.planner import add_dir_entry, manifest_base, sync_frames
from packerfs.privacy.names import hidden_name, hidden_name_length, names_key
from packerfs.privacy.sealed_manifest import ManifestSealer
from packerfs.source.base import Source
from packerfs.source.walk import FILE

# ".part" + two numbers of up to 12 digits + "of"
PART_SUFFIX_MAX = 5 + 12 + 2 + 12
NAME_MAX = 255  # bytes in one name: what stock tools (ipfs-car unpack) can write on POSIX systems
# "~" and 16 hex digits of the full name's SHA-256: what stands for the cut-off end of a long name.
SHORTENED_TAIL = 17


def name_in_car(name: bytes, suffix: bytes) -> bytes:
    """A file part's name inside a CAR: NAME + suffix, or, when that would exceed 255 bytes, a shortened
    NAME~HASH16 + suffix (the start of NAME, cut on a UTF-8 character boundary, then "~" and the first 16
    hex digits of SHA-256 of the whole NAME). The real name is in the manifest, so the scheme is
    reversible; the hash keeps names that share a long prefix apart."""
    if len(name) + len(suffix) <= NAME_MAX:
        return name + suffix
    keep = NAME_MAX - len(suffix) - SHORTENED_TAIL
    head = name[:keep]
    # don't cut a UTF-8 sequence in half: drop continuation bytes and the lead byte they belong to
    while head and 0x80 <= head[-1] < 0xC0:
        head = head[:-1]
    if head and head[-1] >= 0xC0:
        head = head[:-1]
    return head + b"~" + hashlib.sha256(name).hexdigest()[:16].encode() + suffix


def part_suffix(part: int, parts: int) -> bytes:
    """`.part0002of0013`: sortable, zero-padded to at least four digits."""
    if parts == 1:
        return b""
    width = max(4, len(str(parts)))
    return b".part%0*dof%0*d" % (width, part, width, parts)


def stored_suffix(cipher: Cipher, coding: "Coding | None") -> str:
    """What a stored stream's name ends with: `.age`, `.gpg` or ``, after `.zst` for a coded one."""
    return (coding.suffix if coding is not None else "") + cipher.suffix


def part_name(entry, suffix: str, part: int, parts: int) -> bytes:
    """The name part `part` (0-based) of `parts` of a file takes in its bin (names in clear)."""
    return name_in_car(entry.name, suffix.encode() + part_suffix(part + 1, parts))


def part_name_length(entry, suffix: str, part: int, parts: int, hidden: bool) -> int:
    if hidden:
        return hidden_name_length(suffix)
    return len(part_name(entry, suffix, part, parts))


def file_manifest_bound(entry, cipher: Cipher, hidden: bool = False, coding: "Coding | None" = None) -> tuple[int, int]:
    """(bound on a part's link name, bound on its manifest entry): what the plan reserves for a part.

    `hidden`: the part is linked from the bin's root under its hidden name (privacy.names);
    `coding`: its first part's entry also records how the file is coded (compress.coding)."""
    suffix = stored_suffix(cipher, coding)
    extra = len(manifest.encode_coding_fields(coding.to_record())) if coding is not None else 0
    if hidden:
        name_bound = hidden_name_length(suffix)
        return name_bound, manifest.entry_bound("file", entry.path, b"\0" * name_bound) + extra
    name_bound = min(NAME_MAX, len(entry.name) + len(suffix) + PART_SUFFIX_MAX)
    parent = entry.path[: -len(entry.name)]
    return name_bound, manifest.entry_bound("file", entry.path, b"\0" * (len(parent) + name_bound)) + extra


@dataclass
class SealContext:
    """What every bin of one scan run shares. It travels inside each task sent to a Dask worker
    (the dataset secret and run seed included: never written to disk there)."""

    source_url: str
    source_options: dict | None
    cipher: Cipher
    secret: bytes
    run_seed: bytes
    dataset: bytes
    bin_size: int
    hide_names: bool = False  # --hide-names: opaque part names, no directories, the manifest sealed

    def sealing(self) -> "ManifestSealer | None":
        return ManifestSealer(self.cipher, self.secret) if self.hide_names else None


@dataclass
class Results:
    """What one bin's sealing found, for the coordinator to commit with the bin."""

    digests: list = field(default_factory=list)  # (version, first_leaf, digests): runs within one digest chunk
    segments: list = field(default_factory=list)  # (end, record) of the bin's byte map
    params: dict = field(default_factory=dict)  # version -> params at the end of its part in this bin
    bytes_read: int = 0
    on_read: Callable[[int], None] | None = None  # progress, where the sealer runs in the coordinator

    def add_digests(self, version: int, first_leaf: int, data: bytes) -> None:
        self.digests.append((version, first_leaf, data))

    def add_segments(self, segments: list) -> None:
        self.segments.extend(segments)

    def add_params(self, version: int, params: bytes) -> None:
        self.params[version] = params

    def read(self, count: int) -> None:
        self.bytes_read += count
        if self.on_read is not None:
            self.on_read(count)


class BinSealer:
    """Carries out one bin's operations; seal() finishes the CAR and returns the bin's result."""

    def __init__(
        self, ctx: SealContext, number: int, source: Source, results, car_sink=None, seams=None,
        carry: "Carry | None" = None,
    ):
        """`seams`: version -> params at the end of the previous bin's part of a stream (see the module
        docstring); `carry`: the previous bin's sealer's open stream (carry_out), sealed just before."""
        self.ctx = ctx
        self.source = source
        self.results = results
        self.seams = seams or {}
        self.carry_in = carry
        self.carry_out: Carry | None = None
        self.layout = BinLayout(
            number, ctx.bin_size, ctx.dataset, ctx.cipher.name, ctx.cipher.recipients, car_sink, sealing=ctx.sealing()
        )
        self.names_key = names_key(ctx.secret) if ctx.hide_names else None
        root = self.layout.open_frame(b"", b"")
        self.layout.budget.add_link(root, len(manifest.DIRNAME))

    @property
    def number(self) -> int:
        return self.layout.number

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "part":
            self._part(*op[1:])
        elif kind == "sync":
            sync_frames(self.layout, op[1])
        elif kind == "dir":
            entry = op[1]
            if not self.layout.hidden:
                self.layout.open_frame(entry.path, entry.name)
            add_dir_entry(self.layout, entry)
        elif kind == "symlink":
            self._symlink(op[1])
        else:
            raise AssertionError(f"unknown bin operation {kind!r}")

    def flush_segments(self) -> None:
        segments = self.layout.take_segments()
        if segments:
            self.results.add_segments(segments)

    def meta_file(self, name: bytes, pieces: Iterator[bytes], length: int, extra: int, describe) -> None:
        """A snapshot part under `.packerfs/` (sealed where its body is: on the coordinator);
        describe(cid) gives the manifest's `snapshot` map once the part's root CID is known."""
        entry = self.layout.emit_meta_file(name, pieces, length, extra)
        self.layout.snapshot = describe(entry.cid)

    def seal(self) -> dict:
        if self.carry_in is not None:  # handed a stream this bin did not go on with
            self.carry_in.close()
            self.carry_in = None
        result = self.layout.seal()
        self.flush_segments()
        return result

    def abandon(self) -> None:
        for carry in (self.carry_in, self.carry_out):
            if carry is not None:
                carry.close()
        self.layout.abandon()

    # ------------------------------------------------------------ entries

    def _symlink(self, entry) -> None:
        layout = self.layout
        bound = manifest.entry_bound("symlink", entry.path, target=entry.target)
        if layout.hidden:  # its target lives in the sealed manifest only
            meta = manifest_base(entry)
            meta.update(target=entry.target)
            layout.add_manifest_entry(meta, bound)
            layout.is_empty = False
            return
        block = symlink_block(entry.target)
        layout.emit_stored(block.cid, block.data)
        at = layout.last_section
        layout.add_entry(entry.name, block.cid, len(block.data))
        meta = manifest_base(entry)
        meta.update(target=entry.target, cid=block.cid, at=at)
        layout.add_manifest_entry(meta, bound)

    def _encryptor(self, entry, version: int, first_leaf: int, params: bytes | None, size: int):
        """-> (encryptor, offset in the cipher's plaintext to read from) for a part starting at leaf
        `first_leaf`; `size`: the cipher's plaintext size (the file's, or its coded stream's)."""
        ctx = self.ctx
        if params is None and first_leaf:
            params = self.seams.get(version)
            if params is None:
                raise AssertionError(f"{entry.path!r}: part at leaf {first_leaf} has no params to continue from")
        if params is None:
            return ctx.cipher.new_file(size, ctx.secret, seed=file_seed(ctx.run_seed, version)), 0
        return ctx.cipher.resume_at(params, size, ctx.secret, first_leaf * CHUNK_SIZE)

    def _stream(self, entry, encryptor, start: int, carry: "Carry", coding=None) -> Iterator[bytes]:
        """The stream's leaves from where `encryptor` starts to its end, reading the file from plaintext
        offset `start` (of its coded stream, for a coded file). Only as much is read as the leaves taken
        need (give or take one read)."""
        leaf = bytearray(CHUNK_SIZE)
        filled = 0

        def cut(data: bytes) -> Iterator[bytes]:
            nonlocal filled
            view = memoryview(data)
            while view:
                take = min(len(view), CHUNK_SIZE - filled)
                leaf[filled : filled + take] = view[:take]
                filled += take
                view = view[take:]
                if filled == CHUNK_SIZE:
                    filled = 0
                    yield bytes(leaf)

        if coding is None:
            pieces = self.source.stream(entry, start)
        else:
            def plaintext_from(offset: int) -> Iterator[bytes]:
                for data in self.source.stream(entry, offset):
                    carry.results.read(len(data))
                    yield data

            pieces = coding.encode_from(plaintext_from, start, self.source.display(entry.path))
        try:
            for data in pieces:
                if coding is None:
                    carry.results.read(len(data))
                yield from cut(encryptor.update(data))
        finally:
            pieces.close()
        yield from cut(encryptor.finish())
        if filled or self.ctx.cipher.stream_size(coding.size if coding else entry.size) == 0:
            yield bytes(leaf[:filled])  # the short last leaf, or the one empty leaf of an empty stream

    def _part(
        self, entry, version: int, first_leaf: int, leaves: int, part: int, parts: int, params, coding=None
    ) -> None:
        cipher = self.ctx.cipher
        layout = self.layout
        carry = self.carry_in
        self.carry_in = None
        if carry is not None and (carry.version, carry.next_leaf) == (version, first_leaf):
            carry.results = self.results  # the stream read for the previous bin goes on (one read of the file)
        else:
            if carry is not None:
                carry.close()
            size = coding.size if coding is not None else entry.size
            encryptor, plain_offset = self._encryptor(entry, version, first_leaf, params, size)
            carry = Carry(version, first_leaf, encryptor, self.results)
            carry.leaves = self._stream(entry, encryptor, plain_offset, carry, coding)
        stream_size = cipher.stream_size(coding.size if coding is not None else entry.size)
        last = part + 1 == parts
        end = first_leaf + leaves
        builder = FileBuilder()
        layout.file_records += 1
        leaf_index = first_leaf
        run_first = first_leaf
        run = bytearray()
        try:
            while leaf_index < end:
                data = next(carry.leaves, None)
                if data is None:
                    break
                digest = hashlib.sha256(data).digest()
                run += digest
                cid = cid_from_digest(RAW, digest)
                layout.emit_leaf(version, leaf_index, cid, data)
                leaf_index += 1
                for block in builder.add_leaf(Node(cid, len(data), len(data))):
                    layout.emit_file_node(block, version, leaf_index)
                if leaf_index % DIGESTS_PER_CHUNK == 0:
                    self.results.add_digests(version, run_first, bytes(run))
                    run, run_first = bytearray(), leaf_index
                    self.flush_segments()
            if last and next(carry.leaves, None) is not None:
                leaf_index += 1
        except BaseException:
            carry.close()
            raise
        if leaf_index != end:
            carry.close()
            raise FormatError(
                f"{self.source.display(entry.path)}: its stream gave {'more' if leaf_index > end else 'fewer'} "
                f"leaves than planned for part {part + 1} of {parts} ({leaves} from leaf {first_leaf})"
            )
        if run:
            self.results.add_digests(version, run_first, bytes(run))
        tail, root = builder.finish()
        for block in tail:
            layout.emit_file_node(block, version, leaf_index)
        suffix = stored_suffix(cipher, coding)
        if self.names_key is not None:
            name = path_in_bin = hidden_name(self.names_key, version, part, suffix)
        else:
            name = part_name(entry, suffix, part, parts)
            path_in_bin = entry.path[: -len(entry.name)] + name
        layout.add_entry(name, root.cid, root.tsize)
        meta = manifest_base(entry)
        offset = first_leaf * CHUNK_SIZE
        meta.update(
            name=path_in_bin, version=version, size=entry.size, stream=stream_size,
            part=part + 1, parts=parts, offset=offset,
            length=min(stream_size, end * CHUNK_SIZE) - offset, cid=root.cid, at=layout.last_section,
        )
        if coding is not None and part == 0:
            meta.update(coding.to_record())
        layout.add_manifest_entry(meta, file_manifest_bound(entry, cipher, layout.hidden, coding)[1])
        self.results.add_params(version, carry.encryptor.params())
        self.flush_segments()
        if last:
            carry.close()
        else:
            carry.next_leaf = end
            self.carry_out = carry  # the next bin, sealed after this one in the same process, goes on from here


@dataclass
class Carry:
    """A file's stream left open at the end of a bin, for the next bin's part of it (in the same process).

    Continuing the open stream reads the file once, as one sequential pass, where starting the next
    part afresh (Cipher.resume_at) would read again from the cipher's last checkpoint; for OpenPGP
    that is the only way to continue at all without the previous bin's result."""

    version: int
    next_leaf: int
    encryptor: object
    results: Results
    leaves: Iterator[bytes] | None = None

    def close(self) -> None:
        if self.leaves is not None:
            self.leaves.close()
            self.leaves = None


def reads_from_start(op: tuple) -> bool:
    """Does this operation read its file from the first byte (a part starting at leaf 0)?"""
    return op[0] == "part" and op[3] == 0 and op[1].kind == FILE and op[1].size > 0


class SyncingFile:
    """A CAR being written during the scan: flushed to disk as it grows, fsynced when closed.

    Syncing every SYNC_EVERY bytes (on the writer thread) keeps the disk busy
    while the scan computes, instead of leaving gigabytes of dirty pages for
    one long fsync at the end.
    """

    SYNC_EVERY = 64 << 20

    def __init__(self, path: str):
        self.name = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.unsynced = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
            self.unsynced += len(data)
            if self.unsynced >= self.SYNC_EVERY:
                os.fdatasync(self.fd)
                self.unsynced = 0
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.name) from None

    def pwrite(self, data: bytes, offset: int) -> None:
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.name) from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, self.name) from None
            finally:
                os.close(self.fd)
                self.fd = -1
