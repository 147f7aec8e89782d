"""Plain cipher, dataset secret, wrapping, key generation and make_cipher()."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading

import pytest

from conftest import Bytes

from packerfs.crypt import (
    KeyRing,
    PlainCipher,
    load_or_create_dataset_secret,
    make_cipher,
    open_plaintext,
    write_age_identity,
)
from packerfs.crypt import secrets as psecrets
from packerfs.crypt import age as agemod
from packerfs.crypt.age import AgeCipher, X25519Identity, read_header
from packerfs.errors import FormatError, KeyProblem, PackerfsError, UsageError

HAVE_AGE = shutil.which("age") is not None and shutil.which("age-keygen") is not None


# ----------------------------------------------------------------- plain


def test_plain_cipher_is_identity():
    c = PlainCipher()
    assert (c.name, c.suffix, c.recipients) == ("plain", "", [])
    data = os.urandom(200_001)
    assert c.stream_size(len(data)) == len(data)
    enc = c.new_file(len(data), b"")
    out = enc.update(data[:5]) + enc.update(data[5:]) + enc.finish()
    assert out == data
    s = c.open_stream(enc.params(), len(data), lambda o, n: data[o : o + n], b"")
    assert s.size == len(data)
    assert s.read(0, s.size) == data
    assert s.read(1000, 70000) == data[1000:71000]
    assert s.read(len(data) - 3, 10) == data[-3:]
    assert s.read(len(data) + 5, 10) == b""
    assert open_plaintext(s, KeyRing(), "plain") is s
    enc = c.new_file(3, b"")
    with pytest.raises(PackerfsError):
        enc.update(b"abcd")
    assert make_cipher(no_encryption=True).name == "plain"


# ----------------------------------------------------------------- dataset secret


def test_dataset_secret_created_0600_and_stable(tmp_path):
    old = os.umask(0)  # even with a permissive umask
    try:
        s1 = load_or_create_dataset_secret(tmp_path / "state")
    finally:
        os.umask(old)
    path = tmp_path / "state" / "dataset.key"
    assert len(s1) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == s1
    assert load_or_create_dataset_secret(str(tmp_path / "state")) == s1
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["dataset.key"]  # no temp files left


def test_dataset_secret_refuses_group_or_other_bits(tmp_path):
    load_or_create_dataset_secret(tmp_path)
    path = tmp_path / "dataset.key"
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(KeyProblem) as ei:
            load_or_create_dataset_secret(tmp_path)
        assert "chmod 600" in str(ei.value) and "\n" not in str(ei.value)
    os.chmod(path, 0o600)
    load_or_create_dataset_secret(tmp_path)


def test_dataset_secret_wrong_size(tmp_path):
    path = tmp_path / "dataset.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(KeyProblem):
        load_or_create_dataset_secret(tmp_path)


def test_dataset_secret_concurrent_creation_agrees(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_dataset_secret(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


def test_wrap_unwrap():
    secret = os.urandom(32)
    seed = os.urandom(32)
    blob = psecrets.wrap(secret, seed, b"ctx")
    assert len(blob) == psecrets.wrapped_size(32) == 49
    assert seed not in blob and secret not in blob
    assert psecrets.unwrap(secret, blob, b"ctx") == seed
    # deterministic (AES-SIV): harmless for random keys, which never repeat
    assert psecrets.wrap(secret, seed, b"ctx") == blob
    assert psecrets.wrap(secret, os.urandom(32), b"ctx") != blob
    assert psecrets.wrap(secret, seed, b"other context") != blob
    with pytest.raises(ValueError):
        psecrets.wrap(secret, b"short", b"ctx")  # only for random keys
    with pytest.raises(KeyProblem):
        psecrets.unwrap(os.urandom(32), blob, b"ctx")
    with pytest.raises(KeyProblem):
        psecrets.unwrap(secret, blob, b"other context")
    for pos in (1, 20, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[pos] ^= 1
        with pytest.raises(KeyProblem):
            psecrets.unwrap(secret, bytes(tampered), b"ctx")
    with pytest.raises(FormatError):
        psecrets.unwrap(secret, blob[:10], b"ctx")
    with pytest.raises(FormatError):
        psecrets.unwrap(secret, b"\x01" + blob[1:], b"ctx")  # the old (salted) wrap format


def _ssh_ed25519_pair():
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    line = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return agemod.SshEd25519Identity(key), line


def _ssh_rsa_pair(bits: int = 2048):
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, bits)
    line = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return agemod.SshRsaIdentity(key), line


def test_params_blob_holds_no_usable_key():
    """The index holds only the wrapped seed: no seed, file key, payload key, nonce or stanza randomness."""
    x = X25519Identity(os.urandom(32))
    ed, ed_line = _ssh_ed25519_pair()
    rs, rs_line = _ssh_rsa_pair()
    cipher = make_cipher([x.recipient, ed_line, rs_line])
    secret = os.urandom(32)
    data = os.urandom(100_000)
    enc = cipher.new_file(len(data), secret)
    stream = enc.update(data) + enc.finish()
    params = enc.params()
    assert len(params) == 1 + 3 + 8 + 49  # version, uvarint(100000), recipients fingerprint, wrapped seed
    header = read_header(Bytes(stream))
    nonce = stream[header.size : header.size + 16]
    file_keys = {ident.unwrap(st) for ident, st in zip((x, ed, rs), header.stanzas)}
    assert len(file_keys) == 1
    file_key = file_keys.pop()
    assert file_key is not None and len(file_key) == 16
    seed = cipher.unwrap_seed(params, len(data), secret)
    fs = agemod.FileSecrets.derive(seed, cipher._recipients)
    assert (fs.file_key, fs.nonce, fs.header) == (file_key, nonce, header.raw)
    rands = [agemod._derive(seed, b"stanza " + i.to_bytes(4, "big"), 32) for i in range(3)]
    needles = [seed, file_key, agemod.payload_key(file_key, nonce), nonce, secret, *rands]
    needles += [st.body for st in header.stanzas]  # the header is not stored either (it is regenerated)
    for needle in needles:
        for i in range(0, len(needle) - 7):
            assert needle[i : i + 8] not in params  # not even 8 octets of any of them


# ----------------------------------------------------------------- keygen


def test_write_age_identity(tmp_path):
    path = tmp_path / "key.txt"
    recipient = write_age_identity(path)
    assert recipient.startswith("age1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# created: ")
    assert lines[1] == f"# public key: {recipient}"
    assert lines[2].startswith("AGE-SECRET-KEY-1")
    with pytest.raises(UsageError):
        write_age_identity(path)
    assert path.read_text().splitlines() == lines  # untouched


@pytest.mark.interop
@pytest.mark.skipif(not HAVE_AGE, reason="age is not installed")
def test_stock_age_accepts_written_identity(tmp_path):
    path = tmp_path / "key.txt"
    recipient = write_age_identity(path)
    assert subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True).stdout.decode().strip() == recipient
    src = tmp_path / "msg"
    src.write_bytes(b"hello packerfs\n")
    subprocess.run(["age", "-r", recipient, "-o", str(tmp_path / "msg.age"), str(src)], check=True)
    out = subprocess.run(["age", "-d", "-i", str(path), str(tmp_path / "msg.age")], check=True, capture_output=True)
    assert out.stdout == b"hello packerfs\n"
    # and our own stream, keyed to it, decrypts with it too
    data = os.urandom(70_000)
    enc = make_cipher([recipient]).new_file(len(data), os.urandom(32))
    (tmp_path / "ours.age").write_bytes(enc.update(data) + enc.finish())
    out = subprocess.run(["age", "-d", "-i", str(path), str(tmp_path / "ours.age")], check=True, capture_output=True)
    assert out.stdout == data


# ----------------------------------------------------------------- make_cipher


def test_make_cipher_requires_a_choice():
    with pytest.raises(UsageError) as ei:
        make_cipher()
    msg = str(ei.value)
    for word in ("--recipient", "--gpg-recipient", "--no-encryption", "packerfs keygen"):
        assert word in msg
    assert "\n" not in msg


def test_make_cipher_refuses_mixing(tmp_path):
    r = X25519Identity(os.urandom(32)).recipient
    with pytest.raises(UsageError) as ei:
        make_cipher([r], gpg_recipients=["alice@example.com"])
    assert "mix" in str(ei.value)
    asc = tmp_path / "alice.asc"
    asc.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n-----END PGP PUBLIC KEY BLOCK-----\n")
    with pytest.raises(UsageError):
        make_cipher([r, str(asc)])
    with pytest.raises(UsageError):
        make_cipher([r], no_encryption=True)


def test_make_cipher_age_forms(tmp_path):
    a = X25519Identity(os.urandom(32)).recipient
    b = X25519Identity(os.urandom(32)).recipient
    rfile = tmp_path / "r.txt"
    rfile.write_text(f"# comment\n\n{b}\n")
    c = make_cipher([a, str(rfile)])
    assert isinstance(c, AgeCipher) and (c.name, c.suffix) == ("age", ".age")
    assert c.recipients == [a, b]
    c2 = make_cipher([a], recipients_files=[str(rfile)])
    assert c2.recipients == [a, b]
    with pytest.raises(UsageError):
        make_cipher(["not-a-key-or-file"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# only comments\n")
    with pytest.raises(UsageError):
        make_cipher(recipients_files=[str(empty)])


def test_keyring_and_dispatch_errors(tmp_path):
    with pytest.raises(KeyProblem):
        KeyRing([str(tmp_path / "nope")])
    with pytest.raises(FormatError):
        open_plaintext(Bytes(b""), KeyRing(), "rot13")
