"""Resume cost: continuing a split file at 90% of its stream, against re-encrypting all of it.

    python3 tools/bench_resume.py [--size 256MiB] [--at 0.9] [--runs 3] [--dir DIR]

An interrupted scan resumes a file at the end of its sealed leaves. For each
cipher (plain, age X25519, OpenPGP cv25519 if gpg is installed) this takes the
partial params a seal at `--at` of the stream would store, then times, best of
--runs, in the same run and on the same page-cached file (1 MiB reads, output
discarded):

  full re-encryption  resume_file(params) over the whole file      (the anchor: what a resume cost before)
  resume_at           resume_at(params, ..., k MiB) from its plaintext offset
  + last-leaf check   open_stream(params).read() of the last sealed leaf + SHA-256 (the scan's check)
  OpenPGP, (a)        resume_at with the SHA-1 state removed from params: the prefix is read and SHA-1
                      hashed again (what is done without libcrypto's SHA1_*, or for older params)

and prints each as a ratio to the anchor (the ideal is 1 - at, plus the check).
Every resumed pass is checked to end in the same final params as the full one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from bench_crypt import make_file, parse_size, pick_dir  # noqa: E402

from packerfs.crypt import PlainCipher  # noqa: E402
from packerfs.crypt.age import AgeCipher, X25519Identity, parse_recipient  # noqa: E402

MiB = 1 << 20
_TIMEOUT = 300


def _best(fn, runs: int):
    best, result = None, None
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, result


def _pass(enc, fd: int, start: int, size: int) -> None:
    buf = bytearray(MiB)
    view = memoryview(buf)
    off = start
    while off < size:
        n = os.preadv(fd, [view[: min(MiB, size - off)]], off)
        if n <= 0:
            raise RuntimeError("short read")
        enc.update(view[:n])
        off += n
    enc.finish()


def _sealed_params(cipher, fd: int, size: int, secret: bytes, at: float) -> tuple[bytes, int]:
    """The partial params a seal at `at` of the stream stores, and that seal's stream offset."""
    k = max(int(cipher.stream_size(size) * at) // MiB, 1)
    enc = cipher.new_file(size, secret)
    emitted, off = 0, 0
    while emitted < k * MiB:
        data = os.pread(fd, min(MiB, size - off), off)
        off += len(data)
        emitted += len(enc.update(data))
    return enc.params(), k * MiB


def bench_cipher(name: str, cipher, fd: int, size: int, runs: int, at: float, extra=None) -> dict:
    secret = os.urandom(32)
    params, offset = _sealed_params(cipher, fd, size, secret, at)

    def full():
        enc = cipher.resume_file(params, size, secret)
        _pass(enc, fd, 0, size)
        return enc.params()

    def resume(p=params):
        enc, pos = cipher.resume_at(p, size, secret, offset)
        _pass(enc, fd, pos, size)
        return enc.params()

    def check():
        stream = cipher.open_stream(params, size, lambda o, n: os.pread(fd, n, o), secret)
        return hashlib.sha256(stream.read(offset - MiB, MiB)).digest()

    res: dict[str, float] = {}
    t_full, final = _best(full, runs)
    t_res, got = _best(resume, runs)
    if got != final:
        raise AssertionError(f"{name}: resume_at's final params differ from the full pass's")
    t_check, _ = _best(check, runs)
    res["full"] = t_full
    res["resume_at"] = t_res
    res["check"] = t_check
    if extra is not None:
        p2 = extra(params)
        t_a, got = _best(lambda: resume(p2), runs)
        if got != final:
            raise AssertionError(f"{name}: the fallback's final params differ from the full pass's")
        res["fallback (a)"] = t_a
    mb = size / 1e6
    print(f"\n[{name}] resume at stream offset {offset} ({offset / cipher.stream_size(size):.1%}) of {size} bytes")
    print(f"  {'full re-encryption (anchor)':34s} {t_full * 1e3:9.1f} ms {mb / t_full:8.1f} MB/s   ratio 1.000")
    print(f"  {'resume_at':34s} {t_res * 1e3:9.1f} ms {'':13s}   ratio {t_res / t_full:.3f}")
    print(f"  {'resume_at + last-leaf check':34s} {(t_res + t_check) * 1e3:9.1f} ms {'':13s}   "
          f"ratio {(t_res + t_check) / t_full:.3f}")
    if "fallback (a)" in res:
        t_a = res["fallback (a)"]
        print(f"  {'(a) re-hash prefix, no encryption':34s} {t_a * 1e3:9.1f} ms {'':13s}   ratio {t_a / t_full:.3f}")
    res["ratio"] = t_res / t_full
    return res


def _openpgp_cipher(home: str):
    from packerfs.crypt.openpgp import OpenPGPCipher

    def gpg(*args):
        return subprocess.run(
            ["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
            capture_output=True, check=True, timeout=_TIMEOUT,
        )

    gpg("--quick-gen-key", "packerfs bench <bench@packerfs.invalid>", "ed25519", "sign", "never")
    listing = gpg("--with-colons", "--list-keys").stdout.decode()
    fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
    gpg("--quick-add-key", fpr, "cv25519", "encr", "never")
    return OpenPGPCipher.from_keyring([fpr], home)


def _strip_state(cipher):
    from packerfs.crypt.openpgp import _Params

    def strip(params: bytes) -> bytes:
        p = _Params.decode(params, cipher._wrapped_len)
        p.midstate = None
        return p.encode()

    return strip


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py resume", description="resume cost vs full re-encryption")
    ap.add_argument("--size", type=parse_size, default=256 * MiB, help="test file size (default 256MiB)")
    ap.add_argument("--at", type=float, default=0.9, help="resume point, fraction of the stream (default 0.9)")
    ap.add_argument("--dir", default=None, help="where to put the test file (default /dev/shm if roomy)")
    ap.add_argument("--runs", type=int, default=3, help="best of N runs (default 3)")
    args = ap.parse_args(argv)
    if not 0 < args.at < 1 or args.size < 4 * MiB:
        ap.error("--at must be in (0, 1) and --size at least 4MiB")
    from packerfs.crypt import sha1state

    base = args.dir or pick_dir(args.size)
    print(f"resume benchmark: {args.size} bytes in {base}, resume at {args.at:.0%}, best of {args.runs}; "
          f"SHA-1 state export (libcrypto): {'yes' if sha1state.available() else 'NO, fallback (a)'}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="packerfs-bench-", dir=base) as tmp:
        path = Path(tmp) / "plain.bin"
        make_file(path, args.size)
        fd = os.open(path, os.O_RDONLY)
        try:
            results["plain"] = bench_cipher("plain", PlainCipher(), fd, args.size, args.runs, args.at)
            age = AgeCipher([parse_recipient(X25519Identity(os.urandom(32)).recipient)])
            results["age"] = bench_cipher("age X25519", age, fd, args.size, args.runs, args.at)
            if shutil.which("gpg") is None:
                print("\n[openpgp] skipped (gpg is not installed)")
            else:
                home = tempfile.mkdtemp(prefix="packerfs-bench-gpg-")
                try:
                    os.chmod(home, 0o700)
                    pgp = _openpgp_cipher(home)
                    results["openpgp"] = bench_cipher(
                        "openpgp cv25519", pgp, fd, args.size, args.runs, args.at, extra=_strip_state(pgp)
                    )
                finally:
                    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True,
                                   timeout=60)
                    shutil.rmtree(home, ignore_errors=True)
        finally:
            os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
