"""A source tree in an object store: s3://, gs://, az:// (abfs://) BUCKET/PREFIX through fsspec.

Keys under the prefix are paths, "/" separates directories. The tree is listed one directory
level at a time (a delimiter listing: one request per thousand entries, never one per object),
each level sorted by name bytes, so the order is the POSIX walk's canonical one and memory is
bounded by the widest directory, not the bucket. Subdirectory listings are fetched a few ahead.

Objects are files of mode 0644 with their last-modified time; directories are 0755 with the
newest time among their objects (or their folder marker's). A key ending in "/" (a folder
marker) is a directory, empty if nothing lies below it. Keys that cannot be a POSIX path are
problems, never renamed.

Each object's fingerprint is (size, version token, mtime_ns); the token is the strongest the
backend gives (S3 version id, else ETag; GCS generation; Azure ETag), and every read is pinned
to it, so an object overwritten after the listing reads as SourceChanged, never as a mix of two
versions. Reads go through a bounded read-ahead of concurrent ranged GETs across files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pickle
import random
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Iterable, Iterator, NamedTuple

from packerfs.errors import PackerfsError, SourceChanged, SourceUnavailable, UsageError
from packerfs.source.base import Source, SourceFile
from packerfs.source.walk import DIR, FILE, Entry, ScanProblem

log = logging.getLogger("packerfs.source")

FILE_MODE = 0o644
DIR_MODE = 0o755
NAME_MAX = 255
# Read-ahead: blocks of up to BLOCK bytes, at most AHEAD_BYTES fetched but not yet consumed,
# at most CONCURRENCY requests in flight. Small objects are one request each.
BLOCK = 8 << 20
AHEAD_BYTES = 64 << 20
AHEAD_FILES = 512
CONCURRENCY = 16
LISTINGS_AHEAD = 8  # subdirectory listings fetched before the walk reaches them
# How long throttling (503 SlowDown, 429) or an unreachable server is retried before giving up.
RETRY_SECONDS = float(os.environ.get("PACKERFS_RETRY_SECONDS", "60"))
REQUEST_TIMEOUT = 300.0  # one request, however slow, gives up after this

def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, …): exponential from 0.2 s, at most 5 s,
    jittered by ±50% so that many clients throttled at once do not come back at once."""
    return min(5.0, 0.1 * 2 ** min(attempt, 10)) * (0.5 + random.random())


CANONICAL_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}


@dataclass(frozen=True)
class ObjectUrl:
    scheme: str  # s3 | gs | az
    bucket: str  # bucket or container
    prefix: str  # "" or "a/b", no slash at either end
    account: str | None = None  # az: from abfs://container@ACCOUNT.dfs.core.windows.net/…

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, relpath: bytes) -> str:
        rel = relpath.decode("utf-8", "surrogateescape")
        if not self.prefix:
            return rel
        return f"{self.prefix}/{rel}" if rel else self.prefix


