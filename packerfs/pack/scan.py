"""The scan: plan every bin from metadata, then seal the bins, here or on Dask workers.

The walk is planned entry by entry from metadata alone (packerfs.plan.planner):
which bin holds each entry and where a file is cut into parts, with bounds that
hold for any content. Each planned bin is then a list of operations that a
BinSealer (packerfs.pack.seal) carries out: it reads the bin's source ranges,
encrypts, cuts 1 MiB leaves, hashes them, builds the UnixFS DAG, lays the bytes
out and computes commP. With no pool the sealer runs in this process, fed as
the plan is made (one read of the source, nothing held); with a Dask pool
(packerfs.pack.parallel) each bin is a task, and this process, the
coordinator, commits the results. Either way the coordinator alone writes the
index, one transaction per bin, in bin order: after any interruption the index
is exactly what a one-process scan would have left, so resuming works the same.

A scan runs the planner twice over the same walk: a first pass that decides
nothing for good but gives the totals (what will be read, how many bins: the
progress bar's ETA, and the plan stored in the state for `packerfs status`),
and the real one. `packerfs plan` runs the first pass alone.

A scan against a state directory that already holds sealed bins skips every
entry whose fingerprint matches its sealed record: that is how an interrupted
scan resumes (work since the last seal is redone, identically) and how a
rescan leaves sealed bins untouched while new and changed data goes into new
bins.

A scan that changed anything (and the first one) ends with a data-set
snapshot (packerfs/snapshot.py): every path the scan saw, each pointing at the
bins that hold its current version, sealed into the scan's last bin (or a new
one). The bins holding it are sealed by the coordinator, which has the body.
From it follows each bin's status: *current* while it holds a file
version the snapshot uses, *retired* once it holds none. A current bin that
also holds superseded data can no longer be generated from the source (that
data is gone) but is still needed; --repack-below moves the live files out of
such bins so they can retire.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

from packerfs import manifest, snapshot
from packerfs.crypt.base import Cipher
from packerfs.crypt.secrets import file_seed, new_run_seed, snapshot_seed
from packerfs.errors import PackerfsError, SourceChanged, UsageError
from packerfs.index.store import DIGESTS_PER_CHUNK, Index
from packerfs.ipld.unixfs import CHUNK_SIZE, symlink_block
from packerfs.compress.coding import Coding
from packerfs.compress.zstd import check_compressor, compress_file, compressor_id, should_compress
from packerfs.pack.seal import (
    NAME_MAX, PART_SUFFIX_MAX, BinSealer, Results, SealContext, file_manifest_bound, name_in_car, part_name_length,
    part_suffix, stored_suffix,
)
from packerfs.pack.writer import CarOutput, DirectoryOutput
from packerfs.piece import padded_size
from packerfs.plan import costs
from packerfs.plan.planner import PlanBin, sync_frames
from packerfs.privacy.sealed_manifest import ManifestSealer
from packerfs.source.base import Source
from packerfs.source.walk import DIR, FILE, SYMLINK, Entry, ScanProblem

__all__ = ["Scan", "ScanReport", "Plan", "NAME_MAX", "PART_SUFFIX_MAX", "name_in_car", "part_suffix"]

log = logging.getLogger("packerfs.scan")

# Compressed sizes the planning pass learnt, kept for the scan (the rest are measured again there).
MEASURED_KEPT = 1 << 20
# Flush finished segments and file records to the index every this many, so memory stays flat.
SEGMENT_FLUSH = 4096
PENDING_FLUSH = 2048


@dataclass
class ScanReport:
    bins_sealed: list[int] = field(default_factory=list)
    files_placed: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    skipped: int = 0
    changed_paths: list[bytes] = field(default_factory=list)  # superseded by a new version (first REPORT_PATHS)
    deleted_paths: list[bytes] = field(default_factory=list)  # gone from the source (first REPORT_PATHS)
    changed: int = 0
    deleted: int = 0
    repacked: int = 0
    snapshot: dict | None = None  # the snapshot this scan sealed: id, entries, files, bytes, bins
    retired_bins: list[int] = field(default_factory=list)  # bins this scan retired
    problems: list[ScanProblem] = field(default_factory=list)
    bytes_to_read: int = 0  # what the plan said this scan would read
    bytes_measured: int = 0  # read (by the planning pass) to learn compressed sizes
    plan: "Plan | None" = None


# Paths listed by name in a report; the counts are always complete.
REPORT_PATHS = 1000

class _TreeSpill:
    """The snapshot's entries as the scan settles each path, spilled to a file in the state directory.

    Every path the walk meets is written once, when its record is final (skipped as unchanged, or
    placed), so the snapshot costs one encoding per path and never re-reads the index. The totals
    and each bin's live files and bytes are kept alongside; memory is a counter per bin.
    """

    def __init__(self, path: str | None):
        """`path` None: count only (planning), nothing is written."""
        self.path = path
        self.file = open(path, "wb") if path is not None else None
        self.size = 0
        self.totals = {"entries": 0, "files": 0, "bytes": 0}
        self.newest = 0  # the snapshot's time: the newest mtime in the tree, so its bytes depend on the source alone
        self.live_files: Counter = Counter()
        self.live_bytes: Counter = Counter()

    def add(self, version: int, record: dict) -> None:
        encoded = snapshot.encode_entry(record, version)
        if self.file is not None:
            self.file.write(encoded)
        self.size += len(encoded)
        self.newest = max(self.newest, record["mtime_ns"])
        self.totals["entries"] += 1
        if record["kind"] == FILE:
            self.totals["files"] += 1
            self.totals["bytes"] += record["size"]
            stream = record["stream_size"]
            first_leaf = 0
            for number, leaves in zip(record["bins"], record["parts"]):
                self.live_files[number] += 1
                self.live_bytes[number] += min(stream, (first_leaf + leaves) * CHUNK_SIZE) - first_leaf * CHUNK_SIZE
                first_leaf += leaves

    def pieces(self) -> Iterator[bytes]:
        self.file.close()
        with open(self.path, "rb") as f:
            while piece := f.read(CHUNK_SIZE):
                yield piece

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass
class Plan:
    """What a planning pass decided: each bin with what it holds, and the totals."""

    # bin, entries, file_parts, stream_bytes, car_bound, piece_size, first, last, continues
    bins: list[dict] = field(default_factory=list)
    entries: int = 0  # paths in the walk
    files: int = 0
    bytes: int = 0  # plaintext bytes of every file in the walk
    kept: int = 0  # entries whose sealed record still stands (nothing to read or place)
    placed: int = 0  # entries (re)placed by this scan
    files_placed: int = 0
    bytes_to_read: int = 0  # plaintext the scan will read
    snapshot_bins: list[int] = field(default_factory=list)
    files_assigned: list | None = None  # (path, bins) of each file and symlink placed, when asked for

    def sealing_tasks(self) -> int:
        """Independent sealing tasks in the bins before the last (which is sealed here, with the
        snapshot): bins a stream runs through from state at a seam make one task."""
        return sum(1 for row in self.bins[:-1] if not row["continues"])

    def summary(self) -> dict:
        return {
            "bins": len(self.bins), "entries": self.entries, "files": self.files, "bytes": self.bytes,
            "kept": self.kept, "placed": self.placed, "files_placed": self.files_placed,
            "bytes_to_read": self.bytes_to_read,
            "stream_bytes": sum(b["stream_bytes"] for b in self.bins),
            "car_bound": sum(b["car_bound"] for b in self.bins),
            "pieces": {str(size): n for size, n in sorted(Counter(b["piece_size"] for b in self.bins).items())},
            "snapshot_bins": self.snapshot_bins,
        }


@dataclass
class BinWork:
    """A planned bin on its way to the index: its operations (for a worker) or its live sealer,
    and what the coordinator commits with it."""

    number: int
    ops: list = field(default_factory=list)
    sealer: BinSealer | None = None
    results: Results = field(default_factory=Results)
    records: dict = field(default_factory=dict)  # version -> record, for every entry with a part here
    ends: dict = field(default_factory=dict)  # version -> (leaves sealed once this bin is, last part here?)
    paths: dict = field(default_factory=dict)  # path -> version, for the records that start here
    state: dict | None = None  # the scan state committed with the bin (the counters as of its planning)
    partial: str | None = None  # OUT/bin-N.car.partial (a directory OUT), renamed once committed
    sink: object | None = None  # its CAR's sink while sealed here (CarOutput.sink), committed with the bin
    upload: tuple | None = None  # where a Dask worker sealing it uploads its CAR (CarOutput.worker_upload)
    planned_read: int = 0  # plaintext its parts stand for (what progress counts for it)
    applied: int = 0  # operations its sealer here applied since records were last flushed


class Scan:
    def __init__(
        self,
        source: Source,
        index: Index,
        cipher: Cipher,
        secret: bytes,
        bin_size: int,
        *,
        skip_unreadable: bool = False,
        advance: Callable[[int], None] | None = None,
        on_seal: Callable[[dict], None] | None = None,
        car_dir: "str | CarOutput | None" = None,
        repack_below: float | None = None,
        exclude: Collection[bytes] = (),
        source_options: dict | None = None,
        pool=None,
        pool_factory: Callable | None = None,
        dry: bool = False,
        check_seams: bool = True,
        hide_names: bool = False,
        compress: int | None = None,
        pad_sizes: bool = False,
        measured: dict | None = None,
    ):
        """With `car_dir`, each bin's CAR is also written there as it is laid out (one read of the source):
        a directory, or a packerfs.pack.writer.CarOutput (StoreOutput: uploaded to a bucket). The CAR
        appears under its final name only after the bin's index commit.

        With `repack_below`, the live files of current bins whose live share of their payload is below
        it are placed again (new versions in new bins), so that those bins retire.

        `exclude`: source-relative paths left out of the walk (packerfs's own output, state or
        mount point inside the source; see packerfs.source.excluded_paths).

        `pool`: a packerfs.pack.parallel pool that seals bins on Dask workers (None: in this process);
        or `pool_factory(plan)`, called once the plan is known, returns one (or None), which the scan
        closes when it ends.
        `dry`: plan only (see plan()); `check_seams`: when planning, read the last sealed leaf of a
        file an interrupted scan left half placed, to see whether it can be continued (False: assume
        so, and read nothing).
        `hide_names`: parts get opaque names in their bin's root, directories and symlinks are in the
        sealed manifest only (packerfs.privacy).
        `compress` (a zstd level): files that shrink are stored as seekable zstd frames; `pad_sizes`:
        every file's stored plaintext is padded to a PADMÉ size (packerfs.compress.coding). A file's
        compressed size is learnt by reading it once when it is planned (`measured` keeps what the
        planning pass learnt for the scan that follows).
        """
        self.car_output: CarOutput | None = (
            DirectoryOutput(car_dir) if isinstance(car_dir, (str, os.PathLike)) else car_dir
        )
        self.exclude = frozenset(exclude)
        self.source = source
        self.source_options = source_options
        self.index = index
        self.cipher = cipher
        self.secret = secret
        self.bin_size = bin_size
        self.skip_unreadable = skip_unreadable
        self.repack_below = repack_below
        self.advance = advance or (lambda n: None)
        self.on_seal = on_seal or (lambda result: None)
        self.pool = pool
        self.pool_factory = pool_factory
        self.dry = dry
        self.check_seams = check_seams
        self.hide_names = hide_names
        self.compress = compress
        self.pad_sizes = pad_sizes
        self.measured = measured if measured is not None else {}
        self.compressor_checked = False
        self.sealing = ManifestSealer(cipher, secret) if hide_names else None
        self.dataset = index.dataset
        self.recipients = list(cipher.recipients)
        self.bin: PlanBin | None = None  # the bin being planned
        self.work: BinWork | None = None  # and what goes with it
        self.ancestors: list[Entry] = []  # directories above the entry being handled (root first)
        self.pending_touched: list[bytes] = []
        self.last_params: dict = {}  # params at the end of the last sealed bin (the seam of a stream it cut)
        self.carry = None  # the open stream the last bin sealed here cut (pack.seal.Carry)
        self.seams_ok: dict[bytes, bool] = {}
        self.seen_indexed = 0  # walked paths the index knew  # path -> can a half-placed file be continued (from planning)
        self.index_is_new = not index.latest_versions_exist()
        self.report = ScanReport()
        self.plan_result = Plan()
        scan_state = index.get_meta(b"scan", {}) or {}
        self.next_version = scan_state.get("next_version", 1)
        self.next_bin = scan_state.get("next_bin", 1)
        self.next_snapshot = scan_state.get("next_snapshot", 1)
        # Something changed since the last snapshot (possibly in an interrupted earlier run).
        self.dirty = scan_state.get("dirty", True) or self.index_is_new
        self.generation = scan_state.get("generation", 0) + 1
        if not dry:
            index.generation = self.generation
        self.vacate = self._bins_to_vacate(repack_below) if repack_below is not None else set()
        self.tree: _TreeSpill | None = None
        self.ctx = SealContext(
            source.url, source_options, cipher, secret, new_run_seed(), self.dataset, bin_size, hide_names
        )

    # ================================================================ driver

    def _planner(self) -> "Scan":
        return Scan(
            self.source, self.index, self.cipher, self.secret, self.bin_size,
            skip_unreadable=self.skip_unreadable, repack_below=self.repack_below, exclude=self.exclude,
            dry=True, check_seams=self.check_seams, hide_names=self.hide_names, compress=self.compress,
            pad_sizes=self.pad_sizes, measured=self.measured, advance=self.advance,
        )

    def plan(self, *, keep: bool = False) -> Plan:
        """Plan the whole walk from metadata (and the index): nothing is read, nothing is written.

        The source's problems are in self.report.problems. `keep`: the source keeps the listing for
        the scan that follows (one listing per scan)."""
        if not self.dry:
            raise AssertionError("plan() is the planning pass of a dry Scan")
        problems: list[ScanProblem] = []
        self.report.problems = problems
        self.tree = _TreeSpill(None)
        plan = self.plan_result
        for entry in self.source.walk(problems, exclude=self.exclude, keep=keep):
            self._visit(entry)
            plan.entries += 1
            if entry.kind == FILE:
                plan.files += 1
                plan.bytes += entry.size
        self._finish_plan()
        return plan

    def run(self) -> ScanReport:
        planner = self._planner()
        plan = planner.plan(keep=True)
        problems = planner.report.problems
        self.seams_ok = planner.seams_ok
        self.report.bytes_measured = planner.report.bytes_measured
        fatal = [p for p in problems if p.fatal]
        if fatal and not self.skip_unreadable:
            listing = "; ".join(f"{os.fsdecode(p.path) or '.'}: {p.reason}" for p in fatal)
            raise PackerfsError(
                f"{len(fatal)} source entr{'y' if len(fatal) == 1 else 'ies'} cannot be read ({listing}); "
                f"fix the permissions or pass --skip-unreadable"
            )
        for p in problems:
            log.warning("%s: %s", self.source.display(p.path), p.reason)
        self.report.problems = problems
        self.report.bytes_total = plan.bytes
        self.report.bytes_to_read = plan.bytes_to_read
        self.report.plan = plan
        set_total = getattr(self.advance, "set_total", None)
        if set_total is not None:  # what the planning pass read to measure compressed sizes is counted already
            set_total(plan.bytes_to_read + self.report.bytes_measured)
        self.index.commit(meta=[(b"plan", {"source": self.source.url, **plan.summary(), "table": plan.bins})])
        self._save_state("scanning")

        self.tree = _TreeSpill(os.path.join(self.index.state_dir, "snapshot.spill"))
        owned = None
        try:
            if self.pool is None and self.pool_factory is not None:
                self.pool = owned = self.pool_factory(plan)
            if self.pool is not None:
                self.pool.advance = self.advance  # progress as workers read, and a way to stop the wait
            self._scan_all()
        finally:
            if owned is not None:
                self.pool = None
                owned.close()
            self.tree.close()
            if self.work is not None and self.work.sealer is not None:
                self._abandon(self.work)
            if self.carry is not None:
                self.carry.close()
            self.bin = self.work = None
        if [b["bin"] for b in plan.bins] != [b["bin"] for b in self.plan_result.bins]:
            log.info("the source changed between the planning pass and the scan; the scan's plan is the one used")
        return self.report

    def _scan_all(self) -> None:
        late: list[ScanProblem] = []
        entries = self.source.walk(late, exclude=self.exclude, replay=True)
        if self.pool is None:  # the sealer reads here, in walk order: let the source fetch ahead
            entries = self.source.read_ahead(entries, self._will_read)
        for entry in entries:
            self._visit(entry)
        self._late_problems(late)
        self._finish()
        self._save_state("ready")

    def _visit(self, entry: Entry) -> None:
        if entry.path == manifest.DIRNAME:
            raise UsageError(
                f"{self.source.display(entry.path)}: this name is reserved for packerfs's own "
                f"metadata in each CAR; rename it"
            )
        while self.ancestors and not _is_ancestor(self.ancestors[-1].path, entry.path):
            self.ancestors.pop()
        self._handle(entry)
        if entry.kind == DIR:
            self.ancestors.append(entry)

    def _earlier(self, entry: Entry) -> tuple[int | None, dict | None, bool, bool]:
        """(version, record, same, moving): the entry's latest record, whether the entry is still that
        version, and whether it moves out of a bin being vacated."""
        version = record = None
        if not self.index_is_new:
            version = self.index.latest_version(entry.path)
            record = self.index.file(version) if version is not None else None
        same = record is not None and tuple(record["fp"]) == tuple(entry.fingerprint)
        moving = same and entry.kind == FILE and not self.vacate.isdisjoint(record["bins"])
        return version, record, same, moving

    def _kept(self, record: dict | None, same: bool, moving: bool) -> bool:
        """Is the entry's sealed record still it, so that nothing is read or placed again?"""
        sealed = record is not None and all(self.index.bin(b) is not None for b in record["bins"])
        return same and record["complete"] and sealed and not moving

    def _will_read(self, entry: Entry) -> bool:
        """Will the scan read this file from its first byte? (For the source's read-ahead.)"""
        if entry.kind != FILE or not entry.size:
            return False
        _, record, same, moving = self._earlier(entry)
        if self._kept(record, same, moving):
            return False
        return not (same and record.get("leaves_sealed"))  # a continued file is read from its seam

    def _handle(self, entry: Entry) -> None:
        version, record, same, moving = self._earlier(entry)
        if version is not None:
            self.seen_indexed += 1
        if self._kept(record, same, moving):
            self.report.skipped += 1
            self.plan_result.kept += 1
            self.tree.add(version, record)
            if not self.dry:
                self.pending_touched.append(entry.path)
                if len(self.pending_touched) >= PENDING_FLUSH:
                    self._flush_touched()
            return
        self.dirty = True
        self.plan_result.placed += 1
        if moving:
            self.report.repacked += 1
            same = False
        elif record is not None and not same and record["kind"] != DIR and record["bins"]:
            self._note(self.report.changed_paths, "changed", entry.path)
        if entry.kind == DIR:
            self._place_dir(entry)
        elif entry.kind == SYMLINK:
            self._place_symlink(entry)
        else:
            self._place_file(entry, record if same else None, version)

    # ================================================================ bins

    def _new_bin(self, *, here: bool = False) -> None:
        """Open the next bin. Its sealer runs in this process unless a pool seals it (`here`: always here)."""
        number = self.next_bin
        self.next_bin += 1
        self.bin = PlanBin(number, self.bin_size, self.recipients, self.cipher.name, self.sealing)
        if self.dry:
            return
        work = self.work = BinWork(number)
        if self.car_output is not None:
            work.partial = self.car_output.worker_path(number)  # None for a bucket: workers upload instead
            work.upload = self.car_output.worker_upload(number)
        if self.pool is None or here:
            work.results.on_read = self.advance
            self._start_sealer(work)

    def _start_sealer(self, work: BinWork) -> None:
        """Seal `work` in this process: its operations so far are applied, later ones as they are planned."""
        self.index.clear_segments(work.number)  # what an interrupted scan left of this bin's byte map
        if self.car_output is not None:
            work.sink = self.car_output.sink(work.number, work.partial)
        try:
            work.sealer = BinSealer(
                self.ctx, work.number, self.source, work.results, work.sink, seams=self.last_params, carry=self.carry
            )
        except BaseException:
            self._discard_sink(work, laid_out=False)
            raise
        self.carry = None
        ops, work.ops = work.ops, []
        for op in ops:
            work.sealer.apply(op)
            work.applied += 1
            self._flush_live(work)

    def _abandon(self, work: BinWork) -> None:
        """Stop a bin sealed here after an error: its CAR never appears (the upload is dropped first, so
        that the layout's writer thread stops sending; the layout then removes a partial file)."""
        self._discard_sink(work)
        work.sealer.abandon()

    def _discard_sink(self, work: BinWork, *, laid_out: bool = True) -> None:
        sink, work.sink = work.sink, None
        if sink is not None and self.car_output is not None:
            try:
                self.car_output.discard(work.number, sink, laid_out=laid_out)
            except Exception as exc:  # best effort: the error that got us here is the one to report
                log.info("bin %d: could not drop its CAR's upload: %s", work.number, exc)

    def _op(self, op: tuple) -> None:
        """Hand one operation to the bin being planned."""
        if self.dry:
            return
        work = self.work
        if work.sealer is None:
            work.ops.append(op)
            return
        work.sealer.apply(op)
        work.applied += 1
        self._flush_live(work)

    def _sync(self, chain: list[Entry]) -> None:
        if sync_frames(self.bin, chain):
            self._op(("sync", list(chain)))

    def _ensure_room(self, cost_of: Callable[[PlanBin], int], what: bytes) -> None:
        """Open the chain for the next entry in the current bin, or in a new one if it does not fit."""
        if self.bin is None:
            self._new_bin()
        self._sync(self.ancestors)
        if cost_of(self.bin) <= self.bin.budget.available():
            return
        if not self.bin.is_empty:
            self._seal()
            self._new_bin()
            self._sync(self.ancestors)
            if cost_of(self.bin) <= self.bin.budget.available():
                return
        raise UsageError(
            f"bin size {self.bin_size} is too small to hold {os.fsdecode(what) or '.'} with its CAR overhead; "
            f"use a larger --bin-size"
        )

    def _fresh_bin(self) -> PlanBin:
        return PlanBin(0, self.bin_size, self.recipients, self.cipher.name, self.sealing)

    def _seal(self) -> None:
        """The bin being planned is complete: seal it here, or hand it to the pool."""
        plan_bin, work = self.bin, self.work
        self.bin = self.work = None
        self.plan_result.bins.append(_plan_row(plan_bin))
        if self.dry:
            return
        work.state = self._state("scanning")
        if work.sealer is not None:
            try:
                result = work.sealer.seal()
                if work.sink is not None:
                    work.sink.close()  # every byte stored (fsynced; every part uploaded), not yet visible
            except BaseException:
                self._abandon(work)  # its partial CAR is removed, never renamed; an upload is aborted
                raise
            self.carry = work.sealer.carry_out
            self._commit(work, result)
        else:
            self.pool.submit(self.ctx, work, continues=plan_bin.continues)
            for done, result in self.pool.ready():
                self._commit_pooled(done, result)

    def _commit_pooled(self, work: BinWork, result: dict) -> None:
        """_commit of a bin a Dask worker sealed; a CAR it uploaded is completed with the bin."""
        detached = result.pop("upload", None)
        if detached is not None:
            work.sink = self.car_output.attach(work.number, detached)
        self._commit(work, result)

    def _commit(self, work: BinWork, result: dict) -> None:
        """Write a sealed bin and everything that goes with it to the index, in one transaction."""
        results = work.results
        files = []
        for version, record in work.records.items():
            leaves_end, last = work.ends[version]
            if version in results.params:
                record["params"] = results.params[version]
            if last:
                record["complete"] = True
            else:
                record["leaves_sealed"] = leaves_end
            files.append((version, {**record, "bins": [b for b in record["bins"] if b <= work.number]}))
        try:
            self.index.commit(
                files=files,
                paths=list(work.paths.items()),
                touched=self._take_touched(),
                digests=self._merged_digests(results.digests),
                bins=[(work.number, result)],
                segments=[(work.number, end, record) for end, record in results.segments],
                meta=[(b"scan", work.state)],
            )
        except BaseException:
            self._discard_sink(work)
            raise
        self.last_params = results.params
        self.report.bins_sealed.append(work.number)
        self.report.bytes_read += results.bytes_read
        if self.car_output is not None:
            # The index commit above came first: a CAR under its final name is always a sealed bin's.
            # (A directory: the rename of what this process or a worker wrote; a bucket: the upload's
            # complete, for a bin sealed here.)
            sink, work.sink = work.sink, None
            self.car_output.commit(work.number, work.partial, sink)
        log.info(
            "sealed bin %d: %d bytes (%.2f%% of %d), piece %s",
            work.number, result["car_size"], 100 * result["car_size"] / self.bin_size, self.bin_size,
            result["piece_cid"],
        )
        self.on_seal(result)

    def _merged_digests(self, runs: list) -> list:
        """Leaf digest runs as whole index chunks; a run that starts inside a chunk (a part continuing a
        stream) is joined to the chunk's leaves before it, which an earlier bin committed."""
        out = []
        for version, first_leaf, data in runs:
            within = first_leaf % DIGESTS_PER_CHUNK
            chunk_first = first_leaf - within
            if within:
                data = self.index.digests_of(version, chunk_first, within) + data
            out.append(((version, chunk_first // DIGESTS_PER_CHUNK), data))
        return out

    def _flush_live(self, work: BinWork) -> None:
        """While a bin is sealed here: write its finished records and byte map early, so memory stays flat
        however many files the bin holds (a record only counts once its bins are sealed)."""
        results = work.results
        if len(results.segments) >= SEGMENT_FLUSH:
            self.index.commit(segments=[(work.number, end, record) for end, record in results.segments])
            results.segments = []
        if work.applied < PENDING_FLUSH:
            return
        work.applied = 0
        files, paths, done = [], [], []
        # Records are in plan order and the sealer applies operations in that order, so the sealed
        # ones come first: the walk stops at the first file not sealed yet. (When the last bin's
        # operations were all planned before its sealer started, most of its records are ahead.)
        for version, record in work.records.items():
            leaves_end, last = work.ends[version]
            if not last:
                continue
            if record["kind"] == FILE and version not in results.params:
                break
            if version in results.params:
                record["params"] = results.params.pop(version)
            record["complete"] = True
            files.append((version, record))
            done.append(version)
        for version in done:
            record = work.records.pop(version)
            del work.ends[version]
            if work.paths.get(record["path"]) == version:
                paths.append((record["path"], work.paths.pop(record["path"])))
        finished = set(done)
        runs = [run for run in results.digests if run[0] in finished]
        results.digests = [run for run in results.digests if run[0] not in finished]
        self.index.commit(files=files, paths=paths, touched=self._take_touched(), digests=self._merged_digests(runs))

    def _take_touched(self) -> list[bytes]:
        touched, self.pending_touched = self.pending_touched, []
        return touched

    def _flush_touched(self) -> None:
        self.index.commit(touched=self._take_touched())

    def _drain(self) -> None:
        """Wait for every bin the pool is sealing, committing each in order."""
        if self.pool is not None:
            for done, result in self.pool.drain():
                self._commit_pooled(done, result)

    # ================================================================ entries

    def _new_record(self, entry: Entry) -> tuple[int, dict]:
        version = self.next_version
        self.next_version += 1
        record = {
            "path": entry.path,
            "kind": entry.kind,
            "mode": entry.mode,
            "mtime_ns": entry.mtime_ns,
            "size": entry.size,
            "fp": list(entry.fingerprint),
            "target": entry.target,
            "bins": [],
            "complete": True,
        }
        return version, record

    def _hold(self, version: int, record: dict, leaves_end: int = 0, last: bool = True, first: bool = True) -> None:
        """Note a record with a part in the bin being planned, for that bin's commit."""
        record["bins"].append(self.bin.number)
        if self.dry:
            return
        self.work.records[version] = record
        self.work.ends[version] = (leaves_end, last)
        if first:
            self.work.paths[record["path"]] = version

    def _place_dir(self, entry: Entry) -> None:
        if entry.path == b"":
            if self.bin is None:
                self._new_bin()
            self._sync([entry])
        else:
            bound = manifest.entry_bound("dir", entry.path)

            def cost(plan_bin: PlanBin) -> int:
                if self.hide_names:
                    return plan_bin.budget.manifest_entry_cost(bound)
                return plan_bin.budget.entry_cost(len(entry.name), bound, costs.DIR_NODE_FIXED)

            self._ensure_room(cost, entry.path)
            if not self.hide_names:
                self.bin.open_frame(entry.path, entry.name)
            self.bin.add_manifest_entry(None, bound)
            self.bin.opened_dirs.add(entry.path)
            self._op(("dir", entry))
        # A new or changed directory is data worth a bin of its own, even with nothing else in it.
        self.bin.placed(entry.path)
        version, record = self._new_record(entry)
        self._hold(version, record)
        self.tree.add(version, record)

    def _place_symlink(self, entry: Entry) -> None:
        block_length = len(symlink_block(entry.target).data)
        bound = manifest.entry_bound("symlink", entry.path, target=entry.target)

        def cost(plan_bin: PlanBin) -> int:
            if self.hide_names:  # no block: its target is in the sealed manifest
                return plan_bin.budget.manifest_entry_cost(bound)
            return plan_bin.budget.entry_cost(len(entry.name), bound, costs.section_length(block_length))

        self._ensure_room(cost, entry.path)
        if self.hide_names:
            self.bin.placed(entry.path)
        else:
            self.bin.add_stored(entry.path, len(entry.name), block_length)
        self.bin.add_manifest_entry(None, bound)
        self._op(("symlink", entry))
        version, record = self._new_record(entry)
        self._hold(version, record)
        self.tree.add(version, record)
        if self.plan_result.files_assigned is not None:
            self.plan_result.files_assigned.append((entry.path, list(record["bins"])))

    # ---------------------------------------------------------------- files

    def _parts(self, entry: Entry, stream_size: int, bounds: tuple[int, int]) -> tuple[bool, list[int]]:
        """(seal the current bin first?, leaves per part): a pure function of sizes and budgets.

        `bounds`: file_manifest_bound() of the entry."""
        name_bound, bound = bounds
        leaves = costs.leaf_count(stream_size)
        first = None
        if self.bin is not None:
            self._sync(self.ancestors)
            budget = self.bin.budget
            if budget.entry_cost(name_bound, bound, costs.file_bound(stream_size)) <= budget.available():
                return False, [leaves]  # fits whole: the common case, one bound to compute
            first = budget.max_leaves(name_bound, bound, stream_size)
        fresh = self._fresh_bin()
        sync_frames(fresh, self.ancestors)
        per_bin = fresh.budget.max_leaves(name_bound, bound, stream_size)
        if per_bin == 0:
            raise UsageError(
                f"bin size {self.bin_size} is too small to hold one 1 MiB leaf of "
                f"{os.fsdecode(entry.path)} with its CAR overhead; use a larger --bin-size"
            )
        seal_first = first == 0
        if not first:
            first = per_bin
        parts = []
        left = leaves
        take = first
        while left:
            parts.append(min(take, left))
            left -= parts[-1]
            take = per_bin
        return seal_first, parts

    def _place_file(self, entry: Entry, earlier: dict | None, earlier_version: int | None) -> None:
        """Place a file, or continue one whose first parts were sealed before an interruption."""
        if earlier is not None and earlier.get("leaves_sealed"):
            if self._seam_holds(entry, earlier_version, earlier):
                self._continue_file(entry, earlier_version, earlier)
                return
            # The source changed since those parts were sealed: the file starts over as a new version.
            self._note(self.report.changed_paths, "changed", entry.path)
        coding = self._coding(entry)
        stream_size = self.cipher.stream_size(coding.size if coding else entry.size)
        bounds = file_manifest_bound(entry, self.cipher, self.hide_names, coding)
        seal_first, parts = self._parts(entry, stream_size, bounds)
        if self.bin is None:
            self._new_bin()
        elif seal_first:
            self._seal()
            self._new_bin()
        self._sync(self.ancestors)
        version, record = self._new_record(entry)
        record.update(stream_size=stream_size, parts=parts, complete=False, leaves_sealed=0)
        if coding is not None:
            record["coding"] = coding.to_record()
        params = None
        if len(parts) > 1 and not self.cipher.parts_need_previous and not self.dry:
            # every part of a split file is sealed on its own: give them the stream's params up front
            seed = file_seed(self.ctx.run_seed, version)
            params = self.cipher.new_file(coding.size if coding else entry.size, self.secret, seed=seed).params()
        self.plan_result.files_placed += 1
        self._lay_out(entry, version, record, params, 0, bounds[1])

    def _coding(self, entry: Entry) -> "Coding | None":
        """How the file is stored before encryption (None: as it is). With --compress this reads the
        file once (sampled, then compressed whole if it is worth it) to learn its compressed size."""
        if self.compress is None and not self.pad_sizes:
            return None
        key = (entry.path, tuple(entry.fingerprint))
        if key in self.measured:
            return self.measured.pop(key) if not self.dry else self.measured[key]
        table = None
        if self.compress is not None and entry.size:
            if not self.compressor_checked:
                # new compressed streams only from the compressor the state's older ones need (one line if not)
                check_compressor(self.index.get_meta(b"compressor") or compressor_id(self.compress))
                self.compressor_checked = True
            shown = self.source.display(entry.path)
            opened = self.source.open(entry.path, entry.fingerprint)

            def read(offset: int, size: int) -> bytes:
                data = opened.read(offset, size)
                if whole:
                    self.advance(len(data))  # the progress bar shows the measuring (its total comes after)
                return data

            whole = False
            try:
                if should_compress(opened.read, entry.size, self.compress):
                    whole = True
                    table = compress_file(read, entry.size, self.compress)
            except SourceChanged as exc:
                raise SourceChanged(f"{shown}: {exc}" if exc.path is None else str(exc), path=shown) from None
            finally:
                opened.close()
            self.report.bytes_measured += entry.size if table is not None else 0
        coding = Coding(entry.size, table, self.pad_sizes) if table is not None or self.pad_sizes else None
        if self.dry and len(self.measured) < MEASURED_KEPT:
            self.measured[key] = coding
        return coding

    def _seam_holds(self, entry: Entry, version: int, record: dict) -> bool:
        """Can a file whose first parts are sealed be continued? The planning pass reads its last sealed
        leaf once (unless told to read nothing) and the scan keeps the answer."""
        if not self.dry:
            return self.seams_ok.get(entry.path, False)
        holds = (not self.check_seams) or self._last_leaf_matches(entry, version, record, record["leaves_sealed"])
        self.seams_ok[entry.path] = holds
        return holds

    def _continue_file(self, entry: Entry, version: int, record: dict) -> None:
        """Continue a file whose first parts are sealed, from the end of its sealed leaves.

        The fingerprint matched the record, and the last sealed leaf still comes out of the source as
        sealed (_seam_holds): that leaf holds every plaintext octet before the seam that the resumed
        encryptor reads again (the age chunk, or the OpenPGP octets after the stored SHA-1 state, that
        straddle the seam). Nothing before it is read or encrypted again (Cipher.resume_at)."""
        sealed = record["leaves_sealed"]
        if self.bin is not None and not self.bin.is_empty:
            # it was planned to start a fresh bin; something placed before it (a changed file) took this one
            self._seal()
        if self.bin is None:
            self._new_bin()
        self._sync(self.ancestors)
        record["bins"] = [b for b in record["bins"] if self.index.bin(b) is not None]
        self.plan_result.files_placed += 1
        coding = Coding.from_record(record.get("coding"), entry.size)
        bound = file_manifest_bound(entry, self.cipher, self.hide_names, coding)[1]
        self._lay_out(entry, version, record, record["params"], sealed, bound)

    def _last_leaf_matches(self, entry: Entry, version: int, record: dict, sealed: int) -> bool:
        """Does the source still produce the last sealed leaf (one leaf of reading and encryption)?"""
        import hashlib

        opened = self.source.open(entry.path, entry.fingerprint)
        try:
            coding = Coding.from_record(record.get("coding"), entry.size)
            read, size = opened.read, entry.size
            if coding is not None:
                read, size = coding.source_view(opened.read, self.compress or 0, self.source.display(entry.path)).read, coding.size
            stream = self.cipher.open_stream(record["params"], size, read, self.secret)
            try:
                leaf = stream.read((sealed - 1) * CHUNK_SIZE, CHUNK_SIZE)
            except SourceChanged:  # the file is shorter than its fingerprint says, or no longer that version
                return False
        finally:
            opened.close()
        return hashlib.sha256(leaf).digest() == self.index.digests_of(version, sealed - 1, 1)

    def _lay_out(
        self, entry: Entry, version: int, record: dict, params: bytes | None, first_leaf: int, bound: int
    ) -> None:
        """Plan leaves `first_leaf`… part by part, one part per bin, sealing between parts
        (`bound`: the bound on each part's manifest entry)."""
        parts = record["parts"]
        stream_size = record["stream_size"]
        coding = Coding.from_record(record.get("coding"), entry.size)
        suffix = stored_suffix(self.cipher, coding)
        part, part_start = 0, 0
        while part_start < first_leaf:  # a continued file resumes at a part boundary
            part_start += parts[part]
            part += 1
        if part_start != first_leaf:
            raise AssertionError(f"{entry.path!r}: sealed leaves end at {first_leaf}, not at a part boundary")
        continued = first_leaf > 0
        while part < len(parts):
            leaves = parts[part]
            end = part_start + leaves
            last = part + 1 == len(parts)
            name_length = part_name_length(entry, suffix, part, len(parts), self.hide_names)
            self.bin.add_part(entry.path, name_length, min(stream_size, end * CHUNK_SIZE) - part_start * CHUNK_SIZE)
            self.bin.add_manifest_entry(None, bound)
            if part_start and params is None and self.cipher.parts_need_previous:
                # it needs the stream's state at the seam from the previous bin (planning sees params
                # None for every split file: only the cipher says which are sealed independently)
                self.bin.continues = True
            self._hold(version, record, end, last, first=part == 0 or continued)
            # the plaintext this part stands for (exactly the file's size over all its parts): what the
            # progress bar counts for it
            share = _plain_share(entry.size, stream_size, part_start, end)
            self.plan_result.bytes_to_read += share
            if self.work is not None:
                self.work.planned_read += share
            continued = False
            self._op(("part", entry, version, part_start, leaves, part, len(parts), params, coding))
            part += 1
            part_start = end
            if not last:
                self._seal()
                self._new_bin()
                self._sync(self.ancestors)
        self.tree.add(version, record)
        self.report.files_placed += 1
        if self.plan_result.files_assigned is not None:
            self.plan_result.files_assigned.append((entry.path, list(record["bins"])))

    # ================================================================ state

    def _state(self, state: str) -> dict:
        return {
            "state": state,
            "next_version": self.next_version,
            "next_bin": self.next_bin,
            "next_snapshot": self.next_snapshot,
            "generation": self.generation,
            "dirty": self.dirty,
            "bytes_total": self.report.bytes_total,
        }

    def _save_state(self, state: str) -> None:
        self.index.commit(meta=[(b"scan", self._state(state))])

    def _note(self, names: list[bytes], counter: str, path: bytes) -> None:
        setattr(self.report, counter, getattr(self.report, counter) + 1)
        if len(names) < REPORT_PATHS:
            names.append(path)

    # ================================================================ snapshot

    def _bins_to_vacate(self, below: float) -> set[int]:
        """Current bins whose live share is under `below` (at 1 or more: also every bin that cannot be generated)."""
        vacate = set()
        for result in self.index.all_bins():
            if result.get("status") != "current" or result.get("snapshot_only"):
                continue
            payload = result.get("payload_bytes", 0)
            files = result.get("files", 0)
            live = result.get("live_bytes", payload) / payload if payload else (
                result.get("live_files", files) / files if files else 1.0
            )
            if live < below or (below >= 1 and not result.get("regenerable", True)):
                vacate.add(result["bin"])
        return vacate

    def _drop_unseen(self) -> None:
        """Forget the paths this scan did not see: they are gone from the source."""
        dropped: list[bytes] = []
        for key, version, generation in self.index.iter_paths():
            if generation != self.generation:
                dropped.append((key, version))
                if len(dropped) >= PENDING_FLUSH:
                    self._drop(dropped)
        self._drop(dropped)

    def _drop(self, rows: list[tuple[bytes, int]]) -> None:
        """`dirty` is committed before anything is dropped, so a crash after this still ends in a snapshot."""
        if not rows:
            return
        if not self.dirty:
            self.dirty = True
            self._save_state("scanning")
        for key, version in rows:
            try:
                record = self.index.file(version)
            except PackerfsError:
                continue
            if record["kind"] != DIR:
                self._note(self.report.deleted_paths, "deleted", record["path"])
        self.index.commit(dropped=[key for key, _ in rows])
        rows.clear()

    def _late_problems(self, late: list[ScanProblem]) -> None:
        """Entries that became unreadable (or special) between the counting walk and this one."""
        known = {(p.path, p.reason) for p in self.report.problems}
        fresh = [p for p in late if (p.path, p.reason) not in known]
        for p in fresh:
            log.warning("%s: %s", self.source.display(p.path), p.reason)
        self.report.problems.extend(fresh)
        fatal = [p for p in fresh if p.fatal]
        if fatal and not self.skip_unreadable:
            listing = "; ".join(f"{os.fsdecode(p.path) or '.'}: {p.reason}" for p in fatal[:20])
            raise PackerfsError(
                f"{len(fatal)} source entr{'y' if len(fatal) == 1 else 'ies'} became unreadable during the scan "
                f"({listing}); run again (sealed bins are kept) or pass --skip-unreadable"
            )

    def _keep_skipped(self) -> None:
        """An entry skipped as unreadable keeps its earlier version in the snapshot: unreadable is not deleted."""
        for p in self.report.problems:
            if p.fatal:
                for version in self.index.touch_tree(p.path):
                    self.tree.add(version, self.index.file(version))

    def _settle_last_bin(self) -> None:
        """Bring the bin still being planned into this process, with all its records final."""
        work = self.work
        if work is None:
            return
        if work.sealer is None:
            work.results.on_read = self.advance
            self._start_sealer(work)
        work.sealer.flush_segments()
        for version, record in list(work.records.items()):
            if version in work.results.params:
                record["params"] = work.results.params.pop(version)
        done = list(work.records.items())
        self.index.commit(
            files=[(v, {**r, "complete": True}) for v, r in done],
            paths=list(work.paths.items()),
            touched=self._take_touched(),
            digests=self._merged_digests(work.results.digests),
            segments=[(work.number, end, record) for end, record in work.results.segments],
        )
        for _, record in done:
            record["complete"] = True
        work.records, work.ends, work.paths = {}, {}, {}
        work.results.digests, work.results.segments = [], []

    def _finish(self) -> None:
        """After the walk: seal the last bin with a snapshot if anything changed, and settle bin statuses."""
        self._drain()  # every bin a worker seals is committed before the last one, here
        self._settle_last_bin()
        self._flush_touched()
        self._keep_skipped()
        self._drop_unseen()
        tree = self.tree
        live_files, live_bytes = tree.live_files, tree.live_bytes
        if not self.dirty:
            if self.bin is not None and not self.bin.is_empty:
                self._seal()  # cannot happen without a change, but never drop laid-out data
            return
        snapshot_bins = self._seal_snapshot(tree)
        updates = []
        for result in self.index.all_bins():
            number = result["bin"]
            files = result.get("files", 0)
            current = number in live_files or number in snapshot_bins
            fields = {
                "status": "current" if current else "retired",
                "live_files": live_files.get(number, 0),
                "live_bytes": live_bytes.get(number, 0),
                "regenerable": live_files.get(number, 0) == files,
                "snapshot_only": number in snapshot_bins and files == 0,
            }
            if result.get("status") != "retired" and not current:
                self.report.retired_bins.append(number)
            if any(result.get(k) != v for k, v in fields.items()):
                updates.append((number, fields))
        self.dirty = False
        self.index.commit(bin_updates=updates, meta=[(b"scan", self._state("scanning"))])

    def _finish_plan(self) -> None:
        """The planning pass's end: where the snapshot would go (if the scan would seal one)."""
        if not self.dirty and not self.index_is_new:
            self.dirty = self._paths_vanished()
        if self.dirty:
            self.plan_result.snapshot_bins = sorted(self._seal_snapshot(self.tree))
        elif self.bin is not None and not self.bin.is_empty:
            self._seal()

    def _paths_vanished(self) -> bool:
        """Planning: are there indexed paths the walk did not meet (deletions, which make a snapshot)?"""
        with self.index.env.begin() as txn:
            indexed = txn.stat(self.index.paths)["entries"]
        return indexed > self.seen_indexed

    def _seal_snapshot(self, tree: _TreeSpill) -> set[int]:
        """Lay the snapshot out after whatever the last bin holds, in parts over new bins if it must."""
        snapshot_id = self.next_snapshot
        entries_size, totals, live, time_ns = tree.size, tree.totals, set(tree.live_files), tree.newest
        header = snapshot.encode_header(self.dataset, snapshot_id, time_ns)
        # Which bins the snapshot needs depends on where it lands, so the trailer is bounded with the
        # widest bin numbers and then padded to exactly that bound: the plan never moves.
        parts_bound = 2 + (len(header) + entries_size + 10 * len(live)) // CHUNK_SIZE
        widest_bins = sorted(live) + [2**32 - 1] * parts_bound
        trailer_size = len(_padded_trailer(totals, widest_bins, [2**32 - 1] * parts_bound, 0))
        plain_size = len(header) + entries_size + trailer_size
        # With hidden names the body is stored as one encrypted stream (the listing is the tree's names),
        # cut into parts like the clear one; `size` is then the stream's.
        size = self.cipher.stream_size(plain_size) if self.hide_names else plain_size
        stored_name = snapshot.NAME + (self.cipher.suffix.encode() if self.hide_names else b"")
        extra = snapshot.descriptor_bound()
        widest_name = stored_name + b"x" * PART_SUFFIX_MAX
        if self.bin is None:
            self._new_bin(here=True)
        room = self.bin.budget.max_meta_bytes(widest_name, size, extra)
        if room < size and not self.bin.is_empty:
            self._seal()  # it does not fit beside the data: start it in a bin of its own
            self._new_bin(here=True)
            room = self.bin.budget.max_meta_bytes(widest_name, size, extra)
        if room == 0:
            raise UsageError(
                f"bin size {self.bin_size} is too small to hold the data-set snapshot; use a larger --bin-size"
            )
        # Later parts go to fresh bins, which have at least the room this one has.
        plan = [(self.bin.number, room)]
        while sum(length for _, length in plan) < size:
            plan.append((plan[-1][0] + 1, min(room, size - sum(length for _, length in plan))))
        if len(plan) > parts_bound:
            raise AssertionError(f"snapshot needs {len(plan)} parts, bounded by {parts_bound}")
        snapshot_bins = [number for number, _ in plan]
        if self.dry:
            for part, (number, length) in enumerate(plan, 1):
                if self.bin is None:
                    self._new_bin()
                self.bin.add_meta_file(stored_name + part_suffix(part, len(plan)), length, extra)
                self._seal()
            return set(snapshot_bins)
        trailer = _padded_trailer(totals, sorted(live | set(snapshot_bins)), snapshot_bins, trailer_size)
        pieces = itertools.chain([header], tree.pieces(), [trailer])
        if self.hide_names:
            # a seed from this run's fresh run seed: the stream is sealed once, its blocks kept in the index
            encryptor = self.cipher.new_file(plain_size, self.secret, seed=snapshot_seed(self.ctx.run_seed, snapshot_id))
            pieces = _encrypted(encryptor, pieces)
        body = _SnapshotBody(size, pieces)
        offset = 0
        for part, (number, length) in enumerate(plan, 1):
            if self.bin is None:
                self._new_bin(here=True)
            if self.bin.number != number:
                raise AssertionError(f"snapshot part {part} planned for bin {number}, laid out in {self.bin.number}")
            name = stored_name + part_suffix(part, len(plan))
            self.bin.add_meta_file(name, length, extra)

            def describe(cid: bytes, part=part, offset=offset, length=length) -> dict:
                return snapshot.descriptor(snapshot_id, time_ns, totals, size, part, len(plan), offset, length, cid)

            self.work.sealer.meta_file(name, body.take(length), length, extra, describe)
            offset += length
            if part == len(plan):
                self.next_snapshot = snapshot_id + 1
            self._seal()
        body.close()
        self.report.snapshot = {"id": snapshot_id, "time_ns": time_ns, **totals, "bins": snapshot_bins}
        log.info(
            "sealed snapshot %d in bin%s %s: %d entries, %d files, %d bytes",
            snapshot_id, "s" if len(plan) > 1 else "", ", ".join(map(str, snapshot_bins)),
            totals["entries"], totals["files"], totals["bytes"],
        )
        return set(snapshot_bins)


def _plain_share(plain_size: int, stream_size: int, first_leaf: int, end_leaf: int) -> int:
    """The plaintext bytes that leaves [first_leaf, end_leaf) of a stream stand for, in proportion;
    over a file's parts the shares add up to its size exactly."""
    if not stream_size:
        return 0
    start = min(stream_size, first_leaf * CHUNK_SIZE)
    end = min(stream_size, end_leaf * CHUNK_SIZE)
    return end * plain_size // stream_size - start * plain_size // stream_size


def _plan_row(plan_bin: PlanBin) -> dict:
    bound = plan_bin.car_bound()
    return {
        "bin": plan_bin.number,
        "entries": plan_bin.entries,
        "file_parts": plan_bin.file_parts,
        "stream_bytes": plan_bin.stream_bytes,
        "car_bound": bound,
        "piece_size": padded_size(bound),
        "first": plan_bin.first,
        "last": plan_bin.last,
        "continues": plan_bin.continues,
    }


class _SnapshotBody:
    """The snapshot's stored bytes (header, the spilled entries, trailer; encrypted with hidden names),
    handed out part by part."""

    def __init__(self, size: int, pieces: Iterator[bytes]):
        self.pieces = pieces
        self.buffer = bytearray()
        self.size = size
        self.handed = 0

    def take(self, length: int) -> Iterator[bytes]:
        while length:
            while not self.buffer:
                try:
                    self.buffer += next(self.pieces)
                except StopIteration:
                    raise AssertionError("the snapshot ended before its planned size") from None
            piece = bytes(self.buffer[:length])
            del self.buffer[: len(piece)]
            length -= len(piece)
            self.handed += len(piece)
            yield piece

    def close(self) -> None:
        rest = b"".join(self.pieces) + bytes(self.buffer)
        if rest or self.handed != self.size:
            raise AssertionError("the snapshot's size changed while it was written")


def _encrypted(encryptor, pieces: Iterator[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield encryptor.update(piece)
    yield encryptor.finish()


def _padded_trailer(totals: dict, bins: list[int], snapshot_bins: list[int], size: int) -> bytes:
    """The trailer, padded to exactly `size` bytes (0: unpadded)."""
    plain = snapshot.encode_trailer(totals["entries"], totals["files"], totals["bytes"], bins, snapshot_bins)
    if not size:
        return plain
    # A pad field's head grows in steps, so some totals need a longer key to be reached exactly.
    for key in ("pad", "pad_", "pad__", "pad___", "pad____"):
        for n in range(max(0, size - len(plain) - 16), size - len(plain) + 1):
            trailer = snapshot.cbor.encode(
                {**snapshot.cbor.decode(plain), key: bytes(n)}
            )
            if len(trailer) == size:
                return trailer
    raise AssertionError(f"cannot pad the snapshot trailer to {size} bytes")


def _is_ancestor(dir_path: bytes, path: bytes) -> bool:
    return dir_path == b"" or path.startswith(dir_path + b"/")
