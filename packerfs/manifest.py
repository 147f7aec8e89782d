"""The per-bin manifest: DAG-CBOR, stored in each bin as the UnixFS file
`.packerfs/manifest.cbor`, so the set of CARs describes itself.

Top level (a DAG-CBOR map, keys in canonical order):
    packerfs    1 (format version)
    dataset     16 random bytes naming the data set (all bins of one pack share it)
    bin         this bin's number (1, 2, …)
    cipher      "plain" | "age" | "openpgp"
    recipients  [fingerprint, …] of whoever can decrypt
    entries     [entry, …] in scan order
    snapshot    only in a bin holding (a part of) a data-set snapshot: what
                it is and where its bytes are (see packerfs/snapshot.py)

An entry (a map) describes one directory, symlink or file part in this bin:
    path      source-relative path (bytes; b"" is the root)
    kind      "dir" | "symlink" | "file"
    mode      permission bits
    mtime_ns  modification time, nanoseconds since the epoch
  files only:
    name      the part's path inside this bin's UnixFS tree (bytes)
    version   the file version's number in the data set (newer versions are larger)
    size      plaintext size of the whole file
    stream    stored (encrypted) stream size of the whole file
    part      1-based part number, and `parts` the number of parts
    offset    where this part starts in the stream, and `length` its stream bytes
    cid       the part's UnixFS root CID
    at        the section offset of that root block in this CAR (packerfs/locator.py: how a
              remote reader finds the part's blocks without walking the CAR); absent in CARs
              written before the tail locator existed
    zstd      (part 1 of a compressed file only) its FrameTable (packerfs/compress/table.py):
              the stream decrypts to independent zstd frames, `size` is what they decompress to
    padded    (part 1 only) true: the zstd stream is followed by skippable frames up to a
              PADMÉ size (packerfs/privacy/padding.py); without `zstd`, it is one stored frame
  symlinks only:
    target    the link target (bytes), and `cid` its UnixFS node, at section offset `at` (neither
              with hidden names, where the link is in this manifest only)

With hidden names (--hide-names, packerfs/privacy) the manifest is stored encrypted for the pack's
recipients as `.packerfs/manifest.cbor.age` (or `.gpg`), with the same content: each file part's
`name` is then its opaque name in the bin's root directory, and no directory or symlink has a
UnixFS node.

Paths are bytes because POSIX names need not be UTF-8.
The encoder streams: entries are encoded one by one as they are placed and
spliced under the top-level map at the end, so a bin with many files never
holds them as Python objects.
"""

from __future__ import annotations

from packerfs.ipld import cbor
from packerfs.ipld.cid import read_cid

FORMAT = 1
NAME = b"manifest.cbor"
DIRNAME = b".packerfs"
KINDS = ("dir", "symlink", "file")


def encode_entry(entry: dict) -> bytes:
    value = dict(entry)
    if "cid" in value:
        value["cid"] = cbor.Link(value["cid"])
    return cbor.encode(value)


def encode_manifest(
    dataset: bytes, bin_number: int, cipher: str, recipients: list[str], entries: bytes, count: int,
    snapshot: dict | None = None,
) -> bytes:
    """Splice pre-encoded entries (concatenated) under the top-level map.

    `snapshot`, in a bin holding (a part of) a data-set snapshot, is its map (packerfs.snapshot.descriptor).
    """
    fields = {
        "packerfs": cbor.encode(FORMAT),
        "dataset": cbor.encode(dataset),
        "bin": cbor.encode(bin_number),
        "cipher": cbor.encode(cipher),
        "recipients": cbor.encode(list(recipients)),
        "entries": cbor.encode_head(4, count) + bytes(entries),
    }
    if snapshot is not None:
        fields["snapshot"] = cbor.encode(snapshot)
    # DAG-CBOR map keys: shorter first, then bytewise.
    order = sorted(fields, key=lambda k: (len(k.encode()), k.encode()))
    return cbor.encode_head(5, len(fields)) + b"".join(cbor.encode(k) + fields[k] for k in order)


def encode_coding_fields(fields: dict) -> bytes:
    """The bytes a file part's coding fields (`zstd`, `padded`) add inside its entry's map, and one
    more for the map's head, which may grow: what the plan reserves for them."""
    return b"\0" + b"".join(cbor.encode(k) + cbor.encode(v) for k, v in fields.items())


def manifest_fixed_bound(recipients: list[str], cipher: str) -> int:
    return len(encode_manifest(bytes(16), 2**32, cipher, recipients, b"", 2**32))


