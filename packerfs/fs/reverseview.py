"""The reverse view: a CAR set shown as the original, decrypted tree.

    MNT/…                  the tree the manifests describe: names, modes, mtimes, symlinks,
                           empty directories; file contents read by FileReader
    MNT/.packerfs-status   JSON: CARs used, the snapshot shown, missing (lost) and retired bins,
                           incomplete files, errors (not listed
                           in MNT, so `diff -r` and `rsync -a` see only the tree; open it by name)

No format logic lives here: a path maps to FileReader (packerfs.unpack), which
reads only the blocks a range needs, checks each against its CID and decrypts
only the age chunks or CFB blocks touched. Reads run in worker processes
(packerfs.fs.workers; in threads if they all died), in aligned windows
(packerfs.fs.blocks.WindowCache) so the kernel's small sequential requests are
answered from memory while the next window is read.

A *generation* is one CarSet + FileReader. SIGHUP (or a remount) opens a new one
over the same LMDB index, so added CARs appear; open files keep the generation
they were opened in until they are closed, and a generation is closed once it
is superseded and nothing uses it.

Inodes are stable across generations: one per (directory path), (file path,
file version) or (symlink path, target), so a file's attributes and page cache
never change under its inode, and a reload only has to invalidate the names
whose inode changed.

Faults stay local: a read that fails (a block that does not match its CID, a
range in a missing bin) is retried for exactly the range the kernel asked for,
and fails with EIO only if that range itself cannot be read; the failure is
logged once (naming the CAR and offset) and listed in the status file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

import pyfuse3
import trio

from packerfs.fs.readonly import ReadOnlyOperations
from packerfs.errors import IncompleteSet, PackerfsError
from packerfs.fs.blocks import WindowCache
from packerfs.unpack.tree import DIR, FILE, SYMLINK, TreeEntry

log = logging.getLogger("packerfs.fs")

ROOT = pyfuse3.ROOT_INODE
STATUS_NAME = b".packerfs-status"
STATUS_INO = 2
FIRST_INO = 16

FILE_TIMEOUT = 3600.0  # a file or symlink inode's attributes never change
DIR_TIMEOUT = 1.0  # a directory's mode and mtime may change at a reload
ENTRY_TIMEOUT = 60.0  # names whose inode changes at a reload are invalidated
MAX_ERRORS = 100
MAX_LISTED = 100_000  # incomplete files listed in the status file
WINDOW = 1 << 20


def entry_key(entry: TreeEntry) -> tuple:
    if entry.kind == DIR:
        return (DIR, entry.path)
    if entry.kind == FILE:
        return (FILE, entry.path, entry.version)
    return (SYMLINK, entry.path, entry.target)


def _child(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Generation:
    """One CarSet and its FileReader; reference-counted by open files and reads in flight."""

    def __init__(self, number: int, carset, reader, info: dict):
        self.number = number
        self.carset = carset
        self.reader = reader
        self.tree = reader.tree
        self.users = 0
        self.on_close = None  # called with the number once closed (the view tells its worker processes)
        self.superseded = False
        self.closed = False
        self.lock = threading.Lock()
        self.summary = self._summarize(info)  # the status file's part that depends on the CARs only
        self.blocks_4k = sum(-(-fv.size // 4096) for fv in self.tree.files.values())

    def _summarize(self, info: dict) -> dict:
        carset, tree = self.carset, self.tree
        incomplete = []
        count = 0
        for path in sorted(tree.files):
            entry = tree.entries[path]
            if entry.complete:
                continue
            count += 1
            if len(incomplete) < MAX_LISTED:
                incomplete.append({
                    "path": os.fsdecode(path),
                    "size": entry.size,
                    "parts": entry.parts,
                    "missing_parts": list(entry.missing_parts),
                    "missing_bins": list(entry.missing_bins),
                })
        snapshot = tree.snapshot
        return {
            "complete": not count and not tree.missing_bins and not carset.problems and not tree.lost,
            "snapshot": snapshot.id if snapshot is not None else None,
            "snapshot_time_ns": snapshot.time_ns if snapshot is not None else None,
            "retired_bins": list(tree.retired_bins),
            "lost": list(tree.lost),
            "notes": list(tree.notes),
            "dataset": carset.dataset.hex() if carset.dataset else None,
            "cipher": carset.cipher,
            "recipients": list(carset.recipients),
            "cars": [car.name for car in carset.cars],
            "bins": [car.bin for car in carset.cars],
            "missing_bins": list(tree.missing_bins),
            "incomplete": incomplete,
            "incomplete_count": count,
            "skipped_cars": list(carset.problems),
            "ignored_cars": list(carset.ignored),
            "duplicate_cars": list(carset.duplicates),
            "superseded": [os.fsdecode(p) for p in tree.shadowed[:MAX_LISTED]],
            "files": len(tree.files),
            "bytes": sum(fv.size for fv in tree.files.values()),
            "generation": self.number,
            **info,
        }

    def acquire(self) -> None:
        with self.lock:
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            done = self.superseded and self.users == 0 and not self.closed
            if done:
                self.closed = True
        if done:
            self._close()

    def supersede(self) -> None:
        with self.lock:
            self.superseded = True
            done = self.users == 0 and not self.closed
            if done:
                self.closed = True
        if done:
            self._close()

    def _close(self) -> None:
        log.info("generation %d closed", self.number)
        self.carset.close()
        if self.on_close is not None:
            self.on_close(self.number)

    def has(self, key: tuple) -> bool:
        entry = self.tree.entries.get(key[1])
        return entry is not None and entry_key(entry) == key


class ReverseState:
    """What the status file reports; shared by the FUSE handlers and the reload thread."""

    def __init__(self, info: dict):
        self.lock = threading.Lock()
        self.info = dict(info)  # static: cars_dir, state_dir, mountpoint, pid, log
        self.errors: list[str] = []
        self.reloads = 0
        self.changed_ns = time.time_ns()

    def add_error(self, message: str) -> bool:
        """Record an error; True if it is new (worth a log line)."""
        with self.lock:
            if message in self.errors:
                return False
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(message)
            return True

    def status(self, gen: Generation) -> dict:
        with self.lock:
            errors = list(self.errors)
            reloads = self.reloads
        return {"state": "ready", **gen.summary, "errors": errors, "reloads": reloads, **self.info}


@dataclass
class _Handle:
    inode: int
    gen: Generation | None = None
    path: bytes = b""
    size: int = 0
    data: bytes = b""  # the status file's contents, taken at open
    next_offset: int = 0


class ReverseView(ReadOnlyOperations):
    supports_dot_lookup = False

    def __init__(self, gen: Generation, state: ReverseState, *, threads: int = 4, window: int = WINDOW,
                 cache_bytes: int = 64 << 20, ahead: int = 3, workers=None):
        """`workers`: a packerfs.fs.workers.ProcessReaders whose workers have opened `gen` (see
        packerfs.fs.reverse); reads fall back to threads on the generation's own FileReader if
        every worker process died."""
        super().__init__()
        self.workers = workers
        gen.on_close = self._closed
        self.gen = gen
        self.generations = [gen]  # live ones, newest last (open files may hold older ones)
        self.state = state
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.mount_ns = time.time_ns()
        self.limiter = trio.CapacityLimiter(threads)
        self.cache = WindowCache(self._read_window, window=window, capacity=max(4, cache_bytes // window), ahead=ahead,
                                 serialize=workers is None)
        self.inodes: dict[tuple, int] = {(DIR, b""): ROOT}
        self.nodes: dict[int, tuple[tuple, TreeEntry]] = {}
        self.next_ino = FIRST_INO
        self.gone: set[int] = set()  # inodes whose names a reload invalidated
        self.handles: dict[int, _Handle] = {}
        self.listings: dict[int, list[TreeEntry]] = {}
        self.next_fh = 1
        gen.acquire()  # the current generation is in use until superseded
        root = gen.tree.lookup(b"")
        self.nodes[ROOT] = ((DIR, b""), root)
        if gen.tree.lookup(STATUS_NAME) is not None:
            log.warning("the tree has its own %s at the top; the mount's status file hides it", STATUS_NAME.decode())

    # ------------------------------------------------------------ generations

    def install(self, gen: Generation) -> int:
        """Make `gen` current (trio thread). Returns how many cached names were invalidated."""
        old = self.gen
        gen.acquire()
        gen.on_close = self._closed
        self.gen = gen
        self.generations.append(gen)
        stale = 0
        for ino, (key, entry) in list(self.nodes.items()):
            if gen.has(key):
                self.gone.discard(ino)
                if key[0] == DIR and old.tree.entries.get(key[1]) != gen.tree.entries[key[1]]:
                    self._invalidate_attributes(ino)  # a directory's mode or mtime changed
                continue
            if ino == ROOT or ino in self.gone:
                continue
            self.gone.add(ino)  # still answered (open files may use it), no longer found by name
            parent_path, _, name = entry.path.rpartition(b"/")
            parent = self.inodes.get((DIR, parent_path))
            if parent is not None:
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
                stale += 1
        root = gen.tree.lookup(b"")
        self.nodes[ROOT] = ((DIR, b""), root)
        with self.state.lock:
            self.state.reloads += 1
            self.state.changed_ns = time.time_ns()
        self._retire(old)
        return stale

    @staticmethod
    def _invalidate_attributes(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)  # attributes only: never waits for a read
        except OSError:
            pass  # the kernel does not have it cached

    def _retire(self, gen: Generation) -> None:
        gen.supersede()
        gen.release()
        self.generations = [g for g in self.generations if not g.closed]

    def _closed(self, number: int) -> None:
        """A generation closed: its worker processes close theirs too (after the reads sent before)."""
        workers = self.workers
        if workers is None or not workers.alive:
            return
        from packerfs.fs.reverse import close_message

        async def tell() -> None:
            errors = await workers.control(close_message(number))
            for error in errors:
                log.warning("closing generation %d: %s", number, error)

        try:
            trio.lowlevel.spawn_system_task(tell)
        except RuntimeError:
            pass  # not in trio (at unmount): the workers are stopped anyway

    def close(self) -> None:
        """At unmount: close every generation."""
        self.workers = None  # stopped by the caller
        for gen in self.generations:
            if not gen.closed:
                gen.closed = True
                gen._close()
        self.generations = []

    # ------------------------------------------------------------ inodes

    def _ino(self, entry: TreeEntry) -> int:
        key = entry_key(entry)
        ino = self.inodes.get(key)
        if ino is None:
            ino = self.inodes[key] = self.next_ino
            self.next_ino += 1
        self.nodes[ino] = (key, entry)
        return ino

    def _node(self, inode: int) -> TreeEntry:
        """The entry an inode stands for: the current generation's, or the one it was made from."""
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        key, entry = node
        if key[0] == DIR:
            current = self.gen.tree.entries.get(key[1])
            if current is not None and current.kind == DIR:
                return current
        return entry

    # ------------------------------------------------------------ attributes

    def _attr(self, inode: int, entry: TreeEntry | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = 128 << 10
        attr.st_nlink = 1
        if entry is None:  # the status file
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_size = len(self._status())
            mtime = self.state.changed_ns
            attr.attr_timeout = 0.0
            attr.entry_timeout = ENTRY_TIMEOUT
        else:
            mode = stat.S_IMODE(entry.mode)
            if entry.kind == DIR:
                attr.st_mode = stat.S_IFDIR | mode
                attr.st_size = 0
                attr.attr_timeout = DIR_TIMEOUT
            elif entry.kind == FILE:
                attr.st_mode = stat.S_IFREG | mode
                attr.st_size = entry.size
                attr.attr_timeout = FILE_TIMEOUT
            else:
                attr.st_mode = stat.S_IFLNK | mode
                attr.st_size = len(entry.target or b"")
                attr.attr_timeout = FILE_TIMEOUT
            attr.entry_timeout = ENTRY_TIMEOUT
            mtime = entry.mtime_ns if entry.mtime_ns is not None else self.mount_ns
        attr.st_blocks = -(-attr.st_size // 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    def _status(self) -> bytes:
        return (json.dumps(self.state.status(self.gen), indent=1) + "\n").encode()

    async def getattr(self, inode, ctx=None):
        if inode == STATUS_INO:
            return self._attr(STATUS_INO, None)
        return self._attr(inode, self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if parent.kind != DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if parent_inode == ROOT and name == STATUS_NAME:
            return self._attr(STATUS_INO, None)
        if name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)  # the kernel answers these itself
        entry = self.gen.tree.entries.get(_child(parent.path, name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._ino(entry), entry)

    async def forget(self, inode_list):
        return None  # inodes are kept: one per path and version, bounded by the tree

    async def readlink(self, inode, ctx):
        entry = self._node(inode)
        if entry.kind != SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target

    # ------------------------------------------------------------ directories

    def _new_fh(self) -> int:
        fh = self.next_fh
        self.next_fh += 1
        return fh

    async def opendir(self, inode, ctx):
        entry = self._node(inode)
        if entry.kind != DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        tree = self.gen.tree
        current = tree.entries.get(entry.path)
        if current is None or current.kind != DIR:
            raise pyfuse3.FUSEError(errno.ENOENT)  # gone at a reload
        fh = self._new_fh()
        self.listings[fh] = tree.listdir(entry.path)
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.listings.get(fh, [])
        for position in range(start_id, len(entries)):
            entry = entries[position]
            if not pyfuse3.readdir_reply(token, entry.name, self._attr(self._ino(entry), entry), position + 1):
                break

    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    # ------------------------------------------------------------ files

    async def open(self, inode, flags, ctx):
        self.refuse_writes(flags)
        fh = self._new_fh()
        info = pyfuse3.FileInfo(fh=fh)
        if inode == STATUS_INO:
            data = self._status()
            self.handles[fh] = _Handle(inode, size=len(data), data=data)
            info.direct_io = True
            info.keep_cache = False
            return info
        entry = self._node(inode)
        if entry.kind != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if entry.kind == DIR else errno.ELOOP)
        key = entry_key(entry)
        gen = next((g for g in reversed(self.generations) if not g.closed and g.has(key)), None)
        if gen is None:
            raise pyfuse3.FUSEError(errno.ESTALE)  # replaced by a newer version at a reload
        gen.acquire()
        self.handles[fh] = _Handle(inode, gen=gen, path=entry.path, size=entry.size)
        info.keep_cache = True  # a file version's bytes never change
        return info

    async def _read_window(self, key, offset: int, size: int) -> bytes:
        gen, _, path = key
        gen.acquire()
        try:
            if self.workers is not None and self.workers.alive:
                return await self.workers.read(key, offset, size)
            return await trio.to_thread.run_sync(gen.reader.read, path, offset, size, limiter=self.limiter)
        finally:
            gen.release()

    async def read(self, fh, off, size):
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.gen is None:
            return handle.data[off : off + size]
        sequential = abs(off - handle.next_offset) <= 2 * self.cache.window
        handle.next_offset = off + size
        key = (handle.gen, handle.inode, handle.path)
        try:
            return await self.cache.read(key, handle.size, off, size, sequential=sequential)
        except Exception as exc:  # noqa: BLE001 - a failed window: retry just this request below
            first = exc
        end = min(off + size, handle.size)
        window = self.cache.window
        if off // window == (end - 1) // window and end - off == min(window, handle.size - off // window * window):
            error = first  # the request was the whole window: nothing narrower to try
        else:
            try:
                return await self._read_window(key, off, size)
            except Exception as exc:  # noqa: BLE001 - any failure is EIO for this read only
                error = exc
        self._read_failed(handle, off, size, error)
        raise pyfuse3.FUSEError(errno.EIO) from None

    def _read_failed(self, handle: _Handle, offset: int, size: int, exc: Exception) -> None:
        name = os.fsdecode(handle.path)
        if isinstance(exc, PackerfsError):
            message = f"{name}: {exc}" if not str(exc).startswith(name) else str(exc)
        else:
            message = f"{name}: {type(exc).__name__}: {exc}"
        if self.state.add_error(message):
            kind = "missing data" if isinstance(exc, IncompleteSet) else "read failed"
            log.error("%s: %s at offset %d (+%d), EIO: %s", name, kind, offset, size, exc)
            if not isinstance(exc, (PackerfsError, OSError)):
                log.error("unexpected error while reading %s", name, exc_info=exc)

    async def release(self, fh):
        handle = self.handles.pop(fh, None)
        if handle is not None and handle.gen is not None:
            handle.gen.release()
            if handle.gen.closed:
                self.generations = [g for g in self.generations if not g.closed]

    async def flush(self, fh):
        return None

    async def statfs(self, ctx):
        tree = self.gen.tree
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = self.gen.blocks_4k
        out.f_bfree = out.f_bavail = 0
        out.f_files = len(tree.entries) + 1
        out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out
