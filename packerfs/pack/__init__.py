"""Pack side: scan a source into the index, then serve or write its bins."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from packerfs.crypt import load_or_create_dataset_secret
from packerfs.compress.zstd import compressor_id
from packerfs.crypt.base import Cipher
from packerfs.errors import UsageError
from packerfs.index import Index
from packerfs.pack.reader import BinReader
from packerfs.pack.scan import Plan, Scan, ScanReport
from packerfs.ipld import car
from packerfs.pack.writer import already_written, bin_status, car_name, write_car, write_manifests
from packerfs.source import Source, open_source, source_key

__all__ = ["Engine", "WriteReport", "default_state_dir", "car_name"]

log = logging.getLogger("packerfs.pack")


@dataclass
class WriteReport:
    written: list[str] = field(default_factory=list)  # CAR paths, current bins
    retired: list[int] = field(default_factory=list)  # not written: the newest snapshot needs nothing in them
    unavailable: list[int] = field(default_factory=list)  # needed, not in OUT, and no longer generable


def default_state_dir(source: str) -> str:
    """Under the user's cache directory, keyed by the source's real path or URL."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.fsencode(source_key(source))).hexdigest()[:16]
    return os.path.join(base, "packerfs", key)


@dataclass
class Engine:
    """A source, its state directory and the options it was packed with."""

    source: Source
    state_dir: str
    cipher: Cipher
    bin_size: int
    index: Index
    secret: bytes
    # Source-relative paths the scan leaves out: packerfs's own state, output and mount point when
    # they lie inside the source (see exclude()).
    excluded: set[bytes] = field(default_factory=set)
    source_options: dict | None = None  # the file-system options SRC was opened with (for Dask workers)
    hide_names: bool = False  # --hide-names (packerfs.privacy): fixed for the state's life
    compress: int | None = None  # --compress zstd:LEVEL (packerfs.compress), fixed for the state's life
    pad_sizes: bool = False  # --pad-sizes, fixed for the state's life

    @classmethod
    def open(
        cls, spec: str, state_dir: str | None, cipher: Cipher, bin_size: int, source_options: dict | None = None,
        hide_names: bool | None = False, compress: int | None = None, pad_sizes: bool = False,
    ) -> "Engine":
        """SRC (a directory or an object-store URL, with its file-system options) and its state.

        `hide_names`: True or False, or None for the default: what the state was made with, and for a
        new state, hidden for an encrypted pack. A state keeps its choice (IndexMismatch otherwise),
        as it keeps `compress` (a zstd level, or None) and `pad_sizes`."""
        source = open_source(spec, source_options)
        try:
            state_dir = os.path.abspath(state_dir or default_state_dir(spec))
            excluded = source.excluded(("state directory", state_dir))  # refuses SRC inside STATE
        except BaseException:
            source.close()
            raise
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        secret = load_or_create_dataset_secret(state_dir)
        index = Index(state_dir)
        try:
            if hide_names is None:
                made = index.get_meta(b"identity")
                hide_names = made.get("names") == "hidden" if made is not None else cipher.name != "plain"
            identity = {
                "source": source.url,
                "bin_size": bin_size,
                "cipher": cipher.name,
                "recipients": sorted(cipher.recipients),
            }
            if hide_names:  # absent for names in clear, as in states made before the option existed
                if cipher.name == "plain":
                    raise UsageError(
                        "--hide-names needs encryption (-r, -R or --gpg-recipient): the real names go into an "
                        "encrypted manifest"
                    )
                identity["names"] = "hidden"
            if compress is not None:
                identity["compress"] = f"zstd:{compress}"
            if pad_sizes:
                identity["pad"] = "padme"
            index.bind(identity)
            if compress is not None and index.get_meta(b"compressor") is None:
                # what regenerating the compressed streams will depend on (checked then: compress.zstd)
                index.commit(meta=[(b"compressor", compressor_id(compress))])
        except BaseException:
            index.close()
            source.close()
            raise
        return cls(
            source, state_dir, cipher, bin_size, index, secret, excluded, source_options, hide_names, compress, pad_sizes
        )

    def exclude(self, *others) -> None:
        """Leave these directories (paths, or (what, path) pairs) out of the scan if they lie inside
        the source; UsageError if one is the source or contains it. Real paths are taken now: for a
        mount point, call this before mounting (afterwards its stat is the mount's)."""
        self.excluded |= self.source.excluded(*others)

    def scan(
        self,
        *,
        skip_unreadable: bool = False,
        advance: Callable[[int], None] | None = None,
        on_seal: Callable[[dict], None] | None = None,
        car_dir: str | None = None,
        repack_below: float | None = None,
        pool=None,
        pool_factory=None,
    ) -> ScanReport:
        """Scan the source into the index; with `car_dir` (a directory, or a packerfs.pack.writer.CarOutput
        such as a bucket), write each new bin's CAR there as it is laid out.

        `pool`: a packerfs.pack.parallel pool sealing bins on Dask workers (None: in this process), or
        `pool_factory(plan)` making one once the plan is known (see packerfs.commands.options).

        The state directory, `car_dir` and anything added with exclude() are left out of the scan when
        they lie inside the source (one warning names them); `car_dir` being the source or containing
        it is a UsageError.
        """
        excluded = set(self.excluded)
        if isinstance(car_dir, (str, os.PathLike)):  # a bucket output lies in no source, needs no creating
            excluded |= self.source.excluded(("output directory", car_dir))
            os.makedirs(car_dir, exist_ok=True)
        if excluded:
            log.warning(
                "%s: left out of the scan (packerfs's own state, output or mount point inside the source)",
                ", ".join(self.source.display(p) for p in sorted(excluded)),
            )
        return Scan(
            self.source, self.index, self.cipher, self.secret, self.bin_size,
            skip_unreadable=skip_unreadable, advance=advance, on_seal=on_seal, car_dir=car_dir,
            repack_below=repack_below, exclude=excluded, source_options=self.source_options, pool=pool,
            pool_factory=pool_factory, **self._coding_options(),
        ).run()

    def plan(
        self, *, skip_unreadable: bool = False, repack_below: float | None = None, files: bool = False
    ) -> tuple[Plan, list]:
        """What a scan would do now, from metadata alone: (plan, source problems). Nothing is read or written.

        `files`: also list each file's and symlink's bins (Plan.files_assigned)."""
        planner = Scan(
            self.source, self.index, self.cipher, self.secret, self.bin_size,
            skip_unreadable=skip_unreadable, repack_below=repack_below, exclude=set(self.excluded),
            dry=True, check_seams=False, **self._coding_options(),
        )
        if files:
            planner.plan_result.files_assigned = []
        plan = planner.plan()
        return plan, planner.report.problems

    def _coding_options(self) -> dict:
        return {"hide_names": self.hide_names, "compress": self.compress, "pad_sizes": self.pad_sizes}

    def reader(self) -> BinReader:
        return BinReader(self.index, self.source, self.cipher, self.secret)

    def bins(self) -> list[dict]:
        return sorted(self.index.all_bins(), key=lambda b: b["bin"])

    def write(self, out_dir: str, advance: Callable[[int], None] = lambda n: None) -> WriteReport:
        """Write every current bin's CAR and the manifests.

        Retired bins (nothing in them is used by the newest snapshot) are not written; a copy
        an earlier run left in OUT stays. A current bin that can no longer be generated (it also
        holds data that has since changed or been deleted) is kept if an earlier run wrote it,
        and otherwise reported as unavailable: its live files are only in that earlier copy
        until a pack with --repack-below moves them.
        """
        os.makedirs(out_dir, exist_ok=True)
        reader = self.reader()
        report = WriteReport()
        listed = []  # manifest.csv lists the CARs in OUT, each with its status
        for result in self.bins():
            path = os.path.join(out_dir, car_name(result["bin"]))
            present = already_written(path, result["car_size"], car.header(result["root"]))
            if bin_status(result) == "retired":
                report.retired.append(result["bin"])
                if present:
                    listed.append(result)
                continue
            if present or result.get("regenerable", True):
                report.written.append(write_car(reader, result["bin"], out_dir, advance))
                listed.append(result)
            else:
                report.unavailable.append(result["bin"])
        write_manifests(listed, out_dir)
        return report

    def close(self) -> None:
        self.index.close()
        self.source.close()
