"""`packerfs handoff FORMAT`: what each deal tool takes, from the bins manifest.csv lists."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from packerfs.commands.options import EPILOG

# Which formats each format-specific option applies to (argparse dest -> formats).
_APPLIES = {
    "provider": ("boost-offline", "boost-ddo", "curio-urls"),
    "duration": ("boost-offline",),
    "storage_price": ("boost-offline",),
    "verified": ("boost-offline",),
    "start_epoch": ("boost-offline",),
    "provider_collateral": ("boost-offline",),
    "remove_unsealed_copy": ("boost-offline",),
    "skip_ipni_announce": ("boost-offline",),
    "wallet": ("boost-offline",),
    "car_size_flag": ("boost-offline",),
    "boost_json": ("boost-offline",),
    "term_min": ("boost-ddo",),
    "term_max": ("boost-ddo",),
    "expiration": ("boost-ddo",),
    "url_base": ("curio-urls",),
    "url_path": ("curio-urls",),
    "deals": ("curio-urls",),
    "header": ("curio-urls",),
    "preparation": ("singularity",),
    "file_path_base": ("singularity",),
}
_FLAG = {dest: "--" + dest.replace("_", "-") for dest in _APPLIES} | {"verified": "--verified/--no-verified"}


def warn(message: str) -> None:
    print(f"packerfs: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    print(f"packerfs: note: {message}", file=sys.stderr)


def cmd_handoff(args: argparse.Namespace) -> int:
    from packerfs import handoff
    from packerfs.errors import PackerfsError, UsageError

    fmt = args.format
    for dest, formats in _APPLIES.items():
        value = getattr(args, dest)
        given = value is not None if dest == "verified" else value not in (None, False, [])
        if given and fmt not in formats:
            raise UsageError(f"{_FLAG[dest]} does not apply to {fmt} (it is for {', '.join(formats)})")
    providers = list(dict.fromkeys(handoff.check_provider(p) for p in args.provider or ()))
    if fmt in ("boost-offline", "boost-ddo") and not providers:
        raise UsageError(f"{fmt} needs --provider f0… (the storage provider's ID address; repeatable)")
    if fmt == "curio-urls" and (not args.url_base or not args.deals):
        raise UsageError(
            "curio-urls needs --url-base URL (where the SP fetches the CARs) and --deals FILE "
            "(the output of `boost --json offline-deal`, which holds each deal's uuid)"
        )
    if fmt == "singularity" and not args.preparation:
        raise UsageError("singularity needs --preparation ID|NAME (the singularity preparation to add the pieces to)")
    for flag, value in (("--duration", args.duration), ("--start-epoch", args.start_epoch)):
        handoff.check_epochs(flag, value, minimum=1)
    for flag, value in (("--storage-price", args.storage_price), ("--provider-collateral", args.provider_collateral)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} {value}: must not be negative")
    if args.wallet is not None and not re.fullmatch(r"[ft][0-4][0-9a-z]+", args.wallet):
        raise UsageError(f"--wallet {args.wallet!r}: not a Filecoin address (f1…, f3…, f410f…; t… on testnets)")
    if args.preparation is not None and args.preparation.startswith("-"):
        raise UsageError(f"--preparation {args.preparation!r}: singularity would read it as a flag")
    if args.output:
        handoff.check_output_path(args.output)

    # The bins: from the state when -t is given, else from OUT/manifest.csv.
    if args.temp:
        bins = handoff.bins_from_state(args.temp)
        source = f"state {args.temp}"
        if args.out_dir is not None and not os.path.isdir(args.out_dir):
            raise UsageError(f"{args.out_dir}: not a directory; OUT is the directory `packerfs pack` wrote")
    elif args.out_dir is not None:
        bins = handoff.bins_from_output(args.out_dir)
        source = os.path.join(args.out_dir, "manifest.csv")
    else:
        raise UsageError("give OUT (a directory `packerfs pack` wrote) or -t STATE (its state directory)")
    chosen = handoff.select(bins, include_retired=args.all)
    if not chosen:
        retired = sum(1 for b in bins if b.status != "current")
        hint = f" ({retired} retired; --all includes them)" if retired else ""
        raise PackerfsError(f"{source}: no current bins{hint}: nothing to hand off")
    warnings = handoff.padding_warnings(chosen)

    if fmt == "boost-offline":
        terms = handoff.BoostTerms(
            duration=args.duration, storage_price=args.storage_price, verified=args.verified,
            start_epoch=args.start_epoch, provider_collateral=args.provider_collateral,
            remove_unsealed_copy=args.remove_unsealed_copy, skip_ipni_announce=args.skip_ipni_announce,
            wallet=args.wallet, car_size_flag=args.car_size_flag, json=args.boost_json,
        )
        text = handoff.boost_offline(chosen, providers, terms)
    elif fmt == "boost-ddo":
        text = handoff.boost_ddo(
            chosen, providers,
            handoff.DDO_TERM_MIN if args.term_min is None else args.term_min,
            handoff.DDO_TERM_MAX if args.term_max is None else args.term_max,
            handoff.DDO_EXPIRATION if args.expiration is None else args.expiration,
        )
    elif fmt == "curio-urls":
        deals = handoff.read_deals(args.deals)
        rows = handoff.curio_urls(
            chosen, deals, args.url_base, args.header or [], providers, by_piece=args.url_path == "piece"
        )
        text = rows.text
        if rows.unmatched:
            note(f"{len(rows.unmatched)} deals in {args.deals} are for none of these bins; left out")
        if not args.header:
            warn(
                "rows without a header column: the curio releases read for this fail on add-url --file rows "
                "that carry no header; pass one (e.g. --header 'User-Agent: packerfs') if curio refuses them"
            )
    elif fmt == "singularity":
        base = args.file_path_base
        if base is None and args.out_dir is not None:
            base = os.path.abspath(args.out_dir)
        if base is None:
            note("no OUT or --file-path-base: the lines carry no --file-path (singularity has no copy of the CARs)")
        text = handoff.singularity(chosen, args.preparation, base)
    else:
        text = handoff.graphsplit(chosen)

    for line in warnings:
        warn(line)
    if args.output:
        handoff.write_atomic(args.output, text)
    if args.json:
        result = {
            "format": fmt,
            "source": source,
            "file": os.path.abspath(args.output) if args.output else None,
            "lines": text.count("\n"),
            "bins": [
                {
                    "car_file": b.car_file, "car_size": b.car_size, "piece_size": b.piece_size,
                    "padding": round(b.padding, 6), "piece_cid": b.piece_cid, "piece_cid_v2": b.piece_cid_v2,
                    "payload_cid": b.payload_cid, "status": b.status,
                }
                for b in chosen
            ],
            "padding_warnings": warnings,
        }
        if not args.output:
            result["text"] = text
        print(json.dumps(result, indent=1))
    elif not args.output:
        sys.stdout.write(text)
    return 0


DESCRIPTION = """\
Print (or write with -o) what a deal tool takes for each current bin of a pack, from the same bin
results as manifest.csv: from the state directory with -t STATE, or from OUT/manifest.csv alone
(a machine that has only the output). The raw CAR size goes next to the padded piece size wherever
the format has room. A warning on stderr names each bin whose piece would be more than half
padding (storage providers often reject those).

