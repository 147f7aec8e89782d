"""What the scale runs of tools/scale.py share: sizes, the packerfs command, age keys, disk checks.

Nothing here imports packerfs: the runs drive it only through its command line, so that they
keep working while its internals change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": TiB, "tib": TiB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
# packerfs's --bin-size presets (README, "Deal-size sanity"); bin sizes are passed to packerfs as typed.
BIN_PRESETS = {"32gib-sector": 34_091_302_912, "64gib-sector": 68_182_605_824, "pdp": 1_065_353_216}


def default_cache_dir() -> Path:
    """Where trees, state and mount points go: $PACKERFS_SCALE_DIR, else /work/scale-cache (on a disk, not tmpfs)."""
    if os.environ.get("PACKERFS_SCALE_DIR"):
        return Path(os.environ["PACKERFS_SCALE_DIR"])
    return Path("/work/scale-cache") if Path("/work").is_dir() else Path("/var/tmp/packerfs-scale")


def parse_size(text: str) -> int:
    """`1TiB`, `200GiB`, `8KiB`, `1.5GiB`, `4096`, or a bin-size preset -> bytes."""
    if text.strip().lower() in BIN_PRESETS:
        return BIN_PRESETS[text.strip().lower()]
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"cannot read size {text!r}: use bytes or a unit such as 8KiB, 256MiB, 1TiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def parse_size_range(text: str) -> tuple[int, int]:
    """`0-8KiB` -> (0, 8192); `4KiB` -> (4096, 4096)."""
    low, _, high = text.partition("-")
    low_bytes = parse_size(low)
    high_bytes = parse_size(high) if high else low_bytes
    if high_bytes < low_bytes:
        raise ValueError(f"size range {text!r} runs backwards")
    return low_bytes, high_bytes


def size_type(text: str) -> int:
    """argparse type for sizes (turns ValueError into a usage error)."""
    import argparse

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def packerfs_command() -> list[str]:
    """The packerfs entry point of this checkout's venv, else `python -m packerfs.cli`."""
    script = ROOT / ".venv" / "bin" / "packerfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "packerfs.cli"]


def make_age_recipient(directory: Path) -> str:
    """Generate an age identity with `age-keygen` in `directory`; return its age1… recipient."""
    key = directory / "age-key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True, timeout=30)
    for line in key.read_text().splitlines():
        if line.startswith("# public key: "):
            return line.split(": ", 1)[1].strip()
    raise RuntimeError(f"no public key line in {key}")


def cipher_options(no_encryption: bool, directory: Path) -> tuple[list[str], str]:
    """packerfs options choosing the cipher, and its name for the report."""
    if no_encryption:
        return ["--no-encryption"], "none"
    return ["-r", make_age_recipient(directory)], "age"


def rejected_option(stderr: str, option: str) -> bool:
    """Whether argparse refused `option` (e.g. a flag another change has not landed yet)."""
    return "unrecognized arguments" in stderr and option in stderr


def check_free_space(path: Path, need: int, what: str) -> int:
    """Free bytes on path's file system; exits if fewer than `need` (what the run will write)."""
    free = shutil.disk_usage(path).free
    print(f"disk: {free / GiB:.1f} GiB free on {path}; {what} needs about {need / GiB:.2f} GiB")
    if free < need:
        raise SystemExit(f"scale: not enough free space on {path}: {free / GiB:.1f} GiB free, need {need / GiB:.2f} GiB")
    return free


def disk_bytes(path: Path, suffix: str = "") -> tuple[int, int]:
    """(apparent size, allocated bytes) of the files under path whose names end in suffix."""
    apparent = allocated = 0
    for root, _, names in os.walk(path):
        for name in names:
            if name.endswith(suffix):
                st = os.lstat(os.path.join(root, name))
                apparent += st.st_size
                allocated += st.st_blocks * 512
    return apparent, allocated


def call_with_timeout(function: Callable[[], object], timeout: float) -> object:
    """function() in a daemon thread; TimeoutError if it has not returned in `timeout` s.

    For reads through a FUSE mount, which block for as long as the daemon does: the thread is
    abandoned, and the unmount (lazy if needed) or killing the daemon releases it later."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def workers_note(workers: int | None) -> str:
    """What decides packerfs's worker count in this run, for the header line."""
    if workers is not None:
        return f"--workers {workers}"
    configured = os.environ.get("PACKERFS_WORKERS")
    return f"workers: packerfs's default (PACKERFS_WORKERS={configured})" if configured else (
        f"workers: packerfs's default ({os.cpu_count()} cores, PACKERFS_WORKERS unset)"
    )


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def mib(n: float) -> str:
    return f"{n / MiB:,.1f}"


def print_processes(processes: list[dict]) -> None:
    """The per-process table both runs end with (TreeSampler.per_process())."""
    print(f"{'pid':>7} {'ppid':>7} {'peak RSS':>9} {'CPU s':>7} {'read GiB':>9}  command")
    for p in processes:
        print(
            f"{p['pid']:7d} {p['ppid'] or 0:7d} {p['peak_rss_mib']:9.1f} {p['cpu_s']:7.1f} "
            f"{p['read_bytes'] / GiB:9.2f}  {p['command']}"
        )


def shell_line(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
