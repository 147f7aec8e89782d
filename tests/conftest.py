import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "vectors"


def load_vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def counter_stream(start_byte: int, length: int) -> bytes:
    """Bytes [start_byte, start_byte+length) of the vectors' sha256 counter stream."""
    first = start_byte // 32
    last = math.ceil((start_byte + length) / 32)
    blob = b"".join(hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(first, last))
    skip = start_byte - first * 32
    return blob[skip : skip + length]


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
