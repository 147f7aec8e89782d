"""A set of retrieved CAR files: which blocks are where, and what each bin holds.

Opening a set walks every CAR's section headers (no block data is read), so it
costs a seek per block, and records cid -> (CAR, section offset, data offset,
length) in a BlockIndex. Each CAR's manifest is then found the way any UnixFS
tool would find it, root directory -> `.packerfs` -> `manifest.cbor`, reading
and verifying just those blocks, and decoded.

CARs that cannot be used (not a CAR, truncated, no manifest, another data set's
cipher) are reported one line each, naming the file and offset, and the others
are used. Bins are ordered by number; gaps in the numbers are missing bins.

Blocks are read with os.pread on shared descriptors (no seek state), so one
CarSet serves any number of threads.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Protocol, Sequence

from packerfs import manifest as manifest_format
from packerfs.errors import FormatError, PackerfsError, TruncatedInput, UsageError
from packerfs.ipld.car import CarReader, Section, file_kind, open_regular
from packerfs.ipld.cid import IDENTITY, check_block, cid_multihash, cid_to_str
from packerfs.unpack import dag

CAR_NAME = re.compile(r"^bin-(\d+)\.car$")
# A manifest larger than this is not something the planner can produce for any bin size we accept.
MAX_MANIFEST = 1 << 31
# More missing bins than this below the highest bin number is not a real set (about 32 PiB of
# bins at 32 GiB each are gone) but a corrupt or crafted bin number: the CARs and file names
# claiming such bins are refused, so that no list of missing bins can grow without bound.
MAX_MISSING_BINS = 1 << 20


class Location(NamedTuple):
    car: int  # CarSet.car_by_id key
    section_offset: int  # where the section (its length prefix) starts: what errors name
    data_offset: int  # where the block's bytes start
    length: int  # block length


class BlockIndex(Protocol):
    """cid -> Location. The in-memory dict is the default; an LMDB one can replace it."""

    def add(self, cid: bytes, location: Location) -> None:
        """Record a block; the first location recorded for a CID wins."""
        ...

    def get(self, cid: bytes) -> Location | None: ...

    def __len__(self) -> int: ...

    def begin_car(self, path: str) -> tuple[int, "Car | None"]:
        """Before scanning `path`: its car id, and its Car if the index already holds that file as it
        is now (then its blocks are indexed and the scan is skipped)."""
        ...

    def end_car(self, car: "Car") -> None:
        """`car` is in the set: its blocks (added since begin_car, unless it came from the index) are
        all there."""
        ...

    def close(self) -> None: ...


class MemoryBlockIndex:
    """A dict. Roughly 200 bytes per block: about 200 MB per million blocks (1 TiB of 1 MiB leaves)."""

    def __init__(self) -> None:
        self._map: dict[bytes, tuple[int, int, int, int]] = {}
        self._cars = 0

    def add(self, cid: bytes, location: Location) -> None:
        self._map.setdefault(cid, tuple(location))

    def get(self, cid: bytes) -> Location | None:
        found = self._map.get(cid)
        return Location(*found) if found is not None else None

    def __len__(self) -> int:
        return len(self._map)

    def begin_car(self, path: str) -> tuple[int, "Car | None"]:
        self._cars += 1
        return self._cars - 1, None

    def end_car(self, car: "Car") -> None:
        pass

    def close(self) -> None:
        self._map = {}


@dataclass
class Car:
    """One usable packerfs CAR."""

    id: int
    path: str
    size: int
    root: bytes
    bin: int
    dataset: bytes
    cipher: str
    recipients: list[str]
    entries: list[dict]  # the decoded manifest's entries
    blocks: int  # sections in the CAR
    manifest_offset: int  # section offset of the manifest file's root block
    # the manifest's `snapshot` map (packerfs.snapshot.check_descriptor), None if it has none;
    # False if not known (a Car from an index that did not record it: packerfs.unpack.snapshots reads it)
    snapshot: dict | None | bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Descriptors:
    """Open file descriptors for the CARs, at most `limit` at once, safe across threads.

    A descriptor in use by a read is never closed under it (reference count);
    idle ones are closed least-recently-used first.
    """

    def __init__(self, limit: int = 128):
        self.limit = limit
        self.lock = threading.Lock()
        self.open: OrderedDict[int, list] = OrderedDict()  # car id -> [fd, users]

    def pread(self, car_id: int, path: str, offset: int, length: int) -> bytes:
        with self.lock:
            slot = self.open.get(car_id)
            if slot is None:
                try:
                    fd = open_regular(path)  # never blocks on a FIFO swapped in since the scan
                except OSError as exc:
                    raise PackerfsError(f"{path}: cannot open: {exc.strerror or exc}") from None
                slot = self.open[car_id] = [fd, 0]
                self._evict()
            else:
                self.open.move_to_end(car_id)
            slot[1] += 1
        try:
            chunks = []
            done = 0
            while done < length:
                data = os.pread(slot[0], length - done, offset + done)
                if not data:
                    break
                chunks.append(data)
                done += len(data)
            return b"".join(chunks)
        except OSError as exc:
            raise PackerfsError(f"{path}: read error at offset {offset}: {exc.strerror}") from None
        finally:
            with self.lock:
                slot[1] -= 1
                self._evict()

    def _evict(self) -> None:
        if len(self.open) <= self.limit:
            return
        for car_id in list(self.open):
            if len(self.open) <= self.limit:
                break
            fd, users = self.open[car_id]
            if users == 0:
                del self.open[car_id]
                os.close(fd)

    def close(self) -> None:
        with self.lock:
            for fd, _ in self.open.values():
                os.close(fd)
            self.open.clear()


class _LocalBlocks:
    """Blocks of one CAR being scanned, for finding its manifest (implements dag.BlockSource)."""

    def __init__(self, reader: CarReader, sections: dict[bytes, Section]):
        self.reader = reader
        self.sections = sections

    def where(self, cid: bytes) -> tuple[str, int | None]:
        section = self.sections.get(cid)
        return self.reader.path, section.offset if section else None

    def read_block(self, cid: bytes) -> bytes:
        section = self.sections.get(cid)
        if section is None:
            raise FormatError(f"block {cid_to_str(cid)} is not in this CAR", path=self.reader.path)
        return self.reader.read_block(section, verify=True)


def _car_files(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(sources, (str, bytes, os.PathLike)):
        sources = [sources]
    found: list[str] = []
    for source in sources:
        source = os.fsdecode(source)
        if os.path.isdir(source):
            names = sorted(n for n in os.listdir(source) if n.endswith(".car"))
            found += [os.path.join(source, n) for n in names]
        elif os.path.exists(source):
            found.append(source)
        else:
            raise UsageError(f"{source}: no such file or directory")
    seen = set()
    unique = []
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _parse_dataset(dataset: bytes | str | None) -> bytes | None:
    if dataset is None:
        return None
    if isinstance(dataset, bytes):
        if len(dataset) != manifest_format.DATASET_LENGTH:
            raise UsageError(f"a data set id is {manifest_format.DATASET_LENGTH} bytes, not {len(dataset)}")
        return dataset
    try:
        wanted = bytes.fromhex(dataset)
    except ValueError:
        wanted = None
    if wanted is None or len(wanted) != manifest_format.DATASET_LENGTH:
        raise UsageError(
            f"data set id {dataset[:80]!r} is not {2 * manifest_format.DATASET_LENGTH} hexadecimal digits"
        )
    return wanted


def _not_regular(path: str) -> str | None:
    """Why `path` cannot be read as a CAR without risk (a FIFO would block forever), or None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({file_kind(st.st_mode)})"
    return None


