"""Crypt benchmark: our age streams against the stock `age` CLI on the same file.

    python3 tools/bench.py crypt [--size 512MiB] [--dir DIR] [--runs 3]

Measured (best of --runs, MB/s = 10^6 bytes/s of plaintext):
  age CLI        `age -r age1… -o /dev/null FILE`                 (the anchor)
  encryptor      our Encryptor, sequential 1 MiB reads             (the `pack` writer path)
  serve 1MiB     open_stream().read() over the file in 1 MiB ranges (the FUSE/BinReader path)
  serve 128KiB   the same with 128 KiB ranges (typical FUSE read size, not chunk-aligned)
  age -d CLI     `age -d -i KEY -o /dev/null` of our stream        (decrypt anchor)
  decrypt        open_age_plaintext(...).iter_verified()           (the `unpack` path)
Ratios are ours / age; the target is >= 0.8. The `openpgp` section (ours vs
`gpg --encrypt` / `gpg -d`) is tools/bench_openpgp.py's bench(path, size) -> dict.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packerfs.crypt import KeyRing, make_cipher  # noqa: E402
from packerfs.crypt.age import open_age_plaintext  # noqa: E402
from packerfs.crypt.keys import write_age_identity  # noqa: E402

MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512MiB, 1GiB, 100MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


class FileRA:
    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, min(size, max(0, self.size - offset)), offset)


def bench_age(path: Path, size: int, workdir: Path, runs: int) -> dict[str, float]:
    ident = workdir / "bench-identity.txt"
    recipient = write_age_identity(ident)
    cipher = make_cipher([recipient])
    secret = os.urandom(32)
    res: dict[str, float] = {}

    res["age CLI encrypt"] = best(
        lambda: subprocess.run(["age", "-r", recipient, "-o", "/dev/null", str(path)], check=True), runs
    )

    fd = os.open(path, os.O_RDONLY)
    try:
        params_box: list[bytes] = []

        def encryptor() -> None:
            enc = cipher.new_file(size, secret)
            buf = bytearray(MiB)
            view = memoryview(buf)
            with open(path, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    enc.update(view[:n])
            enc.finish()
            params_box[:] = [enc.params()]

        res["encryptor (1 MiB updates)"] = best(encryptor, runs)
        params = params_box[0]

        def read_plain(off: int, n: int) -> bytes:
            return os.pread(fd, n, off)

        def serve(step: int) -> None:
            s = cipher.open_stream(params, size, read_plain, secret)
            off, total = 0, s.size
            while off < total:
                off += len(s.read(off, step))

        res["serve open_stream 1 MiB reads"] = best(lambda: serve(MiB), runs)
        res["serve open_stream 128 KiB reads"] = best(lambda: serve(128 * 1024), runs)

        # decrypt: our stream written to the work dir, then age -d vs our iter_verified()
        enc_path = workdir / "bench.age"
        s = cipher.open_stream(params, size, read_plain, secret)
        with open(enc_path, "wb") as out:
            off = 0
            while off < s.size:
                chunk = s.read(off, 16 * MiB)
                out.write(chunk)
                off += len(chunk)
    finally:
        os.close(fd)
    try:
        res["age CLI decrypt"] = best(
            lambda: subprocess.run(["age", "-d", "-i", str(ident), "-o", "/dev/null", str(enc_path)], check=True),
            runs,
        )
        efd = os.open(enc_path, os.O_RDONLY)
        try:
            identities = KeyRing([str(ident)]).age_identities

            def decrypt() -> None:
                for _ in open_age_plaintext(FileRA(efd), identities).iter_verified(MiB):
                    pass

            res["decrypt iter_verified"] = best(decrypt, runs)
        finally:
            os.close(efd)
    finally:
        enc_path.unlink(missing_ok=True)
    return res


def pick_dir(size: int) -> str:
    for cand in ("/dev/shm", tempfile.gettempdir()):
        try:
            if os.path.isdir(cand) and shutil.disk_usage(cand).free > 2.5 * size + 64 * MiB:
                return cand
        except OSError:
            continue
    return tempfile.gettempdir()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py crypt", description="age stream throughput vs the age CLI")
    ap.add_argument("--size", type=parse_size, default=512 * MiB, help="test file size (default 512MiB)")
    ap.add_argument("--dir", default=None, help="where to put the test files (default /dev/shm if roomy, else /tmp)")
    ap.add_argument("--runs", type=int, default=3, help="best of N runs (default 3)")
    args = ap.parse_args(argv)
    if shutil.which("age") is None:
        print("the `age` CLI is not installed; it is the anchor of this benchmark", file=sys.stderr)
        return 1

    base = args.dir or pick_dir(args.size)
    with tempfile.TemporaryDirectory(prefix="packerfs-bench-", dir=base) as tmp:
        work = Path(tmp)
        path = work / "plain.bin"
        make_file(path, args.size)
        mb = args.size / 1e6
        print(f"crypt benchmark: {args.size} bytes ({args.size / MiB:.0f} MiB) in {base}, best of {args.runs}")

        # ---------------------------------------------------------------- age
        res = bench_age(path, args.size, work, args.runs)
        enc_anchor = mb / res["age CLI encrypt"]
        dec_anchor = mb / res["age CLI decrypt"]
        print("\n[age]")
        for name, secs in res.items():
            rate = mb / secs
            anchor = dec_anchor if "decrypt" in name else enc_anchor
            ratio = "" if name.startswith("age CLI") else f"   ours/age = {rate / anchor:.2f}"
            print(f"  {name:34s} {rate:9.1f} MB/s{ratio}")

        # ---------------------------------------------------------------- openpgp
        # The OpenPGP section is tools/bench_openpgp.py (benchmarks stay out of the package).
        bench_fn, why = None, "tools/bench_openpgp.py not available"
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_openpgp import bench as bench_fn  # noqa: E402
        except ImportError as e:  # no OpenPGP support in this build
            why = f"{why}: {e}"
        if shutil.which("gpg") is None:
            bench_fn, why = None, "gpg is not installed"
        if bench_fn is not None:
            print("\n[openpgp]")
            out = bench_fn(str(path), args.size)
            for name, value in (out or {}).items():
                if isinstance(value, float):
                    print(f"  {name:34s} {value:9.2f}")
                else:
                    print(f"  {name:34s} {value}")
        else:
            print(f"\n[openpgp] skipped ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
