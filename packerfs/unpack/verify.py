"""verify() and ls(): checking a CAR set end to end, and listing what it holds.

verify reads every byte of every usable CAR and checks each block against its
CID, then checks the manifests against the CARs and each other, and (given
manifest.csv) each CAR's size, root and piece CID against its row. Data
problems never raise: each is one line, naming the file and, where there is
one, the offset.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from packerfs.errors import FormatError, PackerfsError
from packerfs.ipld.car import CarReader
from packerfs.ipld.cid import DAG_PB, cid_codec, cid_to_str
from packerfs.ipld.dagpb import SYMLINK as UNIXFS_SYMLINK
from packerfs.ipld.dagpb import UnixFSData, decode_node
from packerfs.unpack import dag
from packerfs.unpack.carset import CarSet
from packerfs.unpack.tree import DIR, FILE, SYMLINK, Tree, path_problem, show


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    cars: int = 0
    blocks: int = 0
    bytes: int = 0
    file_versions: int = 0
    commp_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = (
            f"checked {self.cars} CARs, {self.blocks} blocks ({self.bytes} bytes), "
            f"{self.file_versions} file versions, {self.commp_checked} piece CIDs: "
            + ("OK" if self.ok else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}")
        )
        return [head, *self.problems]


def verify(
    carset: CarSet, manifest_csv: str | None = None, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check everything; progress(n) is called with block bytes read (and again with bytes hashed for commP)."""
    advance = progress or (lambda n: None)
    report = VerifyReport()
    report.problems += carset.problems
    for car in carset.cars:
        _check_blocks(car.path, report, advance)
    tree = Tree.build(carset, strict=False)
    report.problems += tree.problems
    missing = set(tree.missing_bins)
    for number in tree.missing_bins:
        report.problems.append(f"bin {number} is missing from the set")
    _check_manifests(carset, tree, missing, report)
    if manifest_csv is not None:
        _check_csv(carset, manifest_csv, report, advance)
    return report


def _check_blocks(path: str, report: VerifyReport, advance) -> None:
    report.cars += 1
    try:
        with CarReader(path) as reader:
            for section in reader.sections():
                try:
                    reader.read_block(section, verify=True)
                except FormatError as exc:
                    report.problems.append(str(exc))
                report.blocks += 1
                report.bytes += section.length
                advance(section.length)
    except FormatError as exc:
        report.problems.append(str(exc))
    except OSError as exc:
        report.problems.append(f"{path}: cannot read: {exc.strerror or exc}")


class _Checker:
    """Block access for the consistency checks; decoded directories are cached."""

    def __init__(self, carset: CarSet):
        self.carset = carset
        self.dirs: dict[bytes, dag.DirNode] = {}
        self.files = dag.FileDag(carset)

    def load_dir(self, cid: bytes) -> dag.DirNode:
        node = self.dirs.get(cid)
        if node is None:
            node = dag.decode_dir_node(self.carset, cid, self.carset.read_block(cid))
            if len(self.dirs) > 4096:
                self.dirs.clear()
            self.dirs[cid] = node
        return node

    def resolve(self, root: bytes, name: bytes) -> bytes | None:
        return dag.resolve(self.carset, root, name, self.load_dir)


def _check_manifests(carset: CarSet, tree: Tree, missing: set[int], report: VerifyReport) -> None:
    check = _Checker(carset)
    # Every part: complete set, tiles the stream, DAG present with the right sizes.
    for fv in tree.versions:
        report.file_versions += 1
        if not fv.complete:
            bins = ", ".join(str(b) for b in fv.missing_bins) or "unknown"
            parts = ", ".join(str(p) for p in fv.missing_parts)
            report.problems.append(
                f"{show(fv.path)} (version {fv.version}): part {parts} of {fv.parts} missing (bin {bins})"
            )
        elif sum(r.length for r in fv.refs.values()) != fv.stream:
            report.problems.append(f"{show(fv.path)} (version {fv.version}): part lengths do not add up to the stream size {fv.stream}")
        for ref in fv.ordered():
            where = f"{ref.car}: part {ref.part} of {show(fv.path)}"
            if carset.locate(ref.cid) is None:
                report.problems.append(f"{where}: its root block {cid_to_str(ref.cid)} is in no CAR")
                continue
            try:
                for leaf, size in check.files.leaves(ref.cid, ref.length):
                    loc = carset.locate(leaf)
                    if loc is None:
                        report.problems.append(f"{where}: leaf {cid_to_str(leaf)} is in no CAR")
                    elif loc.length != size:
                        path = carset.car_by_id[loc.car].path
                        report.problems.append(
                            f"{path}: offset {loc.section_offset}: leaf of {show(fv.path)} is {loc.length} bytes, "
                            f"its file node says {size}"
                        )
            except FormatError as exc:
                report.problems.append(f"{exc} ({where})")
    # Every entry's name resolves in its own CAR's UnixFS tree to the manifest's CID.
    for car in carset.cars:
        for index, e in enumerate(car.entries):
            kind = e["kind"]
            name = e["name"] if kind == FILE else e["path"]
            if kind == DIR and name == b"":
                continue
            if path_problem(e["path"]) or path_problem(name):
                continue  # reported by the tree build
            where = f"{car.path}: manifest entry {index} ({show(e['path'])})"
            try:
                found = check.resolve(car.root, name)
            except FormatError as exc:
                report.problems.append(f"{exc} ({where})")
                continue
            if found is None:
                report.problems.append(f"{where}: {show(name)} is not in the CAR's directory tree")
            elif kind == DIR:
                try:
                    check.load_dir(found)
                except FormatError as exc:
                    report.problems.append(f"{exc} ({where})")
            elif found != e["cid"]:
                report.problems.append(
                    f"{where}: the directory tree links {show(name)} to {cid_to_str(found)}, "
                    f"the manifest says {cid_to_str(e['cid'])}"
                )
            elif kind == SYMLINK:
                _check_symlink(carset, e, where, report)


