"""The HTTP piece gateway (`packerfs serve`) against the FUSE mount and nginx, in the same run.

    python tools/bench.py serve [--size 1GiB] [--runs 3] [--keep DIR]
    python tools/bench_serve.py [--size 1GiB] [--runs 3] [--packerfs-cmd "python launcher.py"]

The source is one random file of --size, packed with age (X25519) into bins a
little larger (--size + 1/16), so bin 1 is one ~--size CAR. `pack` writes that
CAR to disk first (same state directory), for nginx; the gateway and the mount
then regenerate it from the same warm source (the source file is read into the
page cache before every run). Nothing is served from a cache already filled by
an earlier run: every gateway run uses a freshly started `packerfs serve`
(its window cache and its workers' leaf caches are process memory), every mount
run a fresh mount, with the bin's page cache also dropped (POSIX_FADV_DONTNEED).
nginx serves from a warm page cache on purpose (it is the static-host anchor).

Runs are interleaved (gateway curl, mount dd, nginx curl, gateway aria2c, …);
best and median of --runs are reported, ratios are of the bests:

1. gateway, one `curl -s -o /dev/null` stream  ÷  `dd bs=1M` of MNT/bin-000001.car
   through the mount (goal >= 0.9);
2. gateway curl  ÷  nginx (sendfile, page cache warm) curl of the packed CAR;
3. gateway `aria2c -x 4 -s 4 -k 1M`  ÷  gateway curl (goal >= 1.5 on 2 cores);
   aria2c's download is compared with the packed CAR byte for byte;
4. time to first byte (curl's time_starttransfer of the first request to a
   fresh, ready gateway: the bin is sealed), and peak RSS of the gateway process
   and its worker processes while 16 clients each read random 4 MiB ranges:
   VmHWM of each process, their sum (an upper bound: pages shared by fork and the
   workers' shared-memory slots count once per process) and the peak of the
   summed Pss (proportional set size, sampled every 0.1 s: shared pages split).

CPU seconds per GiB served, of the gateway's own process (HTTP, trio, copies),
of each worker process (source reads, encryption, hashing) and of the client,
show where the time goes and whether parallel ranges use both workers. The
seconds the server's processes spent runnable but waiting for a CPU (schedstat)
say how much the machine's other load held them back; the CPU-bound ceiling of
each case (its CPU seconds per GiB shared over the machine's CPUs, no process
faster than one CPU) says what the same costs would give on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mount import drop_cache, load_note, make_source, mounted, parse_size, wait_for, warm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PACKERFS = [sys.executable, "-m", "packerfs.cli"]
NGINX = "/usr/sbin/nginx"

TARGET_MOUNT_RATIO = 0.9
TARGET_ARIA_RATIO = 1.5
CLIENTS = 16
RANGE = 4 * MiB


# ---------------------------------------------------------------- processes and CPU


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(_stat(int(name))[1]) == pid:
                    out.append(int(name))
            except (OSError, IndexError):
                continue
    return sorted(out)


def _runqueue_wait(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(CPU seconds, run-queue wait seconds) of `pid` and of each of its children (the worker processes), by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in [pid, *children(pid)]:
        try:
            fields = _stat(p)
        except OSError:
            continue
        out[p] = ((int(fields[11]) + int(fields[12])) / tick, _runqueue_wait(p))
    return out


def cpu_split(pid: int, before: dict, after: dict) -> tuple[float, list[float], float]:
    """(CPU s of the serving process, [CPU s of each worker], run-queue wait s of them all) between two cpu() readings."""
    zero = (0.0, 0.0)
    own = after.get(pid, zero)[0] - before.get(pid, zero)[0]
    workers = [after[p][0] - before.get(p, zero)[0] for p in sorted(after) if p != pid]
    wait = sum(after[p][1] - before.get(p, zero)[1] for p in after)
    return own, workers, wait


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the clients: curl, aria2c, dd)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"bench: pid {process.pid} did not stop within {timeout:.0f} s; killing it", file=sys.stderr)
        for child in children(process.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        process.kill()
        process.wait(10)


# ---------------------------------------------------------------- packerfs serve


class Gateway:
    """A fresh `packerfs serve` on a free port, ready (its scan done) when start() returns."""

    def __init__(self, work: Path, src: Path, state: Path, options: list[str], name: str):
        self.work, self.src, self.state, self.options, self.name = work, src, state, options, name
        self.process: subprocess.Popen | None = None
        self.base = ""

    def start(self, timeout: float = 300.0) -> "Gateway":
        out = self.work / f"{self.name}.out"
        self.log = self.work / f"{self.name}.log"
        with open(out, "wb") as stdout, open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [*PACKERFS, "serve", str(self.src), "--listen", "127.0.0.1:0", "-t", str(self.state), *self.options],
                cwd=ROOT, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(r"serving pieces at (http://127\.0\.0\.1:\d+)/piece/", out.read_text(errors="replace"))
            if match:
                self.base = match.group(1)
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: packerfs serve did not start:\n{self.tail()}")
            time.sleep(0.02)
        wait_for(lambda: self.status()["state"] in ("ready", "failed"), timeout, "the gateway's scan")
        if self.status()["state"] != "ready":
            raise SystemExit(f"bench: the gateway's scan failed: {self.status()}")
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict:
        with urllib.request.urlopen(self.base + "/status", timeout=30) as r:
            return json.loads(r.read())

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop(self.process)


# ---------------------------------------------------------------- packerfs mount


class Mount:
    def __init__(self, src: Path, mnt: Path, state: Path, options: list[str]):
        self.src, self.mnt, self.state, self.options = src, mnt, state, options
        self.pid: int | None = None

    def start(self, timeout: float = 300.0) -> "Mount":
        subprocess.run([*PACKERFS, "mount", str(self.src), str(self.mnt), "-t", str(self.state), *self.options],
                       cwd=ROOT, check=True, capture_output=True, timeout=timeout)
        self.pid = self.status()["pid"]
        wait_for(lambda: self.status()["state"] in ("ready", "failed"), timeout, "the mount's scan")
        if self.status()["state"] != "ready":
            raise SystemExit(f"bench: the mount's scan failed: {self.status()['errors']}")
        return self

    def status(self) -> dict:
        return json.loads((self.mnt / ".packerfs-status").read_text())

    def stop(self) -> None:
        if mounted(self.mnt):
            subprocess.run([*PACKERFS, "umount", str(self.mnt)], cwd=ROOT, capture_output=True, timeout=90)
        for argv in (["fusermount3", "-u", str(self.mnt)], ["fusermount3", "-uz", str(self.mnt)]):
            if mounted(self.mnt):
                subprocess.run(argv, capture_output=True, timeout=60)
        if self.pid is not None:
            wait_for(lambda: not os.path.exists(f"/proc/{self.pid}"), 60, "the mount daemon to exit")
            self.pid = None


# ---------------------------------------------------------------- nginx


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format ranges '$remote_addr "$request" $status $body_bytes_sent range="$http_range"';
    access_log {prefix}/access.log ranges;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    default_type application/vnd.ipld.car;
    server {{
        listen 127.0.0.1:{port};
        location /piece/ {{ alias {pieces}/; }}
    }}
}}
"""


