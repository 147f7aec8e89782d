"""A set of retrieved CAR files: which blocks are where, and what each bin holds.

The CARs can be anywhere packerfs.unpack.locations can read: local files, an object-store prefix,
or an HTTP piece gateway. Every byte is read through the location's CarObject.

Opening a set indexes each CAR:
  * a local CAR: every section header is walked (no block data is read), a seek per block,
    recording cid -> (CAR, section offset, data offset, length) in a BlockIndex;
  * a remote packerfs CAR: its tail locator (packerfs/locator.py) and metadata are fetched with
    a few ranged requests, and the blocks of each part are located from the manifest's `at`
    offsets, arithmetically, when a read first needs them;
  * a remote CAR without a locator (another tool's, or an older packerfs): walked like a local
    one, through ranged reads.
Each CAR's manifest is then found the way any UnixFS tool would find it, root directory ->
`.packerfs` -> `manifest.cbor`, reading and verifying just those blocks, and decoded. A CAR with
no manifest is foreign (ipfs-car, kubo, data-prep tools): a set of only foreign CARs is read as
plain UnixFS from its root (packerfs.unpack.foreign).

CARs that cannot be used (not a CAR, truncated, no manifest, another data set's cipher) are
reported one line each, naming the file and offset, and the others are used. Bins are ordered by
number; gaps in the numbers are missing bins.

Every block is checked against its CID before use, however it was located, so an arithmetic
location that is wrong gives a FormatError, never wrong bytes. One CarSet serves any number of
threads.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Sequence

from packerfs import locator
from packerfs import manifest as manifest_format
from packerfs.errors import FormatError, KeyProblem, PackerfsError, TruncatedInput, UsageError
from packerfs.ipld import cbor
from packerfs.ipld.car import CarReader, Section, section_length
from packerfs.ipld.cid import (
    DAG_PB, IDENTITY, RAW, check_block, cid_codec, cid_multihash, cid_to_str, decode_uvarint, encode_uvarint, parse_cid,
    read_cid,
)
from packerfs.ipld.dagpb import FILE, RAW_TYPE, UnixFSData, decode_node
from packerfs.unpack import dag

CAR_NAME = re.compile(r"^bin-(\d+)\.car$")
# A manifest larger than this is not something the planner can produce for any bin size we accept.
MAX_MANIFEST = 1 << 31
# More missing bins than this below the highest bin number is not a real set (about 32 PiB of
# bins at 32 GiB each are gone) but a corrupt or crafted bin number: the CARs and file names
# claiming such bins are refused, so that no list of missing bins can grow without bound.
MAX_MISSING_BINS = 1 << 20
# A remote CAR's tail is fetched in one request of this much: usually the manifest, the
# `.packerfs` directory and the root directory all lie in it, and one more request gets the rest.
TAIL_READ = 64 << 10
HEAD_READ = 512  # a CARv1 header naming one root is 59 bytes
PREFETCH = 16  # remote CARs whose head and tail are fetched at once when a set is opened
# Metadata (manifest, directories) beyond this in one CAR is refused rather than fetched.
MAX_META = 512 << 20  # far above any bin's manifest and directories; bounds what a crafted locator costs
# A block located from the manifest alone (its length unknown until its section header is read):
# this much is read at once, enough for a file node of 1024 links.
NODE_READ = 64 << 10
LEAF = 1 << 20  # the packer's chunk size: every leaf of a part but the stream's last is this long
RAW_CID_LEN = 36
KEPT_NODES = 64 << 20  # DAG nodes of remote CARs kept while verify streams them (see CarSet.learn)

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

    def begin_car(self, path: str, stamp: list | None) -> tuple[int, "Car | None"]:
        """Before scanning `path`: its car id, and its Car if the index already holds that CAR with
        this `stamp` (what identifies its current content; None: unknown, always scan). Then its
        blocks are indexed and the scan is skipped."""
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

    def begin_car(self, path: str, stamp: list | None) -> tuple[int, "Car | None"]:
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
    # Located: every block is in the BlockIndex (a walked CAR). False for a remote CAR indexed from
    # its tail locator: a part's blocks are found from its manifest entry's `at` when first read.
    located: bool = True
    roots: list[bytes] = field(default_factory=list)  # the header's roots (a foreign CAR may have several)
    foreign: bool = False  # no packerfs manifest: read as plain UnixFS (bin 0, no entries)
    not_packerfs: str = ""  # a foreign CAR: why it is none of packerfs's (a problem line, with an offset)
    snapshot_at: int = 0  # not located: section offset of its snapshot part's root block (0: none)
    # packed with hidden names: the cipher its manifest (and snapshot) is sealed with ("": in clear)
    sealed: str = ""
    obj: object = field(default=None, repr=False, compare=False)  # its locations.CarObject

    @property
    def name(self) -> str:
        return self.obj.name if self.obj is not None else os.path.basename(self.path)


SEALED_MANIFESTS = ((b".age", "age"), (b".gpg", "openpgp"))
SEALED_SUFFIX = {"age": ".age", "openpgp": ".gpg"}


class SealedWithoutKey(UsageError):
    """A CAR's manifest is sealed (hidden names) and no key was given to open it."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _BufferBlocks:
    """Blocks parsed from one fetched range of a CAR, for finding its manifest (a dag.BlockSource)."""

    def __init__(self, display: str, blocks: dict[bytes, tuple[Location, bytes]]):
        self.display = display
        self.blocks = blocks

    def where(self, cid: bytes) -> tuple[str, int | None]:
        found = self.blocks.get(cid)
        return self.display, found[0].section_offset if found else None

    def read_block(self, cid: bytes) -> bytes:
        found = self.blocks.get(cid)
        if found is None:
            raise FormatError(f"block {cid_to_str(cid)} is not in this CAR's metadata", path=self.display)
        return found[1]


