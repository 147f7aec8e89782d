"""Piece commitment (commP) and piece CIDs for Filecoin deals.

    h = CommP()
    h.write(b"...")            # any number of writes, any sizes; memory stays flat
    h.replace_prefix(header)   # optional: patch the first <= 127 bytes after the fact
    info = h.finish()          # PieceInfo(piece_cid, piece_cid_v2, piece_size, payload_size, root)

How it is computed (see reference.py for the plain definition): the payload is
fed in aligned chunks of 127 << CHUNK_K raw bytes (1 MiB padded); the C kernel
(_commp) fr32-expands each chunk and returns its subtree root, hashing with the GIL
released on all cores (AVX-512, SHA-NI or portable SHA-256: whichever is fastest
here, see _commp.impl()). Chunk roots are folded on a small stack here, like a
binary counter. finish() hashes the buffered tail (zeros after it come from
precomputed zero-subtree roots) and folds the stack up to the padded piece size.

replace_prefix() works because only the first 127-byte fr32 group depends on the
first 127 bytes: the hasher keeps those bytes plus the right-sibling hashes along
the leftmost path of the tree (one per level: O(log n) memory), and finish()
recomputes that one path.
"""

from __future__ import annotations

import base64
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

from packerfs.errors import UsageError
from packerfs.ipld.cid import encode_uvarint

from . import _commp

__all__ = [
    "CommP",
    "commp",
    "PieceInfo",
    "PieceSizeError",
    "commp_file",
    "MIN_PAYLOAD",
    "MAX_PAYLOAD",
    "piece_cid_v1",
    "piece_cid_v2",
    "padded_size",
    "set_kernel_threads",
]

MIN_PAYLOAD = 65  # the smallest payload stock commP tools accept (go-fil-commp-hashhash)
MAX_PAYLOAD = (64 << 30) * 127 // 128  # 68,182,605,824: the payload of a 64 GiB sector

CHUNK_K = 13  # chunk = 127 << 13 raw bytes = 1,040,384 (1 MiB padded)
READ_CHUNKS = 16  # commp_file reads 16 chunks (~16 MiB) at a time

# Multicodec / multihash codes.
FIL_COMMITMENT_UNSEALED = 0xF101
SHA2_256_TRUNC254_PADDED = 0x1012
RAW = 0x55
FR32_SHA256_TRUNC254_PADBINTREE = 0x1011


class PieceSizeError(UsageError):
    """The payload is too small or too large to be a Filecoin piece."""


class PieceInfo(NamedTuple):
    piece_cid: str  # CIDv1 'baga6ea4sea…' (fil-commitment-unsealed, sha2-256-trunc254-padded)
    piece_cid_v2: str  # FRC-0069 'bafkzcib…' (raw, fr32-sha256-trunc254-padbintree)
    piece_size: int  # padded piece size: a power of two >= 128
    payload_size: int
    root: bytes  # 32-byte commP


def _size_error(size: int, *, growing: bool = False) -> PieceSizeError:
    return PieceSizeError(
        f"payload {'would grow to' if growing else 'is'} {size:,} bytes; a piece payload must be "
        f"{MIN_PAYLOAD:,} to {MAX_PAYLOAD:,} bytes (the 64 GiB sector limit)"
    )


# --- CIDs ----------------------------------------------------------------------------


def _cid_string(codec: int, mh_code: int, digest: bytes) -> str:
    raw = encode_uvarint(1) + encode_uvarint(codec) + encode_uvarint(mh_code) + encode_uvarint(len(digest)) + digest
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def set_kernel_threads(count: int) -> None:
    """Threads the C kernel hashes large inputs with, in this process (0: one per CPU, the default).

    A process that shares the machine's cores with other sealers (a Dask worker) takes its share."""
    _commp.set_threads(count)


