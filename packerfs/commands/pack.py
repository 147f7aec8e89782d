"""`packerfs pack` and `packerfs status`: the pack side's batch commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from packerfs.commands.options import (
    EPILOG, SRC_HELP, add_pack_options, add_parallel_options, open_engine, pool_factory, source_options,
)
from packerfs.progress import progress


OUT_HELP = (
    "a directory, or an object-store prefix the CARs and manifests are uploaded to: s3://BUCKET/PREFIX, "
    "gs://BUCKET/PREFIX, az://CONTAINER/PREFIX (configured as SRC is; each CAR is uploaded in parts, to s3:// "
    "and az:// while the scan lays it out, and appears only once complete; objects already there with the "
    "same size and root are kept)"
)


def cmd_pack(args: argparse.Namespace) -> int:
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.pack.writer import bin_status, car_name

    from packerfs.index.lock import lock_state
    from packerfs.pack import default_state_dir
    from packerfs.source import is_url
    from packerfs.source.walk import excluded_paths

    state_dir = args.temp or default_state_dir(args.source)
    to_store = is_url(args.output)
    if os.path.isdir(args.source):
        # before the lock or anything else is written: OUT or STATE being SRC or above it is refused
        excluded_paths(
            args.source, None if to_store else ("output directory", args.output), ("state directory", state_dir)
        )
    make_pool = pool_factory(args)  # a bad --scheduler is a usage error before anything is locked
    store = _open_output_store(args) if to_store else None  # a missing bucket or a 403: before any work
    try:
        lock = lock_state(state_dir, f"packing {args.source if is_url(args.source) else os.path.abspath(args.source)}")
        engine = open_engine(args)
    except BaseException:
        if store is not None:
            store.close()
        raise
    try:
        scanned_into = None  # a bucket OUT that takes CARs during the scan (S3, Azure)
        if store is not None:
            from packerfs.pack.writer import StoreOutput, is_output_name

            # what an interrupted run left unfinished (S3 multipart uploads) goes before anything is written
            store.clean(is_output_name)
            if store.streams_during_scan:
                scanned_into = StoreOutput(store)
        with progress("packing", None) as advance:
            # New bins are written while the source is read (here or by the Dask worker sealing them):
            # to a directory, or uploaded to an S3 or Azure bucket; write() / upload_cars() below add
            # those sealed by an earlier run, and every gs:// CAR, generated again.
            options = dict(
                skip_unreadable=args.skip_unreadable, advance=advance, repack_below=args.repack_below,
                pool_factory=make_pool,
            )
            report = engine.scan(car_dir=scanned_into if to_store else args.output, **options)
        bins = engine.bins()
        done = set(scanned_into.uploaded) if scanned_into is not None else set()
        total = sum(b["car_size"] for b in bins if bin_status(b) == "current" and b["bin"] not in done)
        with progress("uploading" if to_store else "writing", total) as advance:
            if store is not None:
                from packerfs.pack.writer import upload_cars

                written = upload_cars(engine, store, advance, uploaded=done, clean=False)
            else:
                written = engine.write(args.output, advance)
    finally:
        engine.close()
        os.close(lock)
        if store is not None:
            store.close()
    skipped = [p for p in report.problems if p.fatal]
    result = {
        "output": store.url if store is not None else os.path.abspath(args.output),
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
                "sealed_on": b.get("sealed_on"),  # the Dask worker's address; null: sealed by packerfs itself
                **({"url": store.object_url(car_name(b["bin"]))} if store is not None else {}),
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
    if store is not None:
        # where the CARs went: uploaded by this run, or already there (same size and root) and kept
        result["uploaded_bins"] = written.uploaded
        result["kept_bins"] = [
            b["bin"] for b in bins
            if bin_status(b) == "current" and b["bin"] not in written.uploaded and b["bin"] not in written.unavailable
        ]
    from packerfs.handoff import padding_warnings

    result["padding_warnings"] = padding_warnings(bins)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_pack_summary(result)
    for line in result["padding_warnings"]:
        print(f"packerfs: warning: {line}", file=sys.stderr)
    return EXIT_INCOMPLETE if skipped or written.unavailable else 0


def _output_options(args: argparse.Namespace) -> dict[str, str]:
    """The file-system options for an object-store OUT: --output-option, or else -o when SRC is a local
    directory (they can only be meant for OUT; the source then gets none) or a store of OUT's kind."""
    from packerfs.errors import UsageError
    from packerfs.source import is_url
    from packerfs.source.objects import parse_url

    if getattr(args, "output_option", None):
        options: dict[str, str] = {}
        for pair in args.output_option:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--output-option {key!r}: write it as KEY=VALUE, e.g. --output-option endpoint_url=http://…")
            options[key.strip()] = value
        return options
    if not getattr(args, "source_option", None):
        return {}
    if not is_url(args.source):
        options = source_options(args)
        args.source_option = None  # a local SRC takes no file-system options
        return options
    if parse_url(args.source).scheme == parse_url(args.output).scheme:
        return source_options(args)
    return {}


