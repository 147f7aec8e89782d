"""`scale.py files`: `packerfs pack` of many small files, end to end (see scale.py)."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scale_common import (
    GiB, KiB, MiB, check_free_space, cipher_options, default_cache_dir, disk_bytes, load_average,
    packerfs_command, print_processes, parse_size_range, rejected_option, shell_line, workers_note,
)
from scale_proc import Proc, TreeSampler, proc, terminate, tree

SUBDIRS = 100  # second-level directories under each first-level one
POOL = 4 * MiB  # file contents are slices of one seeded random pool
TREE_VERSION = 1  # bump when the layout or contents of a built tree change


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=1_000_000, help="files in the tree (default 1000000)")
    p.add_argument("--sizes", default="0-8KiB", help="file sizes, uniform from LO to HI inclusive (default 0-8KiB)")
    p.add_argument("--per-dir", type=int, default=1000, help="files per directory (default 1000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bin-size", default="256MiB", help="passed to packerfs as is (default 256MiB)")
    p.add_argument("--workers", type=int, help="passed to `packerfs pack --workers` (only if given)")
    p.add_argument("--no-encryption", action="store_true", help="pack without encryption (default: age)")
    p.add_argument("--period", type=float, default=0.5, help="seconds between /proc samples (default 0.5)")
    p.add_argument("--timeout", type=float, help="kill the pack after this many seconds")
    p.add_argument("--dir", type=Path, default=default_cache_dir(), help="cache of built trees, and the runs' work directories")
    p.add_argument("--keep", action="store_true", help="keep the run's CARs and state")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every figure")


# ------------------------------------------------------------------ the tree


@dataclass
class Tree:
    path: Path
    files: int
    bytes: int
    reused: bool
    build_seconds: float


def tree_params(args: argparse.Namespace) -> dict:
    low, high = parse_size_range(args.sizes)
    return {"version": TREE_VERSION, "count": args.count, "low": low, "high": high, "per_dir": args.per_dir, "seed": args.seed}


def file_path(root: Path, i: int, per_dir: int) -> Path:
    """File i's place: a{first}/b{second}/f{i}, `per_dir` files per leaf directory, SUBDIRS leaves per a-directory."""
    directory = i // per_dir
    return root / f"a{directory // SUBDIRS:04d}" / f"b{directory % SUBDIRS:03d}" / f"f{i:08d}"


def ensure_tree(cache: Path, params: dict) -> Tree:
    """The tree for these parameters: reused if its marker says it is complete, else (re)built."""
    home = cache / "files-{count}-{low}-{high}-{per_dir}-s{seed}-v{version}".format(**params)
    marker = home / "complete.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("params") == params:
            return Tree(home / "src", recorded["files"], recorded["bytes"], True, 0.0)
    shutil.rmtree(home, ignore_errors=True)  # a half-built or different tree
    estimate = params["count"] * ((params["low"] + params["high"]) // 2 + 4 * KiB)
    check_free_space(cache, estimate + GiB, f"building the tree of {params['count']:,} files")
    start = time.monotonic()
    total = build_tree(home / "src", params)
    seconds = time.monotonic() - start
    marker.write_text(json.dumps({"params": params, "files": params["count"], "bytes": total, "build_seconds": seconds}))
    return Tree(home / "src", params["count"], total, False, seconds)


def build_tree(root: Path, params: dict) -> int:
    """Write the files (sizes and contents from the seed); returns the bytes written."""
    rng = random.Random(params["seed"])
    pool = rng.randbytes(POOL + params["high"])
    total = 0
    made: set[Path] = set()
    for i in range(params["count"]):
        path = file_path(root, i, params["per_dir"])
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        size = rng.randint(params["low"], params["high"])
        offset = rng.randrange(POOL)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, pool[offset : offset + size])
        finally:
            os.close(fd)
        total += size
        if (i + 1) % 100_000 == 0:
            print(f"  built {i + 1:,} files", flush=True)
    return total


# ------------------------------------------------------------------ the pack


@dataclass
class PackRun:
    seconds: float
    exit_code: int
    wait4_maxrss_kib: int  # the pack process and its reaped descendants, from the kernel
    sampler: TreeSampler
    stdout: str
    stderr: str


def pack_command(args: argparse.Namespace, src: Path, out: Path, state: Path, cipher: list[str]) -> list[str]:
    argv = packerfs_command() + ["pack", str(src), str(out), "--temp", str(state), "--bin-size", args.bin_size, *cipher, "--json"]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    return argv


def run_pack(argv: list[str], work: Path, period: float, timeout: float | None) -> PackRun:
    """Run the pack, sampling its process tree; output goes to files (no pipe to fill)."""
    stdout_path, stderr_path = work / "pack.stdout", work / "pack.stderr"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        start = time.monotonic()
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    root = proc(process.pid) or Proc(process.pid, -1)
    sampler = TreeSampler(root, period=period).start()
    status = usage = None
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout and time.monotonic() - start > timeout:
                raise TimeoutError(f"packerfs pack still running after {timeout:.0f} s")
            time.sleep(0.05)
        seconds = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        sampler.stop()
        if process.returncode is None:  # interrupted or timed out: end the pack and its children
            terminate(tree(root) or [root], grace=10)
            process.wait(30)
    return PackRun(
        seconds, process.returncode, usage.ru_maxrss, sampler,
        stdout_path.read_text(errors="replace"), stderr_path.read_text(errors="replace"),
    )


