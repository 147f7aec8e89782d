"""Packing from an S3 prefix (moto, local) against a plain s3fs fetch of the same objects, in the same run.

    python tools/bench.py source [--size 256MiB] [--objects 4] [--count 3000] [--dirs 3] [--flat 2000]
                                 [--runs 3] [--only large,small,listing] [--set BLOCK=32MiB ...]

Starts its own moto S3 server (tests/objstores.py: 127.0.0.1 only, stopped in a finally) with its
files in /dev/shm when roomy, and measures three things, alternating the anchor and packerfs in
every round (--runs rounds). Each line gives the best and the median wall time, a throughput, and
two throughput RATIOS to the anchor: "best" = best anchor time / best time, "median" = median over
rounds of (that round's anchor time / this time). Ratios above 1 are faster than the anchor.
Every line also gives the CPU seconds of the client (the pack child, or this process for the
in-process s3fs anchors) and of the moto server during it (/proc); child lines add the child's
peak RSS, from /usr/bin/time (wait4's ru_maxrss of a child starts at this big process's RSS).

1. Large objects: --size bytes as --objects objects of random bytes.
   anchor:     s3fs `fs.cat_file(path)` of each object in turn (a fresh default S3FileSystem: s3fs
               itself does a HEAD, then, above its 50 MiB block size, concurrent 50 MiB ranges);
   also:       the same in a python child (interpreter and `import s3fs` included, as in a pack);
               `fs.cat(paths)` (all objects concurrently) and `fs.cat_ranges` over the same
               BLOCK-sized ranges packerfs requests (objects.BLOCK): on moto every ranged GET reads
               the WHOLE object under a per-object lock (moto/s3/models.py `value`), so this line is
               what packerfs's request pattern costs on this server before any packing;
   measured:   `packerfs pack s3://… OUT -t STATE --bin-size 64MiB --json` as a child process, fresh
               OUT and STATE each run, with --no-encryption and with age (-r from `packerfs keygen`);
               bytes_fetched / data size from its JSON (goal <= 1.02); ratio goal >= 0.8;
   reference:  the same packs of a local copy in /dev/shm (packing's own cost, no network), and
               the pack of a one-object prefix (the fixed cost: interpreter, imports, session, state,
               manifest); each pack line is split into fixed cost + the cat_ranges fetch + the rest.
2. Small objects: --count objects of 0-8 KiB (random sizes; every --empty-every-th one empty, as in
   real trees), in --dirs directories, uploaded with a thread pool (moto takes ~3-6 ms per PUT;
   the upload time is printed).
   anchor:     a fresh s3fs: `fs.find(prefix)` then `fs.cat(paths)` (fsspec gathers the requests;
               s3fs's cat_file takes each size from the cached listing: one GET per object);
   also:       the same as a python child (interpreter and `import s3fs` included, like the pack);
   measured:   packerfs pack, --no-encryption and age: objects/s, ratio, bytes_fetched / data size.
   Then the first directory again, through a proxy that holds every request --latency ms (moto on
   loopback has no latency, so it cannot show whether requests overlap): s3fs find + cat against
   the pack, with each one's requests, body bytes and peak requests in flight counted.
3. Listing (in this process): packerfs's walk, `open_source(url)` + `list(src.walk([]))` (delimiter
   listing per directory, a few directories ahead), against `fs.find(prefix)` (fresh s3fs instance,
   no listings cache), over the small-objects tree and over a flat prefix of --flat empty objects.

--set NAME=VALUE (repeatable) overrides a constant of packerfs/source/objects.py in the pack
children only (BLOCK=32MiB, AHEAD_BYTES=128MiB, CONCURRENCY=8, ...): to try a tuning without
editing packerfs; --packerfs-cmd "python launcher.py" times another packerfs command line.
Absolute times on a 2-core shared machine are noisy and moto is slow and single-process; read
the ratios, and read them as moto's, not S3's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

MiB = 1 << 20
KiB = 1 << 10
_TIMEOUT = 1800
_CLK = os.sysconf("SC_CLK_TCK")
WIDTH = 50  # the label column

# Runs `packerfs` with constants of packerfs.source.objects overridden (argv[1] is a JSON object).
_LAUNCH = (
    "import json, sys\n"
    "import packerfs.source.objects as o\n"
    "for k, v in json.loads(sys.argv[1]).items():\n"
    "    assert hasattr(o, k), k\n"
    "    setattr(o, k, v)\n"
    "from packerfs.commands import run\n"
    "sys.exit(run(sys.argv[2:]))\n"
)


def parse_size(text: str) -> int:
    from packerfs.plan.sizes import parse_size as parse

    return parse(text)


def pick_dir(need: int) -> str:
    for cand in ("/dev/shm", tempfile.gettempdir()):
        try:
            if os.path.isdir(cand) and shutil.disk_usage(cand).free > need:
                return cand
        except OSError:
            continue
    return tempfile.gettempdir()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc; 0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Sample:
    wall: float
    cpu: float  # the client's CPU seconds
    server_cpu: float
    rss_kib: int | None = None
    report: dict | None = None


@dataclass
class Series:
    label: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(s.wall for s in self.samples)

    @property
    def median(self) -> float:
        return statistics.median(s.wall for s in self.samples)


class Bench:
    def __init__(self, s3, work: Path, constants: dict, command: list[str] | None = None):
        self.s3 = s3
        self.work = work
        self.constants = constants
        self.env = {**os.environ, **s3.env}
        self.packerfs = command or [sys.executable, "-m", "packerfs.cli"]
        if constants:
            self.packerfs = [sys.executable, "-c", _LAUNCH, json.dumps(constants)]
        self.recipient = self._keygen()
        self._runs = 0

    def _keygen(self) -> str:
        key = self.work / "age-key.txt"
        subprocess.run(self.packerfs + ["keygen", "-o", str(key)], cwd=ROOT, check=True, capture_output=True,
                       timeout=_TIMEOUT)
        return [line.split(": ")[1] for line in key.read_text().splitlines() if "public key" in line][0]

    def server_cpu(self) -> float:
        return proc_cpu(self.s3.proc.pid)

    def inprocess(self, fn) -> tuple[Sample, object]:
        server = self.server_cpu()
        cpu = time.process_time()
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
        return Sample(wall, time.process_time() - cpu, self.server_cpu() - server), result

    def child(self, argv: list[str], what: str, env: dict | None = None) -> tuple[Sample, str]:
        """One child process: wall, CPU (wait4) and peak RSS, and its stdout.

        The RSS comes from /usr/bin/time when it is installed: wait4's ru_maxrss of a child of this
        (large) process starts at this process's RSS, since the child was forked from it."""
        self._runs += 1
        stdout_path, stderr_path = self.work / f"stdout-{self._runs}", self.work / f"stderr-{self._runs}"
        rss_path = self.work / f"rss-{self._runs}"
        timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_path)] if os.access("/usr/bin/time", os.X_OK) else []
        try:
            with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
                server = self.server_cpu()
                start = time.perf_counter()
                process = subprocess.Popen(timer + argv, cwd=ROOT, env=env or self.env, stdout=stdout, stderr=stderr)
                _, status, usage = os.wait4(process.pid, 0)
                wall = time.perf_counter() - start
                server = self.server_cpu() - server
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                tail = stderr_path.read_text(errors="replace").strip()[-2000:]
                raise SystemExit(f"{what} failed ({code}): {tail}")
            rss = int(rss_path.read_text().split()[-1]) if timer else usage.ru_maxrss
            return Sample(wall, usage.ru_utime + usage.ru_stime, server, rss), stdout_path.read_text()
        finally:
            for path in (stdout_path, stderr_path, rss_path):
                path.unlink(missing_ok=True)

    def pack(self, src: str, encrypt: bool, bin_size: str, env: dict | None = None) -> Sample:
        """One `packerfs pack` child, fresh OUT and STATE."""
        run_dir = Path(tempfile.mkdtemp(prefix="pack-", dir=self.work))
        out, state = run_dir / "out", run_dir / "state"
        enc = ["-r", self.recipient] if encrypt else ["--no-encryption"]
        argv = self.packerfs + ["pack", src, str(out), "-t", str(state), *enc, "--bin-size", bin_size, "--json"]
        try:
            sample, stdout = self.child(argv, f"packerfs pack {src}", env)
            sample.report = json.loads(stdout)
            return sample
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def s3fs_child(self, code: str, *arguments) -> tuple[Sample, str]:
        """A fresh interpreter that imports s3fs and runs `code` (fs, args defined): an s3fs script's cost."""
        prelude = ("import json, sys\nimport s3fs\nargs = json.loads(sys.argv[2])\n"
                   "fs = s3fs.S3FileSystem(skip_instance_cache=True, **json.loads(sys.argv[1]))\n")
        argv = [sys.executable, "-c", prelude + code, json.dumps(self.s3.storage_options), json.dumps(arguments)]
        return self.child(argv, "s3fs child")


