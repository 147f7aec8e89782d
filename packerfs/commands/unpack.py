"""`packerfs unpack`, `verify`, `ls` and `snapshots`: commands that read a CAR set."""

from __future__ import annotations

import argparse
import json
import os
import sys

from packerfs.commands.options import (
    CARS_HELP, EPILOG, add_car_location_options, add_carset_options, add_key_options, keyring_from_args,
)
from packerfs.progress import progress


def open_carset_from_args(args: argparse.Namespace, keyring=None):
    from packerfs.unpack.snapshots import open_carset

    from packerfs.commands.options import car_sources

    return open_carset(
        car_sources(args), dataset=args.dataset or None, snapshot=getattr(args, "snapshot", None),
        keyring=keyring if keyring is not None else keyring_from_args(args),
    )


def print_fetched(carset) -> None:
    """For a remote set, one line on stderr: what reading it cost."""
    if getattr(carset, "sources", None) is not None and carset.sources.remote:
        stats = carset.stats()
        print(
            f"fetched {stats['bytes']:,} bytes in {stats['requests']:,} requests from {len(carset.cars)} "
            f"remote CAR{'s' if len(carset.cars) != 1 else ''}", file=sys.stderr,
        )


def print_set_lines(carset, tree, out=None) -> bool:
    """Unusable CARs, lost snapshots and bins, retired bins, warnings: one line each on stderr.
    True if the set is incomplete (exit 3)."""
    from packerfs.unpack.verify import set_lines

    incomplete, notes = set_lines(carset, tree)
    for line in incomplete + notes:
        print(line, file=out or sys.stderr)
    return bool(incomplete)


def cmd_unpack(args: argparse.Namespace) -> int:
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.unpack import restore
    from packerfs.unpack.verify import escape_name, set_lines

    keyring = keyring_from_args(args)
    carset = open_carset_from_args(args, keyring)
    try:
        tree = carset.tree()
        total = sum(e.size for e in tree if e.kind == "file" and e.complete)
        with progress("unpacking", total) as advance:
            report = restore(
                carset, args.output, keyring, force=args.force, progress=advance,
                same_permissions=args.same_permissions,
            )
        incomplete, notes = set_lines(carset, tree)
        print_fetched(carset)
    finally:
        carset.close()
    lines = list(incomplete)
    for e in report.incomplete:
        bins = ", ".join(str(b) for b in e.missing_bins) or "unknown"
        parts = ", ".join(str(p) for p in e.missing_parts)
        lines.append(f"incomplete, not restored: {escape_name(e.path)} (part {parts} of {e.parts} missing; bin {bins})")
    exit_code = EXIT_INCOMPLETE if incomplete or report.exit_code != 0 else 0
    if args.json:
        print(
            json.dumps(
                {
                    "output": os.path.abspath(args.output),
                    "files": report.files,
                    "dirs": report.dirs,
                    "symlinks": report.symlinks,
                    "bytes": report.bytes,
                    "complete": exit_code == 0,
                    "snapshot": tree.snapshot.id if tree.snapshot else None,
                    "missing_bins": report.missing_bins,
                    "retired_bins": list(tree.retired_bins),
                    "incomplete": [os.fsdecode(e.path) for e in report.incomplete],
                    "problems": lines,
                    "notes": notes,
                },
                indent=1,
            )
        )
    else:
        print(report.lines()[0])
        for line in lines + notes:
            print(line, file=sys.stderr)
    return exit_code


def cmd_verify(args: argparse.Namespace) -> int:
    from packerfs.unpack import verify

    carset = open_carset_from_args(args)
    csv_path = args.manifest
    if csv_path is None and args.pieces and "://" not in args.pieces:
        csv_path = args.pieces  # a gateway's pieces, named by the pack's manifest.csv
    if csv_path is None and os.path.isdir(args.cars[0]):
        candidate = os.path.join(args.cars[0], "manifest.csv")
        csv_path = candidate if os.path.exists(candidate) else None
    try:
        size = sum(car.size for car in carset.cars)
        with progress("verifying", size) as advance:
            report = verify(carset, csv_path, progress=advance)
        print_fetched(carset)
    finally:
        carset.close()
    if args.json:
        print(json.dumps({
            "ok": report.ok, "cars": report.cars, "blocks": report.blocks, "snapshot": report.snapshot,
            "problems": report.problems, "missing": report.missing, "notes": report.notes,
            "lost_bins": report.lost_bins, "retired_bins": report.retired_bins,
        }, indent=1))
    else:
        lines = report.lines()
        print(lines[0])
        for line in lines[1:]:
            print(line, file=sys.stderr)
    return report.exit_code