_MAX_INT = 2**63 - 1
_FAKE_CID = b"\x01\x70\x12\x20" + bytes(32)


def _worst_case(kind: str) -> dict:
    entry = {"path": b"", "kind": kind, "mode": _MAX_INT, "mtime_ns": -_MAX_INT}
    if kind == "file":
        entry.update(
            name=b"", version=_MAX_INT, size=_MAX_INT, stream=_MAX_INT, part=_MAX_INT,
            parts=_MAX_INT, offset=_MAX_INT, length=_MAX_INT, cid=_FAKE_CID, at=_MAX_INT,
        )
    elif kind == "symlink":
        entry.update(target=b"", cid=_FAKE_CID, at=_MAX_INT)
    return entry


# The encoding of the worst case with empty byte strings; each byte string adds its length and head.
_BASE_BOUND = {kind: len(encode_entry(_worst_case(kind))) for kind in KINDS}


def _bytes_growth(n: int) -> int:
    return len(cbor.encode_head(2, n)) - 1 + n


def entry_bound(kind: str, path: bytes, name: bytes = b"", target: bytes = b"") -> int:
    """Bytes an entry can take at most, whatever its numbers and CID turn out to be."""
    extra = _bytes_growth(len(path))
    if kind == "file":
        extra += _bytes_growth(len(name))
    elif kind == "symlink":
        extra += _bytes_growth(len(target))
    return _BASE_BOUND[kind] + extra


class ManifestError(ValueError):
    pass


# ---------------------------------------------------------------- decoding: what a manifest may claim
# Everything a manifest says is bounded before anyone sizes a list, a range or a file by it.
DATASET_LENGTH = 16
MAX_BIN = 2**32  # bin numbers: 1..MAX_BIN
LEAF = 1 << 20  # the packer's leaf size: every part but the last holds at least one whole leaf
MAX_BIN_BYTES = 64 << 30  # a bin fills at most a 64 GiB sector, so one part is at most that long
MAX_PARTS = 1 << 20  # 1 Mi parts: a 1 TiB file over the smallest (1 MiB) bins, 64 PiB over the largest
MAX_INT64 = 2**63 - 1  # sizes, offsets, versions: what the packer's int64 fields hold
NAME_MAX = 255  # one path component (Linux NAME_MAX)
PART_NAME_MAX = NAME_MAX + 64  # a part's name in the bin: the file's name plus `.partNNNNofNNNN`
MAX_PATH = 1 << 16  # a whole path, bytes (deeper than PATH_MAX is fine: restore uses openat)
MAX_TARGET = 4096  # a symlink target (Linux PATH_MAX)
MAX_RECIPIENT = 4096  # one recipient fingerprint string
MAX_TABLE = 64 << 20  # a compressed file's frame table (3 bytes per MiB: a 16 TiB file)


def _text_ok(value) -> bool:
    return isinstance(value, str) and len(value) <= MAX_RECIPIENT


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _path_too_long(path: bytes, component_max: int) -> str | None:
    if len(path) > MAX_PATH:
        return f"is {len(path)} bytes long (at most {MAX_PATH})"
    longest = max((len(c) for c in path.split(b"/")), default=0)
    if longest > component_max:
        return f"has a {longest}-byte component (at most {component_max})"
    return None


def decode_manifest(data: bytes) -> dict:
    """Parse and validate a manifest. Raises ManifestError with what is wrong."""
    try:
        top = cbor.decode(data)
    except cbor.CBORError as exc:
        raise ManifestError(f"manifest is not DAG-CBOR ({exc})") from None
    except RecursionError:
        raise ManifestError("manifest is not DAG-CBOR (nested too deep)") from None
    if not isinstance(top, dict) or top.get("packerfs") != FORMAT or isinstance(top.get("packerfs"), bool):
        raise ManifestError("not a packerfs manifest (format version missing or unknown)")
    for key, kind in (("dataset", bytes), ("bin", int), ("cipher", str), ("recipients", list), ("entries", list)):
        if not isinstance(top.get(key), kind) or isinstance(top.get(key), bool):
            raise ManifestError(f"manifest field {key!r} is missing or has the wrong type")
    if len(top["dataset"]) != DATASET_LENGTH:
        raise ManifestError(f"manifest field 'dataset' is {len(top['dataset'])} bytes, not {DATASET_LENGTH}")
    if not 1 <= top["bin"] <= MAX_BIN:
        raise ManifestError(f"bin number {_num(top['bin'])} is out of range (1 to {MAX_BIN})")
    if len(top["cipher"]) > 64:
        raise ManifestError("manifest field 'cipher' is implausibly long")
    if not all(_text_ok(r) for r in top["recipients"]):
        raise ManifestError("manifest field 'recipients' holds something other than fingerprints")
    entries = []
    for i, raw in enumerate(top["entries"]):
        entries.append(_check_entry(raw, i))
    top["entries"] = entries
    return top


