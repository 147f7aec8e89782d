"""`tools/scale.py plan`: plan a synthetic listing of --count entries from metadata alone.

    python tools/scale.py plan --count 100000000 [--per-dir 1000] [--sizes 0-64MiB]
                               [--bin-size 32GiB-sector] [--no-encryption] [--interval 10] [--json]

Unlike the other runs, this one imports packerfs: no directory on this machine can hold 100 M
entries, so the listing is made up. A Source whose walk() yields Entries in canonical order
(two levels of directories, --per-dir files each, sizes drawn from --sizes by a seeded
generator) feeds the same dry Scan that `packerfs plan` runs (Engine.plan). Nothing is read:
the synthetic source refuses open() and stream(). The index is a fresh one in a temporary state
directory, so this is a first pack's plan.

Every --interval s it prints entries/s and the process's RSS; at the end, the planning time,
entries/s over the whole run, peak RSS (VmHWM), the bins and the bytes planned.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from scale_common import GiB, MiB, ROOT, make_age_recipient, parse_size_range, size_type

sys.path.insert(0, str(ROOT))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=1_000_000, help="entries in the listing (files and directories)")
    parser.add_argument("--per-dir", type=int, default=1000, help="files per directory (default 1000)")
    parser.add_argument("--sizes", default="0-64MiB", help="file sizes, uniform in this range (default 0-64MiB)")
    parser.add_argument("--bin-size", type=size_type, default="32GiB-sector", help="bin size (default 32GiB-sector)")
    parser.add_argument("--no-encryption", action="store_true", help="plan a --no-encryption pack (default: age)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def synthetic_source(count: int, per_dir: int, sizes: tuple[int, int]):
    from packerfs.errors import SourceChanged
    from packerfs.source.base import Source
    from packerfs.source.walk import DIR, FILE, Entry, Fingerprint

    class SyntheticSource(Source):
        url = "synthetic://"
        walked = 0

        def walk(self, problems, *, start_after=None, exclude=(), keep=False, replay=False):
            rng = random.Random(12)
            low, high = sizes
            mtime = 1_700_000_000 * 10**9
            root_fp = Fingerprint(1, 1, 0, mtime, mtime)
            yield Entry(b"", DIR, 0o755, mtime, 0, root_fp)
            made = 1
            top = 0
            inode = 2
            while made < count:
                top_path = b"d%05d" % top
                yield Entry(top_path, DIR, 0o755, mtime, 0, Fingerprint(1, inode, 0, mtime, mtime))
                made += 1
                inode += 1
                for sub in range(1000):
                    if made >= count:
                        break
                    sub_path = top_path + b"/s%04d" % sub
                    yield Entry(sub_path, DIR, 0o755, mtime, 0, Fingerprint(1, inode, 0, mtime, mtime))
                    made += 1
                    inode += 1
                    for i in range(min(per_dir, count - made)):
                        size = rng.randint(low, high)
                        path = sub_path + b"/f%06d.dat" % i
                        yield Entry(path, FILE, 0o644, mtime, size, Fingerprint(1, inode, size, mtime, mtime))
                        made += 1
                        inode += 1
                        self.walked = made
                top += 1

        def open(self, relpath, fingerprint):
            raise SourceChanged(f"{relpath!r}: the synthetic source has no content")

        def stream(self, entry, start=0):
            raise SourceChanged(f"{entry.path!r}: the synthetic source has no content")

        def describe_change(self, relpath, fingerprint):
            return "synthetic"

    return SyntheticSource()


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(args: argparse.Namespace) -> int:
    from packerfs.crypt import make_cipher
    from packerfs.pack import Engine
    from packerfs.index.store import Index
    from packerfs.crypt.secrets import load_or_create_dataset_secret

    sizes = parse_size_range(args.sizes)
    work = Path(tempfile.mkdtemp(prefix="packerfs-scale-plan-"))
    try:
        cipher = make_cipher(no_encryption=True) if args.no_encryption else make_cipher([make_age_recipient(work)])
        source = synthetic_source(args.count, args.per_dir, sizes)
        state = work / "state"
        state.mkdir()
        index = Index(str(state))
        index.bind({"source": source.url, "bin_size": args.bin_size, "cipher": cipher.name,
                    "recipients": sorted(cipher.recipients)})
        engine = Engine(source, str(state), cipher, args.bin_size, index, load_or_create_dataset_secret(str(state)))
        print(f"plan: {args.count:,} synthetic entries ({args.per_dir} files per directory, sizes {args.sizes}), "
              f"bin size {args.bin_size:,}, {cipher.name}", flush=True)
        done = threading.Event()
        started = time.monotonic()

        def report():
            last_n, last_t = 0, started
            while not done.wait(args.interval):
                now, n = time.monotonic(), source.walked
                print(f"  {now - started:7.0f} s  {n:>13,} entries  {(n - last_n) / (now - last_t):>9,.0f} entries/s  "
                      f"rss {rss_bytes() / MiB:6.0f} MiB", flush=True)
                last_n, last_t = n, now

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            plan, problems = engine.plan()
        finally:
            done.set()
        seconds = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        index.close()
        summary = {
            "entries": plan.entries,
            "files": plan.files,
            "bytes": plan.bytes,
            "bins": len(plan.bins),
            "seconds": round(seconds, 1),
            "entries_per_s": round(plan.entries / seconds),
            "peak_rss_bytes": peak,
            "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"planned {plan.entries:,} entries ({plan.files:,} files, {plan.bytes / GiB:,.0f} GiB) into "
                  f"{len(plan.bins):,} bins in {seconds:,.0f} s: {summary['entries_per_s']:,} entries/s, "
                  f"peak RSS {peak / MiB:,.0f} MiB")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
