"""HTTP piece gateways (FRC-0066 `GET /piece/{cid}` with Range): the client that reads CARs from them.

A gateway is a base URL, `http(s)://host[:port][/base]`; each piece is `{base}/piece/{cid}`
(`packerfs serve`, Curio's `/piece/` endpoint, or any static server holding files named by piece
CID, e.g. nginx). Only ranged requests are ever made:

* a piece is opened with one `GET Range: bytes=0-0` probe: its 206 `Content-Range` gives the size
  and proves the server honours Range; its ETag (or Last-Modified) pins the version. A server that
  answers 200 (the whole piece: it ignored Range) is refused, and that response is closed unread;
* every read asks for exactly one range and accepts only a 206 whose Content-Range is that range
  of a piece of the probed size (and, where the server gave one, the probed ETag; a strong ETag is
  also sent as If-Match). Nothing beyond the requested bytes is ever read from a response;
* throttling (429, 503, and 502/504 from a proxy) and connection failures (refused, reset, cut
  mid-body, timed out) are retried with jittered exponential backoff for up to
  packerfs.source.objects.RETRY_SECONDS (env PACKERFS_RETRY_SECONDS), honouring Retry-After;
  nothing retries underneath (urllib3's own retries and redirects are off; up to 5 redirects are
  followed here, never draining a body). Then the read fails with one line naming the URL and offset.

Client library: urllib3 (already installed, as botocore's HTTP stack). It is synchronous and
thread-safe with a bounded connection pool, which fits callers that read from many threads (FUSE
workers, a read-ahead pool) without an event loop to host; `preload_content=False` lets a body be
read only up to the requested length and a response be dropped unread. aiohttp (installed with
s3fs) would need a loop thread and buys nothing for a few dozen concurrent ranged GETs.
"""

from __future__ import annotations

import csv
import io
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from packerfs.errors import PackerfsError, SourceUnavailable, UsageError
from packerfs.source import objects

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # no byte for this long: the attempt failed (retried within RETRY_SECONDS)
POOL_SIZE = 16  # kept-alive connections per host
MAX_REDIRECTS = 5
MAX_MANIFEST = 64 << 20  # a manifest.csv fetched over HTTP; ~300 bytes a row
TEXT_LIMIT = 300  # bytes of an error body quoted in a message
RETRIED_STATUS = {429: "throttled", 502: "bad gateway", 503: "unavailable", 504: "gateway timeout"}
# A piece CID as it appears in a URL path: multibase text (base32 'b…', base58 'z…', …). Anything
# else in a list of pieces or a manifest is refused rather than pasted into a URL.
PIECE_CID = re.compile(r"^[A-Za-z0-9]{8,200}$")
HTTP_OPTIONS = ("token_file", "ca_certs")


def is_http(spec: str) -> bool:
    scheme, sep, _ = spec.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


def _retry_seconds() -> float:
    return objects.RETRY_SECONDS  # looked up at each call: tests and callers may change it


class Counter:
    """Requests made and body bytes received, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    def add(self, requests: int = 0, nbytes: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "bytes": self.bytes}


@dataclass(frozen=True)
class Gateway:
    """A parsed gateway spec: `base` (no trailing slash, no credentials) and the piece it names, if any."""

    base: str
    piece: str | None  # the spec was `{base}/piece/{cid}` (or `{base}/piece?id={cid}`)
    auth: str | None  # "user:password" from the URL's userinfo

    def piece_url(self, cid: str) -> str:
        return f"{self.base}/piece/{urllib.parse.quote(cid, safe='')}"


def parse_gateway(spec: str) -> Gateway:
    parts = urllib.parse.urlsplit(spec)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{spec}: not an http(s):// URL of a piece gateway")
    auth = None
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        auth = urllib.parse.unquote(userinfo)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UsageError(f"{_safe(spec)}: bad port in the URL") from None
    if parts.fragment:
        raise UsageError(f"{_safe(spec)}: a gateway URL has no #fragment")
    path = parts.path.rstrip("/")
    piece = None
    match = re.match(r"^(.*)/piece/([^/]+)$", path)
    if match:
        path, piece = match.group(1), urllib.parse.unquote(match.group(2))
    elif path.endswith("/piece") or path == "/piece":
        query = urllib.parse.parse_qs(parts.query)
        if "id" in query:
            path, piece = path[: -len("/piece")], query["id"][0]
    elif parts.query:
        raise UsageError(f"{_safe(spec)}: a gateway's base URL takes no ?query")
    if piece is not None and not PIECE_CID.match(piece):
        raise UsageError(f"{_safe(spec)}: {piece[:80]!r} is not a piece CID")
    base = urllib.parse.urlunsplit((parts.scheme.lower(), netloc, path, "", ""))
    return Gateway(base, piece, auth)


def _safe(spec: str) -> str:
    """A URL for messages: any user:password@ left out."""
    return _split_auth(spec)[0]


def check_piece_cid(cid: str, where: str) -> str:
    cid = cid.strip()
    if not PIECE_CID.match(cid):
        raise UsageError(f"{where}: {cid[:80]!r} is not a piece CID")
    return cid


def parse_manifest(text: str, where: str) -> list[dict]:
    """manifest.csv rows (packerfs.pack.writer.CSV_COLUMNS; only piece_cid is required)."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "piece_cid" not in reader.fieldnames:
        raise UsageError(f"{where}: not a manifest.csv (no piece_cid column)")
    rows = []
    for line, row in enumerate(reader, start=2):
        cid = (row.get("piece_cid") or "").strip()
        if not cid:
            continue
        rows.append({**row, "piece_cid": check_piece_cid(cid, f"{where}: line {line}")})
    return rows


