"""One writer per state directory: a mount or a pack, never two at once.

The index is safe for any number of readers, but two scans writing it would
number bins twice. The lock is an flock on STATE/lock, released by the kernel
when its holder exits, however it exits; the file names the holder so the
refusal can say who it is.
"""

from __future__ import annotations

import fcntl
import os

from packerfs.errors import UsageError

LOCK_NAME = "lock"


def lock_state(state_dir: str, purpose: str) -> int:
    """Take the state directory's writer lock for `purpose` (e.g. "packing /data"); returns the fd to close."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(
            f"state directory {state_dir} is in use by another packerfs process ({holder}); "
            f"wait for it to finish, or unmount it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} {purpose}\n".encode(), 0)
    return fd
