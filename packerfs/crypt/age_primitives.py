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


# HMAC-SHA256 and HKDF-SHA256 (RFC 2104, RFC 5869) on hashlib, byte for byte what `hmac` and
# cryptography's HKDF compute (the tests compare them). Every new OpenSSL hash object costs a
# provider fetch (~2 µs here), a copy of an existing one does not; with one file version costing
# half a dozen HKDFs, that was a good part of each small file's time. So hash objects are only
# ever copied from _SHA256, and a key's padded inner and outer states are kept (_hmac_pads) where
# one key serves several messages. Nothing is cached across keys except the zero key's pads (the
# empty salt of HKDF): a public constant.
_SHA256 = hashlib.sha256()
_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _sha256(data: bytes) -> bytes:
    h = _SHA256.copy()
    h.update(data)
    return h.digest()


def _hmac_pads(key: bytes):
    """HMAC-SHA256's two keyed states for `key`: hash objects after (key ^ ipad) and (key ^ opad)."""
    key = bytes(key)
    if len(key) > _BLOCK:
        key = _sha256(key)
    key = key.ljust(_BLOCK, b"\0")
    inner = _SHA256.copy()
    inner.update(key.translate(_IPAD))
    outer = _SHA256.copy()
    outer.update(key.translate(_OPAD))
    return inner, outer


def _hmac_with(pads, message: bytes) -> bytes:
    """HMAC-SHA256 of `message` under the key whose pads these are."""
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return _hmac_with(_hmac_pads(key), message)


_ZERO_KEY_PADS = _hmac_pads(b"")  # HKDF's salt when none is given: HashLen zero octets (RFC 5869 2.2)


def _hkdf_prk(ikm: bytes, salt: bytes | None):
    """HKDF-Extract, returned as the pads of the PRK (what every Expand step is keyed with)."""
    pads = _hmac_pads(salt) if salt else _ZERO_KEY_PADS
    return _hmac_pads(_hmac_with(pads, ikm))


def _hkdf_expand(prk_pads, info: bytes, length: int = 32) -> bytes:
    """HKDF-Expand with the PRK's pads (from _hkdf_prk)."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 cannot derive {length} octets")
    if length <= 32:
        return _hmac_with(prk_pads, info + b"\x01")[:length]
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = _hmac_with(prk_pads, block + info + bytes([counter]))
        out += block
        counter += 1
    return out[:length]


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869); an empty or absent salt is HashLen zero octets."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 cannot derive {length} octets")
    return _hkdf_expand(_hkdf_prk(bytes(ikm), salt), bytes(info), length)


def _hkdf_reference(ikm: bytes, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """The same through cryptography's HKDF (what the tests check _hkdf against)."""
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
