#!/usr/bin/env python3
"""What the private-pack options cost: --compress zstd, and hidden names, each against an anchor
measured in the same run (absolute times on a shared machine are noisy; compare the ratios).

    python tools/bench.py private [all|compress|reads|names] [--size 1GiB] [--file-size 256MiB]
                                  [--reads 400] [--files 100000] [--runs N] [--dir /tmp] [--keep]

A quick run: `... private --size 128MiB --file-size 64MiB --reads 100 --files 5000 --runs 1`.
Every pack is encrypted with age to a fresh `packerfs keygen` key and is a subprocess with a
timeout; working files go into a temp dir under --dir (default /tmp), removed unless --keep.

compress  A deterministic text-heavy tree of --size (CSV tables, JSON-lines events, web logs,
          plus small JSON files; zstd -3 takes it to ~0.25). Interleaved over --runs rounds, best
          time of each:
            pack -r R --hide-names                   (uncompressed: the size anchor)
            pack -r R --hide-names --compress zstd
            tar -c -C SRC . | zstd -T0 -3 | age -r R > out.tar.zst.age   (the time anchor)
          Default bin size (one CAR, so no parallel sealing: --workers 1 is passed); every
          output is fsynced inside its timing (pack fsyncs its CARs, the pipeline's output is
          fsynced before the clock stops). The source is written just before and read once
          more before each contestant, so all of them read it from the page cache.
          Prints bytes, source MB/s, CPU seconds (of the subprocesses) and the ratios.

reads     One --file-size CSV file packed twice (with and without --compress), both CAR sets
          reverse-mounted (`mount --reverse CARS MNT -i KEY`), then --reads random 128 KiB preads
          at the same seeded offsets, alternating between the two mounts so that noise hits both
          alike, from a reader subprocess with a timeout; each read is checked against the
          source afterwards. The CARs are warm in the page cache (just written), the mounted
          files' cached pages are dropped before the timed reads; 16 untimed reads at other
          offsets warm each mount first. Prints mean/p50/p95/max ms, compressed ÷ uncompressed,
          and how many reads a model of the mount's own window cache (an LRU of 64 x 1 MiB)
          answers without regenerating anything (with the default 256 MiB file, about a quarter).

names     A tree of --files small files (0..4 KiB of pseudo-random bytes, 1000 directories),
          packed with `-r R` (hidden names, the default) and `-r R --show-names`, --bin-size 1GiB,
          --workers 1; interleaved over --runs rounds, best time of each. Prints wall time, index
          size (allocated bytes of STATE/index.lmdb, and the pages LMDB uses) and CAR bytes,
          hidden ÷ clear.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale_common import call_with_timeout  # noqa: E402  (tools/ is on the path: bench.py and scripts run from it)

MiB = 1 << 20
PACKERFS = [sys.executable, "-m", "packerfs.cli"]
STATUS = ".packerfs-status"
OP_TIMEOUT = 30.0  # any single look at a mount from this process
PACK_TIMEOUT = 3600


# ---------------------------------------------------------------- helpers


def run(argv, timeout: float = PACK_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    argv = [str(a) for a in argv]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed (exit {result.returncode}): "
                         f"{result.stderr.decode(errors='replace')[-2000:]}")
    return result


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv, **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a subprocess: (result, wall seconds, CPU seconds of it and its children)."""
    cpu, started = children_cpu(), time.perf_counter()
    result = run(argv, **kwargs)
    return result, time.perf_counter() - started, children_cpu() - cpu


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def warm(root: Path) -> None:
    """Read every file once, so that every contestant finds the source in the page cache."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while f.read(8 * MiB):
                    pass


def car_bytes(out: Path) -> tuple[int, int]:
    cars = sorted(out.glob("*.car"))
    return sum(c.stat().st_size for c in cars), len(cars)


def keygen(path: Path) -> str:
    run([*PACKERFS, "keygen", "-o", path], timeout=60)
    for line in path.read_text().splitlines():
        if line.startswith("# public key: "):
            return line.split(": ", 1)[1].strip()
    raise SystemExit(f"bench: no '# public key: ' line in {path}")


def fresh(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


# ---------------------------------------------------------------- deterministic text

WORDS = ("alpha beta gamma delta sensor region north south east west ok error warn info debug user order payment "
         "invoice shipped pending cancelled retry timeout connected refund basket checkout login logout session "
         "cache miss hit upstream downstream api v1 v2 items search filter page sort price stock warehouse").split()
BWORDS = [w.encode() for w in WORDS]
CITIES = [c.encode() for c in "Berlin Paris Lisbon Madrid Rome Vienna Prague Warsaw Oslo Dublin Zurich Milan".split()]
STATES = BWORDS[15:22]
CODES = [b"200"] * 40 + [b"201", b"204", b"301", b"304", b"400", b"401", b"403", b"404", b"404", b"500", b"502"]
METHODS = [b"GET"] * 8 + [b"POST", b"POST", b"PUT", b"DELETE"]


class Clock:
    """strftime of a slowly advancing time, formatted once per second."""

    def __init__(self, fmt: str, t: int):
        self.fmt, self.t, self.last, self.text = fmt, t, None, b""

    def advance(self, seconds: int) -> bytes:
        self.t += seconds
        if self.t != self.last:
            self.last, self.text = self.t, time.strftime(self.fmt, time.gmtime(self.t)).encode()
        return self.text


def csv_chunks(rnd: random.Random):
    """An orders table: ~0.32 of its size under zstd -3."""
    rr, ch = rnd.randrange, rnd.choice
    clock = Clock("%Y-%m-%dT%H:%M:%SZ", 1_700_000_000 + rr(10**7))
    oid = rr(10**6)
    yield b"order_id,timestamp,customer,city,product,quantity,unit_price,total,status\n"
    while True:
        lines = []
        for _ in range(2000):
            oid += 1 + rr(3)
            q, p = 1 + rr(9), rr(100, 50000)
            lines.append(b"%d,%s,C%05d,%s,SKU-%04d,%d,%d.%02d,%d.%02d,%s\n" % (
                oid, clock.advance(rr(60)), rr(20000), ch(CITIES), rr(3000), q, p // 100, p % 100,
                q * p // 100, q * p % 100, ch(STATES)))
        yield b"".join(lines)


def json_chunks(rnd: random.Random):
    """Click-stream events as JSON lines: ~0.22 under zstd -3."""
    rr, ch = rnd.randrange, rnd.choice
    t = (1_700_000_000 + rr(10**7)) * 1000
    while True:
        lines = []
        for _ in range(2000):
            t += rr(5000)
            lines.append(b'{"ts":%d,"event":"%s","user":"u%d","session":"%08x","page":"/%s/%s","ms":%d,"ok":%s,'
                         b'"tags":["%s","%s"]}\n' % (
                             t, ch(BWORDS), rr(50000), rnd.getrandbits(32), ch(BWORDS), ch(BWORDS), rr(2000),
                             b"true" if rr(10) else b"false", ch(BWORDS), ch(BWORDS)))
        yield b"".join(lines)


def log_chunks(rnd: random.Random):
    """An nginx-style access log: ~0.18 under zstd -3."""
    rr, ch = rnd.randrange, rnd.choice
    clock = Clock("%d/%b/%Y:%H:%M:%S", 1_700_000_000 + rr(10**7))
    while True:
        lines = []
        for _ in range(2000):
            lines.append(b'10.%d.%d.%d - - [%s +0000] "%s /%s/%s/%d HTTP/1.1" %s %d "-" '
                         b'"Mozilla/5.0 (X11; Linux x86_64)" %dms\n' % (
                             rr(4), rr(256), rr(256), clock.advance(rr(2)), ch(METHODS), ch(BWORDS), ch(BWORDS),
                             rr(100000), ch(CODES), rr(200, 60000), rr(900)))
        yield b"".join(lines)


KINDS = {"csv": csv_chunks, "jsonl": json_chunks, "log": log_chunks}


def write_text(path: Path, size: int, kind: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as f:
        for chunk in KINDS[kind](random.Random(seed)):
            chunk = chunk[: size - written]
            f.write(chunk)
            written += len(chunk)
            if written >= size:
                break


def make_text_tree(root: Path, size: int, seed: int = 14) -> tuple[int, int]:
    """~97% of the bytes in CSV/JSON-lines/log files of 256 KiB..24 MiB, the rest in small JSON files.
    Returns (bytes, files)."""
    rnd = random.Random(seed)
    dirs = {"csv": "tables", "jsonl": "events", "log": "logs"}
    small_budget = max(size // 32, 0)
    total, files, i = 0, 0, 0
    while total < size - small_budget:
        kind = ("csv", "jsonl", "log")[i % 3]
        n = min(rnd.randrange(256 << 10, 24 * MiB), size - small_budget - total)
        name = f"{dirs[kind]}/{2020 + i % 5}/part-{i:05d}.{kind}"
        write_text(root / name, n, kind, seed * 100_003 + i)
        total, files, i = total + n, files + 1, i + 1
    j = 0
    while total < size:  # small JSON documents: configs, metadata
        n = min(rnd.randrange(200, 16 << 10), size - total)
        write_text(root / f"meta/{j % 50:02d}/doc-{j:06d}.jsonl", n, "jsonl", seed * 7 + j)
        total, files, j = total + n, files + 1, j + 1
    return total, files


def make_small_tree(root: Path, files: int, max_size: int = 4096, seed: int = 7) -> int:
    """files small files of 0..max_size pseudo-random bytes (slices of one pool) in 1000 directories."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(16 * MiB + max_size)
    total = 0
    made: set[str] = set()
    for i in range(files):
        d = f"project-{i % 100:03d}/batch-{(i // 100) % 10:02d}"
        if d not in made:
            (root / d).mkdir(parents=True, exist_ok=True)
            made.add(d)
        n = rnd.randrange(max_size + 1)
        start = rnd.randrange(16 * MiB)
        with open(root / d / f"record-{i:07d}.dat", "wb") as f:
            f.write(pool[start : start + n])
        total += n
    return total


