"""Sequential read throughput of the pack view against `gocryptfs -reverse` over the same source, in the same run.

    python tools/bench.py mount [--size 1088MiB] [--runs 3] [--keep DIR]

The source is one file of twice --size (plus a little), packed with age (X25519)
into bins of --size, so bins 1 and 2 are full 1 GiB+ CARs. Measured with
`dd bs=1M` to /dev/null, the page cache of the file read dropped before each
read (POSIX_FADV_DONTNEED) and the source file kept in the page cache, so every
contestant regenerates its bytes from the same warm source:

- packerfs, one reader (bin 1), and two parallel readers (bins 1 and 2);
- gocryptfs -reverse (AES-GCM, its own format) of the source file, one reader,
  and two parallel readers (the file's two halves);
- the raw pyfuse3 ceiling: a do-nothing pyfuse3 file of the same size that
  returns zeros, same mount options, one and two readers.

Runs are interleaved (A B C A B C …) and the best of --runs is reported, because
the machine may be shared. CPU seconds per GiB served, of the daemon's own
process (FUSE requests, trio) and of its worker processes (BinReader: source
reads, encryption, hashing, copies), show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PACKERFS = [sys.executable, "-m", "packerfs.cli"]

TARGET_RATIO = 2.0
TARGET_MBPS = 250.0


def parse_size(text: str) -> int:
    sys.path.insert(0, str(ROOT))
    from packerfs.plan.sizes import parse_size as parse

    return parse(text)


def make_source(path: Path, size: int) -> None:
    pool = os.urandom(64 * MiB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        written, i = 0, 0
        while written < size:
            start = (i * 7_919 * 4096) % (32 * MiB)
            piece = pool[start : start + min(32 * MiB, size - written)]
            out.write(piece)
            written += len(piece)
            i += 1


def mounted(mnt: Path) -> bool:
    sys.path.insert(0, str(ROOT))
    from packerfs.fs.mounts import mount_entry

    return mount_entry(str(mnt)) is not None


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """CPU seconds of the daemon's own process, and of its worker processes."""
    if pid is None:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    fields = _stat(pid)
    own = (int(fields[11]) + int(fields[12])) / tick
    workers = 0.0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = _stat(int(name))
            except OSError:
                continue
            if int(fields[1]) == pid:
                workers += (int(fields[11]) + int(fields[12])) / tick
    return own, workers


def timed_dd(jobs: list[tuple[Path, int, int]], pid: int | None = None) -> tuple[float, float, tuple[float, float]]:
    """Run one `dd bs=1M` per (file, skip MiB, count MiB) in parallel: (MB/s total, seconds, daemon and workers CPU s)."""
    for path, _, _ in jobs:
        drop_cache(path)
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    processes = []
    for path, skip, count in jobs:
        argv = ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"skip={skip}"]
        if count:
            argv.append(f"count={count}")
        processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    total = 0
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise SystemExit(f"bench: dd failed: {err.decode().strip()}")
        total += int(err.decode().strip().splitlines()[-1].split()[0])
    seconds = time.perf_counter() - start
    after = cpu_seconds(pid)
    return total / seconds / 1e6, seconds, (after[0] - cpu[0], after[1] - cpu[1])


# ---------------------------------------------------------------- the do-nothing pyfuse3 file


def serve_zeros(mountpoint: str, size: int) -> None:
    """A pyfuse3 file system with two files of `size` zero bytes: the cost of pyfuse3 + trio alone."""
    import errno
    import stat

    import pyfuse3
    import trio

    sys.path.insert(0, str(ROOT))
    from packerfs.fs import daemon

    zeros = memoryview(bytes(4 * MiB))

    class Zeros(pyfuse3.Operations):
        def _attr(self, inode):
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.attr_timeout = attr.entry_timeout = 3600
            if inode == pyfuse3.ROOT_INODE:
                attr.st_mode = stat.S_IFDIR | 0o555
                attr.st_nlink = 2
            else:
                attr.st_mode = stat.S_IFREG | 0o444
                attr.st_nlink = 1
                attr.st_size = size
            return attr

        async def getattr(self, inode, ctx=None):
            return self._attr(inode)

        async def lookup(self, parent, name, ctx=None):
            if parent == pyfuse3.ROOT_INODE and name in (b"zeros", b"zeros2"):
                return self._attr(2 if name == b"zeros" else 3)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start, token):
            for i, name in enumerate((b"zeros", b"zeros2")[start:], start):
                if not pyfuse3.readdir_reply(token, name, self._attr(i + 2), i + 1):
                    break

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, off, length):
            return zeros[: max(0, min(length, size - off))]

    options = set(pyfuse3.default_options) | {"fsname=zeros", "ro"}
    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon._after_init, mountpoint)  # the same kernel settings as the pack view
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    pyfuse3.init(Zeros(), mountpoint, options)
    try:
        trio.run(main)
    except* KeyboardInterrupt:
        pass  # how the bench stops it; trio reports it inside an exception group
    finally:
        pyfuse3.close(unmount=True)


