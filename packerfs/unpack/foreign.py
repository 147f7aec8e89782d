"""The tree of a CAR set packerfs did not write: plain UnixFS, no manifest.

    tree, lines = build_foreign_tree(src, header_roots, root=None, car_of=...)

`src` is any dag.BlockSource that can also say whether it holds a block
(`has(cid)`); if it has `locate(cid)` (CarSet does) the size of a raw-leaf
file is taken from its section length, so listing a set does not read every
small file. The result is a packerfs.unpack.tree.Tree, so FileReader, restore,
verify and ls work on it unchanged: every regular file is one FileVersion of one
part (offset 0, its whole size, its UnixFS root), cipher "plain".

What is read: UnixFS directories (basic and HAMT-sharded), files (raw or dag-pb
leaves, any chunk size, balanced or trickle: only blocksizes are followed),
symlinks, and the UnixFS 1.5 mode and mtime fields where present (otherwise
0644 for files, 0755 for directories, 0777 for symlinks, and no mtime: restore
leaves the time of writing, the reverse mount shows the mount's). CIDv0 and
CIDv1, any hash function cid.check_block knows.

Which root (choose_root): `root` if given (a directory or file in the set);
else, among the CAR headers' roots that some CAR holds, the one directory root,
or the one that reaches all the other directory roots; with no directory root,
the single file root (a one-file tree, the file named by its CID). Several
candidates are a UsageError listing them (choose with --root); header roots
that no CAR holds, with no directory root present, are an IncompleteSet.

Damage and loss: a child whose block no CAR holds is listed by path as an
incomplete file (tree.lost: exit 3, as a lost bin's files are); a block that is
corrupt or not UnixFS, a bad name, a path too deep, is a problem line naming
the CAR and offset (tree.problems), the entry left out or, for an unreadable
child, listed as incomplete. Leaves missing under a present file root are found
lazily: a read fails naming the block, and verify walks every file's leaves.

Bounded: the walk is iterative (an explicit stack; HAMT shards streamed one
node at a time), names are at most 255 bytes, paths at most MAX_PATH bytes,
and the tree at most `max_entries` entries (a DAG that links one directory
from many places cannot make the walk run away). The tree itself is held in
memory, like packerfs's own.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Protocol

from packerfs.errors import FormatError, IncompleteSet, UsageError
from packerfs.ipld import hamt
from packerfs.ipld.cid import DAG_PB, IDENTITY, RAW, cid_codec, cid_multihash, cid_to_str
from packerfs.ipld.dagpb import (
    DIRECTORY,
    FILE as UNIXFS_FILE,
    HAMT_SHARD,
    MURMUR3_X64_64,
    RAW_TYPE,
    SYMLINK as UNIXFS_SYMLINK,
    PBLink,
    UnixFSData,
)
from packerfs.unpack import dag
from packerfs.unpack.tree import DIR, FILE, SYMLINK, FileVersion, PartRef, Tree, TreeEntry, path_problem, show

MAX_ENTRIES = 5_000_000
MAX_NAME = 255
MAX_PATH = 4096
MAX_DIR_DEPTH = 1024  # directory levels (MAX_PATH bounds them too)
MAX_SHARD_DEPTH = dag.MAX_SHARD_DEPTH
MAX_LISTED_ROOTS = 10
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
SYMLINK_MODE = 0o777
_HEX = frozenset(b"0123456789ABCDEF")


class ForeignSource(dag.BlockSource, Protocol):
    def has(self, cid: bytes) -> bool: ...


class Node(NamedTuple):
    """One UnixFS node, classified: kind is DIR, FILE or SYMLINK."""

    kind: str
    size: int  # files: the file size; symlinks: the target length
    mode: int | None
    mtime_ns: int | None
    links: list[PBLink]  # directories: the root node's links
    shard: bool  # a HAMT-sharded directory
    target: bytes | None = None


_KIND_NAMES = {RAW_TYPE: "raw", DIRECTORY: "directory", UNIXFS_FILE: "file", 3: "metadata", UNIXFS_SYMLINK: "symlink", HAMT_SHARD: "HAMT shard"}


def _fail(src, cid: bytes, message: str) -> FormatError:
    path, offset = src.where(cid)
    return FormatError(f"block {cid_to_str(cid)}: {message}", path=path, offset=offset)


def _metadata(src, cid: bytes, fs: UnixFSData) -> tuple[int | None, int | None]:
    mode = fs.mode & 0o7777 if fs.mode is not None else None
    mtime = None
    if fs.mtime is not None:
        seconds, nanos = fs.mtime
        if nanos >= 1_000_000_000:
            raise _fail(src, cid, f"mtime has {nanos} nanoseconds (at most 999999999)")
        mtime = seconds * 1_000_000_000 + nanos
    return mode, mtime


def inspect(src, cid: bytes) -> Node:
    """Read and classify the UnixFS node `cid` (verified). FormatError if it is not one."""
    codec = cid_codec(cid)
    if codec == RAW:
        locate = getattr(src, "locate", None)
        loc = locate(cid) if locate is not None else None
        size = loc.length if loc is not None else len(src.read_block(cid))
        return Node(FILE, size, None, None, [], False)
    block = src.read_block(cid)
    links, fs = dag.decode_unixfs(src, cid, block)
    mode, mtime = _metadata(src, cid, fs)
    if fs.type in (UNIXFS_FILE, RAW_TYPE):
        size = dag.decode_file_node(src, cid, block).filesize
        return Node(FILE, size, mode, mtime, [], False)
    if fs.type == DIRECTORY:
        return Node(DIR, 0, mode, mtime, links, False)
    if fs.type == HAMT_SHARD:
        if fs.fanout != hamt.FANOUT or fs.hash_type != MURMUR3_X64_64:
            raise _fail(src, cid, f"unsupported HAMT shard (fanout {fs.fanout}, hash 0x{fs.hash_type or 0:x})")
        return Node(DIR, 0, mode, mtime, links, True)
    if fs.type == UNIXFS_SYMLINK:
        target = fs.data or b""
        if links:
            raise _fail(src, cid, "a symlink node has links")
        return Node(SYMLINK, len(target), mode, mtime, [], False, target)
    raise _fail(src, cid, f"a UnixFS {_KIND_NAMES.get(fs.type, fs.type)} node is not a file, directory or symlink")


def dir_entries(src, cid: bytes, node: Node, on_problem: Callable[[str, bool], None]) -> Iterator[tuple[bytes, bytes]]:
    """(name, cid) of every entry of the directory `cid` (whose root node is `node`), streamed.

    A HAMT is walked one shard node at a time (an explicit stack, at most MAX_SHARD_DEPTH deep).
    A sub-shard that is missing or damaged is reported through on_problem(line, missing) and
    skipped: the entries it holds cannot be listed."""
    if not node.shard:
        for link in node.links:
            yield link.name, link.cid
        return
    stack: list[Iterator[PBLink]] = [iter(node.links)]
    parents = [cid]
    while stack:
        link = next(stack[-1], None)
        if link is None:
            stack.pop()
            parents.pop()
            continue
        name = link.name
        if len(name) < 2 or name[0] not in _HEX or name[1] not in _HEX:
            on_problem(str(_fail(src, parents[-1], f"HAMT link name {show(name)} does not start with two hex digits")), False)
            continue
        if len(name) > 2:
            yield name[2:], link.cid
            continue
        if len(stack) >= MAX_SHARD_DEPTH:
            on_problem(str(_fail(src, link.cid, "HAMT shard nests too deep")), False)
            continue
        if not src.has(link.cid):
            on_problem(f"HAMT shard {cid_to_str(link.cid)} is in none of the CARs: some entries cannot be listed", True)
            continue
        try:
            links, fs = dag.decode_unixfs(src, link.cid, src.read_block(link.cid))
            if fs.type != HAMT_SHARD or fs.fanout != hamt.FANOUT or fs.hash_type != MURMUR3_X64_64:
                raise _fail(src, link.cid, "a HAMT shard links something else than a sub-shard of its kind")
        except FormatError as exc:
            on_problem(f"{exc} (some entries cannot be listed)", False)
            continue
        stack.append(iter(links))
        parents.append(link.cid)


def _dedupe(roots) -> list[bytes]:
    seen: set[bytes] = set()
    out = []
    for r in roots:
        r = bytes(r)
        if r not in seen and cid_multihash(r)[0] != IDENTITY:  # identity roots are placeholders
            seen.add(r)
            out.append(r)
    return out


def _listing(cids: list[bytes]) -> str:
    shown = ", ".join(cid_to_str(c) for c in cids[:MAX_LISTED_ROOTS])
    return shown + (f" and {len(cids) - MAX_LISTED_ROOTS} more" if len(cids) > MAX_LISTED_ROOTS else "")


def choose_root(src, roots, root: bytes | None = None, *, max_entries: int = MAX_ENTRIES) -> tuple[bytes, Node, list[str], list[str]]:
    """(root CID, its node, problem lines, notes): see the module docstring."""
    problems: list[str] = []
    notes: list[str] = []
    if root is not None:
        root = bytes(root)
        if not src.has(root):
            raise UsageError(f"--root {cid_to_str(root)}: no CAR of the set holds that block")
        if cid_codec(root) not in (DAG_PB, RAW):
            raise UsageError(f"--root {cid_to_str(root)} is not UnixFS (codec 0x{cid_codec(root):x})")
        node = inspect(src, root)  # FormatError names the CAR and offset
        if node.kind not in (DIR, FILE):
            raise UsageError(f"--root {cid_to_str(root)} is a {node.kind}, not a UnixFS directory or file")
        return root, node, problems, notes
    candidates = _dedupe(roots)
    if not candidates:
        raise UsageError("the CARs' headers name no root; choose one with --root CID")
    absent = [r for r in candidates if not src.has(r)]
    kinds: dict[bytes, Node] = {}
    for r in candidates:
        if r in absent:
            continue
        if cid_codec(r) not in (DAG_PB, RAW):
            notes.append(f"root {cid_to_str(r)} is not UnixFS (codec 0x{cid_codec(r):x}); not used")
            continue
        try:
            kinds[r] = inspect(src, r)
        except FormatError as exc:
            problems.append(f"{exc} (a root named by a CAR header; not used)")
    dirs = [r for r, n in kinds.items() if n.kind == DIR]
    if len(dirs) > 1:
        top = _top_level(src, dirs, kinds, max_entries)
        if len(top) > 1:
            raise UsageError(
                f"the CARs name {len(top)} root directories ({_listing(top)}), none inside another; "
                "choose one with --root CID"
            )
        notes.append(f"root {cid_to_str(top[0])}: the other {len(dirs) - 1} root directories lie inside it")
        dirs = top
    if dirs:
        return dirs[0], kinds[dirs[0]], problems, notes
    if absent:
        raise IncompleteSet(
            f"no root directory: the CARs' headers name {_listing(absent)}, which no CAR of the set holds"
            + (f" (present roots: {_listing(list(kinds))}; choose one with --root CID)" if kinds else "")
        )
    files = [r for r, n in kinds.items() if n.kind == FILE]
    if len(files) == 1:
        return files[0], kinds[files[0]], problems, notes
    if len(files) > 1:
        raise UsageError(f"the CARs name {len(files)} file roots and no directory ({_listing(files)}); choose one with --root CID")
    if kinds:
        raise UsageError(f"the CARs' roots ({_listing(list(kinds))}) are neither UnixFS directories nor files; choose one with --root CID")
    if problems:
        raise FormatError(f"no usable root: {problems[0]}")
    raise UsageError(f"the CARs' roots ({_listing(candidates)}) are not UnixFS; choose one with --root CID")


def _top_level(src, dirs: list[bytes], kinds: dict[bytes, Node], max_entries: int) -> list[bytes]:
    """The directory roots no other one reaches (a directories-only walk; damage is ignored here)."""
    wanted = set(dirs)
    reached: set[bytes] = set()
    visited: set[bytes] = set()
    budget = max_entries
    for start in dirs:
        if start in visited:
            continue
        visited.add(start)
        stack = [(start, kinds[start])]
        while stack:
            cid, node = stack.pop()
            for _name, child in dir_entries(src, cid, node, lambda line, missing: None):
                budget -= 1
                if budget < 0:
                    raise FormatError(f"the root directories hold more than {max_entries} entries", path=src.where(start)[0])
                if child in wanted and child != start:
                    reached.add(child)
                if child in visited or cid_codec(child) != DAG_PB or not src.has(child):
                    continue
                try:
                    sub = inspect(src, child)
                except FormatError:
                    continue
                if sub.kind == DIR:
                    visited.add(child)
                    stack.append((child, sub))
    return [d for d in dirs if d not in reached]


class _Builder:
    def __init__(self, src, car_of, strict: bool, max_entries: int):
        self.src = src
        self.car_of = car_of
        self.strict = strict
        self.max_entries = max_entries
        self.tree = Tree()
        self.tree._strict = strict

    def damage(self, line: str, exc: FormatError | None = None) -> None:
        if self.strict:
            raise exc if exc is not None else FormatError(line)
        self.tree.problems.append(line)

    def add(self, entry: TreeEntry) -> None:
        if len(self.tree.entries) >= self.max_entries:
            raise FormatError(
                f"the tree holds more than {self.max_entries} entries; refusing it (at {show(entry.path)})",
                path=self.car_of(self.root),
            )
        self.tree.entries[entry.path] = entry

    def add_file(self, path: bytes, cid: bytes, node: Node | None) -> None:
        """A regular file; node None: its root block is missing or unreadable (listed as incomplete)."""
        tree = self.tree
        size = node.size if node is not None else 0
        mode = node.mode if node is not None and node.mode is not None else DEFAULT_FILE_MODE
        mtime = node.mtime_ns if node is not None else None
        fv = FileVersion(path, len(tree.versions) + 1, size, size, 1, mode, mtime or 0)
        if node is not None:
            fv.refs[1] = PartRef(1, 0, self.car_of(cid), path, 0, size, cid)
        tree.versions.append(fv)
        tree.files[path] = fv
        self.add(TreeEntry(path, FILE, mode, mtime, size, complete=fv.complete,
                           missing_parts=() if fv.complete else (1,), parts=1, version=fv.version))

    def add_node(self, path: bytes, cid: bytes, node: Node) -> bool:
        """Enter `node` at `path`; True if it is a directory to walk."""
        if node.kind == FILE:
            self.add_file(path, cid, node)
            return False
        if node.kind == SYMLINK:
            target = node.target or b""
            if not target or b"\0" in target:
                self.damage(f"{show(path)}: symlink target {'is empty' if not target else 'contains a NUL byte'}; "
                            f"leaving it out ({_where(self.src, cid)})")
                return False
            mode = node.mode if node.mode is not None else SYMLINK_MODE
            self.add(TreeEntry(path, SYMLINK, mode, node.mtime_ns, len(target), target=target))
            return False
        mode = node.mode if node.mode is not None else DEFAULT_DIR_MODE
        self.add(TreeEntry(path, DIR, mode, node.mtime_ns, 0))
        return True

    def build(self, root: bytes, node: Node) -> Tree:
        self.root = root
        tree = self.tree
        before = len(tree.problems)
        if node.kind == FILE:
            self.add(TreeEntry(b"", DIR, DEFAULT_DIR_MODE, None, 0))
            self.add_file(cid_to_str(root).encode(), root, node)
        else:
            self.add_node(b"", root, node)
            # pending directories hold no decoded links (re-read when their turn comes), so the
            # stack costs a path and a CID per directory, however wide they are
            stack: list[tuple[bytes, bytes, int]] = [(b"", root, 0)]
            first = node
            while stack:
                path, cid, depth = stack.pop()
                dnode, first = (first, None) if first is not None else (inspect(self.src, cid), None)
                self.walk_dir(path, cid, dnode, depth, stack)
        # lines in path order (they start with the path), not in the walk's (HAMT hash) order
        tree.problems[before:] = sorted(tree.problems[before:])
        tree.lost.sort()
        tree._children()
        return tree

    def walk_dir(self, path: bytes, cid: bytes, node: Node, depth: int, stack: list) -> None:
        src = self.src
        shown_dir = show(path) if path else "the root directory"

        def shard_problem(line: str, missing: bool) -> None:
            line = f"{shown_dir}: {line}"
            if missing:
                self.tree.lost.append(line)
            else:
                self.damage(line)

        for name, child in dir_entries(src, cid, node, shard_problem):
            why = path_problem(name)
            if why is None and b"/" in name:
                why = "contains a '/'"
            if why is None and len(name) > MAX_NAME:
                why = f"is {len(name)} bytes long (at most {MAX_NAME})"
            if why is not None:
                self.damage(f"{shown_dir}: entry name {show(name)} {why}; refusing it ({_where(src, cid)})")
                continue
            child_path = path + b"/" + name if path else name
            if len(child_path) > MAX_PATH:
                self.damage(f"{show(child_path[:200])}…: path longer than {MAX_PATH} bytes; refusing it ({_where(src, cid)})")
                continue
            if child_path in self.tree.entries:
                self.damage(f"{show(child_path)}: the directory has two entries of that name; keeping the first ({_where(src, cid)})")
                continue
            if not src.has(child):
                self.tree.lost.append(f"{show(child_path)}: missing block {cid_to_str(child)} (in none of the CARs); it cannot be restored")
                self.add_file(child_path, child, None)
                continue
            try:
                sub = inspect(src, child)
            except FormatError as exc:
                self.damage(f"{show(child_path)}: {exc}", exc)
                self.add_file(child_path, child, None)
                continue
            if sub.kind == DIR and depth + 1 > MAX_DIR_DEPTH:
                self.damage(f"{show(child_path)}: directories nest too deep; leaving its contents out ({_where(src, child)})")
                self.add(TreeEntry(child_path, DIR, sub.mode if sub.mode is not None else DEFAULT_DIR_MODE, sub.mtime_ns, 0))
                continue
            if self.add_node(child_path, child, sub):
                stack.append((child_path, child, depth + 1))


def _where(src, cid: bytes) -> str:
    path, offset = src.where(cid)
    if path is None:
        return f"block {cid_to_str(cid)}"
    return f"{path}, offset {offset}" if offset is not None else str(path)


def build_foreign_tree(
    src: ForeignSource,
    roots: list[bytes],
    *,
    root: bytes | None = None,
    car_of: Callable[[bytes], str | None] = lambda cid: None,
    strict: bool = False,
    max_entries: int = MAX_ENTRIES,
) -> tuple[Tree, list[str]]:
    """The Tree of the UnixFS root chosen among `roots` (or `root`), and its problem lines.

    The lines are tree.problems (damage: corrupt or non-UnixFS blocks, bad names; exit 1) followed
    by tree.lost (missing blocks, by path; exit 3). strict=True raises the first damage as a
    FormatError instead. UsageError / IncompleteSet when no root can be chosen (choose_root)."""
    chosen, node, problems, notes = choose_root(src, roots, root, max_entries=max_entries)
    builder = _Builder(src, car_of, strict, max_entries)
    if problems and strict:
        raise FormatError(problems[0])
    builder.tree.problems += problems
    builder.tree.notes += notes
    tree = builder.build(chosen, node)
    return tree, tree.problems + tree.lost