class _Transient(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, text: str, kind: str = "unreachable", retry_after: float | None = None):
        super().__init__(text)
        self.text, self.kind, self.retry_after = text, kind, retry_after


class NotFound(SourceUnavailable):
    """404/410: the gateway does not have this piece."""


@dataclass
class Probe:
    size: int
    etag: str | None
    last_modified: str | None

    @property
    def identity(self) -> str:
        if self.etag:
            return f"etag:{self.etag}:{self.size}"
        if self.last_modified:
            return f"modified:{self.last_modified}:{self.size}"
        return f"size:{self.size}"


class HttpClient:
    """One connection pool for every gateway of a CAR set; thread-safe."""

    def __init__(self, options: dict[str, str] | None = None, counter: Counter | None = None):
        options = dict(options or {})
        unknown = sorted(set(options) - set(HTTP_OPTIONS))
        if unknown:
            raise UsageError(
                f"-o {unknown[0]}=…: not an option for http(s):// gateways (they take {', '.join(HTTP_OPTIONS)})"
            )
        self.counter = counter or Counter()
        self.headers = {"Accept-Encoding": "identity", "User-Agent": "packerfs"}
        token_file = options.get("token_file")
        if token_file:
            from packerfs.http.server import read_token

            self.headers["Authorization"] = "Bearer " + read_token(token_file).decode("latin-1")
        self.ca_certs = options.get("ca_certs")
        if self.ca_certs and not os.path.isfile(self.ca_certs):
            raise UsageError(f"-o ca_certs={self.ca_certs}: no such file")
        self._pool = None
        self._pid = None
        self._lock = threading.Lock()

    def _manager(self):
        import urllib3

        with self._lock:
            if self._pool is None or self._pid != os.getpid():  # connections are not shared across a fork
                kwargs = {"ca_certs": self.ca_certs} if self.ca_certs else {}
                self._pool = urllib3.PoolManager(
                    num_pools=32, maxsize=POOL_SIZE, block=False, retries=False,
                    timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT), **kwargs,
                )
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.clear()
                self._pool = None

    # ------------------------------------------------------------ one request, redirects, retries

    def _headers(self, gateway: Gateway | None, extra: dict) -> dict:
        headers = {**self.headers, **extra}
        if gateway is not None and gateway.auth:
            import urllib3

            headers.update(urllib3.util.make_headers(basic_auth=gateway.auth))
        return headers

    def _open(self, url: str, headers: dict):
        """A response with its body unread (the caller reads or closes it); redirects followed."""
        import urllib3

        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self._manager().request(
                    "GET", url, headers=headers, preload_content=False, redirect=False, retries=False,
                )
            except (urllib3.exceptions.SSLError, urllib3.exceptions.LocationParseError) as exc:
                hint = "; -o ca_certs=PATH trusts a private CA" if isinstance(exc, urllib3.exceptions.SSLError) else ""
                raise PackerfsError(f"{_reason(exc)}{hint}") from None
            except urllib3.exceptions.HTTPError as exc:
                self.counter.add(requests=1)
                raise _Transient(_reason(exc)) from None
            self.counter.add(requests=1)
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("location"):
                location = urllib.parse.urljoin(url, response.headers["location"])
                _drop(response)
                if urllib.parse.urlsplit(location).netloc != urllib.parse.urlsplit(url).netloc:
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = location
                continue
            if response.status in RETRIED_STATUS:
                text = f"{response.status} {RETRIED_STATUS[response.status]}"
                retry_after = _retry_after(response.headers.get("retry-after"))
                _drop(response)
                raise _Transient(text, "throttled" if response.status in (429, 503) else "unreachable", retry_after)
            return response
        _drop(response)
        raise PackerfsError(f"more than {MAX_REDIRECTS} redirects")

    def _retrying(self, attempt: Callable[[], object], where: str):
        seconds = _retry_seconds()
        deadline = time.monotonic() + seconds
        tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except _Transient as exc:
                now = time.monotonic()
                if now >= deadline:
                    if exc.kind == "throttled":
                        how = f"the server kept throttling ({exc.text})"
                    else:
                        how = f"cannot reach the server ({exc.text})"
                    raise SourceUnavailable(
                        f"{where}: {how} for {seconds:g} s ({tries} attempt{'s' if tries != 1 else ''})",
                        path=where,
                    ) from None
                delay = objects.backoff(tries)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, 30.0))
                time.sleep(max(0.0, min(delay, deadline - now)))
            except PackerfsError as exc:
                raise _named(exc, where) from None

    # ------------------------------------------------------------ what callers use

    def probe(self, gateway: Gateway, url: str) -> Probe:
        """Size and version of the piece at `url`, from a `bytes=0-0` probe. Raises NotFound (404/410),
        SourceUnavailable (unreachable, refused, a server that ignores Range) or PackerfsError."""

        def attempt() -> Probe:
            response = self._open(url, self._headers(gateway, {"Range": "bytes=0-0"}))
            try:
                status = response.status
                if status == 206:
                    start, end, total = _content_range(response.headers.get("content-range"))
                    if start != 0 or end != 0 or total is None:
                        raise PackerfsError(
                            f"answered bytes=0-0 with Content-Range {response.headers.get('content-range')!r}"
                        )
                    self._read_exactly(response, 1, url, 0)
                    return Probe(total, _strong_or_weak(response), response.headers.get("last-modified"))
                if status == 416:
                    _, _, total = _content_range(response.headers.get("content-range"))
                    if total == 0:
                        return Probe(0, _strong_or_weak(response), response.headers.get("last-modified"))
                    raise PackerfsError("answered bytes=0-0 with 416 (range not satisfiable)")
                if status == 200 and (response.headers.get("content-length") or "").strip() == "1":
                    self._read_exactly(response, 1, url, 0)  # a 1-byte piece: bytes=0-0 is all of it
                    return Probe(1, _strong_or_weak(response), response.headers.get("last-modified"))
                if status == 200:
                    raise SourceUnavailable(
                        "the server ignored the Range header (200 with the whole piece); refused, not downloaded: "
                        "a piece gateway must serve byte ranges (FRC-0066)", path=url,
                    )
                raise self._status_error(response)
            finally:
                _drop(response)

        return self._retrying(attempt, url)

    def read_range(self, gateway: Gateway, url: str, probe: Probe, start: int, end: int) -> bytes:
        """Bytes [start, end) of the piece `probe` describes; exactly that, or an error naming URL and offset."""
        if end <= start:
            return b""
        extra = {"Range": f"bytes={start}-{end - 1}"}
        if probe.etag and not probe.etag.startswith("W/"):
            extra["If-Match"] = probe.etag
        headers = self._headers(gateway, extra)
        where = f"{url} (offset {start})"

        def attempt() -> bytes:
            response = self._open(url, headers)
            try:
                status = response.status
                if status == 206:
                    got = response.headers.get("content-range")
                    first, last, total = _content_range(got)
                    if total is not None and total != probe.size:
                        raise PackerfsError(
                            f"the piece is now {total} bytes, not {probe.size} as when it was opened (it changed); not read"
                        )
                    if (first, last) != (start, end - 1):
                        raise PackerfsError(f"asked for bytes {start}-{end - 1}, got Content-Range {got!r}; not read")
                    etag = _strong_or_weak(response)
                    if probe.etag and etag and etag != probe.etag:
                        raise PackerfsError(f"the piece changed since it was opened (ETag {etag}, was {probe.etag})")
                    length = response.headers.get("content-length")
                    if length is not None and length.strip() != str(end - start):
                        raise PackerfsError(f"asked for {end - start} bytes, Content-Length says {length}; not read")
                    return self._read_exactly(response, end - start, url, start)
                if status == 200:
                    length = (response.headers.get("content-length") or "").strip()
                    if start == 0 and end == probe.size and length == str(end - start):
                        return self._read_exactly(response, end, url, 0)  # the range asked for was all of it
                    raise PackerfsError(
                        "the server ignored the Range header (200 with the whole piece); refused, not downloaded"
                    )
                if status == 412:
                    raise PackerfsError(f"the piece changed since it was opened (412: ETag no longer {probe.etag})")
                if status == 416:
                    raise PackerfsError(f"range not satisfiable (416): the piece is no longer {probe.size} bytes")
                raise self._status_error(response)
            finally:
                _drop(response)

        return self._retrying(attempt, where)

    def fetch_text(self, url: str, limit: int = MAX_MANIFEST) -> str:
        """A small document (a manifest.csv), at most `limit` bytes, as UTF-8 text."""
        shown, auth = _split_auth(url)
        gateway = Gateway(shown, None, auth)

        def attempt() -> bytes:
            response = self._open(shown, self._headers(gateway, {}))
            try:
                if response.status != 200:
                    raise self._status_error(response)
                chunks, total = [], 0
                while True:
                    chunk = self._read_some(response, min(1 << 20, limit + 1 - total))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > limit:
                        raise PackerfsError(f"larger than {limit} bytes: not a manifest.csv")
                return b"".join(chunks)
            finally:
                _drop(response)

        data = self._retrying(attempt, shown)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PackerfsError(f"{shown}: not UTF-8 text at offset {exc.start}") from None

    # ------------------------------------------------------------ bodies

    def _read_some(self, response, amount: int) -> bytes:
        import urllib3

        try:
            data = response.read(amount, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"the connection broke mid-body: {_reason(exc)}") from None
        self.counter.add(nbytes=len(data))
        return data

    def _read_exactly(self, response, length: int, url: str, offset: int) -> bytes:
        """`length` body bytes, never more: a body that ends early is a broken connection (retried)."""
        if response.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise PackerfsError(f"the server sent a {response.headers['content-encoding']}-encoded range; not read")
        chunks, done = [], 0
        while done < length:
            data = self._read_some(response, length - done)
            if not data:
                raise _Transient(f"the response ended after {done} of {length} bytes")
            chunks.append(data)
            done += len(data)
        if response.headers.get("content-length") is None and self._read_some(response, 1):
            raise PackerfsError(f"the server sent more than the {length} bytes asked for; not read")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _status_error(self, response) -> PackerfsError:
        status = response.status
        try:
            body = response.read(TEXT_LIMIT, decode_content=False) or b""
        except Exception:  # noqa: BLE001 - only quoted in the message
            body = b""
        line = body.decode("utf-8", "replace").strip().splitlines()[0][:200] if body.strip() else ""
        if line.startswith("<"):  # an HTML error page says nothing the status does not
            line = ""
        said = f"{status} {response.reason or ''}".strip() + (f": {line}" if line else "")
        if status in (404, 410):
            return NotFound(f"not found ({said})")
        if status in (401, 403):
            return SourceUnavailable(f"access denied ({said}); a token goes in -o token_file=PATH")
        return PackerfsError(f"unexpected answer ({said})")


