"""Throughput of the packerfs OpenPGP encryptor against `gpg --encrypt` on the same file.

    python3 tools/bench_openpgp.py [--size 512MiB]     (tools/bench.py crypt runs it too)

bench(path, size) makes a throwaway RSA-2048 key (encryption subkey) in a
temporary gpg homedir, then times, in the same run and on the same file:

  packerfs: OpenPGPCipher.new_file() + update() over 1 MiB reads + finish() + params()
            (output discarded, like gpg's);
  gpg:      gpg --batch --trust-model always -r KEY -z 0 -o /dev/null --encrypt FILE

Both produce the same format (AES-256 CFB with MDC, uncompressed). Also timed:
serving (open_stream().read over the stream in 1 MiB and 128 KiB ranges, the
FUSE/BinReader path), and decrypting our stream with our iter_verified()
against `gpg -d -o /dev/null` (the stream is written next to `path` and
removed afterwards). Each is run `rounds` times after a warm-up read of the
file, and the best time is kept. MB/s are 10**6 bytes of plaintext per second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packerfs.errors import UsageError  # noqa: E402

__all__ = ["bench", "main"]

_READ = 1 << 20
_TIMEOUT = 3600  # seconds for one gpg run (a 10 GiB file at 3 MB/s); nothing waits forever


def _gpg(home: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
        capture_output=True,
        check=True,
        timeout=_TIMEOUT,
    )


def _make_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, _READ)
            f.write(os.urandom(n))
            left -= n


def bench(path: str, size: int, *, rounds: int = 2, quiet: bool = False) -> dict:
    """Time our Encryptor and `gpg --encrypt` over the file at `path` of `size` bytes.

    If `path` does not exist it is created with `size` random bytes; an existing
    file must have exactly `size` bytes. Returns (and, unless quiet, prints) a dict:
    bytes, packerfs_s, packerfs_mb_s, gpg_s, gpg_mb_s, ratio (packerfs MB/s / gpg MB/s).
    """
    from packerfs.crypt.openpgp import OpenPGPCipher
    from packerfs.crypt.openpgp_decrypt import open_openpgp_plaintext

    if not os.path.exists(path):
        _make_file(path, size)
    actual = os.path.getsize(path)
    if actual != size:
        raise UsageError(f"bench: {path} has {actual} bytes, not the {size} asked for")
    home = tempfile.mkdtemp(prefix="packerfs-bench-")
    try:
        os.chmod(home, 0o700)
        _gpg(home, "--quick-gen-key", "packerfs bench <bench@packerfs.invalid>", "rsa2048", "sign", "never")
        listing = _gpg(home, "--with-colons", "--list-keys").stdout.decode()
        fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
        _gpg(home, "--quick-add-key", fpr, "rsa2048", "encr", "never")
        cipher = OpenPGPCipher.from_keyring([fpr], home)
        secret = os.urandom(32)

        with open(path, "rb") as f:  # warm the page cache for both contenders
            while f.read(16 * _READ):
                pass

        def ours() -> float:
            t0 = time.perf_counter()
            enc = cipher.new_file(size, secret)
            with open(path, "rb", buffering=0) as f:
                while True:
                    chunk = f.read(_READ)
                    if not chunk:
                        break
                    enc.update(chunk)
            enc.finish()
            enc.params()
            return time.perf_counter() - t0

        def theirs() -> float:
            t0 = time.perf_counter()
            _gpg(home, "--trust-model", "always", "-r", fpr, "-z", "0", "--yes", "-o", "/dev/null", "--encrypt", path)
            return time.perf_counter() - t0

        runs = max(rounds, 1)
        t_ours = min(ours() for _ in range(runs))
        t_gpg = min(theirs() for _ in range(runs))

        # serving and decrypting need one stream and its params
        stream_path = path + ".packerfs-bench.gpg"
        enc = cipher.new_file(size, secret)
        with open(path, "rb") as f, open(stream_path, "wb") as out:
            while chunk := f.read(_READ):
                out.write(enc.update(chunk))
            out.write(enc.finish())
        params = enc.params()
        src = open(path, "rb")
        stored = open(stream_path, "rb")
        try:
            def read_plain(off: int, n: int) -> bytes:
                return os.pread(src.fileno(), n, off)

            def serve(step: int) -> float:
                t0 = time.perf_counter()
                s = cipher.open_stream(params, size, read_plain, secret)
                for off in range(0, s.size, step):
                    s.read(off, step)
                return time.perf_counter() - t0

            class _File:
                size = os.path.getsize(stream_path)

                @staticmethod
                def read(off: int, n: int) -> bytes:
                    return os.pread(stored.fileno(), n, off)

            def our_decrypt() -> float:
                t0 = time.perf_counter()
                for _ in open_openpgp_plaintext(_File(), home).iter_verified():
                    pass
                return time.perf_counter() - t0

            def gpg_decrypt() -> float:
                t0 = time.perf_counter()
                _gpg(home, "--yes", "-o", "/dev/null", "--decrypt", stream_path)
                return time.perf_counter() - t0

            t_serve = min(serve(_READ) for _ in range(runs))
            t_serve_small = min(serve(128 << 10) for _ in range(runs))
            t_dec = min(our_decrypt() for _ in range(runs))
            t_gpg_dec = min(gpg_decrypt() for _ in range(runs))
        finally:
            src.close()
            stored.close()
            os.unlink(stream_path)
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
    mb = size / 1e6
    res = {
        "bytes": size,
        "packerfs_s": t_ours,
        "packerfs_mb_s": mb / t_ours if t_ours else float("inf"),
        "gpg_s": t_gpg,
        "gpg_mb_s": mb / t_gpg if t_gpg else float("inf"),
    }
    res["ratio"] = res["packerfs_mb_s"] / res["gpg_mb_s"] if res["gpg_mb_s"] else float("inf")
    rate = lambda t: mb / t if t else float("inf")  # noqa: E731
    res["serve_1mib_mb_s"] = rate(t_serve)
    res["serve_128kib_mb_s"] = rate(t_serve_small)
    res["decrypt_mb_s"] = rate(t_dec)
    res["gpg_decrypt_mb_s"] = rate(t_gpg_dec)
    res["decrypt_ratio"] = res["decrypt_mb_s"] / res["gpg_decrypt_mb_s"]
    if not quiet:
        print(
            f"openpgp {size} bytes: encrypt packerfs {res['packerfs_mb_s']:.0f} MB/s vs gpg --encrypt "
            f"{res['gpg_mb_s']:.0f} MB/s (ratio {res['ratio']:.2f}); serve 1 MiB "
            f"{res['serve_1mib_mb_s']:.0f} MB/s, 128 KiB {res['serve_128kib_mb_s']:.0f} MB/s; decrypt "
            f"packerfs {res['decrypt_mb_s']:.0f} MB/s vs gpg -d {res['gpg_decrypt_mb_s']:.0f} MB/s "
            f"(ratio {res['decrypt_ratio']:.2f})"
        )
    return res


def main(argv: list[str]) -> int:
    import argparse

    from bench_crypt import parse_size, pick_dir

    ap = argparse.ArgumentParser(prog="bench_openpgp.py", description="OpenPGP stream throughput vs gpg")
    ap.add_argument("--size", type=parse_size, default=512 << 20, help="test file size (default 512MiB)")
    ap.add_argument("--dir", default=None, help="where to put the test files (default /dev/shm if roomy)")
    ap.add_argument("--runs", type=int, default=2, help="best of N runs (default 2)")
    args = ap.parse_args(argv)
    if shutil.which("gpg") is None:
        print("gpg is not installed; it is the anchor of this benchmark", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="packerfs-bench-", dir=args.dir or pick_dir(args.size)) as tmp:
        bench(os.path.join(tmp, "plain.bin"), args.size, rounds=args.runs)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
