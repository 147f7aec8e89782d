"""OpenPGP streams that stock `gpg -d` (GnuPG 2.2 and 2.4) decrypts, regenerable by range.

Message layout (RFC 4880, RFC 6637), all of it a pure function of the
plaintext size F once the recipients are fixed:

    stream = PKESK v3 (one per recipient)            -- regenerated from the file's seed
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

Params blob (what `Encryptor.params()` returns and `open_stream` takes; version 3):

    0x03 | uvarint(plain_size) | recipients fingerprint (8) | wrapped seed (49 + R)
    | then either 0x01 (final)   | MDC SHA-1 (20) | all checkpoints (16 octets each)
    |          or 0x02 (partial) | uvarint(covered) | wrapped MDC state (37) | the checkpoints taken so far
    |          or 0x00 (partial) | uvarint(covered) | the checkpoints taken so far

    wrapped MDC state = secrets.wrap(dataset secret, SHA-1 chaining value (20, big-endian),
                                     "packerfs/openpgp/mdc-state/v1\0" || the octets up to and
                                     including the wrapped seed || uvarint(mark))

    wrapped seed = secrets.wrap(dataset secret, seed (32 random octets) || candidates (R),
                                WRAP_CONTEXT || the octets before it)
    candidates   = for each of the R RSA keys, in PKESK order, the index (u8) of
                   the PKCS#1 padding candidate its PKESK uses (see below)
    recipients fingerprint = SHA-256("packerfs/openpgp/recipients/v1\\0"
                                     || checkpoint_log2 u8 || chunk_log2 u8 || threshold u64
                                     || for each key, in PKESK order: its v4 fingerprint,
                                        algorithm and public parameters)[:8]

Final params of a stream shorter than 1 MiB are 80 octets with one cv25519
recipient and 81 with one RSA recipient (one octet more from a 128-byte
plaintext, two from 16 KiB, three from 2 MiB, ...), plus 16 octets per MiB of
stream for the checkpoints. The number of final checkpoints follows from the
layout; *covered* (partial only) is the number of stream octets returned so
far: partial params regenerate exactly [0, covered) and hold at least the
checkpoints for stream offsets below it; open_stream() on them serves any
range inside it and raises FormatError for a read that ends past it (the
ciphertext there may need checkpoints or the MDC that the blob lacks). All
blobs of one stream, partial or final, start with the same octets up to and
including the wrapped seed, and each holds a prefix of the final checkpoint
list, so they regenerate identical bytes. plain_size is recorded so a blob is
refused (FormatError) for any other size.

What is derived from the seed. Everything random in the stream:

    derive(label, n)  = HKDF-SHA256(ikm=seed, salt="", info="packerfs/openpgp/v3 " || label, length=n)
    session key       = derive("session key", 32)
    prefix            = r || r[14:16],  r = derive("prefix", 16)
    PKESK i's randomness = derive("pkesk " || u32be(i), 32): the cv25519
        ephemeral scalar, or the source of the RSA PKCS#1 v1.5 padding
        candidates (see packerfs.crypt.openpgp_keys)

so the PKESK packets are rebuilt, byte for byte, whenever a stream is opened
or resumed. An RSA PKESK uses the first padding candidate whose ciphertext has
the modulus' full bit length (so that the header has a fixed size). Finding it
takes 1/P RSA public operations on average, P = 1 - 2**(bits-1)/n, which is 2
to 9 for gpg's keys, at ~0.5 ms each for 4096 bits in Python; so new_file()
records the index it found next to the seed, inside the wrapped blob, and a
stream is rebuilt with one public operation per RSA key. The index is a
function of the seed (nothing new is stored in the clear) and is authenticated
with it. (A seed that needs an index above 255, which for gpg's keys happens
with probability below 1e-13, is simply redrawn.)

Only what depends on the plaintext is stored: the checkpoints and the MDC.
The layout options and the recipients are not stored but fingerprinted: a
cipher whose recipients (or their order) or options differ refuses the params
(UsageError) rather than regenerating other PKESKs or another layout.

Security. Deriving the session key, the prefix and all PKESK randomness from a
32-octet uniformly random seed drawn per file version (os.urandom, in
new_file()) is equivalent to drawing them directly: HKDF-SHA256 keyed with a
uniform 256-bit seed is a PRF, so its outputs under distinct info strings are
computationally indistinguishable from independent uniform strings, and the
RSA padding's rejection sampling over PRF output has the same distribution as
over true random draws. The seed exists at rest only wrapped under the dataset
secret (AES-SIV, packerfs.crypt.secrets); the index alone holds no session
key, prefix or seed. The MDC is SHA-1 over the secret prefix and the data, so
it gives no plaintext-guessing oracle; checkpoints are ciphertext that the
stream carries anyway.

Resuming (OpenPGPCipher.resume_file): the seed is unwrapped from any blob of
the file version, and session key, prefix and PKESKs are derived again. CFB
without resync over the same inner plaintext then yields the same ciphertext,
so the resumed stream, its checkpoints, MDC and final params are identical. The
resumed pass does not itself compare anything with the blob: a changed
plaintext is the caller's to notice, by checking the resumed bytes of the
sealed prefix against their recorded block digests.

Resuming in the middle (OpenPGPCipher.resume_at, what packerfs.pack.scan uses
to continue a split file at the end of its sealed leaves): CFB restarts at a
checkpoint, so only the rest is encrypted. The MDC is the hard part: it is a
SHA-1 over everything before it. Partial params therefore carry the SHA-1
*state* (chaining value) at the *mark* of checkpoint r = min(checkpoints
taken, covered >> checkpoint_log2), the last one whose stream offset has been
emitted: mark(r) = the last multiple of 64 inner octets at or before both
checkpoint r's CFB block and T - 20 (so the state holds no buffered
plaintext, and the message length is implied). resume_at(stream offset s)
restarts CFB at checkpoint k = min(s >> checkpoint_log2, checkpoints held),
continues the SHA-1 from the stored state if r <= k, hashing (without
encrypting) the at most 63 + (k - r) * 2**checkpoint_log2 inner octets from
the mark to the CFB block, and drops the stream octets before s. Without a
usable state (final params, params with state 0x00, or no libcrypto SHA1_* so
that hashlib is used: see packerfs.crypt.sha1state) it hashes the plaintext
from octet 0 instead, which reads the prefix but does not encrypt it. Either
way the output and the final params are those of an uninterrupted pass.

Why the state is wrapped: a chaining value taken after the secret prefix, next
to a later one (the MDC in final params, or a state from a later seal), lets
anyone holding both test guesses of the plaintext hashed in between. Under
AES-SIV it is no more than the seed is; its context binds it to the file
version (the wrapped seed) and to its mark, so a state moved to other params,
or params whose covered/checkpoints were altered, fail to open (FormatError).
AES-SIV is deterministic, which reveals only whether two wrapped states of one
file version at one mark are equal: the same plaintext hashed twice.

Decryption (unpack side) lives in packerfs.crypt.openpgp_decrypt (re-exported
here); the benchmark against gpg in tools/bench_openpgp.py.
"""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher as _AESCipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