# ---------------------------------------------------------------- the run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py mount")
    parser.add_argument("--size", default="1088MiB", help="bin size; the source file is twice this (default 1088MiB: bins of 1 GiB+)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (reuses its source and state)")
    args = parser.parse_args(argv)
    for tool in ("gocryptfs", "fusermount3", "dd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (./run setup installs it)")
    bin_size = parse_size(args.size)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="packerfs-bench-mount-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src, state = work / "src", work / "state"
    data = src / "data.bin"
    pmnt, gmnt, zmnt = work / "mnt-packerfs", work / "mnt-gocryptfs", work / "mnt-zeros"
    for d in (pmnt, gmnt, zmnt):
        d.mkdir(exist_ok=True)
    zeros = None
    daemon_pid = None
    try:
        source_size = 2 * bin_size + 8 * MiB
        if not data.exists() or data.stat().st_size != source_size:
            print(f"writing a {source_size / 2**30:.2f} GiB source file …", file=sys.stderr)
            make_source(data, source_size)
        key = work / "key.txt"
        if not key.exists():
            subprocess.run([*PACKERFS, "keygen", "-o", key], cwd=ROOT, check=True, capture_output=True)
        recipient = next(line.split(":", 1)[1].strip() for line in key.read_text().splitlines() if "public key" in line)

        # packerfs: mount, wait for the scan (timed: it is the one pass that seals every bin)
        start = time.perf_counter()
        subprocess.run(
            [*PACKERFS, "mount", src, pmnt, "-t", state, "--bin-size", str(bin_size), "-r", recipient],
            cwd=ROOT, check=True, capture_output=True,
        )

        def status() -> dict:
            return json.loads((pmnt / ".packerfs-status").read_text())

        daemon_pid = status()["pid"]
        wait_for(lambda: status()["state"] in ("ready", "failed"), 1800, "the packerfs scan")
        scan_seconds = time.perf_counter() - start
        final = status()
        if final["state"] != "ready":
            raise SystemExit(f"bench: the scan failed: {final['errors']}")
        if final["bytes_scanned"] == 0:
            scan_seconds = None  # the kept state already held every bin
        bins = sorted(pmnt.glob("bin-*.car"))[:2]
        if len(bins) < 2 or bins[1].stat().st_size < bin_size * 0.99:
            raise SystemExit(f"bench: expected two full bins, got {[(b.name, b.stat().st_size) for b in bins]}")

        # gocryptfs -reverse over the same source (config kept outside SRC, so SRC stays what packerfs packed)
        password, config = work / "gocryptfs.pass", work / "gocryptfs.conf"
        password.write_text("packerfs-bench\n")
        if not config.exists():
            subprocess.run(
                ["gocryptfs", "-init", "-reverse", "-q", "-passfile", password, "-config", config, src],
                check=True, capture_output=True,
            )
        # (its daemon keeps the stdio it inherits: no pipes, or this would wait for it to exit)
        subprocess.run(
            ["gocryptfs", "-reverse", "-q", "-nosyslog", "-passfile", password, "-config", config, src, gmnt],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        encrypted = max((p for p in gmnt.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)

        # the ceiling
        zeros = subprocess.Popen([sys.executable, __file__, "--serve-zeros", str(zmnt), str(bins[0].stat().st_size)])
        wait_for(lambda: mounted(zmnt), 20, "the zeros file system")
        zero_file = zmnt / "zeros"

        warm(data)
        half = source_size // MiB // 2
        cases = {
            "packerfs 1 reader": lambda: timed_dd([(bins[0], 0, 0)], daemon_pid),
            "packerfs 2 readers": lambda: timed_dd([(bins[0], 0, 0), (bins[1], 0, 0)], daemon_pid),
            "gocryptfs 1 reader": lambda: timed_dd([(encrypted, 0, half)]),
            "gocryptfs 2 readers": lambda: timed_dd([(encrypted, 0, half), (encrypted, half, 0)]),
            "pyfuse3 zeros 1 reader": lambda: timed_dd([(zero_file, 0, 0)]),
            "pyfuse3 zeros 2 readers": lambda: timed_dd([(zero_file, 0, 0), (zmnt / "zeros2", 0, 0)]),
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
        for run in range(args.runs):
            for name, case in cases.items():
                warm(data)
                results[name].append(case())
                print(f"run {run + 1}: {name}: {results[name][-1][0]:.0f} MB/s", file=sys.stderr)
        report(results, scan_seconds, bins[0].stat().st_size, source_size, load_note())
    finally:
        if zeros is not None:
            zeros.send_signal(2)
            try:
                zeros.wait(20)
            except subprocess.TimeoutExpired:
                zeros.kill()
        for mnt in (pmnt, gmnt, zmnt):
            if mounted(mnt):
                subprocess.run(["fusermount3", "-u", mnt], capture_output=True, timeout=60)
            if mounted(mnt):
                subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, timeout=60)
        if daemon_pid is not None:
            wait_for(lambda: not os.path.exists(f"/proc/{daemon_pid}"), 60, "the packerfs daemon to exit")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def load_note() -> str:
    with open("/proc/loadavg") as f:
        return f"load average {f.read().split()[0]} on {os.cpu_count()} CPUs"


def report(results: dict, scan_seconds: float | None, bin_bytes: int, source_size: int, note: str) -> None:
    best = {name: max(r[0] for r in runs) for name, runs in results.items()}
    median = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    print()
    print(f"sequential reads, dd bs=1M, best (median) of {len(next(iter(results.values())))} runs; {note}")
    print(f"{'':28} {'MB/s':>16}   CPU s per GiB served: daemon + its workers")
    for name in results:
        cpu = ""
        if name.startswith("packerfs"):
            runs = results[name]
            fastest = max(runs, key=lambda r: r[0])
            gib = fastest[0] * 1e6 * fastest[1] / 2**30
            cpu = f"{fastest[2][0] / gib:.2f} + {fastest[2][1] / gib:.2f}"
        print(f"{name:28} {best[name]:8.0f} ({median[name]:5.0f})   {cpu}")
    ratio = best["packerfs 1 reader"] / best["gocryptfs 1 reader"]
    scaling = best["packerfs 2 readers"] / best["packerfs 1 reader"]
    ceiling = best["packerfs 1 reader"] / best["pyfuse3 zeros 1 reader"]
    print()
    if scan_seconds is None:
        print("scan: none (the kept state directory already held every bin)")
    else:
        print(f"scan (mount to ready, age, {source_size / 2**30:.2f} GiB): {scan_seconds:.1f} s, "
              f"{source_size / scan_seconds / 1e6:.0f} MB/s")
    print(f"packerfs / gocryptfs -reverse, 1 reader: {ratio:.2f}x   (target >= {TARGET_RATIO})"
          f"  {'ok' if ratio >= TARGET_RATIO else 'MISSED'}")
    print(f"packerfs, 1 reader of a {bin_bytes / 2**30:.2f} GiB bin: {best['packerfs 1 reader']:.0f} MB/s"
          f"   (target >= {TARGET_MBPS:.0f})  {'ok' if best['packerfs 1 reader'] >= TARGET_MBPS else 'MISSED'}")
    print(f"packerfs, 2 readers / 1 reader: {scaling:.2f}x   (target > 1)  {'ok' if scaling > 1.0 else 'MISSED'}")
    print(f"packerfs / raw pyfuse3 ceiling, 1 reader: {ceiling:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-zeros":
        serve_zeros(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))
