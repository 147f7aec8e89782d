"""The data-set snapshot: the whole current tree after a scan, one root CID.

Every scan that changes anything (a file added, changed or deleted, or the
first scan) ends by sealing a snapshot into the last bin it writes (a new bin
of its own when the last one has no room). A snapshot is what makes a set of
bins describe one state of the source: unpack restores exactly the snapshot's
paths, so an unchanged file is never lost (its entry points at the old bin
that still holds it) and a deleted file never comes back (it is simply not
listed), whatever older manifests still say.

Where it lives. In the snapshot's bin, next to the bin manifest:

    .packerfs/snapshot.cbor                   the whole body, or, when it
    .packerfs/snapshot.cbor.part0001of0003    does not fit one bin, parts in
                                              consecutive bins (cut on 1 MiB
                                              leaf boundaries like any file)

Each part is an ordinary UnixFS file (raw 1 MiB leaves), so `ipfs-car unpack`
writes it out and any CBOR tool reads it. The snapshot's identity is its id
(1, 2, … in scan order) and the UnixFS root CID of part 1.

The bin manifest of each bin holding a part carries a `snapshot` map:

    id        the snapshot's number in this data set (newer is larger)
    time_ns   when the scan that made it started (ns since the epoch)
    entries   paths in the tree (directories, symlinks and files)
    files     regular files, and `bytes` their plaintext bytes in total
    size      bytes of the whole body
    part      1-based part number, `parts` the number of parts
    offset    where this part starts in the body, `length` its bytes
    cid       this part's UnixFS root

The body is a CBOR sequence (RFC 8742) of DAG-CBOR maps, so it is written and
read a bounded piece at a time, whatever the number of files:

    1. a header  {"packerfs_snapshot": 1, "dataset": 16 bytes, "id", "time_ns"}
    2. one map per path, in no promised order:
         {"path", "kind": "dir", "mode", "mtime_ns"}
         {"path", "kind": "symlink", "mode", "mtime_ns", "target"}
         {"path", "kind": "file", "mode", "mtime_ns", "size", "stream",
          "version", "bins": [bin of part 1, bin of part 2, …]}
       (`version` matches the `version` of the file's parts in the bin
       manifests; `bins` says which bins hold its parts, so a file in a lost
       bin is still listed by name)
    3. a trailer {"end": true, "entries", "files", "bytes", "bins": [every bin
       the snapshot needs, its own included], "snapshot_bins": [its own]}

A reader checks the trailer's counts against what it read. Paths are bytes
(POSIX names need not be UTF-8).
"""

from __future__ import annotations

from typing import Iterator

from packerfs.ipld import cbor

FORMAT = 1
NAME = b"snapshot.cbor"
# No entry the scan writes comes near this (a path of 64 KiB of names plus a
# target of 4 KiB); a bigger item in a CAR is damage, not data.
MAX_ITEM = 1 << 20
KINDS = ("dir", "symlink", "file")


class SnapshotError(ValueError):
    pass


# ---------------------------------------------------------------- writing


def encode_header(dataset: bytes, snapshot_id: int, time_ns: int) -> bytes:
    return cbor.encode({"packerfs_snapshot": FORMAT, "dataset": dataset, "id": snapshot_id, "time_ns": time_ns})


# Entries are written once per path per changing scan, so they are encoded by hand, in DAG-CBOR's
# canonical key order (shorter keys first, then bytewise): bins, kind, mode, path, size, stream,
# target, version, mtime_ns. The tests check this against the generic encoder.
_KEY = {k: cbor.encode(k) for k in ("bins", "kind", "mode", "path", "size", "stream", "target", "version", "mtime_ns")}
_KIND = {k: cbor.encode(k) for k in KINDS}
_FIELDS = {"dir": 4, "symlink": 5, "file": 8}
_head = cbor.encode_head


def _int(n: int) -> bytes:
    return _head(0, n) if n >= 0 else _head(1, -1 - n)