def parse_url(spec: str) -> ObjectUrl:
    scheme, _, rest = spec.partition("://")
    canonical = CANONICAL_SCHEMES.get(scheme.lower())
    if canonical is None:
        raise UsageError(f"{spec}: not an object-store URL (s3://, gs://, az:// or abfs://)")
    bucket, _, prefix = rest.partition("/")
    account = None
    if canonical == "az" and "@" in bucket:
        bucket, _, host = bucket.partition("@")
        account = host.split(".", 1)[0] or None
    if not bucket:
        raise UsageError(f"{spec}: no bucket in the URL; write {scheme}://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise UsageError(f"{spec}: the prefix has an empty, '.' or '..' component")
    return ObjectUrl(canonical, bucket, prefix, account)


class ObjectFingerprint(NamedTuple):
    size: int
    token: str  # "v:" S3 version id, "e:" ETag, "g:" GCS generation
    mtime_ns: int


class Listed(NamedTuple):
    """One entry of a one-level listing, as a backend gives it."""

    key: str  # the full key; for a prefix, with its trailing "/"
    is_prefix: bool
    size: int = 0
    token: str = ""
    mtime_ns: int = 0


class Failure(NamedTuple):
    kind: str  # one of the constants below
    text: str  # what the server said, short


CHANGED, MISSING, BUCKET_MISSING, DENIED, THROTTLED, UNREACHABLE, OTHER = (
    "changed", "missing", "bucket-missing", "denied", "throttled", "unreachable", "other",
)
RETRIED = (THROTTLED, UNREACHABLE)


def classify(backend: "Backend", exc: BaseException) -> Failure:
    """What kind of failure a request's exception is (a timeout of ours, else the backend's words)."""
    if isinstance(exc, asyncio.TimeoutError):
        return Failure(UNREACHABLE, f"no answer in {REQUEST_TIMEOUT:.0f} s")
    try:
        return backend.classify(exc)
    except Exception:
        return Failure(OTHER, f"{type(exc).__name__}: {exc}")


async def retrying(backend: "Backend", fn, args, *, what: str, where: Callable[[], str],
                   error: Callable[[Failure, int], BaseException], limit=None):
    """Await backend coroutine fn(*args), each attempt bounded by REQUEST_TIMEOUT, retrying throttling
    and unreachable servers with backoff() for RETRY_SECONDS; any other failure, or the last, is raised
    as error(failure, attempts): nothing of the SDK's escapes unworded. `limit`: an async semaphore."""
    deadline = time.monotonic() + RETRY_SECONDS
    attempt = 0
    while True:
        try:
            if limit is None:
                return await asyncio.wait_for(fn(*args), REQUEST_TIMEOUT)
            async with limit:
                return await asyncio.wait_for(fn(*args), REQUEST_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = classify(backend, exc)
            attempt += 1
            if failure.kind in RETRIED and time.monotonic() < deadline:
                delay = backoff(attempt)
                log.info("%s: %s (%s); retrying in %.1f s", where(), what, failure.text, delay)
                await asyncio.sleep(delay)
                continue
            raise error(failure, attempt) from None


def _quiet_loop_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """What asyncio would print to stderr (a traceback: "Task exception was never retrieved", say, from
    an SDK's request task orphaned when its connection died) goes to the debug log instead: every
    failure that matters is already reported, in one line, by whoever awaited the request."""
    exc = context.get("exception")
    log.debug("event loop: %s%s", context.get("message", "error"), f" ({exc!r})" if exc is not None else "")


class Backend:
    """What one store's SDK does for the source: list one level, read a pinned range, word failures.

    Subclasses live next to this module (s3.py, gcs.py, azure.py); their coroutines run on the
    fsspec file system's event loop."""

    fs = None  # the fsspec file system

    def __init__(self, url: ObjectUrl, options: dict):
        self.url = url

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self.fs.loop
        if loop.get_exception_handler() is not _quiet_loop_errors:
            loop.set_exception_handler(_quiet_loop_errors)
        return loop

    async def list_level(self, prefix: str) -> Iterator[list[Listed]]:
        """Pages of the objects and sub-prefixes directly under `prefix` ("" or ending in "/")."""
        raise NotImplementedError

    async def read(self, key: str, token: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object version `token` names."""
        raise NotImplementedError

    async def check(self) -> None:
        """Fail (as the SDK does) if the bucket is missing or may not be listed."""
        raise NotImplementedError

    def classify(self, exc: BaseException) -> Failure:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _backend(url: ObjectUrl, options: dict) -> Backend:
    if url.scheme == "s3":
        from packerfs.source.s3 import S3Backend as cls
    elif url.scheme == "gs":
        from packerfs.source.gcs import GCSBackend as cls
    else:
        from packerfs.source.azure import AzureBackend as cls
    return cls(url, options)


def parse_option_value(value: str):
    """-o values: JSON where it reads as JSON (true, 3, {"a": 1}), else the string itself."""
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


def open_object_source(spec: str, options: dict[str, str], *, rerun_note: str | None = None) -> "ObjectSource":
    """An ObjectSource on `spec`, its bucket checked. `rerun_note` replaces the end of failure advice
    (a pack's "(sealed bins are kept)")."""
    url = parse_url(spec)
    try:
        backend = _backend(url, {key: parse_option_value(value) for key, value in options.items()})
    except ImportError as exc:
        raise UsageError(f"{url.url}: the file system for {url.scheme}:// is not installed ({exc})") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{url.url}: cannot set up the file system: {exc}") from None
    source = ObjectSource(url, backend)
    if rerun_note is not None:
        source.rerun_note = rerun_note
    try:
        source.call(backend.check, what="list the bucket")
    except BaseException:
        source.close()
        raise
    return source


def _bad_name(name: bytes) -> str | None:
    if name == b"":
        return "an empty path component (two slashes in a row)"
    if name in (b".", b".."):
        return f"a {name.decode()!r} path component"
    if b"\0" in name:
        return "a NUL byte"
    if len(name) > NAME_MAX:
        return f"a name of {len(name)} bytes (at most {NAME_MAX} in a POSIX path)"
    return None


class _Level:
    """One directory's sorted children: name -> ("file", Listed) | ("dir", prefix)."""

    __slots__ = ("path", "names", "children", "mtime_ns", "next", "problems")

    def __init__(self, path: bytes):
        self.path = path
        self.children: dict[bytes, tuple[str, Listed | str]] = {}
        self.names: list[bytes] = []
        self.mtime_ns = 0
        self.next = 0
        self.problems: list[ScanProblem] = []


class ObjectSource(Source):
    # ends the advice in a failure's message: a pack keeps what it sealed; a reader of CARs sets ""
    rerun_note = " (sealed bins are kept)"

    def __init__(self, url: ObjectUrl, backend: Backend):
        self.parsed = url
        self.url = url.url
        self.backend = backend
        self._fetched = 0
        self._fetched_lock = threading.Lock()
        self._kept: tuple[tuple, str] | None = None  # (walk arguments, spill file) of the last kept listing
        self._requests = asyncio.Semaphore(CONCURRENCY)  # only used on the backend's loop
        self.prefetch = _Prefetcher(self)
        # Threads that list subdirectories ahead of the walk: made on first use, by the process
        # that walks (a mount's workers are forked; a pool's threads do not survive a fork).
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _listers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(LISTINGS_AHEAD, thread_name_prefix="packerfs-list")
        return self._pool

    # ---------------------------------------------------------------- calls

    def call(self, fn: Callable[..., Awaitable], *args, what: str, key: str | None = None, offset: int | None = None):
        """Run backend coroutine fn(*args) on its loop, with retries, and word any failure."""
        future = asyncio.run_coroutine_threadsafe(self._retrying(fn, args, what, key, offset), self.backend.loop)
        return future.result()

    def submit(self, fn, *args, what: str, key: str | None = None, offset: int | None = None) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._retrying(fn, args, what, key, offset), self.backend.loop)

    async def _retrying(self, fn, args, what: str, key: str | None, offset: int | None):
        return await retrying(
            self.backend, fn, args, what=what, where=lambda: self._where(key, offset), limit=self._requests,
            error=lambda failure, attempts: self._error(failure, what, key, offset, attempts),
        )

    def _where(self, key: str | None, offset: int | None) -> str:
        shown = f"{self.parsed.scheme}://{self.parsed.bucket}/{key}" if key is not None else self.url
        return shown if offset is None else f"{shown} (offset {offset})"

    def _error(self, failure: Failure, what: str, key: str | None, offset: int | None, attempts: int) -> PackerfsError:
        where = self._where(key, offset)
        path = where if key is not None else None
        if failure.kind in (CHANGED, MISSING) and key is not None:
            shown = self._where(key, None)
            how = "overwritten or deleted" if failure.kind == CHANGED else "gone"
            at = f" at offset {offset}" if offset is not None else ""
            return SourceChanged(
                f"{shown}: source changed since the scan (the version listed is {how}: {failure.text}); "
                f"not read{at}",
                path=shown,
            )
        if failure.kind == BUCKET_MISSING:
            return SourceUnavailable(f"{self.url}: the bucket {self.parsed.bucket!r} does not exist ({failure.text})")
        if failure.kind == DENIED:
            return SourceUnavailable(
                f"{where}: access denied ({failure.text}); check the credentials and the bucket's permissions",
                path=path,
            )
        if failure.kind == THROTTLED:
            return SourceUnavailable(
                f"{where}: the server kept throttling ({failure.text}) for {RETRY_SECONDS:.0f} s "
                f"({attempts} attempts); run again later{self.rerun_note}",
                path=path,
            )
        if failure.kind == UNREACHABLE:
            return SourceUnavailable(
                f"{where}: cannot reach the server ({failure.text}) for {RETRY_SECONDS:.0f} s; "
                f"run again when it is back{self.rerun_note}",
                path=path,
            )
        return SourceUnavailable(f"{where}: cannot {what}: {failure.text}", path=path)

    # ---------------------------------------------------------------- listing

    def _list(self, path: bytes) -> _Level:
        """One directory level, sorted, with its problems."""
        prefix = self.parsed.key(path)
        prefix = prefix + "/" if prefix else ""
        level = _Level(path)
        seen: dict[bytes, str] = {}
        pages = self.call(self._collect, prefix, what="list", key=prefix or None)
        for item in pages:
            rel = item.key[len(prefix):]
            if item.is_prefix:
                rel = rel[:-1]
            elif rel == "":  # this directory's own folder marker
                level.mtime_ns = max(level.mtime_ns, item.mtime_ns)
                continue
            name = rel.encode("utf-8", "surrogateescape")
            child = path + b"/" + name if path else name
            bad = _bad_name(name)
            if bad is not None:
                kind = "prefix" if item.is_prefix else "key"
                level.problems.append(ScanProblem(child, f"{kind} {item.key!r} has {bad}: not a POSIX path; left out", True))
                continue
            kind = DIR if item.is_prefix else FILE
            if name in seen:
                if seen[name] != kind:
                    level.problems.append(ScanProblem(
                        child, f"{item.key.rstrip('/')!r} is both an object and a prefix of other keys; left out", True
                    ))
                    seen[name] = "conflict"
                continue
            seen[name] = kind
            level.children[name] = (kind, item)
            if not item.is_prefix:
                level.mtime_ns = max(level.mtime_ns, item.mtime_ns)
        for name, kind in seen.items():
            if kind == "conflict":
                level.children.pop(name, None)
        level.names = sorted(level.children)
        return level

    async def _collect(self, prefix: str) -> list[Listed]:
        out: list[Listed] = []
        async for page in self.backend.list_level(prefix):
            out.extend(page)
        return out

    def walk(
        self,
        problems: list[ScanProblem],
        *,
        start_after: bytes | None = None,
        exclude: Collection[bytes] = (),
        keep: bool = False,
        replay: bool = False,
    ) -> Iterator[Entry]:
        arguments = (start_after, frozenset(exclude))
        if replay and self._kept is not None and self._kept[0] == arguments:
            spill = self._kept[1]
            self._kept = None
            return self._replay(spill, problems)
        self._drop_kept()
        entries = self._walk(problems, start_after, frozenset(exclude))
        return self._keeping(entries, problems, arguments) if keep else entries

    def _keeping(self, entries: Iterator[Entry], problems: list[ScanProblem], arguments) -> Iterator[Entry]:
        fd, spill = tempfile.mkstemp(prefix="packerfs-listing-")
        complete = False
        try:
            with os.fdopen(fd, "wb") as out:
                # one pickle per record, so that neither side keeps a memo of the whole listing
                for entry in entries:
                    pickle.dump(("e", entry), out, protocol=pickle.HIGHEST_PROTOCOL)
                    yield entry
                for problem in problems:
                    pickle.dump(("p", tuple(problem)), out, protocol=pickle.HIGHEST_PROTOCOL)
            complete = True
        finally:
            if complete:
                self._kept = (arguments, spill)
            else:
                os.unlink(spill)

    def _replay(self, spill: str, problems: list[ScanProblem]) -> Iterator[Entry]:
        try:
            with open(spill, "rb") as f:
                while True:
                    try:
                        kind, values = pickle.load(f)
                    except EOFError:
                        break
                    if kind == "e":
                        yield values
                    else:
                        problems.append(ScanProblem(*values))
        finally:
            os.unlink(spill)

    def _drop_kept(self) -> None:
        if self._kept is not None:
            try:
                os.unlink(self._kept[1])
            except FileNotFoundError:
                pass
            self._kept = None

    def _walk(self, problems: list[ScanProblem], start_after: bytes | None, excluded: frozenset) -> Iterator[Entry]:
        after = tuple(start_after.split(b"/")) if start_after else None

        def wanted(path: bytes) -> bool:
            return after is None or tuple(path.split(b"/")) > after

        listings: OrderedDict[bytes, concurrent.futures.Future] = OrderedDict()

        def level_of(path: bytes) -> _Level:
            future = listings.pop(path, None)
            if future is None:
                return self._list(path)
            return future.result()

        def list_ahead(level: _Level) -> None:
            """Start listing the next few subdirectories the walk will enter."""
            ahead = 0
            for name in level.names[level.next:]:
                if ahead >= LISTINGS_AHEAD or len(listings) >= 4 * LISTINGS_AHEAD:
                    break
                kind, _ = level.children[name]
                if kind != DIR:
                    continue
                child = level.path + b"/" + name if level.path else name
                if child in excluded:
                    continue
                ahead += 1
                if child not in listings:
                    listings[child] = self._listers().submit(self._list, child)

        try:
            root = self._list(b"")
            if not root.children and not root.mtime_ns and self.parsed.prefix:
                problems.append(ScanProblem(b"", f"no object has the prefix {self.parsed.prefix}/ (an empty tree)", False))
            problems.extend(root.problems)
            if after is None:
                yield Entry(b"", DIR, DIR_MODE, root.mtime_ns, 0, ObjectFingerprint(0, "", root.mtime_ns))
            stack = [root]
            list_ahead(root)
            while stack:
                level = stack[-1]
                if level.next >= len(level.names):
                    stack.pop()
                    continue
                name = level.names[level.next]
                level.next += 1
                path = level.path + b"/" + name if level.path else name
                if path in excluded:
                    continue
                kind, item = level.children[name]
                if kind == FILE:
                    if wanted(path):
                        fingerprint = ObjectFingerprint(item.size, item.token, item.mtime_ns)
                        yield Entry(path, FILE, FILE_MODE, item.mtime_ns, item.size, fingerprint)
                    continue
                if after is not None and not wanted(path) and after[: len(path.split(b"/"))] != tuple(path.split(b"/")):
                    continue  # a directory wholly before the resume point
                child = level_of(path)
                problems.extend(child.problems)
                if wanted(path):
                    yield Entry(path, DIR, DIR_MODE, child.mtime_ns, 0, ObjectFingerprint(0, "", child.mtime_ns))
                stack.append(child)
                list_ahead(child)
                list_ahead(level)
        finally:
            for future in listings.values():
                future.cancel()

    # ---------------------------------------------------------------- reading

    def open(self, relpath: bytes, fingerprint: Iterable) -> "ObjectFile":
        return ObjectFile(self, relpath, ObjectFingerprint(*fingerprint))

    def read_range(self, key: str, token: str, start: int, end: int) -> bytes:
        data = self.call(self.backend.read, key, token, start, end, what="read", key=key, offset=start)
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        with self._fetched_lock:
            self._fetched += n

    def stream(self, entry: Entry, start: int = 0) -> Iterator[bytes]:
        return self.prefetch.stream(entry, start)

    def read_ahead(self, entries: Iterator[Entry], will_read: Callable[[Entry], bool]) -> Iterator[Entry]:
        window: deque[tuple[Entry, int]] = deque()  # entries not yet handed on, with the bytes announced
        planned = 0
        for entry in entries:
            size = 0
            if entry.kind == FILE and entry.size and will_read(entry):
                self.prefetch.announce(entry)
                size = entry.size
            window.append((entry, size))
            planned += size
            while window and (len(window) > AHEAD_FILES or planned > AHEAD_BYTES):
                head, counted = window.popleft()
                planned -= counted
                yield head
        while window:
            yield window.popleft()[0]

    def describe_change(self, relpath: bytes, fingerprint: Iterable) -> str:
        return "its bytes differ from the version listed"

    @property
    def bytes_fetched(self) -> int:
        return self._fetched

    def close(self) -> None:
        self._drop_kept()
        self.prefetch.drop_all()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.backend.close()


class ObjectFile(SourceFile):
    def __init__(self, source: ObjectSource, relpath: bytes, fingerprint: ObjectFingerprint):
        self.source = source
        self.key = source.parsed.key(relpath)
        self.fingerprint = fingerprint

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        shown = self.source._where(self.key, None)
        if offset + size > self.fingerprint.size:
            raise SourceChanged(
                f"{shown}: source file is shorter than at scan time (wanted {size} bytes at offset {offset}, "
                f"beyond its listed size {self.fingerprint.size})",
                path=shown,
            )
        data = self.source.read_range(self.key, self.fingerprint.token, offset, offset + size)
        if len(data) != size:
            raise SourceChanged(
                f"{shown}: source file is shorter than at scan time (wanted {size} bytes at offset {offset}, "
                f"got {len(data)})",
                path=shown,
            )
        return data


class _Plan:
    """A file announced for read-ahead: its blocks in order, some fetching."""

    __slots__ = ("entry", "key", "next", "blocks")

    def __init__(self, entry: Entry, key: str, start: int):
        self.entry = entry
        self.key = key
        self.next = start  # the next offset to request
        self.blocks: deque[tuple[int, int, concurrent.futures.Future]] = deque()


class _Prefetcher:
    """Concurrent ranged GETs ahead of the scan, in the scan's order, within AHEAD_BYTES."""

    def __init__(self, source: ObjectSource):
        self.source = source
        self.plans: OrderedDict[bytes, _Plan] = OrderedDict()
        self.pending = 0  # bytes requested and not yet consumed
        self.lock = threading.Lock()

    def announce(self, entry: Entry) -> None:
        with self.lock:
            if entry.path not in self.plans:
                self.plans[entry.path] = _Plan(entry, self.source.parsed.key(entry.path), 0)
            self._fill()

    def _fill(self) -> None:
        for plan in self.plans.values():
            size = plan.entry.size
            while plan.next < size:
                length = min(BLOCK, size - plan.next)
                if self.pending and self.pending + length > AHEAD_BYTES:
                    return
                start = plan.next
                future = self.source.submit(
                    self.source.backend.read, plan.key, plan.entry.fingerprint.token, start, start + length,
                    what="read", key=plan.key, offset=start,
                )
                plan.blocks.append((start, length, future))
                plan.next += length
                self.pending += length

    def _drop(self, plan: _Plan) -> None:
        for _, length, future in plan.blocks:
            future.cancel()
            self.pending -= length
        plan.blocks.clear()

    def drop_all(self) -> None:
        with self.lock:
            for plan in self.plans.values():
                self._drop(plan)
            self.plans.clear()

    def stream(self, entry: Entry, start: int) -> Iterator[bytes]:
        if start >= entry.size:
            return  # nothing to read (an empty file is never announced): leave the read-ahead alone
        with self.lock:
            # Files announced before this one were not read after all (their records were kept): let
            # go. Only if this one was announced: one that was not (a file continued from its seam)
            # says nothing about the files announced after it.
            if entry.path in self.plans:
                while self.plans:
                    path, plan = next(iter(self.plans.items()))
                    if path == entry.path:
                        break
                    self._drop(plan)
                    del self.plans[path]
            plan = self.plans.get(entry.path)
            if plan is not None and (plan.blocks[0][0] if plan.blocks else plan.next) != start:
                self._drop(plan)
                plan = None
            if plan is None:
                plan = _Plan(entry, self.source.parsed.key(entry.path), start)
                self.plans[entry.path] = plan
                self.plans.move_to_end(entry.path, last=False)
            self._fill()
        try:
            offset = start
            while offset < entry.size:
                with self.lock:
                    if not plan.blocks:
                        self._fill()
                    if not plan.blocks:  # the budget is held by nothing else: request this block alone
                        length = min(BLOCK, entry.size - plan.next)
                        future = self.source.submit(
                            self.source.backend.read, plan.key, entry.fingerprint.token, plan.next,
                            plan.next + length, what="read", key=plan.key, offset=plan.next,
                        )
                        plan.blocks.append((plan.next, length, future))
                        plan.next += length
                        self.pending += length
                    block_start, length, future = plan.blocks.popleft()
                try:
                    data = future.result()
                finally:
                    with self.lock:
                        self.pending -= length
                        self._fill()
                self.source._count(len(data))
                if len(data) != length:
                    shown = self.source._where(plan.key, None)
                    raise SourceChanged(
                        f"{shown}: file changed while being read (got {len(data)} bytes of {length} at offset "
                        f"{block_start}); run again to resume",
                        path=shown,
                    )
                offset += length
                view = memoryview(data)
                for piece in range(0, length, 1 << 20):
                    yield bytes(view[piece : piece + (1 << 20)])
        finally:
            with self.lock:
                self._drop(plan)
                if self.plans.get(entry.path) is plan:
                    del self.plans[entry.path]
                self._fill()
