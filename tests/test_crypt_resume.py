"""Partial params (Encryptor.params() mid-stream) and Cipher.resume_file(), for every cipher.

The pack seals a bin in the middle of a file: the stream bytes already emitted
must be servable from params taken at that moment, and an interrupted scan must
continue the same file version with the same secrets, byte for byte. Stock
`age -d` and `gpg -d` decrypt the resumed streams. No mocks.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess

import pytest

from packerfs.crypt import PlainCipher
from packerfs.crypt import age as agemod
from packerfs.crypt.age import AgeCipher, parse_recipient
from packerfs.errors import FormatError, KeyProblem, SourceChanged, UsageError

HAVE_AGE = shutil.which("age") is not None and shutil.which("age-keygen") is not None
GPG = shutil.which("gpg")

SECRET = hashlib.sha256(b"packerfs resume test dataset secret").digest()
OTHER_SECRET = hashlib.sha256(b"another dataset secret").digest()
MiB = 1 << 20
BIG = 3 * MiB + 12_345  # one "real" size per cipher


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def steps_of(n: int, seed: int, sizes=(1, 7, 4096, 65_535, 65_536, 65_537, 200_000, MiB)) -> list[int]:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < n:
        k = min(rng.choice(sizes), n - pos)
        out.append(k)
        pos += k
    return out


def run_pass(enc, data: bytes, steps: list[int], snap_every: int = 1):
    """Feed `data` in `steps`; -> (stream, [(emitted, params)], final params).

    Params are taken before the first update(), after every `snap_every`-th
    update(), and after finish()."""
    out = bytearray()
    snaps = [(0, enc.params())]
    pos = 0
    for i, n in enumerate(steps):
        out += enc.update(data[pos : pos + n])
        pos += n
        if (i + 1) % snap_every == 0:
            snaps.append((len(out), enc.params()))
    assert pos == len(data)
    out += enc.finish()
    final = enc.params()
    snaps.append((len(out), final))
    return bytes(out), snaps, final


def reader(data: bytes):
    return lambda o, n: data[o : o + n]


def check_partial_ranges(cipher, stream: bytes, snaps, data: bytes, rng: random.Random, probes: int = 6) -> None:
    """open_stream(partial) regenerates every byte emitted before the params were taken."""
    for emitted, params in snaps:
        s = cipher.open_stream(params, len(data), reader(data), SECRET)
        assert s.size == len(stream)
        if emitted == 0:
            continue
        assert s.read(0, emitted) == stream[:emitted]
        for _ in range(probes):
            a = rng.randrange(emitted)
            n = rng.randrange(1, emitted - a + 1)
            assert s.read(a, n) == stream[a : a + n], (emitted, a, n)
        tail = min(emitted, 70_000)
        assert s.read(emitted - tail, tail) == stream[emitted - tail : emitted]


def check_resume(cipher, data: bytes, stream: bytes, snaps, final: bytes, seed: int) -> None:
    """resume_file() from partial and from final params: identical stream and final params."""
    picks = [snaps[0], snaps[len(snaps) // 2], snaps[-2], snaps[-1]]
    for i, (_, params) in enumerate(picks):
        enc = cipher.resume_file(params, len(data), SECRET)
        steps = steps_of(len(data), seed + 17 * i + 1)  # another chunking than the original pass
        got, _, got_final = run_pass(enc, data, steps, snap_every=1_000_000)
        assert got == stream
        assert got_final == final


# ----------------------------------------------------------------------------- plain


def test_plain_partial_and_resume():
    c = PlainCipher()
    data = data_of(300_001)
    stream, snaps, final = run_pass(c.new_file(len(data), SECRET), data, steps_of(len(data), 1))
    assert stream == data and final == b"" and all(p == b"" for _, p in snaps)
    check_partial_ranges(c, stream, snaps, data, random.Random(1))
    check_resume(c, data, stream, snaps, final, 1)
    with pytest.raises(FormatError):
        c.resume_file(b"\x02junk", len(data), SECRET)


# ----------------------------------------------------------------------------- age


@pytest.fixture(scope="module")
def age_key(tmp_path_factory):
    if not HAVE_AGE:
        pytest.skip("age is not installed")
    d = tmp_path_factory.mktemp("age-resume")
    ident = d / "id.txt"
    subprocess.run(["age-keygen", "-o", str(ident)], check=True, capture_output=True)
    pub = subprocess.run(["age-keygen", "-y", str(ident)], check=True, capture_output=True).stdout.decode().strip()
    return ident, pub


def test_age_partial_params_and_resume(age_key, tmp_path):
    ident, pub = age_key
    c = AgeCipher([parse_recipient(pub)])
    data = data_of(BIG, 2)
    stream, snaps, final = run_pass(c.new_file(len(data), SECRET), data, steps_of(len(data), 2))
    assert len(stream) == c.stream_size(len(data))
    # everything in age params is drawn up front: one blob, valid at any time, covering everything
    assert all(p == final for _, p in snaps)
    assert len(final) == 1 + 4 + 8 + 49  # version, uvarint(3 MiB+), recipients fingerprint, wrapped seed
    check_partial_ranges(c, stream, snaps, data, random.Random(2))
    check_resume(c, data, stream, snaps, final, 2)

    # the resumed stream is what stock age decrypts
    enc = c.resume_file(snaps[3][1], len(data), SECRET)
    resumed, _, _ = run_pass(enc, data, [len(data)])
    f = tmp_path / "f.age"
    f.write_bytes(resumed)
    assert subprocess.run(["age", "-d", "-i", str(ident), str(f)], check=True, capture_output=True).stdout == data


def test_age_small_sizes_resume(age_key):
    _, pub = age_key
    c = AgeCipher([parse_recipient(pub)])
    for n in (0, 1, 65_535, 65_536, 65_537, 2 * 65_536):
        data = data_of(n, 3)
        stream, snaps, final = run_pass(c.new_file(n, SECRET), data, steps_of(n, n, (1, 1000, 65_536, 70_000)))
        check_partial_ranges(c, stream, snaps, data, random.Random(n))
        got, _, got_final = run_pass(c.resume_file(final, n, SECRET), data, steps_of(n, n + 1))
        assert (got, got_final) == (stream, final)


def test_age_resume_errors(age_key):
    _, pub = age_key
    c = AgeCipher([parse_recipient(pub)])
    data = data_of(100_000, 4)
    enc = c.new_file(len(data), SECRET)
    enc.update(data[:70_000])
    params = enc.params()
    with pytest.raises(KeyProblem):
        c.resume_file(params, len(data), OTHER_SECRET)
    with pytest.raises(KeyProblem):
        c.open_stream(params, len(data), reader(data), OTHER_SECRET)
    with pytest.raises(FormatError, match="100000 bytes, not 100001"):
        c.resume_file(params, len(data) + 1, SECRET)
    with pytest.raises(FormatError, match="100000 bytes, not 99999"):
        c.open_stream(params, len(data) - 1, reader(data), SECRET)
    with pytest.raises(FormatError):
        c.resume_file(b"\x07" + params[1:], len(data), SECRET)
    # other recipients: refused, whether the header would be longer or just different
    other = parse_recipient(agemod.X25519Identity(os.urandom(32)).recipient)
    for rs in ([parse_recipient(pub), other], [other], [other, parse_recipient(pub)]):
        with pytest.raises(UsageError, match="recipients"):
            AgeCipher(rs).resume_file(params, len(data), SECRET)
        with pytest.raises(UsageError, match="recipients"):
            AgeCipher(rs).open_stream(params, len(data), reader(data), SECRET)
    for bad in (params[:-1], params + b"\0", params[:5], b""):
        with pytest.raises(FormatError):
            c.resume_file(bad, len(data), SECRET)


def test_age_older_params_formats_are_refused(age_key):
    """Version 2 blobs (which stored the whole header) are not read any more: FormatError, one line."""
    _, pub = age_key
    c = AgeCipher([parse_recipient(pub)])
    data = data_of(1000, 5)
    _, _, final = run_pass(c.new_file(len(data), SECRET), data, [len(data)])
    for version in (1, 2, 4):
        with pytest.raises(FormatError, match="unknown packerfs version") as ei:
            c.open_stream(bytes([version]) + final[1:], len(data), reader(data), SECRET)
        assert "\n" not in str(ei.value)


# ----------------------------------------------------------------------------- OpenPGP


def gpg(home: str, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPG, "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
        input=input, capture_output=True, check=False,
    )


@pytest.fixture(scope="module")
def cv_key(tmp_path_factory):
    if GPG is None:
        pytest.skip("gpg is not installed")
    home = str(tmp_path_factory.mktemp("gpg-resume"))
    os.chmod(home, 0o700)
    uid = "Resume Test <resume@packerfs.test>"
    assert gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never").returncode == 0
    out = gpg(home, "--with-colons", "--list-keys", uid).stdout.decode()
    fpr = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")][0]
    assert gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "never").returncode == 0
    yield {"home": home, "fpr": fpr}
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True)


def pgp_cipher(key, **opts):
    from packerfs.crypt.openpgp import OpenPGPCipher

    return OpenPGPCipher.from_keyring([key["fpr"]], key["home"], **opts)


def gpg_decrypt(home: str, blob: bytes) -> bytes:
    r = gpg(home, "--decrypt", input=blob)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


@pytest.mark.parametrize(
    "opts",
    [
        {},  # default layout: definite lengths, 1 MiB checkpoints
        {"partial_threshold": MiB, "partial_chunk_log2": 16, "checkpoint_log2": 16},  # partial body lengths
    ],
    ids=["definite", "partial-lengths"],
)
def test_openpgp_partial_params_and_resume(cv_key, opts):
    c = pgp_cipher(cv_key, **opts)
    data = data_of(BIG, 6)
    stream, snaps, final = run_pass(c.new_file(len(data), SECRET), data, steps_of(len(data), 6), snap_every=3)
    assert len(stream) == c.stream_size(len(data))
    assert len({p for _, p in snaps}) == len(snaps)  # partial params grow as checkpoints are taken
    check_partial_ranges(c, stream, snaps, data, random.Random(6))
    for emitted, params in snaps[:-1]:  # partial params refuse what they do not cover
        s = c.open_stream(params, len(data), reader(data), SECRET)
        assert s.covered == emitted < s.size
        with pytest.raises(FormatError, match="partial"):
            s.read(max(emitted - 5, 0), 10)
        with pytest.raises(FormatError, match="partial"):
            s.read(s.size - 30, 30)  # the MDC is not known before finish()
    assert c.open_stream(final, len(data), reader(data), SECRET).covered == len(stream)
    check_resume(c, data, stream, snaps, final, 6)

    # fed in the same pieces, a resumed encryptor hands out the very same partial params
    enc = c.resume_file(snaps[len(snaps) // 2][1], len(data), SECRET)
    _, again, again_final = run_pass(enc, data, steps_of(len(data), 6), snap_every=3)
    assert again == snaps and again_final == final

    # and what the resumed pass wrote is what stock gpg decrypts
    enc = c.resume_file(snaps[2][1], len(data), SECRET)
    resumed, _, _ = run_pass(enc, data, steps_of(len(data), 60))
    assert resumed == stream
    assert gpg_decrypt(cv_key["home"], resumed) == data


def test_openpgp_partial_params_at_every_step_tiny_framing(cv_key):
    """Threshold 600, chunks of 512, checkpoints every 64 octets: framing headers everywhere."""
    c = pgp_cipher(cv_key, partial_threshold=600, partial_chunk_log2=9, checkpoint_log2=6)
    rng = random.Random(7)
    for n in (0, 1, 17, 500, 595, 1024, 1530, 5000, 20_000):
        data = data_of(n, 7)
        stream, snaps, final = run_pass(c.new_file(n, SECRET), data, steps_of(n, n, (1, 3, 16, 61, 333, 1000)))
        for emitted, params in snaps:
            s = c.open_stream(params, n, reader(data), SECRET)
            assert s.read(0, emitted) == stream[:emitted]
            for _ in range(3):
                if emitted:
                    a = rng.randrange(emitted)
                    b = rng.randrange(a, emitted) + 1
                    assert s.read(a, b - a) == stream[a:b], (n, emitted, a, b)
        for _, params in (snaps[0], snaps[len(snaps) // 2], snaps[-1]):
            got, _, got_final = run_pass(c.resume_file(params, n, SECRET), data, steps_of(n, n + 3, (5, 700)))
            assert (got, got_final) == (stream, final), n
        if n in (0, 5000):
            assert gpg_decrypt(cv_key["home"], stream) == data


def test_openpgp_resume_errors(cv_key):
    c = pgp_cipher(cv_key, checkpoint_log2=12)
    data = data_of(100_000, 8)
    enc = c.new_file(len(data), SECRET)
    head = enc.update(data[:60_000])
    partial = enc.params()
    tail = enc.update(data[60_000:]) + enc.finish()
    final = enc.params()
    stream = head + tail
    for params in (partial, final):
        with pytest.raises(KeyProblem):
            c.resume_file(params, len(data), OTHER_SECRET)
        with pytest.raises(KeyProblem):
            c.open_stream(params, len(data), reader(data), OTHER_SECRET)
        for wrong in (len(data) + 1, len(data) - 1, 40 * MiB):
            with pytest.raises(FormatError, match="100000 bytes, not"):
                c.resume_file(params, wrong, SECRET)
            with pytest.raises(FormatError, match="100000 bytes, not"):
                c.open_stream(params, wrong, reader(data), SECRET)
        with pytest.raises(FormatError):
            c.resume_file(params[:40], len(data), SECRET)
    # other options (another layout) or recipients: refused rather than resumed into other bytes
    for other in (
        pgp_cipher(cv_key, partial_threshold=600, partial_chunk_log2=9),
        pgp_cipher(cv_key),  # only the checkpoint interval differs
    ):
        with pytest.raises(UsageError, match="recipients"):
            other.resume_file(partial, len(data), SECRET)
        with pytest.raises(UsageError, match="recipients"):
            other.open_stream(final, len(data), reader(data), SECRET)
    # a changed plaintext is not refused by the encryptor: it yields other bytes inside the
    # covered prefix, which the caller's digest check of the sealed leaves catches
    changed = bytearray(data)
    changed[10_000] ^= 1
    got, _, _ = run_pass(c.resume_file(partial, len(data), SECRET), bytes(changed), [4096] * 24 + [1696])
    assert len(got) == len(stream) and got[: len(head)] != head
    # the size is still enforced while feeding
    with pytest.raises(SourceChanged):
        c.resume_file(partial, len(data), SECRET).update(data + b"x")
    # the same params still resume the original bytes
    got, _, got_final = run_pass(c.resume_file(partial, len(data), SECRET), data, [len(data)])
    assert (got, got_final) == (stream, final)


def test_openpgp_params_layout_and_older_formats(cv_key):
    """Version 3: small, partial and final blobs share their leading octets; older versions are refused."""
    from packerfs.crypt.openpgp import _Params

    c = pgp_cipher(cv_key, checkpoint_log2=12)
    data = data_of(50_000, 9)
    stream, snaps, final = run_pass(c.new_file(len(data), SECRET), data, steps_of(len(data), 9))
    p = _Params.decode(final, c._wrapped_len)
    assert p.final and p.plain_size == len(data) and p.fingerprint == c.fingerprint and p.covered is None
    count = (len(stream) - 1) >> 12
    assert len(final) == 1 + 3 + 8 + 49 + 1 + 20 + 16 * count == len(p.fixed) + 21 + 16 * count
    for emitted, params in snaps[:-1]:
        q = _Params.decode(params, c._wrapped_len)
        assert not q.final and q.covered == emitted and q.mdc is None and q.fixed == p.fixed
        assert p.checkpoints.startswith(q.checkpoints)
    for version in (1, 2, 4):
        with pytest.raises(FormatError, match="unknown packerfs version"):
            c.open_stream(bytes([version]) + final[1:], len(data), reader(data), SECRET)
    with pytest.raises(FormatError):
        c.open_stream(b"PFOP" + final, len(data), reader(data), SECRET)  # the old magic
    for bad in (final[:-1], final + b"\0", final[: len(p.fixed)], final[: len(p.fixed) + 5]):
        with pytest.raises(FormatError):
            c.open_stream(bad, len(data), reader(data), SECRET)
