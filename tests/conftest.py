import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The object-store servers' fixtures (s3_server, azure_server, gcs_server, s3_proxy, …) and a real Dask
# cluster (dask_scheduler), for every test module.
pytest_plugins = ["objstores", "dask_cluster"]
VECTORS = Path(__file__).resolve().parent / "vectors"
# Seal in one process unless a test asks for workers: a LocalCluster per small multi-bin pack would
# cost a second or two each. The parallel paths have their own tests (test_parallel.py).
os.environ.setdefault("PACKERFS_WORKERS", "1")


def load_vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def counter_stream(start_byte: int, length: int) -> bytes:
    """Bytes [start_byte, start_byte+length) of the vectors' sha256 counter stream."""
    first = start_byte // 32
    last = math.ceil((start_byte + length) / 32)
    blob = b"".join(hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(first, last))
    skip = start_byte - first * 32
    return blob[skip : skip + length]


class Bytes:
    """RandomAccess (packerfs.crypt.base) over an in-memory bytes object."""

    def __init__(self, data: bytes):
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


def find_tool(name: str) -> str | None:
    local = ROOT / "node_modules" / ".bin" / name
    if local.exists():
        return str(local)
    return shutil.which(name)


@pytest.fixture(scope="session")
def ipfs_car():
    tool = find_tool("ipfs-car")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("ipfs-car is not installed; ./run setup installs it")
        pytest.skip("ipfs-car not installed (./run setup installs it)")
    return tool


def run_tool(*args, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("timeout", 300)
    return subprocess.run([str(a) for a in args], **kwargs)


PACKERFS = [os.environ.get("PACKERFS_PYTHON", __import__("sys").executable), "-m", "packerfs.cli"]


def packerfs(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the packerfs CLI as a user would, in a subprocess."""
    kwargs.setdefault("cwd", ROOT)
    result = run_tool(*PACKERFS, *args, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"packerfs {' '.join(map(str, args))} exited {result.returncode}: {result.stderr.decode()}")
    return result


def stop_process(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; its stdout pipe closed (a server started by a test)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def write_random(path: Path, size: int, seed: int) -> bytes:
    import random

    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def make_small_tree(root: Path) -> Path:
    """A small tree that still forces splits and several bins at 4 MiB."""
    MiB = 1 << 20
    write_random(root / "a.txt", 12, 1)
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir(parents=True)
    write_random(root / "sub" / "big.bin", 9 * MiB + 7, 2)
    write_random(root / "sub" / "exact-mib", MiB, 3)
    write_random(root / "sub" / "mib-minus", MiB - 1, 4)
    write_random(root / "sub" / "mib-plus", MiB + 1, 5)
    write_random(root / "sub" / "deeper" / "tiny", 1, 6)
    for i in range(20):
        write_random(root / "many" / f"f{i:02d}", 1000 * i, 100 + i)
    os.symlink("../a.txt", root / "sub" / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    return root


@pytest.fixture(scope="session")
def gpg_rsa_key(tmp_path_factory):
    """RSA-4096 primary with an RSA-4096 [E] subkey, in its own gpg home."""
    from gpgkeys import GPG, kill_agent, make_key, new_home

    if GPG is None:
        pytest.fail("gpg is not installed; ./run setup installs it")
    home = new_home(tmp_path_factory, "gpg-rsa")
    fpr, sub = make_key(home, "RSA Test <rsa@packerfs.test>", "rsa4096", "rsa4096")
    yield {"home": home, "fpr": fpr, "sub": sub, "uid": "rsa@packerfs.test"}
    kill_agent(home)


@pytest.fixture(scope="session")
def gpg_ed_key(tmp_path_factory):
    """ed25519 primary with a cv25519 [E] subkey."""
    from gpgkeys import GPG, kill_agent, make_key, new_home

    if GPG is None:
        pytest.fail("gpg is not installed; ./run setup installs it")
    home = new_home(tmp_path_factory, "gpg-ed")
    fpr, sub = make_key(home, "Ed Test <ed@packerfs.test>", "ed25519", "cv25519")
    yield {"home": home, "fpr": fpr, "sub": sub, "uid": "ed@packerfs.test"}
    kill_agent(home)


@pytest.fixture(scope="session")
def ssh_rsa_key(tmp_path_factory) -> Path:
    """An unencrypted OpenSSH RSA-4096 key pair (path; path.pub beside it)."""
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen is not installed; ./run setup installs openssh-client")
    path = tmp_path_factory.mktemp("ssh-rsa") / "id_rsa"
    run_tool("ssh-keygen", "-q", "-t", "rsa", "-b", "4096", "-N", "", "-C", "test@packerfs", "-f", path, check=True)
    return path


def within(seconds: float, fn, *args):
    """Run fn(*args) in a daemon thread: its result, or TimeoutError if it hangs (a mount that does not answer)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def pytest_runtest_setup(item):
    """Every test marked `fuse` needs /dev/fuse and fusermount3: in CI their absence fails, elsewhere skips."""
    if item.get_closest_marker("fuse") is None:
        return
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        if os.environ.get("CI"):
            pytest.fail("FUSE is not available (/dev/fuse, fusermount3); ./run setup installs fuse3")
        pytest.skip("FUSE is not available (/dev/fuse, fusermount3)")