def print_table(title: str, series: list[Series], anchor: Series, amount: float, unit: str, scale: float,
                notes: dict[str, str] | None = None) -> None:
    """Each series against the anchor: best, median, throughput (amount/best), ratios, CPU, RSS."""
    print(f"\n{title}")
    print(f"  {'':{WIDTH}s} {'best s':>7s} {'median':>7s} {unit:>9s} {'ratio':>6s} {'median':>7s} "
          f"{'CPU s':>6s} {'moto s':>6s} {'RSS MiB':>7s}")
    rounds = len(anchor.samples)
    for s in series:
        ratio_best = anchor.best / s.best
        per_round = [anchor.samples[i].wall / s.samples[i].wall for i in range(min(rounds, len(s.samples)))]
        ratio_median = statistics.median(per_round) if per_round else float("nan")
        cpu = statistics.median(x.cpu for x in s.samples)
        server = statistics.median(x.server_cpu for x in s.samples)
        rss = [x.rss_kib for x in s.samples if x.rss_kib is not None]
        rss_text = f"{max(rss) / 1024:7.0f}" if rss else f"{'':7s}"
        label = s.label + (" (anchor)" if s is anchor else "")
        print(f"  {label:{WIDTH}s} {s.best:7.2f} {s.median:7.2f} {amount / scale / s.best:9.0f} {ratio_best:6.2f} "
              f"{ratio_median:7.2f} {cpu:6.2f} {server:6.2f} {rss_text}")
        if notes and s.label in notes:
            for line in notes[s.label].split("\n"):
                print(f"  {'':{WIDTH}s} {line}")


