"""Options and argument readers that several commands share."""

from __future__ import annotations

import argparse

EPILOG = """\
exit codes: 0 success, 1 failure (nothing left half-written), 2 usage error,
3 finished but incomplete (missing or damaged inputs are listed)."""


SRC_HELP = (
    "a directory, or an object-store prefix: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX "
    "(credentials and endpoints from the SDKs' usual environment variables and files; see -o)"
)


def cipher_from_args(args: argparse.Namespace):
    from packerfs.crypt import make_cipher

    return make_cipher(
        recipients=args.recipient or (),
        recipients_files=args.recipients_file or (),
        gpg_recipients=args.gpg_recipient or (),
        gpg_homedir=args.gpg_homedir,
        no_encryption=args.no_encryption,
    )


def bin_size_from_args(args: argparse.Namespace) -> int:
    from packerfs.errors import UsageError
    from packerfs.plan.sizes import BIN_SIZE_PRESETS, DEFAULT_BIN_SIZE, check_bin_size, parse_size

    if not args.bin_size:
        return check_bin_size(DEFAULT_BIN_SIZE)
    text = args.bin_size
    preset = BIN_SIZE_PRESETS.get(text.strip().lower())
    if preset is not None:
        return check_bin_size(preset)
    # No bin size we accept needs more than a few dozen characters; a longer one would make
    # int() exceed Python's digit limit (a ValueError) or print a huge message.
    shown = text if len(text) <= 40 else text[:40] + f"… ({len(text)} characters)"
    if len(text) > 100:
        raise UsageError(f"--bin-size {shown!r}: too long for a size; use e.g. 8MiB, 1GB, 31.5GiB")
    try:
        size = parse_size(text)
    except (ValueError, UsageError):
        raise UsageError(
            f"--bin-size {shown!r}: cannot read it as a size; use e.g. 8MiB, 1GB, 31.5GiB, "
            f"or a preset: pdp, 32GiB-sector, 64GiB-sector"
        ) from None
    return check_bin_size(size)


def source_options(args: argparse.Namespace) -> dict[str, str]:
    """-o KEY=VALUE pairs, for the object store's file system (values stay strings; fsspec reads them)."""
    from packerfs.errors import UsageError

    options: dict[str, str] = {}
    for pair in getattr(args, "source_option", None) or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"-o {pair.split('=')[0]!r}: write it as KEY=VALUE, e.g. -o endpoint_url=http://…")
        options[key.strip()] = value
    return options


def compress_level(text: str) -> int:
    from packerfs.compress.zstd import parse_compress_option

    try:
        return parse_compress_option(text)
    except Exception as exc:  # UsageError: its one line is argparse's message
        raise argparse.ArgumentTypeError(str(exc)) from None


def open_engine(args: argparse.Namespace):
    from packerfs.pack import Engine

    return Engine.open(
        args.source, args.temp, cipher_from_args(args), bin_size_from_args(args), source_options(args),
        hide_names=getattr(args, "hide_names", None), compress=getattr(args, "compress", None),
        pad_sizes=getattr(args, "pad_sizes", False),
    )


def serving_engine(args: argparse.Namespace, *inside) -> tuple[str, str, object]:
    """For the long-running commands (mount, serve): check SRC now (a missing directory or bucket
    is refused before anything starts), fix the state directory (args.temp), and give back
    (state_dir, SRC as shown, open_engine) where open_engine() opens the engine with the state
    and `inside` (more (what, path) pairs, e.g. the mount point) left out of the scan."""
    import os

    from packerfs.pack import default_state_dir
    from packerfs.source import open_source

    source = open_source(args.source, source_options(args))
    try:
        state_dir = os.path.abspath(args.temp or default_state_dir(args.source))
        args.temp = state_dir
        # refuses STATE (or a mount point) being SRC or above it
        excluded = source.excluded(("state directory", state_dir), *inside)
        shown = source.url
    finally:
        source.close()
    os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def engine():
        opened = open_engine(args)
        opened.excluded |= excluded
        return opened

    return state_dir, shown, engine


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--source-option", action="append", metavar="KEY=VALUE",
        help="for an s3://, gs:// or az:// SRC: an option for its fsspec file system (repeatable), e.g. "
        "-o endpoint_url=https://… -o anon=true; credentials come from each SDK's usual environment "
        "and files, and are never written anywhere by packerfs",
    )


