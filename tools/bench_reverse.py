"""The reverse view (`packerfs mount --reverse`): sequential read throughput against `age -d` of the
same stream, in the same run, and mount time of a CAR set of 10 GiB+.

    python tools/bench.py reverse [--file-size 1088MiB] [--set-size 10GiB] [--bin-size 1GiB]
                                  [--runs 3] [--keep DIR]

The source is ceil(--set-size / --file-size) sparse files of --file-size (zeros:
the CARs still hold a full age stream each, so every block is distinct), packed
by `packerfs pack` with age (X25519) into bins of --bin-size, so the first file
is split over two CARs. Then:

- mount time: `packerfs mount --reverse` wall time until it returns (mounted,
  keys checked), with a new state directory and the CARs' pages dropped from the
  page cache (cold), with a new state directory (warm), and again with the state
  the previous mount left (a remount: the LMDB index is reused, no CAR is read);
- throughput: `dd bs=1M` of the first file through the mount (its pages dropped
  before each run, the CARs warm in the page cache), against `age -d` of the same
  age stream (FileReader.stream: the parts from the CARs, end to end, written to
  a file once and kept warm), two `dd` of two files at once (two readers, total
  MB/s), and FileReader.read in this process (no FUSE) to show where the time
  goes. Runs are interleaved and the best of --runs counts;
  CPU seconds per GiB of the mount daemon and of its worker processes are reported.
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

from bench_mount import drop_cache, load_note, mounted, parse_size, timed_dd

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
PACKERFS = [sys.executable, "-m", "packerfs.cli"]

TARGET_RATIO = 0.4
TARGET_MBPS = 250.0


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("cwd", ROOT)
    kwargs.setdefault("capture_output", True)
    result = subprocess.run([str(a) for a in argv], **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, argv[:4]))} … failed: {result.stderr.decode().strip()}")
    return result


def make_sources(src: Path, count: int, size: int) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = src / f"f{i:02d}.bin"
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.truncate(size)  # sparse: costs no disk and no time to read
            os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + i))


def warm(paths) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass


def mount(cars: Path, mnt: Path, state: Path, key: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    run([*PACKERFS, "mount", "--reverse", cars, mnt, "-i", key, "-t", state])
    seconds = time.perf_counter() - start
    return seconds, json.loads((mnt / ".packerfs-status").read_text())


def umount(mnt: Path) -> None:
    if mounted(mnt):
        subprocess.run([*PACKERFS, "umount", mnt], cwd=ROOT, capture_output=True, timeout=120)
    if mounted(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, timeout=60)


def timed(argv) -> float:
    start = time.perf_counter()
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def in_process(reader, path: bytes, size: int) -> float:
    """MB/s of FileReader.read over the whole file in 1 MiB requests, in this process (no FUSE)."""
    start = time.perf_counter()
    offset = 0
    while offset < size:
        offset += len(reader.read(path, offset, MiB))
    return size / (time.perf_counter() - start) / 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py reverse")
    parser.add_argument("--file-size", default="1088MiB", help="size of each source file (default 1088MiB)")
    parser.add_argument("--set-size", default="10GiB", help="at least this much source data (default 10GiB)")
    parser.add_argument("--bin-size", default="1GiB", help="bin size of the pack (default 1GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (reuses its source, CARs and stream)")
    args = parser.parse_args(argv)
    for tool in ("age", "fusermount3", "dd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (./run setup installs it)")
    sys.path.insert(0, str(ROOT))
    from packerfs.crypt import KeyRing
    from packerfs.unpack import CarSet, FileReader

    file_size, set_size, bin_size = parse_size(args.file_size), parse_size(args.set_size), parse_size(args.bin_size)
    count = -(-set_size // file_size)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="packerfs-bench-reverse-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src, cars, mnt, key = work / "src", work / "cars", work / "mnt", work / "key.txt"
    mnt.mkdir(exist_ok=True)
    try:
        make_sources(src, count, file_size)
        if not key.exists():
            run([*PACKERFS, "keygen", "-o", key])
        recipient = next(line.split(":", 1)[1].strip() for line in key.read_text().splitlines() if "public key" in line)
        pack_seconds = None
        if not (cars / "manifest.csv").exists():
            print(f"packing {count} files of {file_size / GiB:.2f} GiB with age into bins of {bin_size / GiB:.2f} GiB …",
                  file=sys.stderr)
            start = time.perf_counter()
            run([*PACKERFS, "pack", src, cars, "-t", work / "pack-state", "--bin-size", bin_size, "-r", recipient])
            pack_seconds = time.perf_counter() - start
        car_files = sorted(cars.glob("*.car"))
        car_bytes = sum(p.stat().st_size for p in car_files)

        # ---- mount times
        mounts = {}
        state = work / "reverse-state"
        for name, fresh, cold in (("first mount, cold cache", True, True), ("first mount, warm cache", True, False),
                                  ("remount (index reused)", False, False)):
            if fresh:
                shutil.rmtree(state, ignore_errors=True)
            if cold:
                for car in car_files:
                    drop_cache(car)
            else:
                warm(car_files)
            seconds, status = mount(cars, mnt, state, key)
            umount(mnt)
            mounts[name] = (seconds, status["index"])
            print(f"{name}: {seconds:.2f} s ({status['index']})", file=sys.stderr)

        # ---- throughput
        target = b"f00.bin"
        with CarSet.open(str(cars)) as carset:
            reader = FileReader(carset, KeyRing([str(key)]))
            fv = reader.version(target)
            stream_file = work / "f00.bin.age"
            if not stream_file.exists() or stream_file.stat().st_size != fv.stream:
                stream = reader.stream(target)
                with open(stream_file, "wb") as out:
                    for offset in range(0, fv.stream, 8 * MiB):
                        out.write(stream.read(offset, min(8 * MiB, fv.stream - offset)))
            bins = sorted({r.bin for r in fv.ordered()})
            holding = [carset.by_bin[b].path for b in bins]
            warm(holding + [stream_file])
            plain = [in_process(reader, target, fv.size) for _ in range(args.runs)]
        seconds, status = mount(cars, mnt, state, key)
        pid = status["pid"]
        on_mount = mnt / os.fsdecode(target)
        second = mnt / "f01.bin"  # read beside the first: two readers of two files (other bins)
        results = {"reverse mount, dd bs=1M": [], "age -d": [], "two readers": []}
        try:
            for i in range(args.runs):
                warm(holding + [stream_file])
                results["reverse mount, dd bs=1M"].append(timed_dd([(on_mount, 0, 0)], pid))
                took = timed(["age", "-d", "-i", key, "-o", "/dev/null", stream_file])
                results["age -d"].append((fv.size / took / 1e6, took, (0.0, 0.0)))
                if second.exists():
                    warm(holding + [stream_file] + [c for c in car_files if c not in holding][:2])
                    results["two readers"].append(timed_dd([(on_mount, 0, 0), (second, 0, 0)], pid))
                print(f"run {i + 1}: mount {results['reverse mount, dd bs=1M'][-1][0]:.0f} MB/s, "
                      f"age -d {results['age -d'][-1][0]:.0f} MB/s"
                      + (f", two readers {results['two readers'][-1][0]:.0f} MB/s" if results["two readers"] else ""),
                      file=sys.stderr)
        finally:
            umount(mnt)
        report(results, plain, mounts, count, file_size, car_files, car_bytes, bins, pack_seconds, fv.size)
    finally:
        umount(mnt)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results, plain, mounts, count, file_size, car_files, car_bytes, bins, pack_seconds, size) -> None:
    best = {name: max(r[0] for r in runs) for name, runs in results.items()}
    fastest = max(results["reverse mount, dd bs=1M"], key=lambda r: r[0])
    gib = fastest[0] * 1e6 * fastest[1] / GiB
    print()
    print(f"sequential read of a {size / GiB:.2f} GiB age file in {len(bins)} CARs (bins {bins}), best of "
          f"{len(plain)} runs; {load_note()}")
    print(f"  reverse mount, dd bs=1M     {best['reverse mount, dd bs=1M']:7.0f} MB/s   "
          f"daemon CPU {fastest[2][0] / gib:.2f} s per GiB, its worker processes {fastest[2][1] / gib:.2f}")
    print(f"  age -d of the same stream   {best['age -d']:7.0f} MB/s")
    if results["two readers"]:
        two = max(results["two readers"], key=lambda r: r[0])
        print(f"  two readers (f00 + f01)     {two[0]:7.0f} MB/s   (total; daemon CPU "
              f"{two[2][0] / (two[0] * 1e6 * two[1] / GiB):.2f} s per GiB, workers "
              f"{two[2][1] / (two[0] * 1e6 * two[1] / GiB):.2f})")
    print(f"  FileReader.read, no FUSE    {max(plain):7.0f} MB/s   (this process, 1 MiB requests)")
    ratio = best["reverse mount, dd bs=1M"] / best["age -d"]
    print(f"  mount / age -d: {ratio:.2f}x (target >= {TARGET_RATIO})  {'ok' if ratio >= TARGET_RATIO else 'MISSED'}")
    mbps = best["reverse mount, dd bs=1M"]
    print(f"  mount: {mbps:.0f} MB/s (target >= {TARGET_MBPS:.0f})  {'ok' if mbps >= TARGET_MBPS else 'MISSED'}")
    print()
    print(f"mount time of {len(car_files)} CARs, {car_bytes / GiB:.2f} GiB ({count} files of {file_size / GiB:.2f} GiB):")
    for name, (seconds, index) in mounts.items():
        print(f"  {name:26} {seconds:6.2f} s   (indexing {index['seconds']:.3f} s: {index['cars_scanned']} CARs "
              f"scanned, {index['cars_reused']} from the index, {index['blocks']} blocks)")
    if pack_seconds is not None:
        print(f"(pack of the set: {pack_seconds:.0f} s)")
