"""`packer`: the seed tool's command line, mapped onto packerfs pack / unpack.

    packer -p -s SRC  -t TEMP -o OUT -b BIN -e KEYSPEC     pack
    packer -u -s CARS -t TEMP -o OUT -e KEYSPEC            unpack

KEYSPEC is an age recipient (age1…), a path to an SSH public key, or
`gpg:ID` for a key in the gpg keyring when packing; an identity file (age
identity or unencrypted OpenSSH private key) or `gpg` / `gpg:ID` when
unpacking. Omit -e to pack or unpack without encryption.
"""

from __future__ import annotations

import argparse
import sys

from packerfs.commands import run

USAGE = """\
NAME
    packer - Filecoin filesystem packager/unpackager (packerfs engine)

SYNOPSIS
    packer [-p|-u] [-s SOURCE_PATH] [-t TEMP_PATH] [-o OUTPUT_PATH] [-b BIN_SIZE] [-e KEYSPEC]

OPTIONS
    -p, --pack
        pack mode: encrypt, split and lay out SOURCE_PATH as CAR files in OUTPUT_PATH,
        with manifest.csv (piece CIDs, piece sizes, payload CIDs) for deal making

    -u, --unpack
        unpack mode: restore the original tree from the CAR files in SOURCE_PATH
        into OUTPUT_PATH, reassembling split files and decrypting them

    -s SOURCE_PATH, --source SOURCE_PATH
        packing: the data to pack; unpacking: the directory holding the CAR files

    -t TEMP_PATH, --tmp TEMP_PATH
        state directory (index and dataset key); reuse it to resume an interrupted pack

    -o OUTPUT_PATH, --output OUTPUT_PATH
        packing: where the CAR files and manifests go; unpacking: where the tree is restored

    -b BIN_SIZE, --binsize BIN_SIZE
        packing: the largest CAR file, e.g. 32GiB or 34091302912 (the default)

    -e KEYSPEC, --encryption KEYSPEC
        packing: an age recipient (age1…), an SSH public key file, or gpg:ID
        unpacking: an identity file (age or OpenSSH private key), or gpg[:ID]
        omit it to pack without encryption

    -h, --help
        show this help
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packer", usage=USAGE, add_help=False)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-p", "--pack", action="store_true")
    mode.add_argument("-u", "--unpack", action="store_true")
    parser.add_argument("-s", "--source")
    parser.add_argument("-t", "--tmp")
    parser.add_argument("-o", "--output")
    parser.add_argument("-b", "--binsize")
    parser.add_argument("-e", "--encryption")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def translate(args: argparse.Namespace) -> list[str]:
    """The equivalent `packerfs` argument list."""
    if not (args.source and args.output):
        raise SystemExit("packer: -s SOURCE_PATH and -o OUTPUT_PATH are required (packer -h for help)")
    key = args.encryption
    if args.pack:
        argv = ["pack", args.source, args.output]
        if args.binsize:
            argv += ["--bin-size", args.binsize]
        if key is None:
            argv.append("--no-encryption")
        elif key.startswith("gpg:"):
            argv += ["--gpg-recipient", key[4:]]
        else:
            argv += ["--recipient", key]
        if args.tmp:
            argv += ["-t", args.tmp]
    else:
        # unpack needs no state directory: -t is accepted for compatibility and not used
        argv = ["unpack", args.source, args.output]
        if key is not None and key != "gpg" and not key.startswith("gpg:"):
            argv += ["--identity", key]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help or not (args.pack or args.unpack):
        print(USAGE, end="")
        return 0 if args.help else 2
    return run(translate(args))


if __name__ == "__main__":
    sys.exit(main())
