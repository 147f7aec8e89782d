"""Where the CARs of a set are: local files, object-store prefixes, HTTP piece gateways.

open_locations(specs, options=, pieces=, manifest=) turns what the user named into CarObjects, one
per CAR file, each with a name, a display string (its path or URL, used in every message), a size,
an identity (changes whenever the object does) and ranged reads. Nothing above this module knows
where a CAR lives (the backends' own code is in packerfs/source/: objects.py and its stores, and
http.py).

  local        a directory (its *.car, sorted) or a file; os.pread on a bounded set of descriptors,
               opened without ever blocking on a FIFO (packerfs.ipld.car.open_regular)
  s3:// gs:// az:// (abfs://)
               the *.car objects directly under the prefix (one delimiter listing; a prefix that is
               itself a *.car key is that one object), read by version-pinned ranged GETs through
               packerfs.source.objects (its retries, backoff and worded failures)
  http(s)://   a piece gateway (FRC-0066 `/piece/{cid}`: packerfs serve, Curio, a static server):
               `{base}/piece/{cid}` for each CID in `pieces` or in a manifest.csv (`manifest`, a path
               or URL; without either, the gateway's own /manifest.csv), or a URL that already ends
               in /piece/{cid}; see packerfs.source.http

Remote objects share one page cache: PAGE-aligned pages, least recently used first out, at most
CACHE_BYTES for the whole set. The missing pages a read needs are fetched as runs of adjacent pages
(one request per run, several runs concurrently); a read larger than BYPASS goes straight to the
store in concurrent chunks and is not cached. A reader that goes on where its last read ended gets
read-ahead: the next pages, as many as it has read sequentially so far up to AHEAD_MAX, fetched in
AHEAD_CHUNK requests with at most AHEAD_IN_FLIGHT of them in flight; so one 1 MiB file costs about
2 MiB, a long sequential read keeps 8 MiB coming. A failed fetch fails the reads waiting for it (a
PackerfsError naming the URL and offset) and caches nothing, so the next read asks again: a piece
whose server stopped answering reads again once it is back, and other objects are not affected.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import stat
import threading
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

from packerfs.errors import PackerfsError, SourceChanged, UsageError
from packerfs.ipld.car import file_kind, open_regular
from packerfs.source import is_url
from packerfs.source.http import Counter, HttpClient, NotFound, check_piece_cid, is_http, parse_gateway, parse_manifest

PAGE = 256 << 10
CACHE_BYTES = 64 << 20  # pages kept, across all remote objects of a set
MAX_RUN = 8 << 20  # one request for adjacent missing pages, at most this long
BYPASS = 16 << 20  # reads longer than this are not cached
BYPASS_CHUNK = 8 << 20
AHEAD_MAX = 8 << 20  # read-ahead window of a sequential reader
AHEAD_CHUNK = 1 << 20  # one read-ahead request
AHEAD_IN_FLIGHT = 8  # read-ahead requests in flight, across the set
WORKERS = 16  # threads fetching for a set (demand runs, read-ahead, chunks)
STREAMS = 4  # sequential readers tracked per object
PROBES = 16  # pieces probed concurrently when a gateway's set is opened
DESCRIPTORS = 128  # local CARs open at once
MAX_MANIFEST = 64 << 20


class CarObject:
    """One CAR file, wherever it is. read() and read_ranges() are safe from any number of threads."""

    name: str  # base name: "bin-000001.car", or the piece CID for a piece URL without a manifest
    display: str  # path or URL, for messages
    size: int
    identity: str  # changes whenever the object changes
    remote: bool = False

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, fewer only at the end of the object; PackerfsError naming display
        and offset."""
        raise NotImplementedError

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """read() of each (offset, length), fetched concurrently where the object is remote."""
        return [self.read(offset, length) for offset, length in ranges]

    def read_uncached(self, offset: int, length: int) -> bytes:
        """read(), but a remote object fetches exactly this range and caches nothing: for the few
        small reads that index a CAR (its head and tail), which whole pages would inflate."""
        return self.read(offset, length)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display} {self.size} bytes>"


