#!/usr/bin/env python3
"""Seekable zstd (packerfs.compress): zstandard vs pyzstd vs the zstd CLI, in one run.

On a generated text-heavy corpus (CSV, JSON lines, logs; deterministic), prints:
  - compression MB/s at levels 3 and 19, framed as packerfs frames them (independent 1 MiB
    frames, pinned parameters) with each library, against `zstd -T1 -3` / `-19` on the file;
  - decompression MB/s; compressed size ÷ plaintext, per frame size;
  - random 128 KiB reads: plain pread vs PlaintextView (unpack) vs CompressedView (pack).

    .venv/bin/python tools/bench_compress.py [--mib 32] [--reads 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from packerfs.compress import CompressedView, PlaintextView, compress_file  # noqa: E402
from packerfs.compress.zstd import _pinned  # noqa: E402

MIB = 1 << 20


def corpus(size: int, seed: int = 14) -> bytes:
    """CSV, JSON lines and log lines in 256 KiB runs, like a data set's tables and logs."""
    rnd = random.Random(seed)
    words = [w for w in "alpha beta gamma delta sensor region north south east west ok error warn info debug "
             "user order payment invoice shipped pending cancelled retry timeout connected".split()]
    out = bytearray()
    kind = 0
    t = 1_700_000_000
    while len(out) < size:
        run = bytearray()
        while len(run) < 256 << 10:
            if kind == 0:
                run += b"%d,%s,%.4f,%.4f,%d,%s\n" % (
                    rnd.randrange(10**9), rnd.choice(words).encode(), rnd.uniform(-90, 90), rnd.uniform(-180, 180),
                    rnd.randrange(1000), rnd.choice(words).encode())
            elif kind == 1:
                run += json.dumps({"id": rnd.randrange(10**7), "user": f"u{rnd.randrange(5000)}",
                                   "status": rnd.choice(words), "amount": round(rnd.uniform(0, 999), 2),
                                   "tags": rnd.sample(words, 3)}).encode() + b"\n"
            else:
                t += rnd.randrange(3)
                run += b"2024-05-%02d %s [%s] %s: request %08x took %d ms\n" % (
                    1 + t % 28, time.strftime("%H:%M:%S", time.gmtime(t)).encode(), rnd.choice(words).upper().encode(),
                    rnd.choice(words).encode(), rnd.getrandbits(32), rnd.randrange(2000))
        out += run
        kind = (kind + 1) % 3
    return bytes(out[:size])


def frames(data: bytes, frame_size: int):
    return [data[o : o + frame_size] for o in range(0, len(data), frame_size)]


def timed(fn, *args):
    t = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t


def zstandard_codec(level: int, frame_size: int):
    import zstandard

    from packerfs.compress.zstd import compression_params

    c = zstandard.ZstdCompressor(compression_params=compression_params(level, frame_size))
    d = zstandard.ZstdDecompressor()
    return c.compress, d.decompress


