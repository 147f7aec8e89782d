"""Pure-Python piece commitment (commP): the slow, obvious version.

This is the specification the fast code in this package is tested against; it keeps
the whole padded tree level in memory, so only use it on small payloads (a few MiB).

    commP(payload):
      1. zero-pad the payload up to 127/128 of the padded piece size, where the padded
         size is the smallest power of two >= 128 that holds ceil(len/127) * 128 bytes;
      2. fr32: every 127 bytes (1016 bits) become 128 bytes, as four 254-bit
         little-endian quanta, each stored in 32 bytes whose top 2 bits are zero;
      3. the 32-byte words are the leaves of a binary tree whose node is
         sha256(left || right) with the last byte's top two bits cleared;
      4. the root is commP.

No size limits are enforced here (the public API does that); an empty payload gives
the root of a 128-byte zero piece.
"""

import hashlib

FR32_IN = 127  # raw bytes per fr32 group
FR32_OUT = 128  # padded bytes per group
NODE = 32
_QUANTUM_MASK = (1 << 254) - 1


def padded_size(payload_size: int) -> int:
    """Padded piece size (a power of two, at least 128) for a payload of this many bytes."""
    groups = max(1, -(-payload_size // FR32_IN))
    size = FR32_OUT
    while size < groups * FR32_OUT:
        size *= 2
    return size


def fr32_pad(data: bytes) -> bytes:
    """fr32-expand data whose length is a multiple of 127."""
    if len(data) % FR32_IN:
        raise ValueError("fr32_pad needs a multiple of 127 bytes")
    out = bytearray()
    for i in range(0, len(data), FR32_IN):
        bits = int.from_bytes(data[i : i + FR32_IN], "little")
        for q in range(4):
            out += ((bits >> (254 * q)) & _QUANTUM_MASK).to_bytes(32, "little")
    return bytes(out)


def node(left: bytes, right: bytes) -> bytes:
    """One tree node: sha256(left || right), truncated to 254 bits."""
    digest = bytearray(hashlib.sha256(left + right).digest())
    digest[31] &= 0x3F
    return bytes(digest)


def tree_root(padded: bytes) -> bytes:
    """Root of the binary tree over fr32-padded data (length a power of two >= 32)."""
    level = [padded[i : i + NODE] for i in range(0, len(padded), NODE)]
    if len(level) & (len(level) - 1):
        raise ValueError("tree_root needs a power-of-two number of 32-byte leaves")
    while len(level) > 1:
        level = [node(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def zero_root(size: int) -> bytes:
    """Root of an all-zero padded subtree of `size` bytes (a power of two >= 32)."""
    root = bytes(NODE)
    while size > NODE:
        root = node(root, root)
        size //= 2
    return root


def commp(payload: bytes) -> tuple[bytes, int]:
    """(32-byte commP root, padded piece size) of a payload."""
    size = padded_size(len(payload))
    raw = bytes(payload) + bytes(size // FR32_OUT * FR32_IN - len(payload))
    return tree_root(fr32_pad(raw)), size
