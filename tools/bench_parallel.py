"""Parallel sealing: `pack --workers 2` against `pack --workers 1` on the same tree, in the same run.

    python tools/bench.py parallel [--size 2GiB] [--bin-size 256MiB] [--runs 2]

Three trees of --size each, written once to a temporary directory (page cache warm for both):
- large files (64–256 MiB), age: parts are independent, so bins spread over the workers;
- the same, OpenPGP (a throwaway gpg key): each split file's bins are sealed on one worker in
  order (its CFB chain and MDC run through the file), so only bins of different files overlap
  (with files cut at nearly every bin boundary the whole tree is one chain, sealed here);
- one single file of --size, OpenPGP: the worst case, one chain through every bin (the plan has
  one sealing task, so `--workers 2` seals it in the packerfs process: the ratio shows what
  deciding that costs, about nothing).

Each pack is timed end to end as a subprocess (LocalCluster start-up included) with a fresh
state and OUT; the figure is the time ratio workers-1 ÷ workers-2 (2.0 would be perfect on two
cores). The best and the median of --runs runs are printed, with the CPU time of each pack (its
process tree) and the CPU-bound ceiling: the ratio workers 2 would reach by spending workers 1's
CPU time spread over every core (one process already uses more than one core).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PACKERFS = [str(ROOT / ".venv" / "bin" / "packerfs")]


def parse_size(text: str) -> int:
    sys.path.insert(0, str(ROOT))
    from packerfs.plan.sizes import parse_size as parse

    return parse(text)


def write_file(path: Path, size: int, pool: bytes, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            start = rng.randrange(0, len(pool) - MiB)
            n = min(left, MiB)
            out.write(pool[start : start + n])
            left -= n


def large_files(root: Path, total: int) -> None:
    rng = random.Random(7)
    pool = os.urandom(64 * MiB)
    written = i = 0
    while written < total:
        size = min(total - written, rng.randrange(64 * MiB, 256 * MiB))
        write_file(root / f"f{i:03d}.bin", size, pool, rng)
        written += size
        i += 1


def one_file(root: Path, total: int) -> None:
    write_file(root / "huge.bin", total, os.urandom(64 * MiB), random.Random(8))


def gpg_key(home: Path) -> str:
    home.mkdir(mode=0o700)
    subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--quick-gen-key", "bench@packerfs.test",
         "ed25519", "cert", "never"], check=True, capture_output=True,
    )
    listing = subprocess.run(["gpg", "--homedir", str(home), "--list-keys", "--with-colons"], capture_output=True,
                             text=True, check=True).stdout
    fpr = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")][0]
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--quick-add-key", fpr, "cv25519",
                    "encr", "never"], check=True, capture_output=True)
    return fpr


def age_recipient(work: Path) -> str:
    key = work / "key.txt"
    out = subprocess.run(["age-keygen", "-o", str(key)], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stderr.splitlines() if "Public key" in line][0]


def timed_pack(src: Path, work: Path, workers: int, bin_size: str, cipher: list[str]) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of the pack and every process it started)."""
    out, state = work / "out", work / "state"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [*PACKERFS, "pack", str(src), str(out), "-t", str(state), "--bin-size", bin_size, "--workers", str(workers),
         *cipher], check=True, capture_output=True, env={**os.environ, "PACKERFS_WORKERS": str(workers)},
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py parallel")
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--bin-size", default="256MiB")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary directory")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-parallel-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        recipient = age_recipient(work)
        fpr = gpg_key(work / "gnupg") if not (work / "gnupg").exists() else None
        openpgp = ["--gpg-recipient", fpr, "--gpg-homedir", str(work / "gnupg")] if fpr else []
        cases = [
            ("large files, age", "large", large_files, ["-r", recipient]),
            ("large files, OpenPGP", "large", large_files, openpgp),
            ("one file, OpenPGP", "one", one_file, openpgp),
        ]
        made: set[str] = set()
        cores = os.cpu_count() or 1
        print(f"{args.size} per tree, bins of {args.bin_size}, {os.cpu_count()} cores; ratio = time(workers 1) ÷ "
              f"time(workers 2)")
        for label, tree, make, cipher in cases:
            src = work / tree
            if tree not in made:
                shutil.rmtree(src, ignore_errors=True)
                make(src, size)
                made.add(tree)
            ratios, ceilings = [], []
            for _ in range(args.runs):
                one, one_cpu = timed_pack(src, work, 1, args.bin_size, cipher)
                two, two_cpu = timed_pack(src, work, 2, args.bin_size, cipher)
                ratios.append(one / two)
                # One process already runs on more than one core (the commP kernel's threads, the
                # read-ahead, the kernel's page cache work): if workers 2 spent exactly its CPU time,
                # spread perfectly over the cores, the ratio would be this.
                ceilings.append(one * cores / one_cpu)
                print(f"  {label}: workers 1 {one:.1f} s ({size / one / MiB:.0f} MiB/s, {one_cpu / one:.2f} cores), "
                      f"workers 2 {two:.1f} s ({size / two / MiB:.0f} MiB/s, {two_cpu / two:.2f} cores): "
                      f"{one / two:.2f}; CPU workers 2 ÷ workers 1 {two_cpu / one_cpu:.2f}", flush=True)
            print(f"{label}: best {max(ratios):.2f}, median {statistics.median(ratios):.2f}; "
                  f"CPU-bound ceiling {statistics.median(ceilings):.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0