def add_pack_options(p: argparse.ArgumentParser) -> None:
    add_source_options(p)
    p.add_argument(
        "--bin-size",
        metavar="SIZE",
        help="hard ceiling on each CAR file's length, e.g. 32GiB, 31.5GiB, 8MiB, 1GB, or a preset: "
        "32GiB-sector (34091302912, the most a 32 GiB sector takes: the default), 64GiB-sector "
        "(68182605824, also the largest allowed), pdp (1065353216, the most a 1 GiB PDP piece takes)",
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
        "--compress", metavar="zstd[:LEVEL]", type=compress_level,
        help="compress each file before encryption as independent zstd frames (one per MiB), stored as "
        "NAME.zst.age; `age -d F.zst.age | zstd -d` restores it. Files whose samples do not shrink by 3%% are "
        "stored as they are. LEVEL 1-22, default 3. Each new or changed file is read once more, when planned, "
        "to learn its compressed size",
    )
    p.add_argument(
        "--pad-sizes", action="store_true",
        help="pad every file's stored stream to a PADMÉ size (at most 12%% more, less from 1 KiB on), so a CAR "
        "does not show exact file sizes; the padding is zstd skippable frames, so files become NAME.zst.age "
        "and `zstd -d` restores them",
    )
    names = p.add_mutually_exclusive_group()
    names.add_argument(
        "--hide-names", dest="hide_names", action="store_true", default=None,
        help="the default for encrypted packs: each CAR names its files only by opaque, fixed-length names "
        "(32 hex digits + .age/.gpg) in one flat directory; paths, directories, symlinks, sizes, modes and "
        "mtimes go into the encrypted manifest .packerfs/manifest.cbor.age (or .gpg). unpack, ls, verify and "
        "mount --reverse then need the key (-i); the README shows a restore with stock tools",
    )
    names.add_argument(
        "--show-names", dest="hide_names", action="store_false",
        help="keep paths in clear in the CARs' UnixFS trees and manifests, so `ipfs-car unpack` alone restores "
        "the tree (the only choice without encryption). A state keeps the choice it was made with",
    )
    p.add_argument(
        "-t", "--temp", metavar="STATE",
        help="state directory (index and dataset key); default under ~/.cache/packerfs, keyed by SRC. "
        "Reusing it makes a later run resume or add only what changed.",
    )
    p.add_argument(
        "--repack-below", metavar="FRACTION", type=fraction,
        help="move the live files of current bins whose live share of their data is below FRACTION (0..1) "
        "into new bins, so that those bins retire (compare restic prune); 1 also moves everything out of "
        "bins that can no longer be generated. Default: never repack",
    )


def add_parallel_options(p: argparse.ArgumentParser, *, collect: bool = False) -> None:
    p.add_argument(
        "--workers", metavar="N", type=positive_int,
        help="seal bins in parallel on a Dask LocalCluster of N worker processes on this machine "
        "(default: $PACKERFS_WORKERS, else the number of cores; 1 seals in this process). Started only when the "
        "plan has at least two bins that can be sealed apart (the bins an OpenPGP file runs through are sealed "
        "one after another)",
    )
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="seal bins on an existing Dask cluster: tcp://HOST:PORT or tls://HOST:PORT (use tls:// off this "
        "machine: the tasks carry the dataset secret and the keys, in memory only). The workers must reach SRC "
        "at the same path or URL, and OUT unless --collect",
    )
    if collect:
        p.add_argument(
            "--collect", action="store_true",
            help="with --scheduler: the workers send each CAR back to this machine, which writes it to OUT "
            "(for workers that do not share OUT)",
        )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not at least 1")
    return value