def encode_entry(record: dict, version: int) -> bytes:
    """One path of the tree, from its index record (see packerfs.index.store.RECORD_FIELDS)."""
    kind = record["kind"]
    path = record["path"]
    out = [_head(5, _FIELDS[kind])]
    if kind == "file":
        bins = record["bins"]
        out += [_KEY["bins"], _head(4, len(bins)), *map(_int, bins)]
    out += [_KEY["kind"], _KIND[kind], _KEY["mode"], _int(record["mode"]), _KEY["path"], _head(2, len(path)), path]
    if kind == "file":
        out += [_KEY["size"], _int(record["size"]), _KEY["stream"], _int(record["stream_size"])]
    elif kind == "symlink":
        target = record["target"]
        out += [_KEY["target"], _head(2, len(target)), target]
    if kind == "file":
        out += [_KEY["version"], _int(version)]
    out += [_KEY["mtime_ns"], _int(record["mtime_ns"])]
    return b"".join(out)


def _encode_entry_generic(record: dict, version: int) -> bytes:
    """The same entry through the generic encoder (what the tests compare encode_entry with)."""
    entry = {"path": record["path"], "kind": record["kind"], "mode": record["mode"], "mtime_ns": record["mtime_ns"]}
    if record["kind"] == "symlink":
        entry["target"] = record["target"]
    elif record["kind"] == "file":
        entry.update(size=record["size"], stream=record["stream_size"], version=version, bins=list(record["bins"]))
    return cbor.encode(entry)


def encode_trailer(entries: int, files: int, nbytes: int, bins: list[int], snapshot_bins: list[int]) -> bytes:
    return cbor.encode(
        {"end": True, "entries": entries, "files": files, "bytes": nbytes, "bins": sorted(bins),
         "snapshot_bins": sorted(snapshot_bins)}
    )


def descriptor(snapshot_id: int, time_ns: int, totals: dict, size: int, part: int, parts: int,
               offset: int, length: int, cid: bytes) -> dict:
    """The `snapshot` map of a bin manifest."""
    return {
        "id": snapshot_id, "time_ns": time_ns, "entries": totals["entries"], "files": totals["files"],
        "bytes": totals["bytes"], "size": size, "part": part, "parts": parts, "offset": offset,
        "length": length, "cid": cbor.Link(cid),
    }


def descriptor_bound() -> int:
    """The most bytes a `snapshot` map (with its key) adds to a bin manifest."""
    big = 2**63 - 1
    worst = descriptor(big, -big, {"entries": big, "files": big, "bytes": big}, big, big, big, big, big,
                       b"\x01\x70\x12\x20" + bytes(32))
    return len(cbor.encode("snapshot")) + len(cbor.encode(worst))


# ---------------------------------------------------------------- reading


