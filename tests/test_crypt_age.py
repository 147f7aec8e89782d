"""age streams against the stock tools (`age`, `age-keygen`, `ssh-keygen`, pyrage). No mocks."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyrage
import pytest

from conftest import Bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packerfs.crypt import KeyRing, make_cipher, open_plaintext
from packerfs.crypt import age as agemod
from packerfs.crypt.age import (
    CHUNK_SIZE,
    ENC_CHUNK_SIZE,
    AgeCipher,
    open_age_plaintext,
    parse_recipient,
    read_header,
    rsa_oaep_sha256_encrypt,
)
from packerfs.errors import FormatError, KeyProblem, PackerfsError, UsageError

pytestmark = pytest.mark.interop

for tool in ("age", "age-keygen"):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed", allow_module_level=True)
HAVE_SSH_KEYGEN = shutil.which("ssh-keygen") is not None

KiB, MiB = 1024, 1024 * 1024
SIZES = [0, 1, 65535, 65536, 65537, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345]
KINDS = ["x25519", "ssh-rsa", "ssh-ed25519"]


@dataclass
class Key:
    kind: str
    recipient: str  # what a user passes as --recipient (age1… or a .pub path)
    recipient_line: str  # the recipient as one line of text
    identity: Path  # identity file / private key


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, **kw)


def ssh_keygen(path: Path, kind: str, bits: int = 0, passphrase: str = "") -> None:
    """A new OpenSSH key pair at path / path.pub: ssh-keygen, or `cryptography` where it is missing."""
    if HAVE_SSH_KEYGEN:
        run("ssh-keygen", "-q", "-t", kind, *(["-b", str(bits)] if bits else []), "-N", passphrase,
            "-C", "test@packerfs", "-f", str(path))
        return
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = {
        "rsa": lambda: rsa.generate_private_key(65537, bits or 3072),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
    }[kind]()
    enc = ser.BestAvailableEncryption(passphrase.encode()) if passphrase else ser.NoEncryption()
    try:
        path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, enc))
    except Exception as e:  # encrypting OpenSSH keys needs the optional bcrypt module
        pytest.skip(f"cannot make this OpenSSH key without ssh-keygen: {e}")
    os.chmod(path, 0o600)
    pub = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    Path(str(path) + ".pub").write_bytes(pub + b" test@packerfs\n")


@pytest.fixture(scope="session")
def keydir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def keys(keydir) -> dict[str, Key]:
    """One key of each kind; the RSA-4096 key is generated once per session (slow)."""
    age_id = keydir / "age.txt"
    run("age-keygen", "-o", str(age_id))
    age_pub = run("age-keygen", "-y", str(age_id)).stdout.decode().strip()
    out = {"x25519": Key("x25519", age_pub, age_pub, age_id)}
    for kind, algo, bits in (("ssh-rsa", "rsa", 4096), ("ssh-ed25519", "ed25519", 0)):
        path = keydir / kind
        ssh_keygen(path, algo, bits)
        pub = (keydir / f"{kind}.pub").read_text().strip()
        out[kind] = Key(kind, str(keydir / f"{kind}.pub"), pub, path)
    return out


@pytest.fixture(scope="session")
def secret() -> bytes:
    return os.urandom(32)


def pyrage_identity(key: Key):
    if key.kind == "x25519":
        line = [l for l in key.identity.read_text().splitlines() if l.startswith("AGE-SECRET-KEY-1")][0]
        return pyrage.x25519.Identity.from_str(line)
    return pyrage.ssh.Identity.from_buffer(key.identity.read_bytes())


def encrypt(cipher, data: bytes, secret: bytes, seed: int = 0) -> tuple[bytes, bytes]:
    """Sequential Encryptor pass with irregular update() sizes; -> (stream, params)."""
    rng = random.Random(seed)
    enc = cipher.new_file(len(data), secret)
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 7, 4096, 65535, 65536, 65537, 200_000, MiB])
        out.append(enc.update(data[pos : pos + n]))
        pos += n
    out.append(enc.finish())
    return b"".join(out), enc.params()


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


# ----------------------------------------------------------------- stock tools decrypt ours


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_stock_tools_decrypt_our_streams(kind, size, keys, secret, tmp_path):
    key = keys[kind]
    cipher = make_cipher([key.recipient])
    data = payload(size)
    stream, params = encrypt(cipher, data, secret, seed=size)
    assert len(stream) == cipher.stream_size(size)

    f = tmp_path / "f.age"
    f.write_bytes(stream)
    assert run("age", "-d", "-i", str(key.identity), str(f)).stdout == data
    assert pyrage.decrypt(stream, [pyrage_identity(key)]) == data

    # The serving path regenerates the identical bytes, and our decryptor reads them back.
    regen = cipher.open_stream(params, size, lambda o, n: data[o : o + n], secret)
    assert regen.size == len(stream)
    assert regen.read(0, regen.size) == stream
    plain = open_plaintext(Bytes(stream), KeyRing([str(key.identity)]), "age")
    assert plain.size == size
    assert plain.read(0, size) == data
    assert b"".join(plain.iter_verified(300 * KiB)) == data


# ----------------------------------------------------------------- we decrypt stock age's files


@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 2 * MiB + 3])
@pytest.mark.parametrize("kind", KINDS)
def test_we_decrypt_stock_age_files(kind, size, keys, tmp_path):
    key = keys[kind]
    data = payload(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    out = tmp_path / "src.age"
    if kind == "x25519":
        run("age", "-r", key.recipient, "-o", str(out), str(src))
    else:
        run("age", "-R", key.recipient, "-o", str(out), str(src))
    stream = out.read_bytes()
    plain = open_age_plaintext(Bytes(stream), KeyRing([str(key.identity)]).age_identities)
    assert plain.size == size
    assert b"".join(plain.iter_verified()) == data
    rng = random.Random(size)
    for _ in range(20):
        off = rng.randrange(0, size + 10)
        n = rng.randrange(0, 3 * CHUNK_SIZE)
        assert plain.read(off, n) == data[off : off + n]


def test_multiple_recipients_from_file(keys, secret, tmp_path):
    rfile = tmp_path / "recipients.txt"
    rfile.write_text(
        "# team keys\n\n"
        f"{keys['x25519'].recipient_line}\n"
        f"   # indented comment\n"
        f'no-pty,from="10.0.0.0/8" {keys["ssh-ed25519"].recipient_line}\n'
        f"{keys['ssh-rsa'].recipient_line}\n"
    )
    cipher = make_cipher(recipients_files=[str(rfile)])
    assert len(cipher.recipients) == 3
    data = payload(100_000)
    stream, _ = encrypt(cipher, data, secret)
    f = tmp_path / "f.age"
    f.write_bytes(stream)
    for key in keys.values():
        assert run("age", "-d", "-i", str(key.identity), str(f)).stdout == data
        assert pyrage.decrypt(stream, [pyrage_identity(key)]) == data
        plain = open_plaintext(Bytes(stream), KeyRing([str(key.identity)]), "age")
        assert plain.read(0, plain.size) == data
    # A plain recipients file (age 1.1 itself accepts neither indented comments nor
    # authorized_keys options) gives the same recipient set with stock age and with us.
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("# team\n\n" + "".join(k.recipient_line + "\n" for k in keys.values()))
    assert sorted(make_cipher(recipients_files=[str(plain_file)]).recipients) == sorted(cipher.recipients)
    src = tmp_path / "src"
    src.write_bytes(data)
    run("age", "-R", str(plain_file), "-o", str(tmp_path / "stock.age"), str(src))
    stock = (tmp_path / "stock.age").read_bytes()
    assert sorted(s.type for s in read_header(Bytes(stock)).stanzas) == sorted(
        s.type for s in read_header(Bytes(stream)).stanzas
    )


def test_identity_file_with_several_keys(keys, secret, tmp_path):
    other = tmp_path / "other.txt"
    run("age-keygen", "-o", str(other))
    combined = tmp_path / "ids.txt"
    combined.write_text(other.read_text() + "\n# second\n" + keys["x25519"].identity.read_text())
    cipher = make_cipher([keys["x25519"].recipient])
    data = payload(5000)
    stream, _ = encrypt(cipher, data, secret)
    plain = open_plaintext(Bytes(stream), KeyRing([str(combined)]), "age")
    assert plain.read(0, plain.size) == data


# ----------------------------------------------------------------- random access and determinism


@pytest.fixture(scope="module")
def ra_material(keys, secret):
    cipher = make_cipher([keys["x25519"].recipient])
    out = {}
    for size in (0, 65536, 3 * CHUNK_SIZE + 100, 1 * MiB + 17):
        data = payload(size)
        stream, params = encrypt(cipher, data, secret, seed=size + 1)
        out[size] = (data, stream, params)
    return cipher, out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size_i=st.integers(0, 3), reads=st.lists(st.tuples(st.integers(0, 1 << 21), st.integers(0, 300_000)), min_size=1, max_size=6))
def test_random_ranges_match_sequential_output(ra_material, keys, secret, size_i, reads):
    cipher, material = ra_material
    size = sorted(material)[size_i]
    data, stream, params = material[size]
    requested = []

    def read_plain(off, n):
        requested.append((off, n))
        assert 0 <= off and off + n <= len(data)
        return data[off : off + n]

    s = cipher.open_stream(params, size, read_plain, secret)
    plain = open_plaintext(Bytes(stream), KeyRing([str(keys["x25519"].identity)]), "age")
    for off, n in reads:
        off = off % (len(stream) + 100)
        requested.clear()
        assert s.read(off, n) == stream[off : off + n]
        # Only the chunks the range touches are encrypted (plaintext read for them alone).
        if n and off < len(stream):
            touched = -(-(min(off + n, len(stream))) // ENC_CHUNK_SIZE) - off // ENC_CHUNK_SIZE + 1
            assert sum(r[1] for r in requested) <= touched * CHUNK_SIZE
        poff = off % (size + 50)
        assert plain.read(poff, n) == data[poff : poff + n]


def test_open_stream_is_deterministic_and_new_file_is_fresh(keys, secret):
    cipher = make_cipher([keys["ssh-ed25519"].recipient])
    data = payload(200_000)
    s1, p1 = encrypt(cipher, data, secret, seed=1)
    s2, p2 = encrypt(cipher, data, secret, seed=2)
    a = cipher.open_stream(p1, len(data), lambda o, n: data[o : o + n], secret)
    b = cipher.open_stream(p1, len(data), lambda o, n: data[o : o + n], secret)
    assert a.read(0, a.size) == b.read(0, b.size) == s1
    assert a.read(12345, 99999) == b.read(12345, 99999) == s1[12345 : 12345 + 99999]
    # two new_file() calls: different header (ephemeral share, MAC), nonce and ciphertext
    h1 = read_header(Bytes(s1)).size
    h2 = read_header(Bytes(s2)).size
    assert h1 == h2
    assert s1[:h1] != s2[:h2]
    assert s1[h1 : h1 + 16] != s2[h2 : h2 + 16]
    assert s1[h1 + 16 :] != s2[h2 + 16 :]
    assert p1 != p2
    # the params from one secret do not open with another dataset secret
    with pytest.raises(KeyProblem):
        cipher.open_stream(p1, len(data), lambda o, n: data[o : o + n], os.urandom(32))


# ----------------------------------------------------------------- compact params, regenerated headers


def _mgf1(seed: bytes, n: int) -> bytes:
    import hashlib

    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-n // 32)))[:n]


def test_oaep_encoder_against_cryptography(keys):
    """Our RSAES-OAEP-SHA256 encoding decrypts with `cryptography`, and carries exactly the seed given."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    label = b"age-encryption.org/v1/ssh-rsa"
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)
    private = [ser.load_ssh_private_key(keys["ssh-rsa"].identity.read_bytes(), None)]  # ssh-keygen's RSA-4096
    private += [rsa.generate_private_key(65537, bits) for bits in (2048, 2049, 3071)]  # odd sizes: leading octet
    for key in private:
        nums = key.public_key().public_numbers()
        k = (nums.n.bit_length() + 7) // 8
        for i in range(4):
            msg, seed = os.urandom(16 + i), os.urandom(32)
            c = rsa_oaep_sha256_encrypt(nums.n, nums.e, msg, label, seed)
            assert len(c) == k
            assert c == rsa_oaep_sha256_encrypt(nums.n, nums.e, msg, label, seed)  # deterministic
            assert key.decrypt(c, oaep) == msg
            with pytest.raises(ValueError):
                key.decrypt(c, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"x"))
            # the raw private operation gives EM = 00 || maskedSeed || maskedDB with our seed inside
            em = pow(int.from_bytes(c, "big"), key.private_numbers().d, nums.n).to_bytes(k, "big")
            assert em[0] == 0
            masked_seed, masked_db = em[1:33], em[33:]
            got = bytes(a ^ b for a, b in zip(masked_seed, _mgf1(masked_db, 32)))
            assert got == seed
        with pytest.raises(ValueError):
            rsa_oaep_sha256_encrypt(nums.n, nums.e, b"x" * (k - 65), label, os.urandom(32))
        with pytest.raises(ValueError):
            rsa_oaep_sha256_encrypt(nums.n, nums.e, b"x", label, os.urandom(31))