# ---------------------------------------------------------------- mounts


def mounted_at(mnt: Path) -> bool:
    target = os.fsencode(str(mnt)).replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ReverseMount:
    """`packerfs mount --reverse CARS MNT -t STATE -i KEY`, stopped for sure (umount, SIGKILL, fusermount3 -uz)."""

    def __init__(self, cars: Path, mnt: Path, state: Path, key: Path):
        self.args = [*PACKERFS, "mount", "--reverse", cars, mnt, "-t", state, "-i", key]
        self.mnt = mnt
        self.pid: int | None = None

    def status(self) -> dict:
        return json.loads(call_with_timeout((self.mnt / STATUS).read_bytes, OP_TIMEOUT))

    def __enter__(self) -> "ReverseMount":
        self.mnt.mkdir(parents=True, exist_ok=True)
        try:
            run(self.args, timeout=600)
            self.pid = self.status()["pid"]
            deadline = time.monotonic() + 600
            while (status := self.status())["state"] != "ready":
                if status["state"] == "failed" or time.monotonic() > deadline:
                    raise SystemExit(f"bench: reverse mount {self.mnt}: {status['state']}: {status.get('errors')}")
                time.sleep(0.1)
            if status.get("errors") or status.get("incomplete_count"):
                print(f"  note: {self.mnt.name}: errors {status.get('errors')}, incomplete "
                      f"{status.get('incomplete_count')}", file=sys.stderr)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if mounted_at(self.mnt):
                subprocess.run([*PACKERFS, "umount", str(self.mnt), "--timeout", "15"], cwd=ROOT,
                               capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            pass
        if self.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if mounted_at(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, timeout=30)
        if mounted_at(self.mnt):
            print(f"bench: {self.mnt} is still mounted", file=sys.stderr)


READER = r"""
import json, os, sys, time, hashlib
job = json.load(sys.stdin)
fds = [os.open(p, os.O_RDONLY) for p in job["paths"]]
for fd in fds:
    for o in job["warmup"]:
        os.pread(fd, job["size"], o)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
lat = [[] for _ in fds]
got = [[] for _ in fds]
for o in job["offsets"]:
    for i, fd in enumerate(fds):
        t = time.perf_counter()
        b = os.pread(fd, job["size"], o)
        lat[i].append(time.perf_counter() - t)
        got[i].append(hashlib.sha256(b).digest())
src = os.open(job["source"], os.O_RDONLY)
bad = [sum(hashlib.sha256(os.pread(src, job["size"], o)).digest() != g for o, g in zip(job["offsets"], gs))
       for gs in got]
json.dump({"latency": lat, "mismatches": bad}, sys.stdout)
"""


# ---------------------------------------------------------------- benchmarks


def bench_compress(base: Path, args, key: Path, recipient: str) -> None:
    from packerfs.plan.sizes import parse_size

    size = parse_size(args.size)
    src = base / "text"
    started = time.perf_counter()
    total, files = make_text_tree(src, size)
    print(f"\n== compress: {files} files, {total / MiB:.0f} MiB of CSV/JSON-lines/log text "
          f"(generated in {time.perf_counter() - started:.0f} s); best of {args.runs} interleaved")
    mb = total / 1e6
    out, state = base / "c-out", base / "c-state"
    pipe_out = base / "out.tar.zst.age"
    bin_opts = ["--bin-size", args.bin_size] if args.bin_size else []
    contestants = {
        "pack": [*PACKERFS, "pack", src, out, "-t", state, "-r", recipient, "--hide-names", *bin_opts,
                 "--workers", "1", "--json"],
        "pack --compress zstd": [*PACKERFS, "pack", src, out, "-t", state, "-r", recipient, "--hide-names",
                                 *bin_opts, "--workers", "1", "--compress", "zstd", "--json"],
        "tar | zstd -T0 -3 | age": ["bash", "-c",
                                    'set -o pipefail; tar -c -C "$1" . | zstd -q -T0 -3 | age -r "$2" > "$3" && '
                                    f'{sys.executable} -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); '
                                    'os.fsync(fd)" "$3"', "bench", src, recipient, pipe_out],
    }
    best: dict[str, tuple[float, float]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for round_ in range(args.runs):
        for name, argv in contestants.items():
            fresh(out, state)
            pipe_out.unlink(missing_ok=True)
            warm(src)
            _, seconds, cpu = timed(argv)
            sizes[name] = car_bytes(out) if name.startswith("pack") else (pipe_out.stat().st_size, 1)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, cpu)
            print(f"  round {round_ + 1} {name:24} {seconds:7.2f} s  {mb / seconds:6.1f} MB/s  "
                  f"{sizes[name][0] / MiB:8.1f} MiB")
    fresh(out, state)
    pipe_out.unlink(missing_ok=True)
    anchor_bytes = sizes["pack"][0]
    anchor_time = best["tar | zstd -T0 -3 | age"][0]
    print(f"{'':26}{'bytes':>14} {'÷ pack':>8} {'÷ source':>9} {'s':>8} {'MB/s':>7} {'CPU s':>7} "
          f"{'time ÷ tar|zstd|age':>20}")
    for name, (seconds, cpu) in best.items():
        nbytes, ncars = sizes[name]
        label = name + (f" ({ncars} CAR)" if name.startswith("pack") else "")
        print(f"{label:26}{nbytes:>14,} {ratio(nbytes, anchor_bytes):>8} {ratio(nbytes, total):>9} {seconds:>8.2f} "
              f"{mb / seconds:>7.1f} {cpu:>7.1f} {ratio(seconds, anchor_time):>20}")
    c = sizes["pack --compress zstd"][0]
    print(f"ratios: CAR(--compress) ÷ CAR(uncompressed) {ratio(c, anchor_bytes)}; "
          f"tar|zstd|age ÷ CAR(uncompressed) {ratio(sizes['tar | zstd -T0 -3 | age'][0], anchor_bytes)}; "
          f"pack --compress time ÷ tar|zstd|age time {ratio(best['pack --compress zstd'][0], anchor_time)}")
    if not args.keep:
        shutil.rmtree(src)


def bench_reads(base: Path, args, key: Path, recipient: str) -> None:
    from packerfs.plan.sizes import parse_size

    size = parse_size(args.file_size)
    piece = 128 << 10
    src = base / "reads-src"
    write_text(src / "orders.csv", size, "csv", 31)
    print(f"\n== random reads: {args.reads} preads of 128 KiB at seeded random offsets of one "
          f"{size / MiB:.0f} MiB CSV, through two reverse mounts, alternating")
    setups = {}
    for name, extra in (("uncompressed", []), ("compressed", ["--compress", "zstd"])):
        out, state = base / f"r-{name}-cars", base / f"r-{name}-state"
        _, seconds, _ = timed([*PACKERFS, "pack", src, out, "-t", state, "-r", recipient, "--workers", "1", *extra])
        nbytes, ncars = car_bytes(out)
        setups[name] = out
        print(f"  packed {name}: {nbytes / MiB:.1f} MiB in {ncars} CAR, {seconds:.1f} s")
    rnd = random.Random(2024)
    offsets = [rnd.randrange(0, size - piece) for _ in range(args.reads)]
    warmup = [rnd.randrange(0, size - piece) for _ in range(16)]
    with ReverseMount(setups["uncompressed"], base / "mnt-u", base / "rs-u", key) as mu, \
            ReverseMount(setups["compressed"], base / "mnt-c", base / "rs-c", key) as mc:
        job = {"paths": [str(mu.mnt / "orders.csv"), str(mc.mnt / "orders.csv")], "source": str(src / "orders.csv"),
               "size": piece, "offsets": offsets, "warmup": warmup}
        result = subprocess.run([sys.executable, "-c", READER], input=json.dumps(job).encode(), capture_output=True,
                                timeout=120 + 2 * args.reads)
        if result.returncode != 0:
            raise SystemExit(f"bench: the reader failed: {result.stderr.decode(errors='replace')[-2000:]}")
        data = json.loads(result.stdout)
    stats = {}
    for name, lat in zip(("uncompressed", "compressed"), data["latency"]):
        ms = sorted(x * 1000 for x in lat)
        stats[name] = {"mean": statistics.fmean(ms), "p50": ms[len(ms) // 2],
                       "p95": ms[min(len(ms) - 1, int(len(ms) * 0.95))], "max": ms[-1]}
    print(f"{'ms per 128 KiB read':22}{'mean':>9}{'p50':>9}{'p95':>9}{'max':>9}{'MB/s':>8}")
    for name, s in stats.items():
        print(f"{name:22}{s['mean']:>9.2f}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['max']:>9.2f}"
              f"{piece / 1e6 / (s['mean'] / 1000):>8.1f}")
    u, c = stats["uncompressed"], stats["compressed"]
    print(f"{'compressed ÷ uncompr.':22}" + "".join(f"{c[k] / u[k]:>9.2f}" for k in ("mean", "p50", "p95", "max")))
    hits = lru_hits(warmup, offsets, piece, size)
    print(f"(the mount keeps an LRU of {MOUNT_CACHE_WINDOWS} windows of {MOUNT_WINDOW >> 20} MiB: a model of it says "
          f"{hits}/{len(offsets)} of these reads find all their bytes there, on both mounts alike)")
    if any(data["mismatches"]):
        print(f"WRONG BYTES: reads that differ from the source: uncompressed {data['mismatches'][0]}, "
              f"compressed {data['mismatches'][1]}")
    else:
        print("all reads match the source")
    if not args.keep:
        for p in (src, *setups.values()):
            shutil.rmtree(p)


# packerfs.fs.reverseview.ReverseView's defaults: window=WINDOW (1 MiB), cache_bytes=64 MiB.
MOUNT_WINDOW = 1 << 20
MOUNT_CACHE_WINDOWS = 64


def lru_hits(warmup: list[int], offsets: list[int], size: int, file_size: int) -> int:
    """How many of `offsets` (after `warmup`) an LRU of the mount's windows would answer without a fetch."""
    import collections

    lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    hits = 0
    for i, o in enumerate([*warmup, *offsets]):
        windows = range(o // MOUNT_WINDOW, (min(o + size, file_size) - 1) // MOUNT_WINDOW + 1)
        if i >= len(warmup) and all(w in lru for w in windows):
            hits += 1
        for w in windows:
            lru[w] = None
            lru.move_to_end(w)
            if len(lru) > MOUNT_CACHE_WINDOWS:
                lru.popitem(last=False)
    return hits


def lmdb_used(path: Path) -> int:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, max_dbs=8)
    try:
        return (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()


def allocated(path: Path) -> int:
    return sum(os.lstat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file())


def bench_names(base: Path, args, key: Path, recipient: str) -> None:
    src = base / "small"
    started = time.perf_counter()
    total = make_small_tree(src, args.files)
    print(f"\n== hidden names: {args.files:,} files of 0..4 KiB, {total / MiB:.0f} MiB in 1000 directories "
          f"(generated in {time.perf_counter() - started:.0f} s); best of {args.runs} interleaved")
    out, state = base / "n-out", base / "n-state"
    contestants = {"hidden (default)": [], "--show-names": ["--show-names"]}
    best: dict[str, float] = {}
    info: dict[str, tuple[int, int, int, int]] = {}
    for round_ in range(args.runs):
        for name, extra in contestants.items():
            fresh(out, state)
            warm(src)
            _, seconds, cpu = timed([*PACKERFS, "pack", src, out, "-t", state, "-r", recipient,
                                     "--bin-size", "1GiB", "--workers", "1", *extra])
            nbytes, ncars = car_bytes(out)
            index = state / "index.lmdb"
            info[name] = (nbytes, ncars, allocated(index), lmdb_used(index))
            best[name] = min(best.get(name, seconds), seconds)
            print(f"  round {round_ + 1} {name:18} {seconds:7.2f} s  {args.files / seconds:7.0f} files/s  "
                  f"CPU {cpu:.1f} s")
    fresh(out, state)
    h, c = "hidden (default)", "--show-names"
    print(f"{'':18}{'wall s':>8}{'files/s':>9}{'index (du)':>14}{'index (LMDB)':>14}{'B/file':>8}{'CAR bytes':>15}")
    for name in (h, c):
        nbytes, ncars, du, used = info[name]
        print(f"{name:18}{best[name]:>8.2f}{args.files / best[name]:>9.0f}{du:>14,}{used:>14,}{used / args.files:>8.0f}"
              f"{nbytes:>15,}")
    print(f"{'hidden ÷ clear':18}{best[h] / best[c]:>8.3f}{best[c] / best[h]:>9.3f}{info[h][2] / info[c][2]:>14.3f}"
          f"{info[h][3] / info[c][3]:>14.3f}{'':>8}{info[h][0] / info[c][0]:>15.4f}")
    if not args.keep:
        shutil.rmtree(src)


BENCHES = {"compress": bench_compress, "reads": bench_reads, "names": bench_names}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py private", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all", choices=["all", *BENCHES])
    parser.add_argument("--size", default="1GiB", help="compress: size of the text tree (default 1GiB)")
    parser.add_argument("--bin-size", default=None,
                        help="compress: pack --bin-size (default: packerfs's, so one CAR)")
    parser.add_argument("--file-size", default="256MiB", help="reads: size of the CSV file (default 256MiB)")
    parser.add_argument("--reads", type=int, default=400, help="reads: random 128 KiB reads (default 400)")
    parser.add_argument("--files", type=int, default=100_000, help="names: number of small files (default 100000)")
    parser.add_argument("--runs", type=int, default=2, help="compress, names: interleaved rounds, best kept (default 2)")
    parser.add_argument("--dir", default="/tmp", help="where the temp dir goes (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (its path is printed)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-private-", dir=args.dir))
    print(f"working in {base}; {os.cpu_count()} cores; "
          + subprocess.run(["zstd", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
          + "; age " + subprocess.run(["age", "--version"], capture_output=True, text=True, timeout=30).stdout.strip())
    try:
        key = base / "key.txt"
        recipient = keygen(key)
        for name, bench in BENCHES.items():
            if args.which in ("all", name):
                bench(base, args, key, recipient)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