def pyzstd_codec(level: int, frame_size: int):
    import pyzstd

    w, c, h, s, m, t, st = _pinned(level, frame_size)
    P = pyzstd.CParameter
    opts = {P.compressionLevel: level, P.windowLog: w, P.chainLog: c, P.hashLog: h, P.searchLog: s, P.minMatch: m,
            P.targetLength: t, P.strategy: st, P.contentSizeFlag: 1, P.checksumFlag: 1, P.dictIDFlag: 0,
            P.enableLongDistanceMatching: 0, P.nbWorkers: 0}
    return (lambda b: pyzstd.compress(b, opts)), pyzstd.decompress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=32, help="corpus size in MiB (default 32)")
    ap.add_argument("--reads", type=int, default=200, help="random 128 KiB reads per view (default 200)")
    ap.add_argument("--slow-mib", type=int, default=8, help="MiB compressed at level 19 (default 8)")
    args = ap.parse_args()
    size = args.mib * MIB
    data = corpus(size)
    mb = size / 1e6
    tmp = tempfile.mkdtemp(prefix="bench-compress-")
    try:
        src = os.path.join(tmp, "corpus.txt")
        with open(src, "wb") as f:
            f.write(data)
        versions = []
        import zstandard
        versions.append(f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})")
        libs = {"zstandard": zstandard_codec}
        try:
            import pyzstd
            versions.append(f"pyzstd {pyzstd.__version__} (libzstd {pyzstd.zstd_version})")
            libs["pyzstd"] = pyzstd_codec
        except ImportError:
            versions.append("pyzstd not installed")
        cli = shutil.which("zstd")
        if cli:
            versions.append(subprocess.run([cli, "--version"], capture_output=True, text=True).stdout.strip())
        print(f"corpus: {args.mib} MiB of CSV/JSON/log text; " + "; ".join(versions))
        print(f"{'compressor':34} {'level':>5} {'comp MB/s':>10} {'decomp MB/s':>12} {'size ratio':>11}")
        for level in (3, 19):
            ref = None
            part = data if level < 10 else data[: args.slow_mib * MIB]  # level 19 runs at ~5 MB/s
            mb = len(part) / 1e6
            if len(part) < size:
                print(f"(level {level}: on the first {len(part) >> 20} MiB)")
            with open(src + ".part", "wb") as f:
                f.write(part)
            for name, make in libs.items():
                comp, decomp = make(level, MIB)
                chunks = frames(part, MIB)
                out, tc = timed(lambda: [comp(b) for b in chunks])
                back, td = timed(lambda: [decomp(b) for b in out])
                assert b"".join(back) == part
                if ref is None:
                    ref = out
                same = "" if out == ref else "  (bytes differ from zstandard)"
                total = sum(map(len, out))
                print(f"{name + ' (1 MiB frames)':34} {level:>5} {mb / tc:>10.1f} {mb / td:>12.1f} {total / len(part):>11.4f}{same}")
            if cli:
                dst = os.path.join(tmp, "cli.zst")
                _, tc = timed(subprocess.run, [cli, "-q", "-f", "-T1", f"-{level}", src + ".part", "-o", dst])
                _, td = timed(subprocess.run, [cli, "-q", "-d", "-f", dst, "-o", os.path.join(tmp, "back")])
                print(f"{'zstd -T1 -' + str(level) + ' (one stream)':34} {level:>5} {mb / tc:>10.1f} {mb / td:>12.1f} "
                      f"{os.path.getsize(dst) / len(part):>11.4f}")
        print("size ratio by frame size (level 3, packerfs framing):", end="")
        for fs in (256 << 10, MIB, 2 * MIB, 4 * MIB):
            comp, _ = zstandard_codec(3, fs)
            print(f"  {fs // 1024} KiB {sum(len(comp(b)) for b in frames(data, fs)) / size:.4f}", end="")
        print()

        # random 128 KiB reads
        rnd = random.Random(1)
        piece = 128 << 10
        print(f"random {piece >> 10} KiB reads ({args.reads} each), ms per read:")
        fd = os.open(src, os.O_RDONLY)
        try:
            def pread_src(o, n):
                return os.pread(fd, n, o)

            offsets = [rnd.randrange(0, size - piece) for _ in range(args.reads)]
            _, tp = timed(lambda: [pread_src(o, piece) for o in offsets])
            print(f"  plain pread of the file                    {1000 * tp / args.reads:8.3f}")
            for level in (3, 19):
                # level 19: a file of the first --slow-mib MiB, and few pack-side reads (~0.3 s each)
                fsize = size if level < 10 else min(size, args.slow_mib * MIB)
                offs = [o % (fsize - piece) for o in offsets]
                n_pack = max(10, args.reads // 10) if level < 10 else 5
                for fs in (MIB, 4 * MIB):
                    blobs = []
                    table = compress_file(pread_src, fsize, level, fs, sink=blobs.append)
                    zpath = os.path.join(tmp, f"c{level}-{fs}.zst")
                    with open(zpath, "wb") as f:
                        for b in blobs:
                            f.write(b)
                    del blobs
                    zfd = os.open(zpath, os.O_RDONLY)
                    try:
                        pv = PlaintextView(lambda o, n: os.pread(zfd, n, o), table)
                        _, t1 = timed(lambda: [pv.read(o, piece) for o in offs])
                        coffs = [rnd.randrange(0, table.compressed_size - piece) for _ in range(n_pack)]
                        cv = CompressedView(pread_src, fsize, table, level)
                        got, t2 = timed(lambda: [cv.read(o, piece) for o in coffs])
                        assert got[0] == os.pread(zfd, piece, coffs[0])
                    finally:
                        os.close(zfd)
                    print(f"  level {level:2} {fs >> 20} MiB frames: PlaintextView (unpack) {1000 * t1 / len(offs):8.3f}"
                          f"   CompressedView (pack) {1000 * t2 / len(coffs):8.3f}   table {len(table.to_bytes())} B"
                          f" for {table.frame_count} frames")
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
