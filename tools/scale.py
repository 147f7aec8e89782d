#!/usr/bin/env python3
"""Scale runs: packerfs at data-set sizes no test or benchmark reaches. Run by hand, never in CI.

    python tools/scale.py sparse --size 1TiB [--run 200GiB] [--bin-size 32GiB-sector] [--workers N]
                                 [--no-encryption] [--interval 5] [--keep] [--json]
    python tools/scale.py files --count 1000000 [--bin-size 256MiB] [--sizes 0-8KiB] [--workers N]
                                [--no-encryption] [--keep] [--json]
    python tools/scale.py plan --count 100000000 [--per-dir 1000] [--sizes 0-64MiB] [--json]

Both drive packerfs through its command line only (this checkout's .venv/bin/packerfs), encrypt
with age to a recipient made by `age-keygen` unless --no-encryption, and put their files under
--dir (default /work/scale-cache, or $PACKERFS_SCALE_DIR). Each prints the packerfs command line
it ran and the load average, since the machine may be shared.

sparse: does the mount's background scan stay flat and bounded as the data set grows?
    Invariant 6 of DESIGN.md says memory does not grow with the data set; a scan whose per-byte
    cost grows (an index lookup that slows as the index fills, a list kept per bin) shows up only
    at hundreds of GiB. The source is --files sparse files summing to --size (ftruncate: they
    read as zeros and take no disk, so a TiB costs nothing but the index), mounted with
    `packerfs mount SRC MNT --temp STATE`. Nothing reads the CARs: only the scan runs, reading,
    encrypting, hashing and sealing bins into the index. Every --interval s the run reads
    MNT/.packerfs-status (bytes_scanned, bins_sealed, state; `packerfs status --json` reads the
    index and has no bytes_scanned, so it is called once, at the end) and, from /proc, the daemon's
    process tree (its FUSE reader workers, Dask workers): RSS, PSS, CPU time, and the bytes its
    processes read (rchar: the source, and the few bytes of Dask messages; the index is mmap-ed). The
    bytes read are the fine-grained progress measure: when bins are sealed by Dask workers,
    bytes_scanned moves a whole bin at a time. It stops once --run bytes are scanned or read
    (default: when the scan ends), the scan ends, nothing moves for --stall s, or the daemon dies,
    and prints a row per sample. The summary gives, by each counter, the mean throughput and the
    flatness: the throughput over the last 10% of the steady intervals divided by that over the
    first 10% (≈ 1.0 when the per-byte cost does not grow), and the same in CPU seconds per GiB,
    which other load on a shared machine disturbs less; then peak RSS, the first against the last
    sample's RSS, and a table of every process seen. Steady intervals leave out the one holding the
    start-up and a last one in which the scan finished; near the end of a scan fewer bins remain
    than workers, so a full run's last 10% may run slower for that reason alone. Whatever happens,
    the mount is unmounted (fusermount3 -u, then -uz), the daemon is waited for and killed if it
    lingers (its children too), and the sparse files and the state are removed unless --keep.

files: what does a pack cost per file?
    A tree of --count small files (sizes uniform in --sizes, --per-dir files per directory, two
    levels of directories) is built once and reused while its parameters match (a marker file
    beside it says it is complete). `packerfs pack SRC OUT --temp STATE` runs end to end in a fresh
    work directory; the run reports wall time, files/s, the peak RSS of the packerfs process (its
    VmHWM, and wait4's figure) and of the largest descendant separately (worker processes may be
    added), the tree's summed peak, the LMDB index's size in STATE in bytes per file (DESIGN.md
    budgets about 200), the CPU time of the whole tree, and the CAR bytes against the source's.
    A reused tree may be cold in the page cache; a just-built one is warm (the output says which).

plan: can a petabyte's listing be planned on paper?
    A synthetic listing of --count entries (two levels of directories, --per-dir files each) is
    planned from metadata alone, as `packerfs plan` does; this run alone imports packerfs, since no
    real tree of 100 M entries fits here (see tools/scale_plan.py). It reports entries/s, planning
    time and peak RSS.

Each run is a module with add_arguments(parser) and run(args), listed in RUNS.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (module in tools/, one-line help)
RUNS = {
    "sparse": ("scale_sparse", "the mount's background scan over a large sparse source: throughput flatness, RSS"),
    "files": ("scale_files", "`packerfs pack` of many small files: files/s, RSS, index bytes per file"),
    "plan": ("scale_plan", "planning a synthetic listing from metadata alone: entries/s, peak RSS"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="scale.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    runs = top.add_subparsers(dest="run", metavar="RUN", required=True)
    for name, (module_name, help_text) in RUNS.items():
        module = importlib.import_module(module_name)
        sub = runs.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return top


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so each run's cleanup (unmount, kill, remove) still happens."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    exit_on_sigterm()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("scale: interrupted (cleaned up)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