formats:
  boost-offline  `boost offline-deal --provider P --commp … --piece-size … --payload-cid …` lines,
                 one per bin and provider, the CAR file and its size in a trailing # comment
                 (boost v2 offline-deal has no --car-size; --car-size-flag adds it for v1 clients)
  boost-ddo      `boost allocate --piece-file` lines pieceCid,pieceSize,miner,tmin,tmax,expiration
                 (no header; tmin/tmax default to 180 days/5 years, expiration to 60 days, in epochs)
  curio-urls     `curio market add-url --file` rows uuid,raw size,url,header… (no header line): the
                 deal uuids from --deals (the output of `boost --json offline-deal`, e.g. from the
                 lines of `handoff boost-offline --boost-json`), the URLs --url-base/bin-NNNNNN.car
                 (or, --url-path piece, --url-base/piece/<piece CID>, as `packerfs serve` answers)
  singularity    `singularity prep add-piece --piece-cid --piece-size --file-path --root-cid
                 --file-size PREPARATION` lines
  graphsplit     graphsplit's manifest.csv: payload_cid,filename,piece_cid,piece_size,detail, which
                 SP deal scripts read; as in graphsplit, piece_size is the unpadded piece size (padded
                 x 127/128); detail is JSON: car_size, padded_piece_size, piece_cid_v2"""

EXAMPLES = """\
examples:
  packerfs handoff boost-offline cars/ --provider f01234 --no-verified --boost-json > deals.sh
  sh deals.sh > deals.json
  packerfs handoff curio-urls cars/ --deals deals.json --url-base https://cars.example.org/set1 \\
      --header 'Authorization: Bearer TOKEN' -o add-url.csv     # then: curio market add-url --file add-url.csv
  packerfs handoff boost-ddo -t STATE --provider f01234 -o pieces.txt   # boost allocate --piece-file pieces.txt
  packerfs handoff singularity cars/ --preparation 1 --file-path-base /mnt/cars

