"""The piece gateway as an ASGI application: HTTP requests mapped to the bins a PackService serves.

    GET|HEAD /piece/{cid}       the CAR of the bin whose piece CID (v1 baga6ea4sea… or v2 bafkzcib…) is
                                {cid}; FRC-0066: Range (one range), 206 / 416, ETag the piece CID
    GET|HEAD /piece?id={cid}    the same, the way Curio's PieceLocator asks
    GET /manifest.csv, /manifest.json, /status

It holds no format logic: bytes come from the same WindowCache (worker processes, BinReader) as
the mount's, so a piece fetched here is byte-identical to `pack`'s CAR with the same state. The
HTTP itself (parsing, keep-alive, TLS) is hypercorn's.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import urllib.parse
from email.utils import formatdate
from typing import Awaitable, Callable

import trio

from packerfs.pack.writer import car_name, manifest_csv, manifest_json

log = logging.getLogger("packerfs.http")
access = logging.getLogger("packerfs.http.access")

CAR_TYPE = b"application/vnd.ipld.car; version=1"
CHUNK = 1 << 20  # bytes per send: one cache window
MAX_RANGE_HEADER = 200  # a single byte range never needs more; longer ones are ignored


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end) of a satisfiable single `bytes=` range, None to send the whole piece (no range, or
    one we ignore as RFC 9110 allows: malformed, multiple ranges, another unit), or "unsatisfiable"."""
    if header is None or len(header) > MAX_RANGE_HEADER:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or (not first and not last):
        return None
    if not first:  # a suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None  # bytes=5-2 is invalid, so ignored
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


class Transfers:
    """The pieces being sent now, for /status."""

    def __init__(self):
        self.active: dict[int, dict] = {}
        self.next_id = 0
        self.served = 0
        self.bytes_sent = 0

    def start(self, piece: str, client: str, start: int, end: int) -> dict:
        self.next_id += 1
        entry = {"piece": piece, "client": client, "range": [start, end], "sent": 0, "started": time.time()}
        self.active[self.next_id] = entry
        entry["_id"] = self.next_id
        return entry

    def end(self, entry: dict) -> None:
        self.active.pop(entry["_id"], None)
        self.served += 1

    def status(self) -> dict:
        return {
            "transfers": [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.active.values()],
            "pieces_served": self.served,
            "bytes_sent": self.bytes_sent,
        }