@dataclass
class CarSet:
    """The usable CARs of one data set, ordered by bin number, and where every block is.

    Open with CarSet.open(dir_or_files, dataset=None). Attributes:
      cars          usable CARs, by bin number
      by_bin        bin number -> Car
      problems      one line per CAR that could not be used (named, with an offset)
      ignored       one line per CAR of another data set (when `dataset` picked one)
      duplicates    paths of extra copies of a bin already in the set
      dataset       the data set's 16-byte id (None if no usable CAR)
      cipher        "plain" | "age" | "openpgp" (None if no usable CAR)
      recipients    fingerprints from the manifests
      missing_bins  bin numbers below the highest one seen that no usable CAR holds
    """

    cars: list[Car] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    dataset: bytes | None = None
    cipher: str | None = None
    recipients: list[str] = field(default_factory=list)
    missing_bins: list[int] = field(default_factory=list)
    index: BlockIndex = field(default_factory=MemoryBlockIndex)

    def __post_init__(self) -> None:
        self.by_bin: dict[int, Car] = {}
        self.car_by_id: dict[int, Car] = {}
        self._fds = _Descriptors()
        self._tree = None
        self._tree_lock = threading.Lock()

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        sources: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        dataset: bytes | str | None = None,
        index: BlockIndex | None = None,
    ) -> "CarSet":
        """Index a directory of CARs (every *.car in it), one CAR, or a list of either.

        With CARs of several data sets present, `dataset` (16 bytes, or hex)
        chooses one; without it that is a UsageError listing them.
        """
        wanted = _parse_dataset(dataset)
        self = cls(index=index if index is not None else MemoryBlockIndex())
        hinted: set[int] = set()
        candidates: list[Car] = []
        paths = _car_files(sources)
        if not paths:
            shown = ", ".join(os.fsdecode(s) for s in ([sources] if isinstance(sources, (str, bytes, os.PathLike)) else sources))
            raise UsageError(f"{shown or 'no CARs given'}: no *.car files")
        for path in paths:
            why = _not_regular(path)
            if why is not None:
                self.problems.append(f"{path}: {why} (skipped)")
                continue
            car_id, car = self.index.begin_car(path)
            sections = None
            try:
                if car is None:
                    car, sections = self._scan(car_id, path)
            except FormatError as exc:
                self.problems.append(f"{_first_line(exc)} (skipped)")
                m = CAR_NAME.match(os.path.basename(path))
                if m and len(m.group(1)) <= 12 and 1 <= int(m.group(1)) <= manifest_format.MAX_BIN:
                    hinted.add(int(m.group(1)))
                continue
            except PackerfsError as exc:
                self.problems.append(f"{_first_line(exc)} (skipped)")
                continue
            except OSError as exc:
                self.problems.append(f"{path}: cannot read: {exc.strerror or exc} (skipped)")
                continue
            if wanted is not None and car.dataset != wanted:
                self.ignored.append(f"{path}: belongs to data set {car.dataset.hex()}, not {wanted.hex()}")
                continue
            candidates.append(car)
            # Indexed now, while its sections are at hand. A CAR dropped below (cipher
            # mismatch, duplicate bin) keeps its blocks indexed: they are still verified
            # content, and a mixed set is refused as a whole.
            self.car_by_id[car.id] = car
            if sections is not None:
                for cid, s in sections.items():
                    self.index.add(cid, Location(car.id, s.offset, s.data_offset, s.length))
                del sections
            self.index.end_car(car)

        datasets: dict[bytes, list[Car]] = {}
        for car in candidates:
            datasets.setdefault(car.dataset, []).append(car)
        if len(datasets) > 1:
            listing = "; ".join(
                f"{ds.hex()}: {len(cars)} CAR{'s' if len(cars) != 1 else ''} (e.g. {cars[0].path})"
                for ds, cars in datasets.items()
            )
            self.close()
            raise UsageError(f"the CARs belong to {len(datasets)} different data sets ({listing}); choose one with --dataset")

        candidates.sort(key=lambda c: (c.bin, c.path))
        for car in candidates:
            if self.cipher is not None and car.cipher != self.cipher:
                self.problems.append(
                    f"{car.path}: manifest says cipher {car.cipher!r}, but bin {self.cars[0].bin} says "
                    f"{self.cipher!r} (skipped)"
                )
                continue
            other = self.by_bin.get(car.bin)
            if other is not None:
                if other.root == car.root:
                    self.duplicates.append(car.path)
                else:
                    self.problems.append(
                        f"{car.path}: a different CAR for bin {car.bin} than {other.path} (root "
                        f"{cid_to_str(car.root)} vs {cid_to_str(other.root)}) (skipped)"
                    )
                continue
            if self.cipher is None:
                self.dataset, self.cipher, self.recipients = car.dataset, car.cipher, list(car.recipients)
            self.cars.append(car)
            self.by_bin[car.bin] = car
        self._bound_gaps(hinted)
        return self

    def _bound_gaps(self, hinted: set[int]) -> None:
        """missing_bins, refusing bin numbers so far above the others that the list would be absurd."""
        last = 0
        missing = 0
        for number in sorted(set(self.by_bin) | hinted):
            gap = number - last - 1
            if missing + gap > MAX_MISSING_BINS:
                car = self.by_bin.pop(number, None)
                if car is not None:
                    self.cars.remove(car)
                    self.problems.append(
                        f"{car.path}: manifest says bin {number}, {gap} bins above bin {last}: implausibly "
                        f"many missing bins (skipped)"
                    )
                continue
            missing += gap
            last = number
        self.missing_bins = [n for n in range(1, last + 1) if n not in self.by_bin]
        if not self.cars:  # refused from the lowest bin up: nothing is left
            self.dataset, self.cipher, self.recipients = None, None, []

    def _scan(self, car_id: int, path: str) -> tuple[Car, dict[bytes, Section]]:
        with CarReader(path) as reader:
            if len(reader.roots) != 1:
                raise FormatError(f"CAR header has {len(reader.roots)} roots; a packerfs CAR has one", path=path, offset=0)
            sections: dict[bytes, Section] = {}
            count = 0
            for section in reader.sections():
                sections.setdefault(section.cid, section)
                count += 1
            root = reader.roots[0]
            if root not in sections:
                raise FormatError(
                    f"the root block {cid_to_str(root)} is not in the CAR (truncated?)", path=path, offset=reader.size
                )
            local = _LocalBlocks(reader, sections)
            meta_dir = dag.dir_lookup(local, root, manifest_format.DIRNAME)
            manifest_cid = dag.dir_lookup(local, meta_dir, manifest_format.NAME) if meta_dir else None
            if manifest_cid is None:
                raise FormatError(
                    "not a packerfs CAR: its root directory has no .packerfs/manifest.cbor",
                    path=path,
                    offset=sections[root].offset,
                )
            if manifest_cid not in sections:
                raise FormatError(
                    f"the manifest's block {cid_to_str(manifest_cid)} is not in the CAR", path=path,
                    offset=sections[root].offset,
                )
            manifest_offset = sections[manifest_cid].offset
            files = dag.FileDag(local)
            size = files.root_size(manifest_cid)
            if size > MAX_MANIFEST or size > reader.size:
                # more than the CAR holds: a DAG linking the same leaf over and over
                raise FormatError(f"manifest is implausibly large ({size} bytes)", path=path, offset=manifest_offset)
            data = files.read(manifest_cid, size, 0, size)
            try:
                decoded = manifest_format.decode_manifest(data)
            except (ValueError, RecursionError) as exc:  # ManifestError, or a malformed CID inside an entry
                raise FormatError(f"bad manifest: {_first_line(exc)}", path=path, offset=manifest_offset) from None
            if decoded["bin"] < 1:
                raise FormatError(f"manifest has bin number {decoded['bin']}", path=path, offset=manifest_offset)
            # Every stored byte of a part in this bin is in this CAR's leaves, so the parts cannot add
            # up to more than the file: a DAG that links one leaf many times would otherwise let a
            # small CAR restore terabytes.
            stored = sum(e["length"] for e in decoded["entries"] if e["kind"] == "file")
            if stored > reader.size:
                raise FormatError(
                    f"manifest puts {stored} bytes of file parts in a CAR of {reader.size} bytes",
                    path=path, offset=manifest_offset,
                )
            car = Car(
                id=car_id,
                path=path,
                size=reader.size,
                root=root,
                bin=decoded["bin"],
                dataset=decoded["dataset"],
                cipher=decoded["cipher"],
                recipients=list(decoded["recipients"]),
                entries=decoded["entries"],
                blocks=count,
                manifest_offset=manifest_offset,
                snapshot=None,
            )
            if decoded.get("snapshot") is not None:
                from packerfs.snapshot import SnapshotError, check_descriptor

                try:
                    car.snapshot = check_descriptor(decoded["snapshot"])
                except SnapshotError as exc:
                    raise FormatError(f"bad manifest: {exc}", path=path, offset=manifest_offset) from None
            return car, sections

    # ------------------------------------------------------------ blocks

    def locate(self, cid: bytes) -> Location | None:
        return self.index.get(cid)

    def has(self, cid: bytes) -> bool:
        return self.index.get(cid) is not None or cid_multihash(cid)[0] == IDENTITY

    def where(self, cid: bytes) -> tuple[str | None, int | None]:
        loc = self.index.get(cid)
        if loc is None:
            return None, None
        return self.car_by_id[loc.car].path, loc.section_offset

    def read_block(self, cid: bytes) -> bytes:
        """A block's bytes, checked against its CID (CorruptBlock names the CAR and section offset)."""
        loc = self.index.get(cid)
        if loc is None:
            code, digest = cid_multihash(cid)
            if code == IDENTITY:
                return digest
            raise FormatError(f"block {cid_to_str(cid)} is in none of the CARs")
        car = self.car_by_id[loc.car]
        data = self._fds.pread(loc.car, car.path, loc.data_offset, loc.length)
        if len(data) != loc.length:
            raise TruncatedInput(
                f"file ends inside block {cid_to_str(cid)} (did the CAR change after it was indexed?)",
                path=car.path,
                offset=loc.section_offset,
            )
        check_block(cid, data, path=car.path, offset=loc.section_offset)
        return data

    # ------------------------------------------------------------ the tree

    def tree(self):
        """The restored tree's entries from every manifest (built once; see packerfs.unpack.tree).

        A set with no usable CAR has no tree: PackerfsError listing why each CAR was skipped."""
        if not self.cars:
            why = "; ".join(self.problems + self.ignored) or "no *.car files"
            raise PackerfsError(f"no usable packerfs CAR files: {why}")
        with self._tree_lock:
            if self._tree is None:
                from packerfs.unpack.tree import Tree

                self._tree = Tree.build(self)
            return self._tree

    def close(self) -> None:
        self._fds.close()
        self.index.close()

    def __enter__(self) -> "CarSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