""" + EPILOG


def register(commands) -> None:
    from packerfs.handoff import FORMATS

    p = commands.add_parser(
        "handoff",
        help="write what a deal tool takes (boost, curio, singularity, graphsplit) for each current bin",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", metavar="FORMAT", choices=list(FORMATS), help=", ".join(FORMATS))
    p.add_argument(
        "out_dir", metavar="OUT", nargs="?",
        help="a directory `packerfs pack` wrote: the bins come from its manifest.csv (with -t, OUT only "
        "gives singularity its CAR paths)",
    )
    p.add_argument("-t", "--temp", metavar="STATE", help="read the bins from this state directory instead")
    p.add_argument("-o", "--output", metavar="FILE", help="write FILE (a temporary file, then renamed) instead of stdout")
    p.add_argument("--all", action="store_true", help="also the retired bins (by default only the current ones)")
    p.add_argument(
        "--json", action="store_true",
        help="print a JSON object instead: format, source, file, lines, bins (sizes, padding, CIDs), "
        "padding_warnings, and text (the hand-off itself, unless -o wrote it)",
    )

    g = p.add_argument_group("boost-offline and boost-ddo (and curio-urls, to pick deals)")
    g.add_argument(
        "-p", "--provider", action="append", metavar="f0…",
        help="storage provider ID address, f0… (t0… on testnets); repeatable: one line per provider",
    )
    g = p.add_argument_group("boost-offline: deal terms (boost's defaults when not given)")
    g.add_argument("--duration", type=int, metavar="EPOCHS", help="deal duration (boost's default: 518400, 180 days)")
    g.add_argument("--storage-price", type=int, metavar="ATTOFIL", help="attoFIL per epoch per GiB (boost's default: 1)")
    g.add_argument(
        "--verified", action=argparse.BooleanOptionalAction, default=None,
        help="a verified (DataCap) deal or not, written as boost's --verified=true / --verified=false "
        "(boost's default: true)",
    )
    g.add_argument(
        "--start-epoch", type=int, metavar="EPOCH",
        help="epoch by which the deal must be proven (boost's default: head + 2 days)",
    )
    g.add_argument(
        "--provider-collateral", type=int, metavar="ATTOFIL",
        help="provider collateral (boost's default: the minimum + 20%%)",
    )
    g.add_argument("--remove-unsealed-copy", action="store_true", help="the SP need not keep an unsealed copy")
    g.add_argument("--skip-ipni-announce", action="store_true", help="do not announce the deal to IPNI")
    g.add_argument("--wallet", metavar="ADDR", help="the client wallet (boost's default wallet otherwise)")
    g.add_argument("--car-size-flag", action="store_true", help="also pass --car-size (v1 boost clients required it)")
    g.add_argument(
        "--boost-json", action="store_true",
        help="write `boost --json offline-deal …`, so that running the lines gives the file --deals reads",
    )
    g = p.add_argument_group("boost-ddo: allocation terms, in epochs")
    g.add_argument("--term-min", type=int, metavar="EPOCHS", help="minimum term (default and least: 518400, 180 days)")
    g.add_argument("--term-max", type=int, metavar="EPOCHS", help="maximum term (default and most: 5256000, 5 years)")
    g.add_argument(
        "--expiration", type=int, metavar="EPOCHS",
        help="epochs after the chain head by which the SP must seal (default and most: 172800, 60 days)",
    )
    g = p.add_argument_group("curio-urls")
    g.add_argument("--url-base", metavar="URL", help="http(s) URL the SP fetches CARs under: URL/bin-NNNNNN.car")
    g.add_argument(
        "--url-path", choices=("car", "piece"),
        help="car (default): URL/bin-NNNNNN.car, a file server over OUT; piece: URL/piece/<piece CID>, "
        "as `packerfs serve` (FRC-0066) answers",
    )
    g.add_argument(
        "--deals", metavar="FILE",
        help="the output of `boost --json offline-deal` (JSON objects, one per deal), matched to the bins "
        "by commp (or payloadCid); every bin needs a deal",
    )
    g.add_argument(
        "-H", "--header", action="append", metavar="'NAME: VALUE'",
        help="an HTTP header for the SP's fetch (repeatable; no commas in values)",
    )
    g = p.add_argument_group("singularity")
    g.add_argument("--preparation", metavar="ID|NAME", help="the singularity preparation (its id or name)")
    g.add_argument(
        "--file-path-base", metavar="DIR",
        help="directory of the CARs as singularity sees it (default: OUT, made absolute)",
    )
    p.set_defaults(func=cmd_handoff)
