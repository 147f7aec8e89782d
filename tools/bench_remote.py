"""Reading a CAR set where it is: the reverse mount over HTTP against the same mount of local CARs,
and what listing a remote set costs, in one run.

    python tools/bench_remote.py [--size 640MiB] [--bin-size 64MiB] [--runs 3]

The source is one file of --size (random bytes), packed with age into bins of --bin-size (10 CARs
at the defaults). Then, interleaved over --runs rounds, best of each:

  local:   `dd bs=1M` of the file through `packerfs mount --reverse CARS` (the anchor; the CARs
           warm in the page cache, the mount's pages dropped before each read);
  serve:   the same through `mount --reverse http://…` from `packerfs serve` on loopback (each
           piece generated, encrypted and hashed again from the source as it is read);
  nginx:   the same from nginx serving the CAR files under /piece/{cid} (a static gateway).

Each line gives MB/s and the ratio to the local mount (above 1 is faster). Listing: `packerfs ls`
of the nginx set (10 CARs): wall time, and the requests and bytes its stderr line reports, per CAR.
Everything listens on 127.0.0.1; every server and mount is stopped in a finally.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from bench_mount import mounted, timed_dd  # noqa: E402
from nginx import NginxPieces  # noqa: E402

MiB = 1 << 20
PACKERFS = [sys.executable, "-m", "packerfs.cli"]


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, timeout=900, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, argv))} failed: {result.stderr.decode()[-2000:]}")
    return result


class Serve:
    """`packerfs serve` of the pack, on a free loopback port."""

    def __init__(self, src: Path, state: Path, options: list[str], log: Path):
        self.args = [*PACKERFS, "serve", src, "--listen", "127.0.0.1:0", "-t", state, *options]
        self.log = log

    def __enter__(self) -> str:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([str(a) for a in self.args], stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + 60
        line = b""
        os.set_blocking(self.proc.stdout.fileno(), False)
        while b"\n" not in line and time.monotonic() < deadline and self.proc.poll() is None:
            line += self.proc.stdout.read() or b""
            time.sleep(0.05)
        found = re.search(rb"(http://127\.0\.0\.1:\d+)", line)
        if not found:
            self.__exit__()
            raise SystemExit(f"bench: packerfs serve did not start: {self.log.read_text()[-2000:]}")
        return found.group(1).decode()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


class Mount:
    def __init__(self, cars: str, mnt: Path, state: Path, key: Path, *extra):
        self.args = [*PACKERFS, "mount", "--reverse", cars, mnt, "-i", key, "-t", state, *extra]
        self.mnt = mnt

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        run(self.args)
        return self.mnt

    def __exit__(self, *exc) -> None:
        subprocess.run([*PACKERFS, "umount", str(self.mnt)], cwd=ROOT, capture_output=True, timeout=120)
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, timeout=30)


def daemon_pid(mnt: Path) -> int | None:
    import json

    try:
        return json.loads((mnt / ".packerfs-status").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def main(argv: list[str]) -> int:
    from packerfs.plan.sizes import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="640MiB")
    parser.add_argument("--bin-size", default="64MiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix="bench-remote-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        src, cars, state, key = base / "src", base / "cars", base / "state", base / "key.txt"
        src.mkdir()
        with open(src / "data.bin", "wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
            f.write(os.urandom(size % (64 * MiB)))
        recipient = run([*PACKERFS, "keygen", "-o", key]).stdout.decode().split()[-1]
        options = ["-r", recipient, "--bin-size", args.bin_size]
        run([*PACKERFS, "pack", src, cars, "-t", state, *options])
        with open(cars / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        pieces = base / "pieces"
        pieces.mkdir()
        for row in rows:
            os.symlink(cars / row["car_file"], pieces / row["piece_cid"])
        print(f"{size / MiB:.0f} MiB in {len(rows)} CARs of {args.bin_size}, age; best of {args.runs}")

        nginx = NginxPieces(base / "nginx", pieces).start()
        try:
            with Serve(src, state, options, base / "serve.log") as serve_url:
                setups = {
                    "local": (str(cars), ()),
                    "serve": (serve_url, ()),
                    "nginx": (nginx.url, ("--pieces", str(cars / "manifest.csv"))),
                }
                best: dict[str, float] = {}
                for round_ in range(args.runs):
                    for name, (where, extra) in setups.items():
                        with Mount(where, base / f"mnt-{name}", base / f"state-{name}", key, *extra) as mnt:
                            speed, seconds, _ = timed_dd([(mnt / "data.bin", 0, 0)], daemon_pid(mnt))
                        best[name] = max(best.get(name, 0.0), speed)
                        print(f"  round {round_ + 1} {name}: {speed:.0f} MB/s")
                anchor = best["local"]
                for name, speed in best.items():
                    print(f"reverse mount, sequential dd, {name:6}: {speed:7.0f} MB/s  ratio {speed / anchor:.2f}")

            started = time.perf_counter()
            listed = run([*PACKERFS, "ls", nginx.url, "--pieces", cars / "manifest.csv"])
            seconds = time.perf_counter() - started
            line = next((l for l in listed.stderr.decode().splitlines() if l.startswith("fetched")), "")
            numbers = [int(n.replace(",", "")) for n in re.findall(r"[\d,]+", line)[:2]]
            if numbers:
                fetched, requests = numbers
                print(f"ls of {len(rows)} remote CARs (nginx): {seconds:.2f} s, {requests / len(rows):.1f} requests "
                      f"and {fetched / len(rows) / 1024:.0f} KiB per CAR")
        finally:
            nginx.stop()
    finally:
        subprocess.run(["rm", "-rf", str(base)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