def _open_output_store(args: argparse.Namespace):
    from packerfs.source.upload import ObjectStore

    return ObjectStore(args.output, _output_options(args)).open()


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


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan SRC from its listing alone: the bins, what each holds, the totals; stored in the state."""
    from packerfs.index.lock import lock_state
    from packerfs.pack import default_state_dir
    from packerfs.source import is_url

    state_dir = args.temp or default_state_dir(args.source)
    lock = lock_state(state_dir, f"planning {args.source if is_url(args.source) else os.path.abspath(args.source)}")
    engine = open_engine(args)
    try:
        plan, problems = engine.plan(
            skip_unreadable=args.skip_unreadable, repack_below=args.repack_below, files=args.files
        )
        summary = plan.summary()
        engine.index.commit(meta=[(b"plan", {"source": engine.source.url, **summary, "table": plan.bins})])
    finally:
        engine.close()
        os.close(lock)
    fatal = [p for p in problems if p.fatal]
    result = {
        "source": engine.source.url,
        "state_dir": engine.state_dir,
        "bin_size": engine.bin_size,
        **summary,
        "table": [
            {**row, "first": _shown(row["first"]), "last": _shown(row["last"])} for row in plan.bins
        ],
        "problems": [{"path": os.fsdecode(p.path), "reason": p.reason, "fatal": p.fatal} for p in problems],
    }
    if plan.files_assigned is not None:
        result["files_assigned"] = [{"path": os.fsdecode(p), "bins": bins} for p, bins in plan.files_assigned]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_plan(result, args.all)
    if fatal and not args.skip_unreadable:
        print(
            f"packerfs: error: {len(fatal)} source entr{'y' if len(fatal) == 1 else 'ies'} cannot be read "
            f"(listed above); pack will refuse them unless --skip-unreadable",
            file=sys.stderr,
        )
        return 1
    from packerfs.errors import EXIT_INCOMPLETE

    return EXIT_INCOMPLETE if fatal else 0


def _shown(path) -> str | None:
    from packerfs.unpack.verify import escape_name

    return None if path is None else (escape_name(path) or ".")


PLAN_ROWS = 40  # rows of the plan table shown without --all


def _print_plan(result: dict, show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result["table"]
    table = Table(title=f"plan for {result['source']} (bins of at most {result['bin_size']:,} bytes)")
    for column in ("bin", "entries", "file parts", "stream bytes", "CAR at most", "piece size", "from", "to"):
        table.add_column(column, justify="left" if column in ("from", "to") else "right")
    shown = rows if show_all or len(rows) <= PLAN_ROWS else rows[: PLAN_ROWS // 2] + rows[-PLAN_ROWS // 2 :]
    for i, row in enumerate(shown):
        if not show_all and len(rows) > PLAN_ROWS and i == PLAN_ROWS // 2:
            table.add_row("…", f"{len(rows) - PLAN_ROWS} more (--all lists them)", "", "", "", "", "", "")
        table.add_row(
            str(row["bin"]), f"{row['entries']:,}", f"{row['file_parts']:,}", f"{row['stream_bytes']:,}",
            f"{row['car_bound']:,}", f"{row['piece_size']:,}", row["first"] or "", row["last"] or "",
        )
    console = Console()
    console.print(table)
    pieces = ", ".join(f"{n} × {int(size):,}" for size, n in result["pieces"].items()) or "none"
    console.print(
        f"{result['entries']:,} entries ({result['files']:,} files, {result['bytes']:,} bytes): "
        f"{result['kept']:,} unchanged since the last scan, {result['placed']:,} to place; "
        f"{result['bytes_to_read']:,} bytes to read into {len(rows)} new bins (pieces: {pieces})"
        + (f"; the snapshot goes in bin {', '.join(map(str, result['snapshot_bins']))}" if result["snapshot_bins"] else "")
    )
    for problem in result["problems"]:
        console.print(f"[yellow]{'unreadable' if problem['fatal'] else 'skipped'}:[/] {problem['path']}: {problem['reason']}")


def cmd_status(args: argparse.Namespace) -> int:
    from packerfs.index import Index
    from packerfs.pack import default_state_dir

    state_dir = args.temp or default_state_dir(args.source)
    index = Index(state_dir, readonly=True)
    try:
        scan = index.get_meta(b"scan", {}) or {}
        identity = index.get_meta(b"identity", {}) or {}
        plan = index.get_meta(b"plan", None)
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
        # what the last plan (`packerfs plan`, or a scan's planning pass) decided, without its table
        "plan": None if plan is None else {k: v for k, v in plan.items() if k != "table"},
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
    p.add_argument("output", metavar="OUT", help=OUT_HELP)
    add_pack_options(p)
    p.add_argument(
        "--output-option", action="append", metavar="KEY=VALUE",
        help="for an s3://, gs:// or az:// OUT: an option for its fsspec file system (repeatable), as -o is for SRC; "
        "without it, OUT takes the -o options when SRC is a directory or a store of the same kind",
    )
    add_parallel_options(p, collect=True)
    p.add_argument("--skip-unreadable", action="store_true", help="skip unreadable files (listed; exit 3) instead of failing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_pack)

    p = commands.add_parser(
        "plan",
        help="plan SRC from its listing alone: the bins, what each holds, the piece sizes",
        description="Decide, from metadata alone (the listing and the sizes; no file is read), which bins a "
        "pack of SRC would make: each bin's entries, file parts and stream bytes, the most its CAR can take "
        "and its piece size, and the totals. Against a state that already holds sealed bins, it plans what "
        "the next pack would add. The plan is stored in the state (`packerfs status` shows it); pack and "
        "mount plan the same way, so they make exactly these bins as long as SRC does not change.",
        epilog=EPILOG,
    )
    p.add_argument("source", metavar="SRC", help=SRC_HELP)
    add_pack_options(p)
    p.add_argument("--skip-unreadable", action="store_true", help="plan without the unreadable entries (listed; exit 3)")
    p.add_argument("--all", action="store_true", help="list every bin (the table shows the first and last 20)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (every bin)")
    p.add_argument("--files", action="store_true", help="with --json: also list the bins of every file and symlink")
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("status", help="show the state of a scan", description="Show a state directory's scan state.")
    p.add_argument("source", metavar="SRC", nargs="?", default=".", help=SRC_HELP + " (default: .)")
    p.add_argument("-t", "--temp", metavar="STATE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
