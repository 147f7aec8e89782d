"""Upper bounds on the bytes each thing adds to a CAR.

The planner decides where a file is split before the file's bytes (and so its
CIDs) exist, so it reasons with bounds that hold for any content: every CID is
a 36-byte CIDv1 sha2-256, every varint is assumed at its widest plausible
length. The exact CAR is always at most what these bounds promise, which is
what makes the bin size a hard ceiling.
"""

from __future__ import annotations

from packerfs.ipld.unixfs import CHUNK_SIZE, SHARD_THRESHOLD_BYTES, WIDTH

CID_LEN = 36  # CIDv1 + codec (raw or dag-pb) + sha2-256 multihash
MAX_VARINT = 9  # any size or count below 2**63

# dag-pb link: field tag, length, Hash (tag, len, cid), Name (tag, len varint, name), Tsize (tag, varint)
LINK_FIXED = 1 + 3 + (1 + 1 + CID_LEN) + (1 + 2) + (1 + MAX_VARINT)
# per child in a file node: its link (empty name) and its blocksize entry
FILE_CHILD = LINK_FIXED + 1 + MAX_VARINT
# per node: the section prefix (length varint + CID) and the Data field with Type and filesize
NODE_FIXED = 4 + CID_LEN + (1 + 3) + 2 + (1 + MAX_VARINT)


def uvarint_length(n: int) -> int:
    """Bytes of n as an unsigned LEB128 varint (the planner's hot path: no bytes are built)."""
    return max(1, -(-n.bit_length() // 7))


def section_length(block_length: int) -> int:
    """Exact bytes of a CAR section holding a block of this length under a 36-byte CID."""
    return uvarint_length(CID_LEN + block_length) + CID_LEN + block_length


FULL_LEAF_SECTION = section_length(CHUNK_SIZE)


def leaf_sections(stream_bytes: int) -> int:
    """Exact bytes of the raw-leaf sections for `stream_bytes` of a stream, cut in CHUNK_SIZE leaves."""
    full, tail = divmod(stream_bytes, CHUNK_SIZE)
    total = full * FULL_LEAF_SECTION
    if tail or stream_bytes == 0:
        total += section_length(tail)
    return total


def leaf_count(stream_bytes: int) -> int:
    return max(1, -(-stream_bytes // CHUNK_SIZE))


def file_nodes_bound(leaves: int) -> int:
    """Bound on the intermediate nodes of a balanced file DAG over `leaves` leaves."""
    if leaves <= 1:
        return 0
    total = 0
    children = leaves
    while children > 1:
        nodes = -(-children // WIDTH)
        total += nodes * NODE_FIXED + children * FILE_CHILD
        children = nodes
    return total


def file_bound(stream_bytes: int) -> int:
    """Bound on all sections of one UnixFS file (or part) of this many stream bytes."""
    return leaf_sections(stream_bytes) + file_nodes_bound(leaf_count(stream_bytes))


def dir_link_bound(name: bytes) -> int:
    return LINK_FIXED + len(name)


# A directory node of its own: section prefix and Data {Type: directory}
DIR_NODE_FIXED = 4 + CID_LEN + 4
# Once a directory shards, every entry may cost its 2-hex-digit prefix plus, at
# worst, one sub-shard node (a tree whose inner nodes have >= 2 children has
# fewer inner nodes than leaves): section, Data with a 32-byte bitfield, and
# the link naming it in its parent.
HAMT_PER_ENTRY = 2 + (4 + CID_LEN + 4 + 2 + 2 + 33 + 3 + 3) + (LINK_FIXED + 2)
# The point past which a directory's bound switches to the sharded bound.
SHARD_SWITCH = SHARD_THRESHOLD_BYTES - 64


def directory_bound(links_bytes: int, entries: int) -> int:
    """Bound on a directory node (or its HAMT) whose links sum to `links_bytes`."""
    if links_bytes + DIR_NODE_FIXED <= SHARD_SWITCH:
        return links_bytes + DIR_NODE_FIXED
    return links_bytes + DIR_NODE_FIXED + entries * HAMT_PER_ENTRY
