#!/usr/bin/env python3
"""Per-file cost of `packerfs pack` on many small files, against `ipfs-car pack`, in the same run.

    python tools/bench_smallfiles.py [--files 100000] [--max-size 8192] [--dirs 100]
                                     [--work DIR] [--rounds 1] [--skip-ipfs-car] [--workers 1,2]

Builds (or reuses, when its parameters match) a tree of N files of uniform 0..max-size
bytes of deterministic pseudo-random content, spread over ~100 directories, then times,
each as a subprocess from a fresh OUT and STATE:

  packerfs pack SRC OUT -t STATE --bin-size 64MiB -r age1… --workers W     (age, the default cipher)
  packerfs pack SRC OUT -t STATE --bin-size 64MiB --no-encryption --workers W
  ipfs-car pack SRC --output X.car                              (the anchor)

and prints files/s for each, the ratio of each packerfs run's throughput to ipfs-car's
(absolute times on shared machines are noisy; the ratio is what to compare), and the index
size per file (bytes of the state's LMDB files / N). With --rounds > 1 the tools alternate
and each keeps its best run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ".bench-params.json"


def make_tree(source: Path, files: int, max_size: int, dirs: int, seed: int) -> int:
    """Deterministic tree; returns its total bytes. Content comes from a SHA-256 counter stream."""
    params = {"files": files, "max_size": max_size, "dirs": dirs, "seed": seed, "layout": 1}
    stamp = source.parent / PARAMS_FILE  # beside the tree, not in it (it would be packed)
    if stamp.exists():
        try:
            stored = json.loads(stamp.read_text())
        except ValueError:
            stored = None
        if stored and stored.get("params") == params:
            return stored["bytes"]
    shutil.rmtree(source, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    source.mkdir(parents=True)
    # A 16 MiB pool of pseudo-random bytes; each file is a slice at a pseudo-random offset.
    pool = bytearray()
    block = hashlib.sha256(b"bench-smallfiles %d" % seed).digest()
    counter = 0
    while len(pool) < (16 << 20) + max_size:
        pool += hashlib.sha256(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    pool = bytes(pool)
    total = 0
    state = int.from_bytes(hashlib.sha256(b"sizes %d" % seed).digest()[:8], "big")
    per_dir = -(-files // dirs)
    for i in range(files):
        # xorshift64*: deterministic, fast, independent of Python's random module
        state ^= (state >> 12) & 0xFFFFFFFFFFFFFFFF
        state ^= (state << 25) & 0xFFFFFFFFFFFFFFFF
        state ^= (state >> 27) & 0xFFFFFFFFFFFFFFFF
        value = (state * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF
        size = value % (max_size + 1)
        start = (value >> 20) % (len(pool) - max_size)
        directory = source / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            directory.mkdir()
        with open(directory / f"f{i:06d}.bin", "wb") as out:
            out.write(pool[start : start + size])
        total += size
    stamp.write_text(json.dumps({"params": params, "bytes": total}))
    return total


def timed(argv: list[str], **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of all its threads) of a child process.

    Dirty pages of the previous run are flushed first. CPU time is the steadier measure on a
    shared machine (it does not count waiting for a core), wall time is what the user sees."""
    os.sync()
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{argv[0]} {argv[1]} failed ({process.returncode}): {stderr.decode().strip()[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime


def lmdb_bytes(state: Path) -> int:
    """Bytes the index's files take on disk (du), as the state holds them after the pack."""
    total = 0
    for path in state.rglob("*"):
        if path.is_file() and path.parent.name == "index.lmdb":
            total += path.stat().st_blocks * 512
    return total


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_smallfiles.py", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--max-size", type=int, default=8192, help="sizes are uniform in 0..this (bytes)")
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bin-size", default="64MiB", help="bin size (default 64MiB: about 7 bins, so workers share them)")
    parser.add_argument("--work", help="keep the tree here (default: $TMPDIR or /var/tmp/packerfs-bench-smallfiles)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tool, alternating; the best counts")
    parser.add_argument("--skip-ipfs-car", action="store_true")
    parser.add_argument("--workers", default="1,2", help="packerfs --workers counts to run, comma-separated (default 1,2)")
    parser.add_argument("--only", choices=["age", "plain"], help="run only this packerfs variant")
    parser.add_argument("--root", help="run the packerfs package found in this directory (python -m packerfs.cli "
                        "from there; default: this checkout), e.g. a frozen copy to compare against")
    args = parser.parse_args(argv)

    work = Path(args.work or os.path.join(os.environ.get("TMPDIR", "/var/tmp"), "packerfs-bench-smallfiles"))
    work.mkdir(parents=True, exist_ok=True)
    tree = work / f"src-{args.files}-{args.max_size}-{args.dirs}-{args.seed}"
    start = time.perf_counter()
    total = make_tree(tree / "src", args.files, args.max_size, args.dirs, args.seed)
    source = tree / "src"
    print(f"tree: {args.files} files, {total / (1 << 20):.1f} MiB, {args.dirs} directories in {source} "
          f"({time.perf_counter() - start:.1f} s to build or check)")

    code_root = Path(args.root).resolve() if args.root else ROOT
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    packerfs = [python, "-m", "packerfs.cli"]  # run from code_root: its packerfs comes first on sys.path
    ipfs_car = ROOT / "node_modules" / ".bin" / "ipfs-car"
    key = work / "key.txt"
    if not key.exists():
        subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = [line.split(": ")[1] for line in key.read_text().splitlines() if "public key" in line][0]

    runs = tempfile.mkdtemp(prefix="runs-", dir=work)
    index_sizes: dict[str, int] = {}

    def run_packerfs(name: str, cipher: list[str]) -> tuple[float, float]:
        out, state = Path(runs) / f"out-{name}", Path(runs) / f"state-{name}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        seconds = timed(packerfs + ["pack", str(source), str(out), "-t", str(state), "--bin-size", args.bin_size] + cipher,
                        cwd=code_root)
        index_sizes[name] = lmdb_bytes(state)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        return seconds

    def run_ipfs_car() -> tuple[float, float]:
        out = Path(runs) / "ipfs-car.car"
        seconds = timed([str(ipfs_car), "pack", str(source), "--output", str(out)])
        out.unlink()
        return seconds

    counts = [int(c) for c in args.workers.split(",")]
    variants = {}
    for count in counts:
        variants[f"age-w{count}"] = ["-r", recipient, "--workers", str(count)]
        variants[f"plain-w{count}"] = ["--no-encryption", "--workers", str(count)]
    if args.only:
        variants = {name: cipher for name, cipher in variants.items() if name.startswith(args.only + "-")}
    best: dict[str, tuple[float, float]] = {}  # the best wall time, and the least CPU time, of each
    try:
        for _ in range(args.rounds):
            if not args.skip_ipfs_car and ipfs_car.exists():
                runs_of = {"ipfs-car": run_ipfs_car}
            else:
                runs_of = {}
            for name, cipher in variants.items():
                runs_of[name] = lambda cipher=cipher, name=name: run_packerfs(name, cipher)
            for name, run in runs_of.items():
                wall, cpu = run()
                old = best.get(name, (wall, cpu))
                best[name] = (min(old[0], wall), min(old[1], cpu))
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    n = args.files
    anchor = best.get("ipfs-car")
    load = os.getloadavg()[0]
    print(f"(load average {load:.1f} on {os.cpu_count()} CPUs: above the CPU count, wall times are inflated)")
    if anchor:
        print(f"{'ipfs-car pack:':37s} {n / anchor[0]:8.0f} files/s  {anchor[0]:7.2f} s wall  "
              f"{anchor[1]:7.2f} s CPU  (anchor)")
    for name in variants:
        wall, cpu = best[name]
        kind, workers = name.split("-w")
        label = f"packerfs pack ({'age' if kind == 'age' else '--no-enc'}, workers {workers}):"
        line = f"{label:37s} {n / wall:8.0f} files/s  {wall:7.2f} s wall  {cpu:7.2f} s CPU"
        if anchor:
            line += f"  ratio vs ipfs-car {anchor[0] / wall:5.2f} wall, {anchor[1] / cpu:5.2f} CPU  (target >= 3)"
        line += f"  index {index_sizes[name] / n:4.0f} bytes/file"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
