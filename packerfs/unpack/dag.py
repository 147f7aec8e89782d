"""Reading UnixFS DAGs out of verified blocks: directory lookups and file ranges.

Everything here works on a `BlockSource`: something that returns a block's
bytes *already checked against its CID* and can say where a block lives (CAR
path and section offset) for error messages. Decoding is strict: a node that is
not what its position in the DAG requires (a directory where a file node is
expected, blocksizes that do not add up, a leaf of the wrong length) is a
FormatError naming the CAR and the block's section offset.
"""

from __future__ import annotations

import bisect
from typing import Callable, NamedTuple, Protocol

from packerfs.errors import FormatError
from packerfs.ipld import hamt
from packerfs.ipld.cid import DAG_PB, RAW, cid_codec, cid_to_str
from packerfs.ipld.dagpb import (
    DIRECTORY,
    FILE,
    HAMT_SHARD,
    MURMUR3_X64_64,
    RAW_TYPE,
    SYMLINK,
    UnixFSData,
    decode_node,
)

# A UnixFS file DAG deeper than this is not something any importer writes
# (width 1024 gives 1024**8 leaves at depth 8); refusing it bounds recursion.
MAX_DEPTH = 32
# HAMT shards nest at most 8 levels per 64-bit hash draw; allow rehashing, but bound it.
MAX_SHARD_DEPTH = 64

_TYPE_NAMES = {RAW_TYPE: "raw", DIRECTORY: "directory", FILE: "file", 3: "metadata", SYMLINK: "symlink", HAMT_SHARD: "HAMT shard"}


class BlockSource(Protocol):
    def read_block(self, cid: bytes) -> bytes:
        """The block's bytes, verified against `cid`."""
        ...

    def where(self, cid: bytes) -> tuple[str | None, int | None]:
        """(CAR path, section offset) of the block, for error messages."""
        ...


class FileNode(NamedTuple):
    """A decoded UnixFS file node: inline data, then children at `starts`."""

    data: bytes
    links: list[bytes]
    starts: list[int]  # offset of each child within this node's content
    sizes: list[int]
    filesize: int


class DirNode(NamedTuple):
    """A decoded directory node: a basic directory or one level of a HAMT shard."""

    shard: bool
    links: dict[bytes, bytes]  # link name -> cid


def _show(name: bytes) -> str:
    """A link name for a message (as tree.show: decoded where possible, escaped, quoted; never b'…')."""
    return repr(bytes(name).decode("utf-8", "backslashreplace"))


def _fail(src: BlockSource, cid: bytes, message: str) -> FormatError:
    path, offset = src.where(cid)
    return FormatError(f"block {cid_to_str(cid)}: {message}", path=path, offset=offset)


def decode_unixfs(src: BlockSource, cid: bytes, block: bytes) -> tuple[list, UnixFSData]:
    """A dag-pb node's links and UnixFS data; FormatError naming the block if it is not one."""
    if cid_codec(cid) != DAG_PB:
        raise _fail(src, cid, "expected a dag-pb node, found another codec")
    try:
        node = decode_node(block)
        if node.data is None:
            raise ValueError("dag-pb node has no UnixFS Data")
        fs = UnixFSData.decode(node.data)
    except ValueError as exc:
        raise _fail(src, cid, f"not a valid UnixFS node ({exc})") from None
    return node.links, fs


def decode_file_node(src: BlockSource, cid: bytes, block: bytes) -> FileNode:
    links, fs = decode_unixfs(src, cid, block)
    if fs.type not in (FILE, RAW_TYPE):
        raise _fail(src, cid, f"expected a UnixFS file node, found a {_TYPE_NAMES.get(fs.type, fs.type)} node")
    if len(links) != len(fs.blocksizes):
        raise _fail(src, cid, f"file node has {len(links)} links but {len(fs.blocksizes)} blocksizes")
    data = fs.data or b""
    starts = []
    pos = len(data)
    for size in fs.blocksizes:
        starts.append(pos)
        pos += size
    if fs.filesize is not None and fs.filesize != pos:
        raise _fail(src, cid, f"file node says {fs.filesize} bytes but its data and blocksizes add up to {pos}")
    return FileNode(data, [link.cid for link in links], starts, list(fs.blocksizes), pos)


def decode_dir_node(src: BlockSource, cid: bytes, block: bytes) -> DirNode:
    links, fs = decode_unixfs(src, cid, block)
    if fs.type == DIRECTORY:
        shard = False
    elif fs.type == HAMT_SHARD:
        if fs.fanout != hamt.FANOUT or fs.hash_type != MURMUR3_X64_64:
            raise _fail(src, cid, f"unsupported HAMT shard (fanout {fs.fanout}, hash 0x{fs.hash_type or 0:x})")
        shard = True
    else:
        raise _fail(src, cid, f"expected a directory, found a {_TYPE_NAMES.get(fs.type, fs.type)} node")
    table: dict[bytes, bytes] = {}
    for link in links:
        if link.name in table:
            raise _fail(src, cid, f"directory has two links named {_show(link.name)}")
        table[link.name] = link.cid
    return DirNode(shard, table)


