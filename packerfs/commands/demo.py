"""`packerfs demo`: the main job on a small generated data set, step by step.

Each step is the real command a user would type, run in this process, so the
demo exercises exactly what the CLI does.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import tempfile

MiB = 1 << 20


def _generate(root: str) -> None:
    rng = random.Random(1)
    files = {
        "reports/2024/q1.csv": 40_000,
        "reports/2024/q2.csv": 52_000,
        "reports/summary.txt": 900,
        "images/scan-001.raw": 3 * MiB + 12345,
        "images/scan-002.raw": 9 * MiB + 1,  # larger than a bin: split across CARs
        "empty.txt": 0,
    }
    for name, size in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(rng.randbytes(size))
    os.makedirs(os.path.join(root, "empty-dir"), exist_ok=True)
    os.symlink("reports/summary.txt", os.path.join(root, "latest-summary"))


def _run(argv: list[str]) -> int:
    from packerfs.commands import run

    print(f"\n$ packerfs {shlex.join(argv)}", flush=True)
    code = run(argv)
    if code not in (0,):
        raise SystemExit(f"demo: step failed with exit code {code}")
    return code


def run_demo(workdir: str | None = None, keep: bool = False) -> int:
    base = os.path.abspath(workdir or tempfile.mkdtemp(prefix="packerfs-demo-"))
    os.makedirs(base, exist_ok=True)
    try:
        source = os.path.join(base, "data")
        if not os.path.exists(source):
            _generate(source)
        print(f"demo: a small data set in {source} (one file larger than a bin)")
        key = os.path.join(base, "key.txt")
        if not os.path.exists(key):
            _run(["keygen", "-o", key])
        recipient = [line.split(": ", 1)[1].strip() for line in open(key) if line.startswith("# public key: ")][0]
        cars = os.path.join(base, "cars")
        state = os.path.join(base, "state")
        _run(["pack", source, cars, "--recipient", recipient, "--bin-size", "4MiB", "-t", state])
        print("\n$ cat " + os.path.join(cars, "manifest.csv"))
        with open(os.path.join(cars, "manifest.csv")) as f:
            print(f.read(), end="")
        _run(["verify", cars, "--identity", key])  # the names are hidden: the manifests need the key too
        _run(["ls", cars, "--identity", key])  # the CARs show opaque names only; the key opens the real tree
        restored = os.path.join(base, "restored")
        _run(["unpack", cars, restored, "--identity", key])
        if not _report_same(source, restored):
            return 1
        # The source changes: a file goes, one is edited. The rerun packs only what changed and seals
        # snapshot 2, which unpack follows: the deleted file does not come back, nothing else is lost.
        print("\ndemo: the source changes (one file deleted, one edited); packing again with the same state")
        for path in _changes(source):
            print(f"demo:   {path}")
        _run(["pack", source, cars, "--recipient", recipient, "--bin-size", "4MiB", "-t", state])
        _run(["snapshots", cars, "--identity", key])
        again = os.path.join(base, "restored-2")
        _run(["unpack", cars, again, "--identity", key])
        if not _report_same(source, again):
            return 1
        print(f"demo: done; files are in {base}" if keep or workdir else "demo: done")
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def _changes(source: str) -> list[str]:
    """Delete one file and rewrite another; returns what was done, for the log."""
    gone = os.path.join("reports", "2024", "q1.csv")
    os.unlink(os.path.join(source, gone))
    edited = os.path.join("reports", "summary.txt")
    with open(os.path.join(source, edited), "a") as f:
        f.write("revised after the first pack\n")
    return [f"deleted {gone}", f"edited {edited}"]


def _report_same(source: str, restored: str) -> bool:
    same = _same_tree(source, restored)
    print(f"\ndemo: restored tree {'matches' if same else 'DIFFERS FROM'} the source")
    return same


def _same_tree(a: str, b: str) -> bool:
    import filecmp

    def walk(x: str, y: str) -> bool:
        cmp = filecmp.dircmp(x, y)
        if cmp.left_only or cmp.right_only or cmp.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(x, y, cmp.common_files, shallow=False)
        if mismatch or errors:
            return False
        return all(walk(os.path.join(x, d), os.path.join(y, d)) for d in cmp.common_dirs)

    return walk(a, b)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(workdir=args.dir, keep=args.keep)


def register(commands) -> None:
    p = commands.add_parser(
        "demo",
        help="run the main job on a small generated data set",
        description="Generate a small data set in a temporary directory and run packerfs on it, "
        "printing each step. Nothing outside the demo directory is touched.",
    )
    p.add_argument("--dir", help="work in DIR instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the demo directory afterwards")
    p.set_defaults(func=cmd_demo)