def pool_factory(args: argparse.Namespace):
    """What seals bins for this command: None (this process), or a factory of a Dask pool given the plan."""
    import os

    from packerfs.errors import UsageError

    scheduler = getattr(args, "scheduler", None)
    collect = getattr(args, "collect", False)
    if scheduler and not scheduler.startswith(("tcp://", "tls://")):
        raise UsageError(f"--scheduler {scheduler!r}: give the scheduler's address as tcp://HOST:PORT or tls://HOST:PORT")
    if collect and not scheduler:
        raise UsageError("--collect is for workers of a --scheduler cluster that do not share OUT")
    workers = getattr(args, "workers", None)
    if workers is None:
        configured = os.environ.get("PACKERFS_WORKERS", "")
        if configured:
            try:
                workers = positive_int(configured)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"PACKERFS_WORKERS: {exc}") from None
        else:
            workers = os.cpu_count() or 1
    if not scheduler and workers <= 1:
        return None

    def make(plan):
        # the last bin is sealed here (it takes the snapshot); a pool pays off from two tasks on (an
        # OpenPGP file cut across bins makes them one task)
        if not scheduler and plan.sealing_tasks() < 2:
            return None
        from packerfs.pack.parallel import Pool

        return Pool(workers=workers, scheduler=scheduler, collect=collect)

    return make


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


CARS_HELP = (
    "where the CARs are: directories (every *.car in them), CAR files, s3://, gs:// or az:// prefixes, "
    "or an http(s):// piece gateway (with --pieces or --piece; default: its /manifest.csv); CARs that "
    "packerfs did not write (ipfs-car, kubo, data-prep tools) are read as plain UnixFS"
)


def add_car_location_options(p: argparse.ArgumentParser, *, object_options: bool = True) -> None:
    """Where the CARs are, besides local paths: object stores and HTTP piece gateways."""
    if object_options:
        p.add_argument(
            "-o", "--source-option", action="append", metavar="KEY=VALUE",
            help="for s3://, gs:// or az:// CARS: an option for its fsspec file system (repeatable), as for "
            "`pack` sources; credentials come from each SDK's usual environment and files",
        )
    p.add_argument(
        "--piece", action="append", metavar="CID",
        help="for an http(s):// piece gateway: fetch this piece (GET BASE/piece/CID; repeatable); or a whole "
        "piece URL (http(s)://HOST/…/piece/CID), to add pieces from other servers",
    )
    p.add_argument(
        "--pieces", metavar="CSV",
        help="for an http(s):// piece gateway: fetch the pieces a manifest.csv names (a path or a URL); "
        "default for a gateway: BASE/manifest.csv if it answers",
    )
    p.add_argument(
        "--root", metavar="CID",
        help="for CARs that packerfs did not write (ipfs-car, kubo, data-prep tools): the root of the tree "
        "to read, when the CARs name several",
    )


def car_sources(args: argparse.Namespace, specs=None):
    """Where the CARs are, from the command line (packerfs.unpack.carset.CarSources)."""
    from packerfs.unpack.carset import CarSources

    specs = specs if specs is not None else args.cars
    if isinstance(specs, str):
        specs = [specs]
    pieces = getattr(args, "piece", None) or ()
    urls = [p for p in pieces if "://" in p]
    return CarSources(
        tuple(specs) + tuple(urls), tuple(sorted(source_options(args).items())),
        tuple(p for p in pieces if "://" not in p),
        getattr(args, "pieces", None), getattr(args, "root", None),
    )


def add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i", "--identity", action="append", metavar="FILE",
        help="age identity or OpenSSH private key (repeatable): decrypts the files, and opens the manifests "
        "of CARs packed with hidden names",
    )
    p.add_argument("--gpg-homedir", metavar="DIR", help="gpg home with the secret key (default: gpg's own)")


def keyring_from_args(args: argparse.Namespace):
    from packerfs.crypt import KeyRing

    return KeyRing(getattr(args, "identity", None) or (), getattr(args, "gpg_homedir", None))


def add_carset_options(p: argparse.ArgumentParser) -> None:
    add_car_location_options(p)
    p.add_argument("--dataset", metavar="HEX", help="use only the CARs of this data set (when several are mixed)")
    p.add_argument(
        "--snapshot", metavar="ID",
        help="restore the tree of snapshot ID (`packerfs snapshots` lists them); default: the newest complete one",
    )
