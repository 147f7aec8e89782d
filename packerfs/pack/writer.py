"""The batch `pack` writer and the manifest files deal tools read.

CARs are written through BinReader (the same bytes the mount serves) to a
temporary name, synced, checked for length, then renamed: a CAR that exists
under its final name is complete.

OUT may also be an object-store prefix (s3://, gs://, az://; see
packerfs.source.upload): each CAR is then uploaded in parts and exists under its
name only once complete; the manifests follow.

During the scan, each bin sealed in this process writes its CAR as it is laid
out (one read of the source) to a CarOutput: a DirectoryOutput (OUT/bin-N.car.partial,
renamed once the bin's index commit is done) or a StoreOutput (an S3 or Azure
upload, completed at that same point). Bins sealed on Dask workers are written
there the same way, by the worker (a directory OUT they share, or an upload the
coordinator completes after the index commit). The bins sealed by an earlier run
and every gs:// CAR (a GCS resumable upload takes its bytes in order, and the
header is known only at the seal) are uploaded after the scan by upload_cars,
generated again from the index (BinReader: the source is read again for them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Collection

from packerfs.errors import PackerfsError
from packerfs.pack.reader import BinReader
from packerfs.ipld import car

if TYPE_CHECKING:
    from packerfs.pack import Engine
    from packerfs.source.upload import ObjectStore, ObjectWriter

CSV_COLUMNS = ["car_file", "piece_cid", "piece_size", "payload_cid", "car_size", "piece_cid_v2", "status"]


def bin_status(result: dict) -> str:
    """"current" while the newest snapshot uses anything in the bin, then "retired"."""
    return result.get("status", "current")


def car_name(number: int) -> str:
    return f"bin-{number:06d}.car"


CAR_NAME = re.compile(r"bin-[0-9]{6,}\.car")


def is_output_name(name: str) -> bool:
    """A name pack writes in OUT: a CAR or a manifest."""
    return name in MANIFESTS or CAR_NAME.fullmatch(name) is not None


class CarOutput:
    """Where the scan writes each new bin's CAR as it lays it out (packerfs.pack.scan).

    sink(number) is the BinLayout sink for a bin sealed in this process (write, pwrite, close);
    commit() makes the CAR appear under its final name and runs only after the bin's index commit,
    so a CAR under its final name is always a sealed bin's; discard() drops an abandoned one."""

    def worker_path(self, number: int) -> str | None:
        """Where a Dask worker (or the collecting coordinator) writes the CAR of a bin sealed there;
        None: such bins are not written during the scan."""
        return None

    def worker_upload(self, number: int) -> tuple | None:
        """What a Dask worker sealing bin `number` uploads its CAR with: (store spec, options, object
        name), or None: the worker writes to worker_path(), or nothing."""
        return None

    def attach(self, number: int, detached: dict):
        """The sink of a CAR a worker uploaded and closed (ObjectWriter.detach()), to commit() here."""
        raise AssertionError(f"bin {number}: this output takes no uploads from workers")

    def sink(self, number: int, partial: str | None):
        raise NotImplementedError

    def commit(self, number: int, partial: str | None, sink) -> None:
        raise NotImplementedError

    def discard(self, number: int, sink, *, laid_out: bool = True) -> None:
        """Drop the CAR of a bin that will not be committed (`laid_out`: its sink went to a BinLayout,
        which is abandoned right after this)."""


class DirectoryOutput(CarOutput):
    """OUT/bin-N.car.partial while the bin is laid out (here or on a worker sharing OUT), renamed."""

    def __init__(self, path: str):
        self.path = path

    def worker_path(self, number: int) -> str:
        return os.path.join(self.path, car_name(number) + ".partial")

    def sink(self, number: int, partial: str | None):
        from packerfs.pack.seal import SyncingFile

        return SyncingFile(partial)

    def commit(self, number: int, partial: str | None, sink) -> None:
        if partial is not None:
            os.replace(partial, partial[: -len(".partial")])

    def discard(self, number: int, sink, *, laid_out: bool = True) -> None:
        if laid_out:
            return  # BinLayout.abandon closes and unlinks the partial file, once its writer thread stopped
        try:
            sink.close()
        finally:
            try:
                os.unlink(sink.name)
            except FileNotFoundError:
                pass


class StoreOutput(CarOutput):
    """An S3 or Azure prefix: each CAR is uploaded as it is laid out (source.upload.ObjectWriter), in
    this process or on the Dask worker sealing its bin, and completed at commit(), here, after the
    bin's index commit."""

    def __init__(self, store: "ObjectStore"):
        if not store.streams_during_scan:
            raise AssertionError(f"{store.url}: uploads to this store are sent in order; use upload_cars")
        self.store = store
        self.uploaded: list[int] = []  # bins whose CAR this run uploaded during the scan

    def sink(self, number: int, partial: str | None) -> "ObjectWriter":
        return self.store.writer(car_name(number))

    def worker_upload(self, number: int) -> tuple:
        return self.store.spec, self.store.options, car_name(number)

    def attach(self, number: int, detached: dict) -> "ObjectWriter":
        return self.store.attach(detached)

    def commit(self, number: int, partial: str | None, sink) -> None:
        if sink is not None:
            sink.commit()
            self.uploaded.append(number)

    def discard(self, number: int, sink, *, laid_out: bool = True) -> None:
        if sink is not None:
            sink.abort()  # first: write() on the layout's thread then drops what is still queued