def check_descriptor(raw) -> dict:
    """Validate a bin manifest's `snapshot` map; returns it with `cid` as bytes."""
    if not isinstance(raw, dict):
        raise SnapshotError("the manifest's snapshot field is not a map")
    for key in ("id", "time_ns", "entries", "files", "bytes", "size", "part", "parts", "offset", "length"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SnapshotError(f"the manifest's snapshot field {key!r} is missing or not an integer")
        if key != "time_ns" and value < 0:
            raise SnapshotError(f"the manifest's snapshot field {key!r} is negative")
    if not isinstance(raw.get("cid"), cbor.Link):
        raise SnapshotError("the manifest's snapshot field 'cid' is missing or not a CID")
    if not (1 <= raw["part"] <= raw["parts"]) or raw["parts"] > 1 << 20 or raw["id"] > 2**32:
        raise SnapshotError("the manifest's snapshot part or id is out of range")
    if raw["offset"] + raw["length"] > raw["size"]:
        raise SnapshotError("the manifest's snapshot part lies outside the snapshot")
    out = dict(raw)
    out["cid"] = bytes(raw["cid"])
    return out


def _check_entry(raw, n: int) -> dict:
    def bad(what: str) -> SnapshotError:
        return SnapshotError(f"snapshot entry {n}: {what}")

    if not isinstance(raw, dict):
        raise bad("not a map")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise bad(f"unknown kind {kind!r}")
    required = {"path": bytes, "mode": int, "mtime_ns": int}
    if kind == "symlink":
        required["target"] = bytes
    if kind == "file":
        required.update(size=int, stream=int, version=int, bins=list)
    for key, typ in required.items():
        value = raw.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise bad(f"field {key!r} is missing or has the wrong type")
    if kind == "file":
        if raw["size"] < 0 or raw["stream"] < 0 or raw["version"] < 1:
            raise bad("negative size or version")
        if not raw["bins"] or any(not isinstance(b, int) or isinstance(b, bool) or not 1 <= b < 2**32
                                  for b in raw["bins"]):
            raise bad("bins must be bin numbers")
    return raw


class Decoder:
    """Parses a snapshot body fed in pieces; memory stays at one piece plus one item.

    for entry in decoder.feed(piece): ...   (entries, validated)
    decoder.finish()                         the trailer, after checking the counts
    """

    def __init__(self, dataset: bytes | None = None, snapshot_id: int | None = None):
        self.buffer = bytearray()
        self.header: dict | None = None
        self.trailer: dict | None = None
        self.count = 0
        self.files = 0
        self.bytes = 0
        self._dataset = dataset
        self._id = snapshot_id

    def feed(self, data: bytes) -> Iterator[dict]:
        self.buffer += data
        pos = 0
        try:
            while pos < len(self.buffer):
                if self.trailer is not None:
                    raise SnapshotError("bytes after the snapshot's trailer")
                try:
                    item, end = cbor.decode_prefix(self.buffer, pos)
                except cbor.CBORTruncated:
                    if len(self.buffer) - pos > MAX_ITEM:
                        raise SnapshotError(f"snapshot item {self.count + 1} is larger than {MAX_ITEM} bytes")
                    break
                except cbor.CBORError as exc:
                    raise SnapshotError(f"snapshot item {self.count + 1} is not DAG-CBOR ({exc})") from None
                pos = end
                entry = self._take(item)
                if entry is not None:
                    yield entry
        finally:
            del self.buffer[:pos]

    def _take(self, item) -> dict | None:
        if self.header is None:
            if not isinstance(item, dict) or item.get("packerfs_snapshot") != FORMAT:
                raise SnapshotError("not a packerfs snapshot (format version missing or unknown)")
            if not isinstance(item.get("dataset"), bytes) or not isinstance(item.get("id"), int):
                raise SnapshotError("snapshot header lacks its dataset or id")
            if self._dataset is not None and item["dataset"] != self._dataset:
                raise SnapshotError("snapshot belongs to another data set")
            if self._id is not None and item["id"] != self._id:
                raise SnapshotError(f"snapshot header says id {item['id']}, its bins say {self._id}")
            self.header = item
            return None
        if isinstance(item, dict) and item.get("end") is True:
            self.trailer = item
            return None
        entry = _check_entry(item, self.count + 1)
        self.count += 1
        if entry["kind"] == "file":
            self.files += 1
            self.bytes += entry["size"]
        return entry

    def finish(self) -> dict:
        if self.buffer:
            raise SnapshotError("snapshot ends inside an item (truncated)")
        if self.header is None or self.trailer is None:
            raise SnapshotError("snapshot is truncated (no header or trailer)")
        t = self.trailer
        for key in ("entries", "files", "bytes"):
            if not isinstance(t.get(key), int) or isinstance(t.get(key), bool):
                raise SnapshotError(f"snapshot trailer field {key!r} is missing")
        if (t["entries"], t["files"], t["bytes"]) != (self.count, self.files, self.bytes):
            raise SnapshotError(
                f"snapshot trailer counts {t['entries']} entries, {t['files']} files, {t['bytes']} bytes; "
                f"the body has {self.count}, {self.files}, {self.bytes}"
            )
        for key in ("bins", "snapshot_bins"):
            value = t.get(key)
            if not isinstance(value, list) or any(
                not isinstance(b, int) or isinstance(b, bool) or not 1 <= b < 2**32 for b in value
            ):
                raise SnapshotError(f"snapshot trailer field {key!r} is not a list of bin numbers")
        return t
