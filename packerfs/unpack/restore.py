"""restore(): write the original tree out of a CAR set.

Order of work, each step only after the previous one succeeded:

1. The tree is built from every manifest (tree.py): every path and name is
   checked (relative, no `..`, `.` or empty components, no NUL), and an entry
   lying under a symlink or file of its own or a later bin is refused. Any
   refusal is a FormatError naming the CAR and the entry; nothing is written.
2. Every target is checked against what out_dir already holds (lstat, never
   following a link). Without `force` any existing file, symlink or
   non-directory in the way is an error naming it; with `force` it is
   replaced. An existing directory is never replaced by a file or symlink.
3. The key is tried on the first complete file (KeyProblem before writing).
4. Directories are created (mode 0700 while we work), then files, then
   symlinks, then the directories' modes and mtimes, deepest first.

Every directory is reached by openat() from out_dir one component at a time
with O_NOFOLLOW|O_DIRECTORY, and files are created with O_EXCL|O_NOFOLLOW, so
nothing is ever written through a symlink, whether it was there before or
made earlier by this restore. A file's content is written to a short
temporary name in its directory, `.pfs-XXXXXXXX.partial` (random per run, so
it fits whatever the final name's length), straight from the authenticated
plaintext stream (every block CID-checked; age chunk tags; the OpenPGP MDC at
the end), and renamed to its name only after the whole stream verified and its
size matched; on any error the temporary file is removed. Files with parts in
missing bins are not written; the report lists them (the CLI exits 3).

Modes: an existing out_dir keeps its own mode. Restored entries lose their
setuid, setgid and world-write bits, as tar does for a user who did not ask
for `--same-permissions` (same_permissions=True keeps every bit).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from packerfs.crypt import KeyRing
from packerfs.errors import EXIT_INCOMPLETE, EXIT_OK, FormatError, PackerfsError
from packerfs.unpack.carset import CarSet
from packerfs.unpack.reader import FileReader
from packerfs.unpack.tree import DIR, FILE, SYMLINK, TreeEntry, name_of, parent_of

PARTIAL_PREFIX = b".pfs-"
PARTIAL_SUFFIX = b".partial"  # `.pfs-` + 8 hex digits + `.partial`: 21 bytes, well under NAME_MAX
# dropped from every restored mode unless same_permissions: what a CAR must not hand a user unasked
UNSAFE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RestoreReport:
    out_dir: str
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    incomplete: list[TreeEntry] = field(default_factory=list)  # files not written: parts in missing bins
    missing_bins: list[int] = field(default_factory=list)
    skipped_cars: list[str] = field(default_factory=list)  # one line per unusable CAR
    superseded: list[bytes] = field(default_factory=list)  # older entries under a path that became a file/symlink

    @property
    def complete(self) -> bool:
        return not self.incomplete and not self.missing_bins and not self.skipped_cars

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.complete else EXIT_INCOMPLETE

    def lines(self) -> list[str]:
        out = [f"restored {self.files} files, {self.dirs} directories, {self.symlinks} symlinks ({self.bytes} bytes) to {self.out_dir}"]
        out += self.skipped_cars
        if self.missing_bins:
            out.append("missing bins: " + ", ".join(str(b) for b in self.missing_bins))
        for e in self.incomplete:
            bins = ", ".join(str(b) for b in e.missing_bins) or "unknown"
            parts = ", ".join(str(p) for p in e.missing_parts)
            out.append(f"incomplete, not restored: {os.fsdecode(e.path)} (part {parts} of {e.parts} missing; bin {bins})")
        return out


class _Dirs:
    """Directory descriptors under out_dir, each opened from its parent without following links."""

    def __init__(self, root_fd: int, out: bytes, limit: int = 128, same_permissions: bool = False):
        self.root_fd = root_fd
        self.out = out
        self.limit = limit
        self.fds: OrderedDict[bytes, int] = OrderedDict()
        self.keep = 0o7777 if same_permissions else 0o7777 & ~UNSAFE_BITS
        self.token = secrets.token_hex(4).encode()  # this run's temporary names

    def mode(self, mode: int) -> int:
        return mode & self.keep

    def partial_name(self) -> bytes:
        return PARTIAL_PREFIX + self.token + PARTIAL_SUFFIX

    def new_token(self) -> None:
        self.token = secrets.token_hex(4).encode()

    def display(self, path: bytes) -> str:
        return os.fsdecode(os.path.join(self.out, path) if path else self.out)

    def get(self, path: bytes) -> int:
        if path == b"":
            return self.root_fd
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        parent = self.get(parent_of(path))
        try:
            fd = os.open(name_of(path), _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise PackerfsError(
                    f"{self.display(path)}: is not a directory (a symlink?); refusing to write through it"
                ) from None
            raise
        self.fds[path] = fd
        while len(self.fds) > self.limit:
            _, old = self.fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _lstat(path: bytes):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _preflight(out: bytes, entries: list[TreeEntry], force: bool) -> None:
    """Refuse (before writing anything) to replace what out_dir already holds, unless forced."""
    st = _lstat(out)
    if st is None:
        return
    if not stat.S_ISDIR(os.stat(out).st_mode):
        raise PackerfsError(f"{os.fsdecode(out)}: exists and is not a directory")
    state: dict[bytes, str] = {b"": "dir"}  # path -> "dir" (exists) | "new" (absent or to be replaced)
    conflicts: list[str] = []
    for entry in entries:
        if entry.path == b"":
            continue
        if state.get(parent_of(entry.path)) != "dir":
            state[entry.path] = "new"
            continue
        full = os.path.join(out, entry.path)
        st = _lstat(full)
        if st is None:
            state[entry.path] = "new"
        elif stat.S_ISDIR(st.st_mode):
            if entry.kind != DIR:
                raise PackerfsError(
                    f"{os.fsdecode(full)}: is a directory where the CARs have a {entry.kind}; "
                    f"remove it first (--force never replaces a directory)"
                )
            state[entry.path] = "dir"
        else:
            conflicts.append(os.fsdecode(full))
            state[entry.path] = "new"
    if conflicts and not force:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise PackerfsError(f"{conflicts[0]}: already exists{more}; nothing was written; use --force to overwrite")


def _set_time(fd_or_name, mtime_ns: int | None, what: str, **kw) -> None:
    if mtime_ns is None:
        return
    try:
        os.utime(fd_or_name, ns=(mtime_ns, mtime_ns), **kw)
    except (OverflowError, ValueError):
        raise FormatError(f"{what}: modification time {mtime_ns} ns cannot be set") from None


def restore(
    carset: CarSet,
    out_dir: str,
    keyring: KeyRing | None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    same_permissions: bool = False,
) -> RestoreReport:
    """Write the CAR set's tree into out_dir. progress(n) is called with plaintext bytes written.

    same_permissions: keep setuid, setgid and world-write bits (dropped by default)."""
    advance = progress or (lambda n: None)
    if not carset.cars:
        why = "; ".join(carset.problems) if carset.problems else "no *.car files given"
        raise PackerfsError(f"no usable packerfs CAR files: {why}")
    reader = FileReader(carset, keyring)
    tree = reader.tree  # FormatError for any unsafe or inconsistent manifest entry
    entries = list(tree)
    out = os.fsencode(os.path.abspath(out_dir))
    report = RestoreReport(
        out_dir=os.fsdecode(out),
        missing_bins=list(tree.missing_bins),
        skipped_cars=list(carset.problems),
        superseded=list(tree.shadowed),
    )
    report.incomplete = [e for e in entries if e.kind == FILE and not e.complete]
    dirs = [e for e in entries if e.kind == DIR]
    files = [e for e in entries if e.kind == FILE and e.complete]
    links = [e for e in entries if e.kind == SYMLINK]

    try:
        _preflight(out, entries, force)
    except OSError as exc:
        raise PackerfsError(f"{os.fsdecode(exc.filename or out)}: {exc.strerror or exc}") from None
    if files and carset.cipher != "plain":
        reader.plaintext(files[0].path)  # KeyProblem (or a damaged header) before anything is written

    try:
        existed = os.path.isdir(out)
        os.makedirs(out, exist_ok=True)
        root_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PackerfsError(f"{os.fsdecode(out)}: {exc.strerror or exc}") from None
    fds = _Dirs(root_fd, out, same_permissions=same_permissions)
    current = b""
    try:
        for entry in dirs:
            current = entry.path
            if entry.path:
                _make_dir(fds, entry, force)
            report.dirs += 1
        for entry in files:
            current = entry.path
            report.bytes += _write_file(fds, reader, entry, force, advance)
            report.files += 1
        for entry in links:
            current = entry.path
            _make_symlink(fds, entry, force)
            report.symlinks += 1
        for entry in sorted(dirs, key=lambda e: (-e.path.count(b"/") if e.path else 1, e.path)):
            current = entry.path
            if entry.path == b"" and entry.mtime_ns is None:
                continue  # no manifest describes the root: leave out_dir as it is
            fd = fds.get(entry.path)
            if entry.path or not existed:  # an existing out_dir keeps its mode
                os.fchmod(fd, fds.mode(entry.mode))
            _set_time(fd, entry.mtime_ns, fds.display(entry.path))
    except OSError as exc:
        raise PackerfsError(f"{fds.display(current)}: {exc.strerror or exc}") from None
    finally:
        fds.close()
        os.close(root_fd)
    return report


def _exists_error(fds: _Dirs, path: bytes) -> PackerfsError:
    return PackerfsError(f"{fds.display(path)}: already exists; use --force to overwrite")


def _make_dir(fds: _Dirs, entry: TreeEntry, force: bool) -> None:
    parent = fds.get(parent_of(entry.path))
    name = name_of(entry.path)
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        return
    except FileExistsError:
        pass
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        os.fchmod(fds.get(entry.path), stat.S_IMODE(st.st_mode) | 0o700)
        return
    if not force:
        raise _exists_error(fds, entry.path)
    os.unlink(name, dir_fd=parent)
    os.mkdir(name, 0o700, dir_fd=parent)


def _clear_for(fds: _Dirs, parent: int, name: bytes, path: bytes, force: bool) -> None:
    """Make room for a file or symlink at name: nothing there, or (forced) a non-directory removed."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise PackerfsError(f"{fds.display(path)}: is a directory; --force never replaces a directory")
    if not force:
        raise _exists_error(fds, path)
    os.unlink(name, dir_fd=parent)  # removes a symlink itself, never what it points to


