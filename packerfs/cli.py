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


def _cipher_from_args(args: argparse.Namespace):
    from packerfs.crypt import make_cipher

    return make_cipher(
        recipients=args.recipient or (),
        recipients_files=args.recipients_file or (),
        gpg_recipients=args.gpg_recipient or (),
        gpg_homedir=args.gpg_homedir,
        no_encryption=args.no_encryption,
    )


def _bin_size_from_args(args: argparse.Namespace) -> int:
    from packerfs.errors import UsageError
    from packerfs.plan.sizes import DEFAULT_BIN_SIZE, check_bin_size, parse_size

    if not args.bin_size:
        return check_bin_size(DEFAULT_BIN_SIZE)
    text = args.bin_size
    # No bin size we accept needs more than a few dozen characters; a longer one would make
    # int() exceed Python's digit limit (a ValueError) or print a huge message.
    shown = text if len(text) <= 40 else text[:40] + f"… ({len(text)} characters)"
    if len(text) > 100:
        raise UsageError(f"--bin-size {shown!r}: too long for a size; use e.g. 8MiB, 1GB, 31.5GiB")
    try:
        size = parse_size(text)
    except ValueError:
        raise UsageError(f"--bin-size {shown!r}: cannot read it as a size; use e.g. 8MiB, 1GB, 31.5GiB") from None
    return check_bin_size(size)


def open_engine(args: argparse.Namespace):
    from packerfs.pack import Engine

    return Engine.open(args.source, args.temp, _cipher_from_args(args), _bin_size_from_args(args))


def cmd_pack(args: argparse.Namespace) -> int:
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.pack.writer import bin_status, car_name

    from packerfs.index.lock import lock_state
    from packerfs.pack import default_state_dir
    from packerfs.source import excluded_paths

    state_dir = args.temp or default_state_dir(args.source)
    if os.path.isdir(args.source):
        # before the lock or anything else is written: OUT or STATE being SRC or above it is refused
        excluded_paths(args.source, ("output directory", args.output), ("state directory", state_dir))
    lock = lock_state(state_dir, f"packing {os.path.abspath(args.source)}")
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
        "skipped": [{"path": os.fsdecode(p.path), "reason": p.reason} for p in report.problems],
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_pack_summary(result)
    return EXIT_INCOMPLETE if skipped or written.unavailable else 0


def _print_pack_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

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
            console.print(f"[yellow]{key}:[/] {_printable(path)} {how}")
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
        console.print(f"[yellow]skipped:[/] {_printable(skip['path'])}: {skip['reason']}")