@pytest.mark.parametrize("kind", KINDS)
def test_params_are_small_and_header_regenerates(kind, keys, secret, tmp_path):
    """One small file: 59 octets of params whatever the recipient (RSA-4096 included)."""
    cipher = make_cipher([keys[kind].recipient])
    data = b"hello packerfs\n"
    stream, params = encrypt(cipher, data, secret)
    assert len(params) == 59
    assert params[0] == 3 and params[2:10] == cipher.fingerprint
    header = read_header(Bytes(stream))
    assert header.raw not in params
    # regenerated by another cipher object made from the same recipient: the same stream
    again = make_cipher([keys[kind].recipient])
    assert again is not cipher and again.fingerprint == cipher.fingerprint
    s = again.open_stream(params, len(data), lambda o, n: data[o : o + n], secret)
    assert s.read(0, s.size) == stream
    f = tmp_path / "f.age"
    f.write_bytes(s.read(0, s.size))
    assert run("age", "-d", "-i", str(keys[kind].identity), str(f)).stdout == data


def test_regenerated_header_is_deterministic(keys, secret):
    """The header is a function of (seed, recipients): the same seed, the same bytes; another seed, others."""
    recipients = [parse_recipient(keys[k].recipient_line) for k in KINDS]
    cipher = AgeCipher(recipients)
    seed = os.urandom(32)
    a = agemod.FileSecrets.derive(seed, recipients)
    b = agemod.FileSecrets.derive(bytes(seed), [parse_recipient(keys[k].recipient_line) for k in KINDS])
    assert a == b and len(a.header) == cipher.header_size
    other = agemod.FileSecrets.derive(os.urandom(32), recipients)
    assert other.file_key != a.file_key and other.nonce != a.nonce
    hs_a, hs_o = read_header(Bytes(a.header)), read_header(Bytes(other.header))
    for sa, so in zip(hs_a.stanzas, hs_o.stanzas):
        assert sa.args[0] == so.args[0] and sa.body != so.body  # fresh randomness in every stanza
    # the same params opened many times, and resumed, give the same bytes
    data = payload(150_000)
    stream, params = encrypt(cipher, data, secret)
    for _ in range(3):
        s = cipher.open_stream(params, len(data), lambda o, n: data[o : o + n], secret)
        assert s.read(0, cipher.header_size + 16) == stream[: cipher.header_size + 16]
    enc = cipher.resume_file(params, len(data), secret)
    assert enc.update(data) + enc.finish() == stream and enc.params() == params
    # and each identity opens it
    for k in KINDS:
        assert open_plaintext(Bytes(stream), KeyRing([str(keys[k].identity)]), "age").read(0, len(data)) == data