class Nginx:
    def __init__(self, prefix: Path, pieces: Path):
        self.prefix, self.pieces = prefix, pieces
        self.process: subprocess.Popen | None = None
        self.base = ""

    def start(self) -> "Nginx":
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=port, pieces=self.pieces))
        self.process = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(self.prefix), "-e", str(self.prefix / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: nginx exited: {(self.prefix / 'error.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.base + "/", timeout=2).close()
            except urllib.error.HTTPError:
                return True  # 404: it answers
            except OSError:
                return False
            return True

        wait_for(up, 20, "nginx")
        return self

    def stop(self) -> None:
        stop(self.process, signal.SIGQUIT, 20)


# ---------------------------------------------------------------- clients


def curl(url: str, size: int) -> dict:
    """One `curl -s -o /dev/null` of url: MB/s, seconds, time to first byte, curl's CPU s."""
    client = children_cpu()
    done = subprocess.run(
        ["curl", "-s", "-S", "-o", "/dev/null", "--max-time", "600",
         "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}", url],
        capture_output=True, text=True, timeout=660,
    )
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 4 or fields[0] != "200" or int(fields[1]) != size:
        raise SystemExit(f"bench: curl {url} failed ({done.returncode}): {done.stdout} {done.stderr.strip()}")
    seconds = float(fields[3])
    return {"mbps": size / seconds / 1e6, "seconds": seconds, "ttfb": float(fields[2]), "client": children_cpu() - client}


def aria2c(url: str, size: int, directory: Path, expected: Path | None) -> dict:
    """`aria2c -x 4 -s 4 -k 1M` of url into directory: MB/s, seconds, aria2c's CPU s; the file is then
    compared with `expected` (outside the timing)."""
    target = directory / "aria2c.car"
    for p in (target, directory / "aria2c.car.aria2"):
        p.unlink(missing_ok=True)
    client = children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        ["aria2c", "-x", "4", "-s", "4", "-k", "1M", "--file-allocation=none", "-d", str(directory), "-o", target.name,
         "--allow-overwrite=true", "--auto-file-renaming=false", "--summary-interval=0", "--console-log-level=error",
         "--download-result=hide", "-q", "--max-tries=1", "--timeout=120", url],
        capture_output=True, text=True, timeout=900,
    )
    seconds = time.perf_counter() - start
    client = children_cpu() - client
    if done.returncode != 0 or not target.exists() or target.stat().st_size != size:
        raise SystemExit(f"bench: aria2c {url} failed ({done.returncode}): {done.stdout} {done.stderr}")
    try:
        if expected is not None:
            same = subprocess.run(["cmp", "-s", str(target), str(expected)], timeout=600).returncode == 0
            if not same:
                raise SystemExit(f"bench: aria2c's download of {url} differs from {expected}")
    finally:
        target.unlink(missing_ok=True)
    return {"mbps": size / seconds / 1e6, "seconds": seconds, "client": client}


def random_ranges(base: str, path: str, size: int, clients: int, per_client: int, seed: int = 1):
    """`clients` threads, each with one keep-alive connection, GET `per_client` random RANGE-byte
    ranges; returns (bytes, seconds, [latency s of each request])."""
    host, port = base.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: list[str] = []
    total = [0]
    lock = threading.Lock()

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        buffer = bytearray(RANGE)
        try:
            for _ in range(per_client):
                start = rng.randrange(0, size - RANGE)
                t = time.perf_counter()
                connection.request("GET", path, headers={"Range": f"bytes={start}-{start + RANGE - 1}"})
                response = connection.getresponse()
                got, view = 0, memoryview(buffer)
                while got < RANGE:
                    n = response.readinto(view[got:])
                    if not n:
                        break
                    got += n
                response.read()
                if response.status != 206 or got != RANGE:
                    raise OSError(f"status {response.status}, {got} bytes of {RANGE}")
                with lock:
                    latencies.append(time.perf_counter() - t)
                    total[0] += got
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {number}: {type(exc).__name__}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit("bench: random range reads failed: " + "; ".join(errors[:4]))
    return total[0], seconds, latencies


class Sampler:
    """Polls the summed Pss and RSS of a process and its children every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self.pid, *children(self.pid)]
            self.peak_pss = max(self.peak_pss, sum(pss_kib(p) for p in pids))
            self.peak_rss = max(self.peak_rss, sum(proc_kib(p, "VmRSS") for p in pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------- the run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py serve")
    parser.add_argument("--size", default="1GiB", help="the source file (one bin of about this size; default 1GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (reuses its source, state and CAR)")
    parser.add_argument("--packerfs-cmd", metavar="CMD", help="the packerfs command line to run (default: this "
                        "python -m packerfs.cli), e.g. \"python launcher.py\" with a patch to try")
    args = parser.parse_args(argv)
    if args.packerfs_cmd:
        import shlex

        global PACKERFS
        PACKERFS = shlex.split(args.packerfs_cmd)
    for tool in ("curl", "aria2c", "dd", "cmp", "fusermount3", NGINX):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed")
    size = parse_size(args.size)
    bin_size = -(-(size + max(size // 16, 4 * MiB)) // MiB) * MiB
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="packerfs-bench-serve-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    src, state, out, pieces, mnt = work / "src", work / "state", work / "out", work / "pieces", work / "mnt"
    data = src / "data.bin"
    for d in (pieces, mnt):
        d.mkdir(exist_ok=True)
    shm = Path("/dev/shm")
    downloads = Path(tempfile.mkdtemp(prefix="packerfs-bench-serve-", dir=shm if shutil.disk_usage(shm).free > 3 * size else work))
    gateway: Gateway | None = None
    mount: Mount | None = None
    nginx: Nginx | None = None
    try:
        if not data.exists() or data.stat().st_size != size:
            print(f"writing a {size / 2**30:.2f} GiB source file …", file=sys.stderr)
            make_source(data, size)
        key = work / "key.txt"
        if not key.exists():
            sys.path.insert(0, str(ROOT))
            from packerfs.crypt import write_age_identity

            write_age_identity(key)
        recipient = next(line.split(":", 1)[1].strip() for line in key.read_text().splitlines() if "public key" in line)
        options = ["--bin-size", str(bin_size), "-r", recipient]

        # pack: the CAR on disk (for nginx and to check the downloads), and every bin sealed in the state
        pack_seconds = None
        if not (out / "manifest.csv").exists():
            warm(data)
            start = time.perf_counter()
            subprocess.run([*PACKERFS, "pack", str(src), str(out), "-t", str(state), *options],
                           cwd=ROOT, check=True, capture_output=True, timeout=1800)
            pack_seconds = time.perf_counter() - start
        with open(out / "manifest.csv", newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("status", "current") in ("current", "")]
        if not rows:
            raise SystemExit("bench: pack wrote no bin")
        row = rows[0]
        car = out / row["car_file"]
        car_size = car.stat().st_size
        if int(row["car_size"]) != car_size:
            raise SystemExit(f"bench: {car} is {car_size} bytes, the manifest says {row['car_size']}")
        piece = row["piece_cid"]
        link = pieces / piece
        if not link.exists():
            try:
                os.link(car, link)
            except OSError:
                link.symlink_to(car)
        path = f"/piece/{piece}"

        nginx = Nginx(work / "nginx", pieces).start()
        warm(car)

        def serve(name: str) -> Gateway:
            nonlocal gateway
            gateway = Gateway(work, src, state, options, name).start()
            return gateway

        def stop_gateway() -> None:
            nonlocal gateway
            if gateway is not None:
                gateway.stop()
                gateway = None

        def run_gateway_curl(run: int) -> dict:
            g = serve(f"serve-curl-{run}")
            try:
                before = cpu(g.pid)
                result = curl(g.base + path, car_size)
                after = cpu(g.pid)
            finally:
                stop_gateway()
            return {**result, **dict(zip(("own", "workers", "wait"), cpu_split(g.pid, before, after)))}

        def run_mount(run: int) -> dict:
            nonlocal mount
            mount = Mount(src, mnt, state, options).start()
            try:
                target = mnt / car.name
                if target.stat().st_size != car_size:
                    raise SystemExit(f"bench: {target} is {target.stat().st_size} bytes, the CAR {car_size}")
                drop_cache(target)
                pid = mount.pid
                before, client = cpu(pid), children_cpu()
                start = time.perf_counter()
                done = subprocess.run(["dd", f"if={target}", "of=/dev/null", "bs=1M"], capture_output=True, text=True,
                                      timeout=900)
                seconds = time.perf_counter() - start
                if done.returncode != 0 or int(done.stderr.strip().splitlines()[-1].split()[0]) != car_size:
                    raise SystemExit(f"bench: dd of {target} failed: {done.stderr.strip()}")
                after, client = cpu(pid), children_cpu() - client
            finally:
                mount.stop()
                mount = None
            return {"mbps": car_size / seconds / 1e6, "seconds": seconds, "client": client,
                    **dict(zip(("own", "workers", "wait"), cpu_split(pid, before, after)))}

        def run_nginx_curl(run: int) -> dict:
            warm(car)
            return curl(nginx.base + path, car_size)

        def run_gateway_aria2c(run: int) -> dict:
            g = serve(f"serve-aria2c-{run}")
            try:
                before = cpu(g.pid)
                result = aria2c(g.base + path, car_size, downloads, car)
                after = cpu(g.pid)  # after the cmp too: the gateway is idle then, or should be
            finally:
                stop_gateway()
            return {**result, **dict(zip(("own", "workers", "wait"), cpu_split(g.pid, before, after)))}

        def run_nginx_aria2c(run: int) -> dict:
            warm(car)
            return aria2c(nginx.base + path, car_size, downloads, None)

        cases = {
            "gateway, curl": run_gateway_curl,
            "mount, dd bs=1M": run_mount,
            "nginx, curl": run_nginx_curl,
            "gateway, aria2c -x4 -s4": run_gateway_aria2c,
            "nginx, aria2c -x4 -s4": run_nginx_aria2c,
        }
        results: dict[str, list[dict]] = {name: [] for name in cases}
        for run in range(args.runs):
            for name, case in cases.items():
                warm(data)
                results[name].append(case(run + 1))
                print(f"run {run + 1}: {name}: {results[name][-1]['mbps']:.0f} MB/s", file=sys.stderr)

        # 4. peak RSS under 16 clients of random 4 MiB ranges, on a fresh gateway
        warm(data)
        g = serve("serve-ranges")
        try:
            pids = [g.pid, *children(g.pid)]
            baseline = {p: proc_kib(p, "VmRSS") for p in pids}
            per_client = max(4, car_size // RANGE // CLIENTS)
            before = cpu(g.pid)
            with Sampler(g.pid) as sampler:
                got, seconds, latencies = random_ranges(g.base, path, car_size, CLIENTS, per_client)
            own, workers, wait = cpu_split(g.pid, before, cpu(g.pid))
            hwm = {p: proc_kib(p, "VmHWM") for p in pids}
            ranges = {
                "pids": pids, "baseline": baseline, "hwm": hwm, "peak_pss": sampler.peak_pss,
                "peak_rss": sampler.peak_rss, "bytes": got, "seconds": seconds, "latencies": sorted(latencies),
                "own": own, "workers": workers, "wait": wait, "per_client": per_client,
            }
        finally:
            stop_gateway()

        print()
        print(f"parameters: source 1 file of {size / 2**30:.2f} GiB, age (X25519), --bin-size {bin_size / MiB:.0f} MiB "
              f"-> {car.name} {car_size} bytes ({car_size / 2**30:.3f} GiB), piece {piece}")
        if args.packerfs_cmd:
            print(f"            packerfs command: {args.packerfs_cmd}")
        print(f"            {args.runs} runs, interleaved; gateway and mount restarted for every run (no cache of an "
              f"earlier run), source file warm; aria2c writes to {downloads.parent}; {load_note()}")
        if pack_seconds is not None:
            print(f"pack (writes the CAR, seals the bin): {pack_seconds:.1f} s, {size / pack_seconds / 1e6:.0f} MB/s")
        report(results, ranges, car_size)
    finally:
        if gateway is not None:
            gateway.stop()
        if mount is not None:
            mount.stop()
        elif mounted(mnt):
            Mount(src, mnt, state, []).stop()
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(downloads, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def ceiling(run: dict, size: int, cores: int) -> float:
    """MB/s this run's CPU costs allow on `cores` idle CPUs: all processes' CPU shares the cores, and no
    process (a worker serves its windows one after another) goes faster than one core."""
    gib = size / 2**30
    total = (run["own"] + sum(run["workers"]) + run["client"]) / gib
    busiest = max(run["own"], *run["workers"]) / gib
    return min(cores / total, 1 / busiest) * 2**30 / 1e6


def report(results: dict[str, list[dict]], ranges: dict, car_size: int) -> None:
    best = {name: max(r["mbps"] for r in runs) for name, runs in results.items()}
    median = {name: statistics.median(r["mbps"] for r in runs) for name, runs in results.items()}
    gib = car_size / 2**30
    print()
    print(f"one {gib:.3f} GiB piece, best (median) of {len(next(iter(results.values())))} runs")
    print(f"{'':26} {'MB/s':>15}   per GiB served, best run: CPU s of the server process + each worker;")
    print(f"{'':26} {'':15}   the client's CPU s; s the server's processes waited for a CPU (run queue)")
    for name, runs in results.items():
        fastest = max(runs, key=lambda r: r["mbps"])
        split = f"{'':22}"
        if "own" in fastest:
            split = f"{fastest['own'] / gib:.2f} + " + " + ".join(f"{w / gib:.2f}" for w in fastest["workers"])
            split = f"{split:22}"
        wait = f"   wait {fastest['wait'] / gib:5.2f}" if "wait" in fastest else ""
        print(f"{name:26} {best[name]:7.0f} ({median[name]:5.0f})   {split} client {fastest['client'] / gib:.2f}{wait}")
    print()
    cores = os.cpu_count() or 1
    ceilings = {}
    for name, runs in results.items():
        if "own" in runs[0]:
            ceilings[name] = statistics.median(ceiling(r, car_size, cores) for r in runs)
    print(f"CPU-bound ceilings on {cores} CPUs (median of the runs): min({cores} / (server + client CPU s per GiB), "
          f"1 / the busiest process's): " + ", ".join(f"{name} {c:.0f} MB/s" for name, c in ceilings.items()))
    print()

    def verdict(value: float, goal: float | None) -> str:
        return "" if goal is None else f"   (goal >= {goal})  {'ok' if value >= goal else 'MISSED'}"

    r1 = best["gateway, curl"] / best["mount, dd bs=1M"]
    r2 = best["gateway, curl"] / best["nginx, curl"]
    r3 = best["gateway, aria2c -x4 -s4"] / best["gateway, curl"]
    r3n = best["nginx, aria2c -x4 -s4"] / best["nginx, curl"]
    print(f"1. gateway curl / mount dd:            {r1:.2f}{verdict(r1, TARGET_MOUNT_RATIO)}")
    print(f"2. gateway curl / nginx curl (warm):   {r2:.3f}   (the static piece host anchor)")
    print(f"3. gateway aria2c -x4 / gateway curl:  {r3:.2f}{verdict(r3, TARGET_ARIA_RATIO)}"
          f"   (nginx aria2c -x4 / nginx curl: {r3n:.2f}; CPU-bound ceilings' ratio "
          f"{ceilings['gateway, aria2c -x4 -s4'] / ceilings['gateway, curl']:.2f})")
    ttfb = [r["ttfb"] for r in results["gateway, curl"]]
    nttfb = [r["ttfb"] for r in results["nginx, curl"]]
    print(f"4. time to first byte, fresh gateway, sealed bin: best {min(ttfb) * 1e3:.1f} ms, "
          f"median {statistics.median(ttfb) * 1e3:.1f} ms   (nginx: {min(nttfb) * 1e3:.2f} ms)")
    lat = ranges["latencies"]
    n = len(lat)
    main_pid, *workers = ranges["pids"]
    print(f"   {CLIENTS} clients x {ranges['per_client']} random 4 MiB ranges: {ranges['bytes'] / ranges['seconds'] / 1e6:.0f} MB/s "
          f"total, latency median {lat[n // 2] * 1e3:.0f} ms, p95 {lat[min(n - 1, int(n * 0.95))] * 1e3:.0f} ms, "
          f"max {lat[-1] * 1e3:.0f} ms")
    served = ranges["bytes"] / 2**30
    print(f"   CPU s per GiB served: {ranges['own'] / served:.2f} + "
          + " + ".join(f"{w / served:.2f}" for w in ranges["workers"])
          + f"; waited for a CPU: {ranges['wait'] / served:.2f} s per GiB")
    mb = 1024
    print(f"   peak RSS (VmHWM): gateway process {ranges['hwm'][main_pid] / mb:.0f} MiB (before the load: "
          f"{ranges['baseline'][main_pid] / mb:.0f}), workers "
          + ", ".join(f"{ranges['hwm'][p] / mb:.0f} MiB" for p in workers)
          + f"; sum over the tree {sum(ranges['hwm'].values()) / mb:.0f} MiB, max {max(ranges['hwm'].values()) / mb:.0f} MiB")
    print(f"   peak of the tree's summed Pss (sampled every 0.1 s): {ranges['peak_pss'] / mb:.0f} MiB; "
          f"of its summed VmRSS: {ranges['peak_rss'] / mb:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
