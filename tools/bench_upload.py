"""Packing to S3 (moto, local) against packing to a local directory, in one run.

    python tools/bench_upload.py [--size 512MiB] [--bin-size 64MiB] [--runs 3] [--age]

Starts its own moto server (tests/objstores.py: 127.0.0.1 only, stopped in a finally), with its
spool files and the source in /dev/shm when roomy. Every round times, alternating which goes first:

  local:       `packerfs pack SRC DIR -t STATE` with a fresh STATE and DIR: the scan reads the
               source once and writes each CAR as it lays it out (the anchor);
  upload:      `packerfs pack SRC s3://BUCKET/cars -t STATE` with a fresh STATE and bucket: the
               same scan, each CAR uploaded in 8 MiB parts (two in flight) as it is laid out;
  regenerated: `packerfs pack SRC s3://BUCKET/cars -t SCANNED` to a fresh bucket, SCANNED a state
               scanned beforehand (not timed): nothing to scan, every CAR generated again from the
               index and uploaded (the gs:// path, and that of bins sealed on Dask workers or by an
               earlier run);
  s3fs:        in this process, s3fs `put_file` of the local CARs to a fresh bucket (s3fs's own
               multipart upload of the same bytes, no packing: what moto itself costs).

Each line gives the best and median wall time, MB/s of CAR bytes, and the ratio to the local pack
(best local time / best time: the speed ratio; above 1 is faster). The packs pay the same fixed
costs (interpreter, imports, index). Read the ratios as moto's, not S3's: moto is single-process
Python and keeps every object in memory.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from objstores import moto_server  # noqa: E402

MiB = 1 << 20


def parse_size(text: str) -> int:
    from packerfs.plan.sizes import parse_size as parse

    return parse(text)


def scratch() -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 8 << 30:
        return shm
    return tempfile.gettempdir()


def packerfs(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "packerfs.cli", *args], cwd=ROOT, env=env, capture_output=True, timeout=1800
    )
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"packerfs {' '.join(args)}: exit {done.returncode}: {done.stderr.decode()[-2000:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--bin-size", default="64MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--age", action="store_true", help="encrypt with age (default: --no-encryption)")
    args = parser.parse_args(argv)
    size = parse_size(args.size)

    work = Path(tempfile.mkdtemp(prefix="bench-upload-", dir=scratch()))
    try:
        src = work / "src"
        src.mkdir()
        rng = random.Random(1)
        left, i = size, 0
        while left > 0:
            n = min(left, 96 * MiB + rng.randrange(MiB))
            (src / f"file-{i:03d}.bin").write_bytes(rng.randbytes(n))
            left -= n
            i += 1
        cipher = ["--no-encryption"]
        if args.age:
            from packerfs.crypt import write_age_identity

            cipher = ["-r", write_age_identity(str(work / "key.txt"))]
        options = ["--bin-size", args.bin_size, "--workers", "1", *cipher]
        scanned = work / "scanned"
        fresh = iter(range(10**6))

        def new_state() -> Path:
            return work / f"state-{next(fresh)}"

        with moto_server(work / "moto") as s3:
            env = {**os.environ, **s3.env}
            packerfs(["pack", str(src), str(work / "first"), "-t", str(scanned), *options], env)  # not timed
            cars = sorted((work / "first").glob("bin-*.car"))
            car_bytes = sum(p.stat().st_size for p in cars)
            print(f"{size:,} bytes of source in {len(cars)} CARs of {car_bytes:,} bytes (bins of {args.bin_size}, "
                  f"{'age' if args.age else 'no encryption'}); moto at {s3.url}")

            times: dict[str, list[float]] = {"local": [], "upload": [], "regenerated": [], "s3fs": []}
            fs = s3.fs()

            def local() -> float:
                out, state = work / "local", new_state()
                shutil.rmtree(out, ignore_errors=True)
                try:
                    return packerfs(["pack", str(src), str(out), "-t", str(state), *options], env)
                finally:
                    shutil.rmtree(state, ignore_errors=True)

            def upload() -> float:
                bucket, state = s3.new_bucket("bench"), new_state()
                try:
                    return packerfs(["pack", str(src), f"s3://{bucket}/cars", "-t", str(state), *options], env)
                finally:
                    shutil.rmtree(state, ignore_errors=True)

            def regenerated() -> float:
                bucket = s3.new_bucket("regen")
                return packerfs(["pack", str(src), f"s3://{bucket}/cars", "-t", str(scanned), *options], env)

            def s3fs_put() -> float:
                bucket = s3.new_bucket("anchor")
                start = time.perf_counter()
                for car in cars:
                    fs.put_file(str(car), f"{bucket}/cars/{car.name}")
                return time.perf_counter() - start

            for run in range(args.runs):
                order = [("local", local), ("upload", upload), ("regenerated", regenerated), ("s3fs", s3fs_put)]
                if run % 2:
                    order.reverse()
                for name, fn in order:
                    times[name].append(fn())
                s3.reset()  # drop every bucket: moto holds them in memory

            best_local = min(times["local"])
            for name, label in (("local", "pack to a local directory"), ("upload", "pack to s3:// (moto)"),
                                ("regenerated", "upload after the scan"), ("s3fs", "s3fs put_file of the CARs")):
                best, median = min(times[name]), statistics.median(times[name])
                print(f"{label:28s} best {best:6.2f} s  median {median:6.2f} s  {car_bytes / best / 1e6:7.1f} MB/s  "
                      f"ratio to local {best_local / best:5.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
