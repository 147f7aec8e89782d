"""What every packerfs view shares: no extended attributes, and EROFS for anything that writes."""

from __future__ import annotations

import errno
import os

import pyfuse3


class ReadOnlyOperations(pyfuse3.Operations):
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []

    async def _erofs(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = write = create = mknod = mkdir = unlink = rmdir = _erofs
    rename = link = symlink = setxattr = removexattr = _erofs

    @staticmethod
    def refuse_writes(flags: int) -> None:
        """open() with anything but read-only intent gets EROFS."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
