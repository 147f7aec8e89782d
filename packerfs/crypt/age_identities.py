"""age identities: loading age identity files and OpenSSH/PEM private keys, and unwrapping
the file key from the stanzas addressed to them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from abc import ABC, abstractmethod

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from packerfs.crypt import bech32
from packerfs.crypt.age_header import FILE_KEY_SIZE, Stanza
from packerfs.crypt.age_primitives import (
    _ED25519_INFO,
    _RSA_LABEL,
    _X25519_INFO,
    _aead_open,
    _b64decode,
    _hkdf,
    _read_key_file,
    _ssh_fingerprint,
    _ssh_public_wire,
    _ssh_string,
    _ssh_tag,
    _x25519,
)
from packerfs.errors import FormatError, KeyProblem


class Identity(ABC):
    """Something that can unwrap the file key from a stanza addressed to it."""

    type: str
    source: str = "?"

    @abstractmethod
    def unwrap(self, stanza: Stanza) -> bytes | None:
        """The file key, or None if the stanza is not for this identity.

        A stanza of this identity's type that is malformed, or that names this
        identity (by tag) but fails to open, raises FormatError.
        """


def _stanza_error(stanza: Stanza, what: str) -> FormatError:
    return FormatError(f"age header: {stanza.type} stanza {what}", offset=stanza.offset)


def _ephemeral_share(stanza: Stanza, args: int) -> bytes:
    """The 32-byte ephemeral share that is the last of a stanza's `args` arguments."""
    if len(stanza.args) != args:
        raise _stanza_error(stanza, "has the wrong number of arguments")
    try:
        share = _b64decode(stanza.args[-1])
    except ValueError:
        share = b""
    if len(share) != 32:
        raise _stanza_error(stanza, "has a malformed ephemeral share")
    return share


def _check_file_key(stanza: Stanza, key: bytes) -> bytes:
    if len(key) != FILE_KEY_SIZE:
        raise _stanza_error(stanza, "carries a file key of the wrong size")
    return key


class X25519Identity(Identity):
    type = "X25519"

    def __init__(self, secret: bytes, source: str = "?"):
        self._secret = secret
        self.public_key = _x25519(secret, (9).to_bytes(32, "little"))
        self.source = source

    @classmethod
    def from_string(cls, s: str, source: str = "?") -> "X25519Identity":
        hrp, data = bech32.decode(s)
        if hrp != "age-secret-key-" or s != s.upper() or len(data) != 32:
            raise ValueError("not an AGE-SECRET-KEY-1… identity")
        return cls(data, source)

    def to_string(self) -> str:
        return bech32.encode("age-secret-key-", self._secret, upper=True)

    @property
    def recipient(self) -> str:
        return bech32.encode("age", self.public_key)

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != "X25519":
            return None
        share = _ephemeral_share(stanza, 2)
        if len(stanza.body) != 32:
            raise _stanza_error(stanza, "has a body of the wrong size")
        try:
            shared = _x25519(self._secret, share)
        except ValueError:
            raise _stanza_error(stanza, "has a low-order ephemeral share") from None
        key = _aead_open(_hkdf(shared, share + self.public_key, _X25519_INFO), stanza.body)
        return None if key is None else _check_file_key(stanza, key)


class SshRsaIdentity(Identity):
    type = "ssh-rsa"

    def __init__(self, key: rsa.RSAPrivateKey, source: str = "?"):
        self._key = key
        self.wire = _ssh_public_wire(key.public_key())
        self.tag = _ssh_tag(self.wire)
        self.source = source

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != "ssh-rsa":
            return None
        if len(stanza.args) != 2:
            raise _stanza_error(stanza, "has the wrong number of arguments")
        if stanza.args[1] != self.tag:
            return None
        try:
            key = self._key.decrypt(
                stanza.body,
                padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=_RSA_LABEL),
            )
        except ValueError:
            what = f"for key {_ssh_fingerprint(self.wire)} does not decrypt (damaged header)"
            raise _stanza_error(stanza, what) from None
        return _check_file_key(stanza, key)


