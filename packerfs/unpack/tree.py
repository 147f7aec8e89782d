"""The original tree, as the manifests of a CAR set describe it.

Every bin's manifest lists the directories, symlinks and file parts it holds.
The tree merges them:

* a file *version* is the set of its parts (possibly in several bins); it is
  complete when every part 1..parts is present, and its missing parts are
  attributed to bins (a split file's parts lie in consecutive bins);
* when a path has several candidates, the newest wins: among file versions the
  highest version number; across kinds (a directory replaced by a file, say)
  the one recorded in the later bin, since a rescan only ever adds bins;
* an entry under a path whose newest kind is not a directory is dropped as
  superseded if it is older than that path's entry, and refused otherwise (a
  manifest that puts `a/passwd` under a symlink `a` of the same bin is an
  attack, not history).

Every path and name is checked before it is believed: relative, no empty,
`.` or `..` components, no NUL bytes. A bad one is a FormatError naming the CAR
and the entry (or, for `verify`, a problem line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

from packerfs.errors import FormatError

DIR = "dir"
FILE = "file"
SYMLINK = "symlink"
DEFAULT_DIR_MODE = 0o755


def show(path: bytes) -> str:
    """A path for a one-line message: decoded where possible, control bytes escaped, quoted."""
    return repr(path.decode("utf-8", "backslashreplace"))


def path_problem(path, *, allow_root: bool = False) -> str | None:
    """Why `path` cannot be a relative path inside the output directory, or None if it can."""
    if not isinstance(path, bytes):
        return "is not a byte string"
    if path == b"":
        return None if allow_root else "is empty"
    if b"\0" in path:
        return "contains a NUL byte"
    if path.startswith(b"/"):
        return "is absolute"
    for part in path.split(b"/"):
        if part == b"":
            return "has an empty component"
        if part == b"..":
            return "has a '..' component"
        if part == b".":
            return "has a '.' component"
    return None


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def name_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


@dataclass
class PartRef:
    part: int
    bin: int
    car: str  # path of the CAR holding it
    name: bytes  # its path inside that CAR's UnixFS tree
    offset: int  # in the stream
    length: int
    cid: bytes


@dataclass
class FileVersion:
    path: bytes
    version: int
    size: int  # plaintext
    stream: int
    parts: int
    mode: int
    mtime_ns: int
    refs: dict[int, PartRef] = field(default_factory=dict)
    missing_bins: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return len(self.refs) == self.parts

    @property
    def missing_parts(self) -> list[int]:
        return [p for p in range(1, self.parts + 1) if p not in self.refs]

    @property
    def bins(self) -> tuple[int, ...]:
        return tuple(sorted({r.bin for r in self.refs.values()}))

    def ordered(self) -> list[PartRef]:
        return [self.refs[p] for p in sorted(self.refs)]


@dataclass(frozen=True)
class TreeEntry:
    """One restored path. `complete` is False for a file with parts in missing bins."""

    path: bytes
    kind: str  # "dir" | "file" | "symlink"
    mode: int
    mtime_ns: int | None  # None for a directory no manifest describes (an ancestor of something)
    size: int  # plaintext size; symlinks: target length; dirs: 0
    target: bytes | None = None
    complete: bool = True
    missing_bins: tuple[int, ...] = ()
    missing_parts: tuple[int, ...] = ()
    parts: int = 0
    bins: tuple[int, ...] = ()
    version: int | None = None

    @property
    def name(self) -> bytes:
        return name_of(self.path)


@dataclass
class _Cand:
    kind: str
    recency: int
    car: object
    index: int
    entry: dict | None = None
    version: FileVersion | None = None


@dataclass
class SymlinkRecord:
    path: bytes
    target: bytes
    cid: bytes
    bin: int
    car: str


class Tree:
    """Read-only after build(); safe to share between threads."""

    def __init__(self) -> None:
        self.entries: dict[bytes, TreeEntry] = {}
        self.files: dict[bytes, FileVersion] = {}  # the chosen version of each regular file
        self.versions: list[FileVersion] = []  # every file version seen, chosen or not
        self.symlinks: list[SymlinkRecord] = []  # every symlink entry seen
        self.children: dict[bytes, list[bytes]] = {}
        self.shadowed: list[bytes] = []  # older entries under a path that is no longer a directory
        self.problems: list[str] = []  # build(strict=False) collects instead of raising
        self.missing_bins: list[int] = []

    # ------------------------------------------------------------ queries

    def lookup(self, path: bytes | str) -> TreeEntry | None:
        return self.entries.get(os.fsencode(path))

    def listdir(self, path: bytes | str) -> list[TreeEntry]:
        path = os.fsencode(path)
        prefix = path + b"/" if path else b""
        return [self.entries[prefix + name] for name in self.children.get(path, [])]

    def __iter__(self) -> Iterator[TreeEntry]:
        for path in sorted(self.entries):
            yield self.entries[path]

    def incomplete(self) -> list[TreeEntry]:
        return [e for e in self if not e.complete]

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, carset, strict: bool = True) -> "Tree":
        tree = cls()
        tree._build(carset, strict)
        return tree

    def _build(self, carset, strict: bool) -> None:
        def fail(car, index: int, path, reason: str) -> None:
            where = f"manifest entry {index}"
            if isinstance(path, bytes):
                where += f" ({show(path)})"
            err = FormatError(
                f"{where}: {reason}",
                path=car.path if car is not None else None,
                offset=car.manifest_offset if car is not None else None,
            )
            if strict:
                raise err
            self.problems.append(str(err))

        dirs: dict[bytes, _Cand] = {}
        links: dict[bytes, _Cand] = {}
        versions: dict[int, FileVersion] = {}
        origin: dict[int, tuple] = {}  # version -> (car, index) of its first entry

        for car in carset.cars:
            for index, e in enumerate(car.entries):
                path, kind = e["path"], e["kind"]
                why = path_problem(path, allow_root=(kind == DIR))
                if why:
                    fail(car, index, path, f"path {why}; refusing it")
                    continue
                if kind == DIR:
                    old = dirs.get(path)
                    if old is None or car.bin > old.recency:
                        dirs[path] = _Cand(DIR, car.bin, car, index, e)
                elif kind == SYMLINK:
                    if b"\0" in e["target"]:
                        fail(car, index, path, "symlink target contains a NUL byte")
                        continue
                    self.symlinks.append(SymlinkRecord(path, e["target"], e["cid"], car.bin, car.path))
                    old = links.get(path)
                    if old is not None and old.recency == car.bin:
                        fail(car, index, path, "the path appears twice in one bin")
                        continue
                    if old is None or car.bin > old.recency:
                        links[path] = _Cand(SYMLINK, car.bin, car, index, e)
                else:
                    why = path_problem(e["name"])
                    if why:
                        fail(car, index, path, f"name in the CAR {show(e['name'])} {why}; refusing it")
                        continue
                    v = e["version"]
                    fv = versions.get(v)
                    if fv is None:
                        fv = versions[v] = FileVersion(
                            path, v, e["size"], e["stream"], e["parts"], e["mode"], e["mtime_ns"]
                        )
                        origin[v] = (car, index)
                    else:
                        same = (fv.path, fv.size, fv.stream, fv.parts, fv.mode, fv.mtime_ns) == (
                            path, e["size"], e["stream"], e["parts"], e["mode"], e["mtime_ns"]
                        )
                        if not same:
                            fail(car, index, path, f"disagrees with another part of file version {v}")
                            continue
                    if e["size"] < 0 or e["stream"] < 0:
                        fail(car, index, path, "negative size")
                        continue
                    if carset.cipher == "plain" and e["size"] != e["stream"]:
                        fail(car, index, path, f"plain file of {e['size']} bytes has a stream of {e['stream']}")
                        continue
                    ref = PartRef(e["part"], car.bin, car.path, e["name"], e["offset"], e["length"], e["cid"])
                    old = fv.refs.get(ref.part)
                    if old is not None:
                        if (old.cid, old.offset, old.length) != (ref.cid, ref.offset, ref.length):
                            fail(car, index, path, f"part {ref.part} of version {v} differs from the one in bin {old.bin}")
                        continue
                    fv.refs[ref.part] = ref

        # parts must tile the stream
        missing = set(carset.missing_bins)
        for v in sorted(versions):
            fv = versions[v]
            car, index = origin[v]
            refs = fv.ordered()
            why = None
            for a, b in zip(refs, refs[1:]):
                if b.part == a.part + 1 and a.offset + a.length != b.offset:
                    why = f"parts {a.part} and {b.part} do not meet (gap or overlap in the stream)"
            if refs and refs[0].part == 1 and refs[0].offset != 0:
                why = "part 1 does not start at stream offset 0"
            if refs and refs[-1].part == fv.parts and refs[-1].offset + refs[-1].length != fv.stream:
                why = f"the last part ends at {refs[-1].offset + refs[-1].length}, not at the stream size {fv.stream}"
            if why:
                fail(car, index, fv.path, f"file version {v}: {why}")
                continue
            inferred = set()
            for p in fv.missing_parts:
                near = min(refs, key=lambda r: abs(r.part - p))
                guess = near.bin + (p - near.part)
                if guess >= 1 and guess not in carset.by_bin:
                    inferred.add(guess)
            fv.missing_bins = tuple(sorted(inferred))
            missing |= inferred
            self.versions.append(fv)
        self.missing_bins = sorted(missing)

        files: dict[bytes, _Cand] = {}
        for fv in self.versions:
            old = files.get(fv.path)
            if old is None or fv.version > old.version.version:
                files[fv.path] = _Cand(FILE, min(fv.bins), None, 0, version=fv)

        chosen: dict[bytes, _Cand] = {}
        for table in (dirs, links, files):
            for path, cand in table.items():
                old = chosen.get(path)
                if old is None or cand.recency > old.recency:
                    chosen[path] = cand
                elif cand.recency == old.recency:
                    car = cand.car or carset.by_bin.get(cand.recency)
                    fail(car, cand.index, path, f"the path is both a {old.kind} and a {cand.kind} in bin {cand.recency}")
                    if old.kind != DIR:
                        chosen[path] = _Cand(DIR, -1, None, 0)  # neither: keep the position a plain directory

        dropped: set[bytes] = set()
        for path in sorted(chosen):
            cand = chosen[path]
            if path == b"":
                if cand.kind != DIR:
                    raise AssertionError("root must be a directory")  # path_problem refused it
                self._add_dir(path, cand)
                continue
            ancestor = parent_of(path)
            blocked = None
            while True:
                if ancestor in dropped:
                    blocked = "dropped"
                    break
                above = chosen.get(ancestor)
                if above is not None and above.kind != DIR:
                    blocked = above
                    break
                if ancestor == b"":
                    break
                ancestor = parent_of(ancestor)
            if blocked == "dropped":
                dropped.add(path)
                self.shadowed.append(path)
                continue
            if blocked is not None:
                if cand.recency < blocked.recency:
                    dropped.add(path)
                    self.shadowed.append(path)
                    continue
                car = cand.car or carset.by_bin.get(min(cand.version.bins))
                fail(
                    car,
                    cand.index if cand.car else _entry_index(car, cand.version),
                    path,
                    f"lies under {show(ancestor)}, which is a {blocked.kind} in bin {blocked.recency}; refusing it",
                )
                dropped.add(path)
                continue
            if cand.kind == DIR:
                self._add_dir(path, cand)
            elif cand.kind == SYMLINK:
                e = cand.entry
                self.entries[path] = TreeEntry(
                    path, SYMLINK, e["mode"], e["mtime_ns"], len(e["target"]), target=e["target"],
                    bins=(cand.recency,),
                )
            else:
                fv = cand.version
                self.files[path] = fv
                self.entries[path] = TreeEntry(
                    path, FILE, fv.mode, fv.mtime_ns, fv.size, complete=fv.complete,
                    missing_bins=fv.missing_bins, missing_parts=tuple(fv.missing_parts),
                    parts=fv.parts, bins=fv.bins, version=fv.version,
                )
        if b"" not in self.entries:
            self.entries[b""] = TreeEntry(b"", DIR, DEFAULT_DIR_MODE, None, 0)
        # ancestors no manifest describes (a crafted or partial set) become plain directories
        for path in list(self.entries):
            up = path
            while up:
                up = parent_of(up)
                if up in self.entries:
                    break
                self.entries[up] = TreeEntry(up, DIR, DEFAULT_DIR_MODE, None, 0)
        for path in sorted(self.entries):
            if path:
                self.children.setdefault(parent_of(path), []).append(name_of(path))
            elif b"" not in self.children:
                self.children[b""] = []
        for path, entry in self.entries.items():
            if entry.kind == DIR:
                self.children.setdefault(path, [])

    def _add_dir(self, path: bytes, cand: _Cand) -> None:
        if cand.entry is None:
            self.entries[path] = TreeEntry(path, DIR, DEFAULT_DIR_MODE, None, 0)
            return
        e = cand.entry
        self.entries[path] = TreeEntry(path, DIR, e["mode"], e["mtime_ns"], 0, bins=(cand.recency,))


def _entry_index(car, fv: FileVersion) -> int:
    for i, e in enumerate(car.entries):
        if e.get("version") == fv.version and e["kind"] == FILE:
            return i
    return 0
