"""OpenPGP streams: stock gpg decrypts them, any range regenerates, our decryptor reads them.

Real gpg throughout (no mocks): keys are made once per session in temporary
homedirs. RSA-4096 primary + RSA-4096 [E] subkey, ed25519 + cv25519 [E], and
a homedir of unusable keys (no encryption subkey, rsa1024, expired subkey).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time

import pytest

from conftest import Bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpgkeys import fingerprints, gpg, kill_agent, make_key, new_home
from packerfs.crypt import openpgp, openpgp_keys
from packerfs.crypt.openpgp import (
    PARTIAL_CHUNK_LOG2,
    PARTIAL_THRESHOLD,
    Layout,
    OpenPGPCipher,
    _Params,
    open_openpgp_plaintext,
)
from packerfs.crypt.openpgp_packets import TAG_PKESK, TAG_SEIPD, Framing, iter_packets, read_mpi
from packerfs.errors import FormatError, KeyProblem, SourceChanged, UsageError

pytestmark = pytest.mark.interop

GPG = shutil.which("gpg")
if GPG is None:  # pragma: no cover
    pytest.skip("gpg is not installed", allow_module_level=True)

SECRET = hashlib.sha256(b"packerfs openpgp test dataset secret").digest()
MiB = 1 << 20
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ----------------------------------------------------------------------


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def gpg_decrypt(home: str, blob: bytes) -> bytes:
    r = gpg(home, "--decrypt", input=blob, check=False)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def encrypt(cipher: OpenPGPCipher, data: bytes, step: int = 100_003) -> tuple[bytes, bytes]:
    enc = cipher.new_file(len(data), SECRET)
    out = [enc.update(data[i : i + step]) for i in range(0, len(data), step)]
    out.append(enc.finish())
    return b"".join(out), enc.params()


# --- keys (made once) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def rsa_key(gpg_rsa_key):
    return gpg_rsa_key


@pytest.fixture(scope="session")
def ed_key(gpg_ed_key):
    return gpg_ed_key


@pytest.fixture(scope="session")
def public_home(tmp_path_factory, rsa_key, ed_key):
    """Both public keys, no secret keys."""
    home = new_home(tmp_path_factory, "gpg-pub")
    for k in (rsa_key, ed_key):
        gpg(home, "--import", input=gpg(k["home"], "--export", k["fpr"]).stdout)
    yield home
    kill_agent(home)


@pytest.fixture(scope="session")
def bad_home(tmp_path_factory):
    home = new_home(tmp_path_factory, "gpg-bad")
    t0 = time.time()
    make_key(home, "No Sub <nosub@packerfs.test>", "ed25519", None)
    make_key(home, "Weak <weak@packerfs.test>", "ed25519", "rsa1024")
    make_key(home, "Expired <expired@packerfs.test>", "ed25519", "cv25519", "seconds=1")
    time.sleep(max(0.0, t0 + 2.5 - time.time()))
    yield home
    kill_agent(home)


@pytest.fixture(scope="session")
def locked_key(tmp_path_factory):
    """A passphrase-protected key whose agent can never ask for the passphrase."""
    home = new_home(tmp_path_factory, "gpg-locked")
    with open(os.path.join(home, "gpg-agent.conf"), "w") as f:
        f.write("pinentry-program /bin/false\nallow-loopback-pinentry\n")
    uid = "Locked <locked@packerfs.test>"
    subprocess.run(
        [GPG, "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "pw",
         "--quick-gen-key", uid, "ed25519", "sign", "never"], capture_output=True, check=True,
    )
    fpr = fingerprints(home, uid)[0]
    subprocess.run(
        [GPG, "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "pw",
         "--quick-add-key", fpr, "cv25519", "encr", "never"], capture_output=True, check=True,
    )
    kill_agent(home)  # forget the cached passphrase
    yield {"home": home, "fpr": fpr}
    kill_agent(home)


@pytest.fixture(scope="session", params=["rsa", "cv25519"])
def key(request, rsa_key, ed_key):
    return rsa_key if request.param == "rsa" else ed_key


@pytest.fixture(scope="session")
def cipher(key):
    return OpenPGPCipher.from_keyring([key["fpr"]], key["home"])


# --- key selection ----------------------------------------------------------------


def test_from_keyring_picks_encryption_subkey(rsa_key, ed_key):
    for k, desc in ((rsa_key, "rsa4096"), (ed_key, "cv25519")):
        c = OpenPGPCipher.from_keyring([k["uid"]], k["home"])
        assert c.recipients == [k["fpr"]]
        assert [kk.fpr.hex().upper() for kk in c.keys] == [k["sub"]]
        assert c.keys[0].describe().startswith(desc)
        assert c.name == "openpgp" and c.suffix == ".gpg"


def test_from_key_file_armored_and_binary(tmp_path, rsa_key, ed_key):
    for k in (rsa_key, ed_key):
        for armor in (True, False):
            path = tmp_path / f"{k['uid']}.{'asc' if armor else 'gpg'}"
            path.write_bytes(gpg(k["home"], "--export", *(["--armor"] if armor else []), k["fpr"]).stdout)
            c = OpenPGPCipher.from_key_file(str(path))
            assert c.recipients == [k["fpr"]]
            assert [kk.fpr.hex().upper() for kk in c.keys] == [k["sub"]]
    data = data_of(1000)
    assert gpg_decrypt(ed_key["home"], encrypt(c, data)[0]) == data


def test_key_file_problems(tmp_path, ed_key):
    secret = tmp_path / "secret.asc"
    secret.write_bytes(gpg(ed_key["home"], "--export-secret-keys", "--armor", ed_key["fpr"]).stdout)
    with pytest.raises(KeyProblem, match="secret key"):
        OpenPGPCipher.from_key_file(str(secret))
    junk = tmp_path / "junk.gpg"
    junk.write_bytes(b"\x00 not a key at all")
    with pytest.raises(KeyProblem, match="junk.gpg"):
        OpenPGPCipher.from_key_file(str(junk))
    with pytest.raises(KeyProblem, match="missing.asc"):
        OpenPGPCipher.from_key_file(str(tmp_path / "missing.asc"))


def test_unusable_recipients(rsa_key, bad_home, public_home):
    with pytest.raises(KeyProblem, match="nobody@nowhere.test") as e:
        OpenPGPCipher.from_keyring(["nobody@nowhere.test"], rsa_key["home"])
    assert "\n" not in str(e.value)
    with pytest.raises(KeyProblem, match="nosub@packerfs.test.*no valid encryption subkey"):
        OpenPGPCipher.from_keyring(["nosub@packerfs.test"], bad_home)
    with pytest.raises(KeyProblem, match="weak@packerfs.test.*1024 bits"):
        OpenPGPCipher.from_keyring(["weak@packerfs.test"], bad_home)
    with pytest.raises(KeyProblem, match="expired@packerfs.test.*no valid encryption subkey"):
        OpenPGPCipher.from_keyring(["expired@packerfs.test"], bad_home)
    with pytest.raises(KeyProblem, match="several keys"):
        OpenPGPCipher.from_keyring(["packerfs.test"], public_home)
    with pytest.raises(KeyProblem, match="empty"):
        OpenPGPCipher.from_keyring([""], public_home)
    with pytest.raises(KeyProblem, match="/nonexistent/gpg/home"):
        OpenPGPCipher.from_keyring([rsa_key["fpr"]], "/nonexistent/gpg/home")


# --- stock gpg decrypts what we write -----------------------------------------------

SIZES = [0, 1, 65535, 65536, 65537, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345]


def test_gpg_decrypts_every_size(key, cipher):
    for n in SIZES:
        data = data_of(n)
        stream, params = encrypt(cipher, data)
        assert len(stream) == cipher.stream_size(n)
        assert gpg_decrypt(key["home"], stream) == data, n
        regen = cipher.open_stream(params, n, lambda o, s: data[o : o + s], SECRET)
        assert regen.size == len(stream)
        assert regen.read(0, regen.size) == stream, n
        assert b"".join(open_openpgp_plaintext(Bytes(stream), key["home"]).iter_verified(300_001)) == data


def test_multiple_recipients(rsa_key, ed_key, public_home):
    c = OpenPGPCipher.from_keyring([rsa_key["fpr"], ed_key["uid"]], public_home)
    assert c.recipients == [rsa_key["fpr"], ed_key["fpr"]]
    data = data_of(70_000)
    stream, _ = encrypt(c, data)
    for k in (rsa_key, ed_key):
        assert gpg_decrypt(k["home"], stream) == data
        assert open_openpgp_plaintext(Bytes(stream), k["home"]).read(0, 10**9) == data


def test_partial_body_lengths(key):
    c = OpenPGPCipher.from_keyring([key["fpr"]], key["home"], partial_threshold=MiB, partial_chunk_log2=16)
    n = 3_000_000
    lay = Layout(0, n, MiB, 16)
    assert lay.lit.partial and lay.seipd.partial
    data = data_of(n)
    stream, params = encrypt(c, data, step=77_777)
    assert len(stream) == c.stream_size(n)
    assert gpg_decrypt(key["home"], stream) == data
    pt = open_openpgp_plaintext(Bytes(stream), key["home"])
    assert b"".join(pt.iter_verified()) == data
    regen = c.open_stream(params, n, lambda o, s: data[o : o + s], SECRET)
    for off in range(0, len(stream), 65_000):
        assert regen.read(off, 70_000) == stream[off : off + 70_000]


def test_partial_edges_with_tiny_chunks(ed_key):
    """Threshold 600, chunks of 512: header after header, both framings mixed."""
    c = OpenPGPCipher.from_keyring([ed_key["fpr"]], ed_key["home"], partial_threshold=600, partial_chunk_log2=9,
                                   checkpoint_log2=6)
    kinds = set()
    for n in [0, 1, 500, 506, 507, 594, 595, 1018, 1024, 1530, 5000, 40_000]:
        lay = Layout(0, n, 600, 9)
        kinds.add((lay.lit.partial, lay.seipd.partial))
        data = data_of(n)
        stream, params = encrypt(c, data, step=333)
        assert len(stream) == c.stream_size(n)
        assert gpg_decrypt(ed_key["home"], stream) == data, n
        regen = c.open_stream(params, n, lambda o, s: data[o : o + s], SECRET)
        assert regen.read(0, len(stream)) == stream
        assert open_openpgp_plaintext(Bytes(stream), ed_key["home"]).read(0, n) == data
    assert kinds == {(False, False), (False, True), (True, True)}


# --- random access ------------------------------------------------------------------


@pytest.fixture(scope="session")
def samples(rsa_key, ed_key):
    """(cipher, data, stream, params, home) for several layouts."""
    out = []
    for k, opts, n in [
        (rsa_key, {}, 3 * MiB + 777),
        (ed_key, {"checkpoint_log2": 12}, 200_000),
        (ed_key, {"checkpoint_log2": 6, "partial_threshold": 600, "partial_chunk_log2": 9}, 20_000),
        (rsa_key, {"checkpoint_log2": 16, "partial_threshold": 100_000, "partial_chunk_log2": 14}, 300_000),
    ]:
        c = OpenPGPCipher.from_keyring([k["fpr"]], k["home"], **opts)
        data = data_of(n, seed=7)
        stream, params = encrypt(c, data, step=65_537)
        out.append((c, data, stream, params, k["home"]))
    return out


@HYP
@given(which=st.integers(0, 3), start=st.floats(0, 1), length=st.integers(0, 2 * MiB))
def test_open_stream_ranges(samples, which, start, length):
    c, data, stream, params, _ = samples[which]
    asked = []

    def read_plain(off, size):
        asked.append((off, size))
        return data[off : off + size]

    off = int(start * len(stream))
    got = c.open_stream(params, len(data), read_plain, SECRET).read(off, length)
    assert got == stream[off : off + length]
    interval = 1 << c.checkpoint_log2
    assert len(asked) <= 1 and sum(s for _, s in asked) <= min(length, len(data)) + interval + 32


def test_leaf_reads_start_at_checkpoints(samples):
    """Default layout: reading a 1 MiB leaf of the stream reads at most 15 extra plaintext bytes."""
    c, data, stream, params, _ = samples[0]
    assert c.checkpoint_log2 == 20
    for k in range(1, len(stream) // MiB + 1):
        asked = []
        s = c.open_stream(params, len(data), lambda o, n: asked.append(n) or data[o : o + n], SECRET)
        assert s.read(k * MiB, MiB) == stream[k * MiB : (k + 1) * MiB]
        assert sum(asked) <= min(MiB, len(stream) - k * MiB) + 15


@HYP
@given(which=st.integers(0, 3), start=st.floats(0, 1), length=st.integers(0, 2 * MiB))
def test_decryptor_ranges(samples, which, start, length):
    _, data, stream, _, home = samples[which]
    pt = _cached_plaintext(stream, home)
    assert pt.size == len(data)
    off = int(start * len(data))
    assert pt.read(off, length) == data[off : off + length]


_PT_CACHE: dict = {}


def _cached_plaintext(stream: bytes, home: str):
    key = (id(stream), home)
    if key not in _PT_CACHE:
        _PT_CACHE[key] = (stream, open_openpgp_plaintext(Bytes(stream), home))
    return _PT_CACHE[key][1]


def test_session_key_cached_per_stream(ed_key, tmp_path):
    c = OpenPGPCipher.from_keyring([ed_key["fpr"]], ed_key["home"])
    data = data_of(5000)
    ra = Bytes(encrypt(c, data)[0])
    assert open_openpgp_plaintext(ra, ed_key["home"]).read(0, 5000) == data
    # gpg is not asked again for the same stream object, even with a homedir lacking the key
    empty = str(tmp_path / "empty")
    os.mkdir(empty, 0o700)
    assert open_openpgp_plaintext(ra, empty).read(100, 10) == data[100:110]
    with pytest.raises(KeyProblem):
        open_openpgp_plaintext(Bytes(ra.data), empty)
    kill_agent(empty)


def test_reads_stock_gpg_messages(key, tmp_path):
    data = data_of(200_000, seed=3)
    src = tmp_path / "plain.bin"
    src.write_bytes(data)
    made = {}
    for how in ("file", "pipe"):
        out = tmp_path / f"{how}.gpg"
        args = ["--trust-model", "always", "-z", "0", "-r", key["fpr"], "-o", str(out), "--encrypt"]
        if how == "file":
            gpg(key["home"], *args, str(src))
        else:
            gpg(key["home"], *args, input=data)
        made[how] = out.read_bytes()
    for how, blob in made.items():
        pt = open_openpgp_plaintext(Bytes(blob), key["home"])
        assert pt.size == len(data), how
        assert b"".join(pt.iter_verified(50_000)) == data
        rng = random.Random(5)
        for _ in range(30):
            off, n = rng.randrange(len(data)), rng.randrange(1, 40_000)
            assert pt.read(off, n) == data[off : off + n]


# --- determinism and secrets ------------------------------------------------------------


def test_deterministic_regeneration_and_fresh_secrets(ed_key):
    c = OpenPGPCipher.from_keyring([ed_key["fpr"]], ed_key["home"], checkpoint_log2=10)
    data = data_of(50_000)
    s1, p1 = encrypt(c, data)
    s2, p2 = encrypt(c, data)
    read = lambda o, n: data[o : o + n]  # noqa: E731
    a = c.open_stream(p1, len(data), read, SECRET)
    b = c.open_stream(p1, len(data), read, SECRET)
    assert a.read(0, a.size) == b.read(0, b.size) == s1
    assert a.read(30_000, 5000) == s1[30_000:35_000]
    assert s1 != s2 and s1[:94] != s2[:94]  # fresh PKESK (ephemeral key) per file
    seed1, cands1 = c.unwrap_seed(_Params.decode(p1, c._wrapped_len), SECRET)
    seed2, cands2 = c.unwrap_seed(_Params.decode(p2, c._wrapped_len), SECRET)
    assert cands1 == cands2 == b""  # no RSA key, no padding candidate index
    (k1, pre1, h1, _), (k2, pre2, h2, _) = c.derive(seed1), c.derive(seed2)
    assert seed1 != seed2 and k1 != k2 and pre1 != pre2 and h1 != h2
    assert s1.startswith(h1) and s2.startswith(h2)  # the stream's PKESKs are the derived ones


def _pkesks(header: bytes) -> list[bytes]:
    return [body for tag, body, _ in iter_packets(header) if tag == TAG_PKESK]


def test_regenerated_pkesks_are_deterministic(rsa_key, ed_key, public_home):
    """PKESKs are a function of (seed, keys): another cipher object rebuilds them byte for byte."""
    c = OpenPGPCipher.from_keyring([rsa_key["fpr"], ed_key["fpr"]], public_home)
    again = OpenPGPCipher.from_keyring([rsa_key["fpr"], ed_key["fpr"]], public_home)
    assert again.fingerprint == c.fingerprint
    seed = os.urandom(32)
    key, prefix, header, cands = c.derive(seed)
    assert len(cands) == 1  # one RSA key: the index of its padding candidate
    assert again.derive(bytes(seed)) == (key, prefix, header, cands)
    assert again.derive(bytes(seed), cands) == (key, prefix, header, cands)  # rebuilt with one RSA operation
    assert len(header) == c._header_len and len(_pkesks(header)) == 2 and prefix[14:16] == prefix[16:]
    other = c.derive(os.urandom(32))
    assert all(x != y for x, y in zip(_pkesks(header), _pkesks(other[2])))  # fresh padding / ephemeral
    data = data_of(20_000)
    stream, params = encrypt(c, data)
    for _ in range(2):
        assert again.open_stream(params, len(data), lambda o, n: data[o : o + n], SECRET).read(0, 10**9) == stream
    enc = again.resume_file(params, len(data), SECRET)
    assert enc.update(data) + enc.finish() == stream and enc.params() == params
    for k in (rsa_key, ed_key):
        assert gpg_decrypt(k["home"], stream) == data


def test_params_refused_for_other_recipients(rsa_key, ed_key, public_home):
    c = OpenPGPCipher.from_keyring([rsa_key["fpr"], ed_key["fpr"]], public_home)
    data = data_of(3000)
    _, params = encrypt(c, data)
    read = lambda o, n: data[o : o + n]  # noqa: E731
    for ids, opts in (
        ([ed_key["fpr"], rsa_key["fpr"]], {}),  # reordered: the PKESKs would come in another order
        ([rsa_key["fpr"]], {}),
        ([ed_key["fpr"]], {}),
        ([rsa_key["fpr"], ed_key["fpr"]], {"checkpoint_log2": 16}),
    ):
        other = OpenPGPCipher.from_keyring(ids, public_home, **opts)
        assert other.fingerprint != c.fingerprint
        for call in (lambda: other.open_stream(params, len(data), read, SECRET),
                     lambda: other.resume_file(params, len(data), SECRET)):
            with pytest.raises(UsageError, match="other recipients") as e:
                call()
            assert "\n" not in str(e.value)


def test_deterministic_pkcs1_padding_decrypts():
    """The RSA PKESK: nonzero PS from the seed, redrawn with a counter until c has the modulus' bit length."""
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    priv = rsa.generate_private_key(65537, 2048)
    nums = priv.public_key().public_numbers()
    ek = openpgp_keys.EncryptionKey("X" * 40, os.urandom(20), openpgp_keys.PK_RSA, rsa_n=nums.n, rsa_e=nums.e)
    session_key = os.urandom(32)
    m = openpgp_keys.session_key_message(session_key)
    redrawn = 0
    for _ in range(40):
        rand = os.urandom(32)
        pkt, found = ek.pkesk(session_key, rand)
        assert (pkt, found) == ek.pkesk(session_key, rand) == ek.pkesk(session_key, rand, found)
        assert len(pkt) == ek.pkesk_len()
        (body,) = _pkesks(pkt)
        c, _ = read_mpi(body, 10)
        assert len(c) == 256 and int.from_bytes(c, "big").bit_length() == 2048
        assert priv.decrypt(c, padding.PKCS1v15()) == m
        j = 0  # the first candidate of full bit length was taken
        while True:
            ps = openpgp_keys.pkcs1_v15_padding(rand, j, 256 - len(m) - 3)
            assert len(ps) == 256 - len(m) - 3 and 0 not in ps
            cand = pow(int.from_bytes(b"\x00\x02" + ps + b"\x00" + m, "big"), nums.e, nums.n)
            if cand.bit_length() == 2048:
                break
            with pytest.raises(ValueError, match="full-length"):
                ek.pkesk(session_key, rand, j)  # a short candidate is refused, not used
            j += 1
        assert cand == int.from_bytes(c, "big") and j == found
        redrawn += j > 0
    assert redrawn  # the redraw path ran (candidate 0 is short with probability > 1/2)


