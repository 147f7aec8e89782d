"""Key generation: new age identities (`packerfs keygen`)."""

from __future__ import annotations

import datetime
import os

from packerfs.crypt.age import X25519Identity
from packerfs.errors import KeyProblem, UsageError

__all__ = ["write_age_identity"]


def write_age_identity(path: str | os.PathLike[str]) -> str:
    """Write a new X25519 identity to `path` in age-keygen's format; return its recipient.

    The file is created with mode 0600 and never overwrites an existing file::

        # created: 2025-01-02T15:04:05+01:00
        # public key: age1…
        AGE-SECRET-KEY-1…
    """
    path = os.fspath(path)
    ident = X25519Identity(os.urandom(32), path)
    recipient = ident.recipient
    created = datetime.datetime.now().astimezone().replace(microsecond=0).isoformat()
    text = f"# created: {created}\n# public key: {recipient}\n{ident.to_string()}\n".encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise UsageError(f"{path}: already exists; refusing to overwrite a key file (choose another path).") from None
    except OSError as e:
        raise KeyProblem(f"{path}: cannot create the identity file: {e.strerror}.") from None
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(text)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise KeyProblem(f"{path}: cannot write the identity file: {e.strerror}.") from None
    os.close(fd)
    return recipient
