"""`packerfs commp` and `packerfs keygen`: small standalone tools."""

from __future__ import annotations

import argparse
import json
import os
import sys

from packerfs.commands.options import EPILOG
from packerfs.errors import PackerfsError, UsageError
from packerfs.progress import progress


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


def register(commands) -> None:
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
