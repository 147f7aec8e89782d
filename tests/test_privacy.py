"""Issue 14's building blocks: hidden names, PADMÉ size padding, sealed manifests (stock age, pyrage, gpg)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess

import pyrage
import pytest

from packerfs.crypt import KeyRing, make_cipher, write_age_identity
from packerfs.crypt.plain import PlainCipher
from packerfs.errors import FormatError, KeyProblem, SourceChanged, UsageError
from packerfs.privacy import names, padding, sealed_manifest
from packerfs.privacy.names import NAME_LEN, hidden_name, hidden_name_length, names_key
from packerfs.privacy.padding import MIN_PAD, PAD_MAGIC, Padded, Padding, StoredFrame, padded_size, padme
from packerfs.privacy.sealed_manifest import manifest_seed, open_manifest, seal_manifest, sealed_name

SECRET_A = hashlib.sha256(b"packerfs privacy test secret A").digest()
SECRET_B = hashlib.sha256(b"packerfs privacy test secret B").digest()
KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40


def require(tool: str) -> None:
    """Skip without `tool`, but fail under CI: ./run installs it, so its absence is a setup bug."""
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; ./run setup installs it")
        pytest.skip(f"{tool} is not installed")


# --------------------------------------------------------------------------- hidden names

NAME_RE = re.compile(rb"[0-9a-f]{32}")


def test_names_are_fixed_length_and_only_hex():
    key = names_key(SECRET_A)
    for version, part, suffix in [(1, 0, ".age"), (2**64 - 1, 2**32 - 1, ".age"), (7, 3, ".zst.age"),
                                  (9, 0, ".gpg"), (10, 0, "")]:
        n = hidden_name(key, version, part, suffix)
        assert len(n) == NAME_LEN + len(suffix) == 32 + len(suffix) == hidden_name_length(suffix)
        assert NAME_RE.fullmatch(n[:NAME_LEN]) and n[NAME_LEN:] == suffix.encode()
        assert hidden_name(key, version, part, suffix) == n  # a pure function
    assert hidden_name(key, 5, 0, ".age")[:NAME_LEN] == hidden_name(key, 5, 0, ".zst.age")[:NAME_LEN]


def test_names_are_uniform_and_never_collide():
    key = names_key(SECRET_A)
    counts = [0] * 256
    seen = set()
    for v in range(1, 100_001):
        n = hidden_name(key, v, v % 3, ".age")
        counts[int(n[:2], 16)] += 1
        seen.add(n)
    assert len(seen) == 100_000
    expected = 100_000 / 256
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    # 255 degrees of freedom: mean 255, sd 22.6; 380 is past p = 1e-7 (and 130 below p = 1e-7 the other way)
    assert 130 < chi2 < 380, chi2
    # the later digits are uniform too (the third hex digit)
    first = [0] * 16
    for n in list(seen)[:50_000]:
        first[int(n[2:3], 16)] += 1
    assert max(first) - min(first) < 600


def test_names_differ_between_data_sets_versions_and_parts():
    a, b = names_key(SECRET_A), names_key(SECRET_B)
    assert a != b and len(a) == 32 and a not in (SECRET_A,)
    same = sum(hidden_name(a, v, 0, ".age") == hidden_name(b, v, 0, ".age") for v in range(1, 2001))
    assert same == 0
    n = {hidden_name(a, v, p, ".age") for v in range(1, 50) for p in range(5)}
    assert len(n) == 49 * 5
    # the key is a derivation, not the secret itself, and not the wrap key's derivation
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    wrap = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"packerfs/wrap/v2 AES-SIV").derive(SECRET_A)
    assert a != wrap


def test_names_contain_no_source_bytes():
    # the interface takes no path, size or mtime; the output is 32 hex digits then the suffix
    key = names_key(SECRET_A)
    path = b"patients/Smith-John-1961-03-14/scan.dcm"
    out = b"".join(hidden_name(key, v, 0, ".age") for v in range(1, 1001))
    assert set(out) <= set(b"0123456789abcdef.age")
    for word in path.split(b"/") + [b"1961", b"Smith", b"scan"]:
        assert word not in out


def test_names_refuse_bad_input():
    key = names_key(SECRET_A)
    for args in [(b"short", 1, 0, ".age"), (key, -1, 0, ".age"), (key, 2**64, 0, ".age"), (key, 1, -1, ".age"),
                 (key, 1, 2**32, ".age"), (key, 1, 0, "/x"), (key, 1, 0, ".AGE"), (key, 1, 0, "age"),
                 (key, 1, 0, "." + "a" * 40)]:
        with pytest.raises(ValueError):
            hidden_name(*args)
    with pytest.raises(ValueError):
        names_key(b"\0" * 16)


# --------------------------------------------------------------------------- PADMÉ


def test_padme_known_values():
    assert [padme(n) for n in (0, 1, 2, 3, 9, 129, 257, 1000, 1025)] == [0, 1, 2, 3, 10, 144, 272, 1024, 1088]
    assert padme(2**40) == 2**40 and padme(2**40 + 1) == 2**40 + 2**34


def test_padme_overhead_bound_1B_to_1TiB():
    worst = 0.0
    for n in range(1, 1 << 16):  # every size up to 64 KiB
        p = padme(n)
        assert p >= n and padme(p) == p
        worst = max(worst, (p - n) / n)
    rng = random.Random(14)
    for e in range(1, 41):  # every exponent up to 1 TiB: the worst case of each is 2^e + 1
        for n in [2**e - 1, 2**e, 2**e + 1, 2 ** (e + 1) - 1] + [rng.randrange(2**e, 2 ** (e + 1)) for _ in range(200)]:
            if n > TiB:
                continue
            p = padme(n)
            assert n <= p and padme(p) == p
            worst = max(worst, (p - n) / n)
    assert worst <= 0.12 and abs(worst - 15 / 129) < 1e-12  # the published bound: 11.63%, at 129


def test_padme_leaks_few_sizes():
    # [2^E, 2^(E+1)) maps onto the multiples of 2^(E-S) in [2^E, 2^(E+1)], S = floor(log2 E)+1:
    # 2^S + 1 <= 2E + 1 values, O(log log L) bits
    for e in (10, 16, 20):
        distinct = {padme(n) for n in range(2**e, 2 ** (e + 1))}
        assert len(distinct) == 2 ** e.bit_length() + 1 <= 2 * e + 1, (e, len(distinct))
    assert len({padme(n) for n in range(1, 1 << 20)}) < 600  # a million sizes, a few hundred lengths
    rng = random.Random(1)
    big = {padme(rng.randrange(2**39, 2**40)) for _ in range(20_000)}
    assert len(big) <= 2 * 39 + 1


def test_padded_size_bound():
    worst = 0.0
    for n in range(256, 1 << 17):
        p = padded_size(n)
        assert p - n >= MIN_PAD and padme(p) == p
        worst = max(worst, (p - n) / n)
    assert worst <= 0.12
    assert all(padded_size(n) - n <= 0.067 * n for n in range(KiB, 1 << 17))
    assert all(padded_size(n) - n <= 30 for n in range(0, 256))
    for e in range(17, 41):
        n = 2**e + 1
        assert padded_size(n) - n <= 0.12 * n


def _frames(blob: bytes) -> list[tuple[int, int]]:
    """(magic, length) of each skippable frame in `blob`, which must be exactly skippable frames."""
    out, pos = [], 0
    while pos < len(blob):
        magic, n = int.from_bytes(blob[pos : pos + 4], "little"), int.from_bytes(blob[pos + 4 : pos + 8], "little")
        assert 0x184D2A50 <= magic <= 0x184D2A5F and magic != 0x184D2A5E
        assert blob[pos + 8 : pos + 8 + n] == bytes(n)
        out.append((magic, n))
        pos += 8 + n
    assert pos == len(blob)
    return out


def test_padding_frames_and_random_access():
    assert Padding(0).read(0, 10) == b""
    for n in (8, 9, 100, 4097):
        blob = Padding(n).read(0, n)
        assert len(blob) == n and _frames(blob) == [(PAD_MAGIC, n - 8)]
        for off in range(0, n, 3):
            assert Padding(n).read(off, 5) == blob[off : off + 5]
    for bad in (-1, 1, 7):
        with pytest.raises(ValueError):
            Padding(bad)
    # more than 4 GiB: several frames, each read back through ranges only
    big = Padding(3 * 2**32 + 5)
    starts = [0]
    while starts[-1] < big.size:
        n = int.from_bytes(big.read(starts[-1] + 4, 4), "little")
        assert int.from_bytes(big.read(starts[-1], 4), "little") == PAD_MAGIC and n > 2**31
        assert big.read(starts[-1] + 8, 64) == bytes(64) and big.read(starts[-1] + 8 + n - 3, 3) == bytes(3)
        starts.append(starts[-1] + 8 + n)
    assert starts[-1] == big.size and len(starts) == 4  # three frames
    assert big.read(big.size - 2, 10) == bytes(2)


def test_stored_frame_layout_and_random_access():
    rng = random.Random(3)
    for n in (0, 1, 1000, 128 * KiB - 1, 128 * KiB, 128 * KiB + 1, 300 * KiB + 7):
        data = rng.randbytes(n)
        sf = StoredFrame(lambda o, s, d=data: d[o : o + s], n)
        whole = sf.read(0, sf.size)
        assert len(whole) == sf.size == StoredFrame.size_for(n) == 14 + n + 3 * max(1, -(-n // (128 * KiB)))
        for off in [0, 1, 13, 14, 15, 16, 17, 18] + [rng.randrange(sf.size) for _ in range(40)]:
            for size in (1, 2, 3, 4, 100, 128 * KiB + 5):
                assert sf.read(off, size) == whole[off : off + size], (n, off, size)
        for p in [0, n // 2, n - 1] if n else []:
            assert whole[StoredFrame.stream_offset(p)] == data[p]
        padded = Padded(sf)
        blob = padded.read(0, padded.size)
        assert padded.size == padded_size(sf.size) and blob[: sf.size] == whole
        _frames(blob[sf.size :])
        for off in (0, sf.size - 1, sf.size, padded.size - 1):
            assert padded.read(off, 9) == blob[off : off + 9]
    with pytest.raises(SourceChanged):
        StoredFrame(lambda o, s: b"x" * (s // 2), 1000).read(0, 100)


@pytest.mark.interop
def test_zstd_restores_stored_and_padded_streams(tmp_path):
    require("zstd")
    rng = random.Random(5)
    for n in (0, 1, 5000, 128 * KiB, 400 * KiB + 3):
        data = rng.randbytes(n)
        stream = Padded(StoredFrame(lambda o, s, d=data: d[o : o + s], n))
        blob = stream.read(0, stream.size)
        r = subprocess.run(["zstd", "-d", "-c", "-q"], input=blob, capture_output=True, timeout=60)
        assert r.returncode == 0 and r.stdout == data, (n, r.stderr)
    # a real compressed zstd stream, padded by skippable frames, still decompresses exactly
    text = b"".join(b"%d,row,%d\n" % (i, i * i) for i in range(20_000))
    z = subprocess.run(["zstd", "-c", "-q", "-3"], input=text, capture_output=True, check=True).stdout

    class B:
        size = len(z)

        def read(self, o, s):
            return z[o : o + s]

    padded = Padded(B())
    r = subprocess.run(["zstd", "-d", "-c", "-q"], input=padded.read(0, padded.size), capture_output=True)
    assert r.returncode == 0 and r.stdout == text


# --------------------------------------------------------------------------- sealed manifests


@pytest.fixture(scope="module")
def age_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("age-keys")
    ids = [d / "one.txt", d / "two.txt", d / "other.txt"]
    return ids, [write_age_identity(p) for p in ids]


def _manifest(n: int = 3000) -> bytes:
    # something shaped like a CBOR manifest, with paths that must not show in the sealed bytes
    return b"".join(b"\xa2dpathx\x1epatients/Smith-%05d/scan.dcmdsize\x1a%04x" % (i, i) for i in range(n))


@pytest.mark.interop
def test_sealed_manifest_decrypts_with_stock_age_and_pyrage(age_keys):
    require("age")
    ids, rcpts = age_keys
    cipher = make_cipher(recipients=rcpts[:2])
    assert sealed_name(cipher) == ".packerfs/manifest.cbor.age"
    for data in (b"", b"\xa1", _manifest(), _manifest(6000)):  # 0 B .. ~360 KiB (several 64 KiB chunks)
        sealed = seal_manifest(cipher, SECRET_A, 7, data)
        assert sealed.startswith(b"age-encryption.org/v1\n")
        for ident in ids[:2]:
            r = subprocess.run(["age", "-d", "-i", str(ident)], input=sealed, capture_output=True, timeout=60)
            assert r.returncode == 0 and r.stdout == data, r.stderr
            pid = pyrage.x25519.Identity.from_str(ident.read_text().splitlines()[-1])
            assert pyrage.decrypt(sealed, [pid]) == data
            assert open_manifest(KeyRing([str(ident)]), "age", sealed) == data
        if data:
            assert b"patients" not in sealed and b"Smith" not in sealed


def test_sealed_manifest_is_deterministic_and_differs_across_bins(age_keys):
    ids, rcpts = age_keys
    cipher = make_cipher(recipients=rcpts[:1])
    data = _manifest(500)
    one = seal_manifest(cipher, SECRET_A, 1, data)
    assert seal_manifest(make_cipher(recipients=rcpts[:1]), SECRET_A, 1, data) == one  # a new process's cipher too
    others = [
        seal_manifest(cipher, SECRET_A, 2, data),  # another bin
        seal_manifest(cipher, SECRET_B, 1, data),  # another data set
        seal_manifest(cipher, SECRET_A, 1, data[:-1] + b"!"),  # other contents, same bin
        seal_manifest(cipher, SECRET_A, 1, data, kind="snapshot"),
        seal_manifest(make_cipher(recipients=rcpts[:2]), SECRET_A, 1, data),  # other recipients
    ]
    assert len({one, *others}) == 6
    # nothing in common but the format's fixed text: no repeated nonce or keystream block
    payload = lambda s: s[s.index(b"\n---") :]  # noqa: E731
    for o in others[:4]:
        assert payload(o)[60:92] != payload(one)[60:92]
    ring = KeyRing([str(ids[0])])
    for i, o in enumerate(others):
        assert open_manifest(ring, "age", o) == (data[:-1] + b"!" if i == 2 else data)


def test_sealed_manifest_holds_no_key_material(age_keys):
    from packerfs.crypt.age import FileSecrets, parse_recipient

    _, rcpts = age_keys
    cipher = make_cipher(recipients=rcpts[:1])
    data = _manifest(200)
    sealed = seal_manifest(cipher, SECRET_A, 3, data)
    seed = manifest_seed(cipher, SECRET_A, 3, data)
    fs = FileSecrets.derive(seed, [parse_recipient(rcpts[0])])
    assert sealed.startswith(fs.header)  # the header is the one the seed gives: only the wrapped file key
    for secret in (SECRET_A, seed, fs.file_key, names_key(SECRET_A)):
        assert secret not in sealed
    # and the params blob (the seed wrapped under the secret) is not in it either
    wrapped = cipher.new_file(len(data), SECRET_A, seed=seed).params()
    assert wrapped[-49:] not in sealed


def test_open_manifest_with_the_wrong_key_is_one_line(age_keys):
    ids, rcpts = age_keys
    sealed = seal_manifest(make_cipher(recipients=rcpts[:2]), SECRET_A, 1, _manifest(100))
    for ring in (KeyRing([str(ids[2])]), KeyRing()):
        with pytest.raises(KeyProblem) as e:
            open_manifest(ring, "age", sealed, name="bin-000001.car: .packerfs/manifest.cbor.age")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("bin-000001.car: .packerfs/manifest.cbor.age: ")
    damaged = bytearray(sealed)
    damaged[-5] ^= 1
    with pytest.raises(FormatError):
        open_manifest(KeyRing([str(ids[0])]), "age", bytes(damaged))
    with pytest.raises(FormatError):
        open_manifest(KeyRing([str(ids[0])]), "plain", sealed)
    with pytest.raises(UsageError):
        seal_manifest(PlainCipher(), SECRET_A, 1, b"x")


@pytest.mark.interop
def test_sealed_manifest_openpgp(gpg_ed_key):
    from gpgkeys import gpg

    from packerfs.crypt.openpgp import OpenPGPCipher

    cipher = OpenPGPCipher.from_keyring([gpg_ed_key["fpr"]], gpg_ed_key["home"])
    assert sealed_name(cipher) == ".packerfs/manifest.cbor.gpg"
    data = _manifest(1500)
    sealed = seal_manifest(cipher, SECRET_A, 4, data)
    assert seal_manifest(cipher, SECRET_A, 4, data) == sealed and seal_manifest(cipher, SECRET_A, 5, data) != sealed
    r = gpg(gpg_ed_key["home"], "--decrypt", input=sealed, check=False)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    assert open_manifest(KeyRing(gpg_homedir=gpg_ed_key["home"]), "openpgp", sealed) == data


def test_module_surface():
    import packerfs.privacy as p

    assert p.hidden_name is names.hidden_name and p.padme is padding.padme
    assert p.seal_manifest is sealed_manifest.seal_manifest