def test_params_refused_for_other_recipients(keys, secret):
    a, b, c = (keys[k].recipient_line for k in KINDS)
    cipher = make_cipher([a, b])
    data = payload(70_000)
    stream, params = encrypt(cipher, data, secret)
    read = lambda o, n: data[o : o + n]  # noqa: E731
    assert make_cipher([a, b]).open_stream(params, len(data), read, secret).read(0, len(stream)) == stream
    for others in ([b, a], [a], [a, b, c], [a, c], [c, b]):  # reordered, fewer, more, replaced
        other = make_cipher(others)
        for call in (
            lambda: other.open_stream(params, len(data), read, secret),
            lambda: other.resume_file(params, len(data), secret),
        ):
            with pytest.raises(UsageError, match="other recipients") as ei:
                call()
            assert "\n" not in str(ei.value)
    # a forged fingerprint field does not help: it is bound into the wrapped seed's context
    fp_at = len(params) - 49 - 8  # version, uvarint(size), fingerprint, wrapped seed
    assert params[fp_at : fp_at + 8] == cipher.fingerprint
    forged = params[:fp_at] + make_cipher([b, a]).fingerprint + params[fp_at + 8 :]
    with pytest.raises(KeyProblem):
        make_cipher([b, a]).open_stream(forged, len(data), read, secret)