# ------------------------------------------------------------------ figures


def figures(args: argparse.Namespace, source: Tree, pack: PackRun, state: Path, out: Path, cipher: str) -> dict:
    index_apparent, index_allocated = disk_bytes(state, ".mdb")
    car_apparent, _ = disk_bytes(out, ".car")
    cars = sum(1 for name in os.listdir(out) if name.endswith(".car")) if out.exists() else 0
    child, child_kib = pack.sampler.largest_child()
    try:
        reported = json.loads(pack.stdout)
    except json.JSONDecodeError:
        reported = {}
    return {
        "run": "files", "count": source.files, "source_bytes": source.bytes, "sizes": args.sizes,
        "per_dir": args.per_dir, "bin_size": args.bin_size, "cipher": cipher, "workers": args.workers,
        "tree_reused": source.reused, "tree_build_s": round(source.build_seconds, 1),
        "wall_s": round(pack.seconds, 2), "files_per_s": round(source.files / pack.seconds, 1),
        "mib_per_s": round(source.bytes / MiB / pack.seconds, 2),
        "coordinator_peak_rss_mib": round(pack.sampler.root_peak_kib() / KiB, 1),
        "wait4_maxrss_mib": round(pack.wait4_maxrss_kib / KiB, 1),
        "children_seen": pack.sampler.children_seen(),
        "largest_child_peak_rss_mib": round(child_kib / KiB, 1),
        "largest_child_pid": child.pid if child else None,
        "tree_peak_rss_mib": round(pack.sampler.peak_tree_rss_kib / KiB, 1),
        "tree_peak_pss_mib": round(pack.sampler.peak_tree_pss_kib / KiB, 1),
        "index_bytes": index_apparent, "index_allocated_bytes": index_allocated,
        "index_bytes_per_file": round(index_apparent / max(source.files, 1), 1),
        "car_bytes": car_apparent, "cars": cars,
        "car_overhead_bytes_per_file": round((car_apparent - source.bytes) / max(source.files, 1), 1),
        "files_packed": reported.get("files_packed"), "bytes_read": reported.get("bytes_read"),
        "cpu_s": round(sum(p["cpu_s"] for p in pack.sampler.per_process()), 1),
        "exit_code": pack.exit_code, "load_average_end": load_average(),
        "processes": pack.sampler.per_process(),
    }


def print_summary(f: dict) -> None:
    print(
        f"pack: {f['count']:,} files, {f['source_bytes'] / MiB:,.1f} MiB in {f['wall_s']:.1f} s: "
        f"{f['files_per_s']:,.0f} files/s, {f['mib_per_s']:.1f} MiB/s (cipher {f['cipher']}, exit {f['exit_code']})"
    )
    print(
        f"peak RSS: coordinator {f['coordinator_peak_rss_mib']:.1f} MiB (VmHWM; wait4 {f['wait4_maxrss_mib']:.1f} MiB), "
        f"largest of {f['children_seen']} children {f['largest_child_peak_rss_mib']:.1f} MiB, "
        f"tree {f['tree_peak_rss_mib']:.1f} MiB summed (PSS {f['tree_peak_pss_mib']:.1f} MiB)"
    )
    print(f"CPU: {f['cpu_s']:.1f} s over the tree = {1000 * f['cpu_s'] / max(f['count'], 1):.2f} ms per file")
    print(
        f"index: {f['index_bytes']:,} bytes ({f['index_allocated_bytes']:,} allocated) = "
        f"{f['index_bytes_per_file']:.0f} bytes per file"
    )
    print(
        f"CARs: {f['cars']} files, {f['car_bytes']:,} bytes "
        f"({f['car_overhead_bytes_per_file']:.0f} bytes per file over the source's)"
    )


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> int:
    params = tree_params(args)
    args.dir.mkdir(parents=True, exist_ok=True)
    source = ensure_tree(args.dir, params)
    built = "reused" if source.reused else f"built in {source.build_seconds:.1f} s"
    print(f"tree: {source.files:,} files, {source.bytes / MiB:,.1f} MiB in {source.path} ({built})")
    check_free_space(args.dir, int(source.bytes * 1.2) + source.files * 2 * KiB + GiB, "the CARs and the index")
    work = Path(tempfile.mkdtemp(prefix="files-run-", dir=args.dir))
    out, state = work / "out", work / "state"
    try:
        cipher, cipher_name = cipher_options(args.no_encryption, work)
        argv = pack_command(args, source.path, out, state, cipher)
        print(f"bin size {args.bin_size}, {workers_note(args.workers)}, load average {load_average()}")
        print(f"$ {shell_line(argv)}", flush=True)
        try:
            pack = run_pack(argv, work, args.period, args.timeout)
        except TimeoutError as exc:
            raise SystemExit(f"scale: {exc}; killed it") from None
        if pack.exit_code == 2 and rejected_option(pack.stderr, "--workers"):
            raise SystemExit(f"scale: `packerfs pack` does not take --workers (yet): {pack.stderr.strip().splitlines()[-1]}")
        if pack.exit_code != 0:
            print(f"packerfs pack exited {pack.exit_code}: {pack.stderr.strip()[-2000:]}")
        result = figures(args, source, pack, state, out, cipher_name)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(result)
    print_processes(result["processes"])
    if args.json:
        print(json.dumps({**result, "command": argv}))
    return 0 if result["exit_code"] == 0 else 1