class SshEd25519Identity(Identity):
    type = "ssh-ed25519"

    def __init__(self, key: ed25519.Ed25519PrivateKey, source: str = "?"):
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        self._secret = hashlib.sha512(seed).digest()[:32]
        self.x25519_public = _x25519(self._secret, (9).to_bytes(32, "little"))
        self.wire = _ssh_public_wire(key.public_key())
        self.tag = _ssh_tag(self.wire)
        self._tweak = _hkdf(b"", self.wire, _ED25519_INFO)
        self.source = source

    def unwrap(self, stanza: Stanza) -> bytes | None:
        if stanza.type != "ssh-ed25519":
            return None
        share = _ephemeral_share(stanza, 3)
        if stanza.args[1] != self.tag:
            return None
        if len(stanza.body) != 32:
            raise _stanza_error(stanza, "has a body of the wrong size")
        try:
            shared = _x25519(self._tweak, _x25519(self._secret, share))
        except ValueError:
            raise _stanza_error(stanza, "has a low-order ephemeral share") from None
        key = _aead_open(_hkdf(shared, share + self.x25519_public, _ED25519_INFO), stanza.body)
        if key is None:
            raise _stanza_error(stanza, f"for key {_ssh_fingerprint(self.wire)} does not decrypt (damaged header)")
        return _check_file_key(stanza, key)


_ENCRYPTED_SSH_HINT = (
    "packerfs cannot prompt for passphrases; decrypt a private copy with "
    "`cp KEY KEY.nopass && ssh-keygen -p -N '' -f KEY.nopass` (keep it mode 0600) and pass that, "
    "or use an age identity (packerfs keygen)"
)


def _openssh_is_encrypted(pem: bytes) -> bool:
    body = b"".join(
        line.strip() for line in pem.splitlines() if line.strip() and not line.startswith(b"-----")
    )
    try:
        blob = base64.b64decode(body)
    except binascii.Error:
        return False
    magic = b"openssh-key-v1\x00"
    if not blob.startswith(magic):
        return False
    try:
        cipher, _ = _ssh_string(blob, len(magic))
    except ValueError:
        return False
    return cipher != b"none"


def _ssh_identity(data: bytes, path: str) -> Identity:
    text = data.lstrip()
    if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        if _openssh_is_encrypted(text):
            raise KeyProblem(f"{path}: this OpenSSH private key is passphrase-protected; {_ENCRYPTED_SSH_HINT}.")
        loader = serialization.load_ssh_private_key
    elif text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") or (
        b"Proc-Type: 4,ENCRYPTED" in text[:512]
    ):
        raise KeyProblem(f"{path}: this private key is passphrase-protected; {_ENCRYPTED_SSH_HINT}.")
    elif text.startswith((b"-----BEGIN RSA PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY-----")):
        loader = serialization.load_pem_private_key
    else:
        raise KeyProblem(
            f"{path}: unsupported private key format; use an OpenSSH (RSA or Ed25519) key or an age identity."
        )
    try:
        key = loader(data, password=None)
    except TypeError:
        raise KeyProblem(f"{path}: this private key is passphrase-protected; {_ENCRYPTED_SSH_HINT}.") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        why = str(e).splitlines()[0] if str(e) else "malformed"
        raise KeyProblem(f"{path}: cannot read the private key ({why}).") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return SshRsaIdentity(key, path)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return SshEd25519Identity(key, path)
    kind = type(key).__name__.lstrip("_")
    raise KeyProblem(f"{path}: only RSA and Ed25519 SSH keys can be age identities, not {kind}.")


def parse_identities(data: bytes, path: str) -> list[Identity]:
    """Identities from one file's bytes: an age identity file, or an OpenSSH/PEM private key."""
    head = data.lstrip()
    if head.startswith((b"age-encryption.org/", b"-----BEGIN AGE ENCRYPTED FILE-----")):
        raise KeyProblem(
            f"{path}: passphrase-encrypted identity files are not supported; "
            "decrypt it with `age -d` to a mode-0600 file first."
        )
    if head.startswith(b"-----BEGIN"):
        return [_ssh_identity(data, path)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyProblem(f"{path}: not an age identity file or a private key.") from None
    out: list[Identity] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("AGE-PLUGIN-") or line.startswith("AGE-SECRET-KEY-PQ-"):
            raise KeyProblem(
                f"{path} line {lineno}: plugin and post-quantum age identities are not supported; "
                "use an X25519 identity (AGE-SECRET-KEY-1…)."
            )
        try:
            out.append(X25519Identity.from_string(line, path))
        except ValueError:
            raise KeyProblem(f"{path} line {lineno}: not an age identity (expected AGE-SECRET-KEY-1…).") from None
    if not out:
        raise KeyProblem(f"{path}: no identities found in the file.")
    return out


def load_identity_file(path: str) -> list[Identity]:
    return parse_identities(_read_key_file(path, "identity file", KeyProblem), path)
