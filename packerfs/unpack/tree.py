"""The original tree, as a CAR set describes it.

With a data-set snapshot in the set (packerfs/snapshot.py; chosen by
packerfs.unpack.snapshots.choose: `--snapshot ID`, else the newest complete
one), the snapshot decides the tree: exactly its paths. Its directories and
symlinks are taken from its own entries; each file joins the manifests' parts
by `version`. A file whose version's parts are not all present is incomplete,
its missing parts attributed to the bins the snapshot entry names (so a file
wholly inside a lost bin is still listed by name). Versions the manifests hold
but the snapshot does not use are ignored (counted). The bins the snapshot
needs are its trailer's `bins`: a needed bin that is absent is *lost* (listed
in missing_bins), a present bin it does not need is *retired*; gaps in the bin
numbers it does not need are nothing.

Without a snapshot (older sets, or the bin holding it is lost) the manifests
are merged, with a warning that deleted files may reappear:

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
and the entry (or, for `verify`, a problem line). Part and bin numbers come
from untrusted manifests (up to 2**63): nothing here allocates or loops per
missing part or bin number; lists of them are capped at MAX_LISTED.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

from packerfs.compress.coding import Coding
from packerfs.errors import FormatError

DIR = "dir"
FILE = "file"
SYMLINK = "symlink"
DEFAULT_DIR_MODE = 0o755
MAX_LISTED = 1000  # missing parts or inferred missing bins listed per file version


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
    coding: object = None  # a compress.coding.Coding (from part 1's entry), None: stored as it is

    @property
    def complete(self) -> bool:
        return len(self.refs) == self.parts

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Runs (first, last) of missing part numbers: one per gap between present parts."""
        out = []
        prev = 0
        for p in sorted(self.refs):
            if p > prev + 1:
                out.append((prev + 1, p - 1))
            prev = p
        if prev < self.parts:
            out.append((prev + 1, self.parts))
        return out

    @property
    def missing_parts(self) -> list[int]:
        """Missing part numbers, at most MAX_LISTED of them."""
        out: list[int] = []
        for first, last in self.missing_ranges():
            out.extend(range(first, min(last, first + MAX_LISTED - len(out) - 1) + 1))
            if len(out) >= MAX_LISTED:
                break
        return out

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
    cid: bytes | None  # None with hidden names: the link has no UnixFS node
    bin: int
    car: str


