"""The stream interface every cipher implements; everything downstream sees only this.

A *stream* is the exact byte sequence stored for one file: the plaintext itself
(plain), an age file, or an OpenPGP message. Three properties make it servable
from a FUSE mount without staging anything on disk:

  (a) any byte range can be regenerated without producing the prefix,
  (b) every regeneration returns identical bytes (all randomness is drawn once
      per file version and stored, wrapped, in the index), and
  (c) stock tools (`age -d`, `pyrage`, `gpg -d`) decrypt it.

Pack side:   Cipher.new_file() -> Encryptor (one sequential pass; yields stream
             bytes and, at the end, the opaque params blob to store) and
             Cipher.open_stream(params, ...) -> Stream (random access later).
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


class Encryptor(ABC):
    """One sequential pass over a file's plaintext, producing its stream.

    update() returns whatever stream bytes are ready (possibly b''); finish()
    returns the rest. The concatenation of all returned bytes is the stream,
    exactly `Cipher.stream_size(plain_size)` long. After finish(), params() is
    the blob that lets open_stream() regenerate any range of the same bytes.
    """

    @abstractmethod
    def update(self, plaintext: bytes) -> bytes: ...

    @abstractmethod
    def finish(self) -> bytes: ...

    @abstractmethod
    def params(self) -> bytes: ...


class Cipher(ABC):
    """An encryption scheme configured with its recipients, for one pack."""

    name: str  # "plain" | "age" | "openpgp"  (recorded in the manifest)
    suffix: str  # "" | ".age" | ".gpg"       (appended to stored names)

    @property
    @abstractmethod
    def recipients(self) -> list[str]:
        """Stable public fingerprints of the recipients, for the manifest."""

    @abstractmethod
    def stream_size(self, plain_size: int) -> int:
        """Stream length: a pure function of the plaintext size and the scheme."""

    @abstractmethod
    def new_file(self, plain_size: int, dataset_secret: bytes) -> Encryptor:
        """Start a new file version: fresh per-file secrets, wrapped under dataset_secret."""

    @abstractmethod
    def open_stream(
        self, params: bytes, plain_size: int, read_plain: ReadAt, dataset_secret: bytes
    ) -> RandomAccess:
        """Random access to the stream produced by the Encryptor that made `params`."""