def _num(value) -> str:
    """An untrusted integer for a message: huge ones abbreviated (str() of a 5000-digit int raises)."""
    if isinstance(value, int) and not -(10**30) < value < 10**30:
        return f"{'-' if value < 0 else ''}2**{abs(value).bit_length() - 1}+"
    return str(value)


def _check_entry(raw, i: int) -> dict:
    def bad(what):
        return ManifestError(f"manifest entry {i}: {what}")

    if not isinstance(raw, dict):
        raise bad("not a map")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise bad(f"unknown kind {kind!r}")
    required = {"path": bytes, "mode": int, "mtime_ns": int}
    if kind == "file":
        required.update(name=bytes, version=int, size=int, stream=int, part=int, parts=int, offset=int, length=int)
    if kind == "symlink":
        required.update(target=bytes)
    for key, typ in required.items():
        if not isinstance(raw.get(key), typ) or isinstance(raw.get(key), bool):
            raise bad(f"field {key!r} is missing or has the wrong type")
    if not _int_in(raw["mode"], 0, 0o7777):
        raise bad(f"mode {_num(raw['mode'])} is not a set of permission bits")
    if not _int_in(raw["mtime_ns"], -MAX_INT64 - 1, MAX_INT64):
        raise bad(f"modification time {_num(raw['mtime_ns'])} is out of range")
    why = _path_too_long(raw["path"], NAME_MAX)
    if why:
        raise bad(f"path {why}")
    if kind == "file":
        why = _path_too_long(raw["name"], PART_NAME_MAX)
        if why:
            raise bad(f"name in the bin {why}")
        for key in ("version", "size", "stream", "offset", "length", "part", "parts"):
            if not _int_in(raw[key], 0, MAX_INT64):
                raise bad(f"field {key!r} is {_num(raw[key])}, out of range (0 to {MAX_INT64})")
        if raw["length"] > MAX_BIN_BYTES:
            raise bad(f"part of {raw['length']} bytes is larger than any bin")
        # every part but the last holds at least a whole leaf, and none more than a bin
        most = min(MAX_PARTS, raw["stream"] // LEAF + 1)
        least = -(-raw["stream"] // MAX_BIN_BYTES)
        if not max(least, 1) <= raw["parts"] <= most:
            raise bad(f"{raw['parts']} parts is impossible for a stream of {raw['stream']} bytes")
    if kind == "file":
        if "zstd" in raw and (not isinstance(raw["zstd"], bytes) or len(raw["zstd"]) > MAX_TABLE):
            raise bad("field 'zstd' is not a frame table")
        if "padded" in raw and not isinstance(raw["padded"], bool):
            raise bad("field 'padded' is not true or false")
    if kind == "symlink" and len(raw["target"]) > MAX_TARGET:
        raise bad(f"symlink target is {len(raw['target'])} bytes long (at most {MAX_TARGET})")
    if "at" in raw and not _int_in(raw["at"], 0, MAX_BIN_BYTES):
        raise bad(f"section offset {_num(raw['at'])} lies outside any bin")
    entry = dict(raw)
    # a symlink of a pack with hidden names has no UnixFS node: its target is in the sealed manifest only
    if kind == "file" or (kind == "symlink" and "cid" in raw):
        cid = raw.get("cid")
        if not isinstance(cid, cbor.Link):
            raise bad("field 'cid' is missing or not a CID")
        entry["cid"] = bytes(cid)
        try:
            _, end = read_cid(entry["cid"])
        except ValueError as exc:
            raise bad(f"malformed CID ({exc})") from None
        if end != len(entry["cid"]):
            raise bad("malformed CID (trailing bytes)")
    if kind == "file":
        if not (1 <= entry["part"] <= entry["parts"]):
            raise bad("part number out of range")
        if entry["offset"] < 0 or entry["length"] < 0 or entry["offset"] + entry["length"] > entry["stream"]:
            raise bad("part lies outside its stream")
    return entry