def fetched_ratio(series: Series, total: int) -> str:
    values = sorted({round(x.report["bytes_fetched"] / total, 4) for x in series.samples})
    read = {x.report["bytes_read"] for x in series.samples}
    ok = "" if read == {total} else f" (bytes_read {sorted(read)} != {total}!)"
    return "bytes_fetched / data size " + ", ".join(f"{v:.4f}" for v in values) + ok


# ------------------------------------------------------------------------------------------ large


def bench_large(bench: Bench, args) -> None:
    import s3fs  # noqa: F401  (imported here, out of the timed runs: AWS_* are in os.environ by now)

    from packerfs.source import objects

    s3 = bench.s3
    bucket, prefix = "bench-large", "data"
    s3.make_bucket(bucket)
    client = s3.client()
    local = bench.work / "local-large"
    local.mkdir()
    sizes = [args.size // args.objects] * args.objects
    sizes[-1] += args.size - sum(sizes)
    start = time.perf_counter()
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        client.put_object(Bucket=bucket, Key=f"{prefix}/obj{i:03d}.bin", Body=data)
        (local / f"obj{i:03d}.bin").write_bytes(data)
        del data
    client.put_object(Bucket=bucket, Key="one/x.bin", Body=b"x")
    upload = time.perf_counter() - start
    total = sum(sizes)
    block = int(bench.constants.get("BLOCK", objects.BLOCK))
    print(f"\n[large objects] {len(sizes)} objects, {total / MiB:.0f} MiB in s3://{bucket}/{prefix} "
          f"(uploaded in {upload:.1f} s, {total / MiB / upload:.0f} MiB/s); pack --bin-size {args.bin_size}; "
          f"{args.runs} rounds; packerfs BLOCK {block / MiB:g} MiB, "
          f"AHEAD_BYTES {int(bench.constants.get('AHEAD_BYTES', objects.AHEAD_BYTES)) / MiB:g} MiB, "
          f"CONCURRENCY {bench.constants.get('CONCURRENCY', objects.CONCURRENCY)}")

    fs0 = s3.fs()
    paths = sorted(fs0.find(f"{bucket}/{prefix}"))
    assert len(paths) == len(sizes), paths
    ranges = [(p, off, min(off + block, size)) for p, size in zip(paths, sizes) for off in range(0, size, block)]

    def seq():
        fs = s3.fs()
        return sum(len(fs.cat_file(p)) for p in paths)

    def conc():
        fs = s3.fs()
        return sum(len(v) for v in fs.cat(paths).values())

    def ranged():
        fs = s3.fs()
        got = fs.cat_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges])
        return sum(len(v) for v in got)

    def seq_child():
        sample, stdout = bench.s3fs_child("print(sum(len(fs.cat_file(p)) for p in args[0]))", paths)
        return sample, int(stdout)

    url = f"s3://{bucket}/{prefix}"
    names = {
        "seq": "s3fs cat_file, one object after another",
        "seq-child": "the same, as a python child (import s3fs incl.)",
        "conc": "s3fs cat(paths), concurrent",
        "ranged": f"s3fs cat_ranges, {block / MiB:g} MiB ranges (packerfs's GETs)",
        "plain": "packerfs pack --no-encryption",
        "age": "packerfs pack, age",
        "local-plain": "ref: pack --no-encryption, local /dev/shm copy",
        "local-age": "ref: pack, age, local /dev/shm copy",
        "fixed": "ref: pack --no-encryption of a 1-byte object",
    }
    series = {key: Series(label) for key, label in names.items()}
    for _ in range(args.runs):
        for key, fn in (("seq", seq), ("plain", None), ("conc", conc), ("age", None), ("ranged", ranged),
                        ("seq-child", seq_child)):
            if fn is None:
                series[key].samples.append(bench.pack(url, key == "age", args.bin_size))
            elif key == "seq-child":
                sample, n = fn()
                assert n == total, (key, n, total)
                series[key].samples.append(sample)
            else:
                sample, n = bench.inprocess(fn)
                assert n == total, (key, n, total)
                series[key].samples.append(sample)
        series["local-plain"].samples.append(bench.pack(str(local), False, args.bin_size))
        series["local-age"].samples.append(bench.pack(str(local), True, args.bin_size))
        series["fixed"].samples.append(bench.pack(f"s3://{bucket}/one", False, args.bin_size))
    notes = {names["plain"]: fetched_ratio(series["plain"], total) + "  (goals: ratio >= 0.8, fetched <= 1.02)",
             names["age"]: fetched_ratio(series["age"], total)}
    for key in ("plain", "age"):
        rest = series[key].best - series["fixed"].best - series["ranged"].best
        print_note = f"= fixed cost {series['fixed'].best:.2f} s + the {block / MiB:g} MiB-range fetch " \
                     f"{series['ranged'].best:.2f} s {'+' if rest >= 0 else '-'} {abs(rest):.2f} s"
        notes[names[key]] += "\n" + print_note + " (best times)"
    order = ["seq", "seq-child", "conc", "ranged", "plain", "age", "local-plain", "local-age", "fixed"]
    print_table(f"  {total / MiB:.0f} MiB, ratio = throughput / s3fs cat_file's", [series[k] for k in order],
                series["seq"], total, "MiB/s", MiB, notes)
    shutil.rmtree(local, ignore_errors=True)