def _check(obj: CarObject, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise PackerfsError(f"{obj.display}: cannot read {length} bytes at offset {offset}")


# ---------------------------------------------------------------------------------------------- local


class _Descriptors:
    """Open file descriptors for local CARs, at most `limit` at once, safe across threads.

    A descriptor in use by a read is never closed under it (reference count); idle ones are closed
    least-recently-used first.
    """

    def __init__(self, limit: int = DESCRIPTORS):
        self.limit = limit
        self.lock = threading.Lock()
        self.open: OrderedDict[int, list] = OrderedDict()  # object uid -> [fd, users]

    def pread(self, uid: int, path: str, offset: int, length: int) -> bytes:
        with self.lock:
            slot = self.open.get(uid)
            if slot is None:
                try:
                    fd = open_regular(path)  # never blocks on a FIFO swapped in since the listing
                except OSError as exc:
                    raise PackerfsError(
                        f"{path}: cannot open: {exc.strerror or exc} (to read offset {offset})"
                    ) from None
                slot = self.open[uid] = [fd, 0]
                self._evict()
            else:
                self.open.move_to_end(uid)
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
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except OSError as exc:
            raise PackerfsError(f"{path}: read error at offset {offset}: {exc.strerror}") from None
        finally:
            with self.lock:
                slot[1] -= 1
                self._evict()

    def forget(self, uid: int) -> None:
        with self.lock:
            slot = self.open.get(uid)
            if slot is not None and slot[1] == 0:
                del self.open[uid]
                os.close(slot[0])

    def _evict(self) -> None:
        if len(self.open) <= self.limit:
            return
        for uid in list(self.open):
            if len(self.open) <= self.limit:
                break
            fd, users = self.open[uid]
            if users == 0:
                del self.open[uid]
                os.close(fd)

    def close(self) -> None:
        with self.lock:
            for fd, _ in self.open.values():
                os.close(fd)
            self.open.clear()


class LocalCar(CarObject):
    remote = False

    def __init__(self, uid: int, path: str, st: os.stat_result, descriptors: _Descriptors):
        self.uid = uid
        self.path = path
        self.name = os.path.basename(path)
        self.display = path
        self.size = st.st_size
        self.identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        self._descriptors = descriptors

    def read(self, offset: int, length: int) -> bytes:
        _check(self, offset, length)
        if length == 0:
            return b""
        return self._descriptors.pread(self.uid, self.path, offset, length)

    def close(self) -> None:
        self._descriptors.forget(self.uid)


def car_files(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Local CAR paths: a directory's *.car (sorted), files as given; each real file once."""
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


def _stat_regular(path: str) -> tuple[os.stat_result | None, str | None]:
    """(its stat, None), or (None, why `path` cannot be read as a CAR without risk: a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return None, f"not a regular file ({file_kind(st.st_mode)})"
    return st, None


def not_regular(path: str) -> str | None:
    return _stat_regular(path)[1]


# ---------------------------------------------------------------------------------------------- remote


class _Pages:
    """The page cache, in-flight fetches and fetching threads that a set's remote objects share."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.lock = threading.Lock()
        self.pages: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.cached = 0  # bytes in self.pages
        self.inflight: dict[tuple[int, int], concurrent.futures.Future] = {}
        self.ahead = 0  # read-ahead requests in flight
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = None
        self.closed = False

    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self.lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="packerfs-car")
                self._pid = os.getpid()
            return self._pool

    def _forked(self) -> None:
        """In a forked child the parent's fetching threads are gone: so are the fetches they owed. Lock held."""
        if self._pid is not None and self._pid != os.getpid():
            self._pool, self._pid = None, None
            self.inflight.clear()
            self.ahead = 0

    # ------------------------------------------------------------ reading

    def read(self, obj: "RemoteCar", ranges: list[tuple[int, int]]) -> list[bytes]:
        plans: list = []
        runs: list[tuple] = []  # (first page, last page, their futures, obj): to fetch
        chunks: list[tuple[int, int, concurrent.futures.Future]] = []
        ahead: list[tuple[int, int, list]] = []
        with self.lock:
            self._forked()
            if obj.closed:
                raise PackerfsError(f"{obj.display}: read after close")
            for offset, length in ranges:
                _check(obj, offset, length)
                end = min(obj.size, offset + length)
                if end <= offset:
                    plans.append(None)
                elif end - offset > BYPASS:
                    parts = []
                    for start in range(offset, end, BYPASS_CHUNK):
                        future = concurrent.futures.Future()
                        chunks.append((start, min(end, start + BYPASS_CHUNK), future))
                        parts.append(future)
                    plans.append(("chunks", offset, end, parts))
                else:
                    first, last = offset // PAGE, (end - 1) // PAGE
                    pages = [self._page(obj, p, runs, MAX_RUN // PAGE) for p in range(first, last + 1)]
                    plans.append(("pages", offset - first * PAGE, end - offset, pages))
                    window = self._sequential(obj, offset, end)
                    if window:
                        ahead += self._ahead(obj, end, min(obj.size, end + window))
        jobs = [(self._run, obj, first, last, futures, False) for first, last, futures, _ in runs]
        jobs += [(self._chunk, obj, start, end, future) for start, end, future in chunks]
        jobs += [(self._run, obj, first, last, futures, True) for first, last, futures in ahead]
        if jobs:
            inline = jobs[0] if (runs or chunks) else None  # the first demand fetch runs on this thread
            rest = jobs[1:] if inline else jobs
            if rest:
                pool = self.pool()
                for job in rest:
                    pool.submit(*job)
            if inline:
                inline[0](*inline[1:])
        out = []
        for plan in plans:
            if plan is None:
                out.append(b"")
                continue
            kind, skip, length, parts = plan
            data = [part if isinstance(part, bytes) else part.result() for part in parts]
            if kind == "chunks":
                out.append(b"".join(data))
            elif len(data) == 1:
                out.append(data[0][skip : skip + length] if (skip or length != len(data[0])) else data[0])
            else:
                out.append(b"".join(data)[skip : skip + length])
        return out

    def _page(self, obj: "RemoteCar", page: int, runs: list, max_pages: int):
        """Page `page` of `obj`: its bytes if cached, else the future that will hold them (a fetch already
        under way, or a new one added to `runs`). Called with the lock held."""
        key = (obj.uid, page)
        data = self.pages.get(key)
        if data is not None:
            self.pages.move_to_end(key)
            return data
        future = self.inflight.get(key)
        if future is not None:
            return future
        future = self.inflight[key] = concurrent.futures.Future()
        if runs and runs[-1][1] == page - 1 and len(runs[-1][2]) < max_pages and runs[-1][3] is obj:
            first, _, futures, _ = runs[-1]
            futures.append(future)
            runs[-1] = (first, page, futures, obj)
        else:
            runs.append((page, page, [future], obj))
        return future

    def _sequential(self, obj: "RemoteCar", start: int, end: int) -> int:
        """How far to read ahead after this read: 0 unless it continues an earlier one. Lock held."""
        for i, stream in enumerate(obj.streams):
            if stream[0] - PAGE <= start <= stream[0] + PAGE:
                stream[0] = max(stream[0], end)
                stream[1] += end - start
                obj.streams.insert(0, obj.streams.pop(i))
                return min(AHEAD_MAX, stream[1])
        obj.streams.insert(0, [end, end - start])
        del obj.streams[STREAMS:]
        return 0

    def _ahead(self, obj: "RemoteCar", start: int, end: int) -> list:
        """Runs of the missing pages in [start, end), AHEAD_CHUNK each, within AHEAD_IN_FLIGHT. Lock held."""
        runs: list = []
        for page in range(start // PAGE, (end - 1) // PAGE + 1):
            key = (obj.uid, page)
            if key in self.pages or key in self.inflight:
                continue
            joins = bool(runs) and runs[-1][1] == page - 1 and len(runs[-1][2]) < max(1, AHEAD_CHUNK // PAGE)
            if not joins and self.ahead >= AHEAD_IN_FLIGHT:
                break
            self._page(obj, page, runs, max(1, AHEAD_CHUNK // PAGE))
            if not joins:
                self.ahead += 1
        return [(first, last, futures) for first, last, futures, _ in runs]

    def _run(self, obj: "RemoteCar", first: int, last: int, futures: list, ahead: bool) -> None:
        """Fetch pages first..last in one request and hand them to whoever waits; errors likewise."""
        start, end = first * PAGE, min(obj.size, (last + 1) * PAGE)
        try:
            data = obj.fetch(start, end)
            if len(data) != end - start:
                raise PackerfsError(
                    f"{obj.display}: got {len(data)} of the {end - start} bytes asked for at offset {start}"
                )
        except BaseException as exc:
            error = exc if isinstance(exc, PackerfsError) else PackerfsError(
                f"{obj.display}: read failed at offset {start}: {type(exc).__name__}: {exc}"
            )
            with self.lock:
                for page, future in zip(range(first, last + 1), futures):
                    if self.inflight.get((obj.uid, page)) is future:
                        del self.inflight[(obj.uid, page)]
                if ahead:
                    self.ahead -= 1
            for future in futures:
                _settle(future, error=error)
            if not isinstance(exc, Exception):
                raise
            return
        pieces = [data] if first == last else [data[i : i + PAGE] for i in range(0, len(data), PAGE)]
        with self.lock:
            for page, future, piece in zip(range(first, last + 1), futures, pieces):
                key = (obj.uid, page)
                if self.inflight.get(key) is future:
                    del self.inflight[key]
                if not obj.closed and not self.closed:
                    old = self.pages.pop(key, None)
                    if old is not None:
                        self.cached -= len(old)
                    self.pages[key] = piece
                    self.cached += len(piece)
            while self.cached > CACHE_BYTES and self.pages:
                _, old = self.pages.popitem(last=False)
                self.cached -= len(old)
            if ahead:
                self.ahead -= 1
        for future, piece in zip(futures, pieces):
            _settle(future, result=piece)

    def _chunk(self, obj: "RemoteCar", start: int, end: int, future: concurrent.futures.Future) -> None:
        try:
            data = obj.fetch(start, end)
            if len(data) != end - start:
                raise PackerfsError(
                    f"{obj.display}: got {len(data)} of the {end - start} bytes asked for at offset {start}"
                )
        except PackerfsError as exc:
            _settle(future, error=exc)
        except BaseException as exc:
            _settle(future, error=PackerfsError(f"{obj.display}: read failed at offset {start}: {type(exc).__name__}: {exc}"))
            if not isinstance(exc, Exception):
                raise
        else:
            _settle(future, result=data)

    # ------------------------------------------------------------ dropping

    def forget(self, obj: "RemoteCar") -> None:
        with self.lock:
            for key in [k for k in self.pages if k[0] == obj.uid]:
                self.cached -= len(self.pages.pop(key))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.pages.clear()
            self.cached = 0
            waiting = list(self.inflight.values())
            self.inflight.clear()
            pool, self._pool = self._pool, None
        for future in waiting:
            _settle(future, error=PackerfsError("the CAR set was closed"))
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _settle(future: concurrent.futures.Future, *, result=None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:  # already failed by close()
        pass


class RemoteCar(CarObject):
    """A CAR in a bucket or behind a piece URL: ranged fetches through the set's page cache."""

    remote = True

    def __init__(self, uid: int, name: str, display: str, size: int, identity: str,
                 fetch: Callable[[int, int], bytes], pages: _Pages):
        self.uid = uid
        self.name, self.display, self.size, self.identity = name, display, size, identity
        self.fetch = fetch  # bytes [start, end), exactly, or PackerfsError naming display and offset
        self.streams: list[list[int]] = []  # [end, bytes read sequentially] of recent readers
        self.closed = False
        self._pages = pages

    def read(self, offset: int, length: int) -> bytes:
        return self._pages.read(self, [(offset, length)])[0]

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self._pages.read(self, list(ranges))

    def read_uncached(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        return self.fetch(offset, end) if end > offset else b""

    def close(self) -> None:
        self.closed = True
        self._pages.forget(self)


# ---------------------------------------------------------------------------------------------- the set


class CarLocations:
    """The CAR objects a set of specs names, sorted by name, and what could not be opened."""

    def __init__(self) -> None:
        self.objects: list[CarObject] = []
        self.problems: list[str] = []
        self.counter = Counter()
        self.pages = _Pages(self.counter)
        self.descriptors = _Descriptors()
        self._closers: list[Callable[[], None]] = []
        self._uids = itertools.count()

    def stats(self) -> dict:
        """Requests made and bytes received so far from remote stores (listing, probes, reads)."""
        return self.counter.stats()

    def close(self) -> None:
        for obj in self.objects:
            obj.close()
        self.pages.close()
        self.descriptors.close()
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing what is already broken
                pass

    def __enter__(self) -> "CarLocations":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ building

    def _add_local(self, paths: list[str]) -> None:
        for path in paths:
            st, why = _stat_regular(path)
            if why is not None:
                self.problems.append(f"{path}: {why} (skipped)")
                continue
            self.objects.append(LocalCar(next(self._uids), path, st, self.descriptors))

    def _add_bucket(self, spec: str, options: dict[str, str]) -> None:
        from packerfs.source.objects import open_object_source

        source = open_object_source(spec, dict(options), rerun_note="")  # reading CARs: nothing sealed to keep
        self._closers.append(source.close)
        self.counter.add(requests=1)  # the bucket check
        counter = self.counter
        parsed = source.parsed

        async def collect(prefix: str) -> list:
            out = []
            async for page in source.backend.list_level(prefix):
                counter.add(requests=1)
                out.extend(page)
            return out

        def listing(prefix: str) -> list:
            return source.call(collect, prefix, what="list", key=prefix or None)

        prefix = parsed.prefix + "/" if parsed.prefix else ""
        found = [
            item for item in listing(prefix)
            if not item.is_prefix and item.key.endswith(".car") and "/" not in item.key[len(prefix):]
        ]
        if not found and parsed.prefix.endswith(".car"):  # the URL names one object
            found = [item for item in listing(parsed.prefix) if not item.is_prefix and item.key == parsed.prefix]
        for item in sorted(found, key=lambda i: i.key):
            display = f"{parsed.scheme}://{parsed.bucket}/{item.key}"
            self.objects.append(RemoteCar(
                next(self._uids), item.key.rsplit("/", 1)[-1], display, item.size, f"{item.token}:{item.size}",
                _bucket_reader(source, item.key, item.token, display, counter), self.pages,
            ))

    def _add_pieces(self, client: HttpClient, wanted: list[tuple]) -> None:
        """Probe every (gateway, cid, name, retired) concurrently; add what answers, list what does not."""

        def probe(entry):
            gateway, cid, _, _ = entry
            url = gateway.piece_url(cid)
            try:
                return url, client.probe(gateway, url), None
            except NotFound as exc:
                return url, None, f"{exc}"
            except PackerfsError as exc:
                return url, None, str(exc).strip().splitlines()[0]

        with concurrent.futures.ThreadPoolExecutor(min(PROBES, max(1, len(wanted))), thread_name_prefix="packerfs-probe") as pool:
            results = list(pool.map(probe, wanted))
        for (gateway, cid, name, retired), (url, found, problem) in zip(wanted, results):
            if found is None:
                self.problems.append(f"{problem}{' (a retired bin)' if retired else ''} (skipped)")
                continue
            self.objects.append(RemoteCar(
                next(self._uids), name or cid, url, found.size, found.identity,
                _piece_reader(client, gateway, url, found), self.pages,
            ))


def _bucket_reader(source, key: str, token: str, display: str, counter: Counter) -> Callable[[int, int], bytes]:
    def fetch(start: int, end: int) -> bytes:
        try:
            data = source.read_range(key, token, start, end)
        except SourceChanged as exc:
            detail = re.search(r"\(([^()]*)\)", str(exc))
            raise PackerfsError(
                f"{display}: the object changed since it was listed ({detail.group(1) if detail else 'overwritten'}); "
                f"not read at offset {start}"
            ) from None
        finally:
            counter.add(requests=1)
        counter.add(nbytes=len(data))
        return data

    return fetch


def _piece_reader(client: HttpClient, gateway, url: str, probe) -> Callable[[int, int], bytes]:
    def fetch(start: int, end: int) -> bytes:
        return client.read_range(gateway, url, probe, start, end)

    return fetch


def _read_manifest(manifest: str, client: HttpClient) -> list[dict]:
    if is_http(manifest):
        return parse_manifest(client.fetch_text(manifest), manifest)
    try:
        st = os.stat(manifest)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{manifest}: not a regular file ({file_kind(st.st_mode)})")
        if st.st_size > MAX_MANIFEST:
            raise UsageError(f"{manifest}: {st.st_size} bytes is too large for a manifest.csv")
        with open(manifest, encoding="utf-8-sig") as f:
            text = f.read(MAX_MANIFEST + 1)
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{manifest}: not UTF-8 text at offset {exc.start}") from None
    return parse_manifest(text, manifest)


def _row_name(row: dict) -> str | None:
    name = (row.get("car_file") or "").strip()
    return name if name.endswith(".car") and "/" not in name and name not in (".car",) else None


def open_locations(
    specs: Sequence[str],
    *,
    options: dict[str, str] | None = None,
    pieces: Sequence[str] = (),
    manifest: str | None = None,
) -> CarLocations:
    """The CARs that `specs` name: local directories or files, s3:// gs:// az:// prefixes, http(s)://
    piece gateways (with `pieces` or `manifest`, which apply to every gateway base URL given) or piece
    URLs. `options` (-o KEY=VALUE) go to the object stores' file systems, or for gateways token_file=
    and ca_certs=. Objects that cannot be opened are `problems`; a spec that cannot be used at all
    (no such directory, a missing bucket, bad options) raises."""
    if isinstance(specs, (str, bytes, os.PathLike)):
        specs = [specs]
    specs = [os.fsdecode(spec) for spec in specs]
    options = dict(options or {})
    local = [s for s in specs if not is_url(s) and not is_http(s)]
    buckets = [s for s in specs if is_url(s)]
    gateways = [s for s in specs if is_http(s)]
    if options and not (buckets or gateways):
        raise UsageError(f"{specs[0] if specs else 'CARS'}: -o options apply to s3://, gs://, az:// and http(s):// CARs only")
    if buckets and gateways and options:
        raise UsageError("-o options are for one kind of store: give the bucket and the gateway CARs separately")
    parsed = [parse_gateway(s) for s in gateways]
    bases = [g for g in parsed if g.piece is None]
    if (pieces or manifest) and not bases:
        raise UsageError("piece CIDs and a manifest.csv go with an http(s):// gateway URL")
    cids = [check_piece_cid(p, "piece list") for p in pieces]

    found = CarLocations()
    try:
        found._add_local(car_files(local) if local else [])
        for spec in buckets:
            found._add_bucket(spec, options)
        if gateways:
            client = HttpClient(options, found.counter)
            found._closers.append(client.close)
            rows: list[dict] | None = None
            if manifest:
                rows = _read_manifest(manifest, client)
            wanted: list[tuple] = []
            for gateway in parsed:
                if gateway.piece is not None:
                    wanted.append((gateway, gateway.piece, None, False))
                    continue
                listed = rows
                if listed is None and not cids:
                    try:
                        listed = parse_manifest(client.fetch_text(gateway.base + "/manifest.csv"), gateway.base + "/manifest.csv")
                    except NotFound:
                        raise UsageError(
                            f"{gateway.base}: no piece CIDs given and the gateway has no /manifest.csv; "
                            f"name the pieces or give a manifest.csv"
                        ) from None
                for row in listed or ():
                    wanted.append((gateway, row["piece_cid"], _row_name(row), (row.get("status") or "") == "retired"))
                for cid in cids:
                    wanted.append((gateway, cid, None, False))
            seen: set[str] = set()
            unique = []
            for entry in wanted:
                url = entry[0].piece_url(entry[1])
                if url not in seen:
                    seen.add(url)
                    unique.append(entry)
            if unique:
                found._add_pieces(client, unique)
    except BaseException:
        found.close()
        raise
    found.objects.sort(key=lambda o: (o.name, o.display))
    return found
