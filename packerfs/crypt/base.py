"""The stream interface every cipher implements; everything downstream sees only this.

A *stream* is the exact byte sequence stored for one file: the plaintext itself
(plain), an age file, or an OpenPGP message. Three properties make it servable
from a FUSE mount without staging anything on disk:

  (a) any byte range can be regenerated without producing the prefix,
  (b) every regeneration returns identical bytes (all randomness is derived
      from one random seed drawn per file version and stored, wrapped under the
      dataset secret, in the index; recipient headers are rebuilt from it), and
  (c) stock tools (`age -d`, `pyrage`, `gpg -d`) decrypt it.

Pack side:   Cipher.new_file() -> Encryptor (one sequential pass; yields stream
             bytes and the opaque params blob to store, partial at any time,
             final after finish()), Cipher.resume_file(params, ...) -> Encryptor
             (the same pass again with the same secrets, after an interruption),
             Cipher.resume_at(params, ..., stream_offset) -> (Encryptor, plaintext
             offset) (the same, starting in the middle: only the rest is read)
             and Cipher.open_stream(params, ...) -> Stream (random access later).
Unpack side: Decryptors turn a random-access view of a stored stream back into
             random-access plaintext (see packerfs.crypt.open_plaintext).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Protocol

# read_plain(offset, size) -> exactly `size` bytes of the file's plaintext.
# Supplied by the caller (source file, or reassembled parts); it raises if the
# source is short. Ciphers never open files themselves.
ReadAt = Callable[[int, int], bytes]


class RandomAccess(Protocol):
    """Any byte sequence of known size that can be read at an offset."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) clipped to the end; b'' past the end."""
        ...


def range_end(offset: int, size: int, total: int) -> int:
    """Where a RandomAccess read of [offset, offset+size) ends, clipped to `total` (ValueError for a
    negative offset or size); nothing is read when it is not past `offset`."""
    if offset < 0 or size < 0:
        raise ValueError("negative offset or size")
    return min(offset + size, total)


class Encryptor(ABC):
    """One sequential pass over a file's plaintext, producing its stream.

    update() returns whatever stream bytes are ready (possibly b''); finish()
    returns the rest. The concatenation of all returned bytes is the stream,
    exactly `Cipher.stream_size(plain_size)` long.

    params() may be called at ANY time, any number of times (before the first
    update(), between updates, after finish()). Let `emitted` be the number of
    stream bytes returned by update()/finish() so far. The blob it returns
    (*partial* params before finish(), *final* params after) is guaranteed to
    let Cipher.open_stream(params, plain_size, read_plain, secret) regenerate
    every byte of [0, emitted) exactly as emitted; final params cover the whole
    stream. This is what lets the pack seal a bin in the middle of a file: the
    bytes already laid out in the sealed bin are servable from the partial
    params stored with it. Blobs taken at different times from one Encryptor
    regenerate identical bytes wherever their covered ranges overlap, and they
    carry the same wrapped per-file secrets, so any of them can also be given to
    Cipher.resume_file(). What each cipher's partial params cover beyond
    [0, emitted), if anything, is documented with the cipher; reading outside
    the covered range of partial params may raise FormatError.
    """

    @abstractmethod
    def update(self, plaintext: bytes) -> bytes: ...

    @abstractmethod
    def finish(self) -> bytes: ...

    @abstractmethod
    def params(self) -> bytes:
        """The params blob for the stream so far (partial) or for all of it (after finish())."""