def test_stream_size_is_pure(keys):
    for kind in KINDS:
        cipher = make_cipher([keys[kind].recipient])
        for size in SIZES:
            enc = cipher.new_file(size, os.urandom(32))
            n = len(enc.update(b"\0" * size)) + len(enc.finish())
            assert n == cipher.stream_size(size)


def test_encryptor_rejects_wrong_length(keys, secret):
    cipher = make_cipher([keys["x25519"].recipient])
    enc = cipher.new_file(10, secret)
    with pytest.raises(PackerfsError):
        enc.update(b"x" * 11)
    enc = cipher.new_file(10, secret)
    enc.update(b"x" * 9)
    with pytest.raises(PackerfsError):
        enc.finish()


# ----------------------------------------------------------------- tampering


@pytest.fixture(scope="module")
def sample(keys, secret):
    cipher = make_cipher([keys["x25519"].recipient])
    data = payload(3 * CHUNK_SIZE + 1000)
    stream, _ = encrypt(cipher, data, secret)
    return data, stream, read_header(Bytes(stream)).size


def xkeyring(keys) -> KeyRing:
    return KeyRing([str(keys["x25519"].identity)])


def test_tampered_header_never_decrypts(keys, sample):
    data, stream, hsize = sample
    kr = xkeyring(keys)
    for pos in range(hsize + 16):  # every header byte and the payload nonce
        bad = bytearray(stream)
        bad[pos] ^= 0x01
        with pytest.raises((FormatError, KeyProblem)) as ei:
            open_plaintext(Bytes(bytes(bad)), kr, "age")
        assert "\n" not in str(ei.value)


