"""Writing objects to an object store: `pack SRC s3://…|gs://…|az://…` (CARs and manifests).

The destination is a URL prefix parsed and configured exactly as an object-store source is
(packerfs.source.objects: parse_url, the SDKs' environment, -o options); the store-specific
requests are methods of the same backends (s3.py, azure.py, gcs.py):

    upload_start(key, size, content_type) -> handle   (S3 CreateMultipartUpload; GCS starts a
                                                       resumable session; Azure sends nothing)
    prepare_part(handle, data) -> prepared             (in the producing thread, once per part, in
                                                       order: checksums)
    upload_part(key, handle, number, offset, data, total, prepared) -> token
                                                      (S3 UploadPart; Azure Put Block; GCS one chunk;
                                                       `total` is given with the last part only)
    upload_complete(key, handle, tokens)              (S3 CompleteMultipartUpload; Azure Put Block
                                                       List; GCS: the last chunk already completed it)
    upload_abort(key, handle)                         (S3 AbortMultipartUpload; GCS cancels the session)
    head(key, length) -> (size, first bytes) | None   (a ranged read: the keep check)
    stale_uploads(prefix) -> [(key, handle)]          (S3: unfinished multipart uploads to clean)
    parts_in_flight                                   (2; GCS chunks go one after another: 1)
    parts_any_order                                   (S3, Azure: parts may go in any order, they are
                                                       assembled by number / block list; GCS: absent)

Two ways in. upload(name, pieces, size) sends bytes generated in order (a CAR regenerated from the
index, a manifest). writer(name) is the sink a CAR is laid out into during the scan (packerfs.pack.scan:
one read of the source): the CAR's header, which names its root, is known only at the seal, so the
writer holds the first part in memory, sends the later ones as they fill, and sends the first (with
the header fixed up by pwrite) last; commit() makes the object appear, after the bin's index commit.
That takes parts_any_order (S3, Azure); a GCS resumable upload takes its bytes in order, so gs://
CARs are uploaded after the scan, generated again from the index.

Completeness: an object exists under its name only once its upload is complete (the multipart
complete, the block list commit, the resumable session's last chunk), so a killed pack leaves no
half-written object; the next run keeps every object whose size and CAR header (the payload root)
match, and uploads the others. Memory is bounded: a part of PART_SIZE bytes is filled while at most
`parts_in_flight` earlier parts are being sent (and a writer holds its first part).

Every request is retried while the store throttles or cannot be reached (objects.RETRY_SECONDS,
jittered exponential backoff), and every failure ends in one line naming the object's URL and, for
a part, its number and offset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from typing import Callable, Iterable

from packerfs.errors import PackerfsError, UsageError
from packerfs.source import objects
from packerfs.source.objects import (
    BUCKET_MISSING, CHANGED, DENIED, MISSING, THROTTLED, UNREACHABLE, Failure, ObjectUrl, parse_url,
)

log = logging.getLogger("packerfs.upload")

PART_SIZE = 8 << 20  # S3 needs >= 5 MiB per part but the last, at most 10,000 parts (80 GiB > the largest bin)
ABORT_TIMEOUT = 10.0  # abandoning an upload after a failure is best effort, never retried for long

CONTENT_TYPES = {".car": "application/vnd.ipld.car", ".csv": "text/csv", ".json": "application/json"}


class UploadError(PackerfsError):
    """An object could not be written; the message names its URL (and the part and offset)."""


def content_type(name: str) -> str:
    for suffix, kind in CONTENT_TYPES.items():
        if name.endswith(suffix):
            return kind
    return "application/octet-stream"


class ObjectStore:
    """A prefix of a bucket that objects are written under, e.g. s3://BUCKET/cars."""

    def __init__(self, spec: str, options: dict[str, str] | None = None):
        self.spec, self.options = spec, dict(options or {})  # what a Dask worker opens the same store with
        self.parsed: ObjectUrl = parse_url(spec)
        self.url = self.parsed.url
        values = {key: objects.parse_option_value(value) for key, value in (options or {}).items()}
        try:
            self.backend = objects._backend(self.parsed, values)
        except ImportError as exc:
            raise UsageError(f"{self.url}: the file system for {self.parsed.scheme}:// is not installed ({exc})") from None
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{self.url}: cannot set up the file system: {exc}") from None

    def open(self) -> "ObjectStore":
        """Check the bucket now (missing, 403), before anything is packed."""
        try:
            self.call(self.backend.check, what="list the bucket")
        except BaseException:
            self.close()
            raise
        return self

    # ---------------------------------------------------------------- names

    def key(self, name: str) -> str:
        return f"{self.parsed.prefix}/{name}" if self.parsed.prefix else name

    def object_url(self, name: str) -> str:
        return f"{self.parsed.scheme}://{self.parsed.bucket}/{self.key(name)}"

    def _where(self, key: str | None, part: int | None = None, offset: int | None = None) -> str:
        shown = f"{self.parsed.scheme}://{self.parsed.bucket}/{key}" if key is not None else self.url
        if part is not None:
            shown += f" (part {part}" + (f", offset {offset})" if offset is not None else ")")
        elif offset is not None:
            shown += f" (offset {offset})"
        return shown

    # ---------------------------------------------------------------- requests

    def call(self, fn, *args, what: str, key: str | None = None, part: int | None = None, offset: int | None = None):
        return self.submit(fn, *args, what=what, key=key, part=part, offset=offset).result()

    def submit(self, fn, *args, what: str, key: str | None = None, part: int | None = None,
               offset: int | None = None) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._retrying(fn, args, what, key, part, offset), self.backend.loop)

    async def _retrying(self, fn, args, what: str, key, part, offset):
        return await objects.retrying(
            self.backend, fn, args, what=what, where=lambda: self._where(key, part, offset),
            error=lambda failure, attempts: self._error(failure, what, key, part, offset, attempts),
        )

    def _error(self, failure: Failure, what: str, key, part, offset, attempts: int) -> UploadError:
        where = self._where(key, part, offset)
        seconds = objects.RETRY_SECONDS
        if failure.kind == BUCKET_MISSING:
            return UploadError(
                f"{self.url}: the bucket {self.parsed.bucket!r} does not exist ({failure.text}); "
                f"create it first (packerfs does not create buckets)"
            )
        if failure.kind == DENIED:
            return UploadError(
                f"{where}: access denied ({failure.text}) trying to {what}; check the credentials and the "
                f"bucket's permissions (packing to a bucket lists, reads and writes objects under the prefix)"
            )
        if failure.kind == THROTTLED:
            return UploadError(
                f"{where}: the server kept throttling ({failure.text}) for {seconds:.0f} s ({attempts} attempts) "
                f"trying to {what}; run again later (complete CARs are kept)"
            )
        if failure.kind == UNREACHABLE:
            return UploadError(
                f"{where}: cannot reach the server ({failure.text}) for {seconds:.0f} s trying to {what}; "
                f"run again when it is back (complete CARs are kept)"
            )
        if failure.kind in (MISSING, CHANGED):
            return UploadError(f"{where}: cannot {what}: {failure.text} (was the upload removed meanwhile?)")
        return UploadError(f"{where}: cannot {what}: {failure.text}")

    # ---------------------------------------------------------------- reading back

    def existing(self, name: str, size: int, head: bytes) -> bool:
        """Is there an object `name` of `size` bytes that starts with `head`? (one ranged read)"""
        key = self.key(name)
        found = self.call(self.backend.head, key, len(head), what="read the start of the object", key=key)
        return found is not None and found[0] == size and found[1] == head

    def read_small(self, name: str, size: int) -> bytes | None:
        """The whole of object `name` if it has exactly `size` bytes (for the manifests), else None."""
        key = self.key(name)
        found = self.call(self.backend.head, key, size, what="read the object", key=key)
        if found is None or found[0] != size:
            return None
        return found[1]

    def clean(self, names: Iterable[str] | Callable[[str], bool]) -> int:
        """Abandon unfinished uploads (of an interrupted run) to these names, or to every name directly
        under the prefix that `names(name)` accepts: how many were dropped.

        Only where the store keeps them and they are cheap to find (S3 multipart uploads: one listing
        of the prefix). Azure's uncommitted blocks are discarded by the next commit of the name (or
        after a week), GCS resumable sessions expire after a week; neither is ever visible as an object."""
        prefix = self.parsed.prefix + "/" if self.parsed.prefix else ""
        if callable(names):
            accepts = names

            def ours(key: str) -> bool:
                name = key[len(prefix):]
                return key.startswith(prefix) and "/" not in name and accepts(name)
        else:
            keys = {self.key(name) for name in names}

            def ours(key: str) -> bool:
                return key in keys
        try:
            stale = self.call(self.backend.stale_uploads, prefix, what="list unfinished uploads", key=prefix or None)
        except UploadError as exc:
            log.warning("%s; unfinished uploads of an earlier run (if any) are left to the store", exc)
            return 0
        dropped = 0
        for key, handle in stale:
            if ours(key):
                self._abandon(key, handle)
                dropped += 1
        if dropped:
            log.info("%s: dropped %d unfinished upload(s) of an earlier run", self.url, dropped)
        return dropped

    def _abandon(self, key: str, handle) -> None:
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self.backend.upload_abort(key, handle), ABORT_TIMEOUT), self.backend.loop
        )
        try:
            future.result(ABORT_TIMEOUT + 1)
        except Exception as exc:  # best effort: the store drops or expires them itself
            log.info("%s: could not abort the unfinished upload (%s)", self._where(key), objects.classify(self.backend, exc).text)

    # ---------------------------------------------------------------- writing

    @property
    def streams_during_scan(self) -> bool:
        """Can a CAR be uploaded while the scan lays it out (writer())? Its first part goes last, so
        the store must take parts in any order: S3 and Azure do, a GCS resumable upload does not."""
        return bool(getattr(self.backend, "parts_any_order", False))

    def writer(self, name: str, size_hint: int | None = None) -> "ObjectWriter":
        """A sink for object `name` whose size is not known yet (a CAR being laid out): see ObjectWriter.
        Starts the upload now (S3 CreateMultipartUpload)."""
        if not self.streams_during_scan:
            raise AssertionError(f"{self.url}: this store takes an upload's parts in order only; use upload()")
        return ObjectWriter(self, name, size_hint)

    def attach(self, detached: dict) -> "ObjectWriter":
        """An upload another process wrote and closed (ObjectWriter.detach(): a Dask worker sealed the
        bin), back as a closed ObjectWriter, to commit() or abort() here."""
        return ObjectWriter.attached(self, detached)

    def upload(self, name: str, pieces: Iterable[bytes], size: int, advance: Callable[[int], None] = lambda n: None) -> str:
        """Upload the `size` bytes `pieces` gives as object `name`, in parts of PART_SIZE bytes while
        they are generated; the object appears only once all of it is stored. Its URL."""
        key = self.key(name)
        backend = self.backend
        handle = self.call(backend.upload_start, key, size, content_type(name), what="start the upload", key=key)
        in_flight: deque[tuple[int, int, concurrent.futures.Future]] = deque()
        tokens: list = []
        buffer = bytearray()
        sent = 0  # bytes handed to parts so far
        number = 0
        finished = False

        def wait_oldest() -> None:
            _, length, future = in_flight.popleft()
            tokens.append(future.result())
            advance(length)

        def send(data: bytes, total: int | None) -> None:
            nonlocal sent, number
            while len(in_flight) >= backend.parts_in_flight:
                wait_oldest()
            number += 1
            prepared = backend.prepare_part(handle, data)
            future = self.submit(
                backend.upload_part, key, handle, number, sent, data, total, prepared,
                what=f"upload part {number}", key=key, part=number, offset=sent,
            )
            in_flight.append((number, len(data), future))
            sent += len(data)

        try:
            for piece in pieces:
                buffer += piece
                # a full part goes once more data follows it, so the last part is never empty
                while len(buffer) > PART_SIZE:
                    with memoryview(buffer) as view:
                        data = bytes(view[:PART_SIZE])
                    del buffer[:PART_SIZE]
                    send(data, None)
            total = sent + len(buffer)
            if total != size:
                raise UploadError(
                    f"{self._where(key)}: generated {total} bytes, expected {size}; the upload was abandoned"
                )
            send(bytes(buffer), total)
            buffer = bytearray()
            while in_flight:
                wait_oldest()
            self.call(backend.upload_complete, key, handle, tokens, what="complete the upload", key=key)
            finished = True
        except PackerfsError as exc:
            _not_completed(exc, name)
            raise
        finally:
            if not finished:
                for _, _, future in in_flight:
                    future.cancel()
                self._abandon(key, handle)
        return self.object_url(name)

    def put(self, name: str, data: bytes) -> str:
        """A small object (a manifest), through the same upload path."""
        return self.upload(name, [data], len(data))

    def close(self) -> None:
        self.backend.close()