class Cipher(ABC):
    """An encryption scheme configured with its recipients, for one pack."""

    name: str  # "plain" | "age" | "openpgp"  (recorded in the manifest)
    suffix: str  # "" | ".age" | ".gpg"       (appended to stored names)
    # Does sealing a part of a file need the stream's state at the end of the part before it? Not
    # for age (independent STREAM chunks) or plain; yes for OpenPGP, whose CFB chain and MDC hash
    # run through the whole message, so a split file's bins are sealed one after another.
    parts_need_previous: bool = False

    @property
    @abstractmethod
    def recipients(self) -> list[str]:
        """Stable public fingerprints of the recipients, for the manifest."""

    @abstractmethod
    def stream_size(self, plain_size: int) -> int:
        """Stream length: a pure function of the plaintext size and the scheme."""

    @abstractmethod
    def new_file(self, plain_size: int, dataset_secret: bytes, seed: bytes | None = None) -> Encryptor:
        """Start a new file version: fresh per-file secrets, wrapped under dataset_secret.

        `seed`: the version's 32-octet seed, when the caller draws it (see crypt.secrets.file_seed:
        the pack derives each version's seed from one random seed per scan run, so that a bin sealed
        again elsewhere, after a worker died, is byte-identical); by default a fresh random one."""

    @abstractmethod
    def open_stream(
        self, params: bytes, plain_size: int, read_plain: ReadAt, dataset_secret: bytes
    ) -> RandomAccess:
        """Random access to the stream produced by the Encryptor that made `params`.

        `params` may be partial (see Encryptor.params()): then only the range
        those params cover can be read; `size` is still the whole stream's size.
        Any recipient header is regenerated from the seed in `params` and this
        cipher's recipients. Raises KeyProblem if the wrapped secrets do not
        open with `dataset_secret`, FormatError if `params` are malformed or
        were made for a different `plain_size`, and UsageError if they were made
        for other recipients or options (which would regenerate other bytes).
        """

    @abstractmethod
    def resume_file(self, params: bytes, plain_size: int, dataset_secret: bytes) -> Encryptor:
        """Continue an interrupted file version with the SAME per-file secrets.

        `params` are partial or final params of an earlier Encryptor for this
        file version (typically the partial params stored when a bin was sealed
        in the middle of the file). The returned Encryptor starts again at
        plaintext byte 0 (the caller re-reads the file) and reuses the seed
        wrapped in `params`, hence the same secrets, random prefix and
        (regenerated) recipient header; given the same
        plaintext it returns exactly the same stream bytes as the original
        Encryptor, in the same total, and its params() after finish() equal the
        original's final params byte for byte. Its partial params regenerate the
        same bytes as the original's.

        Errors: KeyProblem if the wrapped secrets do not open with
        `dataset_secret` (as open_stream/unwrap); FormatError if `params` are
        malformed or record a plaintext size other than `plain_size`; UsageError
        if `params` were made for other recipients or options (a fingerprint
        of them is recorded in `params`), so that the resumed stream would not
        be the original one. The
        returned Encryptor does not check the plaintext against `params`: a
        changed plaintext simply yields different bytes (see below), and it
        raises SourceChanged, as any Encryptor does, only if more or fewer than
        `plain_size` bytes are fed.

        Why reusing the keystream is safe: the resumed pass encrypts the file's
        current bytes under the same key/nonce (age) or session key and prefix
        (OpenPGP). If the plaintext is unchanged, that is literally the same
        ciphertext again, which reveals nothing new. If it changed, the stream
        bytes of the already sealed prefix no longer match the block CIDs
        recorded for them, and every block is verified against its CID before
        any byte of it is served (see packerfs.crypt.secrets), so no ciphertext
        of a changed plaintext under a reused keystream position is ever
        published for the sealed part; stream positions after the sealed prefix
        were never published before, so they are encrypted once. The caller
        must therefore resume only a file version whose identity (size, mtime)
        still matches, should compare the resumed bytes of the sealed prefix
        with what was sealed (and call new_file() on any mismatch), and must
        never resume with params of another file version.
        """

    def resume_at(
        self, params: bytes, plain_size: int, dataset_secret: bytes, stream_offset: int
    ) -> tuple[Encryptor, int]:
        """Continue an interrupted file version from stream octet `stream_offset`.

        -> (encryptor, plaintext_offset). Feed the encryptor the file's plaintext
        from octet `plaintext_offset` (<= the plaintext under `stream_offset`) to
        the end; the concatenation of what update()/finish() return is exactly
        stream octets [stream_offset, stream_size), and params() after finish()
        equal the final params of an uninterrupted pass over the same plaintext.
        Partial params() in between cover [0, emitted) as usual, counting the
        octets before `stream_offset` as emitted.

        `params` and the errors are as for resume_file(); `stream_offset` may be
        anything in [0, stream_size] (ValueError otherwise) and is typically
        the end of the sealed leaves (a multiple of 1 MiB). The plaintext before
        `plaintext_offset` is not read at all, so nothing here can notice that
        it changed: as with resume_file(), the caller must resume only a file
        version whose identity still matches, and should check the last sealed
        leaf against its digest (what that check does and does not cover is
        documented with each cipher). Same keystream argument as resume_file().

        This default re-encrypts from octet 0 and drops the prefix (correct for
        any cipher, and O(prefix)); the ciphers override it with random access.
        """
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        enc = self.resume_file(params, plain_size, dataset_secret)
        if not 0 <= stream_offset <= self.stream_size(plain_size):
            raise ValueError(f"stream offset {stream_offset} is outside the stream (0..{self.stream_size(plain_size)})")
        return SkippingEncryptor(enc, stream_offset), 0


class SkippingEncryptor(Encryptor):
    """An Encryptor whose first `skip` stream octets are dropped (Cipher.resume_at's generic form)."""

    def __init__(self, inner: Encryptor, skip: int):
        self._inner = inner
        self._skip = skip

    def _trim(self, data: bytes) -> bytes:
        if not self._skip:
            return data
        n = min(self._skip, len(data))
        self._skip -= n
        return bytes(memoryview(data)[n:])

    def update(self, plaintext: bytes) -> bytes:
        return self._trim(self._inner.update(plaintext))

    def finish(self) -> bytes:
        return self._trim(self._inner.finish())

    def params(self) -> bytes:
        return self._inner.params()
