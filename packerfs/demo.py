"""`packerfs demo`: the main job on a small generated data set, step by step."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from packerfs.piece import commp_file


def _generate(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            n = min(remaining, 1 << 20)
            out.write(rng.randbytes(n))
            remaining -= n


def run_demo(workdir: str | None = None, keep: bool = False) -> int:
    base = workdir or tempfile.mkdtemp(prefix="packerfs-demo-")
    os.makedirs(base, exist_ok=True)
    try:
        sample = os.path.join(base, "sample.bin")
        _generate(sample, 3 * (1 << 20) + 12345, seed=1)
        print(f"demo: generated {sample} ({os.path.getsize(sample)} bytes)")
        print(f"demo: $ packerfs commp {sample}")
        info = commp_file(sample)
        print(f"  CommP CID:    {info.piece_cid}")
        print(f"  Piece CID v2: {info.piece_cid_v2}")
        print(f"  Piece size:   {info.piece_size}")
        print(f"  Payload size: {info.payload_size}")
        print("demo: done")
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0
