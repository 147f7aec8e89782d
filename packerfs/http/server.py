"""`packerfs serve`: the piece gateway on hypercorn (trio), over the same PackService as a mount.

hypercorn is the HTTP server: it speaks trio natively, so the gateway runs in the same event
loop as the service's window cache and workers, and it parses HTTP/1.1 (and h2 over TLS),
keep-alive and TLS itself. Nothing here parses HTTP.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
from typing import Callable

from packerfs.errors import UsageError

log = logging.getLogger("packerfs.http")

KEEP_ALIVE_SECONDS = 30
# A client that sends nothing (slowloris) is dropped after this; one that reads slowly only slows itself.
READ_TIMEOUT_SECONDS = 30


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {listen!r}: write HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 (port 0: any free port)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def read_token(path: str) -> bytes:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read(4097).strip()
    except OSError as exc:
        raise UsageError(f"--token-file {path}: cannot read: {exc.strerror}") from None
    if not token or len(token) > 4096 or any(c in token for c in b"\r\n "):
        raise UsageError(f"--token-file {path}: must hold one token (no spaces), up to 4096 bytes")
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: the token file is readable by others (chmod 600 it)", path)
    return token


def check_exposure(host: str, token: bytes | None, tls: bool, insecure_listen: bool) -> None:
    if token is None and not tls and not is_loopback(host) and not insecure_listen:
        raise UsageError(
            f"--listen {host}: not a loopback address, and neither --token-file nor --tls-cert is given: "
            f"anyone who can reach it could fetch the pieces; add a token (and TLS), or pass --insecure-listen"
        )


def serve_gateway(
    open_engine: Callable[[], object],
    state_dir: str,
    listen: str,
    *,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    insecure_listen: bool = False,
    max_connections: int = 64,
    skip_unreadable: bool = False,
    repack_below: float | None = None,
    announce: Callable[[str], None] = lambda url: None,
) -> int:
    import trio
    from hypercorn.config import Config

    from packerfs.fs.service import PackService
    from packerfs.http.gateway import Gateway, quiet_aborts

    host, port = parse_listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    token = read_token(token_file) if token_file else None
    check_exposure(host, token, bool(tls_cert), insecure_listen)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.read_timeout = READ_TIMEOUT_SECONDS
    config.h11_max_incomplete_size = 16 * 1024  # request heads larger than this are refused by hypercorn
    config.accesslog = None  # the gateway logs one line per request itself
    config.errorlog = logging.getLogger("hypercorn.error")
    quiet_aborts(config.errorlog)
    if tls_cert:
        for what, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if not os.path.isfile(path):
                raise UsageError(f"{what} {path}: no such file")
        config.certfile, config.keyfile = tls_cert, tls_key
    scheme = "https" if tls_cert else "http"
    with PackService(
        open_engine, state_dir, f"{scheme}://{listen}", skip_unreadable=skip_unreadable, repack_below=repack_below,
        info={"listen": listen}, follow=True,
    ) as service:
        app = Gateway(service.state, service.cache, token=token, max_connections=max_connections)
        try:
            trio.run(_main, app, config, service.services, scheme, announce)
        except (OSError, BaseExceptionGroup) as exc:
            failed = _bind_error(exc)
            if failed is None:
                raise
            raise UsageError(f"--listen {listen}: cannot listen: {failed.strerror or failed}") from None
    return 0


def _bind_error(exc: BaseException) -> OSError | None:
    """The OSError of a failed bind, bare or inside trio's exception groups (nothing else in them)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(OSError)
        if matched is not None and rest is None:
            while isinstance(matched, BaseExceptionGroup):
                matched = matched.exceptions[0]
            return matched
    return None


async def _main(app, config, services: list, scheme: str, announce: Callable[[str], None]) -> None:
    import trio
    from hypercorn.trio import serve

    stopped = trio.Event()

    async def shutdown_trigger() -> None:
        await stopped.wait()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: stopping the gateway", signal.Signals(signum).name)
                stopped.set()
                return

    async with trio.open_nursery() as nursery:
        for service in services:
            await nursery.start(service)
        nursery.start_soon(watch_signals)

        async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # hypercorn is done (graceful shutdown included): stop the services

        for bind in await nursery.start(run_server):
            announce(bind.replace("http://", f"{scheme}://", 1))


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
