#!/usr/bin/env python3
"""Benchmarks. Each prints throughput as a ratio to an anchor measured in the same run,
because absolute times on shared machines are noisy.

    python tools/bench.py commp [--size 1GiB]
    python tools/bench.py crypt [--size 512MiB]
    python tools/bench.py pack [--size 2GiB | --files 100000]
    python tools/bench.py reverse [--file-size 1088MiB] [--set-size 10GiB]
    python tools/bench.py resume [--size 256MiB] [--at 0.9]
    python tools/bench.py snapshot [--files 100000]
    python tools/bench.py source [--size 256MiB] [--count 3000] [--runs 3]
    python tools/bench.py serve [--size 1GiB] [--runs 3]
    python tools/bench.py parallel [--size 2GiB] [--bin-size 256MiB] [--runs 2]
    python tools/bench.py private [all|compress|reads|names] [--size 1GiB] [--files 100000] [--runs 2]
"""

import importlib
import sys
from pathlib import Path

SUITES = {
    "commp": "bench_commp",
    "crypt": "bench_crypt",
    "pack": "bench_pack",
    "mount": "bench_mount",
    "reverse": "bench_reverse",
    "resume": "bench_resume",
    "snapshot": "bench_snapshot",
    "source": "bench_source",
    "serve": "bench_serve",
    "parallel": "bench_parallel",
    "upload": "bench_upload",
    "remote": "bench_remote",
    "private": "bench_private",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUITES:
        print(__doc__.strip(), file=sys.stderr)
        print(f"suites: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    module = importlib.import_module(SUITES[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