def padded_size(payload_size: int) -> int:
    """Padded piece size for a payload: the smallest power of two >= 128 holding it fr32-expanded."""
    groups = max(1, -(-payload_size // 127))
    return max(128, 1 << (groups * 128 - 1).bit_length())


def piece_cid_v1(root: bytes) -> str:
    return _cid_string(FIL_COMMITMENT_UNSEALED, SHA2_256_TRUNC254_PADDED, bytes(root))


def piece_cid_v2(root: bytes, piece_size: int, payload_size: int) -> str:
    """FRC-0069 piece CID: digest = uvarint(padding) || height || root."""
    height = piece_size.bit_length() - 1 - 5  # leaves are 32 bytes
    padding = piece_size // 128 * 127 - payload_size
    digest = encode_uvarint(padding) + bytes([height]) + bytes(root)
    return _cid_string(RAW, FR32_SHA256_TRUNC254_PADBINTREE, digest)


def _info(root: bytes, payload_size: int) -> PieceInfo:
    size = padded_size(payload_size)
    return PieceInfo(piece_cid_v1(root), piece_cid_v2(root, size, payload_size), size, payload_size, root)


# --- tree helpers ----------------------------------------------------------------------


def _node(left: bytes, right: bytes) -> bytes:
    digest = bytearray(hashlib.sha256(left + right).digest())
    digest[31] &= 0x3F
    return bytes(digest)


def _zero_roots(max_height: int = 64) -> list[bytes]:
    roots = [bytes(32)]
    for _ in range(max_height):
        roots.append(_node(roots[-1], roots[-1]))
    return roots


_ZERO = _zero_roots()  # _ZERO[h]: root of an all-zero subtree of height h (32 << h bytes)


# --- streaming hasher ----------------------------------------------------------------


class CommP:
    """Streaming commP hasher. Memory is one chunk (~1 MiB) plus O(log n) hashes.

    Heights: a 32-byte leaf is height 0, a 127-byte fr32 group (128 padded bytes)
    height 2, a chunk of 127 << k raw bytes height k + 2.
    """

    def __init__(self, *, _chunk_k: int = CHUNK_K):
        # _chunk_k is for tests: small chunks exercise the folding with small inputs.
        self._k = _chunk_k
        self._chunk_raw = 127 << _chunk_k
        self._chunk_height = _chunk_k + 2
        self._buf = bytearray(self._chunk_raw)
        self._fill = 0  # bytes in _buf
        self._total = 0  # payload bytes written
        self._chunks = 0  # chunks hashed
        self._stack: list[tuple[int, bytes]] = []  # (height, root), heights strictly decreasing
        # Leftmost path, recorded when the first chunk is hashed and as the
        # leftmost stack entry grows: _first = the first 127 raw bytes,
        # _siblings[i] = right sibling of the leftmost node of height i + 2.
        self._first: bytearray | None = None
        self._siblings: list[bytes] = []
        self._prefix_dirty = False

    # -- writing --

    def write(self, data) -> None:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        if not n:
            return
        if self._total + n > MAX_PAYLOAD:
            raise _size_error(self._total + n, growing=True)
        self._total += n
        pos = 0
        if self._fill:
            take = min(n, self._chunk_raw - self._fill)
            self._buf[self._fill : self._fill + take] = mv[:take]
            self._fill += take
            pos = take
            if self._fill < self._chunk_raw:
                return
            self._hash_chunks(self._buf)
            self._fill = 0
        whole = (n - pos) // self._chunk_raw * self._chunk_raw
        if whole:
            self._hash_chunks(mv[pos : pos + whole])
            pos += whole
        rest = n - pos
        if rest:
            self._buf[:rest] = mv[pos:]
            self._fill = rest

    def _hash_chunks(self, data) -> None:
        """Hash whole chunks (len(data) a multiple of the chunk size) and fold their roots."""
        if self._chunks == 0:
            self._record_first_chunk(data[: self._chunk_raw])
            data = data[self._chunk_raw :]
            if not len(data):
                return
        roots = _commp.subtree_roots(data, self._k)
        for i in range(0, len(roots), 32):
            self._push(roots[i : i + 32])

    def _record_first_chunk(self, chunk) -> None:
        """Hash the first chunk through its leftmost path, keeping the right siblings."""
        self._first = bytearray(chunk[:127])
        siblings = []
        for j in range(self._k):  # sibling of height j + 2 covers raw [127 << j, 127 << (j + 1))
            piece = chunk[127 << j : 127 << (j + 1)]
            siblings.append(_commp.root(piece, j) if j < 7 else _commp.subtree_roots(piece, j))
        self._siblings = siblings
        self._push(self._left_path(self._first, self._k))

    def _left_path(self, first: bytes | bytearray, levels: int) -> bytes:
        """Root of the leftmost subtree of height levels + 2 from the first group and siblings."""
        root = _commp.root(bytes(first), 0)
        for sibling in self._siblings[:levels]:
            root = _node(root, sibling)
        return root

    def _push(self, root: bytes) -> None:
        self._chunks += 1
        height = self._chunk_height
        stack = self._stack
        while stack and stack[-1][0] == height:
            _, left = stack.pop()
            if not stack:  # `left` is the leftmost node of this height
                self._siblings.append(root)
            root = _node(left, root)
            height += 1
        stack.append((height, root))

    # -- prefix patching --

    def replace_prefix(self, prefix: bytes) -> None:
        """Replace the first len(prefix) (<= 127) payload bytes already written.

        finish() then returns the commP as if `prefix` had been written in the first
        place. Costs O(log n) hashes, whenever it is called.
        """
        prefix = bytes(prefix)
        if len(prefix) > 127:
            raise ValueError(f"replace_prefix: prefix is {len(prefix)} bytes; at most 127 can be replaced")
        if len(prefix) > self._total:
            raise ValueError(f"replace_prefix: prefix is {len(prefix)} bytes but only {self._total} were written")
        if self._first is None:  # still in the buffer
            self._buf[: len(prefix)] = prefix
        else:
            self._first[: len(prefix)] = prefix
            self._prefix_dirty = True

    # -- result --

    @property
    def payload_size(self) -> int:
        return self._total

    def finish(self) -> PieceInfo:
        """The piece info for everything written so far (the hasher is left as it was)."""
        total = self._total
        if total < MIN_PAYLOAD:
            raise _size_error(total)
        size = padded_size(total)
        height = size.bit_length() - 1 - 5
        if not self._stack:  # everything is in the buffer
            root = _commp.root(memoryview(self._buf)[: self._fill], height - 2)
            return _info(root, total)

        stack = list(self._stack)
        if self._prefix_dirty:
            bottom_height = stack[0][0]
            stack[0] = (bottom_height, self._left_path(self._first, bottom_height - 2))
        if self._fill:  # tail chunk, zero-padded: a full chunk-sized subtree
            stack.append((self._chunk_height, _commp.root(memoryview(self._buf)[: self._fill], self._k)))
        # Fold right to left; missing right siblings are zero subtrees.
        h, root = stack.pop()
        while stack or h < height:
            if stack and stack[-1][0] == h:
                root = _node(stack.pop()[1], root)
            else:
                root = _node(root, _ZERO[h])
            h += 1
        return _info(root, total)


def commp(data) -> PieceInfo:
    """commP of an in-memory payload."""
    h = CommP()
    h.write(data)
    return h.finish()


def commp_ranges(read: Callable[[int, int], bytes], size: int, name: str) -> PieceInfo:
    """commP of `size` bytes read as read(offset, length) in ~16 MiB blocks (a remote CAR, say)."""
    if not MIN_PAYLOAD <= size <= MAX_PAYLOAD:
        raise PieceSizeError(f"{name}: {_size_error(size)}")
    h = CommP()
    block = (127 << CHUNK_K) * READ_CHUNKS
    with ThreadPoolExecutor(1, thread_name_prefix="commp-read") as reader:
        # the next block is fetched while this one hashes
        pending = reader.submit(read, 0, min(block, size))
        offset = 0
        while offset < size:
            data = pending.result()
            if not data:
                raise PieceSizeError(f"{name}: ends at offset {offset}, before its size {size}")
            offset += len(data)
            if offset < size:
                pending = reader.submit(read, offset, min(block, size - offset))
            h.write(data)
    return h.finish()


def commp_file(path, progress: Callable[[int], object] | None = None) -> PieceInfo:
    """commP of a file, read in ~16 MiB blocks; progress(bytes_done) after each block."""
    path = os.fspath(path)
    size = os.stat(path).st_size
    if not MIN_PAYLOAD <= size <= MAX_PAYLOAD:
        raise PieceSizeError(f"{path}: {_size_error(size)}")
    h = CommP()
    block = (127 << CHUNK_K) * READ_CHUNKS  # a chunk multiple: writes stay aligned, no copies
    done = 0
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="commp-read") as reader:
        # Double buffering: the next block is read (GIL released) while this one hashes.
        bufs = [bytearray(block), bytearray(block)]
        pending = reader.submit(f.readinto, bufs[0])
        turn = 0
        while True:
            n = pending.result()
            if not n:
                break
            current = bufs[turn]
            turn ^= 1
            pending = reader.submit(f.readinto, bufs[turn])
            h.write(memoryview(current)[:n])
            done += n
            if progress is not None:
                progress(done)
    return h.finish()
