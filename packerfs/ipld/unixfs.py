"""UnixFS DAGs in the `unixfs-v1-2025` profile (the ipfs-car 3.x defaults).

CIDv1 + sha2-256, raw leaves of 1 MiB, balanced trees of width 1024, explicit
empty link names, directories sorted by name bytes and HAMT-sharded once their
basic node would exceed 256 KiB.

Builders never see leaf bytes: the caller hashes each leaf and hands over its
CID and size, and gets back the intermediate nodes that became complete, in
post-order. This is what lets a CAR be laid out, and later regenerated, with
memory bounded by tree depth x width rather than by file size.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

from packerfs.ipld import hamt
from packerfs.ipld.cid import DAG_PB, RAW, make_cid
from packerfs.ipld.dagpb import DIRECTORY, FILE, SYMLINK, PBLink, UnixFSData, encode_node

CHUNK_SIZE = 1 << 20
WIDTH = 1024
SHARD_THRESHOLD_BYTES = 256 * 1024


class Block(NamedTuple):
    cid: bytes
    data: bytes


class FileNodeBlock(NamedTuple):
    """An intermediate file node: `level` 1 links leaves; it links the last `children` items of that level."""

    cid: bytes
    data: bytes
    level: int
    children: int


class Node(NamedTuple):
    """A finished file or subtree: its CID, cumulative DAG size and file size."""

    cid: bytes
    tsize: int
    filesize: int


def raw_leaf(data: bytes | memoryview) -> Node:
    """The CID and sizes of a raw leaf; the caller keeps the bytes."""
    return Node(make_cid(RAW, data), len(data), len(data))


class FileBuilder:
    """Balanced-tree builder fed one leaf at a time.

    add_leaf() returns the intermediate blocks completed by that leaf; finish()
    returns the remaining blocks and the root. Blocks come out in post-order
    (every node after all of its children), which is the order a streaming CAR
    writer needs.

    The reduction matches the reference importer: full groups of WIDTH are
    reduced as soon as they fill; at the end each level's partial group becomes
    one node, even a group of one, unless the whole file is a single leaf,
    which is then its own root.
    """

    def __init__(self, width: int = WIDTH):
        self.width = width
        self.levels: list[list[Node]] = [[]]
        self.leaf_count = 0

    def add_leaf(self, leaf: Node) -> list[FileNodeBlock]:
        self.leaf_count += 1
        out: list[FileNodeBlock] = []
        self.levels[0].append(leaf)
        level = 0
        while len(self.levels[level]) == self.width:
            node = self._reduce(self.levels[level], level + 1, out)
            self.levels[level] = []
            if level + 1 == len(self.levels):
                self.levels.append([])
            self.levels[level + 1].append(node)
            level += 1
        return out

    def finish(self) -> tuple[list[FileNodeBlock], Node]:
        out: list[FileNodeBlock] = []
        if self.leaf_count == 0:
            # An empty file is a single empty raw leaf, like the reference importer writes.
            return out, raw_leaf(b"")
        if self.leaf_count == 1:
            return out, self.levels[0][0]
        level = -1
        while True:
            level += 1
            pending = self.levels[level]
            above = any(self.levels[level + 1 :])
            if not pending:
                continue
            if not above and len(pending) == 1:
                return out, pending[0]
            node = self._reduce(pending, level + 1, out)
            self.levels[level] = []
            if level + 1 == len(self.levels):
                self.levels.append([])
            self.levels[level + 1].append(node)

    @staticmethod
    def _reduce(children: list[Node], level: int, out: list[FileNodeBlock]) -> Node:
        block = file_node(children)
        cid = make_cid(DAG_PB, block)
        out.append(FileNodeBlock(cid, block, level, len(children)))
        return Node(cid, len(block) + sum(c.tsize for c in children), sum(c.filesize for c in children))


def file_node(children: list[Node]) -> bytes:
    """The dag-pb bytes of a file node over `children` (leaves or nodes)."""
    filesize = sum(c.filesize for c in children)
    data = UnixFSData(type=FILE, filesize=filesize, blocksizes=[c.filesize for c in children]).encode()
    return encode_node([PBLink(c.cid, b"", c.tsize) for c in children], data)


def file_root_from_leaves(leaves: Iterable[Node]) -> tuple[list[Block], Node]:
    """All intermediate blocks (post-order) and the root for a sequence of leaves."""
    builder = FileBuilder()
    blocks: list[Block] = []
    for leaf in leaves:
        blocks += builder.add_leaf(leaf)
    tail, root = builder.finish()
    return blocks + tail, root


def symlink_block(target: bytes) -> Block:
    block = encode_node([], UnixFSData(type=SYMLINK, data=target).encode())
    return Block(make_cid(DAG_PB, block), block)


class Entry(NamedTuple):
    name: bytes
    cid: bytes
    tsize: int


ShardPolicy = Callable[[int, int], bool]


def shard_by_node_size(entry_count: int, node_size: int) -> bool:
    """unixfs-v1-2025: shard when the basic node would exceed 256 KiB."""
    return node_size > SHARD_THRESHOLD_BYTES


def shard_like_ipfs_car(entry_count: int, node_size: int) -> bool:
    """ipfs-car 3.1: shard every directory of more than 1000 entries, whatever its size."""
    return entry_count > 1000


def directory_blocks(
    entries: Iterable[Entry], shard_policy: ShardPolicy = shard_by_node_size
) -> tuple[list[Block], Node]:
    """Blocks (post-order) and root of one directory level over finished children."""
    links = sorted((PBLink(e.cid, e.name, e.tsize) for e in entries), key=lambda link: link.name)
    for a, b in zip(links, links[1:]):
        if a.name == b.name:
            raise ValueError(f"duplicate directory entry {a.name!r}")
    block = encode_node(links, UnixFSData(type=DIRECTORY).encode())
    children_size = sum(link.tsize for link in links)
    if not shard_policy(len(links), len(block)):
        cid = make_cid(DAG_PB, block)
        return [Block(cid, block)], Node(cid, len(block) + children_size, 0)
    blocks: list[Block] = []
    root = hamt.build_shard(links, emit=lambda cid, data: blocks.append(Block(cid, data)))
    return blocks, Node(root.cid, root.tsize, 0)
