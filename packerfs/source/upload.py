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

Completeness: an object exists under its name only once its upload is complete (the multipart
complete, the block list commit, the resumable session's last chunk), so a killed pack leaves no
half-written object; the next run keeps every object whose size and CAR header (the payload root)
match, and uploads the others. Memory is bounded: a part of PART_SIZE bytes is filled while at most
`parts_in_flight` earlier parts are being sent.

Every request is retried while the store throttles or cannot be reached (objects.RETRY_SECONDS,
jittered exponential backoff), and every failure ends in one line naming the object's URL and, for
a part, its number and offset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections import deque
from typing import Callable, Iterable

from packerfs.errors import PackerfsError, UsageError
from packerfs.source import objects
from packerfs.source.objects import (
    BUCKET_MISSING, CHANGED, DENIED, MISSING, RETRIED, THROTTLED, UNREACHABLE, Failure, ObjectUrl, parse_url,
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
        deadline = time.monotonic() + objects.RETRY_SECONDS
        attempt = 0
        while True:
            try:
                return await asyncio.wait_for(fn(*args), objects.REQUEST_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # classified below: nothing of the SDK's escapes unworded
                failure = self._classify(exc)
                attempt += 1
                if failure.kind in RETRIED and time.monotonic() < deadline:
                    delay = min(5.0, 0.1 * 2 ** min(attempt, 10)) * (0.5 + random.random())
                    log.info("%s: %s (%s); retrying in %.1f s", self._where(key, part, offset), what, failure.text, delay)
                    await asyncio.sleep(delay)
                    continue
                raise self._error(failure, what, key, part, offset, attempt) from None

    def _classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, asyncio.TimeoutError):
            return Failure(UNREACHABLE, f"no answer in {objects.REQUEST_TIMEOUT:.0f} s")
        try:
            return self.backend.classify(exc)
        except Exception:
            return Failure(objects.OTHER, f"{type(exc).__name__}: {exc}")

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

    def clean(self, names: Iterable[str]) -> int:
        """Abandon unfinished uploads (of an interrupted run) to these names: how many were dropped.

        Only where the store keeps them and they are cheap to find (S3 multipart uploads: one listing
        of the prefix). Azure's uncommitted blocks are discarded by the next commit of the name (or
        after a week), GCS resumable sessions expire after a week; neither is ever visible as an object."""
        keys = {self.key(name) for name in names}
        prefix = self.parsed.prefix + "/" if self.parsed.prefix else ""
        try:
            stale = self.call(self.backend.stale_uploads, prefix, what="list unfinished uploads", key=prefix or None)
        except UploadError as exc:
            log.warning("%s; unfinished uploads of an earlier run (if any) are left to the store", exc)
            return 0
        dropped = 0
        for key, handle in stale:
            if key in keys:
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
            log.info("%s: could not abort the unfinished upload (%s)", self._where(key), self._classify(exc).text)

    # ---------------------------------------------------------------- writing

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
            exc.args = (f"{exc}; {name} was not completed (nothing of this upload is left under its name)",)
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
