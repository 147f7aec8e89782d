"""The pack view: a read-only directory of the sealed bins' CAR files.

    MNT/bin-000001.car …   one per sealed bin, its bytes regenerated on read by BinReader
    MNT/manifest.csv       the rows of the bins listed here, as `pack` writes them
    MNT/manifest.json
    MNT/.packerfs-status   JSON: scan state and progress, retired and unavailable bins, errors

This module holds no format logic: it maps inodes to a read function (BinReader
behind a WindowCache) and to the manifest writer functions. The scan runs in
another thread and publishes sealed bins through ViewState; everything the
FUSE handlers touch is either immutable or read under ViewState's lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass

import pyfuse3

from packerfs.fs.readonly import ReadOnlyOperations
from packerfs.errors import PackerfsError
from packerfs.fs.blocks import WindowCache
from packerfs.pack.writer import car_name, manifest_csv, manifest_json

log = logging.getLogger("packerfs.fs")

ROOT = pyfuse3.ROOT_INODE
STATUS_NAME = b".packerfs-status"
CSV_NAME = b"manifest.csv"
JSON_NAME = b"manifest.json"
STATUS_INO, CSV_INO, JSON_INO = 2, 3, 4
SMALL_FILES = (STATUS_INO, CSV_INO, JSON_INO)
BIN_BASE = 16  # a bin's inode is BIN_BASE + its number

# Bins never change once sealed: the kernel may keep their attributes and pages.
STABLE_TIMEOUT = 24 * 3600.0
MAX_ERRORS = 100  # messages kept in the status file
MAX_REPORTED = 10_000  # read failures logged (one per bin and source file)

# SourceChanged messages start with the source file's path.
_CHANGED_PATH = re.compile(r"^(.*?): (?:source changed|cannot open source file|source file is shorter)", re.S)


class ViewState:
    """What the view shows, shared by the scan thread (writer) and the FUSE handlers (readers)."""

    def __init__(self, bins: list[dict], info: dict, mtime_ns: int):
        self.lock = threading.Lock()
        self.info = dict(info)  # static facts for the status file: source, state_dir, pid, …
        self.mtime_ns = mtime_ns  # every bin's mtime: stable across mounts of this state
        self.bins: dict[int, dict] = {}
        self.names: dict[bytes, int] = {}
        self.retired_bins: set[int] = set()  # the newest snapshot needs nothing in them: not shown
        self.unavailable_bins: set[int] = set()  # needed, but they also hold data that has since changed
        self.failing_bins: set[int] = set()  # reads failed: a source file changed since the scan
        for result in bins:
            self._settle(result)
        self.state = "scanning"
        self.bytes_scanned = 0
        self.bytes_total = 0
        self.stale: list[str] = []  # source files whose reads failed
        self.errors: list[str] = []
        self._reported: set[tuple] = set()
        self.changed_ns = time.time_ns()  # the root directory's mtime: moves when bins appear

    # ------------------------------------------------------------ writers (any thread)

    def _show(self, result: dict) -> None:
        number = result["bin"]
        # A bin's scalars only: its list of file versions grows with the data set, and no file here needs it.
        self.bins[number] = {k: v for k, v in result.items() if not isinstance(v, (list, tuple, dict))}
        self.names[car_name(number).encode()] = number

    def _hide(self, number: int) -> None:
        del self.bins[number]
        del self.names[car_name(number).encode()]

    def _settle(self, result: dict) -> bool:
        """Show or hide a sealed bin by its status; True if it was shown and is now hidden."""
        number = result["bin"]
        if result.get("status") == "retired":
            self.retired_bins.add(number)
            if number in self.bins:
                self._hide(number)
                return True
            return False
        if not result.get("regenerable", True):
            self.unavailable_bins.add(number)
        if number not in self.bins:
            self._show(result)
        return False

    def sealed(self, result: dict) -> None:
        """Scan thread: a bin was sealed and committed to the index; it appears now."""
        with self.lock:
            self._show(result)
            self.changed_ns = time.time_ns()

    def settle_all(self, bins: list[dict]) -> list[int]:
        """Show or hide bins by their statuses now; returns the shown bins now hidden (retired)."""
        with self.lock:
            gone = [result["bin"] for result in bins if self._settle(result)]
            if gone:
                self.changed_ns = time.time_ns()
        return gone

    def finished(self, bins: list[dict], problems: list[str]) -> list[int]:
        """Scan thread: the scan is done. Returns the shown bins it retired, now hidden."""
        gone = []
        with self.lock:
            for result in bins:
                if self._settle(result):
                    gone.append(result["bin"])
            for problem in problems:
                self._add_error(problem)
            self.state = "ready"
            self.changed_ns = time.time_ns()
        return gone

    def failed(self, message: str) -> None:
        with self.lock:
            self.state = "failed"
            self._add_error(message)

    def read_failed(self, number: int, message: str) -> bool:
        """A read of bin `number` failed; True the first time for this bin and file (worth a log line)."""
        with self.lock:
            match = _CHANGED_PATH.match(message)
            key = (number, match.group(1) if match else message)
            if key in self._reported or len(self._reported) >= MAX_REPORTED:
                return False
            self._reported.add(key)
            self._add_error(message)
            if match:
                path = match.group(1)
                root = self.info.get("source", "") + "/"
                self._add_stale(path[len(root) :] if path.startswith(root) else path)
                self.failing_bins.add(number)
            return True

    def _add_stale(self, path: str) -> None:
        if path not in self.stale:
            self.stale.append(path)

    def _add_error(self, message: str) -> None:
        if message not in self.errors and len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    # ------------------------------------------------------------ readers

    def visible(self) -> list[dict]:
        with self.lock:
            return [self.bins[n] for n in sorted(self.bins)]

    def lookup(self, name: bytes) -> int | None:
        with self.lock:
            return self.names.get(name)

    def result(self, number: int) -> dict | None:
        with self.lock:
            return self.bins.get(number)

    def status(self) -> dict:
        with self.lock:
            return {
                "state": self.state,
                "bins_sealed": len(self.bins),
                "bytes_scanned": self.bytes_scanned,
                "bytes_total": self.bytes_total,
                "stale": list(self.stale),
                "failing_bins": sorted(self.failing_bins),
                "retired_bins": sorted(self.retired_bins),
                "unavailable_bins": sorted(self.unavailable_bins),
                "errors": list(self.errors),
                "cars": [car_name(n) for n in sorted(self.bins)],
                **self.info,
            }


@dataclass
class _Handle:
    inode: int
    bin: int | None = None
    size: int = 0
    data: bytes = b""  # a small generated file's contents, taken at open
    next_offset: int = 0


class PackView(ReadOnlyOperations):
    supports_dot_lookup = False

    def __init__(self, state: ViewState, cache: WindowCache):
        super().__init__()
        self.state = state
        self.cache = cache
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.handles: dict[int, _Handle] = {}
        self.listings: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1

    # ------------------------------------------------------------ generated files

    def _small_file(self, inode: int) -> bytes:
        if inode == STATUS_INO:
            return (json.dumps(self.state.status(), indent=1) + "\n").encode()
        bins = self.state.visible()
        if inode == CSV_INO:
            return manifest_csv(bins).encode()
        return manifest_json(bins).encode()

    # ------------------------------------------------------------ attributes

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = 1 << 20
        attr.generation = 0
        if inode == ROOT:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
            mtime = self.state.changed_ns
            attr.attr_timeout = attr.entry_timeout = 0.0
        elif inode in SMALL_FILES:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = len(self._small_file(inode))
            mtime = self.state.changed_ns
            attr.attr_timeout = 0.0
            attr.entry_timeout = STABLE_TIMEOUT
        else:
            result = self.state.result(inode - BIN_BASE)
            if result is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = result["car_size"]
            mtime = self.state.mtime_ns
            attr.attr_timeout = attr.entry_timeout = STABLE_TIMEOUT
        attr.st_blocks = -(-attr.st_size // 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == STATUS_NAME:
            return self._attr(STATUS_INO)
        if name == CSV_NAME:
            return self._attr(CSV_INO)
        if name == JSON_NAME:
            return self._attr(JSON_INO)
        number = self.state.lookup(name)
        if number is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(BIN_BASE + number)

    # ------------------------------------------------------------ directory

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        entries = [(STATUS_NAME, STATUS_INO), (CSV_NAME, CSV_INO), (JSON_NAME, JSON_INO)]
        entries += [(car_name(r["bin"]).encode(), BIN_BASE + r["bin"]) for r in self.state.visible()]
        self.listings[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.listings.get(fh, [])
        for position in range(start_id, len(entries)):
            name, inode = entries[position]
            try:
                attr = self._attr(inode)
            except pyfuse3.FUSEError:
                continue  # hidden since opendir
            if not pyfuse3.readdir_reply(token, name, attr, position + 1):
                break

    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    # ------------------------------------------------------------ files

    async def open(self, inode, flags, ctx):
        self.refuse_writes(flags)
        fh = self._new_fh()
        info = pyfuse3.FileInfo(fh=fh)
        if inode in SMALL_FILES:
            data = self._small_file(inode)
            self.handles[fh] = _Handle(inode, size=len(data), data=data)
            info.direct_io = True  # contents change while mounted: never from the page cache
            info.keep_cache = False
        else:
            result = self.state.result(inode - BIN_BASE)
            if result is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            self.handles[fh] = _Handle(inode, bin=result["bin"], size=result["car_size"])
            info.keep_cache = True  # a bin's bytes never change
        return info

    async def read(self, fh, off, size):
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.bin is None:
            return handle.data[off : off + size]
        sequential = abs(off - handle.next_offset) <= 2 * self.cache.window
        handle.next_offset = off + size
        try:
            return await self.cache.read(handle.bin, handle.size, off, size, sequential=sequential)
        except Exception as exc:  # noqa: BLE001 - any failure is EIO for this read, never a crash of the loop
            self._read_failed(handle.bin, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _read_failed(self, number: int, offset: int, exc: Exception) -> None:
        if isinstance(exc, PackerfsError):  # SourceChanged names the source file
            message = str(exc)
        else:
            message = f"{car_name(number)}: {type(exc).__name__}: {exc}"
        if self.state.read_failed(number, message):
            log.error("%s: read at offset %d failed (EIO): %s", car_name(number), offset, message)
            if not isinstance(exc, (PackerfsError, OSError)):
                log.error("unexpected error while reading %s", car_name(number), exc_info=exc)

    async def release(self, fh):
        self.handles.pop(fh, None)

    async def flush(self, fh):
        return None

    async def statfs(self, ctx):
        bins = self.state.visible()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = sum(-(-b["car_size"] // 4096) for b in bins)
        out.f_bfree = out.f_bavail = 0
        out.f_files = len(bins) + 4
        out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out