class _LocalBlocks(_BufferBlocks):
    """Blocks of one CAR being walked, for finding its manifest (a dag.BlockSource)."""

    def __init__(self, reader: CarReader, sections: dict[bytes, Section]):
        self.reader = reader
        self.sections = sections
        self.display = reader.path

    def where(self, cid: bytes) -> tuple[str, int | None]:
        section = self.sections.get(cid)
        return self.reader.path, section.offset if section else None

    def read_block(self, cid: bytes) -> bytes:
        section = self.sections.get(cid)
        if section is None:
            raise FormatError(f"block {cid_to_str(cid)} is not in this CAR", path=self.reader.path)
        return self.reader.read_block(section, verify=True)


def parse_sections(display: str, car_id: int, data: bytes, start: int) -> dict[bytes, tuple[Location, bytes]]:
    """Every section of `data` (the CAR's bytes from offset `start`, ending on a section boundary),
    each block checked against its CID."""
    out: dict[bytes, tuple[Location, bytes]] = {}
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        where = start + pos
        try:
            length, body = decode_uvarint(view, pos)
            cid, block_start = read_cid(view, body)
        except ValueError as exc:
            raise FormatError(f"bad section in the CAR's metadata ({exc})", path=display, offset=where) from None
        end = body + length
        if length <= block_start - body or end > len(data):
            raise FormatError("a section of the CAR's metadata overruns it", path=display, offset=where)
        block = bytes(view[block_start:end])
        check_block(cid, block, path=display, offset=where)
        out.setdefault(cid, (Location(car_id, where, start + block_start, end - block_start), block))
        pos = end
    return out


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


def _stamp(obj) -> list | None:
    """What identifies a CAR's current content, for an index kept between runs."""
    if obj.remote:
        return [obj.size, obj.identity]
    try:
        st = os.stat(obj.display)
    except OSError:
        return None  # the scan reports why it cannot be read
    # only a regular file is ever taken from the index: a FIFO or device put in a CAR's place
    # is scanned, so CarSet reports it (it is never opened blocking). Not the device number: a
    # drive may come back under another one after a reboot.
    return [st.st_size, st.st_mtime_ns, st.st_ino] if stat.S_ISREG(st.st_mode) else None


