"""Sealed manifests: a bin's manifest (or snapshot) as an encrypted stream stock tools decrypt.

With --hide-names the real tree lives in `.packerfs/manifest.cbor.age` (or `.gpg`): the
manifest's bytes encrypted for the pack's recipients by the pack's own cipher, so
`age -d -i KEY manifest.cbor.age` (or `gpg -d`) gives the CBOR back. Sealing goes through
the Cipher interface (Cipher.new_file with a caller-given seed), so age and OpenPGP are the
same code; nothing of age or OpenPGP is re-implemented here.

Determinism (invariant 1). The stream is a pure function of the manifest, the cipher's
recipients and the dataset secret::

    k    = HKDF-SHA256(ikm=dataset secret, salt="", info="packerfs/sealed-manifest/v1 seed key", 32)
    seed = HMAC-SHA256(k, "packerfs/sealed-manifest/v1\\0" || lp(kind) || lp(cipher name)
                          || lp(recipients fingerprint) || u64be(bin number) || u64be(len) || data)
    stream = cipher.new_file(len(data), dataset secret, seed) over data    (lp: u8 length || octets)

and the cipher derives its file key, nonce and stanza randomness (age) or session key,
prefix and PKESK randomness (OpenPGP) from the seed, as for every file.

Why a content-keyed seed (invariant 9: no keystream over two plaintexts). The seed is a
keyed hash of the plaintext itself, the safe kind DESIGN names, not of metadata: a bin number
alone could repeat with other contents (a bin sealed again after an interrupted scan whose
source changed, or a state restored from a backup), which would publish two manifests under
one keystream. Here different manifests get different seeds (but with probability 2^-128),
and the same manifest in the same bin for the same recipients gets the same stream, which
reveals only that equality. The bin number and `kind` ("manifest", "snapshot") keep the
seeds of different bins and documents apart even for equal bytes.

No key material in the CAR (invariant 5). The sealed stream is a standard age/OpenPGP
message: the file or session key appears only wrapped to the recipients, as in every
stream. ManifestSealer.seal also returns the params blob new_file() makes (the seed
wrapped under the dataset secret, as every file version's params), which the pack's
index keeps with the compressed plaintext, so that BinReader generates the sealed
stream's bytes again through Cipher.open_stream instead of storing ciphertext, which
does not compress.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from packerfs.crypt import KeyRing, iter_plaintext, open_plaintext
from packerfs.crypt.base import Cipher
from packerfs.crypt.secrets import SECRET_SIZE
from packerfs.errors import FormatError, UsageError

__all__ = ["MANIFEST_NAME", "ManifestSealer", "sealed_name", "seed_key", "manifest_seed", "seal_manifest", "open_manifest"]

MANIFEST_NAME = ".packerfs/manifest.cbor"
_SEED_KEY_INFO = b"packerfs/sealed-manifest/v1 seed key"
_DOMAIN = b"packerfs/sealed-manifest/v1\x00"
_ENCRYPTING = ("age", "openpgp")
_STEP = 1 << 20


def _lp(b: bytes) -> bytes:
    if len(b) > 255:
        raise ValueError("label too long")
    return bytes([len(b)]) + b


def sealed_name(cipher: Cipher, name: str = MANIFEST_NAME) -> str:
    """`.packerfs/manifest.cbor.age` / `.gpg`: where the sealed document goes in the bin."""
    return name + cipher.suffix


def seed_key(secret: bytes) -> bytes:
    """k of the module docstring: the HMAC key of every sealed document's seed."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEED_KEY_INFO).derive(bytes(secret))


def manifest_seed(cipher: Cipher, secret: bytes, bin_number: int, data: bytes, kind: str = "manifest") -> bytes:
    """The 32-octet seed the sealed stream of `data` is made from (see the module docstring)."""
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"the dataset secret must be {SECRET_SIZE} octets")
    if not 0 <= bin_number < 1 << 64:
        raise ValueError(f"bin number {bin_number} is out of range")
    key = seed_key(secret)
    fingerprint = bytes(getattr(cipher, "fingerprint", b""))
    h = hmac.new(key, _DOMAIN, hashlib.sha256)
    h.update(_lp(kind.encode("ascii")) + _lp(cipher.name.encode("ascii")) + _lp(fingerprint))
    h.update(bin_number.to_bytes(8, "big") + len(data).to_bytes(8, "big"))
    h.update(data)
    return h.digest()


def seal_manifest(cipher: Cipher, secret: bytes, bin_number: int, data: bytes, kind: str = "manifest") -> bytes:
    """`data` encrypted for `cipher`'s recipients: an age file or OpenPGP message, deterministic.

    The same (cipher recipients, secret, bin number, kind, data) give the same bytes;
    anything else different bytes. UsageError for a cipher that does not encrypt."""
    return _seal(cipher, secret, bin_number, data, kind)[0]


def _seal(cipher: Cipher, secret: bytes, bin_number: int, data: bytes, kind: str) -> tuple[bytes, bytes]:
    """(stream, params): seal_manifest's stream and the params that open_stream regenerates it from."""
    if cipher.name not in _ENCRYPTING:
        raise UsageError("hidden names need encryption: a sealed manifest is for age or OpenPGP recipients.")
    data = bytes(data)
    enc = cipher.new_file(len(data), secret, seed=manifest_seed(cipher, secret, bin_number, data, kind))
    view = memoryview(data)
    out = [enc.update(view[i : i + _STEP]) for i in range(0, len(data), _STEP)]
    out.append(enc.finish())
    stream = b"".join(out)
    if len(stream) != cipher.stream_size(len(data)):  # never expected
        raise RuntimeError("sealed manifest stream has the wrong length")
    return stream, enc.params()


class _Bytes:
    __slots__ = ("_data",)

    def __init__(self, data: bytes):
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + size])


def open_manifest(keyring: KeyRing, cipher_name: str, data: bytes, name: str | None = None) -> bytes:
    """The plaintext of a sealed manifest, authenticated (age tags, OpenPGP MDC), for `keyring`.

    `name` (e.g. "bin-000007.car: .packerfs/manifest.cbor.age") goes into error messages.
    KeyProblem (one line) if no key in `keyring` opens it; FormatError if it is damaged."""
    if name is None:
        name = MANIFEST_NAME + {"age": ".age", "openpgp": ".gpg"}.get(cipher_name, "")
    if cipher_name not in _ENCRYPTING:
        raise FormatError(f"a sealed manifest must be encrypted (age or openpgp), not {cipher_name!r}", path=name)
    plain = open_plaintext(_Bytes(data), keyring, cipher_name, name=name)
    return b"".join(iter_plaintext(plain))


class ManifestSealer:
    """What a bin layout needs to store its manifest sealed (--hide-names): the sealed stream's size
    for the budget, its suffix for the name, and the sealing itself. It travels to Dask workers with
    the bin (the dataset secret inside it is never written there)."""

    def __init__(self, cipher: Cipher, secret: bytes):
        if cipher.name not in _ENCRYPTING:
            raise UsageError("--hide-names needs encryption (-r, -R or --gpg-recipient): the real names go into "
                             "an encrypted manifest")
        self.cipher = cipher
        self.secret = secret
        self.suffix = cipher.suffix

    def stream_size(self, length: int) -> int:
        return self.cipher.stream_size(length)

    def seal(self, bin_number: int, data: bytes, kind: str = "manifest") -> tuple[bytes, bytes]:
        """(the sealed stream, its params for Cipher.open_stream over `data`)."""
        return _seal(self.cipher, self.secret, bin_number, data, kind)
