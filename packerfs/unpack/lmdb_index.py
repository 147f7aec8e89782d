"""A CAR set's block index in LMDB, kept between runs so an unchanged set is not scanned again.

    store = CarIndexStore(state_dir)                  # STATE/carset.lmdb
    carset = CarSet.open(cars_dir, index=store.session())
    ...                                               # SIGHUP: another CarSet on store.session()
    carset.close(); store.close()

One environment, three named databases:

  meta    b"format" -> FORMAT; b"next_car" -> the next car id (ids are never reused);
          b"garbage" -> how many block records belong to CARs that changed since
  cars    realpath of a CAR -> CBOR map: car id, the file's (size, mtime_ns, inode)
          when it was scanned, and what CarSet knows of it (bin, root,
          dataset, cipher, recipients, manifest entries, section count, manifest offset)
  blocks  CID -> one or more 18-byte locations, in the order they were added:
          car id u32 | section offset u64 | data offset - section offset u16 | length u32

A CAR whose file still has the size, mtime and inode recorded for it is
taken from `cars` as it is (its blocks are already in `blocks`): no byte of it is
read. Anything else (a new name, a replaced or rewritten file) is scanned, under a
new car id; the records of the id it replaces become garbage, which get() skips,
and once garbage outweighs live records the store is emptied when next opened. Block
bytes are still checked against their CIDs on every read, so a CAR modified in
place without its mtime moving gives CorruptBlock, never wrong bytes.

Each session knows which car ids its CarSet uses (those passed to end_car): get()
returns the first location of a CID in one of them, as MemoryBlockIndex returns
the first one added. Sessions of one store share its environment; LMDB gives any
number of reader threads a consistent view while one session writes.

Size: about 95 bytes of LMDB per block (a 36-byte key, an 18-byte location, B-tree
overhead; 10,943 blocks of a 10.6 GiB set took 1.0 MB), so about 95 bytes per MiB
of CAR data, plus each CAR's manifest. Nothing
here is key material (invariant 5): manifests hold recipients' fingerprints only.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading

import lmdb

from packerfs.errors import PackerfsError
from packerfs.ipld import cbor
from packerfs.unpack.carset import Car, Location

DIRNAME = "carset.lmdb"
FORMAT = 3  # 2: each CAR record keeps its manifest's snapshot map; 3: remote and foreign CARs
MAP_SIZE = 1 << 40  # address space, not disk
_LOC = struct.Struct(">IQHI")
_U64 = struct.Struct(">Q")
# Start over when dead records are more than this share of all records (and more than a few).
GARBAGE_SHARE = 0.5
GARBAGE_MIN = 1 << 16


def _key(path: str) -> bytes:
    raw = os.fsencode(path if "://" in path else os.path.realpath(path))
    return raw if len(raw) <= 480 else b"#" + hashlib.sha256(raw).digest()


class CarIndexStore:
    """The LMDB environment in a state directory; hands out sessions (one per CarSet)."""

    def __init__(self, state_dir: str, *, maintain: bool = True):
        """`maintain`: start over if the store is of another format or mostly garbage. False for a
        second process on a store its owner keeps open (the reverse mount's worker processes)."""
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DIRNAME)
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self.env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=4, subdir=True, lock=True)
        except (OSError, lmdb.Error) as exc:
            raise PackerfsError(f"{self.path}: cannot open the CAR index: {exc}") from None
        self.meta = self.env.open_db(b"meta")
        self.cars = self.env.open_db(b"cars")
        self.blocks = self.env.open_db(b"blocks")
        self.write_lock = threading.Lock()  # one writing session at a time (LMDB would block anyway)
        self.started_over = False
        if not maintain:
            return
        with self.env.begin(write=True) as txn:
            found = txn.get(b"format", db=self.meta)
            if found is not None and int(found) != FORMAT:
                self._clear(txn)  # written by another packerfs version: rebuilt, not misread
            elif found is not None and self._garbage_heavy(txn):
                self._clear(txn)
            txn.put(b"format", str(FORMAT).encode(), db=self.meta)

    def _garbage_heavy(self, txn) -> bool:
        garbage = _U64.unpack(txn.get(b"garbage", _U64.pack(0), db=self.meta))[0]
        total = txn.stat(self.blocks)["entries"]
        return garbage > GARBAGE_MIN and garbage > GARBAGE_SHARE * max(total, 1)

    def _clear(self, txn) -> None:
        txn.drop(self.cars, delete=False)
        txn.drop(self.blocks, delete=False)
        txn.delete(b"garbage", db=self.meta)  # car ids keep counting up
        self.started_over = True

    def session(self) -> "LmdbBlockIndex":
        return LmdbBlockIndex(self)

    def known_cars(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.cars)["entries"]

    def close(self) -> None:
        self.env.close()


