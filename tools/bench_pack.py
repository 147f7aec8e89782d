"""Pack throughput against `ipfs-car pack` over the same tree, in the same run.

    python tools/bench.py pack [--size 2GiB] [--bin-size 32GiB] [--keep DIR]
    python tools/bench.py pack --files 100000      # many small files: RSS and per-file cost

Both tools read the tree from the page cache (it was just written), write
their CARs to the same disk, and are timed end to end as subprocesses; peak
RSS comes from wait4(). ipfs-car computes no commP and does not encrypt;
packerfs does both (age, X25519) in its single pass.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def parse_size(text: str) -> int:
    sys.path.insert(0, str(ROOT))
    from packerfs.plan.sizes import parse_size as parse

    return parse(text)


def make_tree(root: Path, total: int, files: int | None, seed: int = 1) -> tuple[int, int]:
    """A mixed tree: most bytes in large files, many small ones. Returns (bytes, files)."""
    rng = random.Random(seed)
    pool = os.urandom(64 * MiB)
    written = count = 0

    def write(path: Path, size: int) -> None:
        nonlocal written, count
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            left = size
            while left:
                start = rng.randrange(0, len(pool) - MiB)
                n = min(left, MiB, len(pool) - start)
                out.write(pool[start : start + n])
                left -= n
        written += size
        count += 1

    if files:
        for i in range(files):
            write(root / f"d{i // 1000:03d}" / f"f{i:06d}", rng.randrange(0, 8192))
        return written, count
    budgets = [("large", 0.6, 64 * MiB, 400 * MiB), ("medium", 0.3, MiB, 20 * MiB), ("small", 0.1, 1024, 500_000)]
    for name, share, low, high in budgets:
        budget = int(total * share)
        i = 0
        while budget > low:
            size = min(budget, rng.randrange(low, high))
            write(root / name / f"g{i % 17:02d}" / f"{name}-{i:05d}.bin", size)
            budget -= size
            i += 1
    return written, count


def timed(argv: list[str], **kwargs) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a child process.

    Dirty pages left by the previous run are flushed first, so neither tool
    pays for the other's writes.
    """
    os.sync()
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode()
    process.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv[0]} failed ({code}): {stderr.strip()}")
    return elapsed, usage.ru_maxrss


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py pack")
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--files", type=int, help="instead: this many small files (RSS and per-file cost)")
    parser.add_argument("--bin-size", default="32GiB")
    parser.add_argument("--keep", help="work in this directory and keep it")
    parser.add_argument("--skip-ipfs-car", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tool, alternating; the best counts")
    parser.add_argument(
        "--out-dir",
        help="where both tools write their CARs (default: beside the tree); /dev/shm takes the disk out of the measure",
    )
    args = parser.parse_args(argv)

    ipfs_car = ROOT / "node_modules" / ".bin" / "ipfs-car"
    packerfs = [sys.executable, "-m", "packerfs.cli"]
    work = Path(args.keep or tempfile.mkdtemp(prefix="packerfs-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    outputs = Path(args.out_dir or work) / "bench-out"
    try:
        source = work / "src"
        if not source.exists():
            total, count = make_tree(source, parse_size(args.size), args.files)
        else:
            total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
            count = sum(1 for p in source.rglob("*") if p.is_file())
        print(f"tree: {count} files, {total / MiB:.0f} MiB in {source}")
        key = work / "key.txt"
        if not key.exists():
            subprocess.run(packerfs + ["keygen", "-o", str(key)], cwd=ROOT, check=True, capture_output=True)
        recipient = [line.split(": ")[1] for line in key.read_text().splitlines() if "public key" in line][0]

        def run_ipfs_car() -> tuple[float, int]:
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir(parents=True)
            return timed([str(ipfs_car), "pack", str(source), "-o", str(outputs / "all.car")])

        def run_packerfs() -> tuple[float, int]:
            shutil.rmtree(outputs, ignore_errors=True)
            shutil.rmtree(work / "state", ignore_errors=True)
            command = ["pack", str(source), str(outputs), "-r", recipient, "--bin-size", args.bin_size]
            return timed(packerfs + command + ["-t", str(work / "state")], cwd=ROOT)

        # Alternate the two tools and keep each one's best run: the disk is shared and noisy.
        ipfs_runs, our_runs = [], []
        for _ in range(args.rounds):
            if not args.skip_ipfs_car and ipfs_car.exists():
                ipfs_runs.append(run_ipfs_car())
            our_runs.append(run_packerfs())
        ipfs_seconds = None
        if ipfs_runs:
            ipfs_seconds, ipfs_rss = min(ipfs_runs)
            print(f"ipfs-car pack:  {total / MiB / ipfs_seconds:7.1f} MiB/s  {ipfs_seconds:6.1f} s  peak RSS {ipfs_rss / 1024:.0f} MiB")
        ours_seconds, ours_rss = min(our_runs)
        print(f"packerfs pack:  {total / MiB / ours_seconds:7.1f} MiB/s  {ours_seconds:6.1f} s  peak RSS {ours_rss / 1024:.0f} MiB  (age + commP)")
        if ipfs_seconds:
            print(f"ratio packerfs/ipfs-car throughput: {ipfs_seconds / ours_seconds:.2f}  (target >= 1.5)")

        sys.path.insert(0, str(ROOT))
        from packerfs.index import Index

        index = Index(str(work / "state"), readonly=True)
        used = index.disk_usage()
        index.close()
        print(f"index: {used / 1024:.0f} KiB = {used / (total / MiB):.1f} bytes per MiB of data, {used / count:.0f} bytes per file")
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0
