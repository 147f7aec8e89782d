"""What snapshots cost: a rescan after one deletion, against the first pack of the same tree.

    python tools/bench.py snapshot [--files 100000] [--keep DIR]

Packs a tree of many small files (no encryption, so the per-file scan cost is
mostly packerfs's own bookkeeping), then times, each as a subprocess with its
peak RSS from wait4():

- the first pack (the anchor: it also seals snapshot 1),
- a rescan with nothing changed (every path is touched with the scan's
  generation; no snapshot),
- a rescan after deleting one file (the walk, the touches, and a new snapshot
  of every path, streamed from the index),

and prints the two rescans as ratios of the first pack, with the snapshot's
size per entry and the index's growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKERFS = [sys.executable, "-m", "packerfs.cli"]


def timed(args: list) -> tuple[float, int, dict]:
    start = time.monotonic()
    proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise SystemExit(f"{' '.join(map(str, args))} failed: {err.decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024, json.loads(out)


def index_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in (state / "index.lmdb").iterdir())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py snapshot")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--keep", help="work in DIR and keep it")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    try:
        src, state, out = work / "src", work / "state", work / "out"
        for i in range(args.files):
            d = src / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                d.mkdir(parents=True, exist_ok=True)
            (d / f"file-{i:07d}").write_bytes(b"x" * (i % 97))
        pack = [*PACKERFS, "pack", src, out, "--no-encryption", "-t", state, "--json"]
        first, first_rss, report = timed(pack)
        index_first = index_bytes(state)
        snap = report["snapshot"]
        unchanged, unchanged_rss, again = timed(pack)
        assert again["snapshot"] is None, "an unchanged rescan seals no snapshot"
        (src / "d000" / "file-0000000").unlink()
        deleted, deleted_rss, after = timed(pack)
        assert after["snapshot"]["files"] == args.files - 1
        snapshot_bin = after["snapshot"]["bins"][-1]
        car = out / f"bin-{snapshot_bin:06d}.car"
        print(f"{args.files} files; first pack {first:.2f} s (anchor), peak RSS {first_rss / 2**20:.0f} MiB")
        print(
            f"rescan, nothing changed: {unchanged:.2f} s = {unchanged / first:.2f}x the first pack, "
            f"peak RSS {unchanged_rss / 2**20:.0f} MiB"
        )
        print(
            f"rescan after one deletion (new snapshot): {deleted:.2f} s = {deleted / first:.2f}x the first pack, "
            f"peak RSS {deleted_rss / 2**20:.0f} MiB"
        )
        print(
            f"snapshot 1: {snap['entries']} entries; the snapshot bin's CAR is {car.stat().st_size:,} bytes "
            f"= {car.stat().st_size / after['snapshot']['entries']:.0f} bytes per entry"
        )
        print(
            f"index: {index_first / args.files:.0f} bytes per file after the first pack, "
            f"{index_bytes(state) / args.files:.0f} after the rescans"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