def write_car(reader: BinReader, number: int, out_dir: str, advance: Callable[[int], None] = lambda n: None) -> str:
    final = os.path.join(out_dir, car_name(number))
    expected = reader.size(number)
    if already_written(final, expected, car.header(reader.index.bin(number)["root"])):
        return final  # written by an earlier run (same size and root); `verify` re-checks content
    temp = final + ".partial"
    try:
        with open(temp, "wb") as out:
            for piece in reader.iter_bin(number):
                out.write(piece)
                advance(len(piece))
            out.flush()
            os.fsync(out.fileno())
            written = out.tell()
    except OSError as exc:
        # a full disk: the partial file goes, so nothing half-written remains under any name
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise OSError(exc.errno, exc.strerror, temp) from None
    if written != expected:
        os.unlink(temp)
        raise PackerfsError(f"{temp}: wrote {written} bytes, expected {expected}; nothing was renamed")
    os.replace(temp, final)
    return final


def already_written(path: str, size: int, header: bytes) -> bool:
    """A CAR of this size that names this root is this bin's (a crash never leaves one: see write_car)."""
    try:
        with open(path, "rb") as existing:
            return os.fstat(existing.fileno()).st_size == size and existing.read(len(header)) == header
    except FileNotFoundError:
        return False


def manifest_rows(bins: list[dict]) -> list[dict]:
    """One row per sealed bin; deal tools should take the `current` ones (retired bins are not needed)."""
    return [
        {
            "car_file": car_name(b["bin"]),
            "piece_cid": b["piece_cid"],
            "piece_size": b["piece_size"],
            "payload_cid": b["root_cid"],
            "car_size": b["car_size"],
            "piece_cid_v2": b["piece_cid_v2"],
            "status": bin_status(b),
        }
        for b in sorted(bins, key=lambda b: b["bin"])
    ]


def manifest_csv(bins: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in manifest_rows(bins):
        writer.writerow(row)
    return buffer.getvalue()


def manifest_json(bins: list[dict]) -> str:
    return json.dumps({"cars": manifest_rows(bins)}, indent=1) + "\n"


def write_manifests(bins: list[dict], out_dir: str) -> None:
    for name, text in (("manifest.csv", manifest_csv(bins)), ("manifest.json", manifest_json(bins))):
        path = os.path.join(out_dir, name)
        with open(path + ".partial", "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(path + ".partial", path)


MANIFESTS = ("manifest.csv", "manifest.json")


@dataclass
class UploadReport:
    """What upload_cars did: WriteReport's fields, plus the bins this run uploaded."""

    written: list[str] = field(default_factory=list)  # object URLs, current bins (kept or uploaded)
    retired: list[int] = field(default_factory=list)
    unavailable: list[int] = field(default_factory=list)
    uploaded: list[int] = field(default_factory=list)  # uploaded by this run (the others were kept)


def upload_cars(
    engine: "Engine", store: "ObjectStore", advance: Callable[[int], None] = lambda n: None, *,
    uploaded: Collection[int] = (), clean: bool = True,
) -> UploadReport:
    """Engine.write for an object-store OUT: every current bin's CAR, then the manifests.

    The same rules as for a directory: retired bins are not uploaded (an earlier copy stays and is
    listed); a current bin that can no longer be generated is kept if present, else unavailable. An
    object of the CAR's size whose header names the bin's root is kept, not uploaded again.
    `uploaded`: bins this run already uploaded during the scan (StoreOutput), reported as uploaded
    without another look. `clean`: first abort what an interrupted run left unfinished (False: the
    caller did, before the scan).
    """
    reader = engine.reader()
    report = UploadReport()
    listed = []
    bins = engine.bins()
    if clean:
        # what an interrupted run left unfinished (S3 multipart uploads) goes before anything is written
        store.clean([car_name(b["bin"]) for b in bins] + list(MANIFESTS))
    for result in bins:
        name = car_name(result["bin"])
        if result["bin"] in uploaded:
            report.uploaded.append(result["bin"])
            present = True
        else:
            present = store.existing(name, result["car_size"], car.header(result["root"]))
        if bin_status(result) == "retired":
            report.retired.append(result["bin"])
            if present:
                listed.append(result)
            continue
        if present:
            # this run's (during the scan), or an earlier run's; `verify` re-checks content
            report.written.append(store.object_url(name))
            listed.append(result)
        elif result.get("regenerable", True):
            expected = reader.size(result["bin"])
            report.written.append(store.upload(name, reader.iter_bin(result["bin"]), expected, advance))
            report.uploaded.append(result["bin"])
            listed.append(result)
        else:
            report.unavailable.append(result["bin"])
    upload_manifests(listed, store)
    return report


def upload_manifests(bins: list[dict], store: "ObjectStore") -> None:
    """manifest.csv and manifest.json, after the CARs (an identical one already there is kept)."""
    for name, text in zip(MANIFESTS, (manifest_csv(bins), manifest_json(bins))):
        data = text.encode()
        if store.read_small(name, len(data)) != data:
            store.put(name, data)
