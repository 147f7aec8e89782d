"""HAMT-sharded UnixFS directories (fanout 256, murmur3-x64-64 of the name).

The slot of a name at depth d is byte d of the first 64-bit half of
murmur3-x64-128(name) in big-endian order; past 8 levels the hash is redrawn
over name || depth byte, as go-unixfs and js-ipfs-unixfs do. Each slot holds one
entry or a sub-shard; two names meeting in a slot push both one level down.
"""

from __future__ import annotations

from packerfs.ipld.dagpb import HAMT_SHARD, MURMUR3_X64_64, PBLink, UnixFSData, encode_node
from packerfs.ipld.cid import DAG_PB, make_cid

FANOUT = 256

_MASK64 = (1 << 64) - 1
_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F


def _rotl64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK64


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    k ^= k >> 33
    return k


def murmur3_x64_128(data: bytes, seed: int = 0) -> bytes:
    """MurmurHash3 x64 128-bit, output as h1 || h2, each big-endian."""
    length = len(data)
    h1 = h2 = seed
    full = length - length % 16
    for i in range(0, full, 16):
        k1 = int.from_bytes(data[i : i + 8], "little")
        k2 = int.from_bytes(data[i + 8 : i + 16], "little")
        k1 = (_rotl64((k1 * _C1) & _MASK64, 31) * _C2) & _MASK64
        h1 ^= k1
        h1 = (_rotl64(h1, 27) + h2) & _MASK64
        h1 = (h1 * 5 + 0x52DCE729) & _MASK64
        k2 = (_rotl64((k2 * _C2) & _MASK64, 33) * _C1) & _MASK64
        h2 ^= k2
        h2 = (_rotl64(h2, 31) + h1) & _MASK64
        h2 = (h2 * 5 + 0x38495AB5) & _MASK64
    tail = data[full:]
    k1 = int.from_bytes(tail[:8], "little") if tail else 0
    k2 = int.from_bytes(tail[8:16], "little") if len(tail) > 8 else 0
    if len(tail) > 8:
        h2 ^= (_rotl64((k2 * _C2) & _MASK64, 33) * _C1) & _MASK64
    if tail:
        h1 ^= (_rotl64((k1 * _C1) & _MASK64, 31) * _C2) & _MASK64
    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & _MASK64
    h2 = (h2 + h1) & _MASK64
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    h1 = (h1 + h2) & _MASK64
    h2 = (h2 + h1) & _MASK64
    return h1.to_bytes(8, "big") + h2.to_bytes(8, "big")


def slot(name: bytes, depth: int) -> int:
    """The slot (0..255) of `name` in a shard at `depth` (0 = the directory's root shard)."""
    rehash, byte = divmod(depth, 8)
    key = name if rehash == 0 else name + bytes([rehash])
    return murmur3_x64_128(key)[byte]


def _bitfield(slots) -> bytes:
    bits = 0
    for s in slots:
        bits |= 1 << s
    # Big-endian and without leading zero bytes, as the reference encoders write it.
    return bits.to_bytes(FANOUT // 8, "big").lstrip(b"\0") or b"\0"


def build_shard(entries: list[PBLink], depth: int = 0, emit=None, mode=None, mtime=None) -> PBLink:
    """Build a shard over `entries` (links named by the plain entry names).

    Every completed shard node is passed to emit(cid, block) in post-order
    (sub-shards before their parent). Returns a link to the shard (empty name).
    """
    buckets: dict[int, list[PBLink]] = {}
    for entry in entries:
        buckets.setdefault(slot(entry.name, depth), []).append(entry)
    links = []
    for index in sorted(buckets):
        members = buckets[index]
        prefix = b"%02X" % index
        if len(members) == 1:
            only = members[0]
            links.append(PBLink(only.cid, prefix + only.name, only.tsize))
        else:
            child = build_shard(members, depth + 1, emit)
            links.append(PBLink(child.cid, prefix, child.tsize))
    data = UnixFSData(
        type=HAMT_SHARD,
        data=_bitfield(buckets),
        hash_type=MURMUR3_X64_64,
        fanout=FANOUT,
        mode=mode,
        mtime=mtime,
    ).encode()
    block = encode_node(links, data)
    cid = make_cid(DAG_PB, block)
    if emit is not None:
        emit(cid, block)
    return PBLink(cid, b"", len(block) + sum(link.tsize for link in links))
