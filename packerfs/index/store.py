"""LMDB schema and access.

One environment in the state directory with these named databases (all keys
big-endian so LMDB's byte order is numeric order):

  meta      b"identity" -> what this state was built for (source, bin size,
                            cipher, recipients); a mismatch is refused
            b"scan"     -> progress: resume point, totals, state
            b"dataset"  -> the data set's 16-byte id
  files     u64 version -> file record (path, kind, fingerprint, sizes,
                            stream params; RECORD_FIELDS order); versions only grow
  paths     path_key(path) -> u64 version of the newest record for that path ‖
                            u32 generation of the last scan that saw it (a path
                            the newest scan did not see is gone from the source)
  digests   u64 version ‖ u32 chunk -> concatenated sha2-256 digests of the
                            stream's leaves [chunk*1024, chunk*1024+1024)
  bins      u32 bin     -> bin result (CAR size, root, piece CIDs) and, once a
                            snapshot has been sealed, its status: current or
                            retired, whether it can still be generated, its
                            live bytes
  segments  u32 bin ‖ u64 end offset -> what produces that byte range of the
                            CAR; set_range(bin ‖ offset+1) finds the segment
                            holding `offset`

Nothing here is usable key material (invariant 5): stream params hold
secrets only wrapped under the dataset secret, which lives in its own 0600
file beside the index.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterator

import lmdb

from packerfs.errors import PackerfsError, UsageError
from packerfs.ipld import cbor

DIGESTS_PER_CHUNK = 1024
DIGEST = 32
FORMAT = 3  # 2: file records as arrays, compact stream params; 3: paths carry generations, snapshots
# LMDB reserves address space, not disk: the map can be far larger than the data.
MAP_SIZE = 1 << 40


class IndexMismatch(UsageError):
    pass


_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack


def u32(n: int) -> bytes:
    return _U32(n)


def u64(n: int) -> bytes:
    return _U64(n)


def path_key(path: bytes) -> bytes:
    """LMDB keys are 1..511 bytes; POSIX paths may be empty (the root) or up to 4 KiB."""
    if len(path) < 480:
        return b"/" + path
    return b"#" + hashlib.sha256(path).digest()


# File records are stored as CBOR arrays in this field order (a map would spend
# ~100 bytes per file on key names); absent optional fields are trailing.
RECORD_FIELDS = (
    "path", "kind", "mode", "mtime_ns", "size", "fp", "target", "bins", "complete",
    "stream_size", "parts", "leaves_sealed", "params",
    "coding",  # compress.coding.Coding.to_record(): how the file is stored before encryption (absent: as it is)
)


def pack_record(record: dict) -> bytes:
    values = [record.get(name) for name in RECORD_FIELDS]
    while values and values[-1] is None:
        values.pop()
    return cbor.encode(values)


def unpack_record(data: bytes) -> dict:
    values = cbor.decode(bytes(data))
    record = dict(zip(RECORD_FIELDS, values))
    return {k: v for k, v in record.items() if v is not None}


def pack(value) -> bytes:
    return cbor.encode(value)


def unpack(data: bytes):
    return cbor.decode(bytes(data))


class Index:
    def __init__(self, state_dir: str, *, readonly: bool = False):
        self.state_dir = state_dir
        path = os.path.join(state_dir, "index.lmdb")
        if readonly and not os.path.exists(path):
            raise PackerfsError(f"{state_dir}: no packerfs index here (run a scan first)")
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=8, readonly=readonly, lock=True, subdir=True)
        except lmdb.Error as exc:
            raise PackerfsError(f"{path}: cannot open the index: {exc}") from None
        self.meta = self.env.open_db(b"meta")
        self.files = self.env.open_db(b"files")
        self.paths = self.env.open_db(b"paths")
        self.digests = self.env.open_db(b"digests")
        self.bins = self.env.open_db(b"bins")
        self.segments = self.env.open_db(b"segments")
        # The scan that is writing: paths it commits or touches are marked with it.
        self.generation = 0
        stored = self.get_meta(b"format")
        if stored is not None and stored != FORMAT:
            self.env.close()
            raise IndexMismatch(
                f"state directory {state_dir} holds an index of format {stored}, this packerfs reads "
                f"format {FORMAT}; use a new -t/--temp directory (the old one can be deleted)"
            )

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: bytes, default=None):
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.meta)
        return default if raw is None else unpack(raw)

    def bind(self, identity: dict) -> None:
        """Tie this state to one source and set of options, or check that it already is."""
        stored = self.get_meta(b"identity")
        if stored is None:
            with self.env.begin(write=True) as txn:
                txn.put(b"identity", pack(identity), db=self.meta)
                txn.put(b"format", pack(FORMAT), db=self.meta)
                txn.put(b"dataset", pack(os.urandom(16)), db=self.meta)
            return
        for key in sorted(set(identity) | set(stored)):
            if identity.get(key) != stored.get(key):
                raise IndexMismatch(
                    f"state directory {self.state_dir} was made for a different {key} "
                    f"({stored.get(key)!r}, now {identity.get(key)!r}); use another -t/--temp "
                    f"directory, or the original options"
                )

    @property
    def dataset(self) -> bytes:
        return self.get_meta(b"dataset")

    # ------------------------------------------------------------------ reads

    def file(self, version: int) -> dict:
        with self.env.begin() as txn:
            raw = txn.get(u64(version), db=self.files)
        if raw is None:
            raise PackerfsError(f"index has no file version {version}")
        return unpack_record(raw)

    def latest_version(self, path: bytes) -> int | None:
        with self.env.begin() as txn:
            raw = txn.get(path_key(path), db=self.paths)
        return None if raw is None else struct.unpack(">Q", raw[:8])[0]

    def iter_paths(self, batch: int = 1024) -> Iterator[tuple[bytes, int, int]]:
        """(path key, version, generation) of every path, in key order, a batch per transaction."""
        after = b""
        while True:
            rows = []
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self.paths)
                found = cursor.set_range(after) if after else cursor.first()
                while found and len(rows) < batch:
                    key, value = bytes(cursor.key()), bytes(cursor.value())
                    if key != after:
                        rows.append((key, value))
                    found = cursor.next()
            if not rows:
                return
            for key, value in rows:
                version, generation = struct.unpack(">QI", value)
                yield key, version, generation
            after = rows[-1][0]

    def digests_of(self, version: int, first: int, count: int) -> bytes:
        """Digests of leaves [first, first+count) of a file version's stream."""
        if count <= 0:
            return b""  # no transaction for nothing (a file's first leaf asks for the empty prefix)
        out = bytearray()
        with self.env.begin() as txn:
            index = first
            end = first + count
            while index < end:
                chunk, within = divmod(index, DIGESTS_PER_CHUNK)
                raw = txn.get(u64(version) + u32(chunk), db=self.digests)
                if raw is None:
                    raise PackerfsError(f"index lacks leaf digests of file version {version}, chunk {chunk}")
                take = min(end - index, DIGESTS_PER_CHUNK - within)
                out += raw[within * DIGEST : (within + take) * DIGEST]
                index += take
        return bytes(out)

    def bin(self, number: int) -> dict | None:
        with self.env.begin() as txn:
            raw = txn.get(u32(number), db=self.bins)
        return None if raw is None else unpack(raw)

    def all_bins(self) -> list[dict]:
        with self.env.begin() as txn:
            return [unpack(v) for _, v in txn.cursor(db=self.bins)]

    def segment_at(self, number: int, offset: int) -> tuple[int, int, list]:
        """(start, end, record) of the segment of bin `number` holding byte `offset`."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.segments)
            if not cursor.set_range(u32(number) + u64(offset + 1)):
                raise PackerfsError(f"bin {number}: offset {offset} is past the end")
            key, value = cursor.item()
            if key[:4] != u32(number):
                raise PackerfsError(f"bin {number}: offset {offset} is past the end")
            record = unpack(value)
            return record[0], struct.unpack(">Q", key[4:])[0], record[1:]

    def segments_of(self, number: int) -> Iterator[tuple[int, int, list]]:
        """All segments of a bin in order, fetched in batches so no transaction spans the caller's work."""
        after = u32(number)
        while True:
            batch = []
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self.segments)
                found = cursor.set_range(after)
                while found and len(batch) < 256:
                    key, value = cursor.item()
                    if key[:4] != u32(number):
                        break
                    batch.append((bytes(key), bytes(value)))
                    found = cursor.next()
            if not batch:
                return
            for key, value in batch:
                record = unpack(value)
                yield record[0], struct.unpack(">Q", key[4:])[0], record[1:]
            last = batch[-1][0]
            after = last[:4] + u64(struct.unpack(">Q", last[4:])[0] + 1)

    def latest_versions_exist(self) -> bool:
        with self.env.begin() as txn:
            return txn.stat(self.paths)["entries"] > 0


    # ------------------------------------------------------------------ writes

    def touch_tree(self, path: bytes) -> Iterator[int]:
        """Mark `path` and every path below it as seen by this generation (a subtree that could not be
        read); yields their versions, a batch per transaction.

        Paths long enough to be stored under their hash are not found by prefix; they are rare enough
        (480 bytes and more) that an unreadable directory above them is not worth a full scan.
        """
        generation = u32(self.generation)
        below = b"/" + path + b"/" if path else b"/"
        rows = []
        if path:
            with self.env.begin() as txn:
                raw = txn.get(path_key(path), db=self.paths)
            if raw is not None:
                rows.append((path_key(path), bytes(raw)))
        after = None  # the last key handled below `path`
        while True:
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self.paths)
                found = cursor.set_range(after or below)
                while found and len(rows) < 1024 and bytes(cursor.key()).startswith(below):
                    if bytes(cursor.key()) != after:
                        rows.append((bytes(cursor.key()), bytes(cursor.value())))
                    found = cursor.next()
            if not rows:
                return
            last = rows[-1][0]
            rows = [(key, value) for key, value in rows if value[8:] != generation]  # not seen twice
            with self.env.begin(write=True) as txn:
                for key, value in rows:
                    txn.put(key, value[:8] + generation, db=self.paths)
            for _, value in rows:
                yield struct.unpack(">Q", value[:8])[0]
            after = last if last.startswith(below) else after
            rows = []

    def clear_segments(self, number: int) -> None:
        """Drop whatever an interrupted scan left of an unsealed bin's byte map."""
        prefix = u32(number)
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor(db=self.segments)
            if cursor.set_range(prefix):
                while cursor.key()[:4] == prefix:
                    if not cursor.delete():
                        break

    def commit(
        self, *, files=(), paths=(), touched=(), dropped=(), digests=(), bins=(), bin_updates=(), segments=(), meta=()
    ) -> None:
        """Write one consistent step (a sealed bin and everything it needs) atomically.

        paths: (path, version) now the path's newest record, seen by this generation;
        touched: paths seen unchanged by this generation; dropped: path keys gone from the source;
        bin_updates: (bin, fields) merged into sealed bins' results.
        """
        generation = u32(self.generation)
        with self.env.begin(write=True) as txn:
            # The per-file rows go in through one cursor per database (putmulti: one call, not one per row).
            if files:
                txn.cursor(db=self.files).putmulti((_U64(version), pack_record(record)) for version, record in files)
            if paths:
                txn.cursor(db=self.paths).putmulti((path_key(path), _U64(version) + generation) for path, version in paths)
            for path in touched:
                key = path_key(path)
                raw = txn.get(key, db=self.paths)
                if raw is not None:
                    txn.put(key, bytes(raw[:8]) + generation, db=self.paths)
            for key in dropped:
                txn.delete(key, db=self.paths)
            if digests:
                txn.cursor(db=self.digests).putmulti(
                    (_U64(version) + _U32(chunk), data) for (version, chunk), data in digests
                )
            for number, record in bins:
                txn.put(u32(number), pack(record), db=self.bins)
            for number, fields in bin_updates:
                raw = txn.get(u32(number), db=self.bins)
                if raw is not None:
                    record = unpack(raw)
                    record.update(fields)
                    txn.put(u32(number), pack(record), db=self.bins)
            if segments:
                txn.cursor(db=self.segments).putmulti(
                    (_U32(number) + _U64(end), pack(record)) for number, end, record in segments
                )
            for key, value in meta:
                txn.put(key, pack(value), db=self.meta)

    def disk_usage(self) -> int:
        info = self.env.info()
        stat = self.env.stat()
        return info["last_pgno"] * stat["psize"]