def test_several_rsa_keys_store_one_candidate_index_each():
    """Synthetic keys (no gpg): the wrapped blob carries one octet per RSA key; streams regenerate exactly."""
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519

    privs = [rsa.generate_private_key(65537, 2048) for _ in range(2)]
    keys = [
        openpgp_keys.EncryptionKey(f"{i:040X}", os.urandom(20), openpgp_keys.PK_RSA,
                                   rsa_n=p.public_key().public_numbers().n, rsa_e=65537)
        for i, p in enumerate(privs)
    ]
    xpub = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    keys.insert(1, openpgp_keys.EncryptionKey("C" * 40, os.urandom(20), openpgp_keys.PK_ECDH, x25519=xpub,
                                              kdf_hash=8, kek_algo=9))
    c = OpenPGPCipher(keys, checkpoint_log2=12)
    assert c._wrapped_len == 49 + 2
    data = data_of(30_000)
    stream, params = encrypt(c, data, step=7_001)
    assert len(params) == 1 + 3 + 8 + 51 + 1 + 20 + 16 * ((len(stream) - 1) >> 12)  # uvarint(30000): 3
    read = lambda o, n: data[o : o + n]  # noqa: E731
    assert c.open_stream(params, len(data), read, SECRET).read(0, 10**9) == stream
    enc = c.resume_file(params, len(data), SECRET)
    assert enc.update(data) + enc.finish() == stream and enc.params() == params
    seed, cands = c.unwrap_seed(_Params.decode(params, c._wrapped_len), SECRET)
    key, _, header, found = c.derive(seed)
    assert found == cands and len(cands) == 2
    m = openpgp_keys.session_key_message(key)
    bodies = _pkesks(header)
    for priv, body in zip(privs, (bodies[0], bodies[2])):
        assert priv.decrypt(read_mpi(body, 10)[0], padding.PKCS1v15()) == m
    # a cipher with only some of these keys refuses the params
    with pytest.raises(UsageError, match="other recipients"):
        OpenPGPCipher(keys[:2], checkpoint_log2=12).open_stream(params, len(data), read, SECRET)