class Tree:
    """Read-only after build(); safe to share between threads."""

    def __init__(self) -> None:
        self.entries: dict[bytes, TreeEntry] = {}
        self.files: dict[bytes, FileVersion] = {}  # the chosen version of each regular file
        self.versions: list[FileVersion] = []  # every file version the manifests hold, chosen or not
        self.symlinks: list[SymlinkRecord] = []  # every symlink entry seen
        self.children: dict[bytes, list[bytes]] = {}
        self.shadowed: list[bytes] = []  # older entries under a path that is no longer a directory
        self.problems: list[str] = []  # build(strict=False) collects instead of raising
        self.missing_bins: list[int] = []  # bins needed but absent (with a snapshot: lost bins)
        self.snapshot = None  # the SnapshotInfo that decided the tree (None: merged manifests)
        self.notes: list[str] = []  # warnings that do not make the result incomplete
        self.lost: list[str] = []  # lines that do (a newer snapshot is incomplete, …): exit 3
        self.needed_bins: list[int] = []  # with a snapshot: the bins it needs
        self.retired_bins: list[int] = []  # with a snapshot: present bins it does not need
        self.unused_versions = 0  # with a snapshot: file versions in the manifests it does not use
        self._strict = True

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

    @property
    def used_versions(self) -> set[int]:
        return {fv.version for fv in self.files.values()}

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, carset, strict: bool = True, snapshot=None) -> "Tree":
        """`snapshot`: an id, snapshots.LEGACY (merge the manifests), or None: the CarSet's
        `snapshot_choice` (set by snapshots.open_carset), else the newest complete snapshot."""
        tree = cls()
        tree._strict = strict
        if snapshot is None:
            snapshot = getattr(carset, "snapshot_choice", None)
        tree._build(carset, strict, snapshot)
        return tree

    def _build(self, carset, strict: bool, wanted=None) -> None:
        from packerfs.unpack.snapshots import choose

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

        dirs, links = self._collect(carset, fail)
        chosen, self.notes, self.lost = choose(carset, wanted)
        if chosen is not None:
            try:
                self._from_snapshot(carset, fail, chosen)
                self.snapshot = chosen
                return
            except FormatError as exc:
                if strict:
                    raise
                self.problems.append(f"{exc} (merging the bin manifests instead)")
                self.entries, self.files, self.children = {}, {}, {}
                for fv in self.versions:
                    fv.missing_bins = ()
        self._merge(carset, fail, dirs, links)

    def _collect(self, carset, fail):
        """Every manifest entry, checked: the newest dir and symlink per path, and every file version."""
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
                    self.symlinks.append(SymlinkRecord(path, e["target"], e.get("cid"), car.bin, car.path))
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
                    if ("zstd" in e or "padded" in e) and fv.coding is None:
                        try:
                            fv.coding = Coding.from_record(e, e["size"])
                        except FormatError as exc:
                            fail(car, index, path, f"{exc}")
                            continue
                    if carset.cipher == "plain" and e["size"] != e["stream"] and "zstd" not in e and "padded" not in e:
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
        for v in sorted(versions):
            fv = versions[v]
            car, index = origin[v]
            refs = fv.ordered()
            if not refs:
                continue  # every entry of this version was refused (reported above): it has no parts
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
            self.versions.append(fv)
        return dirs, links

    def _from_snapshot(self, carset, fail, chosen) -> None:
        """The chosen snapshot's paths, exactly; files joined to the manifests' parts by version."""
        from packerfs.unpack.snapshots import SnapshotReader

        where = chosen.found[1].car

        def bad(path, reason: str) -> None:
            err = FormatError(f"snapshot {chosen.id} entry {show(path)}: {reason}", path=where)
            if self._strict:
                raise err
            self.problems.append(str(err))

        by_version = {fv.version: fv for fv in self.versions}
        entries: dict[bytes, TreeEntry] = {}
        used: set[int] = set()
        needed_by_files: set[int] = set()
        reader = SnapshotReader(carset, chosen)
        for e in reader.entries():
            path, kind = e["path"], e["kind"]
            why = path_problem(path, allow_root=(kind == DIR))
            if why:
                bad(path, f"path {why}; refusing it")
                continue
            if path in entries:
                bad(path, "the path appears twice in the snapshot")
                continue
            if kind == DIR:
                entries[path] = TreeEntry(path, DIR, e["mode"], e["mtime_ns"], 0)
            elif kind == SYMLINK:
                if b"\0" in e["target"]:
                    bad(path, "symlink target contains a NUL byte")
                    continue
                entries[path] = TreeEntry(path, SYMLINK, e["mode"], e["mtime_ns"], len(e["target"]), target=e["target"])
            else:
                bins = e["bins"]
                coded = getattr(by_version.get(e["version"]), "coding", None) is not None
                if carset.cipher == "plain" and e["size"] != e["stream"] and not coded:
                    bad(path, f"plain file of {e['size']} bytes has a stream of {e['stream']}")
                    continue
                if e["version"] in used:
                    bad(path, f"file version {e['version']} is used by two paths")
                    continue
                fv = by_version.get(e["version"])
                if fv is None:
                    fv = FileVersion(path, e["version"], e["size"], e["stream"], len(bins), e["mode"], e["mtime_ns"])
                else:
                    mine = (fv.path, fv.size, fv.stream, fv.parts, fv.mode, fv.mtime_ns)
                    theirs = (path, e["size"], e["stream"], len(bins), e["mode"], e["mtime_ns"])
                    if mine != theirs:
                        fields = ("path", "size", "stream size", "parts", "mode", "mtime")
                        diff = [f"{n} {t!r} vs {m!r}" for n, m, t in zip(fields, mine, theirs) if m != t]
                        bad(path, f"disagrees with file version {fv.version} in the manifests ({'; '.join(diff)})")
                        continue
                    moved = [r for r in fv.refs.values() if r.bin != bins[r.part - 1]]
                    if moved:
                        r = moved[0]
                        bad(path, f"part {r.part} is in bin {r.bin}, the snapshot says bin {bins[r.part - 1]}")
                        continue
                used.add(fv.version)
                fv.missing_bins = tuple(sorted({bins[p - 1] for p in fv.missing_parts}))
                needed_by_files.update(bins)
                self.files[path] = fv
                entries[path] = TreeEntry(
                    path, FILE, fv.mode, fv.mtime_ns, fv.size, complete=fv.complete,
                    missing_bins=fv.missing_bins, missing_parts=tuple(fv.missing_parts),
                    parts=fv.parts, bins=tuple(sorted(set(bins))), version=fv.version,
                )
        trailer = reader.trailer
        if e_root := entries.get(b""):
            if e_root.kind != DIR:
                bad(b"", "the root is not a directory")
                del entries[b""]
        # every path's ancestors must be directories; those the snapshot does not list become plain ones
        good: set[bytes] = {b""}
        for path in sorted(entries):
            if not path:
                continue
            up = parent_of(path)
            chain = []
            blocked = None
            while up not in good:
                above = entries.get(up)
                if above is not None and above.kind != DIR:
                    blocked = above
                    break
                chain.append(up)
                up = parent_of(up)
            if blocked is not None:
                bad(path, f"lies under {show(blocked.path)}, which is a {blocked.kind} in the snapshot; refusing it")
                if entries[path].kind == FILE:
                    self.files.pop(path, None)
                del entries[path]
                continue
            for up in chain:
                good.add(up)
                if up not in entries:
                    entries[up] = TreeEntry(up, DIR, DEFAULT_DIR_MODE, None, 0)
        if b"" not in entries:
            entries[b""] = TreeEntry(b"", DIR, DEFAULT_DIR_MODE, None, 0)
        self.entries = entries
        needed = set(trailer["bins"]) | needed_by_files | set(chosen.bins)
        present = set(carset.by_bin)
        self.needed_bins = sorted(needed)
        self.missing_bins = sorted(needed - present)
        self.retired_bins = sorted(present - needed)
        self.unused_versions = sum(1 for fv in self.versions if fv.version not in used)
        self._children()

    def _merge(self, carset, fail, dirs, links) -> None:
        """No snapshot: the newest candidate per path wins (the module docstring)."""
        missing = _BinSet(carset.missing_bins)
        for fv in self.versions:
            inferred: list[int] = []
            for first, last in fv.missing_ranges():
                # each missing part is placed by its nearest present part (ties: the lower one)
                left, right = fv.refs.get(first - 1), fv.refs.get(last + 1)
                if left is not None and right is not None:
                    mid = (left.part + right.part) // 2
                    spans = [(left, first, mid), (right, mid + 1, last)]
                else:
                    spans = [(left or right, first, last)]
                for near, a, b in spans:
                    if near is None or a > b:
                        continue
                    lo, hi = near.bin + (a - near.part), near.bin + (b - near.part)
                    for guess in _capped_range(max(lo, 1), hi, MAX_LISTED - len(inferred)):
                        if guess not in carset.by_bin:
                            inferred.append(guess)
                if len(inferred) >= MAX_LISTED:
                    break
            fv.missing_bins = tuple(sorted(set(inferred)))
            missing.update(fv.missing_bins)
        self.missing_bins = missing.sorted()
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
        self._children()

    def _children(self) -> None:
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


class _BinSet:
    """Bin numbers, at most MAX_LISTED * 10 of them kept (numbers come from untrusted manifests)."""

    def __init__(self, numbers=()):
        self.numbers: set[int] = set()
        self.update(numbers)

    def update(self, numbers) -> None:
        for n in numbers:
            if len(self.numbers) >= MAX_LISTED * 10:
                return
            self.numbers.add(n)

    def sorted(self) -> list[int]:
        return sorted(self.numbers)


def _capped_range(lo: int, hi: int, limit: int):
    """lo..hi inclusive, at most `limit` numbers (bins beyond 2**32 are not bins)."""
    hi = min(hi, 2**32 - 1, lo + max(limit, 0) - 1)
    return range(lo, hi + 1) if lo <= hi else range(0)


def _entry_index(car, fv: FileVersion) -> int:
    for i, e in enumerate(car.entries):
        if e.get("version") == fv.version and e["kind"] == FILE:
            return i
    return 0
