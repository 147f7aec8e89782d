"""Plain cipher, dataset secret, wrapping, key generation and make_cipher()."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading

import pytest

from packerfs.crypt import (
    KeyRing,
    PlainCipher,
    load_or_create_dataset_secret,
    make_cipher,
    open_plaintext,
    write_age_identity,
)
from packerfs.crypt import secrets as psecrets
from packerfs.crypt.age import AgeCipher, X25519Identity, decode_params, read_header
from packerfs.errors import FormatError, KeyProblem, PackerfsError, UsageError

HAVE_AGE = shutil.which("age") is not None and shutil.which("age-keygen") is not None


class Bytes:
    def __init__(self, data: bytes):
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


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
    blob = psecrets.wrap(secret, b"file key material", b"ctx")
    assert b"file key material" not in blob
    assert psecrets.unwrap(secret, blob, b"ctx") == b"file key material"
    assert psecrets.wrap(secret, b"x", b"ctx") != psecrets.wrap(secret, b"x", b"ctx")  # randomized
    with pytest.raises(KeyProblem):
        psecrets.unwrap(os.urandom(32), blob, b"ctx")
    with pytest.raises(KeyProblem):
        psecrets.unwrap(secret, blob, b"other context")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(KeyProblem):
        psecrets.unwrap(secret, bytes(tampered), b"ctx")
    with pytest.raises(FormatError):
        psecrets.unwrap(secret, blob[:10], b"ctx")


def test_params_blob_holds_no_usable_key():
    ident = X25519Identity(os.urandom(32))
    cipher = make_cipher([ident.recipient])
    secret = os.urandom(32)
    data = os.urandom(100_000)
    enc = cipher.new_file(len(data), secret)
    stream = enc.update(data) + enc.finish()
    params = enc.params()
    header = read_header(Bytes(stream))
    file_key = ident.unwrap(header.stanzas[0])
    assert file_key is not None and len(file_key) == 16
    nonce = stream[header.size : header.size + 16]
    from packerfs.crypt.age import payload_key

    for needle in (file_key, payload_key(file_key, nonce), nonce, secret):
        assert needle not in params
    assert params.count(header.raw) == 1  # the header is stored (it is public)
    assert decode_params(params, secret)[1:] == (file_key, nonce)


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