# ------------------------------------------------------------------------------------------ small


def upload_many(s3, bucket: str, items: list[tuple[str, int]], threads: int, seed: int) -> float:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=s3.url, aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"], region_name=s3.env["AWS_DEFAULT_REGION"],
        config=Config(max_pool_connections=threads, retries={"max_attempts": 5, "mode": "standard"}),
    )
    pool = os.urandom(64 * KiB)

    def put(item: tuple[str, int]) -> None:
        key, size = item
        at = random.Random(f"{seed}:{key}").randrange(0, len(pool) - size + 1)
        client.put_object(Bucket=bucket, Key=key, Body=pool[at: at + size])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as executor:
        for _ in executor.map(put, items):
            pass
    return time.perf_counter() - start


def small_tree(count: int, dirs: int, prefix: str, seed: int, empty_every: int) -> list[tuple[str, int]]:
    """Keys and sizes: random 0-8 KiB, and every `empty_every`-th object (from the middle of the first
    run of them) empty, as real trees have (.gitkeep, __init__.py, lock files)."""
    rng = random.Random(seed)
    per_dir = -(-count // dirs)
    items = []
    for i in range(count):
        size = rng.randrange(0, 8 * KiB + 1)
        if empty_every and i % empty_every == empty_every // 2:
            size = 0
        items.append((f"{prefix}/d{i // per_dir:03d}/f{i:06d}", size))
    return items


def classify(exchange) -> str:
    query = exchange.target.partition("?")[2]
    if exchange.method == "HEAD":
        return "HEAD"
    if exchange.method == "GET" and ("list-type" in query or "delimiter" in query or "prefix=" in query
                                     or "versions" in query.split("&")):
        return "list"
    if exchange.method == "GET" and not query:
        return "GET object"
    return "other"


def delaying_proxy(server, delay: float):
    """A FaultProxy (tests/objstores.py) that holds each request `delay` s before forwarding it: a
    stand-in for a real store's first-byte latency, which moto on loopback does not have. It also
    keeps the peak number of requests in flight. (Overrides FaultProxy._forward: no public hook.)"""
    import threading

    from objstores import FaultProxy

    class DelayingProxy(FaultProxy):
        def __init__(self, upstream):
            super().__init__(upstream)
            self.in_flight = self.peak = 0
            self._flight = threading.Lock()

        def _forward(self, *args, **kwargs):
            with self._flight:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
            try:
                if delay:
                    time.sleep(delay)
                return super()._forward(*args, **kwargs)
            finally:
                with self._flight:
                    self.in_flight -= 1

    return DelayingProxy(server)


def census(proxy, count: int, total: int) -> str:
    kinds: dict[str, int] = {}
    for exchange in proxy.history:
        kind = classify(exchange)
        kinds[kind] = kinds.get(kind, 0) + 1
    shown = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return (f"{proxy.requests / count:.2f} requests/object ({shown}); {proxy.bytes_forwarded / max(total, 1):.2f} x "
            f"the data in bodies; at most {proxy.peak} in flight")


def bench_latency(bench: Bench, args, bucket: str, prefix: str, items: list[tuple[str, int]]) -> None:
    """One directory through a proxy adding --latency ms per request: s3fs find + cat against the pack."""
    count, total = len(items), sum(size for _, size in items)
    empty = sum(1 for _, size in items if size == 0)
    proxy = delaying_proxy(bench.s3, args.latency / 1000)
    url = f"s3://{bucket}/{prefix}"
    anchor, ours = Series("s3fs find + cat(paths)"), Series("packerfs pack --no-encryption")
    counted: dict[str, str] = {}
    with proxy.start():
        env = {**bench.env, **proxy.env}

        def fetch():
            fs = proxy.fs()
            return sum(len(v) for v in fs.cat(fs.find(f"{bucket}/{prefix}")).values())

        for _ in range(args.runs):
            proxy.reset_counters()
            proxy.peak = 0
            sample, n = bench.inprocess(fetch)
            assert n == total, (n, total)
            anchor.samples.append(sample)
            counted[anchor.label] = census(proxy, count, total)
            proxy.reset_counters()
            proxy.peak = 0
            sample = bench.pack(url, False, args.bin_size, env=env)
            assert sample.report["files_packed"] == count, sample.report["files_packed"]
            ours.samples.append(sample)
            counted[ours.label] = census(proxy, count, total) + "\n" + fetched_ratio(ours, total)
    print_table(f"[small objects, {args.latency:g} ms added per request] {url}: {count} objects ({empty} empty), "
                f"{total / KiB:.0f} KiB, through a delaying proxy in this process; {args.runs} rounds "
                f"(requests counted in the last)", [anchor, ours], anchor, count, "objects/s", 1, counted)


def bench_small(bench: Bench, args, bucket: str, prefix: str, items: list[tuple[str, int]], upload: float) -> None:
    s3 = bench.s3
    total = sum(size for _, size in items)
    count = len(items)
    empty = sum(1 for _, size in items if size == 0)
    print(f"\n[small objects] {count} objects of 0-8 KiB ({empty} empty; {total / MiB:.1f} MiB) in {args.dirs} "
          f"directories of s3://{bucket}/{prefix} (uploaded in {upload:.1f} s: {count / upload:.0f} PUT/s, "
          f"{args.upload_threads} threads); {args.runs} rounds")

    def fetch():
        fs = s3.fs()  # a fresh instance with s3fs's defaults: the listing is cached, so no HEAD per object
        paths = fs.find(f"{bucket}/{prefix}")
        assert len(paths) == count, (len(paths), count)
        return sum(len(v) for v in fs.cat(paths).values())

    url = f"s3://{bucket}/{prefix}"
    names = {
        "anchor": "s3fs find + cat(paths)",
        "plain": "packerfs pack --no-encryption",
        "child": "s3fs find + cat, as a python child",
        "age": "packerfs pack, age",
    }
    series = {key: Series(label) for key, label in names.items()}
    for _ in range(args.runs):
        for key in ("anchor", "plain", "child", "age"):
            if key in ("plain", "age"):
                sample = bench.pack(url, key == "age", args.bin_size)
                assert sample.report["files_packed"] == count, sample.report["files_packed"]
            elif key == "child":
                sample, stdout = bench.s3fs_child(
                    "print(sum(len(v) for v in fs.cat(fs.find(args[0])).values()))", f"{bucket}/{prefix}")
                assert int(stdout) == total, (stdout, total)
            else:
                sample, n = bench.inprocess(fetch)
                assert n == total, (n, total)
            series[key].samples.append(sample)
    notes = {names["plain"]: fetched_ratio(series["plain"], total) + "  (goal: ratio >= 0.8)",
             names["age"]: fetched_ratio(series["age"], total)}
    print_table(f"  {count} objects, ratio = objects/s / s3fs find + cat's",
                [series[k] for k in ("anchor", "child", "plain", "age")], series["anchor"], count, "objects/s", 1,
                notes)
    first_dir = items[0][0].rsplit("/", 1)[0]
    bench_latency(bench, args, bucket, first_dir, [it for it in items if it[0].rsplit("/", 1)[0] == first_dir])


# ------------------------------------------------------------------------------------------ listing


def bench_listing(bench: Bench, args, trees: list[tuple[str, str, int, str]]) -> None:
    from packerfs.source import open_source
    from packerfs.source.walk import FILE

    import s3fs  # noqa: F401  (imports out of the timed runs)

    import packerfs.source.s3  # noqa: F401

    s3 = bench.s3

    def walk(url: str):
        def run():
            source = open_source(url)
            try:
                problems: list = []
                files = sum(1 for entry in source.walk(problems) if entry.kind == FILE)
            finally:
                source.close()
            assert not problems, problems[:3]
            return files

        return run

    def find(path: str):
        def run():
            fs = s3.fs(use_listings_cache=False)
            return len(fs.find(path))

        return run

    for bucket, prefix, count, what in trees:
        anchor, ours = Series("s3fs find (fresh instance)"), Series("packerfs open_source + walk")
        for _ in range(args.runs):
            for series, fn in ((anchor, find(f"{bucket}/{prefix}")), (ours, walk(f"s3://{bucket}/{prefix}"))):
                sample, n = bench.inprocess(fn)
                assert n == count, (series.label, n, count)
                series.samples.append(sample)
        print_table(f"[listing] s3://{bucket}/{prefix}: {count} objects, {what}; {args.runs} rounds, in process",
                    [anchor, ours], anchor, count, "objects/s", 1)


# ------------------------------------------------------------------------------------------ main


def parse_constant(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=VALUE, e.g. BLOCK=32MiB")
    return name, parse_size(value)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py source", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=256 * MiB, help="large objects: total size (default 256MiB)")
    ap.add_argument("--objects", type=int, default=4, help="large objects: how many (default 4)")
    ap.add_argument("--count", type=int, default=3000, help="small objects: how many (default 3000)")
    ap.add_argument("--dirs", type=int, default=3, help="small objects: directories they are spread over (default 3)")
    ap.add_argument("--flat", type=int, default=2000,
                    help="listing: empty objects under one flat prefix (default 2000, 0 to skip)")
    ap.add_argument("--empty-every", type=int, default=100, help="small objects: every Nth is empty (default 100; "
                    "0: none but by chance)")
    ap.add_argument("--latency", type=float, default=20, help="small objects: ms a proxy adds to each request in the "
                    "extra table over the first directory (default 20)")
    ap.add_argument("--bin-size", default="64MiB", help="pack --bin-size (default 64MiB)")
    ap.add_argument("--runs", type=int, default=3, help="rounds, each alternating anchor and packerfs (default 3)")
    ap.add_argument("--only", default="large,small,listing", help="sections to run (default large,small,listing)")
    ap.add_argument("--upload-threads", type=int, default=16, help="threads uploading the small objects (default 16)")
    ap.add_argument("--set", dest="constants", type=parse_constant, action="append", default=[], metavar="NAME=VALUE",
                    help="override a packerfs.source.objects constant in the pack children (repeatable)")
    ap.add_argument("--packerfs-cmd", default=None, metavar="CMD", help="the packerfs command to time (default: "
                    "this python -m packerfs.cli), e.g. a launcher with a patch to try")
    ap.add_argument("--dir", default=None, help="work directory for moto's files, CARs and state (default /dev/shm "
                    "if roomy)")
    args = ap.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections <= {"large", "small", "listing"} or not sections:
        ap.error("--only takes large, small and listing, comma-separated")
    if args.packerfs_cmd and args.constants:
        ap.error("--set and --packerfs-cmd do not go together")
    if args.objects < 1 or args.size < args.objects or args.count < 1 or args.dirs < 1 or args.runs < 1:
        ap.error("--objects, --size, --count, --dirs and --runs must be positive")

    from objstores import moto_server

    base = args.dir or pick_dir(4 * args.size + 512 * MiB)
    work = Path(tempfile.mkdtemp(prefix="packerfs-bench-source-", dir=base))
    constants = dict(args.constants)
    began = time.perf_counter()
    try:
        with moto_server(work / "moto") as s3:
            # before s3fs/botocore read their configuration, in this process and in the pack children
            os.environ.update(s3.env)
            import moto

            import shlex

            bench = Bench(s3, work, constants, shlex.split(args.packerfs_cmd) if args.packerfs_cmd else None)
            print(f"source benchmark: moto {moto.__version__} at {s3.url}, files in {work}; {args.runs} rounds; "
                  f"{os.cpu_count()} CPUs; sections: {', '.join(sorted(sections))}"
                  + (f"; overrides {constants}" if constants else "")
                  + (f"; packerfs command: {args.packerfs_cmd}" if args.packerfs_cmd else ""))
            print("columns: best and median wall s, throughput at best, ratio of best times and median of per-round "
                  "ratios (anchor / this), median CPU s of the client and of moto, peak RSS of the pack child")
            if "large" in sections:
                bench_large(bench, args)
            trees = []
            if sections & {"small", "listing"}:
                bucket, prefix = "bench-small", "tree"
                s3.make_bucket(bucket)
                items = small_tree(args.count, args.dirs, prefix, seed=1, empty_every=args.empty_every)
                upload = upload_many(s3, bucket, items, args.upload_threads, seed=1)
                trees.append((bucket, prefix, len(items), f"{args.dirs} directories"))
                if "small" in sections:
                    bench_small(bench, args, bucket, prefix, items, upload)
                else:
                    print(f"\n(uploaded {len(items)} small objects in {upload:.1f} s)")
            if "listing" in sections:
                if args.flat:
                    s3.make_bucket("bench-flat")
                    flat = [(f"flat/o{i:06d}", 0) for i in range(args.flat)]
                    upload = upload_many(s3, "bench-flat", flat, args.upload_threads, seed=2)
                    print(f"\n(uploaded {args.flat} empty objects under s3://bench-flat/flat in {upload:.1f} s)")
                    trees.append(("bench-flat", "flat", args.flat, "flat"))
                print()
                bench_listing(bench, args, trees)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