def _not_completed(exc: PackerfsError, name: str) -> PackerfsError:
    exc.args = (f"{exc}; {name} was not completed (nothing of this upload is left under its name)",)
    return exc


class ObjectWriter:
    """An object uploaded as it is written, of a size known only at the end: the sink a CAR is laid
    out into during the scan (packerfs.plan.layout.BinLayout: write() as bytes are laid out, on the
    layout's writer thread; pwrite() of the header at the seal; close()).

    The first PART_SIZE bytes are held in memory until close(), since pwrite() fixes up the header in
    them; every later part is sent as soon as it is full and more data follows (so the last part is
    never empty), at most `parts_in_flight` at a time, with the checksums upload() sends (S3: SHA-256
    per part and the composite compared after the complete; Azure: Content-MD5 per block). close()
    sends the last part and then the first, and waits for all of them; the object is still absent.
    commit() completes the upload (S3 CompleteMultipartUpload, Azure Put Block List, parts in number
    order): only then does the object appear under its name. abort() drops everything sent (S3
    AbortMultipartUpload; Azure's uncommitted blocks are never visible and are discarded by the next
    commit of the name). Memory: the first part, one filling, `parts_in_flight` being sent.

    After a failure the error (one line, naming the URL, part and offset) is kept: write() drops its
    data (the layout's thread has handed the error on), close() and commit() raise it again.
    """

    # BinLayout.abandon() closes its sink and unlinks sink.name: there is no local file, and unlink("")
    # always finds nothing
    name = ""

    def __init__(self, store: ObjectStore, name: str, size_hint: int | None = None):
        self.store = store
        self.backend = store.backend
        self.object_name = name
        self.key = store.key(name)
        self.handle = store.call(
            self.backend.upload_start, self.key, size_hint or 0, content_type(name), what="start the upload",
            key=self.key,
        )
        self.first = bytearray()  # part 1: [0, PART_SIZE), held until close()
        self.buffer = bytearray()  # the part being filled
        self.size = 0  # bytes written
        self.next_number = 2  # the number the next full part takes
        self.in_flight: deque[tuple[int, concurrent.futures.Future]] = deque()
        self.tokens: dict[int, object] = {}  # part number -> what the complete names it by
        self.state = "open"  # -> closed -> committed (or detached, to commit elsewhere); failed; aborted
        self.error: PackerfsError | None = None
        self.lock = threading.Lock()  # abort() (the scan's thread) against write() (the layout's)

    @property
    def url(self) -> str:
        return self.store.object_url(self.object_name)

    def write(self, data) -> None:
        if self.state != "open":
            return  # failed (the error is on its way) or aborted: nothing more is sent
        try:
            view = memoryview(data)
            if len(self.first) < PART_SIZE:
                take = PART_SIZE - len(self.first)
                self.first += view[:take]
                view = view[take:]
            self.buffer += view
            self.size += len(data)
            # a full part goes once more data follows it, so the last part is never empty
            while len(self.buffer) > PART_SIZE:
                with memoryview(self.buffer) as whole:
                    part = bytes(whole[:PART_SIZE])
                del self.buffer[:PART_SIZE]
                number = self.next_number
                self.next_number += 1
                self._send(number, part, None)
        except PackerfsError as exc:
            raise self._fail(exc) from None

    def pwrite(self, data: bytes, offset: int) -> None:
        """Overwrite bytes already written: only ever the CAR header, inside the first part."""
        if self.error is not None:
            raise self.error
        if self.state != "open":
            raise AssertionError(f"{self.url}: pwrite() after close() or abort()")
        if offset < 0 or offset + len(data) > len(self.first):
            raise AssertionError(f"{self.url}: pwrite() at {offset} for {len(data)} bytes is outside the first part")
        self.first[offset : offset + len(data)] = data

    def close(self) -> None:
        """Send everything written and wait until it is stored; the object does not exist yet (commit())."""
        if self.error is not None:
            raise self.error
        if self.state != "open":
            return  # closed already, or aborted (BinLayout.abandon closes its sink)
        try:
            if self.buffer:  # the last part (the first, when everything fits in it)
                last, self.buffer = bytes(self.buffer), bytearray()
                self._send(self.next_number, last, self.size)
            first, self.first = bytes(self.first), bytearray()
            self._send(1, first, None if self.tokens or self.in_flight else self.size)
            while self.in_flight:
                self._wait_oldest()
        except PackerfsError as exc:
            raise self._fail(exc) from None
        self.state = "closed"

    def commit(self) -> str:
        """Complete the upload: the object appears under its name. Its URL."""
        if self.error is not None:
            raise self.error
        if self.state != "closed":
            raise AssertionError(f"{self.url}: commit() before close()")
        tokens = [self.tokens[number] for number in sorted(self.tokens)]
        try:
            self.store.call(
                self.backend.upload_complete, self.key, self.handle, tokens, what="complete the upload", key=self.key
            )
        except PackerfsError as exc:
            error = self._fail(exc)
            self.abort()
            raise error from None
        self.state = "committed"
        return self.url

    def detach(self) -> dict:
        """After close(): what commit() and abort() need, as plain values, for the process that commits
        the bin (ObjectStore.attach there). This writer is done with."""
        if self.error is not None:
            raise self.error
        if self.state != "closed":
            raise AssertionError(f"{self.url}: detach() before close()")
        self.state = "detached"
        return {"name": self.object_name, "handle": self.handle, "tokens": dict(self.tokens)}

    @classmethod
    def attached(cls, store: ObjectStore, detached: dict) -> "ObjectWriter":
        self = cls.__new__(cls)  # no new upload: this one exists, closed, in another process's name
        self.store, self.backend = store, store.backend
        self.object_name = detached["name"]
        self.key = store.key(self.object_name)
        self.handle = detached["handle"]
        self.tokens = dict(detached["tokens"])
        self.size = self.next_number = 0  # nothing more is written through it
        self.first = self.buffer = bytearray()
        self.in_flight = deque()
        self.error = None
        self.state = "closed"
        self.lock = threading.Lock()
        return self

    def abort(self) -> None:
        """Drop the upload (best effort, never retried for long): nothing appears under the name."""
        with self.lock:
            if self.state in ("committed", "aborted"):
                return
            self.state = "aborted"
            pending, self.in_flight = list(self.in_flight), deque()
        self.first = self.buffer = bytearray()
        for _, future in pending:
            future.cancel()
        self.store._abandon(self.key, self.handle)

    # ------------------------------------------------------------ parts

    def _send(self, number: int, data: bytes, total: int | None) -> None:
        while len(self.in_flight) >= self.backend.parts_in_flight:
            self._wait_oldest()
        offset = (number - 1) * PART_SIZE
        prepared = self.backend.prepare_part(self.handle, data)
        with self.lock:
            if self.state != "open":
                return
            future = self.store.submit(
                self.backend.upload_part, self.key, self.handle, number, offset, data, total, prepared,
                what=f"upload part {number}", key=self.key, part=number, offset=offset,
            )
            self.in_flight.append((number, future))

    def _wait_oldest(self) -> None:
        with self.lock:
            if not self.in_flight:
                return
            number, future = self.in_flight.popleft()
        try:
            self.tokens[number] = future.result()
        except concurrent.futures.CancelledError:
            if self.state != "aborted":
                raise

    def _fail(self, exc: PackerfsError) -> PackerfsError:
        if self.error is None:
            self.error = _not_completed(exc, self.object_name)
        if self.state != "aborted":
            self.state = "failed"
        return self.error