class LmdbBlockIndex:
    """BlockIndex over a CarIndexStore for one CarSet (see packerfs.unpack.carset.BlockIndex)."""

    def __init__(self, store: CarIndexStore, *, owns_store: bool = False):
        self.store = store
        self.owns_store = owns_store
        self.live: set[int] = set()
        self.live_blocks = 0
        self.reused: list[str] = []  # CARs taken from the index unread
        self.scanned: list[str] = []  # CARs whose sections were read and recorded
        # the CAR being scanned: (key, car id, stamp, its (cid, location) records)
        self._pending: tuple[bytes, int, list[int] | None, list[tuple[bytes, bytes]]] | None = None

    @classmethod
    def open(cls, state_dir: str) -> "LmdbBlockIndex":
        """A session that closes its own store."""
        return cls(CarIndexStore(state_dir), owns_store=True)

    # ------------------------------------------------------------ scanning (CarSet.open's thread)

    def begin_car(self, path: str, stamp: list | None) -> tuple[int, Car | None]:
        self._pending = None  # a scan that did not reach end_car (a bad CAR, another data set)
        store = self.store
        key = _key(path)
        with store.env.begin() as txn:
            raw = txn.get(key, db=store.cars)
        record = cbor.decode(bytes(raw)) if raw is not None else None
        if record is not None and stamp is not None and record["stamp"] == stamp:
            car = Car(id=record["id"], path=path, **record["car"])
            return car.id, car
        with store.write_lock, store.env.begin(write=True) as txn:
            found = txn.get(b"next_car", db=store.meta)
            car_id = int(found) if found is not None else 0
            txn.put(b"next_car", str(car_id + 1).encode(), db=store.meta)
            if record is not None:  # the file changed: the records of its old id are garbage now
                garbage = _U64.unpack(txn.get(b"garbage", _U64.pack(0), db=store.meta))[0]
                txn.put(b"garbage", _U64.pack(garbage + record["car"]["blocks"]), db=store.meta)
                txn.delete(key, db=store.cars)
        self._pending = (key, car_id, stamp, [])
        return car_id, None

    def add(self, cid: bytes, location: Location) -> None:
        if self._pending is None or self._pending[1] != location.car:
            raise RuntimeError("LmdbBlockIndex.add outside begin_car/end_car of that CAR")
        car, section_offset, data_offset, length = location
        self._pending[3].append((cid, _LOC.pack(car, section_offset, data_offset - section_offset, length)))

    def end_car(self, car: Car) -> None:
        """Record a scanned CAR (its blocks and its Car, one transaction), or take a known one."""
        pending = self._pending
        if pending is not None and pending[1] == car.id:
            self._pending = None
            key, car_id, stamp, records = pending
            store = self.store
            with store.write_lock, store.env.begin(write=True) as txn:
                db = store.blocks
                for cid, value in records:
                    if not txn.put(cid, value, overwrite=False, db=db):
                        old = txn.get(cid, db=db)
                        if all(_LOC.unpack_from(old, i)[0] != car_id for i in range(0, len(old), _LOC.size)):
                            txn.put(cid, old + value, db=db)
                if stamp is not None:
                    fields = {
                        "size": car.size, "root": car.root, "bin": car.bin, "dataset": car.dataset,
                        "cipher": car.cipher, "recipients": list(car.recipients), "entries": car.entries,
                        "blocks": car.blocks, "manifest_offset": car.manifest_offset,
                        "located": car.located, "roots": list(car.roots), "foreign": car.foreign,
                        "snapshot_at": car.snapshot_at, "sealed": car.sealed,
                    }
                    if car.snapshot is not False:  # known: the map, or None for a bin without a snapshot part
                        fields["snapshot"] = car.snapshot
                    txn.put(key, cbor.encode({"id": car_id, "stamp": stamp, "car": fields}), db=store.cars)
            self.scanned.append(car.path)
        else:
            self.reused.append(car.path)
        self.live.add(car.id)
        self.live_blocks += car.blocks

    # ------------------------------------------------------------ lookups (any thread)

    def get(self, cid: bytes) -> Location | None:
        with self.store.env.begin(buffers=True) as txn:
            raw = txn.get(cid, db=self.store.blocks)
            if raw is None:
                return None
            for i in range(0, len(raw), _LOC.size):
                car, section_offset, delta, length = _LOC.unpack_from(raw, i)
                if car in self.live:
                    return Location(car, section_offset, section_offset + delta, length)
        return None

    def __len__(self) -> int:
        return self.live_blocks

    def close(self) -> None:
        self._pending = None
        self.live = set()
        if self.owns_store:
            self.store.close()