def test_params_hold_no_session_key(rsa_key, ed_key):
    for k in (rsa_key, ed_key):
        c = OpenPGPCipher.from_keyring([k["fpr"]], k["home"])
        data = data_of(4000)
        stream, params = encrypt(c, data)
        rsa = k is rsa_key
        # version, uvarint(4000), fingerprint, wrapped seed (+ RSA candidate index), final, MDC; no checkpoint
        assert len(params) == 1 + 2 + 8 + 49 + rsa + 1 + 20 == 81 + rsa
        r = gpg(k["home"], "--show-session-key", "--status-fd", "2", "--decrypt", input=stream)
        key = bytes.fromhex(r.stderr.decode().split("SESSION_KEY 9:")[1].split()[0])
        seed, cands = c.unwrap_seed(_Params.decode(params, c._wrapped_len), SECRET)
        assert len(cands) == rsa
        derived_key, prefix, header, _ = c.derive(seed)
        assert derived_key == key and stream.startswith(header)
        rand = openpgp._derive(seed, b"pkesk " + bytes(4), 32)  # the cv25519 ephemeral scalar / padding source
        for needle in (key, seed, prefix[:16], SECRET, rand, *_pkesks(header)):
            for i in range(len(needle) - 7):
                assert needle[i : i + 8] not in params
        with pytest.raises(KeyProblem):
            c.open_stream(params, len(data), lambda o, n: data[o : o + n], bytes(32))
        with pytest.raises(FormatError):
            c.open_stream(params, 40 * MiB, lambda o, n: data[o : o + n], SECRET)
        with pytest.raises(FormatError):
            c.open_stream(b"nonsense", len(data), lambda o, n: data[o : o + n], SECRET)


