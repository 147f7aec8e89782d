"""The identity "cipher": the stored stream is the plaintext itself (--no-encryption).

Params are always b"" (there are no per-file secrets): partial and final
params are the same and cover the whole stream; resume_file() and resume_at()
need nothing from them, so they cannot check the plaintext size or the dataset
secret.
"""

from __future__ import annotations

from packerfs.crypt.base import Cipher, Encryptor, ReadAt, range_end
from packerfs.errors import FormatError, SourceChanged

__all__ = ["PlainCipher", "PlainEncryptor", "PlainStream"]


class PlainEncryptor(Encryptor):
    def __init__(self, plain_size: int, start: int = 0):
        self._size = plain_size
        self._fed = start  # plaintext octets before the first update() (resume_at)
        self._done = False

    def update(self, plaintext: bytes) -> bytes:
        if self._done:
            raise RuntimeError("update() after finish()")
        self._fed += len(plaintext)
        if self._fed > self._size:
            raise SourceChanged(f"the file grew while it was being read (more than {self._size} bytes)")
        return bytes(plaintext)

    def finish(self) -> bytes:
        if self._done:
            raise RuntimeError("finish() called twice")
        if self._fed != self._size:
            raise SourceChanged(f"the file shrank while it was being read ({self._fed} of {self._size} bytes)")
        self._done = True
        return b""

    def params(self) -> bytes:
        return b""  # nothing to store; valid at any time


class PlainStream:
    """RandomAccess over the plaintext source."""

    def __init__(self, plain_size: int, read_plain: ReadAt):
        self._size = plain_size
        self._read_plain = read_plain

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        end = range_end(offset, size, self._size)
        if offset >= end:
            return b""
        data = self._read_plain(offset, end - offset)
        if len(data) != end - offset:
            raise SourceChanged(f"source returned {len(data)} bytes at offset {offset}, expected {end - offset}")
        return data


class PlainCipher(Cipher):
    name = "plain"
    suffix = ""

    @property
    def recipients(self) -> list[str]:
        return []

    def stream_size(self, plain_size: int) -> int:
        return plain_size

    def new_file(self, plain_size: int, dataset_secret: bytes, seed: bytes | None = None) -> PlainEncryptor:
        return PlainEncryptor(plain_size)

    def open_stream(self, params: bytes, plain_size: int, read_plain: ReadAt, dataset_secret: bytes) -> PlainStream:
        _check_params(params)
        return PlainStream(plain_size, read_plain)

    def resume_file(self, params: bytes, plain_size: int, dataset_secret: bytes) -> PlainEncryptor:
        _check_params(params)
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        return PlainEncryptor(plain_size)

    def resume_at(
        self, params: bytes, plain_size: int, dataset_secret: bytes, stream_offset: int
    ) -> tuple[PlainEncryptor, int]:
        """The stream is the plaintext: continue at the same offset."""
        _check_params(params)
        if plain_size < 0:
            raise ValueError("negative plaintext size")
        if not 0 <= stream_offset <= plain_size:
            raise ValueError(f"stream offset {stream_offset} is outside the stream (0..{plain_size})")
        return PlainEncryptor(plain_size, stream_offset), stream_offset


def _check_params(params: bytes) -> None:
    if params:
        raise FormatError("stream parameters of an encrypted file were given to the plain (unencrypted) cipher")
