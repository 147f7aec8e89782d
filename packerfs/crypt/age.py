"""age-encryption.org/v1 streams: seekable encryption, and random-access decryption.

This module is the payload stream (STREAM ChaCha20-Poly1305 chunks: AgeEncryptor,
the random-access AgeStream and AgePlaintext, resume_at) and the AgeCipher that ties
the other age modules together; it re-exports their public names, so callers import
everything from here:

    age_recipients   parsing recipients, wrapping the file key into stanzas
    age_identities   loading identities and private keys, unwrapping stanzas
    age_header       the header: stanzas, encode, parse, MAC
    age_primitives   base64, HKDF, X25519, stanza AEAD, SSH wire format, key-file reads

Written from the age specification (c2sp.org/age) and the documented ssh-rsa /
ssh-ed25519 recipient types of the reference implementation; the primitives
come from the `cryptography` package.

File layout::

    header  = "age-encryption.org/v1\\n" stanza+ "--- " base64(MAC) "\\n"
    payload = nonce (16 bytes) || chunk_0 || ... || chunk_{n-1}
    chunk_i = ChaCha20-Poly1305(payload key, i as 11-byte big endian || last flag,
                                plaintext[i*64KiB : (i+1)*64KiB])

Every chunk is independent, so any byte range of the stream can be produced by
encrypting only the chunks it touches, and any plaintext range can be
recovered (and authenticated) by decrypting only those chunks.

Params blob (what the index stores per file version; version 3)::

    0x03 || uvarint(plain size) || recipients fingerprint (8) || wrapped seed (49)
    wrapped seed = secrets.wrap(dataset secret, seed (32 random octets),
                                context = "packerfs/age/params/v3\\0" || the octets before it)
    recipients fingerprint = SHA-256("packerfs/age/recipients/v1\\0" ||
                                     for each recipient, in header order:
                                     uvarint(len(type)) || type || uvarint(len(key)) || key)[:8]
                             (key: the 32-octet X25519 public key, or the SSH wire public key)

59 octets for a file under 128 bytes, 61 under 2 MiB, 63 under 32 GiB,
whatever the recipients (one RSA-4096 recipient's stanza alone is ~700 octets
of header, which is regenerated, not stored).

The header is regenerated, deterministically, every time a stream is opened
or resumed: everything random in it and in the payload comes from the seed,

    derive(label, n) = HKDF-SHA256(ikm=seed, salt="", info="packerfs/age/v3 " || label, length=n)
    file key         = derive("file key", 16)
    payload nonce    = derive("payload nonce", 16)
    stanza i's randomness r_i = derive("stanza " || u32be(i), 32):
      X25519:      the ephemeral scalar
      ssh-ed25519: the ephemeral scalar
      ssh-rsa:     the OAEP seed (RSAES-OAEP, SHA-256, MGF1-SHA-256, label
                   "age-encryption.org/v1/ssh-rsa"; encoded here, see
                   rsa_oaep_sha256_encrypt() in age_recipients, since `cryptography` draws its own)

followed by the header MAC as the spec defines it. The same seed and the same
recipients, in the same order, give the same header, byte for byte. Params are
bound to their recipients by the fingerprint: open_stream() and resume_file()
refuse params made for another recipient list (UsageError) instead of quietly
regenerating a different header, and a plaintext size other than the recorded
one (FormatError). A changed fingerprint or size field also fails the wrap's
authentication (KeyProblem), since both are in its context.

Security. Deriving the file key, nonce and every stanza's randomness from a
32-octet uniformly random seed drawn per file version (os.urandom, in
new_file()) is equivalent to drawing each of them directly: HKDF-SHA256 with a
uniform 256-bit key is a PRF, so its outputs under distinct info strings are
computationally indistinguishable from independent uniform strings of those
lengths, and a distinguisher against the derived values would be one against
HMAC-SHA256. The seed exists at rest only wrapped under the dataset secret
(AES-SIV, packerfs.crypt.secrets); the index alone holds no file key, payload
key, nonce, ephemeral scalar or seed, only the wrapped seed, the plaintext
size and a fingerprint of public keys.

Everything in the params is fixed before the first stream byte, so
AgeEncryptor.params() returns the same blob at any time, and that blob (partial
or final alike) regenerates the whole stream. AgeCipher.resume_file() unwraps
the seed and re-derives the same header, key and nonce, so a resumed pass over
the same plaintext yields identical stream bytes and the identical params blob.
AgeCipher.resume_at() does the same from any stream offset, starting at the
STREAM chunk that holds it: nothing before that chunk is read or encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from packerfs.crypt import secrets as _secrets
from packerfs.crypt.age_header import FILE_KEY_SIZE, Header, _header_mac, build_header, read_header
from packerfs.crypt.age_identities import (
    Identity,
    SshEd25519Identity,
    SshRsaIdentity,
    X25519Identity,
    load_identity_file,
    parse_identities,
)
from packerfs.crypt.age_primitives import _hkdf, _hkdf_expand, _hkdf_prk
from packerfs.crypt.age_recipients import (
    Recipient,
    SshEd25519Recipient,
    SshRsaRecipient,
    X25519Recipient,
    parse_recipient,
    parse_recipients_text,
    read_recipients_file,
    rsa_oaep_sha256_encrypt,
)
from packerfs.crypt.base import Cipher, Encryptor, RandomAccess, ReadAt, range_end
from packerfs.errors import FormatError, KeyProblem, SourceChanged, UsageError
from packerfs.ipld.cid import decode_uvarint, encode_uvarint

__all__ = [
    "CHUNK_SIZE",
    "ENC_CHUNK_SIZE",
    "AgeCipher",
    "AgePlaintext",
    "Identity",
    "Recipient",
    "X25519Recipient",
    "SshRsaRecipient",
    "SshEd25519Recipient",
    "X25519Identity",
    "SshRsaIdentity",
    "SshEd25519Identity",
    "parse_recipient",
    "parse_recipients_text",
    "read_recipients_file",
    "parse_identities",
    "load_identity_file",
    "open_age_plaintext",
    "payload_chunks",
    "rsa_oaep_sha256_encrypt",
    "FileSecrets",
    "Params",
]


CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
ENC_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
NONCE_SIZE = 16
SEED_SIZE = 32
FINGERPRINT_SIZE = 8
_PARAMS_VERSION = 3
_PARAMS_CONTEXT = b"packerfs/age/params/v3\x00"
_DERIVE_INFO = b"packerfs/age/v3 "
_RECIPIENTS_DOMAIN = b"packerfs/age/recipients/v1\x00"
_WRAPPED_SIZE = _secrets.wrapped_size(SEED_SIZE)


# --------------------------------------------------------------------------- helpers


def payload_key(file_key: bytes, nonce: bytes) -> bytes:
    return _hkdf(file_key, nonce, b"payload")


def payload_chunks(plain_size: int) -> int:
    """Number of STREAM chunks: an empty payload is one empty final chunk."""
    return max(1, -(-plain_size // CHUNK_SIZE))


def _chunk_nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


# --------------------------------------------------------------------------- per-file secrets


def _derive(seed: bytes, label: bytes, length: int) -> bytes:
    return _hkdf(seed, b"", _DERIVE_INFO + label, length)


_FILE_KEY_INFO = _DERIVE_INFO + b"file key"
_NONCE_INFO = _DERIVE_INFO + b"payload nonce"
_STANZA_INFOS = [_DERIVE_INFO + b"stanza " + i.to_bytes(4, "big") for i in range(16)]


def _stanza_info(i: int) -> bytes:
    return _STANZA_INFOS[i] if i < len(_STANZA_INFOS) else _DERIVE_INFO + b"stanza " + i.to_bytes(4, "big")


@dataclass(frozen=True)
class FileSecrets:
    """Everything random in one file version's stream, derived from its seed (see the module docstring)."""

    file_key: bytes
    nonce: bytes
    header: bytes

    @classmethod
    def derive(cls, seed: bytes, recipients: Sequence[Recipient]) -> "FileSecrets":
        if len(seed) != SEED_SIZE:
            raise ValueError(f"the seed must be {SEED_SIZE} octets")
        # Every derive(label, n) of one seed shares HKDF-Extract (the salt is empty): it is done once.
        prk = _hkdf_prk(seed, b"")
        file_key = _hkdf_expand(prk, _FILE_KEY_INFO, FILE_KEY_SIZE)
        nonce = _hkdf_expand(prk, _NONCE_INFO, NONCE_SIZE)
        rands = [_hkdf_expand(prk, _stanza_info(i), 32) for i in range(len(recipients))]
        return cls(file_key, nonce, build_header(recipients, file_key, rands))