def _printable(text: str) -> str:
    """A path for the terminal: control characters and undecodable bytes escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _open_carset(args: argparse.Namespace):
    from packerfs.unpack.snapshots import open_carset

    return open_carset(args.cars, dataset=args.dataset or None, snapshot=getattr(args, "snapshot", None))


def _print_set_lines(carset, tree, out=None) -> bool:
    """Unusable CARs, lost snapshots and bins, retired bins, warnings: one line each on stderr.
    True if the set is incomplete (exit 3)."""
    from packerfs.unpack.verify import set_lines

    incomplete, notes = set_lines(carset, tree)
    for line in incomplete + notes:
        print(line, file=out or sys.stderr)
    return bool(incomplete)


def cmd_unpack(args: argparse.Namespace) -> int:
    from packerfs.crypt import KeyRing
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.unpack import restore
    from packerfs.unpack.verify import escape_name, set_lines

    keyring = KeyRing(args.identity or (), args.gpg_homedir)
    carset = _open_carset(args)
    try:
        tree = carset.tree()
        total = sum(e.size for e in tree if e.kind == "file" and e.complete)
        with progress("unpacking", total) as advance:
            report = restore(
                carset, args.output, keyring, force=args.force, progress=advance,
                same_permissions=args.same_permissions,
            )
        incomplete, notes = set_lines(carset, tree)
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

    carset = _open_carset(args)
    csv_path = args.manifest
    if csv_path is None and os.path.isdir(args.cars[0]):
        candidate = os.path.join(args.cars[0], "manifest.csv")
        csv_path = candidate if os.path.exists(candidate) else None
    try:
        size = sum(car.size for car in carset.cars)
        with progress("verifying", size) as advance:
            report = verify(carset, csv_path, progress=advance)
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

    carset = _open_carset(args)
    try:
        rows = ls(carset)
        incomplete = _print_set_lines(carset, carset.tree())
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
        print(f"{r.kind:7} {r.size:>14,} {parts:>9}  bin {bins:<12} {escape_name(r.path) or '.'}{extra}{flag}")
    return code


def cmd_snapshots(args: argparse.Namespace) -> int:
    from packerfs.errors import EXIT_INCOMPLETE
    from packerfs.unpack.snapshots import choose, listing

    carset = _open_carset(args)
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


def add_carset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", metavar="HEX", help="use only the CARs of this data set (when several are mixed)")
    p.add_argument(
        "--snapshot", metavar="ID",
        help="restore the tree of snapshot ID (`packerfs snapshots` lists them); default: the newest complete one",
    )


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


def add_pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bin-size",
        metavar="SIZE",
        help="hard ceiling on each CAR file's length, e.g. 32GiB, 31.5GiB, 8MiB, 1GB; "
        "default 34091302912 (the payload of a 32 GiB sector); at most 68182605824 (64 GiB sector)",
    )
    p.add_argument(
        "-r", "--recipient", action="append", metavar="R",
        help="encrypt with age to R: an age1… key, an ssh-rsa/ssh-ed25519 public key, or a file of them "
        "(repeatable); `packerfs keygen` makes one",
    )
    p.add_argument("-R", "--recipients-file", action="append", metavar="FILE", help="age recipients file, as `age -R`")
    p.add_argument(
        "--gpg-recipient", action="append", metavar="ID",
        help="encrypt with OpenPGP to key ID in the gpg keyring (repeatable); `gpg -d` decrypts",
    )
    p.add_argument("--gpg-homedir", metavar="DIR", help="gpg home directory (default: gpg's own)")
    p.add_argument("--no-encryption", action="store_true", help="store files unencrypted")
    p.add_argument(
        "-t", "--temp", metavar="STATE",
        help="state directory (index and dataset key); default under ~/.cache/packerfs, keyed by SRC. "
        "Reusing it makes a later run resume or add only what changed.",
    )
    p.add_argument(
        "--repack-below", metavar="FRACTION", type=_fraction,
        help="move the live files of current bins whose live share of their data is below FRACTION (0..1) "
        "into new bins, so that those bins retire (compare restic prune); 1 also moves everything out of "
        "bins that can no longer be generated. Default: never repack",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


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
    p.add_argument("source", metavar="SRC")
    p.add_argument("output", metavar="OUT")
    add_pack_options(p)
    p.add_argument("--skip-unreadable", action="store_true", help="skip unreadable files (listed; exit 3) instead of failing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_pack)

    p = commands.add_parser(
        "unpack",
        help="restore the original tree from retrieved CAR files",
        description="Read the CAR files in CARS (a directory, or files), check every block against its CID, "
        "reassemble split files, decrypt them and restore the tree (contents, modes, mtimes, symlinks, empty "
        "directories) into OUT. Files are written under a temporary name and renamed only once fully verified. "
        "If bins are missing, every complete file is still restored, the incomplete ones are listed, and the "
        "exit code is 3. Existing files are never overwritten without --force.",
        epilog=EPILOG,
    )
    p.add_argument("cars", metavar="CARS", nargs="+")
    p.add_argument("output", metavar="OUT")
    p.add_argument("-i", "--identity", action="append", metavar="FILE", help="age identity or OpenSSH private key (repeatable)")
    p.add_argument("--gpg-homedir", metavar="DIR", help="gpg home with the secret key (default: gpg's own)")
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
    p.add_argument("cars", metavar="CARS", nargs="+")
    p.add_argument("--manifest", metavar="CSV", help="manifest.csv to check piece CIDs against (default: CARS/manifest.csv)")
    p.add_argument("--json", action="store_true")
    add_carset_options(p)
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser(
        "ls",
        help="list the files in CAR files with sizes, parts and bins",
        description="List what a set of CARs holds: every path with its kind, size, number of parts and the bins "
        "they are in; files with parts in missing bins are marked incomplete.",
    )
    p.add_argument("cars", metavar="CARS", nargs="+")
    p.add_argument("--json", action="store_true")
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
    p.add_argument("cars", metavar="CARS", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dataset", metavar="HEX", help="use only the CARs of this data set (when several are mixed)")
    p.set_defaults(func=cmd_snapshots)

    p = commands.add_parser("status", help="show the state of a scan", description="Show a state directory's scan state.")
    p.add_argument("source", metavar="SRC", nargs="?", default=".")
    p.add_argument("-t", "--temp", metavar="STATE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

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

    from packerfs.fs.commands import register_mount_commands

    register_mount_commands(commands)
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
    except BrokenPipeError:
        # The reader went away (`packerfs ls | head`): not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # Environment failures (full disk, permissions) are not bugs: one line, no traceback.
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        hint = " (disk full: free space and run again; finished work is kept)" if exc.errno == errno.ENOSPC else ""
        print(f"packerfs: error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