def _create_partial(fds: _Dirs, parent: int) -> tuple[bytes, int]:
    """A new temporary file in `parent`: (its name, its descriptor)."""
    for _ in range(16):
        partial = fds.partial_name()
        try:
            return partial, os.open(partial, _NEW_FILE, 0o600, dir_fd=parent)
        except FileExistsError:  # a leftover of a killed run, or a restored entry of that name
            fds.new_token()
    raise PackerfsError(f"{fds.display(b'')}: cannot find a free temporary name")


def _write_file(fds: _Dirs, reader: FileReader, entry: TreeEntry, force: bool, advance) -> int:
    parent = fds.get(parent_of(entry.path))
    name = name_of(entry.path)
    partial, fd = _create_partial(fds, parent)
    done = False
    written = 0
    try:
        written = _fill(fds, fd, reader, entry, advance)
        st = _lstat_at(parent, name)
        if st is not None and (stat.S_ISDIR(st.st_mode) or not force):
            if stat.S_ISDIR(st.st_mode):
                raise PackerfsError(f"{fds.display(entry.path)}: is a directory; --force never replaces a directory")
            raise _exists_error(fds, entry.path)
        os.rename(partial, name, src_dir_fd=parent, dst_dir_fd=parent)  # replaces a file or symlink itself
        done = True
    finally:
        if not done:
            try:
                os.unlink(partial, dir_fd=parent)
            except OSError:
                pass
    return written


def _lstat_at(parent: int, name: bytes):
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _fill(fds: _Dirs, fd: int, reader: FileReader, entry: TreeEntry, advance) -> int:
    """Write the entry's verified plaintext to `fd` (closed on return), set its mode and time."""
    written = 0
    try:
        for chunk in reader.iter_verified(entry.path):
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            written += len(chunk)
            advance(len(chunk))
        if written != entry.size:
            raise FormatError(
                f"{os.fsdecode(entry.path)}: decrypted {written} bytes, the manifest says {entry.size}"
            )
        os.fchmod(fd, fds.mode(entry.mode))
        _set_time(fd, entry.mtime_ns, fds.display(entry.path))
    finally:
        os.close(fd)
    return written


def _make_symlink(fds: _Dirs, entry: TreeEntry, force: bool) -> None:
    parent = fds.get(parent_of(entry.path))
    name = name_of(entry.path)
    _clear_for(fds, parent, name, entry.path, force)
    os.symlink(entry.target, name, dir_fd=parent)
    _set_time(name, entry.mtime_ns, fds.display(entry.path), dir_fd=parent, follow_symlinks=False)
