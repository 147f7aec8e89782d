"""age recipients: parsing age1…, ssh-rsa and ssh-ed25519 recipients and recipient files,
and wrapping a file key into a stanza for each.

Written from the age specification (c2sp.org/age) and the documented ssh-rsa /
ssh-ed25519 recipient types of the reference implementation.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from packerfs.crypt import bech32
from packerfs.crypt.age_header import Stanza
from packerfs.crypt.age_primitives import (
    _ED25519_INFO,
    _RSA_LABEL,
    _X25519_INFO,
    _aead_seal,
    _b64decode,
    _b64encode,
    _hkdf,
    _read_key_file,
    _ssh_fingerprint,
    _ssh_string,
    _ssh_tag,
    _x25519,
)
from packerfs.errors import UsageError

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384


# --------------------------------------------------------------------------- helpers


def _ephemeral(scalar: bytes, peer: X25519PublicKey) -> tuple[bytes, bytes]:
    """-> (share = X25519(scalar, basepoint), shared secret = X25519(scalar, peer)); ValueError if all zeros.

    One key object for both: loading the scalar computes its public share with
    the fixed-base method, half the cost of a second variable-base X25519."""
    eph = X25519PrivateKey.from_private_bytes(scalar)
    return eph.public_key().public_bytes_raw(), eph.exchange(peer)


_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P


def _ed25519_to_x25519_public(pub: bytes) -> bytes:
    """Birational map of an Ed25519 public key to its Montgomery u-coordinate, u = (1+y)/(1-y)."""
    if len(pub) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(pub, "little") & ((1 << 255) - 1)
    if y >= _P or y == 1:
        raise ValueError("invalid Ed25519 public key")
    y2 = y * y % _P
    x2 = (y2 - 1) * pow((_D * y2 + 1) % _P, _P - 2, _P) % _P
    if x2 and pow(x2, (_P - 1) // 2, _P) != 1:
        raise ValueError("Ed25519 public key is not a point on the curve")
    u = (1 + y) * pow((1 - y) % _P, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


# RSAES-OAEP -----------------------------------------------------------------


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    """MGF1 with SHA-256 (RFC 8017 B.2.1)."""
    out = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-length // 32)))
    return out[:length]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def rsa_oaep_sha256_encrypt(n: int, e: int, message: bytes, label: bytes, seed: bytes) -> bytes:
    """RSAES-OAEP-ENCRYPT (RFC 8017 7.1.1) with SHA-256 and MGF1-SHA-256, using the caller's OAEP seed.

    `seed` is the hLen = 32 random octets that EME-OAEP encoding draws; given
    it, the ciphertext is a pure function of the inputs. The RSA public
    operation is pow(m, e, n) (no secret is involved, so timing does not
    matter). Returns the k-octet ciphertext, k = the modulus length in octets.
    """
    h = 32
    k = (n.bit_length() + 7) // 8
    if len(seed) != h:
        raise ValueError("the OAEP seed must be 32 octets")
    if len(message) > k - 2 * h - 2:
        raise ValueError("message too long for this RSA key")
    db = hashlib.sha256(label).digest() + bytes(k - len(message) - 2 * h - 2) + b"\x01" + message
    masked_db = _xor(db, _mgf1_sha256(seed, k - h - 1))
    masked_seed = _xor(seed, _mgf1_sha256(masked_db, h))
    m = int.from_bytes(masked_seed + masked_db, "big")  # EM = 0x00 || maskedSeed || maskedDB; m < n
    return pow(m, e, n).to_bytes(k, "big")


# --------------------------------------------------------------------------- recipients


class Recipient(ABC):
    """Something the file key can be wrapped to."""

    type: str

    @abstractmethod
    def wrap(self, file_key: bytes, rand: bytes) -> Stanza:
        """The stanza for `file_key`; `rand` (32 uniformly random octets) is all the randomness it uses."""

    @property
    @abstractmethod
    def key_bytes(self) -> bytes:
        """The public key as packerfs fingerprints it (see AgeCipher.fingerprint)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Stable public name of this recipient (for the manifest)."""


class X25519Recipient(Recipient):
    type = "X25519"

    def __init__(self, public_key: bytes):
        if len(public_key) != 32:
            raise ValueError("an X25519 recipient is 32 bytes")
        self.public_key = public_key
        self._peer = X25519PublicKey.from_public_bytes(public_key)

    def __reduce__(self):  # the key object does not pickle; its 32 bytes do (tasks sent to Dask workers)
        return (type(self), (self.public_key,))

    @classmethod
    def from_string(cls, s: str) -> "X25519Recipient":
        hrp, data = bech32.decode(s)
        if hrp != "age" or len(data) != 32:
            raise ValueError("not an age1… recipient")
        return cls(data)

    @property
    def fingerprint(self) -> str:
        return bech32.encode("age", self.public_key)

    @property
    def key_bytes(self) -> bytes:
        return self.public_key

    def wrap(self, file_key: bytes, rand: bytes) -> Stanza:
        share, shared = _ephemeral(rand, self._peer)  # any 32 octets are a scalar (X25519 clamps)
        key = _hkdf(shared, share + self.public_key, _X25519_INFO)
        return Stanza(["X25519", _b64encode(share)], _aead_seal(key, file_key))


class SshRsaRecipient(Recipient):
    type = "ssh-rsa"

    def __init__(self, wire: bytes):
        kind, pos = _ssh_string(wire, 0)
        e_raw, pos = _ssh_string(wire, pos)
        n_raw, pos = _ssh_string(wire, pos)
        if kind != b"ssh-rsa" or pos != len(wire):
            raise ValueError("malformed ssh-rsa key")
        e, n = int.from_bytes(e_raw, "big"), int.from_bytes(n_raw, "big")
        if not (MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS):
            raise ValueError(
                f"RSA key of {n.bit_length()} bits; use at least {MIN_RSA_BITS} bits (4096 recommended)"
            )
        if e < 3 or e % 2 == 0:
            raise ValueError("malformed ssh-rsa key (bad exponent)")
        rsa.RSAPublicNumbers(e, n).public_key()  # cryptography's own sanity checks (ValueError)
        self.wire = wire
        self.e, self.n = e, n

    @property
    def fingerprint(self) -> str:
        return "ssh-rsa " + _ssh_fingerprint(self.wire)

    @property
    def key_bytes(self) -> bytes:
        return self.wire

    def wrap(self, file_key: bytes, rand: bytes) -> Stanza:
        body = rsa_oaep_sha256_encrypt(self.n, self.e, file_key, _RSA_LABEL, rand)
        return Stanza(["ssh-rsa", _ssh_tag(self.wire)], body)


class SshEd25519Recipient(Recipient):
    type = "ssh-ed25519"

    def __init__(self, wire: bytes):
        kind, pos = _ssh_string(wire, 0)
        pub, pos = _ssh_string(wire, pos)
        if kind != b"ssh-ed25519" or pos != len(wire):
            raise ValueError("malformed ssh-ed25519 key")
        self.wire = wire
        self.x25519_public = _ed25519_to_x25519_public(pub)
        self._peer = X25519PublicKey.from_public_bytes(self.x25519_public)
        self._tweak = _hkdf(b"", self.wire, _ED25519_INFO)
        try:
            _x25519(os.urandom(32), self.x25519_public)
        except ValueError:
            raise ValueError("ssh-ed25519 key is a low-order point") from None

    def __reduce__(self):  # rebuilt from its wire form on a Dask worker
        return (type(self), (self.wire,))

    @property
    def fingerprint(self) -> str:
        return "ssh-ed25519 " + _ssh_fingerprint(self.wire)

    @property
    def key_bytes(self) -> bytes:
        return self.wire

    def wrap(self, file_key: bytes, rand: bytes) -> Stanza:
        share, shared = _ephemeral(rand, self._peer)
        shared = _x25519(self._tweak, shared)
        key = _hkdf(shared, share + self.x25519_public, _ED25519_INFO)
        return Stanza(["ssh-ed25519", _ssh_tag(self.wire), _b64encode(share)], _aead_seal(key, file_key))


_SSH_TYPES = {"ssh-rsa": SshRsaRecipient, "ssh-ed25519": SshEd25519Recipient}


def _short(s: str, limit: int = 60) -> str:
    s = s.strip()
    return repr(s if len(s) <= limit else s[: limit - 1] + "…")


def parse_recipient(text: str, where: str | None = None) -> Recipient:
    """One recipient: ``age1…``, or an SSH public key line (authorized_keys options allowed).

    Raises UsageError naming `where` (e.g. "keys.txt line 3") when the text is not usable.
    """
    s = text.strip()
    prefix = f"{where}: " if where else ""
    if s.startswith("age1"):
        try:
            hrp, _ = bech32.decode(s)
        except ValueError as e:
            raise UsageError(f"{prefix}{_short(s)} is not a valid age recipient ({e}).") from None
        if hrp != "age":
            raise UsageError(
                f"{prefix}{_short(s)} is an age plugin or post-quantum recipient; packerfs supports "
                "X25519 (age1…), ssh-rsa and ssh-ed25519 recipients."
            )
        try:
            return X25519Recipient.from_string(s)
        except ValueError as e:
            raise UsageError(f"{prefix}{_short(s)} is not a valid age recipient ({e}).") from None
    tokens = s.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                wire = _b64decode(tokens[i + 1].rstrip("="))
                kind, _ = _ssh_string(wire, 0)
            except ValueError:
                continue
            if kind.decode("ascii", "replace") != tok:
                raise UsageError(f"{prefix}{_short(s)}: the key data does not match its type {tok}.")
            cls = _SSH_TYPES.get(tok)
            if cls is None:
                raise UsageError(
                    f"{prefix}SSH keys of type {tok} cannot be age recipients; use ssh-ed25519, "
                    "ssh-rsa (4096 bits), or an age key (packerfs keygen)."
                )
            try:
                return cls(wire)
            except ValueError as e:
                raise UsageError(f"{prefix}unusable {tok} recipient: {e}.") from None
    raise UsageError(
        f"{prefix}{_short(s)} is not an age recipient (age1…) or an SSH public key "
        "(ssh-ed25519 …, ssh-rsa …)."
    )


def parse_recipients_text(text: str, source: str) -> list[Recipient]:
    """A recipients file as `age -R` reads it: one per line, '#' comments, blank lines."""
    out: list[Recipient] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(parse_recipient(line, f"{source} line {lineno}"))
    if not out:
        raise UsageError(f"{source}: no recipients found in the file.")
    return out


def read_recipients_file(path: str) -> list[Recipient]:
    raw = _read_key_file(path, "recipients file", UsageError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: recipients file is not text.") from None
    return parse_recipients_text(text, path)
