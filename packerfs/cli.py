"""The `packerfs` command line.

Every command prints one-line errors (`packerfs: error: …`) and uses the exit
codes in packerfs.errors; `--json` prints machine-readable results on stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from packerfs import __version__
from packerfs.errors import EXIT_ERROR, PackerfsError, UsageError
from packerfs.progress import progress

EPILOG = """\
exit codes: 0 success, 1 failure (nothing left half-written), 2 usage error,
3 finished but incomplete (missing or damaged inputs are listed)."""


def cmd_commp(args: argparse.Namespace) -> int:
    from packerfs.piece import commp_file

    results = []
    for path in args.files:
        size = _file_size(path)
        with progress(os.path.basename(path), size) as advance:
            info = commp_file(path, progress=advance)
        results.append(
            {
                "file": path,
                "piece_cid": info.piece_cid,
                "piece_cid_v2": info.piece_cid_v2,
                "piece_size": info.piece_size,
                "payload_size": info.payload_size,
            }
        )
        if not args.json:
            print(f"{path}")
            print(f"  CommP CID:    {info.piece_cid}")
            print(f"  Piece CID v2: {info.piece_cid_v2}")
            print(f"  Piece size:   {info.piece_size}")
            print(f"  Payload size: {info.payload_size}")
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    return 0


def _file_size(path: str) -> int:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PackerfsError(f"{path}: cannot read: {exc.strerror}") from None
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not a regular file")
    return st.st_size


def cmd_keygen(args: argparse.Namespace) -> int:
    from packerfs.crypt import write_age_identity

    recipient = write_age_identity(args.output)
    if args.json:
        print(json.dumps({"identity_file": args.output, "recipient": recipient}))
    else:
        print(f"wrote identity {args.output} (mode 0600); public recipient:", file=sys.stderr)
        print(recipient)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from packerfs.demo import run_demo

    return run_demo(workdir=args.dir, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packerfs",
        description="Package data sets as encrypted, bin-sized CAR files with piece CIDs "
        "for Filecoin deals, and restore them after retrieval.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"packerfs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser(
        "commp",
        help="compute piece CIDs (commP) of files, like `boostx commp`",
        description="Compute the Filecoin piece commitment of each FILE: piece CID v1 "
        "(baga6ea4sea…), piece CID v2 (FRC-0069, bafkzcib…), padded piece size and payload size. "
        "Payloads must be 65 bytes to 64 GiB×127/128.",
        epilog=EPILOG,
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    p.set_defaults(func=cmd_commp)

    p = commands.add_parser(
        "keygen",
        help="write a new age X25519 identity (mode 0600) and print its recipient",
        description="Write a new age identity file readable by `age -d -i FILE`, with mode 0600, "
        "and print the public recipient (age1…) to pass to `pack --recipient`. "
        "Refuses to overwrite an existing file.",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keygen)

    p = commands.add_parser(
        "demo",
        help="run the main job on a small generated data set",
        description="Generate a small data set in a temporary directory and run packerfs on it, "
        "printing each step. Nothing outside the demo directory is touched.",
    )
    p.add_argument("--dir", help="work in DIR instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the demo directory afterwards")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except PackerfsError as exc:
        print(f"packerfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("packerfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # Environment failures (full disk, permissions) are not bugs: one line, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        hint = " (disk full: free space and run again; finished work is kept)" if exc.errno == errno.ENOSPC else ""
        print(f"packerfs: error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
