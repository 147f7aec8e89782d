"""The hand-made fast paths (HMAC/HKDF on hashlib, the CBOR encoder's type dispatch, the uvarint
table, the cached AES-SIV) against the references they replace, and a golden digest of age
streams made by the code before them: the same seeds must keep giving the same bytes."""

from __future__ import annotations

import hashlib
import hmac
import os
import random

import pytest


def test_hkdf_and_hmac_match_the_references():
    from packerfs.crypt.age_primitives import _hkdf, _hkdf_reference, _hmac_sha256

    rng = random.Random(7)
    for _ in range(500):
        ikm = rng.randbytes(rng.choice([0, 1, 16, 32, 33, 64, 65, 200]))
        salt = rng.choice([None, b"", rng.randbytes(rng.choice([1, 16, 32, 63, 64, 65, 128]))])
        info = rng.randbytes(rng.choice([0, 5, 40, 100]))
        length = rng.choice([1, 16, 31, 32, 33, 64, 100, 255 * 32])
        assert _hkdf(ikm, salt, info, length) == _hkdf_reference(ikm, salt, info, length)
        key = rng.randbytes(rng.choice([0, 1, 32, 64, 65, 200]))
        message = rng.randbytes(rng.choice([0, 1, 64, 1000]))
        assert _hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()
    for bad in (0, 255 * 32 + 1):
        with pytest.raises(ValueError):
            _hkdf(b"k", b"", b"i", bad)


def test_age_streams_are_byte_identical_to_before():
    """Digest of headers, keys, nonces, streams and wrapped seeds made before the fast paths existed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from packerfs.crypt import age
    from packerfs.crypt import secrets as secrets_module

    x = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"x25519 recipient").digest()).public_key()
    ed = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ed25519 recipient").digest()).public_key()
    line = ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    recipients = [age.X25519Recipient(x.public_bytes_raw()), age.parse_recipient(line)]
    cipher = age.AgeCipher(recipients)
    secret = hashlib.sha256(b"dataset secret").digest()
    digest = hashlib.sha256()
    for i in range(20):
        seed = hashlib.sha256(b"seed %d" % i).digest()
        fs = age.FileSecrets.derive(seed, recipients)
        digest.update(fs.header + fs.file_key + fs.nonce)
        data = hashlib.sha256(b"data %d" % i).digest() * (i * 1000)
        wrapped = secrets_module.wrap(secret, seed, age.Params.wrap_context(len(data), cipher.fingerprint))
        params = age.Params(len(data), cipher.fingerprint, wrapped).encode()
        encryptor = age.AgeEncryptor(fs.header, fs.file_key, fs.nonce, params, len(data))
        digest.update(encryptor.update(data) + encryptor.finish())
        digest.update(encryptor.params())
        # and it opens again, through the cached AES-SIV
        assert cipher.unwrap_seed(params, len(data), secret) == seed
    assert digest.hexdigest() == "ee682a0c20288e3e3714ddf95ff547ba656719b2e822a3168b82335a58e1eaa3"


def test_siv_cache_follows_the_secret():
    from packerfs.crypt import secrets as secrets_module
    from packerfs.errors import KeyProblem

    one, two = os.urandom(32), os.urandom(32)
    key = os.urandom(32)
    blob = secrets_module.wrap(one, key, b"ctx")
    assert secrets_module.unwrap(one, blob, b"ctx") == key
    with pytest.raises(KeyProblem):
        secrets_module.unwrap(two, blob, b"ctx")  # the cached object of `one` is not used for `two`
    assert secrets_module.unwrap(one, blob, b"ctx") == key


def test_cbor_fast_paths_match_the_general_encoder():
    from packerfs.ipld import cbor

    rng = random.Random(11)
    ints = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -1, -24, -25, -256, -2**64]

    def value(depth=0):
        r = rng.random()
        if depth > 2 or r < 0.4:
            return rng.choice(ints + [rng.randrange(-(2**64), 2**64)])
        if r < 0.4:
            return rng.randbytes(rng.choice([0, 1, 23, 24, 255, 256, 70000]))
        if r < 0.5:
            return "é" * rng.choice([0, 5, 23, 24, 300])
        if r < 0.55:
            return rng.choice([None, True, False])
        if r < 0.6:
            return cbor.Link(rng.randbytes(36))
        if r < 0.8:
            return [value(depth + 1) for _ in range(rng.choice([0, 1, 3, 23, 24, 30]) if depth == 0 else 2)]
        return {"k" * rng.randrange(1, 30) + str(i): value(depth + 1)
                for i in range(rng.choice([0, 1, 5, 24, 30]) if depth == 0 else 2)}

    def general(v) -> bytes:
        out = bytearray()
        cbor._encode_general(v, out)
        return bytes(out)

    for _ in range(1000):
        v = value()
        assert cbor.encode(v) == general(v)
    for bad in (2**64, -(2**64) - 1, {1: 2}, 1.5):
        with pytest.raises((cbor.CBORError, ValueError, TypeError)):
            cbor.encode(bad)


def test_uvarint_fast_paths():
    from packerfs.ipld.cid import cid_from_digest, decode_uvarint, encode_uvarint

    for n in list(range(0, 20000)) + [2**21 - 1, 2**21, 2**63, 2**64 - 1]:
        encoded = encode_uvarint(n)
        assert decode_uvarint(encoded) == (n, len(encoded))
    with pytest.raises(ValueError):
        encode_uvarint(-1)
    digest = bytes(range(32))
    for codec in (0x55, 0x70, 0x71, 0x300):
        assert cid_from_digest(codec, digest) == b"\x01" + encode_uvarint(codec) + b"\x12\x20" + digest