try:  # cryptography >= 47 keeps CFB here; the old location goes away in 49
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from packerfs.crypt import sha1state as _sha1
from packerfs.crypt.base import Cipher, Encryptor, RandomAccess, ReadAt
from packerfs.crypt.openpgp_keys import PK_ECDH, EncryptionKey, keys_from_file, keys_from_keyring
from packerfs.crypt.openpgp_packets import MAX_DEFINITE, TAG_LITERAL, TAG_SEIPD, Framing
from packerfs.errors import FormatError, KeyProblem, SourceChanged, UsageError
from packerfs.ipld.cid import decode_uvarint, encode_uvarint

__all__ = [
    "OpenPGPCipher",
    "open_openpgp_plaintext",
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
SEED_SIZE = 32
FINGERPRINT_SIZE = 8
WRAP_CONTEXT = b"packerfs/openpgp/params/v3\0"
MIDSTATE_CONTEXT = b"packerfs/openpgp/mdc-state/v1\0"
MIDSTATE_WRAPPED = 1 + 16 + 20  # secrets.wrapped_size(20)
PARAMS_VERSION = 3
_DERIVE_INFO = b"packerfs/openpgp/v3 "
_RECIPIENTS_DOMAIN = b"packerfs/openpgp/recipients/v1\0"
_ZERO_IV = bytes(BLOCK)
_THREAD_MIN = 256 << 10  # encrypt pieces at least this big on a helper thread


class _CandidateOverflow(Exception):
    """An RSA padding candidate index does not fit its octet (new_file() draws another seed)."""


def _secrets():
    from packerfs.crypt import secrets

    return secrets


def _cfb(key: bytes, iv: bytes):
    return _AESCipher(algorithms.AES(key), CFB(iv)).encryptor()


def _derive(seed: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=_DERIVE_INFO + label).derive(seed)


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

    def data_before_inner(self, x: int) -> int:
        """Number of data octets at inner offsets < x."""
        return max(self.lit.body_before(x - PREFIX_LEN) - len(LITERAL_META), 0)

    # checkpoints
    def checkpoint_count(self, log2: int) -> int:
        return (self.S - 1) >> log2

    def checkpoint_block(self, k: int, log2: int) -> int:
        """CFB block index that starts regeneration from checkpoint k (k >= 1)."""
        return self.inner_before(k << log2) // BLOCK

    def hash_mark(self, k: int, log2: int) -> int:
        """Where the MDC's SHA-1 state for checkpoint k is taken: the last multiple of 64 inner octets
        at or before both the checkpoint's CFB block and the end of the hashed octets (T - 20)."""
        if k <= 0:
            return 0
        return min(self.checkpoint_block(k, log2) * BLOCK, self.T - 20) // _sha1.BLOCK * _sha1.BLOCK

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
    """A decoded params blob (version 3; see the module docstring)."""

    __slots__ = ("plain_size", "fingerprint", "wrapped", "final", "covered", "mdc", "checkpoints", "midstate")

    def __init__(self, plain_size: int, fingerprint: bytes, wrapped: bytes, *, final: bool,
                 covered: int | None = None, mdc: bytes | None = None, checkpoints: bytes = b"",
                 midstate: bytes | None = None):
        self.plain_size = plain_size
        self.fingerprint = fingerprint
        self.wrapped = wrapped
        self.final = final
        self.covered = covered  # partial params only
        self.mdc = mdc  # final params only
        self.checkpoints = checkpoints
        self.midstate = midstate  # partial params only, optional: the wrapped SHA-1 state (MIDSTATE_WRAPPED octets)

    def resumable(self, cp_log2: int) -> int:
        """The checkpoint whose MDC state a partial blob may carry: the last one taken at or below `covered`."""
        if self.final:
            return 0
        return min(len(self.checkpoints) // BLOCK, self.covered >> cp_log2)

    @staticmethod
    def midstate_context(fixed: bytes, mark: int) -> bytes:
        return MIDSTATE_CONTEXT + fixed + encode_uvarint(mark)

    @staticmethod
    def bound(plain_size: int, fingerprint: bytes) -> bytes:
        """The octets before the wrapped seed (the seed's wrap context, after WRAP_CONTEXT)."""
        return bytes([PARAMS_VERSION]) + encode_uvarint(plain_size) + fingerprint

    @staticmethod
    def peek(blob: bytes) -> tuple[int, bytes]:
        """-> (plain size, recipients fingerprint), which tell whether the rest can be decoded here."""
        try:
            if not blob or blob[0] != PARAMS_VERSION:
                raise ValueError("unknown packerfs version")
            plain_size, pos = decode_uvarint(blob, 1)
            fingerprint = blob[pos : pos + FINGERPRINT_SIZE]
            if len(fingerprint) != FINGERPRINT_SIZE:
                raise ValueError("truncated")
        except ValueError as e:
            raise FormatError(f"bad OpenPGP stream parameters ({e})") from None
        return plain_size, fingerprint

    @property
    def fixed(self) -> bytes:
        """The octets every blob of this file version starts with (up to and including the wrapped seed)."""
        return self.bound(self.plain_size, self.fingerprint) + self.wrapped

    @staticmethod
    def encode_tail(final: bool, covered: int, mdc: bytes | None, checkpoints: bytes,
                    midstate: bytes | None = None) -> bytes:
        if final:
            return b"\x01" + mdc + checkpoints
        if midstate is not None:
            return b"\x02" + encode_uvarint(covered) + midstate + checkpoints
        return b"\x00" + encode_uvarint(covered) + checkpoints

    def encode(self) -> bytes:
        return self.fixed + self.encode_tail(self.final, self.covered, self.mdc, self.checkpoints, self.midstate)

    @classmethod
    def decode(cls, blob: bytes, wrapped_len: int) -> "_Params":
        """Decode a blob whose wrapped seed is `wrapped_len` octets (the cipher knows: 49 + its RSA keys)."""
        wl = wrapped_len
        plain_size, fingerprint = cls.peek(blob)
        try:
            pos = len(cls.bound(plain_size, fingerprint))
            wrapped = blob[pos : pos + wl]
            pos += wl
            if len(wrapped) != wl or pos >= len(blob):
                raise ValueError("truncated")
            state = blob[pos]
            pos += 1
            covered = mdc = midstate = None
            if state == 1:
                mdc = blob[pos : pos + 20]
                if len(mdc) != 20:
                    raise ValueError("truncated")
                pos += 20
            elif state in (0, 2):
                covered, pos = decode_uvarint(blob, pos)
                if state == 2:
                    midstate = blob[pos : pos + MIDSTATE_WRAPPED]
                    if len(midstate) != MIDSTATE_WRAPPED:
                        raise ValueError("truncated")
                    pos += MIDSTATE_WRAPPED
            else:
                raise ValueError(f"state {state}")
            cps = blob[pos:]
            if len(cps) % BLOCK:
                raise ValueError("truncated checkpoint")
        except ValueError as e:
            raise FormatError(f"bad OpenPGP stream parameters ({e})") from None
        return cls(plain_size, fingerprint, wrapped, final=state == 1, covered=covered, mdc=mdc, checkpoints=cps,
                   midstate=midstate)


class _Start:
    """Where a resumed encryptor starts (see OpenPGPCipher.resume_at)."""

    __slots__ = ("k", "checkpoints", "state", "hash_pos", "stream_offset")

    def __init__(self, k: int, checkpoints: bytes, state: bytes | None, hash_pos: int, stream_offset: int):
        self.k = k  # CFB restarts at checkpoint k (0: the start of the stream)
        self.checkpoints = checkpoints  # checkpoints 1..k
        self.state = state  # SHA-1 state after `hash_pos` inner octets, or None (then hash_pos == 0)
        self.hash_pos = hash_pos
        self.stream_offset = stream_offset  # first stream octet returned


class _OpenPGPEncryptor(Encryptor):
    def __init__(self, layout: Layout, header: bytes, key: bytes, prefix: bytes, fixed: bytes, cp_log2: int,
                 dataset_secret: bytes, start: _Start | None = None):
        """`fixed`: the params' leading octets, up to and including the wrapped seed (see _Params.fixed).

        With `start`, the pass begins in the middle (OpenPGPCipher.resume_at): the MDC's SHA-1 continues
        from start.state at inner octet start.hash_pos (or starts at 0), CFB encryption restarts at
        checkpoint start.k, and no stream octet before start.stream_offset is returned."""
        self._L = layout
        self._header = header
        self._prefix = prefix
        self._fixed = fixed
        self._cp_log2 = cp_log2
        self._secret = dataset_secret
        self._K = layout.checkpoint_count(cp_log2)
        if start is None:
            start = _Start(0, b"", None, 0, 0)
        k = start.k
        j0 = layout.checkpoint_block(k, cp_log2) if k else 0
        iv = start.checkpoints[(k - 1) * BLOCK : k * BLOCK] if k else _ZERO_IV
        self._enc = _cfb(key, iv)
        self._ipos = j0 * BLOCK  # inner octets encrypted so far (CFB resumes at block j0)
        self._tail = bytes(iv) if j0 else b""  # last <= 16 ciphertext octets
        self._cps = bytearray(start.checkpoints[: k * BLOCK])
        self._next_k = k + 1
        self._opos = start.stream_offset  # stream octets returned so far (or skipped)
        # the MDC: SHA-1 over inner [0, T - 20); its state is saved at each checkpoint's hash mark
        self._hpos = start.hash_pos  # inner octets hashed (== built) so far; <= _ipos until CFB catches up
        if start.state is not None:
            self._sha = _sha1.Sha1.resume(start.state, start.hash_pos)
        else:
            assert start.hash_pos == 0
            self._sha = _sha1.new()
        self._exportable = isinstance(self._sha, _sha1.Sha1)
        self._states: dict[int, bytes] = {self._hpos: self._sha.state()} if self._exportable else {}
        self._mark_k = max(k, 1)  # next checkpoint whose hash mark may still be ahead
        self._data_pos = layout.data_before_inner(self._hpos)
        self._mdc: bytes | None = None
        self._params: bytes | None = None
        self._buf = bytearray()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def plaintext_offset(self) -> int:
        """The plaintext octet the first update() must start with (0 unless resumed)."""
        return self._data_pos if self._mdc is None else self._L.F

    def _drain(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _hash(self, data) -> None:
        """Add inner octets [_hpos, _hpos + len(data)) to the MDC, saving the state at every hash mark."""
        n = len(data)
        if not n:
            return
        if self._exportable:
            L, lo, end = self._L, self._hpos, self._hpos + n
            mv = memoryview(data)
            done = 0
            while self._mark_k <= self._K:
                m = L.hash_mark(self._mark_k, self._cp_log2)
                if m > end:
                    break
                if m > lo + done:
                    self._sha.update(mv[done : m - lo])
                    done = m - lo
                    self._states[m] = self._sha.state()
                self._mark_k += 1
            if done < n:
                self._sha.update(mv[done:])
        else:
            self._sha.update(data)
        self._hpos += n

    def _resumable(self) -> int:
        return min(len(self._cps) // BLOCK, self._opos >> self._cp_log2)

    def _prune(self) -> None:
        if len(self._states) > 2:
            keep = self._L.hash_mark(self._resumable(), self._cp_log2)
            for m in [m for m in self._states if m < keep]:
                del self._states[m]

    def _push(self, inner, hash_it: bool = True) -> bytes:
        need = len(inner) + BLOCK
        if len(self._buf) < need:
            self._buf = bytearray(need)
        if len(inner) >= _THREAD_MIN:
            # AES-CFB (which keeps the GIL) runs on a helper thread while this one
            # computes the MDC's SHA-1 (which drops the GIL): the two overlap.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packerfs-cfb")
            fut = self._pool.submit(self._enc.update_into, inner, self._buf)
            if hash_it:
                self._hash(inner)
            n = fut.result()
        else:
            if hash_it:
                self._hash(inner)
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
        if end <= self._opos:  # resumed, and not yet at the first octet to return
            return b""
        out = L.stream_bytes(self._opos, end, self._header, ct, c0)
        self._opos = end
        return out

    def _feed(self, inner) -> bytes:
        """Inner octets from _hpos on: hashed only below the CFB restart point, hashed and encrypted after."""
        a = self._hpos
        if a < self._ipos:
            h = min(len(inner), self._ipos - a)
            if h == len(inner):
                self._hash(inner)
                return b""
            inner = memoryview(inner)
            self._hash(inner[:h])
            inner = inner[h:]
        return self._push(inner)

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
            self._hpos,
            self._L.inner_after_data(x),
            self._prefix,
            lambda off, size: view[off - base : off - base + size],
            None,
        )
        self._data_pos = x
        out = self._feed(inner)
        self._prune()
        return out

    def finish(self) -> bytes:
        if self._mdc is not None:
            raise UsageError("OpenPGP encryptor: finish() called twice")
        L = self._L
        if self._data_pos != L.F:
            raise SourceChanged(f"plaintext ended at {self._data_pos} of the scanned {L.F} bytes")
        no_data = lambda off, size: b""  # noqa: E731 - all data has been consumed
        out = b""
        if self._hpos < L.T - 20:
            out = self._feed(L.inner_bytes(self._hpos, L.T - 20, self._prefix, no_data, None))
        self._drain()
        self._mdc = self._sha.digest()
        a = max(self._ipos, L.T - 20)  # past T - 20 only if CFB restarted inside the MDC packet
        out += self._push(L.inner_bytes(a, L.T, self._prefix, no_data, self._mdc), hash_it=False)
        assert self._opos == L.S and self._next_k == self._K + 1, (self._opos, L.S, self._next_k, self._K)
        self._params = self._fixed + _Params.encode_tail(True, L.S, self._mdc, bytes(self._cps))
        self._enc = None
        self._buf = bytearray()
        self._states = {}
        return out

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def params(self) -> bytes:
        """Final params after finish(); before it, partial params covering the stream octets returned so far.

        Partial params carry the MDC's SHA-1 state at the hash mark of checkpoint
        _Params.resumable(), wrapped under the dataset secret, whenever that state is known
        (the hash has passed the mark and the SHA-1 is exportable; see OpenPGPCipher.resume_at)."""
        if self._params is not None:
            return self._params
        r = self._resumable()
        midstate = None
        if r >= 1:
            mark = self._L.hash_mark(r, self._cp_log2)
            state = self._states.get(mark)
            if state is not None:
                midstate = _secrets().wrap(self._secret, state, _Params.midstate_context(self._fixed, mark))
        return self._fixed + _Params.encode_tail(False, self._opos, None, bytes(self._cps), midstate)


class _OpenPGPStream:
    """Random access to a regenerated OpenPGP stream (implements RandomAccess)."""

    def __init__(self, p: _Params, layout: Layout, header: bytes, key: bytes, prefix: bytes, cp_log2: int,
                 read_plain: ReadAt):
        self._p = p
        self._covered = layout.S if p.final else p.covered
        self._L = layout
        self._header = header
        self._key = key
        self._prefix = prefix
        self._cp_log2 = cp_log2
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
        k = a >> self._cp_log2
        if k == 0:
            j0, iv = 0, _ZERO_IV
        else:
            j0 = L.checkpoint_block(k, self._cp_log2)
            iv = self._p.checkpoints[(k - 1) * BLOCK : k * BLOCK]
        i0 = j0 * BLOCK
        ie = L.inner_before(c)
        ct = b""
        if ie > i0:
            inner = L.inner_bytes(i0, ie, self._prefix, self._read_plain, self._p.mdc)
            buf = bytearray(len(inner) + BLOCK)
            n = _cfb(self._key, iv).update_into(inner, buf)
            ct = memoryview(buf)[:n]
        return L.stream_bytes(a, c, self._header, ct, i0)


class OpenPGPCipher(Cipher):
    """OpenPGP (RFC 4880 SEIPD v1 + MDC) to one or more RSA / cv25519 recipients."""

    parts_need_previous = True  # the CFB chain and the MDC hash run through the whole message

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
        h = hashlib.sha256(_RECIPIENTS_DOMAIN)
        h.update(struct.pack(">BBQ", checkpoint_log2, partial_chunk_log2, partial_threshold))
        for k in self.keys:
            h.update(k.public_material())
        self._fingerprint = h.digest()[:FINGERPRINT_SIZE]
        self._n_rsa = sum(1 for k in self.keys if k.algo != PK_ECDH)
        self._wrapped_len = _secrets().wrapped_size(SEED_SIZE + self._n_rsa)

    @classmethod
    def from_keyring(cls, ids: list[str], homedir: str | None = None, **options) -> "OpenPGPCipher":
        return cls(keys_from_keyring(list(ids), homedir), **options)

    @classmethod
    def from_key_file(cls, path: str, **options) -> "OpenPGPCipher":
        return cls(keys_from_file(path), **options)

    @property
    def recipients(self) -> list[str]:
        return list(dict.fromkeys(k.primary_fpr for k in self.keys))

    @property
    def fingerprint(self) -> bytes:
        """8 octets of SHA-256 over the layout options and the keys, in order, as recorded in params."""
        return self._fingerprint

    def _layout(self, plain_size: int) -> Layout:
        return Layout(self._header_len, plain_size, self.partial_threshold, self.partial_chunk_log2)

    def stream_size(self, plain_size: int) -> int:
        return self._layout(plain_size).S

    def derive(self, seed: bytes, candidates: bytes | None = None) -> tuple[bytes, bytes, bytes, bytes]:
        """-> (session key, 18-octet prefix, PKESK header, RSA padding candidates) for this seed.

        With `candidates` None the RSA padding candidates are searched (new_file);
        else they are the octets stored with the seed, one per RSA key."""
        if len(seed) != SEED_SIZE:
            raise ValueError(f"the seed must be {SEED_SIZE} octets")
        session_key = _derive(seed, b"session key", SESSION_KEY_LEN)
        rnd = _derive(seed, b"prefix", BLOCK)
        given = iter(candidates) if candidates is not None else None
        packets, found = [], bytearray()
        for i, k in enumerate(self.keys):
            rand = _derive(seed, b"pkesk " + i.to_bytes(4, "big"), 32)
            rsa = k.algo != PK_ECDH
            pkt, j = k.pkesk(session_key, rand, next(given) if rsa and given is not None else None)
            packets.append(pkt)
            if rsa:
                if j > 255:
                    raise _CandidateOverflow
                found.append(j)
        header = b"".join(packets)
        if len(header) != self._header_len:  # stream_size() would be wrong; never expected
            raise RuntimeError("OpenPGP PKESK length is not a pure function of the recipients")
        return session_key, rnd + rnd[-2:], header, bytes(found)

    def new_file(self, plain_size: int, dataset_secret: bytes, seed: bytes | None = None) -> Encryptor:
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        given = seed
        while True:
            # a given seed that overflows is replaced by one derived from it, so the choice stays deterministic
            seed = os.urandom(SEED_SIZE) if given is None else given
            given = None if given is None else hashlib.sha256(b"packerfs next seed" + given).digest()
            try:
                key, prefix, header, candidates = self.derive(seed)
                break
            except _CandidateOverflow:  # p < 1e-11 per RSA key: draw another seed
                continue
        bound = _Params.bound(plain_size, self._fingerprint)
        wrapped = _secrets().wrap(dataset_secret, seed + candidates, WRAP_CONTEXT + bound)
        return _OpenPGPEncryptor(
            self._layout(plain_size), header, key, prefix, bound + wrapped, self.checkpoint_log2, dataset_secret
        )

    def unwrap_seed(self, p: _Params, dataset_secret: bytes) -> tuple[bytes, bytes]:
        """-> (seed, RSA padding candidates) in decoded params `p` (KeyProblem if they do not unwrap)."""
        secret = _secrets().unwrap(dataset_secret, p.wrapped, WRAP_CONTEXT + _Params.bound(p.plain_size, p.fingerprint))
        if len(secret) != SEED_SIZE + self._n_rsa:
            raise FormatError("OpenPGP stream parameters hold a wrapped seed of the wrong size")
        return secret[:SEED_SIZE], secret[SEED_SIZE:]

    def _rebuild(self, seed: bytes, candidates: bytes) -> tuple[bytes, bytes, bytes]:
        try:
            key, prefix, header, _ = self.derive(seed, candidates)
        except ValueError as e:  # a candidate that is not of full length: not made by new_file()
            raise FormatError(f"bad OpenPGP stream parameters ({e})") from None
        return key, prefix, header

    def _unpack(
        self, params: bytes, plain_size: int, dataset_secret: bytes
    ) -> tuple[_Params, Layout, bytes, bytes, bytes]:
        """Check `params` against `plain_size` and this cipher; unwrap the seed and rebuild from it:
        -> (params, layout, session key, prefix, PKESK header)."""
        recorded, fingerprint = _Params.peek(params)
        if recorded != plain_size:
            raise FormatError(
                f"OpenPGP stream parameters were made for a plaintext of {recorded} bytes, not {plain_size} "
                "(they belong to another version of the file)"
            )
        if fingerprint != self._fingerprint:
            raise UsageError(
                f"these OpenPGP stream parameters were made for other recipients or options (fingerprint "
                f"{fingerprint.hex()}, this pack's is {self._fingerprint.hex()}); were the recipients changed?"
            )
        p = _Params.decode(params, self._wrapped_len)
        layout = self._layout(plain_size)
        cp_log2 = self.checkpoint_log2
        full = layout.checkpoint_count(cp_log2)
        have = len(p.checkpoints) // BLOCK
        if p.final:
            if have != full:
                raise FormatError(
                    f"OpenPGP stream parameters do not fit a plaintext of {plain_size} bytes (checkpoint count)"
                )
        elif p.covered >= layout.S or have > full or have < (max(p.covered, 1) - 1) >> cp_log2:
            raise FormatError(f"partial OpenPGP stream parameters are inconsistent (they cover {p.covered} octets)")
        return (p, layout, *self._rebuild(*self.unwrap_seed(p, dataset_secret)))

    def open_stream(self, params: bytes, plain_size: int, read_plain: ReadAt, dataset_secret: bytes) -> RandomAccess:
        """Random access to the stream; with partial params, to the octets they cover (see `covered`).

        The PKESKs, session key and prefix are derived again from the seed."""
        p, layout, key, prefix, header = self._unpack(params, plain_size, dataset_secret)
        return _OpenPGPStream(p, layout, header, key, prefix, self.checkpoint_log2, read_plain)

    def resume_file(self, params: bytes, plain_size: int, dataset_secret: bytes) -> Encryptor:
        """The same pass again, from plaintext octet 0, with the seed in `params` (so the same PKESKs,
        session key and prefix). `params` must have been made for this cipher's recipients, in the
        same order, and its layout options (UsageError otherwise)."""
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        p, layout, key, prefix, header = self._unpack(params, plain_size, dataset_secret)
        return _OpenPGPEncryptor(layout, header, key, prefix, p.fixed, self.checkpoint_log2, dataset_secret)

    def resume_at(
        self, params: bytes, plain_size: int, dataset_secret: bytes, stream_offset: int
    ) -> tuple[Encryptor, int]:
        """Continue the pass at stream octet `stream_offset`: -> (encryptor, plaintext offset).

        CFB restarts at the last checkpoint at or before `stream_offset` that `params`
        hold, so only the plaintext from there on is encrypted (the octets of that
        interval before `stream_offset` are dropped). The MDC's SHA-1 continues from
        the state stored in partial params when it is at or before that point (at
        most 63 inner octets before the checkpoint's CFB block, so the plaintext
        offset returned is up to 63 octets earlier than the encryption needs);
        otherwise (final params, params without a state, or a libcrypto without
        SHA1_Init) it starts at plaintext octet 0 and the prefix is only hashed,
        not encrypted. Either way the returned stream octets and the final params
        are those of an uninterrupted pass over the same plaintext, provided the
        plaintext before the SHA-1 state is the one hashed when it was taken: that
        is the caller's to check (the state is authenticated, the plaintext is not).
        """
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        p, layout, key, prefix, header = self._unpack(params, plain_size, dataset_secret)
        if not 0 <= stream_offset <= layout.S:
            raise ValueError(f"stream offset {stream_offset} is outside the stream (0..{layout.S})")
        log2 = self.checkpoint_log2
        k = min(stream_offset >> log2, len(p.checkpoints) // BLOCK)
        state, hash_pos = None, 0
        r = p.resumable(log2)
        if p.midstate is not None and 1 <= r <= k and _sha1.available():
            mark = layout.hash_mark(r, log2)
            try:
                state = _secrets().unwrap(dataset_secret, p.midstate, _Params.midstate_context(p.fixed, mark))
            except KeyProblem:  # the seed opened with this secret: the blob was altered or damaged
                raise FormatError("OpenPGP stream parameters hold a damaged MDC state") from None
            if len(state) != _sha1.STATE_SIZE:
                raise FormatError("OpenPGP stream parameters hold an MDC state of the wrong size")
            hash_pos = mark
        start = _Start(k, p.checkpoints[: k * BLOCK], state, hash_pos, stream_offset)
        enc = _OpenPGPEncryptor(layout, header, key, prefix, p.fixed, log2, dataset_secret, start)
        return enc, enc.plaintext_offset


def __getattr__(name: str):
    # Lazy re-export, so importing the cipher does not load the decryptor.
    if name == "open_openpgp_plaintext":
        from packerfs.crypt.openpgp_decrypt import open_openpgp_plaintext

        return open_openpgp_plaintext
    raise AttributeError(name)