def _check_symlink(carset: CarSet, e: dict, where: str, report: VerifyReport) -> None:
    try:
        block = carset.read_block(e["cid"])
    except FormatError as exc:
        report.problems.append(f"{exc} ({where})")
        return
    try:
        if cid_codec(e["cid"]) != DAG_PB:
            raise ValueError("not a dag-pb node")
        node = decode_node(block)
        fs = UnixFSData.decode(node.data or b"")
        if fs.type != UNIXFS_SYMLINK:
            raise ValueError(f"UnixFS type {fs.type}, not a symlink")
        if (fs.data or b"") != e["target"]:
            raise ValueError("its target differs from the manifest's")
    except ValueError as exc:
        path, offset = carset.where(e["cid"])
        report.problems.append(str(FormatError(f"symlink block: {exc} ({where})", path=path, offset=offset)))


def _check_csv(carset: CarSet, manifest_csv: str, report: VerifyReport, advance) -> None:
    from packerfs.piece import commp_file

    try:
        with open(manifest_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        report.problems.append(f"{manifest_csv}: cannot read: {getattr(exc, 'strerror', None) or exc}")
        return
    needed = {"car_file", "piece_cid", "piece_size", "car_size"}
    if rows and not needed <= set(rows[0]):
        report.problems.append(f"{manifest_csv}: missing columns {', '.join(sorted(needed - set(rows[0])))}")
        return
    cars = {os.path.basename(car.path): car for car in carset.cars}
    seen = set()
    for line, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        name = row.get("car_file", "")
        where = f"{manifest_csv} line {line}"
        car = cars.get(name)
        if car is None:
            report.problems.append(f"{where}: {name} is not among the usable CARs")
            continue
        seen.add(name)
        size = os.path.getsize(car.path)
        if str(size) != row["car_size"]:
            report.problems.append(f"{car.path}: {size} bytes, {where} says car_size {row['car_size']}")
        payload = row.get("payload_cid", "")
        if payload and payload != cid_to_str(car.root):
            report.problems.append(f"{car.path}: root {cid_to_str(car.root)}, {where} says payload_cid {payload}")
        try:
            info = commp_file(car.path, progress=None)
        except PackerfsError as exc:
            report.problems.append(f"{car.path}: cannot compute the piece CID: {exc}")
            continue
        advance(size)
        report.commp_checked += 1
        if info.piece_cid != row["piece_cid"]:
            report.problems.append(f"{car.path}: piece CID is {info.piece_cid}, {where} says {row['piece_cid']}")
        if str(info.piece_size) != row["piece_size"]:
            report.problems.append(f"{car.path}: piece size is {info.piece_size}, {where} says {row['piece_size']}")
    for name, car in cars.items():
        if name not in seen:
            report.problems.append(f"{car.path}: has no row in {manifest_csv}")


class LsRow(NamedTuple):
    path: bytes
    kind: str  # "dir" | "file" | "symlink"
    size: int
    parts: int  # file parts (0 for dirs and symlinks)
    bins: tuple[int, ...]  # bins holding it (for a dir: the latest bin that describes it)
    complete: bool
    target: bytes | None


def ls(carset: CarSet) -> list[LsRow]:
    """The tree's entries, sorted by path (the root, b"", first); newest version of each path."""
    return [
        LsRow(e.path, e.kind, e.size, e.parts, e.bins, e.complete, e.target)
        for e in carset.tree()
    ]
