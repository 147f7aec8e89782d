"""The command layer: each `packerfs` command's options, its run and its output.

It sits above the rooms (pack, unpack, fs, crypt, …), which never import it:
packerfs.cli and packerfs.packer_cli are thin entry points over run(). One
module per group of commands, each with a register(subparsers):

    options   options and argument readers shared by several commands
    pack      pack, status
    unpack    unpack, verify, ls, snapshots
    mount     mount (and --reverse), umount
    serve     the HTTP piece gateway
    tools     commp, keygen
    handoff   handoff (the files deal tools take: boost, curio, singularity, graphsplit)
    demo      the main job on a small generated data set
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from packerfs import __version__
from packerfs.commands import demo, handoff, mount, pack, serve, tools, unpack
from packerfs.commands.options import EPILOG
from packerfs.errors import EXIT_ERROR, PackerfsError


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
    for group in (tools, pack, handoff, unpack, demo, mount, serve):
        group.register(commands)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command: its exit code, with every error as one line on stderr."""
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
