"""The dataset secret, and wrapping per-file secrets under it.

Why a dataset secret
--------------------
A stored stream must be regenerated, byte for byte, on every read (invariant 1),
so each file version's randomness (age: file key, payload nonce, ephemeral
shares, OAEP seeds; OpenPGP: session key, prefix, PKCS#1 padding, ephemeral
keys) must be the same every time. The ciphers derive all of it from one
32-byte random *seed* drawn per file version (see packerfs.crypt.age and
packerfs.crypt.openpgp) and keep only that seed in the index, inside the
opaque *params* blob. The index is not a secret store (invariant 5): the seed
is wrapped here, with authenticated encryption, under the 32-byte dataset
secret kept in ``STATE_DIR/dataset.key`` (mode 0600). Without that file the
index holds no usable key material; with a different one, unwrap() fails
with KeyProblem instead of producing garbage.

Why deterministic regeneration never reuses keystream over different plaintext
------------------------------------------------------------------------------
Regenerating a range re-encrypts the source's current bytes with the same key
and nonce as at scan time. If the source had changed, that would put one
keystream over two plaintexts, which breaks stream ciphers. It cannot leak,
because:

* every block packerfs serves is first hashed and matched to the CID recorded
  at scan time (invariant 2). A block made from changed source bytes does not
  match, so the read fails with EIO before any byte derived from the new
  plaintext leaves packerfs; only ciphertext identical to what was already
  published can ever be emitted, and that reveals nothing new;
* a changed file is a new file version: a rescan calls Cipher.new_file() again,
  which draws a fresh seed (so a new file key and nonce for age, a new session
  key for OpenPGP), so the new content is never published under the old
  keystream.
* Cipher.resume_file() (continuing a file version after an interrupted scan,
  when part of its stream is already in sealed bins) reuses the stored seed
  on purpose, so that the resumed pass reproduces the sealed bytes exactly. It
  is only for the same file version: if the plaintext did change, the resumed
  bytes of the sealed prefix differ from the sealed ones and fail their CIDs
  (the caller compares them and falls back to new_file()), and the rest of the
  stream occupies keystream positions that were never published before.

Wrapped-blob format (version 2)
-------------------------------
::

    0x02 || AES-SIV(k, key, associated data=[context])   (RFC 5297: 16-octet SIV || ciphertext)
    k = HKDF-SHA256(ikm=dataset secret, salt="", info="packerfs/wrap/v2 AES-SIV", 64 octets)

wrap() is for uniformly random keys (at least 16 octets), such as the 32-octet
per-file seeds: 17 octets of overhead, so a wrapped seed is 49 octets. AES-SIV
is deterministic authenticated encryption, the construction RFC 5297 designs
for key wrapping: it needs no nonce (so there is no nonce or salt to store and
no collision budget to track), and the only thing its determinism reveals is
whether two wrapped (key, context) pairs are equal. The wrapped keys are fresh
random values that never repeat, so that reveals nothing. It must not be used
for low-entropy or repeating data, which is why wrap() refuses short inputs.

The caller's ``context`` is authenticated, which binds a wrapped seed to the
stream parameters it belongs to (cipher, plaintext size, recipients), so a
wrapped seed moved into other params does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from packerfs.errors import FormatError, KeyProblem

__all__ = [
    "DATASET_KEY_NAME",
    "SECRET_SIZE",
    "load_or_create_dataset_secret",
    "wrap",
    "unwrap",
    "wrapped_size",
]

DATASET_KEY_NAME = "dataset.key"
SECRET_SIZE = 32

_WRAP_VERSION = 2
_WRAP_INFO = b"packerfs/wrap/v2 AES-SIV"
_SIV_SIZE = 16
_MIN_KEY_SIZE = 16  # wrap() is for random keys of at least 128 bits


def _check_and_read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyProblem(f"{path}: cannot open the dataset secret: {e.strerror}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyProblem(f"{path}: the dataset secret is not a regular file.")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyProblem(
                f"{path}: the dataset secret has mode {mode:04o}, readable by others; "
                f"it must be private to its owner (chmod 600 {path})."
            )
        data = b""
        while len(data) <= SECRET_SIZE:
            piece = os.read(fd, SECRET_SIZE + 1 - len(data))
            if not piece:
                break
            data += piece
    finally:
        os.close(fd)
    if len(data) != SECRET_SIZE:
        raise KeyProblem(
            f"{path}: the dataset secret must be exactly {SECRET_SIZE} bytes, found "
            f"{len(data) if len(data) <= SECRET_SIZE else 'more'}; it is damaged or not a packerfs key."
        )
    return data


def load_or_create_dataset_secret(state_dir: str | os.PathLike[str]) -> bytes:
    """Return the 32-byte secret in ``state_dir/dataset.key``, creating it if absent.

    Creation is atomic: the key is written to a private temporary file and
    hard-linked into place, so a concurrent creator or a crash never leaves a
    short or world-readable key, and an existing key is never replaced. A key
    file with any group/other permission bit set is refused (KeyProblem).
    """
    state_dir = os.fspath(state_dir)
    path = os.path.join(state_dir, DATASET_KEY_NAME)
    try:
        return _check_and_read(path)
    except FileNotFoundError:
        pass
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise KeyProblem(f"{state_dir}: cannot create the state directory: {e.strerror}.") from None
    secret = os.urandom(SECRET_SIZE)
    tmp = os.path.join(state_dir, f".{DATASET_KEY_NAME}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise KeyProblem(f"{path}: cannot create the dataset secret: {e.strerror}.") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # in case the umask or the filesystem widened it
            view = memoryview(secret)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # someone else created it first; use theirs
        except OSError as e:
            raise KeyProblem(f"{path}: cannot create the dataset secret: {e.strerror}.") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    try:
        dfd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return _check_and_read(path)


def wrapped_size(key_size: int) -> int:
    """Length of wrap()'s output for a key of `key_size` octets."""
    return 1 + _SIV_SIZE + key_size


