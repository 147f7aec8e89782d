"""OpenPGP streams that stock `gpg -d` (GnuPG 2.2 and 2.4) decrypts, regenerable by range.

Message layout (RFC 4880, RFC 6637), all of it a pure function of the
plaintext size F once the recipients are fixed:

    stream = PKESK v3 (one per recipient)            -- drawn once per file, stored
             SEIPD (tag 18) header, version octet 1
             CFB-128 ciphertext of `inner`, AES-256, zero IV, no resync
    inner  = prefix: 16 random octets || their last two octets again
             Literal packet (tag 11): 'b', empty file name, date 0, then the F octets
             MDC packet: D3 14 || SHA-1(prefix || literal packet || D3 14)

Bodies longer than the partial threshold (default 2**32-1, the most a definite
length can state) use partial body lengths: chunks of 2**chunk_log2 octets
(default 2**30) and a final definite chunk of 1..2**chunk_log2 octets. The
SEIPD body (outside) and the Literal body (inside the ciphertext) are framed
independently; see `Framing`. RSA PKESKs have a fixed size because the PKCS#1
padding is redrawn until the ciphertext MPI has the modulus' bit length.

Random access. In CFB without resync, ciphertext block i is
P_i xor AES(C_{i-1}), so block i needs only the previous ciphertext block.
The encryptor stores one 16-octet *checkpoint* per CHECKPOINT interval of
the stream: for every k >= 1 with k*N < stream size, the ciphertext block
just before the CFB block that holds the first ciphertext octet at or after
stream offset k*N. With N = 1 MiB (the UnixFS leaf size) each leaf read
starts at a checkpoint and reads at most 15 extra plaintext octets; any other
range reads at most N extra. Cost: 16 octets per MiB in the index.

Params blob (what `Encryptor.params()` returns and `open_stream` takes; version 2):

    "PFOP" | version u8 (=2) | final u8 (1 = final, 0 = partial)
    | checkpoint_log2 u8 | chunk_log2 u8 | threshold u64
    | plain_size u64 | covered u64 (stream octets the blob can regenerate)
    | header_len u32 | header (the PKESK packets)
    | wrapped_len u16 | secrets.wrap(dataset secret, session key(32) || prefix(16),
                                      WRAP_CONTEXT || header)   (bound to its PKESKs)
    | mdc(20) | checkpoint count u32 | checkpoints (16 octets each)

*Final* params (after finish()): final = 1, covered = the stream size, the
MDC's SHA-1, and all checkpoints. *Partial* params (params() before finish()):
final = 0, covered = the stream octets returned so far, 20 zero octets in
place of the MDC (it is not known yet), and the checkpoints taken so far,
which are at least all those for stream offsets below `covered`. Partial params
regenerate exactly [0, covered); open_stream() on them serves any range inside
it and raises FormatError for a read that ends past it (the ciphertext there may
need checkpoints or the MDC that the blob lacks). All blobs of one stream, partial
or final, hold the same header and the same wrapped bytes, and each holds a
prefix of the final checkpoint list, so they regenerate identical bytes.
plain_size is recorded so a blob is refused (FormatError) for any other size.

Version 1 blobs (made before partial params existed: no `final`, `plain_size`
or `covered` fields, always final) are still read, and a stream resumed from
one ends with the same version 1 blob.

Resuming (OpenPGPCipher.resume_file): the session key and prefix are unwrapped
from any blob; header, wrapped secret and layout options are copied from it.
CFB without resync over the same inner plaintext then yields the same
ciphertext, so the resumed stream, its checkpoints, MDC and final params are
identical. The resumed pass does not itself compare anything with the blob:
a changed plaintext is the caller's to notice, by checking the resumed bytes of
the sealed prefix against their recorded block digests (packerfs.pack.scan
does, and starts a new file version on a mismatch).

The session key and the random prefix exist at rest only wrapped under the
dataset secret; the MDC is SHA-1 over the secret prefix and the data, so it
gives no plaintext-guessing oracle; checkpoints and PKESKs are ciphertext that
the stream carries anyway.

Decryption (unpack side) lives in packerfs.crypt.openpgp_decrypt; the
benchmark in packerfs.crypt.openpgp_bench. Both are re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives.ciphers import Cipher as _AESCipher
from cryptography.hazmat.primitives.ciphers import algorithms

try:  # cryptography >= 47 keeps CFB here; the old location goes away in 49
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from packerfs.crypt.base import Cipher, Encryptor, RandomAccess, ReadAt
from packerfs.crypt.openpgp_keys import EncryptionKey, keys_from_file, keys_from_keyring
from packerfs.crypt.openpgp_packets import MAX_DEFINITE, TAG_LITERAL, TAG_SEIPD, Framing
from packerfs.errors import FormatError, SourceChanged, UsageError

__all__ = [
    "OpenPGPCipher",
    "open_openpgp_plaintext",
    "bench",
    "CHECKPOINT_LOG2",
    "PARTIAL_THRESHOLD",
    "PARTIAL_CHUNK_LOG2",
]

CHECKPOINT_LOG2 = 20  # one 16-octet checkpoint per MiB of stream
PARTIAL_THRESHOLD = MAX_DEFINITE  # bodies longer than this use partial lengths
PARTIAL_CHUNK_LOG2 = 30  # partial chunks of 1 GiB (the largest RFC 4880 allows)

BLOCK = 16
PREFIX_LEN = BLOCK + 2
MDC_LEN = 22  # D3 14 + SHA-1
LITERAL_META = b"b\x00\x00\x00\x00\x00"  # binary, empty file name, date 0
SESSION_KEY_LEN = 32
WRAP_CONTEXT = b"packerfs/openpgp/v1 session key+prefix"
MAGIC = b"PFOP"
PARAMS_VERSION = 2  # version 1 (final params only, no plain size) is still read
_NO_MDC = bytes(20)  # stands in for the MDC in partial params
_ZERO_IV = bytes(BLOCK)
_THREAD_MIN = 256 << 10  # encrypt pieces at least this big on a helper thread


def _secrets():
    from packerfs.crypt import secrets

    return secrets


def _cfb(key: bytes, iv: bytes):
    return _AESCipher(algorithms.AES(key), CFB(iv)).encryptor()


class Layout:
    """Where everything of one stream lies; a pure function of its arguments.

    Offsets: *stream* (the stored bytes), *inner* (the CFB plaintext/ciphertext,
    inner octet x is SEIPD body octet x+1), *data* (the file's plaintext).
    """

    def __init__(self, header_len: int, plain_size: int, threshold: int, chunk_log2: int):
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        self.H = header_len
        self.F = plain_size
        self.lit = Framing(TAG_LITERAL, len(LITERAL_META) + plain_size, threshold, chunk_log2)
        self.T = PREFIX_LEN + self.lit.size + MDC_LEN
        self.seipd = Framing(TAG_SEIPD, 1 + self.T, threshold, chunk_log2)
        self.S = header_len + self.seipd.size

    # stream <-> inner
    def inner_before(self, s: int) -> int:
        """Number of inner octets at stream offsets < s."""
        return max(self.seipd.body_before(s - self.H) - 1, 0)

    def stream_after_inner(self, x: int) -> int:
        """Stream offset just past inner octet x-1 (x >= 1)."""
        return self.H + self.seipd.body_pos(x) + 1

    def inner_after_data(self, x: int) -> int:
        """Inner offset just past data octet x-1 (x >= 1)."""
        return PREFIX_LEN + self.lit.body_pos(len(LITERAL_META) + x - 1) + 1

    # checkpoints
    def checkpoint_count(self, log2: int) -> int:
        return (self.S - 1) >> log2

    def checkpoint_block(self, k: int, log2: int) -> int:
        """CFB block index that starts regeneration from checkpoint k (k >= 1)."""
        return self.inner_before(k << log2) // BLOCK

    def inner_bytes(self, a: int, c: int, prefix: bytes, read_data, mdc: bytes | None) -> bytes | memoryview:
        """Inner plaintext [a, c); data via read_data(offset, size) in one call.

        When [a, c) is data only, the result is a view of what read_data returned."""
        out: list = []
        if a < PREFIX_LEN:
            out.append(prefix[a : min(c, PREFIX_LEN)])
        lit_end = PREFIX_LEN + self.lit.size
        if a < lit_end and c > PREFIX_LEN:
            meta = len(LITERAL_META)
            d0 = d1 = None
            parts: list = []
            for hdr, b, n in self.lit.pieces(a - PREFIX_LEN, c - PREFIX_LEN):
                if hdr is not None:
                    parts.append(hdr)
                    continue
                if b < meta:
                    m = min(n, meta - b)
                    parts.append(LITERAL_META[b : b + m])
                    b, n = b + m, n - m
                if n:
                    if d0 is None:
                        d0 = b - meta
                    d1 = b - meta + n
                    parts.append((b - meta, n))
            if d0 is not None:
                data = read_data(d0, d1 - d0)
                if len(data) != d1 - d0:
                    raise SourceChanged(f"plaintext read at {d0} returned {len(data)} of {d1 - d0} bytes")
                mv = memoryview(data)
                parts = [p if isinstance(p, bytes) else mv[p[0] - d0 : p[0] - d0 + p[1]] for p in parts]
            out.extend(parts)
        if c > lit_end:
            tail = b"\xd3\x14" + (mdc if mdc is not None else b"")
            out.append(tail[max(a - lit_end, 0) : c - lit_end])
        res = out[0] if len(out) == 1 else b"".join(out)  # a lone data view is not copied
        assert len(res) == c - a, (a, c, len(res))
        return res

    def stream_bytes(self, a: int, c: int, header: bytes, ct: bytes, ct_start: int) -> bytes:
        """Stream [a, c) from the PKESK header and ciphertext ct (inner offsets from ct_start)."""
        out: list = []
        if a < self.H:
            out.append(header[a : min(c, self.H)])
        mv = memoryview(ct)
        for hdr, b, n in self.seipd.pieces(a - self.H, c - self.H):
            if hdr is not None:
                out.append(hdr)
                continue
            if b == 0:  # version octet
                out.append(b"\x01")
                b, n = 1, n - 1
            if n:
                x = b - 1 - ct_start
                out.append(mv[x : x + n])
        res = b"".join(out)
        assert len(res) == c - a, (a, c, len(res))
        return res


class _Params:
    __slots__ = ("version", "final", "checkpoint_log2", "chunk_log2", "threshold", "plain_size", "covered",
                 "header", "wrapped", "mdc", "checkpoints")

    def __init__(self, checkpoint_log2, chunk_log2, threshold, header, wrapped, mdc, checkpoints, *,
                 plain_size=None, covered=None, final=True, version=PARAMS_VERSION):
        self.version = version
        self.final = final
        self.checkpoint_log2 = checkpoint_log2
        self.chunk_log2 = chunk_log2
        self.threshold = threshold
        self.plain_size = plain_size  # None: a version 1 blob (not recorded)
        self.covered = covered  # None: a version 1 blob (the whole stream)
        self.header = header
        self.wrapped = wrapped
        self.mdc = mdc
        self.checkpoints = checkpoints

    def encode(self) -> bytes:
        if self.version == 1:
            assert self.final
            head = [struct.pack(">BBBQ", 1, self.checkpoint_log2, self.chunk_log2, self.threshold)]
        else:
            head = [
                struct.pack(
                    ">BBBBQQQ", PARAMS_VERSION, 1 if self.final else 0, self.checkpoint_log2, self.chunk_log2,
                    self.threshold, self.plain_size, self.covered,
                )
            ]
        return b"".join(
            [
                MAGIC,
                *head,
                struct.pack(">I", len(self.header)),
                self.header,
                struct.pack(">H", len(self.wrapped)),
                self.wrapped,
                self.mdc,
                struct.pack(">I", len(self.checkpoints) // BLOCK),
                bytes(self.checkpoints),
            ]
        )

    @classmethod
    def decode(cls, blob: bytes) -> "_Params":
        try:
            if blob[:4] != MAGIC:
                raise ValueError("bad magic")
            version = blob[4] if len(blob) > 4 else None
            if version == 1:
                _, cl, ch, thr = struct.unpack_from(">BBBQ", blob, 4)
                final, plain_size, covered = 1, None, None
                pos = 4 + 11
            elif version == PARAMS_VERSION:
                _, final, cl, ch, thr, plain_size, covered = struct.unpack_from(">BBBBQQQ", blob, 4)
                if final not in (0, 1):
                    raise ValueError(f"final flag {final}")
                pos = 4 + 28
            else:
                raise ValueError(f"version {version}")
            (hl,) = struct.unpack_from(">I", blob, pos)
            header = blob[pos + 4 : pos + 4 + hl]
            pos += 4 + hl
            (wl,) = struct.unpack_from(">H", blob, pos)
            wrapped = blob[pos + 2 : pos + 2 + wl]
            pos += 2 + wl
            mdc = blob[pos : pos + 20]
            pos += 20
            (count,) = struct.unpack_from(">I", blob, pos)
            pos += 4
            cps = blob[pos:]
            if len(header) != hl or len(wrapped) != wl or len(mdc) != 20 or len(cps) != count * BLOCK:
                raise ValueError("truncated")
        except (ValueError, struct.error, IndexError) as e:
            raise FormatError(f"bad OpenPGP stream parameters ({e})") from None
        return cls(cl, ch, thr, header, wrapped, mdc, cps, plain_size=plain_size, covered=covered,
                   final=bool(final), version=version)


class _OpenPGPEncryptor(Encryptor):
    def __init__(self, layout: Layout, header: bytes, key: bytes, prefix: bytes, wrapped: bytes, cp_log2: int,
                 chunk_log2: int, threshold: int, resumed: _Params | None = None):
        self._L = layout
        self._header = header
        self._prefix = prefix
        self._wrapped = wrapped
        self._cp_log2 = cp_log2
        self._chunk_log2 = chunk_log2
        self._threshold = threshold
        self._enc = _cfb(key, _ZERO_IV)
        self._sha = hashlib.sha1()
        self._data_pos = 0
        self._ipos = 0  # inner octets encrypted so far
        self._opos = 0  # stream octets returned so far
        self._tail = b""  # last <= 16 ciphertext octets
        self._cps = bytearray()
        self._next_k = 1
        self._K = layout.checkpoint_count(cp_log2)
        self._mdc: bytes | None = None
        self._params: bytes | None = None
        self._buf = bytearray()
        self._pool: ThreadPoolExecutor | None = None
        # A pass resumed from version 1 final params ends with the same version 1 blob.
        self._final_version = resumed.version if resumed is not None and resumed.final else PARAMS_VERSION

    def _drain(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _push(self, inner: bytes, hash_it: bool = True) -> bytes:
        need = len(inner) + BLOCK
        if len(self._buf) < need:
            self._buf = bytearray(need)
        if len(inner) >= _THREAD_MIN:
            # AES-CFB (which keeps the GIL) runs on a helper thread while this one
            # computes the MDC's SHA-1 (hashlib drops the GIL): the two overlap.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packerfs-cfb")
            fut = self._pool.submit(self._enc.update_into, inner, self._buf)
            if hash_it:
                self._sha.update(inner)
            n = fut.result()
        else:
            if hash_it:
                self._sha.update(inner)
            n = self._enc.update_into(inner, self._buf)
        ct = memoryview(self._buf)[:n]
        c0, c1 = self._ipos, self._ipos + len(ct)
        L = self._L
        while self._next_k <= self._K:
            j0 = L.checkpoint_block(self._next_k, self._cp_log2)
            if j0 == 0:
                self._cps += _ZERO_IV
            else:
                t = (j0 - 1) * BLOCK
                if t + BLOCK > c1:
                    break
                if t >= c0:
                    self._cps += ct[t - c0 : t - c0 + BLOCK]
                else:
                    buf = self._tail + bytes(ct[:BLOCK])
                    s = t - (c0 - len(self._tail))
                    self._cps += buf[s : s + BLOCK]
            self._next_k += 1
        self._tail = (self._tail + bytes(ct[-BLOCK:]))[-BLOCK:]
        self._ipos = c1
        end = L.stream_after_inner(c1) if c1 else 0
        out = L.stream_bytes(self._opos, end, self._header, ct, c0)
        self._opos = end
        return out

    def update(self, plaintext: bytes) -> bytes:
        if self._mdc is not None:
            raise UsageError("OpenPGP encryptor: update() after finish()")
        n = len(plaintext)
        if not n:
            return b""
        if self._data_pos + n > self._L.F:
            raise SourceChanged(f"plaintext is longer than the scanned {self._L.F} bytes")
        x = self._data_pos + n
        base = self._data_pos
        view = memoryview(plaintext)  # slices without copying
        inner = self._L.inner_bytes(
            self._ipos,
            self._L.inner_after_data(x),
            self._prefix,
            lambda off, size: view[off - base : off - base + size],
            None,
        )
        self._data_pos = x
        return self._push(inner)

    def finish(self) -> bytes:
        if self._mdc is not None:
            raise UsageError("OpenPGP encryptor: finish() called twice")
        L = self._L
        if self._data_pos != L.F:
            raise SourceChanged(f"plaintext ended at {self._data_pos} of the scanned {L.F} bytes")
        no_data = lambda off, size: b""  # noqa: E731 - all data has been consumed
        out = self._push(L.inner_bytes(self._ipos, L.T - 20, self._prefix, no_data, None))
        self._drain()
        self._mdc = self._sha.digest()
        out += self._push(L.inner_bytes(L.T - 20, L.T, self._prefix, no_data, self._mdc), hash_it=False)
        assert self._opos == L.S and self._next_k == self._K + 1, (self._opos, L.S, self._next_k, self._K)
        self._params = _Params(
            self._cp_log2, self._chunk_log2, self._threshold, self._header, self._wrapped, self._mdc,
            bytes(self._cps), plain_size=L.F, covered=L.S, final=True, version=self._final_version,
        ).encode()
        self._enc = None
        self._buf = bytearray()
        return out

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def params(self) -> bytes:
        """Final params after finish(); before it, partial params covering the stream octets returned so far."""
        if self._params is not None:
            return self._params
        return _Params(
            self._cp_log2, self._chunk_log2, self._threshold, self._header, self._wrapped, _NO_MDC,
            bytes(self._cps), plain_size=self._L.F, covered=self._opos, final=False,
        ).encode()


class _OpenPGPStream:
    """Random access to a regenerated OpenPGP stream (implements RandomAccess)."""

    def __init__(self, p: _Params, layout: Layout, key: bytes, prefix: bytes, read_plain: ReadAt):
        self._p = p
        self._covered = layout.S if p.final else p.covered
        self._L = layout
        self._key = key
        self._prefix = prefix
        self._read_plain = read_plain

    @property
    def size(self) -> int:
        return self._L.S

    @property
    def covered(self) -> int:
        """Stream octets [0, covered) can be read: all of them unless the params were partial."""
        return self._covered

    def read(self, offset: int, size: int) -> bytes:
        L = self._L
        a = max(offset, 0)
        c = min(offset + max(size, 0), L.S)
        if a >= c:
            return b""
        if c > self._covered:
            raise FormatError(
                f"partial OpenPGP stream parameters cover the first {self._covered} of {L.S} stream octets; "
                f"cannot regenerate [{a}, {c})"
            )
        k = a >> self._p.checkpoint_log2
        if k == 0:
            j0, iv = 0, _ZERO_IV
        else:
            j0 = L.checkpoint_block(k, self._p.checkpoint_log2)
            iv = self._p.checkpoints[(k - 1) * BLOCK : k * BLOCK]
        i0 = j0 * BLOCK
        ie = L.inner_before(c)
        ct = b""
        if ie > i0:
            inner = L.inner_bytes(i0, ie, self._prefix, self._read_plain, self._p.mdc)
            buf = bytearray(len(inner) + BLOCK)
            n = _cfb(self._key, iv).update_into(inner, buf)
            ct = memoryview(buf)[:n]
        return L.stream_bytes(a, c, self._p.header, ct, i0)


class OpenPGPCipher(Cipher):
    """OpenPGP (RFC 4880 SEIPD v1 + MDC) to one or more RSA / cv25519 recipients."""

    name = "openpgp"
    suffix = ".gpg"

    def __init__(
        self,
        keys: list[EncryptionKey],
        *,
        partial_threshold: int = PARTIAL_THRESHOLD,
        partial_chunk_log2: int = PARTIAL_CHUNK_LOG2,
        checkpoint_log2: int = CHECKPOINT_LOG2,
    ):
        if not keys:
            raise UsageError("OpenPGP cipher needs at least one recipient key")
        if not 4 <= checkpoint_log2 <= 40:
            raise UsageError("checkpoint interval must be 2**4 .. 2**40 bytes")
        # Validates chunk/threshold ranges.
        Framing(TAG_LITERAL, 0, partial_threshold, partial_chunk_log2)
        self.keys = list(keys)
        self.partial_threshold = partial_threshold
        self.partial_chunk_log2 = partial_chunk_log2
        self.checkpoint_log2 = checkpoint_log2
        self._header_len = sum(k.pkesk_len() for k in self.keys)

    @classmethod
    def from_keyring(cls, ids: list[str], homedir: str | None = None, **options) -> "OpenPGPCipher":
        return cls(keys_from_keyring(list(ids), homedir), **options)

    @classmethod
    def from_key_file(cls, path: str, **options) -> "OpenPGPCipher":
        return cls(keys_from_file(path), **options)

    @property
    def recipients(self) -> list[str]:
        return list(dict.fromkeys(k.primary_fpr for k in self.keys))

    def _layout(self, plain_size: int, threshold: int | None = None, chunk_log2: int | None = None,
                header_len: int | None = None) -> Layout:
        return Layout(
            self._header_len if header_len is None else header_len,
            plain_size,
            self.partial_threshold if threshold is None else threshold,
            self.partial_chunk_log2 if chunk_log2 is None else chunk_log2,
        )

    def stream_size(self, plain_size: int) -> int:
        return self._layout(plain_size).S

    def new_file(self, plain_size: int, dataset_secret: bytes) -> Encryptor:
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        session_key = os.urandom(SESSION_KEY_LEN)
        rnd = os.urandom(BLOCK)
        prefix = rnd + rnd[-2:]
        header = b"".join(k.pkesk(session_key) for k in self.keys)
        assert len(header) == self._header_len
        wrapped = _secrets().wrap(dataset_secret, session_key + rnd, WRAP_CONTEXT + header)
        return _OpenPGPEncryptor(
            self._layout(plain_size), header, session_key, prefix, wrapped, self.checkpoint_log2,
            self.partial_chunk_log2, self.partial_threshold,
        )

    def _unpack(self, params: bytes, plain_size: int, dataset_secret: bytes) -> tuple[_Params, Layout, bytes, bytes]:
        """Check `params` against `plain_size` and unwrap: -> (params, layout, session key, prefix)."""
        p = _Params.decode(params)
        if p.plain_size is not None and p.plain_size != plain_size:
            raise FormatError(
                f"OpenPGP stream parameters were made for a plaintext of {p.plain_size} bytes, not {plain_size} "
                "(they belong to another version of the file)"
            )
        try:
            layout = self._layout(plain_size, p.threshold, p.chunk_log2, len(p.header))
        except ValueError as e:
            raise FormatError(f"bad OpenPGP stream parameters ({e})") from None
        if not 4 <= p.checkpoint_log2 <= 40:
            raise FormatError(f"bad OpenPGP stream parameters (checkpoint interval 2**{p.checkpoint_log2})")
        full = layout.checkpoint_count(p.checkpoint_log2)
        have = len(p.checkpoints) // BLOCK
        if p.final:
            if have != full or (p.covered is not None and p.covered != layout.S):
                raise FormatError(
                    f"OpenPGP stream parameters do not fit a plaintext of {plain_size} bytes (checkpoint count)"
                )
        elif p.covered >= layout.S or have > full or have < (max(p.covered, 1) - 1) >> p.checkpoint_log2:
            raise FormatError(f"partial OpenPGP stream parameters are inconsistent (they cover {p.covered} octets)")
        secret = _secrets().unwrap(dataset_secret, p.wrapped, WRAP_CONTEXT + p.header)
        if len(secret) != SESSION_KEY_LEN + BLOCK:
            raise FormatError("OpenPGP stream parameters hold a wrapped secret of the wrong size")
        key, rnd = secret[:SESSION_KEY_LEN], secret[SESSION_KEY_LEN:]
        return p, layout, key, rnd + rnd[-2:]

    def open_stream(self, params: bytes, plain_size: int, read_plain: ReadAt, dataset_secret: bytes) -> RandomAccess:
        """Random access to the stream; with partial params, to the octets they cover (see `covered`)."""
        p, layout, key, prefix = self._unpack(params, plain_size, dataset_secret)
        return _OpenPGPStream(p, layout, key, prefix, read_plain)

    def resume_file(self, params: bytes, plain_size: int, dataset_secret: bytes) -> Encryptor:
        """The same pass again, from plaintext octet 0, with the session key, prefix and PKESKs in `params`.

        Layout options (checkpoint interval, partial-length threshold and chunk)
        come from `params`, not from this cipher, so the bytes are the same; the
        resulting stream must still be stream_size(plain_size) long, i.e. the
        recipients and options must give the same sizes (else UsageError).
        """
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        p, layout, key, prefix = self._unpack(params, plain_size, dataset_secret)
        if layout.S != self.stream_size(plain_size):
            raise UsageError(
                f"cannot resume this file: its stored OpenPGP stream is {layout.S} bytes, but this pack's "
                f"recipients and options make {self.stream_size(plain_size)} (were the recipients changed?)"
            )
        return _OpenPGPEncryptor(
            layout, p.header, key, prefix, p.wrapped, p.checkpoint_log2, p.chunk_log2, p.threshold, resumed=p
        )


def __getattr__(name: str):
    # Lazy re-exports, so importing the cipher does not load the decryptor/bench code.
    if name == "open_openpgp_plaintext":
        from packerfs.crypt.openpgp_decrypt import open_openpgp_plaintext

        return open_openpgp_plaintext
    if name == "bench":
        from packerfs.crypt.openpgp_bench import bench

        return bench
    raise AttributeError(name)
