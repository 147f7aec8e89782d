"""`packerfs pack` and `packerfs status`: the pack side's batch commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from packerfs.commands.options import EPILOG, SRC_HELP, add_pack_options, open_engine
from packerfs.progress import progress


def cmd_pack(args: argparse.Namespace) -> int:
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.pack.writer import bin_status, car_name

    from packerfs.index.lock import lock_state
    from packerfs.pack import default_state_dir
    from packerfs.source import is_url
    from packerfs.source.walk import excluded_paths

    state_dir = args.temp or default_state_dir(args.source)
    if os.path.isdir(args.source):
        # before the lock or anything else is written: OUT or STATE being SRC or above it is refused
        excluded_paths(args.source, ("output directory", args.output), ("state directory", state_dir))
    lock = lock_state(state_dir, f"packing {args.source if is_url(args.source) else os.path.abspath(args.source)}")
    engine = open_engine(args)
    try:
        with progress("packing", None) as advance:
            # New bins are written while the source is read; write() below adds any sealed earlier.
            report = engine.scan(
                skip_unreadable=args.skip_unreadable, advance=advance, car_dir=args.output,
                repack_below=args.repack_below,
            )
        bins = engine.bins()
        total = sum(b["car_size"] for b in bins if bin_status(b) == "current")
        with progress("writing", total) as advance:
            written = engine.write(args.output, advance)
    finally:
        engine.close()
        os.close(lock)
    skipped = [p for p in report.problems if p.fatal]
    result = {
        "output": os.path.abspath(args.output),
        "state_dir": engine.state_dir,
        "cars": [
            {
                "car_file": car_name(b["bin"]),
                "car_size": b["car_size"],
                "bin_size": b["bin_size"],
                "fill": round(b["car_size"] / b["bin_size"], 6),
                "piece_cid": b["piece_cid"],
                "piece_cid_v2": b["piece_cid_v2"],
                "piece_size": b["piece_size"],
                "payload_cid": b["root_cid"],
                "status": bin_status(b),
                "written": b["bin"] not in written.retired and b["bin"] not in written.unavailable,
            }
            for b in bins
        ],
        "new_bins": report.bins_sealed,
        "snapshot": report.snapshot,
        "files_packed": report.files_placed,
        "files_unchanged": report.skipped,
        "files_changed": report.changed,
        "files_deleted": report.deleted,
        "files_repacked": report.repacked,
        "changed_paths": [os.fsdecode(p) for p in report.changed_paths],
        "deleted_paths": [os.fsdecode(p) for p in report.deleted_paths],
        "retired_bins": report.retired_bins,
        "unavailable_bins": written.unavailable,
        "bytes_read": report.bytes_read,
        "source": engine.source.url,
        "bytes_fetched": engine.source.bytes_fetched,  # from the source, this run: ~bytes_read (one read)
        "skipped": [{"path": os.fsdecode(p.path), "reason": p.reason} for p in report.problems],
    }
    from packerfs.handoff import padding_warnings

    result["padding_warnings"] = padding_warnings(bins)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_pack_summary(result)
    for line in result["padding_warnings"]:
        print(f"packerfs: warning: {line}", file=sys.stderr)
    return EXIT_INCOMPLETE if skipped or written.unavailable else 0


def _print_pack_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from packerfs.unpack.verify import escape_name

    def printable(path: str) -> str:
        return escape_name(os.fsencode(path))

    table = Table(title=f"CARs in {result['output']}")
    for column in ("car file", "size", "fill", "piece CID", "piece size"):
        table.add_column(column, justify="right" if column in ("size", "fill", "piece size") else "left")
    for car in result["cars"]:
        if car["status"] == "retired":
            continue
        table.add_row(
            car["car_file"] + ("" if car["written"] else " (unavailable)"),
            f"{car['car_size']:,}",
            f"{100 * car['fill']:.2f}%",
            car["piece_cid"],
            f"{car['piece_size']:,}",
        )
    console = Console()
    console.print(table)
    retired = sum(1 for car in result["cars"] if car["status"] == "retired")
    console.print(
        f"{result['files_packed']} files packed into {len(result['new_bins'])} new bins, "
        f"{result['files_unchanged']} unchanged; manifest.csv and manifest.json written; "
        f"state in {result['state_dir']}"
    )
    snap = result["snapshot"]
    if snap:
        console.print(
            f"snapshot {snap['id']}: {snap['files']} files, {snap['bytes']:,} bytes "
            f"(bin {', '.join(map(str, snap['bins']))})"
        )
    for key, how in (("changed", "changed"), ("deleted", "deleted from the source")):
        names = result[f"{key}_paths"]
        for path in names:
            console.print(f"[yellow]{key}:[/] {printable(path)} {how}")
        if result[f"files_{key}"] > len(names):
            console.print(f"[yellow]{key}:[/] … and {result[f'files_{key}'] - len(names)} more")
    if result["files_repacked"]:
        console.print(f"repacked {result['files_repacked']} live files out of mostly-dead bins")
    if result["retired_bins"]:
        console.print(
            f"retired bins (nothing in them is needed any more): {', '.join(map(str, result['retired_bins']))}"
        )
    elif retired:
        console.print(f"{retired} retired bins are listed in manifest.csv as retired and not written")
    for number in result["unavailable_bins"]:
        console.print(
            f"[red]unavailable:[/] bin {number} is still needed but cannot be generated any more (it also held "
            f"data that has since changed or been deleted) and is not in {result['output']}: keep the copy "
            f"written earlier, or pack again with --repack-below 1 to move its live files into new bins"
        )
    for skip in result["skipped"]:
        console.print(f"[yellow]skipped:[/] {printable(skip['path'])}: {skip['reason']}")


def cmd_status(args: argparse.Namespace) -> int:
    from packerfs.index import Index
    from packerfs.pack import default_state_dir

    state_dir = args.temp or default_state_dir(args.source)
    index = Index(state_dir, readonly=True)
    try:
        scan = index.get_meta(b"scan", {}) or {}
        identity = index.get_meta(b"identity", {}) or {}
        bins = sorted(index.all_bins(), key=lambda b: b["bin"])
    finally:
        index.close()
    status = {
        "state_dir": state_dir,
        "source": identity.get("source"),
        "state": scan.get("state", "empty"),
        "bins_sealed": len(bins),
        "bytes_total": scan.get("bytes_total", 0),
        "snapshots": scan.get("next_snapshot", 1) - 1,
        "current_bins": [b["bin"] for b in bins if b.get("status", "current") == "current"],
        "retired_bins": [b["bin"] for b in bins if b.get("status") == "retired"],
        "unavailable_bins": [
            b["bin"] for b in bins if b.get("status", "current") == "current" and not b.get("regenerable", True)
        ],
    }
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        for key, value in status.items():
            print(f"{key}: {value}")
    return 0


def register(commands) -> None:
    p = commands.add_parser(
        "pack",
        help="pack SRC into bin-sized CAR files with piece CIDs in OUT",
        description="Scan SRC once (encrypting each file, splitting large ones, computing CIDs and commP "
        "in the same pass) and write OUT/bin-NNNNNN.car plus OUT/manifest.csv (car_file, piece_cid, "
        "piece_size, payload_cid, car_size, …: what `boost offline-deal` needs) and OUT/manifest.json. "
        "Rerunning with the same state resumes an interrupted scan; after changes it packs only new and "
        "changed files into new bins, seals a snapshot of the whole current tree and retires the bins "
        "that no longer hold anything it needs.",
        epilog=EPILOG,
    )
    p.add_argument("source", metavar="SRC", help=SRC_HELP)
    p.add_argument("output", metavar="OUT")
    add_pack_options(p)
    p.add_argument("--skip-unreadable", action="store_true", help="skip unreadable files (listed; exit 3) instead of failing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_pack)

    p = commands.add_parser("status", help="show the state of a scan", description="Show a state directory's scan state.")
    p.add_argument("source", metavar="SRC", nargs="?", default=".", help=SRC_HELP + " (default: .)")
    p.add_argument("-t", "--temp", metavar="STATE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
