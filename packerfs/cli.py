"""The `packerfs` command line: the entry point over packerfs.commands.

Every command prints one-line errors (`packerfs: error: …`) and uses the exit
codes in packerfs.errors; `--json` prints machine-readable results on stdout.
"""

from __future__ import annotations

import sys

from packerfs.commands import build_parser, run


def main(argv: list[str] | None = None) -> int:
    return run(argv)


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
