"""Exceptions that reach the user as one line, and the exit codes they map to.

Every error a user can cause (bad input, bad keys, corrupt CARs, full disks) is a
PackerfsError subclass whose str() is a complete sentence naming the file and,
where there is one, the byte offset. The CLI prints it on one line; tracebacks
are only for bugs.
"""

import os

EXIT_OK = 0
EXIT_ERROR = 1  # the job failed; nothing partial was left behind as if complete
EXIT_USAGE = 2  # bad command line or options
EXIT_INCOMPLETE = 3  # finished, but some inputs were missing or damaged (listed)


class PackerfsError(Exception):
    exit_code = EXIT_ERROR


class UsageError(PackerfsError):
    exit_code = EXIT_USAGE


class FormatError(PackerfsError):
    """Malformed or corrupt input data (CAR, dag-pb, manifest, ciphertext)."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        self.path = path
        self.offset = offset
        where = []
        if path is not None:
            where.append(os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path))
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class CorruptBlock(FormatError):
    """A block's bytes do not hash to its CID."""


class TruncatedInput(FormatError):
    """Input ended before a structure it announced."""


class KeyProblem(PackerfsError):
    """A key, identity or recipient cannot be used (missing, wrong, locked)."""


class SourceChanged(PackerfsError):
    """A source file no longer matches what was scanned; its bytes are never served.

    Raised by readers that know the file, the message starts with its path,
    which is also in `.path` (None where the file is not known, e.g. inside a cipher).
    """

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class SourceUnavailable(PackerfsError):
    """The source cannot be reached or refuses us (a missing bucket, 403, throttling that does not
    stop, a server gone): the message names the URL. Nothing is served or sealed from a failed read."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class IncompleteSet(PackerfsError):
    exit_code = EXIT_INCOMPLETE