# The AES-SIV object of the last dataset secret used: its key is a pure function of the secret, and
# an AESSIV object holds nothing but that key (each call is independent), so one serves every wrap
# and unwrap of a pack instead of an HKDF and a key schedule per file.
_siv_cache: tuple[bytes, AESSIV] | None = None


def _siv(secret: bytes) -> AESSIV:
    global _siv_cache
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"the dataset secret must be {SECRET_SIZE} bytes")
    cached = _siv_cache
    if cached is not None and hmac.compare_digest(cached[0], secret):
        return cached[1]
    secret = bytes(secret)
    siv = AESSIV(HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_WRAP_INFO).derive(secret))
    _siv_cache = (secret, siv)
    return siv


def wrap(secret: bytes, key: bytes, context: bytes) -> bytes:
    """Encrypt and authenticate a uniformly random `key` (>= 16 octets) under the dataset secret.

    Deterministic (AES-SIV): the same key and context give the same blob, which
    is harmless because `key` is random and never repeats. `context` is
    authenticated, not stored."""
    if len(key) < _MIN_KEY_SIZE:
        raise ValueError("wrap() is for random keys of at least 16 octets")
    return bytes([_WRAP_VERSION]) + _siv(secret).encrypt(key, [context])


def unwrap(secret: bytes, blob: bytes, context: bytes) -> bytes:
    """Inverse of wrap(). Wrong secret or context => KeyProblem; malformed blob => FormatError."""
    if len(blob) < 1 + _SIV_SIZE + _MIN_KEY_SIZE or blob[0] != _WRAP_VERSION:
        raise FormatError("wrapped stream secret is malformed or from an unknown packerfs version")
    try:
        return _siv(secret).decrypt(blob[1:], [context])
    except InvalidTag:
        raise KeyProblem(
            "the stream secrets in the index do not open with this dataset.key "
            "(the index was made with another dataset secret, or it is damaged)."
        ) from None


RUN_SEED_SIZE = 32


def new_run_seed() -> bytes:
    """One random seed per scan run, from which every file version placed in that run gets its seed."""
    return os.urandom(RUN_SEED_SIZE)


def snapshot_seed(run_seed: bytes, snapshot_id: int) -> bytes:
    """The seed of snapshot `snapshot_id`'s sealed body (--hide-names), in the run that drew `run_seed`:
    fresh per run like file_seed's, and kept apart from every file's by its label. The body is
    encrypted once, when it is sealed; its blocks are kept in the index, never regenerated."""
    if len(run_seed) != RUN_SEED_SIZE:
        raise ValueError(f"the run seed must be {RUN_SEED_SIZE} octets")
    return hmac.new(run_seed, b"packerfs snapshot seed\0" + snapshot_id.to_bytes(8, "big"), hashlib.sha256).digest()


def file_seed(run_seed: bytes, version: int) -> bytes:
    """The seed of file version `version` in the run that drew `run_seed`.

    Why this keeps invariant 9 (no keystream is ever used for two plaintexts): the run seed is
    fresh randomness drawn by each scan run and never stored, and a version number is given to
    one file version only within a state, so no two file versions share a seed; a state restored
    from a backup draws a new run seed on its next run. What it buys: any process holding the run
    seed regenerates a version's stream exactly, so a bin sealed on a Dask worker that died is
    sealed again elsewhere to the same bytes.
    """
    if len(run_seed) != RUN_SEED_SIZE:
        raise ValueError(f"the run seed must be {RUN_SEED_SIZE} octets")
    return hmac.new(run_seed, b"packerfs file seed\0" + version.to_bytes(8, "big"), hashlib.sha256).digest()