def test_tampered_header_mac_and_version(keys, sample):
    data, stream, hsize = sample
    kr = xkeyring(keys)
    mac_line = stream.rindex(b"\n--- ", 0, hsize) + 1
    bad = bytearray(stream)
    bad[mac_line + 10] ^= 0x02
    with pytest.raises(FormatError) as ei:
        open_plaintext(Bytes(bytes(bad)), kr, "age")
    assert ei.value.offset == mac_line
    bad = bytearray(stream)
    bad[5] ^= 0x20
    with pytest.raises(FormatError) as ei:
        open_plaintext(Bytes(bytes(bad)), kr, "age", name="x.age")
    assert ei.value.offset == 0 and str(ei.value).startswith("x.age, offset 0:")


def test_tampered_ssh_stanza_is_format_error(keys, secret):
    cipher = make_cipher([keys["ssh-ed25519"].recipient])
    stream, _ = encrypt(cipher, b"hello" * 100, secret)
    body_line = stream.index(b"\n", stream.index(b"-> ssh-ed25519")) + 1
    bad = bytearray(stream)
    bad[body_line + 3] = ord("A") if bad[body_line + 3] != ord("A") else ord("B")
    with pytest.raises(FormatError) as ei:
        open_plaintext(Bytes(bytes(bad)), KeyRing([str(keys["ssh-ed25519"].identity)]), "age")
    assert ei.value.offset == stream.index(b"-> ssh-ed25519")


def test_tampered_chunk_reports_offset(keys, sample):
    data, stream, hsize = sample
    kr = xkeyring(keys)
    base = hsize + 16
    bad = bytearray(stream)
    bad[base + ENC_CHUNK_SIZE + 500] ^= 0x80  # inside chunk 1
    plain = open_plaintext(Bytes(bytes(bad)), kr, "age")
    assert plain.read(0, CHUNK_SIZE) == data[:CHUNK_SIZE]  # untouched chunks still read
    assert plain.read(2 * CHUNK_SIZE, 100) == data[2 * CHUNK_SIZE : 2 * CHUNK_SIZE + 100]
    for off, n in ((CHUNK_SIZE, 1), (CHUNK_SIZE - 10, 20), (0, len(data))):
        with pytest.raises(FormatError) as ei:
            plain.read(off, n)
        assert ei.value.offset == base + ENC_CHUNK_SIZE
    with pytest.raises(FormatError) as ei:
        b"".join(plain.iter_verified())
    assert ei.value.offset == base + ENC_CHUNK_SIZE
    # stock age refuses it too
    bad_last = bytearray(stream)
    bad_last[-1] ^= 1
    with pytest.raises(FormatError) as ei:
        open_plaintext(Bytes(bytes(bad_last)), kr, "age")
    assert ei.value.offset == base + 3 * ENC_CHUNK_SIZE


@pytest.mark.parametrize("cut", ["last_chunk", "one_byte", "to_chunk_boundary_plus_tag", "into_header", "extra_byte"])
def test_truncated_or_extended_stream(keys, sample, cut):
    data, stream, hsize = sample
    base = hsize + 16
    bad = {
        "last_chunk": stream[: base + 3 * ENC_CHUNK_SIZE],
        "one_byte": stream[:-1],
        "to_chunk_boundary_plus_tag": stream[: base + 2 * ENC_CHUNK_SIZE + 16],
        "into_header": stream[: hsize - 5],
        "extra_byte": stream + b"\0",
    }[cut]
    with pytest.raises(FormatError) as ei:
        open_plaintext(Bytes(bad), xkeyring(keys), "age")
    assert ei.value.offset is not None
    assert "\n" not in str(ei.value)