class Gateway:
    def __init__(self, state, cache, *, token: bytes | None = None, max_connections: int = 64):
        """`state`: the service's ViewState (which bins exist); `cache`: its WindowCache."""
        self.state = state
        self.cache = cache
        self.token = token
        self.max_connections = max_connections
        self.transfers = Transfers()
        self._by_cid: tuple[tuple, dict[str, int]] = ((), {})

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.monotonic()
        response = _Response(send)
        try:
            # The server drops what is sent after the client hangs up, and says so only through
            # receive(): watch it, and stop regenerating the rest of the piece for nobody.
            aborted = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, response, nursery.cancel_scope)
                try:
                    await self._handle(scope, response)
                except _Abort as exc:
                    aborted = exc  # raised bare below, not in the nursery's exception group: quiet_aborts() knows it
                nursery.cancel_scope.cancel()
            if aborted is not None:
                raise aborted
        finally:
            client = scope.get("client") or ("-", 0)
            access.info(
                '%s "%s %s" %s %s bytes=%d %.3fs%s', client[0], scope["method"], _target(scope), response.status,
                response.range_text, response.sent, time.monotonic() - started,
                " ABORTED (ended short; see the error above)" if response.aborted else
                " CLIENT GONE (hung up before the end)" if response.gone else "",
            )

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope, response: "_Response") -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await response.simple(405, f"{method} is not served here: GET and HEAD only\n", [(b"allow", b"GET, HEAD")])
            return
        head = method == "HEAD"
        headers = _headers(scope)
        if self.token is not None and not self._authorized(headers.get("authorization")):
            await response.simple(401, "a bearer token is needed: Authorization: Bearer <token>\n",
                                  [(b"www-authenticate", b'Bearer realm="packerfs"')], head=head)
            return
        path = scope["path"]
        if path.startswith("/piece/") or path == "/piece":
            if path == "/piece":
                query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
                cid = (query.get("id") or [""])[0]
            else:
                cid = path[len("/piece/"):]
            await self._piece(cid, headers, head, scope, response)
        elif path == "/manifest.csv":
            await response.simple(200, manifest_csv(self.state.visible()), [(b"content-type", b"text/csv")], head=head)
        elif path == "/manifest.json":
            await response.simple(200, manifest_json(self.state.visible()), [(b"content-type", b"application/json")],
                                  head=head)
        elif path == "/status":
            status = {**self.state.status(), **self.transfers.status()}
            await response.simple(200, json.dumps(status, indent=1) + "\n", [(b"content-type", b"application/json")],
                                  head=head)
        else:
            await response.simple(404, "not found: try /piece/{piece CID}, /manifest.csv, /manifest.json or /status\n",
                                  head=head)

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        # compared in constant time, whatever was sent
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("utf-8", "replace"), self.token)

    def _bin_of(self, cid: str) -> dict | None:
        bins = self.state.visible()
        key = tuple(b["bin"] for b in bins)
        if self._by_cid[0] != key:
            table = {}
            for result in bins:
                for field in ("piece_cid", "piece_cid_v2"):
                    if result.get(field):
                        table[result[field]] = result["bin"]
            self._by_cid = (key, table)
        number = self._by_cid[1].get(cid)
        return self.state.result(number) if number is not None else None

    async def _piece(self, cid: str, headers: dict, head: bool, scope, response: "_Response") -> None:
        result = self._bin_of(cid)
        if result is None:
            status = self.state.status()
            if status["state"] == "scanning":
                text = (f"piece {cid} is not known (yet): the scan is still running, {status['bins_sealed']} bins "
                        f"sealed so far; a bin's piece CID exists once it is sealed\n")
            else:
                text = f"piece {cid} is not one of the {status['bins_sealed']} pieces served here\n"
            await response.simple(404, text, head=head)
            return
        number, size = result["bin"], result["car_size"]
        etag = f'"{result["piece_cid"]}"'.encode()
        modified = formatdate(self.state.mtime_ns / 1e9, usegmt=True).encode()
        common = [
            (b"content-type", CAR_TYPE), (b"accept-ranges", b"bytes"), (b"etag", etag), (b"last-modified", modified),
            (b"content-disposition", f'attachment; filename="{car_name(number)}"'.encode()),
        ]
        wanted = parse_range(headers.get("range"), size)
        if_range = headers.get("if-range")
        if wanted is not None and if_range is not None and if_range.encode() not in (etag, modified):
            wanted = None  # the client's copy is another version: send the whole piece
        if wanted == "unsatisfiable":
            await response.simple(416, f"range not satisfiable: the piece is {size} bytes\n",
                                  [(b"content-range", f"bytes */{size}".encode())], head=head)
            return
        if wanted is None:
            status, start, end = 200, 0, size
            extra = []
        else:
            status, (start, end) = 206, wanted
            extra = [(b"content-range", f"bytes {start}-{end - 1}/{size}".encode())]
            response.range_text = f"range={start}-{end - 1}"
        if status == 200 or head:
            response.range_text = response.range_text or "range=-"
        if head:
            await response.start(status, [*common, *extra, (b"content-length", str(end - start).encode())])
            await response.finish()
            return
        if len(self.transfers.active) >= self.max_connections:
            await response.simple(503, f"{self.max_connections} transfers are running; retry later\n",
                                  [(b"retry-after", b"5")])
            return
        await response.start(status, [*common, *extra, (b"content-length", str(end - start).encode())])
        client = (scope.get("client") or ("-",))[0]
        transfer = self.transfers.start(cid, client, start, end)
        try:
            offset = start
            while offset < end:
                try:
                    data = await self.cache.read(number, size, offset, min(CHUNK, end - offset), sequential=True,
                                                 ahead_until=end)
                except Exception as exc:  # noqa: BLE001 - any failure ends this response short, never the server
                    self._read_failed(number, offset, exc)
                    response.aborted = True
                    raise _Abort() from None
                await response.body(bytes(data))
                offset += len(data)
                transfer["sent"] = offset - start
                self.transfers.bytes_sent += len(data)
            await response.finish()
        finally:
            self.transfers.end(transfer)

    def _read_failed(self, number: int, offset: int, exc: Exception) -> None:
        from packerfs.errors import PackerfsError

        message = str(exc) if isinstance(exc, PackerfsError) else f"{car_name(number)}: {type(exc).__name__}: {exc}"
        if self.state.read_failed(number, message):
            log.error("%s: read at offset %d failed; the response ends short: %s", car_name(number), offset, message)


class _Abort(Exception):
    """Ends a response mid-body: the server closes the connection short of its Content-Length.

    The gateway has already logged why (file and offset); quiet_aborts() keeps the server from
    logging it again as a traceback."""


class _QuietAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Abort))


def quiet_aborts(logger: logging.Logger) -> None:
    logger.addFilter(_QuietAborts())


class _Response:
    def __init__(self, send: Callable[[dict], Awaitable[None]]):
        self.send = send
        self.status = 0
        self.sent = 0
        self.range_text = ""
        self.aborted = False
        self.gone = False

    async def start(self, status: int, headers: list) -> None:
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})
        self.sent += len(data)

    async def finish(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def simple(self, status: int, text: str, headers: list = (), head: bool = False) -> None:
        """A whole small response; text/plain unless `headers` name another type."""
        body = text.encode()
        typed = any(name == b"content-type" for name, _ in headers)
        plain = [] if typed else [(b"content-type", b"text/plain; charset=utf-8")]
        await self.start(status, [*plain, *headers, (b"content-length", str(len(body)).encode())])
        if not head:
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            self.sent += len(body)
        else:
            await self.finish()


async def _watch_disconnect(receive, response: _Response, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    response.gone = True
    scope.cancel()


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "range" and key in out:
            out[key] = "invalid, given twice"
        else:
            out[key] = text
    return out


def _target(scope) -> str:
    query = scope.get("query_string", b"")
    return scope["path"] + ("?" + query.decode("latin-1") if query else "")