def _named(exc: PackerfsError, where: str) -> PackerfsError:
    """`exc` as one line that starts with `where` (the URL, and the offset where there is one)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith(where.split(" (offset")[0]):
        return exc
    if isinstance(exc, SourceUnavailable):
        return type(exc)(f"{where}: {text}", path=where)
    return PackerfsError(f"{where}: {text}")


def _split_auth(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, that "user:password" or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), urllib.parse.unquote(userinfo)


def _drop(response) -> None:
    """Done with a response: back to the pool if its body was read to the end, else the connection
    is closed with the rest unread (never drained: that could be a whole piece)."""
    fp = getattr(response, "_fp", None)
    if fp is not None and not fp.isclosed():
        response.close()
    response.release_conn()


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None) or exc
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    text = re.sub(r"<urllib3\.[^>]*>: ", "", text)
    if "[Errno" in text:  # "HTTPConnection(host=…): Failed to establish a new connection: [Errno 111] …"
        text = text[text.index("[Errno"):]
    return f"{type(inner).__name__}: {text}"[:240]


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _strong_or_weak(response) -> str | None:
    etag = response.headers.get("etag")
    return etag.strip() if etag and etag.strip() else None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.I)


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        raise PackerfsError(f"a 206/416 without a usable Content-Range ({(value or 'none')[:80]!r})")
    first, last, total = match.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total != "*" else None,
    )