def cmd_ls(args: argparse.Namespace) -> int:
    import base64

    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.unpack import ls
    from packerfs.unpack.verify import escape_name

    carset = open_carset_from_args(args)
    try:
        rows = ls(carset)
        incomplete = print_set_lines(carset, carset.tree())
        print_fetched(carset)
    finally:
        carset.close()
    code = EXIT_INCOMPLETE if incomplete else 0

    def text(raw: bytes) -> str:
        return raw.decode("utf-8", "replace")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    if args.json:
        print(
            json.dumps(
                [
                    {
                        "path": text(r.path),
                        "path_b64": b64(r.path),
                        "kind": r.kind,
                        "size": r.size,
                        "parts": r.parts,
                        "bins": list(r.bins),
                        "complete": r.complete,
                        **({"target": text(r.target), "target_b64": b64(r.target)} if r.kind == "symlink" else {}),
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
        return code
    for r in rows:
        bins = ",".join(str(b) for b in r.bins)
        extra = f" -> {escape_name(r.target)}" if r.kind == "symlink" else ""
        flag = "" if r.complete else "  (incomplete)"
        parts = f"{r.parts} part{'s' if r.parts != 1 else ''}" if r.kind == "file" else ""
        where = f"bin {bins}" if bins else ""  # directories and symlinks are not stored in a bin's leaves
        print(f"{r.kind:7} {r.size:>14,} {parts:>9}  {where:<16} {escape_name(r.path) or '.'}{extra}{flag}")
    return code


def cmd_snapshots(args: argparse.Namespace) -> int:
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.unpack.snapshots import choose, listing

    carset = open_carset_from_args(args)
    try:
        rows = listing(carset)
        chosen, notes, lost = choose(carset)
        problems = list(carset.problems)
    finally:
        carset.close()
    for row in rows:
        row["current"] = chosen is not None and row["id"] == chosen.id
    code = EXIT_INCOMPLETE if problems or lost else 0
    if args.json:
        print(json.dumps({"snapshots": rows, "current": chosen.id if chosen else None,
                          "problems": problems + lost, "notes": notes}, indent=1))
        return code
    if rows:
        print(f"{'id':>4}  {'time':24} {'files':>9} {'bytes':>16}  {'status':10}  {'bins':12} part-1 CID")
    for row in rows:
        status = "complete" if row["complete"] else "incomplete"
        where = ",".join(map(str, row["snapshot_bins"])) or "-"
        mark = " (current)" if row["current"] else ""
        print(f"{row['id']:>4}  {row['time']:24} {row['files']:>9,} {row['bytes']:>16,}  {status:10}  "
              f"{where:12} {row['cid'] or '-'}{mark}")
    for line in problems + lost + notes:
        print(line, file=sys.stderr)
    return code


def register(commands) -> None:
    p = commands.add_parser(
        "unpack",
        help="restore the original tree from retrieved CAR files",
        description="Read the CAR files in CARS (see below), check every block against its CID, "
        "reassemble split files, decrypt them and restore the tree (contents, modes, mtimes, symlinks, empty "
        "directories) into OUT. Files are written under a temporary name and renamed only once fully verified. "
        "If bins are missing, every complete file is still restored, the incomplete ones are listed, and the "
        "exit code is 3. Existing files are never overwritten without --force.",
        epilog=EPILOG,
    )
    p.add_argument("cars", metavar="CARS", nargs="+", help=CARS_HELP)
    p.add_argument("output", metavar="OUT")
    add_key_options(p)
    p.add_argument("--force", action="store_true", help="overwrite existing files in OUT")
    p.add_argument(
        "-p", "--same-permissions", action="store_true",
        help="keep setuid, setgid and world-write bits (dropped by default, as tar does); an existing OUT "
        "keeps its own mode either way",
    )
    p.add_argument("--json", action="store_true")
    add_carset_options(p)
    p.set_defaults(func=cmd_unpack)

    p = commands.add_parser(
        "verify",
        help="check every block, the manifests and the piece CIDs of CAR files",
        description="Read every block of every CAR in CARS and check it against its CID; check the manifests "
        "agree (every part present, sizes add up); and, with manifest.csv (found in CARS or given), check each "
        "CAR's size, payload CID and commP. Exit 1 if anything is wrong, with one line per problem.",
        epilog=EPILOG,
    )
    p.add_argument("cars", metavar="CARS", nargs="+", help=CARS_HELP)
    p.add_argument("--manifest", metavar="CSV", help="manifest.csv to check piece CIDs against (default: CARS/manifest.csv)")
    p.add_argument("--json", action="store_true")
    add_key_options(p)
    add_carset_options(p)
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser(
        "ls",
        help="list the files in CAR files with sizes, parts and bins",
        description="List what a set of CARs holds: every path with its kind, size, number of parts and the bins "
        "they are in; files with parts in missing bins are marked incomplete.",
    )
    p.add_argument("cars", metavar="CARS", nargs="+", help=CARS_HELP)
    p.add_argument("--json", action="store_true")
    add_key_options(p)
    add_carset_options(p)
    p.set_defaults(func=cmd_ls)

    p = commands.add_parser(
        "snapshots",
        help="list the data-set snapshots in CAR files",
        description="List the data-set snapshots a set of CARs holds (every scan that changed anything sealed "
        "one: the whole tree at that time): id, time, files, bytes, complete or incomplete, the bins holding "
        "it and its part-1 CID. unpack, ls, verify and mount --reverse use the newest complete one unless "
        "given --snapshot ID. Exit 3 if the newest one is incomplete or a CAR is unusable.",
        epilog=EPILOG,
    )
    p.add_argument("cars", metavar="CARS", nargs="+", help=CARS_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dataset", metavar="HEX", help="use only the CARs of this data set (when several are mixed)")
    add_key_options(p)
    add_car_location_options(p)
    p.set_defaults(func=cmd_snapshots)
