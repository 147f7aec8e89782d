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


def age_decrypt(identity, path) -> bytes:
    return subprocess.run(
        ["age", "-d", "-i", str(identity), str(path)], check=True, capture_output=True, timeout=300
    ).stdout


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
    subprocess.run(["age-keygen", "-o", str(ident)], check=True, capture_output=True, timeout=60)
    pub = subprocess.run(
        ["age-keygen", "-y", str(ident)], check=True, capture_output=True, timeout=60
    ).stdout.decode().strip()
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
    assert age_decrypt(ident, f) == data


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
        input=input, capture_output=True, check=False, timeout=300,
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
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=60)


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


# ----------------------------------------------------------------------------- resume_at
#
# Cipher.resume_at(params, size, secret, stream_offset) -> (encryptor, plaintext offset):
# continuing inside a split file from the end of its sealed leaves, reading only the rest.
# The scan's pattern is reproduced: 1 MiB reads, params taken as soon as the stream has
# passed each 1 MiB leaf boundary (that is when a bin is sealed), then a resume at that
# boundary from those params, fed from the returned offset to the end of the file.


def seal_pass(enc, data: bytes, read: int = MiB):
    """Feed `data` in `read`-sized pieces; -> (stream, {k: params when the stream first reached k MiB}, final)."""
    out = bytearray()
    at = {0: enc.params()}
    for i in range(0, len(data), read):
        out += enc.update(data[i : i + read])
        for k in range(1, len(out) // MiB + 1):
            at.setdefault(k, enc.params())
    out += enc.finish()
    final = enc.params()
    for k in range(1, len(out) // MiB + 1):
        at.setdefault(k, final)
    return bytes(out), at, final


def feed_from(enc, data: bytes, offset: int, read: int = MiB) -> bytes:
    out = bytearray()
    for i in range(offset, len(data), read):
        out += enc.update(data[i : i + read])
    out += enc.finish()
    return bytes(out)


def check_resume_at(cipher, data: bytes, max_lead: int, *, read: int = MiB) -> tuple[bytes, dict, bytes]:
    """Every k MiB resume point, from the params sealed there and from the final params: the same
    octets as the uninterrupted stream from k MiB on, the same final params. From partial params the
    plaintext is read from at most `max_lead` octets before k MiB (the cheap path was taken)."""
    n = len(data)
    stream, at, final = seal_pass(cipher.new_file(n, SECRET), data, read)
    assert len(stream) == cipher.stream_size(n)
    points = sorted(set(range(0, len(stream) + 1, MiB)) | {len(stream)})
    for off in points:
        k = off // MiB
        for params in {at.get(k, final), final}:
            enc, pos = cipher.resume_at(params, n, SECRET, off)
            assert 0 <= pos <= n
            got = feed_from(enc, data, pos, read)
            assert got == stream[off:], (n, off, len(got), len(stream) - off)
            assert enc.params() == final, (n, off)
            if params is not final and 0 < off < len(stream):
                assert off - pos <= max_lead, (n, off, pos)
    return stream, at, final


def resume_sizes(cipher) -> list[int]:
    """Around MiB multiples (of plaintext and of stream), 3 MiB + 1, and a stream of exactly 2 MiB."""
    exact = next(f for f in range(2 * MiB - 4096, 2 * MiB) if cipher.stream_size(f) == 2 * MiB)
    return [0, 1, MiB - 1, MiB, 2 * MiB, exact, 3 * MiB + 1]


def test_plain_resume_at():
    c = PlainCipher()
    for n in (0, 1, MiB, 3 * MiB + 1):
        data = data_of(n, 20)
        check_resume_at(c, data, 0)
    with pytest.raises(ValueError):
        c.resume_at(b"", 10, SECRET, 11)
    with pytest.raises(FormatError):
        c.resume_at(b"\x03junk", 10, SECRET, 0)


def test_age_resume_at_every_leaf(age_key, tmp_path):
    ident, pub = age_key
    c = AgeCipher([parse_recipient(pub)])
    lead = c.header_size + agemod.NONCE_SIZE + agemod.CHUNK_SIZE
    for n in resume_sizes(c):
        data = data_of(n, 21)
        stream, at, final = check_resume_at(c, data, lead)
        if n == 3 * MiB + 1:
            # stock age decrypts a stream made of a sealed prefix and a resumed suffix
            enc, pos = c.resume_at(at[2], n, SECRET, 2 * MiB)
            assert pos == (2 * MiB - c.header_size - agemod.NONCE_SIZE) // agemod.ENC_CHUNK_SIZE * agemod.CHUNK_SIZE
            f = tmp_path / "joined.age"
            f.write_bytes(stream[: 2 * MiB] + feed_from(enc, data, pos, 100_000))
            assert age_decrypt(ident, f) == data
    data = data_of(MiB, 22)
    _, _, final = seal_pass(c.new_file(MiB, SECRET), data)
    for bad in (-1, c.stream_size(MiB) + 1):
        with pytest.raises(ValueError):
            c.resume_at(final, MiB, SECRET, bad)
    with pytest.raises(KeyProblem):
        c.resume_at(final, MiB, OTHER_SECRET, MiB)
    with pytest.raises(FormatError):
        c.resume_at(final, MiB + 1, SECRET, MiB)


def test_age_ssh_rsa_resume_at(ssh_rsa_key, tmp_path):
    if not HAVE_AGE:
        pytest.skip("age is not installed")
    c = AgeCipher([parse_recipient(ssh_rsa_key.with_suffix(".pub").read_text().strip())])
    n = 3 * MiB + 1
    data = data_of(n, 23)
    stream, at, _ = check_resume_at(c, data, c.header_size + agemod.NONCE_SIZE + agemod.CHUNK_SIZE)
    enc, pos = c.resume_at(at[1], n, SECRET, MiB)
    f = tmp_path / "joined.age"
    f.write_bytes(stream[:MiB] + feed_from(enc, data, pos))
    assert age_decrypt(ssh_rsa_key, f) == data


def test_generic_resume_at_reencrypts_from_zero(age_key):
    """Cipher.resume_at's default (for ciphers without random access): from octet 0, prefix dropped."""
    from packerfs.crypt.base import Cipher

    _, pub = age_key
    c = AgeCipher([parse_recipient(pub)])
    n = 2 * MiB + 5
    data = data_of(n, 24)
    stream, at, final = seal_pass(c.new_file(n, SECRET), data)
    for off in (0, 1, MiB, len(stream) - 1, len(stream)):
        enc, pos = Cipher.resume_at(c, at.get(off // MiB, final), n, SECRET, off)
        assert pos == 0
        assert feed_from(enc, data, 0, 300_000) == stream[off:] and enc.params() == final


# --- OpenPGP


def _sealed_midstate(cipher, params: bytes):
    from packerfs.crypt.openpgp import _Params

    return _Params.decode(params, cipher._wrapped_len).midstate


def _strip_midstate(cipher, params: bytes) -> bytes:
    from packerfs.crypt.openpgp import _Params

    p = _Params.decode(params, cipher._wrapped_len)
    p.midstate = None
    return p.encode()


PGP_LAYOUTS = [
    pytest.param({}, id="definite"),
    pytest.param({"partial_threshold": MiB, "partial_chunk_log2": 20}, id="partial-1MiB-chunks"),
    pytest.param({"partial_threshold": MiB, "partial_chunk_log2": 16}, id="partial-64KiB-chunks"),
]


@pytest.mark.parametrize("opts", PGP_LAYOUTS)
def test_openpgp_resume_at_every_leaf(cv_key, opts):
    c = pgp_cipher(cv_key, **opts)
    # PKESKs, packet framing (2 octets per 64 KiB chunk at most), the SHA-1 state's 64-octet alignment
    max_lead = c._header_len + 64 + 2 * (4 * MiB >> c.partial_chunk_log2) + 64
    for n in resume_sizes(c):
        data = data_of(n, 25)
        stream, at, final = check_resume_at(c, data, max_lead)
        for k, params in at.items():
            if 0 < k and params is not final:
                assert _sealed_midstate(c, params) is not None, (n, k)  # the cheap path is always there
        if n == 3 * MiB + 1:
            # without the SHA-1 state (params of an older packerfs): hash the prefix again, same bytes
            for k in (1, 3):
                enc, pos = c.resume_at(_strip_midstate(c, at[k]), n, SECRET, k * MiB)
                assert pos == 0
                assert feed_from(enc, data, 0) == stream[k * MiB :] and enc.params() == final
            # stock gpg decrypts a sealed prefix joined to a resumed suffix (MDC included)
            enc, pos = c.resume_at(at[2], n, SECRET, 2 * MiB)
            assert gpg_decrypt(cv_key["home"], stream[: 2 * MiB] + feed_from(enc, data, pos)) == data


def test_openpgp_resume_at_chain(cv_key):
    """Interrupted at every leaf boundary, each time resumed from the params of the previous resumed
    pass: the joined stream is the uninterrupted one, the MDC too, and gpg decrypts it."""
    c = pgp_cipher(cv_key, partial_threshold=MiB, partial_chunk_log2=20)
    n = 5 * MiB + 3
    data = data_of(n, 26)
    enc, pos = c.new_file(n, SECRET), 0
    reference, _, ref_final = run_pass(c.resume_file(enc.params(), n, SECRET), data, [MiB] * 5 + [3])
    joined = bytearray()
    k = 0
    while True:
        out = bytearray()
        for i in range(pos, n, MiB):
            out += enc.update(data[i : i + MiB])
            if len(joined) + len(out) >= (k + 1) * MiB:
                break
        else:
            joined += out + enc.finish()
            break
        k += 1
        params = enc.params()  # the bin is sealed at the leaf boundary; the octets after it are redone
        assert _sealed_midstate(c, params) is not None
        joined += out[: k * MiB - len(joined)]
        enc, pos = c.resume_at(params, n, SECRET, k * MiB)
        assert k * MiB - pos < 400
    assert k == 5
    assert bytes(joined) == reference and enc.params() == ref_final
    assert gpg_decrypt(cv_key["home"], bytes(joined)) == data


def test_openpgp_resume_at_rsa(gpg_rsa_key):
    c = pgp_cipher(gpg_rsa_key)
    n = 3 * MiB + 1
    data = data_of(n, 27)
    stream, at, _ = check_resume_at(c, data, c._header_len + 128)
    enc, pos = c.resume_at(at[3], n, SECRET, 3 * MiB)
    assert gpg_decrypt(gpg_rsa_key["home"], stream[: 3 * MiB] + feed_from(enc, data, pos)) == data


def test_openpgp_resume_at_tiny_framing(cv_key):
    """Checkpoints every 64 octets, partial chunks of 512: resume at every checkpoint and between them."""
    c = pgp_cipher(cv_key, partial_threshold=600, partial_chunk_log2=9, checkpoint_log2=6)
    for n in (0, 1, 500, 1530, 5000):
        data = data_of(n, 28)
        stream, snaps, final = run_pass(c.new_file(n, SECRET), data, steps_of(n, n, (1, 3, 61, 333)))
        for emitted, params in snaps:
            for off in sorted({0, emitted // 64 * 64, emitted, max(emitted - 1, 0), len(stream)}):
                enc, pos = c.resume_at(params, n, SECRET, off)
                got = bytearray()
                for step in steps_of(n - pos, off, (1, 100, 777)) if pos < n else []:
                    got += enc.update(data[pos : pos + step])
                    pos += step
                got += enc.finish()
                assert bytes(got) == stream[off:], (n, emitted, off)
                assert enc.params() == final
        if n == 5000:
            assert gpg_decrypt(cv_key["home"], stream) == data


def test_openpgp_resume_at_errors(cv_key):
    c = pgp_cipher(cv_key)
    n = 2 * MiB
    data = data_of(n, 29)
    _, at, final = seal_pass(c.new_file(n, SECRET), data)
    params = at[1]
    for bad in (-1, c.stream_size(n) + 1):
        with pytest.raises(ValueError):
            c.resume_at(params, n, SECRET, bad)
    with pytest.raises(KeyProblem):
        c.resume_at(params, n, OTHER_SECRET, MiB)
    with pytest.raises(FormatError):
        c.resume_at(params, n + 1, SECRET, MiB)
    with pytest.raises(UsageError, match="recipients"):
        pgp_cipher(cv_key, checkpoint_log2=16).resume_at(params, n, SECRET, MiB)
    # an altered SHA-1 state does not open (it is wrapped and bound to its position)
    ms = _sealed_midstate(c, params)
    i = params.index(ms) + 20
    damaged = params[:i] + bytes([params[i] ^ 1]) + params[i + 1 :]
    with pytest.raises(FormatError, match="MDC state"):
        c.resume_at(damaged, n, SECRET, MiB)
    # a state moved to other params (another position of the same file) does not open either
    other = at[2]
    moved = params.replace(ms, _sealed_midstate(c, other))
    with pytest.raises(FormatError, match="MDC state"):
        c.resume_at(moved, n, SECRET, MiB)
    # the size is still enforced
    enc, pos = c.resume_at(params, n, SECRET, MiB)
    with pytest.raises(SourceChanged):
        enc.update(data[pos:] + b"x")
    enc, pos = c.resume_at(params, n, SECRET, MiB)
    enc.update(data[pos:-1])
    with pytest.raises(SourceChanged):
        enc.finish()


def test_openpgp_resume_at_without_libcrypto_sha1(cv_key, monkeypatch):
    """Where libcrypto's SHA1_* are missing, hashlib is used: no state in partial params, and resume_at
    hashes the prefix again (plaintext from octet 0), with the same result."""
    from packerfs.crypt import sha1state

    monkeypatch.setattr(sha1state, "_checked", False)
    c = pgp_cipher(cv_key)
    n = 3 * MiB + 1
    data = data_of(n, 30)
    stream, at, final = seal_pass(c.new_file(n, SECRET), data)
    assert all(_sealed_midstate(c, p) is None for k, p in at.items() if p is not final)
    for k in (1, 2, 3):
        enc, pos = c.resume_at(at[k], n, SECRET, k * MiB)
        assert pos == 0 and feed_from(enc, data, 0) == stream[k * MiB :] and enc.params() == final
    monkeypatch.undo()
    # params made with the state are still resumed correctly where it cannot be used
    _, at2, final2 = seal_pass(c.new_file(n, SECRET), data)
    monkeypatch.setattr(sha1state, "_checked", False)
    enc, pos = c.resume_at(at2[2], n, SECRET, 2 * MiB)
    stream2 = c.open_stream(final2, n, reader(data), SECRET).read(0, c.stream_size(n))
    assert pos == 0 and feed_from(enc, data, 0) == stream2[2 * MiB :] and enc.params() == final2


# ----------------------------------------------------------------------------- SHA-1 state


def test_sha1_state_roundtrip():
    from packerfs.crypt import sha1state

    if not sha1state.available():
        pytest.skip("the system libcrypto has no SHA1_Init")
    rng = random.Random(31)
    msg = rng.randbytes(300_000)
    for cut in (0, 64, 128, 4096, 65_536 * 3, 299_968):
        h = sha1state.Sha1()
        h.update(msg[:cut])
        st = h.state()
        assert len(st) == 20
        h2 = sha1state.Sha1.resume(st, cut)
        rest = memoryview(bytearray(msg))[cut:]
        for j in range(0, len(rest), 7777):  # bytes, bytearray views, read-only views
            piece = rest[j : j + 7777]
            h2.update(piece if j % 3 else bytes(piece))
        assert h2.digest() == hashlib.sha1(msg).digest() and h2.length == len(msg)
    assert sha1state.Sha1().state() == bytes.fromhex("67452301efcdab8998badcfe10325476c3d2e1f0")
    h = sha1state.Sha1()
    h.update(b"abc")
    assert h.digest() == hashlib.sha1(b"abc").digest()
    with pytest.raises(ValueError):
        h.state()  # not at a multiple of 64 octets
    with pytest.raises(ValueError):
        sha1state.Sha1.resume(bytes(20), 65)