# ----------------------------------------------------------------- bad keys


def test_wrong_identity_is_one_line_key_problem(keys, secret, tmp_path):
    cipher = make_cipher([keys["x25519"].recipient, keys["ssh-rsa"].recipient])
    stream, _ = encrypt(cipher, b"data", secret)
    other = tmp_path / "other.txt"
    run("age-keygen", "-o", str(other))
    with pytest.raises(KeyProblem) as ei:
        open_plaintext(Bytes(stream), KeyRing([str(other), str(keys["ssh-ed25519"].identity)]), "age", name="f.age")
    msg = str(ei.value)
    assert "\n" not in msg and "X25519" in msg and "ssh-rsa" in msg and "f.age" in msg
    with pytest.raises(KeyProblem):
        open_plaintext(Bytes(stream), KeyRing([]), "age")


def test_passphrase_protected_ssh_key(tmp_path):
    for kind in ("ed25519", "rsa"):
        path = tmp_path / f"locked_{kind}"
        ssh_keygen(path, kind, 2048 if kind == "rsa" else 0, passphrase="secret pass")
        with pytest.raises(KeyProblem) as ei:
            KeyRing([str(path)])
        msg = str(ei.value)
        assert "\n" not in msg and "passphrase" in msg and "ssh-keygen -p" in msg


def test_bad_identity_files(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("# nothing\nAGE-SECRET-KEY-1QQQQ\n")
    with pytest.raises(KeyProblem) as ei:
        KeyRing([str(junk)])
    assert "line 2" in str(ei.value)
    with pytest.raises(KeyProblem):
        KeyRing([str(tmp_path / "missing.txt")])


def test_garbage_and_unsupported_recipients(tmp_path):
    for bad in ["hello", "age1notbech32", "ssh-ed25519 AAAA", "", "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq"]:
        with pytest.raises(UsageError):
            make_cipher([bad])
    ecdsa = tmp_path / "ec"
    ssh_keygen(ecdsa, "ecdsa")
    with pytest.raises(UsageError) as ei:
        make_cipher([str(ecdsa) + ".pub"])
    assert "ecdsa" in str(ei.value)
    small = tmp_path / "small"
    ssh_keygen(small, "rsa", 1024)
    with pytest.raises(UsageError) as ei:
        make_cipher([(tmp_path / "small.pub").read_text()])
    assert "2048" in str(ei.value)


def test_recipient_fingerprints_match_ssh_keygen(keys):
    for kind in ("ssh-rsa", "ssh-ed25519") if HAVE_SSH_KEYGEN else ():
        fp = run("ssh-keygen", "-l", "-f", keys[kind].recipient).stdout.decode().split()[1]
        assert parse_recipient(keys[kind].recipient_line).fingerprint == f"{kind} {fp}"
    assert make_cipher([keys["x25519"].recipient]).recipients == [keys["x25519"].recipient]
    c = AgeCipher([parse_recipient(keys["x25519"].recipient)] * 2)
    assert len(c.recipients) == 1


@pytest.mark.skipif(not HAVE_SSH_KEYGEN, reason="needs ssh-keygen -m PEM")
def test_pem_rsa_identity(secret, tmp_path):
    path = tmp_path / "pem_rsa"
    run("ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", str(path))
    assert path.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    cipher = make_cipher([str(tmp_path / "pem_rsa.pub")])
    data = payload(70_000)
    stream, _ = encrypt(cipher, data, secret)
    plain = open_plaintext(Bytes(stream), KeyRing([str(path)]), "age")
    assert plain.read(0, plain.size) == data
    (tmp_path / "f.age").write_bytes(stream)
    assert run("age", "-d", "-i", str(path), str(tmp_path / "f.age")).stdout == data


def test_encrypted_age_identity_file_is_refused(keys, tmp_path):
    src = keys["x25519"].identity
    locked = tmp_path / "locked.age"
    run("age", "-r", keys["x25519"].recipient, "-o", str(locked), str(src))
    with pytest.raises(KeyProblem) as ei:
        KeyRing([str(locked)])
    assert "age -d" in str(ei.value)