def test_encryptor_checks_plaintext_size(ed_key):
    c = OpenPGPCipher.from_keyring([ed_key["fpr"]], ed_key["home"])
    enc = c.new_file(10, SECRET)
    enc.update(b"12345")
    with pytest.raises(SourceChanged):
        enc.finish()
    enc = c.new_file(10, SECRET)
    with pytest.raises(SourceChanged):
        enc.update(b"x" * 11)


# --- tampering and bad input ----------------------------------------------------------------


def test_tampering_is_detected(ed_key):
    c = OpenPGPCipher.from_keyring([ed_key["fpr"]], ed_key["home"], partial_threshold=600, partial_chunk_log2=9)
    data = data_of(30_000)
    stream, _ = encrypt(c, data)
    home = ed_key["home"]
    body = c._header_len + 3
    for pos in (body + 2, body + 40, len(stream) // 2, len(stream) - 25, len(stream) - 1):
        bad = bytearray(stream)
        bad[pos] ^= 0x40
        with pytest.raises(FormatError) as e:
            list(open_openpgp_plaintext(Bytes(bytes(bad)), home).iter_verified())
        assert "offset" in str(e.value)
        assert gpg(home, "--decrypt", input=bytes(bad), check=False).returncode != 0
    for cut in (1, 21, 5000, len(stream) - body):
        with pytest.raises(FormatError):
            list(open_openpgp_plaintext(Bytes(stream[:-cut]), home).iter_verified())
    with pytest.raises(FormatError, match="after the encrypted packet"):
        open_openpgp_plaintext(Bytes(stream + b"\x00"), home)


def test_malformed_and_unsupported_input(ed_key, tmp_path):
    home = ed_key["home"]
    with pytest.raises(FormatError, match="offset 0"):
        open_openpgp_plaintext(Bytes(b"hello, not OpenPGP"), home)
    with pytest.raises(FormatError, match="offset 0"):
        open_openpgp_plaintext(Bytes(b""), home)
    with pytest.raises(FormatError, match="no MDC|integrity"):
        open_openpgp_plaintext(Bytes(b"\xc9\x05abcde"), home)  # tag 9: SED without MDC
    src = tmp_path / "p"
    src.write_bytes(b"compressible " * 1000)
    gpg(home, "--trust-model", "always", "-r", ed_key["fpr"], "-o", str(tmp_path / "z.gpg"), "--encrypt", str(src))
    with pytest.raises(FormatError, match="compressed"):
        open_openpgp_plaintext(Bytes((tmp_path / "z.gpg").read_bytes()), home)


def test_no_secret_key_at_open(ed_key, rsa_key, public_home):
    c = OpenPGPCipher.from_keyring([rsa_key["fpr"]], public_home)
    stream, _ = encrypt(c, data_of(3000))
    with pytest.raises(KeyProblem, match="(?i)no secret key") as e:
        open_openpgp_plaintext(Bytes(stream), public_home)
    assert "\n" not in str(e.value)
    with pytest.raises(KeyProblem):
        open_openpgp_plaintext(Bytes(stream), ed_key["home"])  # someone else's key


def test_agent_cannot_unlock(locked_key):
    c = OpenPGPCipher.from_keyring([locked_key["fpr"]], locked_key["home"])
    stream, _ = encrypt(c, data_of(100))
    with pytest.raises(KeyProblem, match="could not decrypt the OpenPGP session key.*failed") as e:
        open_openpgp_plaintext(Bytes(stream), locked_key["home"])
    assert "\n" not in str(e.value)


# --- layout arithmetic (sizes far beyond what the tests encrypt) ---------------------------


@HYP
@given(
    body=st.integers(0, 1 << 42),
    threshold=st.sampled_from([0, 600, MiB, (1 << 32) - 1]),
    log2=st.integers(9, 30),
    probe=st.floats(0, 1),
)
def test_framing_arithmetic(body, threshold, log2, probe):
    f = Framing(TAG_SEIPD, body, threshold, log2)
    if body > (1 << 32) - 1:
        assert f.partial  # a definite length cannot state it
    if f.partial:
        assert f.P == 1 << log2 >= 512 and 1 <= f.last_len <= f.P
    assert f.size == 1 + (f.n - 1) + len(f.last_hdr) + body
    b = min(int(probe * body), body - 1)
    if body:
        pos = f.body_pos(b)
        assert f.body_before(pos) == b and f.body_before(pos + 1) == b + 1
        # pieces() around that octet put it at the same place
        a = max(pos - 3000, 0)
        at = a
        for hdr, bo, n in f.pieces(a, pos + 3000):
            if hdr is None and bo <= b < bo + n:
                assert at + (b - bo) == pos
            at += len(hdr) if hdr is not None else n
        assert at == min(pos + 3000, f.size)


def test_default_layout_beyond_4gib():
    lay = Layout(600, 5 << 30, PARTIAL_THRESHOLD, PARTIAL_CHUNK_LOG2)
    assert lay.lit.partial and lay.seipd.partial and lay.seipd.n == 6
    small = Layout(600, (4 << 30) - 100, PARTIAL_THRESHOLD, PARTIAL_CHUNK_LOG2)
    assert not small.lit.partial and not small.seipd.partial
    assert lay.checkpoint_count(20) == (lay.S - 1) >> 20


# --- bench ----------------------------------------------------------------------------------


def _tools_module(name: str):
    """A module of tools/ (not a package: the benchmarks are not part of packerfs)."""
    import importlib.util
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parent.parent / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))  # the bench imports its siblings (bench_crypt) by name
    spec = importlib.util.spec_from_file_location(f"packerfs_tools_{name}", tools / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs(tmp_path):
    bench = _tools_module("bench_openpgp").bench
    res = bench(str(tmp_path / "bench.bin"), 4 * MiB, rounds=1, quiet=True)
    assert res["bytes"] == 4 * MiB
    assert res["packerfs_mb_s"] > 0 and res["gpg_mb_s"] > 0 and res["ratio"] > 0
