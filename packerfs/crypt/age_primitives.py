"""Primitives the age modules share: strict base64, HKDF-SHA256, X25519, the zero-nonce
ChaCha20-Poly1305 that seals stanza bodies, the SSH wire format, and the bounded key-file read.

Only the sibling modules (age_header, age_recipients, age_identities, age) use these; nothing
here knows about headers, recipients or streams.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_X25519_INFO = b"age-encryption.org/v1/X25519"
_ED25519_INFO = b"age-encryption.org/v1/ssh-ed25519"
_RSA_LABEL = b"age-encryption.org/v1/ssh-rsa"
_ZERO_NONCE = bytes(12)
_B64_RE = re.compile(rb"[A-Za-z0-9+/]*")


# --------------------------------------------------------------------------- helpers


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str | bytes) -> bytes:
    """Strict unpadded canonical base64 (the age spec requires rejecting anything else)."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("not base64") from None
    if not _B64_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64")
    try:
        raw = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if base64.b64encode(raw).rstrip(b"=") != text:
        raise ValueError("non-canonical base64")
    return raw


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _x25519(scalar: bytes, point: bytes) -> bytes:
    """RFC 7748 X25519; ValueError if the result is all zeros (low-order input)."""
    return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(point))


def _aead_seal(key: bytes, plaintext: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, None)


def _aead_open(key: bytes, ciphertext: bytes) -> bytes | None:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, None)
    except InvalidTag:
        return None


# SSH wire format ------------------------------------------------------------


def _ssh_string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(data):
        raise ValueError("truncated SSH key")
    n = int.from_bytes(data[pos : pos + 4], "big")
    pos += 4
    if pos + n > len(data):
        raise ValueError("truncated SSH key")
    return data[pos : pos + n], pos + n


def _ssh_fingerprint(wire: bytes) -> str:
    """OpenSSH's fingerprint, as `ssh-keygen -l` prints it."""
    return "SHA256:" + _b64encode(hashlib.sha256(wire).digest())


def _ssh_tag(wire: bytes) -> str:
    """The age stanza tag: base64 of the first 4 bytes of SHA-256 of the SSH key."""
    return _b64encode(hashlib.sha256(wire).digest()[:4])


def _ssh_public_wire(public_key) -> bytes:
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


# Key files --------------------------------------------------------------------


_KEY_FILE_LIMIT = 16 * 1024 * 1024


def _read_key_file(path: str, what: str, error: type[Exception]) -> bytes:
    """A recipients or identity file, read whole; anything larger than any real one is refused."""
    try:
        with open(path, "rb") as f:
            data = f.read(_KEY_FILE_LIMIT + 1)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror}.") from None
    if len(data) > _KEY_FILE_LIMIT:
        raise error(f"{path}: {what} is too large.")
    return data