def dir_lookup(
    src: BlockSource, cid: bytes, name: bytes, load_dir: Callable[[bytes], DirNode] | None = None
) -> bytes | None:
    """The CID of `name` in the directory `cid` (basic or HAMT-sharded), or None."""
    load = load_dir or (lambda c: decode_dir_node(src, c, src.read_block(c)))
    node = load(cid)
    if not node.shard:
        return node.links.get(name)
    depth = 0
    while True:
        prefix = b"%02X" % hamt.slot(name, depth)
        hit = node.links.get(prefix + name)
        if hit is not None:
            return hit
        sub = node.links.get(prefix)
        if sub is None:
            return None
        depth += 1
        if depth > MAX_SHARD_DEPTH:
            raise _fail(src, sub, "HAMT shard nests too deep")
        node = load(sub)
        if not node.shard:
            raise _fail(src, sub, "a HAMT shard links a basic directory as a sub-shard")


def resolve(src: BlockSource, root: bytes, path: bytes, load_dir=None) -> bytes | None:
    """The CID at `path` ('/'-separated names) under the directory `root`, or None."""
    cid = root
    for name in path.split(b"/") if path else []:
        cid = dir_lookup(src, cid, name, load_dir)
        if cid is None:
            return None
    return cid


class FileDag:
    """Reads byte ranges of UnixFS files, touching only the blocks that cover the range.

    `load_leaf(cid)` and `load_node(cid)` may cache; by default they read
    through `src` every time.
    """

    def __init__(
        self,
        src: BlockSource,
        load_leaf: Callable[[bytes], bytes] | None = None,
        load_node: Callable[[bytes], FileNode] | None = None,
    ):
        self.src = src
        self.load_leaf = load_leaf or src.read_block
        self.load_node = load_node or (lambda c: decode_file_node(src, c, src.read_block(c)))

    def read(self, cid: bytes, size: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file of `size` bytes whose root is `cid`."""
        out: list = []  # bytes, or memoryviews of the parts of blocks the range needs
        start, end = max(start, 0), min(end, size)
        if start < end or size == 0:
            self._read(cid, size, start, max(start, end), out, 0)
        if len(out) == 1 and type(out[0]) is bytes:
            return out[0]  # one whole leaf: no copy
        return b"".join(out)  # the only copy of the bytes

    def _read(self, cid: bytes, size: int, start: int, end: int, out: list, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _fail(self.src, cid, "file DAG is implausibly deep")
        if cid_codec(cid) == RAW:
            block = self.load_leaf(cid)
            if len(block) != size:
                raise _fail(self.src, cid, f"raw leaf is {len(block)} bytes, its parent says {size}")
            out.append(memoryview(block)[start:end] if (start, end) != (0, size) else block)
            return
        node = self.load_node(cid)
        if node.filesize != size:
            raise _fail(self.src, cid, f"file node holds {node.filesize} bytes, its parent says {size}")
        if start < len(node.data):
            out.append(memoryview(node.data)[start:end])
        if not node.links or end <= len(node.data):
            return
        i = max(bisect.bisect_right(node.starts, start) - 1, 0)
        while i < len(node.links) and node.starts[i] < end:
            lo = node.starts[i]
            hi = lo + node.sizes[i]
            if hi > start:
                self._read(node.links[i], node.sizes[i], max(start, lo) - lo, min(end, hi) - lo, out, depth + 1)
            i += 1

    def leaves(self, cid: bytes, size: int, depth: int = 0):
        """(leaf cid, expected size) of every leaf in order, reading only the nodes.

        A raw leaf's block is `size` bytes; a dag-pb leaf (a file node without links, foreign
        sets only) is yielded too, with the size of the content it holds inline."""
        if depth > MAX_DEPTH:
            raise _fail(self.src, cid, "file DAG is implausibly deep")
        if cid_codec(cid) == RAW:
            yield cid, size
            return
        node = self.load_node(cid)
        if node.filesize != size:
            raise _fail(self.src, cid, f"file node holds {node.filesize} bytes, its parent says {size}")
        if not node.links:
            yield cid, size  # a dag-pb leaf (its bytes inline), as kubo writes without raw leaves
            return
        for child, child_size in zip(node.links, node.sizes):
            yield from self.leaves(child, child_size, depth + 1)

    def root_size(self, cid: bytes) -> int:
        """The size of the file whose root is `cid` (reads the root block)."""
        if cid_codec(cid) == RAW:
            return len(self.load_leaf(cid))
        return self.load_node(cid).filesize