# --------------------------------------------------------------------------- payload


class _Chunker:
    """Encrypts STREAM chunks for one (payload key, plaintext size)."""

    __slots__ = ("aead", "plain_size", "n_chunks")

    def __init__(self, key: bytes, plain_size: int):
        self.aead = ChaCha20Poly1305(key)
        self.plain_size = plain_size
        self.n_chunks = payload_chunks(plain_size)

    def plain_len(self, index: int) -> int:
        return min(CHUNK_SIZE, self.plain_size - index * CHUNK_SIZE)

    def encrypt_range(self, first: int, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt chunks first, first+1, … whose plaintext is `plaintext` into `out`."""
        last = self.n_chunks - 1
        p = o = 0
        i = first
        total = len(plaintext)
        while True:
            n = min(CHUNK_SIZE, total - p)
            self.aead.encrypt_into(_chunk_nonce(i, i == last), plaintext[p : p + n], None, out[o : o + n + TAG_SIZE])
            p += n
            o += n + TAG_SIZE
            i += 1
            if p >= total:
                return

    def stream_size(self, prefix: int) -> int:
        return prefix + self.plain_size + TAG_SIZE * self.n_chunks


def stream_size_for(header_size: int, plain_size: int) -> int:
    return header_size + NONCE_SIZE + plain_size + TAG_SIZE * payload_chunks(plain_size)


# --------------------------------------------------------------------------- pack side


@dataclass(frozen=True)
class Params:
    """A decoded params blob (version 3; see the module docstring)."""

    plain_size: int
    fingerprint: bytes
    wrapped: bytes

    @staticmethod
    def bound_prefix(plain_size: int, fingerprint: bytes) -> bytes:
        """The octets before the wrapped seed; they are also its wrap context (after _PARAMS_CONTEXT)."""
        return bytes([_PARAMS_VERSION]) + encode_uvarint(plain_size) + fingerprint

    def encode(self) -> bytes:
        return self.bound_prefix(self.plain_size, self.fingerprint) + self.wrapped

    @staticmethod
    def wrap_context(plain_size: int, fingerprint: bytes) -> bytes:
        """What the wrapped seed is bound to: the cipher, the plaintext size and the recipients."""
        return _PARAMS_CONTEXT + Params.bound_prefix(plain_size, fingerprint)

    @classmethod
    def decode(cls, blob: bytes) -> "Params":
        if not blob or blob[0] != _PARAMS_VERSION:
            raise FormatError("age stream parameters are from an unknown packerfs version")
        plain_size, pos = decode_uvarint(blob, 1)
        fingerprint = blob[pos : pos + FINGERPRINT_SIZE]
        wrapped = blob[pos + FINGERPRINT_SIZE :]
        if len(fingerprint) != FINGERPRINT_SIZE or len(wrapped) != _WRAPPED_SIZE:
            raise FormatError("age stream parameters are malformed (wrong length)")
        return cls(plain_size, fingerprint, wrapped)


class AgeEncryptor(Encryptor):
    """One sequential pass; params() is the same blob at any time (all of it is drawn up front)."""

    def __init__(self, header: bytes, file_key: bytes, nonce: bytes, params: bytes, plain_size: int,
                 stream_offset: int = 0):
        """With `stream_offset` (AgeCipher.resume_at), the pass starts at the chunk holding that stream
        octet: plaintext from that chunk's first octet on, and the octets before `stream_offset` dropped."""
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        self._params = params
        self._chunker = _Chunker(payload_key(file_key, nonce), plain_size)
        lead = header + nonce
        self._index = 0  # next chunk to emit
        self._skip = 0  # stream octets still to drop from the first chunk emitted
        if stream_offset <= len(lead):
            self._pending: bytes | None = lead[stream_offset:] or None
        else:
            self._pending = None
            into = stream_offset - len(lead)
            self._index = min(into // ENC_CHUNK_SIZE, self._chunker.n_chunks - 1)
            self._skip = into - self._index * ENC_CHUNK_SIZE
        self._buf = bytearray()
        self._fed = self._index * CHUNK_SIZE
        self._done = False

    @property
    def plaintext_offset(self) -> int:
        """The plaintext octet the first update() must start with (0 unless resumed)."""
        return self._index * CHUNK_SIZE if not self._done else self._chunker.plain_size

    def _trim(self, out):
        if self._skip and out:
            n = min(self._skip, len(out))
            self._skip -= n
            return memoryview(out)[n:]
        return out

    def _emit(self, data: memoryview) -> tuple[bytes | bytearray, int]:
        """Encrypt the complete chunks at the start of `data`; -> (stream bytes, plaintext consumed)."""
        ch = self._chunker
        if self._index >= ch.n_chunks:
            return b"", 0
        remaining = ch.plain_size - self._index * CHUNK_SIZE  # plaintext not yet encrypted
        if len(data) >= remaining:  # everything that is left, final chunk included
            take, n = remaining, ch.n_chunks - self._index
        else:
            n = len(data) // CHUNK_SIZE
            if n == 0:
                return b"", 0
            take = n * CHUNK_SIZE
        out = bytearray(take + n * TAG_SIZE)
        ch.encrypt_range(self._index, data[:take], memoryview(out))
        self._index += n
        return self._trim(out), take

    def update(self, plaintext: bytes) -> bytes:
        if self._done:
            raise RuntimeError("update() after finish()")
        n = len(plaintext)
        self._fed += n
        if self._fed > self._chunker.plain_size:
            raise SourceChanged(
                f"the file grew while it was being encrypted (more than {self._chunker.plain_size} bytes)"
            )
        parts = []
        if self._pending is not None:
            parts.append(self._pending)
            self._pending = None
        if self._buf:
            need = min(CHUNK_SIZE, self._chunker.plain_size - self._index * CHUNK_SIZE) - len(self._buf)
            self._buf += plaintext[:need]
            plaintext = memoryview(plaintext)[need:]
            out, used = self._emit(memoryview(self._buf))
            if not used:  # the buffered chunk is still incomplete
                return b"".join(parts)
            parts.append(out)
            self._buf = bytearray()
        mv = memoryview(plaintext)
        out, used = self._emit(mv)
        if out:
            parts.append(out)
        if used < len(mv):
            self._buf += mv[used:]
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def finish(self) -> bytes:
        if self._done:
            raise RuntimeError("finish() called twice")
        if self._fed != self._chunker.plain_size:
            raise SourceChanged(
                f"the file shrank while it was being encrypted ({self._fed} of {self._chunker.plain_size} bytes)"
            )
        self._done = True
        parts = []
        if self._pending is not None:
            parts.append(self._pending)
            self._pending = None
        if self._index < self._chunker.n_chunks:
            out, _ = self._emit(memoryview(self._buf))
            parts.append(out)
            self._buf = bytearray()
        assert self._index == self._chunker.n_chunks
        return b"".join(parts)

    def params(self) -> bytes:
        return self._params


class AgeStream:
    """Random access to a regenerated age stream (RandomAccess)."""

    def __init__(self, header: bytes, file_key: bytes, nonce: bytes, plain_size: int, read_plain: ReadAt):
        self._prefix = header + nonce
        self._chunker = _Chunker(payload_key(file_key, nonce), plain_size)
        self._read_plain = read_plain
        self._size = self._chunker.stream_size(len(self._prefix))
        self._cache: tuple[int, bytes] | None = None  # (chunk index, stream bytes of that chunk)

    @property
    def size(self) -> int:
        return self._size

    @property
    def header_size(self) -> int:
        return len(self._prefix) - NONCE_SIZE

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self._size)
        if offset >= end:
            return b""
        P = len(self._prefix)
        parts = []
        if offset < P:
            parts.append(self._prefix[offset : min(end, P)])
            if end <= P:
                return parts[0]
        c_off = max(offset, P) - P
        c_end = end - P
        first = c_off // ENC_CHUNK_SIZE
        last = (c_end - 1) // ENC_CHUNK_SIZE
        ch = self._chunker
        cache = self._cache
        lead = b""
        start_idx = first
        if cache is not None and cache[0] == first:
            lead = cache[1]
            start_idx = first + 1
        if start_idx <= last:
            p_start = start_idx * CHUNK_SIZE
            p_end = min((last + 1) * CHUNK_SIZE, ch.plain_size)
            plain = self._read_plain(p_start, p_end - p_start) if p_end > p_start else b""
            if len(plain) != p_end - p_start:
                raise SourceChanged(
                    f"source returned {len(plain)} bytes at offset {p_start}, expected {p_end - p_start}"
                )
            n = last - start_idx + 1
            body = bytearray(len(lead) + (p_end - p_start) + n * TAG_SIZE)
            body[: len(lead)] = lead
            ch.encrypt_range(start_idx, memoryview(plain), memoryview(body)[len(lead) :])
        else:
            body = lead
        base = first * ENC_CHUNK_SIZE
        tail_start = last * ENC_CHUNK_SIZE - base
        if c_end - base < len(body):  # read ended inside chunk `last`: keep it for the next read
            self._cache = (last, bytes(body[tail_start:]))
        view = memoryview(body)[c_off - base : c_end - base]
        if not parts:
            return bytes(view)
        parts.append(view)
        return b"".join(parts)


class AgeCipher(Cipher):
    name = "age"
    suffix = ".age"

    def __init__(self, recipients: Sequence[Recipient]):
        uniq: dict[str, Recipient] = {}
        for r in recipients:
            uniq.setdefault(r.fingerprint, r)
        if not uniq:
            raise UsageError("age encryption needs at least one recipient.")
        self._recipients = list(uniq.values())
        h = hashlib.sha256(_RECIPIENTS_DOMAIN)
        for r in self._recipients:
            kind = r.type.encode("ascii")
            h.update(encode_uvarint(len(kind)) + kind + encode_uvarint(len(r.key_bytes)) + r.key_bytes)
        self._fingerprint = h.digest()[:FINGERPRINT_SIZE]
        self._header_size = len(FileSecrets.derive(os.urandom(SEED_SIZE), self._recipients).header)

    @classmethod
    def from_strings(cls, recipients: Iterable[str] = (), recipients_files: Iterable[str] = ()) -> "AgeCipher":
        rs = [parse_recipient(s) for s in recipients]
        for path in recipients_files:
            rs.extend(read_recipients_file(path))
        return cls(rs)

    @property
    def recipients(self) -> list[str]:
        return [r.fingerprint for r in self._recipients]

    @property
    def fingerprint(self) -> bytes:
        """8 octets of SHA-256 over the recipients' public keys, in order, as recorded in params."""
        return self._fingerprint

    @property
    def header_size(self) -> int:
        return self._header_size

    def stream_size(self, plain_size: int) -> int:
        return stream_size_for(self._header_size, plain_size)

    def _secrets_of(self, seed: bytes) -> FileSecrets:
        fs = FileSecrets.derive(seed, self._recipients)
        if len(fs.header) != self._header_size:  # stream_size() would be wrong; never expected
            raise RuntimeError("age header length is not a pure function of the recipients")
        return fs

    def new_file(self, plain_size: int, dataset_secret: bytes, seed: bytes | None = None) -> AgeEncryptor:
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        seed = os.urandom(SEED_SIZE) if seed is None else seed
        fs = self._secrets_of(seed)
        wrapped = _secrets.wrap(dataset_secret, seed, Params.wrap_context(plain_size, self._fingerprint))
        p = Params(plain_size, self._fingerprint, wrapped)
        return AgeEncryptor(fs.header, fs.file_key, fs.nonce, p.encode(), plain_size)

    def unwrap_seed(self, params: bytes, plain_size: int, dataset_secret: bytes) -> bytes:
        """The seed in `params`, after checking them against `plain_size` and this cipher's recipients.

        FormatError: malformed, or made for another plaintext size. UsageError:
        made for other recipients. KeyProblem: the seed does not unwrap with
        `dataset_secret`."""
        p = Params.decode(params)
        if p.plain_size != plain_size:
            raise FormatError(
                f"age stream parameters were made for a plaintext of {p.plain_size} bytes, not {plain_size} "
                "(they belong to another version of the file)"
            )
        if p.fingerprint != self._fingerprint:
            raise UsageError(
                f"these age stream parameters were made for other recipients (fingerprint {p.fingerprint.hex()}, "
                f"this pack's recipients have {self._fingerprint.hex()}); were the recipients changed?"
            )
        seed = _secrets.unwrap(dataset_secret, p.wrapped, Params.wrap_context(p.plain_size, p.fingerprint))
        if len(seed) != SEED_SIZE:
            raise FormatError("age stream parameters are malformed (seed size)")
        return seed

    def open_stream(self, params: bytes, plain_size: int, read_plain: ReadAt, dataset_secret: bytes) -> AgeStream:
        """Random access to the stream; the header is regenerated from the seed and the recipients."""
        fs = self._secrets_of(self.unwrap_seed(params, plain_size, dataset_secret))
        return AgeStream(fs.header, fs.file_key, fs.nonce, plain_size, read_plain)

    def resume_file(self, params: bytes, plain_size: int, dataset_secret: bytes) -> AgeEncryptor:
        """The same pass again: the same seed, so the same header, file key and nonce; params() returns `params`.

        `params` must have been made for this cipher's recipients, in the same
        order (UsageError otherwise)."""
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        fs = self._secrets_of(self.unwrap_seed(params, plain_size, dataset_secret))
        return AgeEncryptor(fs.header, fs.file_key, fs.nonce, bytes(params), plain_size)

    def resume_at(
        self, params: bytes, plain_size: int, dataset_secret: bytes, stream_offset: int
    ) -> tuple[AgeEncryptor, int]:
        """Continue the pass at stream octet `stream_offset`: -> (encryptor, plaintext offset).

        STREAM chunks are independent, so the encryptor starts at the chunk holding
        `stream_offset` (plaintext offset = that chunk's first plaintext octet, at most
        64 KiB before the octet under `stream_offset`) and drops the octets of that
        chunk before it. The header is regenerated from the seed; params() is `params`."""
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        fs = self._secrets_of(self.unwrap_seed(params, plain_size, dataset_secret))
        size = stream_size_for(self._header_size, plain_size)
        if not 0 <= stream_offset <= size:
            raise ValueError(f"stream offset {stream_offset} is outside the stream (0..{size})")
        enc = AgeEncryptor(fs.header, fs.file_key, fs.nonce, bytes(params), plain_size, stream_offset)
        return enc, enc.plaintext_offset


# --------------------------------------------------------------------------- unpack side


class AgePlaintext:
    """Random-access, authenticated plaintext of an age stream (RandomAccess).

    Every byte returned comes from a chunk whose Poly1305 tag verified; the
    final chunk is verified when the object is created, which authenticates the
    stream's length (STREAM's last-chunk flag), so a truncated or extended
    stream is refused up front.
    """

    def __init__(self, stream: RandomAccess, header: Header, file_key: bytes, name: str | None = None):
        self._stream = stream
        self._name = name
        self._base = header.size + NONCE_SIZE
        if stream.size < self._base:
            raise FormatError("age stream is truncated (no payload nonce)", path=name, offset=stream.size)
        nonce = stream.read(header.size, NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise FormatError("age stream is shorter than its stated size", path=name, offset=header.size)
        payload = stream.size - self._base
        full, rem = divmod(payload, ENC_CHUNK_SIZE)
        if rem == 0 and full == 0:
            raise FormatError("age stream is truncated (no payload chunk)", path=name, offset=stream.size)
        if 0 < rem < TAG_SIZE or (rem == TAG_SIZE and full > 0):
            raise FormatError(
                "age stream has an invalid length (truncated, or extra bytes at the end)",
                path=name,
                offset=stream.size,
            )
        n_chunks = full + (1 if rem else 0)
        plain_size = payload - TAG_SIZE * n_chunks
        self._aead = ChaCha20Poly1305(payload_key(file_key, nonce))
        self._n_chunks = n_chunks
        self._size = plain_size
        self._cache: tuple[int, bytes] | None = None
        last = n_chunks - 1
        try:
            self._cache = (last, self._decrypt(last, 1)[1])
        except FormatError as e:
            raise FormatError(
                "age stream's final chunk does not authenticate: the stream is truncated or damaged",
                path=name,
                offset=e.offset,
            ) from None

    @property
    def size(self) -> int:
        return self._size

    def _decrypt(self, first: int, count: int, into=None) -> tuple[int, bytearray]:
        """Decrypt chunks [first, first+count); -> (plain length, plaintext). With `into` (a writable
        buffer of at least the plain length), the plaintext is written there and `into` returned."""
        start = self._base + first * ENC_CHUNK_SIZE
        end = min(self._base + (first + count) * ENC_CHUNK_SIZE, self._stream.size)
        ct = self._stream.read(start, end - start)
        if len(ct) != end - start:
            raise FormatError("age stream is shorter than its stated size", path=self._name, offset=start + len(ct))
        out = bytearray(len(ct) - TAG_SIZE * count) if into is None else into
        mv_ct, mv_out = memoryview(ct), memoryview(out)
        last = self._n_chunks - 1
        p = o = 0
        for i in range(first, first + count):
            n = min(ENC_CHUNK_SIZE, len(ct) - p)
            try:
                self._aead.decrypt_into(
                    _chunk_nonce(i, i == last), mv_ct[p : p + n], None, mv_out[o : o + n - TAG_SIZE]
                )
            except InvalidTag:
                raise FormatError(
                    f"age payload chunk {i} fails authentication (damaged or altered data)",
                    path=self._name,
                    offset=start + p,
                ) from None
            p += n
            o += n - TAG_SIZE
        return o, out

    def read_into(self, offset: int, buffer) -> int:
        """Plaintext from `offset` into the writable `buffer` (up to its length, clipped to the end);
        returns the length. A range of whole chunks is decrypted in place, without a copy."""
        buffer = memoryview(buffer).cast("B")
        end = min(offset + len(buffer), self._size)
        if offset < 0:
            raise ValueError("negative offset")
        if offset >= end:
            return 0
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        whole = (last + 1) * CHUNK_SIZE == end or end == self._size
        if offset % CHUNK_SIZE or not whole or (self._cache is not None and self._cache[0] in (first, last)):
            data = self.read(offset, end - offset)
            buffer[: len(data)] = data
            return len(data)
        length, _ = self._decrypt(first, last - first + 1, buffer)
        return length

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self._size)
        if offset >= end:
            return b""
        first = offset // CHUNK_SIZE
        last = (end - 1) // CHUNK_SIZE
        cache = self._cache
        if cache is not None and first == last == cache[0]:
            base = first * CHUNK_SIZE
            return cache[1][offset - base : end - base]
        lead = b""
        start_idx = first
        if cache is not None and cache[0] == first:
            lead, start_idx = cache[1], first + 1
        _, body = self._decrypt(start_idx, last - start_idx + 1)
        if lead:
            body = lead + body
        base = first * CHUNK_SIZE
        tail = (last - first) * CHUNK_SIZE
        if end - base < len(body) or last == self._n_chunks - 1:
            self._cache = (last, bytes(body[tail:]))
        return bytes(memoryview(body)[offset - base : end - base])

    def iter_verified(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The whole plaintext in order, every chunk authenticated (final chunk included)."""
        per = max(1, chunk_size // CHUNK_SIZE)
        i = 0
        while i < self._n_chunks:
            n = min(per, self._n_chunks - i)
            length, out = self._decrypt(i, n)
            if length:
                yield bytes(out)
            i += n


def _with_path(e: FormatError, name: str) -> FormatError:
    msg = str(e)
    prefix = f"offset {e.offset}: "
    if e.offset is not None and msg.startswith(prefix):
        msg = msg[len(prefix) :]
    return type(e)(msg, path=name, offset=e.offset)


def open_age_plaintext(
    stream: RandomAccess, identities: Sequence[Identity], name: str | None = None
) -> AgePlaintext:
    """Authenticate the header, unwrap the file key, and give random access to the plaintext."""
    try:
        header = read_header(stream)
        file_key = None
        for stanza in header.stanzas:
            for ident in identities:
                file_key = ident.unwrap(stanza)
                if file_key is not None:
                    break
            if file_key is not None:
                break
    except FormatError as e:
        if name is None or e.path is not None:
            raise
        raise _with_path(e, name) from None
    if file_key is None:
        counts: dict[str, int] = {}
        for s in header.stanzas:
            counts[s.type] = counts.get(s.type, 0) + 1
        to = ", ".join(f"{n} {t}" for t, n in counts.items())
        where = f"{name}: " if name else ""
        if not identities:
            raise KeyProblem(
                f"{where}no age identity was given; this file is encrypted to {to} recipient(s): "
                "pass the matching identity file or OpenSSH private key."
            )
        srcs = sorted({i.source for i in identities})
        raise KeyProblem(
            f"{where}none of the identities in {', '.join(srcs)} can open this age file; it is encrypted to "
            f"{to} recipient(s)."
        )
    if not hmac.compare_digest(_header_mac(file_key, header.mac_input), header.mac):
        raise FormatError(
            "age header MAC does not verify (the header was altered)", path=name, offset=header.mac_offset
        )
    return AgePlaintext(stream, header, file_key, name)