@dataclass(frozen=True)
class CarSources:
    """Where a CAR set is: what CarSet.open reads, as one value a mount can hand to its workers.

    specs     directories, CAR files, s3:// gs:// az:// prefixes, http(s):// piece gateways
    options   -o KEY=VALUE for the object stores' file systems
    pieces    piece CIDs to fetch from an HTTP gateway
    manifest  a manifest.csv (path or URL) naming a gateway's pieces
    root      the root CID of a foreign set (--root)
    """

    specs: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    pieces: tuple[str, ...] = ()
    manifest: str | None = None
    root: str | None = None

    @classmethod
    def of(cls, sources) -> "CarSources":
        if isinstance(sources, CarSources):
            return sources
        if isinstance(sources, (str, bytes, os.PathLike)):
            sources = [sources]
        return cls(tuple(os.fsdecode(s) for s in sources))

    def to_json(self) -> dict:
        return {"specs": list(self.specs), "options": [list(o) for o in self.options], "pieces": list(self.pieces),
                "manifest": self.manifest, "root": self.root}

    @classmethod
    def from_json(cls, value: dict) -> "CarSources":
        return cls(tuple(value["specs"]), tuple(tuple(o) for o in value["options"]), tuple(value["pieces"]),
                   value["manifest"], value["root"])

    @property
    def remote(self) -> bool:
        return any("://" in s for s in self.specs)

    def __str__(self) -> str:
        return " ".join(self.specs)


