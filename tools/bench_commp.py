"""commP throughput against bulk hashlib.sha256 over the same bytes, in the same run.

    python3 tools/bench.py commp [--size 1GiB] [--impl auto|shani|portable] [--threads N]

The payload is streamed in 16 MiB writes from one reused random buffer, so memory
never holds the payload. Each size runs in a fresh subprocess so its peak RSS
(ru_maxrss) is its own: two sizes with the same peak show memory is flat in the
payload size. commP does about 4x the SHA-256 compression work of bulk sha256 (two
compressions per 32 padded bytes against one per 64), so 0.25 is par for one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

WRITE = 16 << 20
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if unit not in UNITS or not num:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1GiB, 256MiB, 1000000)")
    return int(float(num) * UNITS[unit])


def _stream(size: int, buf: bytes, sink) -> float:
    view = memoryview(buf)
    start = time.perf_counter()
    left = size
    while left:
        n = min(left, len(buf))
        sink(view[:n])
        left -= n
    return time.perf_counter() - start


def run_one(size: int, impl: str, threads: int) -> dict:
    """Measure one payload size in this process."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from packerfs.piece import CommP, _commp

    _commp.set_impl(impl)
    if threads:
        _commp.set_threads(threads)
    buf = os.urandom(min(WRITE, size))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    sha = hashlib.sha256()
    t_sha = _stream(size, buf, sha.update)

    h = CommP()
    t_commp = _stream(size, buf, h.write)
    start = time.perf_counter()
    info = h.finish()
    t_commp += time.perf_counter() - start
    return {
        "size": size,
        "impl": _commp.impl(),
        "threads": _commp.threads(),
        "sha256_mbs": size / t_sha / 1e6,
        "commp_mbs": size / t_commp / 1e6,
        "ratio": t_sha / t_commp,
        "rss_before_kib": rss_before,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "piece_cid": info.piece_cid,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py commp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="payload size (default 1GiB)")
    ap.add_argument("--small", type=parse_size, default=None, help="second, smaller size for the RSS check (default size/4)")
    ap.add_argument("--impl", default="auto", choices=["auto", "shani", "portable"])
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: one per CPU)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_one(args.size, args.impl, args.threads)))
        return 0

    sizes = [args.small if args.small is not None else max(args.size // 4, 1 << 20), args.size]
    results = []
    for size in sizes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(size),
               "--impl", args.impl, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout))

    print(f"commP benchmark ({results[0]['impl']} kernel, {results[0]['threads']} threads, "
          f"{WRITE >> 20} MiB writes from a reused buffer)")
    print(f"{'payload':>10} {'sha256 MB/s':>12} {'commP MB/s':>11} {'ratio':>6} {'peak RSS':>10}")
    for r in results:
        print(f"{r['size'] / (1 << 20):>6.0f} MiB {r['sha256_mbs']:>12.0f} {r['commp_mbs']:>11.0f} "
              f"{r['ratio']:>6.3f} {r['peak_rss_kib'] / 1024:>6.1f} MiB")
    grow = (results[1]["peak_rss_kib"] - results[0]["peak_rss_kib"]) / 1024
    print(f"ratio ours/sha256 at {results[1]['size'] >> 20} MiB: {results[1]['ratio']:.3f} (target >= 0.25); "
          f"peak RSS grew {grow:+.1f} MiB for {(results[1]['size'] - results[0]['size']) >> 20} MiB more payload")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