@dataclass
class CarSet:
    """The usable CARs of one data set, ordered by bin number, and where every block is.

    Open with CarSet.open(dirs_files_or_urls, dataset=None). Attributes:
      cars          usable CARs, by bin number (a foreign set: its CARs, bin 0)
      by_bin        bin number -> Car
      problems      one line per CAR that could not be used (named, with an offset)
      ignored       one line per CAR of another data set (when `dataset` picked one)
      duplicates    paths of extra copies of a bin already in the set
      dataset       the data set's 16-byte id (None if no usable CAR, or a foreign set)
      cipher        "plain" | "age" | "openpgp" (None if no usable CAR; "plain" for a foreign set)
      recipients    fingerprints from the manifests
      missing_bins  bin numbers below the highest one seen that no usable CAR holds
      foreign       True: no CAR has a packerfs manifest; the tree is the UnixFS DAG under `root`
      locations     the packerfs.unpack.locations.CarLocations the CARs are read through
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
    foreign: bool = False
    root: bytes | None = None  # --root: the root of a foreign set's tree
    locations: object = None
    keyring: object = None  # a crypt.KeyRing: opens sealed manifests and snapshots (hidden names)

    def __post_init__(self) -> None:
        self.by_bin: dict[int, Car] = {}
        self.car_by_id: dict[int, Car] = {}
        # blocks of remote CARs located from manifests (see _locate_children), not in the index
        self._found: dict[bytes, Location] = {}
        self._found_lock = threading.Lock()
        self._ends: dict = {}  # prefetched heads and tails of remote CARs (see _prefetch_ends)
        self._kept: dict[bytes, bytes] = {}  # verified DAG nodes of streamed remote CARs (see learn)
        self._kept_bytes = 0
        self._tree = None
        self._tree_lock = threading.Lock()

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        sources: "CarSources | str | os.PathLike | Sequence[str | os.PathLike]",
        *,
        dataset: bytes | str | None = None,
        index: BlockIndex | None = None,
        keyring=None,
    ) -> "CarSet":
        """Index CARs (a CarSources, or directories and files): directories (every *.car in each),
        files, object-store prefixes (s3://, gs://, az://) and HTTP piece gateways (with pieces or a
        manifest csv naming the piece CIDs).

        With CARs of several data sets present, `dataset` (16 bytes, or hex) chooses one; without it
        that is a UsageError listing them.

        `keyring` (a crypt.KeyRing) opens sealed manifests (CARs packed with hidden names); without
        one, the default gpg home is tried, and an age set needs one (KeyProblem naming -i).
        """
        from packerfs.unpack.locations import open_locations

        wanted = _parse_dataset(dataset)
        where = CarSources.of(sources)
        locations = open_locations(
            list(where.specs), options=dict(where.options), pieces=list(where.pieces), manifest=where.manifest
        )
        self = cls(index=index if index is not None else MemoryBlockIndex(), locations=locations)
        self.sources = where
        self.keyring = keyring
        try:
            self._open(locations, wanted, where.root)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, locations, wanted: bytes | None, root: str | bytes | None) -> None:
        self.problems += locations.problems
        if not locations.objects:
            shown = ", ".join(self.sources.specs) or "no CARs given"
            if self.problems:
                return  # each one said why; tree() lists them
            raise UsageError(f"{shown}: no *.car files")
        hinted: set[int] = set()
        candidates: list[Car] = []
        foreign: list[Car] = []
        self._ends = _prefetch_ends([o for o in locations.objects if o.remote])
        for obj in locations.objects:
            path = obj.display
            car_id, car = self.index.begin_car(path, _stamp(obj))
            blocks = None
            try:
                if car is None:
                    car, blocks = self._scan(car_id, obj)
            except (KeyProblem, SealedWithoutKey):
                raise  # every CAR of the set is sealed to the same recipients: one line says it for all
            except FormatError as exc:
                self.problems.append(f"{_first_line(exc)} (skipped)")
                m = CAR_NAME.match(obj.name)
                if m and len(m.group(1)) <= 12 and 1 <= int(m.group(1)) <= manifest_format.MAX_BIN:
                    hinted.add(int(m.group(1)))
                continue
            except PackerfsError as exc:
                self.problems.append(f"{_first_line(exc)} (skipped)")
                continue
            except OSError as exc:
                self.problems.append(f"{path}: cannot read: {exc.strerror or exc} (skipped)")
                continue
            car.obj = obj
            if wanted is not None and not car.foreign and car.dataset != wanted:
                self.ignored.append(f"{path}: belongs to data set {car.dataset.hex()}, not {wanted.hex()}")
                continue
            (foreign if car.foreign else candidates).append(car)
            # Indexed now, while its sections are at hand. A CAR dropped below (cipher
            # mismatch, duplicate bin) keeps its blocks indexed: they are still verified
            # content, and a mixed set is refused as a whole.
            self.car_by_id[car.id] = car
            if blocks is not None:
                for cid, location in blocks:
                    self.index.add(cid, location)
                del blocks
            self.index.end_car(car)
        if not candidates and foreign:
            self._open_foreign(foreign, root)
            return
        for car in foreign:
            why = car.not_packerfs or FormatError(
                "not a packerfs CAR: its root directory has no .packerfs/manifest.cbor", path=car.path, offset=0
            )
            self.problems.append(f"{why} (skipped)")
        if root is not None:
            raise UsageError("--root picks the root of a CAR set that packerfs did not write; these are packerfs CARs")

        datasets: dict[bytes, list[Car]] = {}
        for car in candidates:
            datasets.setdefault(car.dataset, []).append(car)
        if len(datasets) > 1:
            listing = "; ".join(
                f"{ds.hex()}: {len(cars)} CAR{'s' if len(cars) != 1 else ''} (e.g. {cars[0].path})"
                for ds, cars in datasets.items()
            )
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
            if not car.located:
                self._expect_entries(car)
        self._bound_gaps(hinted)

    def _open_foreign(self, cars: list[Car], root: str | bytes | None) -> None:
        self.foreign = True
        self.cipher = "plain"
        self.cars = sorted(cars, key=lambda c: c.path)
        if root is not None:
            try:
                self.root = parse_cid(root) if isinstance(root, str) else bytes(root)
            except ValueError as exc:
                raise UsageError(f"--root {root!r} is not a CID ({exc})") from None

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

    def _scan(self, car_id: int, obj) -> tuple[Car, list[tuple[bytes, Location]]]:
        """The CAR, and the locations of its blocks to index (of a remote packerfs CAR: only its
        metadata's; the others are found when read)."""
        if obj.remote:
            found = self._scan_tail(car_id, obj)
            if found is not None:
                return found
        with CarReader(obj.display if not obj.remote else obj) as reader:
            sections: dict[bytes, Section] = {}
            count = 0
            for section in reader.sections():
                sections.setdefault(section.cid, section)
                count += 1
            path = obj.display
            local = _LocalBlocks(reader, sections)
            manifest_cid, sealed = self._manifest_cid(local, reader.roots, path, sections)
            blocks = [(cid, Location(car_id, s.offset, s.data_offset, s.length)) for cid, s in sections.items()]
            if manifest_cid is None:
                # Why it is no packerfs CAR, for a set of packerfs CARs to report. A foreign CAR's
                # root may be in another CAR of its set (data-prep tools write such sets).
                absent = [r for r in reader.roots if r not in sections and not _is_identity(r)]
                if len(reader.roots) == 1 and absent:
                    why = FormatError(
                        f"the root block {cid_to_str(absent[0])} is not in the CAR (truncated?)", path=path, offset=reader.size
                    )
                else:
                    first = sections[reader.roots[0]].offset if reader.roots and not absent else reader.size
                    why = FormatError(
                        "not a packerfs CAR: its root directory has no .packerfs/manifest.cbor", path=path, offset=first
                    )
                car = Car(
                    id=car_id, path=path, size=reader.size, root=reader.roots[0] if reader.roots else b"", bin=0,
                    dataset=b"", cipher="plain", recipients=[], entries=[], blocks=count, manifest_offset=0,
                    snapshot=None, roots=list(reader.roots), foreign=True,
                )
                car.not_packerfs = str(why)
                return car, blocks
            car = self._decode_manifest(car_id, path, reader.size, reader.roots[0], local, manifest_cid, sealed)
            car.blocks = count
            return car, blocks

    def _manifest_cid(self, local: _BufferBlocks, roots: list[bytes], path: str, sections) -> tuple[bytes | None, str]:
        """The CID of `.packerfs/manifest.cbor` under the single root (None for a foreign CAR), and
        the cipher it is sealed with when it is `manifest.cbor.age` / `.gpg` (hidden names), else ""."""
        try:
            if len(roots) != 1 or cid_codec(roots[0]) != DAG_PB or roots[0] not in sections:
                return None, ""
        except ValueError:  # a malformed root CID
            return None, ""
        sealed = ""
        try:
            meta_dir = dag.dir_lookup(local, roots[0], manifest_format.DIRNAME)
            manifest_cid = dag.dir_lookup(local, meta_dir, manifest_format.NAME) if meta_dir else None
            for suffix, cipher_name in SEALED_MANIFESTS:
                if manifest_cid is not None or not meta_dir:
                    break
                manifest_cid = dag.dir_lookup(local, meta_dir, manifest_format.NAME + suffix)
                sealed = cipher_name if manifest_cid is not None else ""
        except FormatError:
            return None, ""  # the root is not a directory, or not one packerfs wrote: a foreign CAR
        if manifest_cid is not None and manifest_cid not in sections:
            raise FormatError(
                f"the manifest's block {cid_to_str(manifest_cid)} is not in the CAR", path=path,
                offset=local.where(roots[0])[1],
            )
        return manifest_cid, sealed

    def _decode_manifest(
        self, car_id: int, path: str, size: int, root: bytes, local, manifest_cid: bytes, sealed: str = ""
    ) -> Car:
        manifest_offset = local.where(manifest_cid)[1]
        files = dag.FileDag(local)
        manifest_size = files.root_size(manifest_cid)
        if manifest_size > MAX_MANIFEST or manifest_size > size:
            # more than the CAR holds: a DAG linking the same leaf over and over
            raise FormatError(f"manifest is implausibly large ({manifest_size} bytes)", path=path, offset=manifest_offset)
        data = files.read(manifest_cid, manifest_size, 0, manifest_size)
        if sealed:
            data = self._open_sealed(data, sealed, path, manifest_offset)
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
        if stored > size:
            raise FormatError(
                f"manifest puts {stored} bytes of file parts in a CAR of {size} bytes",
                path=path, offset=manifest_offset,
            )
        car = Car(
            id=car_id, path=path, size=size, root=root, bin=decoded["bin"], dataset=decoded["dataset"],
            cipher=decoded["cipher"], recipients=list(decoded["recipients"]), entries=decoded["entries"],
            blocks=0, manifest_offset=manifest_offset, snapshot=None, roots=[root], sealed=sealed,
        )
        if sealed and decoded["cipher"] != sealed:
            raise FormatError(
                f"its manifest is sealed with {sealed}, but says cipher {decoded['cipher']!r}", path=path,
                offset=manifest_offset,
            )
        if decoded.get("snapshot") is not None:
            from packerfs.snapshot import SnapshotError, check_descriptor

            try:
                car.snapshot = check_descriptor(decoded["snapshot"])
            except SnapshotError as exc:
                raise FormatError(f"bad manifest: {exc}", path=path, offset=manifest_offset) from None
        return car

    def _open_sealed(self, data: bytes, cipher_name: str, path: str, offset: int) -> bytes:
        """A sealed manifest's plaintext; SealedWithoutKey or KeyProblem (one line) if it cannot be opened."""
        from packerfs.crypt import KeyRing
        from packerfs.privacy.sealed_manifest import open_manifest

        if self.keyring is None:
            if cipher_name == "age":
                raise SealedWithoutKey(
                    f"{path}: its names are hidden (packed with --hide-names): give the age identity that "
                    f"opens it with -i/--identity"
                )
            self.keyring = KeyRing()  # OpenPGP: the default gpg home may hold the key
        name = f"{path}: .packerfs/{os.fsdecode(manifest_format.NAME)}{SEALED_SUFFIX[cipher_name]}"
        try:
            return open_manifest(self.keyring, cipher_name, data, name=name)
        except KeyProblem:
            raise
        except FormatError as exc:
            raise FormatError(f"sealed manifest: {_first_line(exc)}", path=path, offset=offset) from None

    def _scan_tail(self, car_id: int, obj) -> tuple[Car, list[tuple[bytes, Location]]] | None:
        """A remote packerfs CAR from its header and tail (packerfs/locator.py); None without a locator."""
        path, size = obj.display, obj.size
        if size < locator.SECTION_LENGTH + 64:
            return None
        tail_start = max(0, size - TAIL_READ)
        future = self._ends.pop(id(obj), None)
        head, tail = future.result() if future is not None else _ends(obj)
        if len(tail) != size - tail_start:
            raise TruncatedInput(f"ends before its listed size {size}", path=path, offset=tail_start + len(tail))
        found = locator.decode(tail[-locator.SECTION_LENGTH:], size)
        if found is None:
            return None
        meta_start, snapshot_at = found
        meta_end = size - locator.SECTION_LENGTH
        if meta_end - meta_start > MAX_META:
            raise FormatError(f"its metadata is implausibly large ({meta_end - meta_start} bytes)", path=path, offset=meta_start)
        if meta_start >= tail_start:
            meta = tail[meta_start - tail_start : meta_end - tail_start]
        else:
            meta = obj.read_uncached(meta_start, tail_start - meta_start) + tail[: meta_end - tail_start]
        roots = _header_roots(head, path)
        blocks = parse_sections(path, car_id, meta, meta_start)
        local = _BufferBlocks(path, blocks)
        manifest_cid, sealed = self._manifest_cid(local, roots, path, blocks)
        if manifest_cid is None:
            return None
        car = self._decode_manifest(car_id, path, size, roots[0], local, manifest_cid, sealed)
        car.located = False
        car.blocks = len(blocks)
        car.snapshot_at = snapshot_at
        return car, [(cid, loc) for cid, (loc, _) in blocks.items()]

    def _expect_entries(self, car: Car) -> None:
        """Where a remote CAR's parts, symlinks and snapshot part begin: their root blocks' offsets."""
        with self._found_lock:
            for e in car.entries:
                at = e.get("at")
                if at is None or "cid" not in e:
                    continue
                length = e["length"] if e["kind"] == "file" and cid_codec(e["cid"]) == RAW else -1
                self._found.setdefault(e["cid"], _at(car.id, at, e["cid"], length))
            snapshot = car.snapshot if isinstance(car.snapshot, dict) else None
            if snapshot and car.snapshot_at:
                self._found.setdefault(snapshot["cid"], _at(car.id, car.snapshot_at, snapshot["cid"], -1))

    # ------------------------------------------------------------ blocks

    def locate(self, cid: bytes) -> Location | None:
        loc = self.index.get(cid)
        if loc is None and self._found:
            loc = self._found.get(cid)
        return loc

    def has(self, cid: bytes) -> bool:
        return self.locate(cid) is not None or cid_multihash(cid)[0] == IDENTITY

    def where(self, cid: bytes) -> tuple[str | None, int | None]:
        loc = self.locate(cid)
        if loc is None:
            return None, None
        return self.car_by_id[loc.car].path, loc.section_offset

    def read_block(self, cid: bytes) -> bytes:
        """A block's bytes, checked against its CID (CorruptBlock names the CAR and section offset)."""
        loc = self.locate(cid)
        if loc is None:
            code, digest = cid_multihash(cid)
            if code == IDENTITY:
                return digest
            raise FormatError(f"block {cid_to_str(cid)} is in none of the CARs")
        kept = self._kept.get(cid) if self._kept else None
        if kept is not None:
            return kept
        car = self.car_by_id[loc.car]
        if loc.length < 0:
            loc = self._read_section_head(car, cid, loc)
        data = car.obj.read(loc.data_offset, loc.length)
        if len(data) != loc.length:
            raise TruncatedInput(
                f"file ends inside block {cid_to_str(cid)} (did the CAR change after it was indexed?)",
                path=car.path,
                offset=loc.section_offset,
            )
        check_block(cid, data, path=car.path, offset=loc.section_offset)
        if not car.located and cid_codec(cid) == DAG_PB:
            self._locate_children(car, loc, data)
        return data

    def learn(self, car: Car, section: Section, block: bytes) -> None:
        """A verified section of a CAR whose blocks are found as needed (verify streams it all): where
        it is, and, up to KEPT_NODES bytes in all, a DAG node's bytes, which verify's later checks of
        the manifests and directories would otherwise fetch again."""
        with self._found_lock:
            self._found.setdefault(section.cid, Location(car.id, section.offset, section.data_offset, section.length))
            if self._kept_bytes + len(block) <= KEPT_NODES and cid_codec(section.cid) == DAG_PB:
                if self._kept.setdefault(section.cid, block) is block:
                    self._kept_bytes += len(block)

    def _read_section_head(self, car: Car, cid: bytes, loc: Location) -> Location:
        """The data offset and length of a block known only by its section offset."""
        head = car.obj.read(loc.section_offset, min(NODE_READ, max(car.size - loc.section_offset, 0)))
        try:
            length, body = decode_uvarint(head, 0)
            found, data_start = read_cid(head, body)
        except ValueError:
            found = None
        if found != cid or length <= data_start - body:
            raise FormatError(
                f"block {cid_to_str(cid)} is not where its manifest entry says (section offset {loc.section_offset})",
                path=car.path, offset=loc.section_offset,
            )
        exact = Location(loc.car, loc.section_offset, loc.section_offset + data_start, length - (data_start - body))
        with self._found_lock:
            self._found[cid] = exact
        return exact

    def _locate_children(self, car: Car, loc: Location, block: bytes) -> None:
        """Where a part's file node's children are: laid out just before it, each child's subtree
        contiguous and in order, leaves whole chunks but the last (see packerfs/locator.py). Wrong
        arithmetic only ever costs a CorruptBlock: the child's bytes are checked against its CID."""
        try:
            node = decode_node(block)
            fs = UnixFSData.decode(node.data) if node.data is not None else None
        except ValueError:
            return
        if fs is None or fs.type not in (FILE, RAW_TYPE) or len(node.links) != len(fs.blocksizes):
            return
        end = loc.section_offset
        found: list[tuple[bytes, Location]] = []
        for link, content in zip(reversed(node.links), reversed(fs.blocksizes)):
            if cid_codec(link.cid) == RAW:
                span = section_length(link.cid, content)
                start = end - span
                found.append((link.cid, Location(car.id, start, start + span - content, content)))
            else:
                length = link.tsize - content  # a level-1 node over raw leaves: its Tsize is itself plus them
                if length <= 0:
                    break
                span = section_length(link.cid, length)
                start = end - span
                found.append((link.cid, Location(car.id, start, start + span - length, length)))
                leaves = -(-content // LEAF)
                last = content - (leaves - 1) * LEAF
                start -= (leaves - 1) * (len(encode_uvarint(RAW_CID_LEN + LEAF)) + RAW_CID_LEN + LEAF)
                start -= len(encode_uvarint(RAW_CID_LEN + last)) + RAW_CID_LEN + last
            if start < 0:
                break
            end = start
        with self._found_lock:
            for cid, where in found:
                self._found.setdefault(cid, where)

    # ------------------------------------------------------------ the tree

    def tree(self):
        """The restored tree: from every manifest (packerfs.unpack.tree), or for a foreign set the
        UnixFS DAG under its root (packerfs.unpack.foreign). Built once.

        A set with no usable CAR has no tree: PackerfsError listing why each CAR was skipped."""
        if not self.cars:
            why = "; ".join(self.problems + self.ignored) or "no *.car files"
            raise PackerfsError(f"no usable packerfs CAR files: {why}")
        with self._tree_lock:
            if self._tree is None:
                if self.foreign:
                    from packerfs.unpack.foreign import build_foreign_tree

                    roots = [r for car in self.cars for r in car.roots]
                    # its problems and missing blocks are the tree's (tree.problems, tree.lost)
                    self._tree, _ = build_foreign_tree(self, roots, root=self.root, car_of=lambda c: self.where(c)[0])
                else:
                    from packerfs.unpack.tree import Tree

                    self._tree = Tree.build(self)
            return self._tree

    def stats(self) -> dict:
        """Requests made and bytes fetched from remote CARs so far."""
        return self.locations.stats() if self.locations is not None else {"requests": 0, "bytes": 0}

    def close(self) -> None:
        if self.locations is not None:
            self.locations.close()
        self.index.close()

    def __enter__(self) -> "CarSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends(obj) -> tuple[bytes, bytes]:
    """A remote CAR's head (its header) and tail (the locator and, usually, all its metadata)."""
    tail_start = max(0, obj.size - TAIL_READ)
    return obj.read_uncached(0, min(HEAD_READ, obj.size)), obj.read_uncached(tail_start, obj.size - tail_start)


def _prefetch_ends(objects: list) -> dict:
    """id(obj) -> a future of _ends(obj), PREFETCH at a time, so opening a set of many remote CARs
    waits for about one round trip per PREFETCH CARs, not two per CAR."""
    if not objects:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(PREFETCH, thread_name_prefix="car-ends")
    futures = {id(obj): pool.submit(_ends, obj) for obj in objects}
    pool.shutdown(wait=False)  # the workers finish the queue, then exit
    return futures


def _is_identity(cid: bytes) -> bool:
    """An identity CID (its block is its digest); False for a malformed one, which no CAR holds."""
    try:
        return cid_multihash(cid)[0] == IDENTITY
    except ValueError:
        return False


def _at(car_id: int, at: int, cid: bytes, length: int) -> Location:
    """A block at section offset `at`: exact when its length is known, else read from its header."""
    if length < 0:
        return Location(car_id, at, -1, -1)
    span = section_length(cid, length)
    return Location(car_id, at, at + span - length, length)


def _header_roots(head: bytes, path: str) -> list[bytes]:
    """The roots named by a CARv1 header at the start of `head`."""
    try:
        length, pos = decode_uvarint(head, 0)
        if pos + length > len(head):
            raise ValueError("header longer than the bytes read")
        value = cbor.decode(bytes(head[pos : pos + length]))
        roots = [bytes(r) for r in value["roots"]]
    except (ValueError, KeyError, TypeError, cbor.CBORError) as exc:
        raise FormatError(f"not a CARv1 header ({exc})", path=path, offset=0) from None
    return roots
