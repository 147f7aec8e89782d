"""Self-tests of tests/objstores.py: the local object-store servers and the FaultProxy."""

import hashlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import objstores
from objstores import FaultProxy, Server, ServerStartError

KINDS = ["s3_server", "azure_server", "gcs_server"]
FILES = {
    "a.txt": b"hello world",
    "sub/x.bin": bytes(range(256)) * 40,
    "sub/deeper/y": b"y" * 1000,
    "sp ace/ünï.txt": b"unicode",
}
# Fail fast through the proxy: one botocore attempt per s3fs try.
NO_RETRY = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def _strip(fs, path: str) -> str:
    return fs._strip_protocol(path).rstrip("/")


@pytest.fixture(params=KINDS)
def server(request) -> Server:
    return request.getfixturevalue(request.param)


# -- servers -----------------------------------------------------------------------------------


def test_server_write_list_read(server):
    assert server.url.startswith("http://127.0.0.1:")
    bucket = server.new_bucket()
    server.upload_tree(bucket, "data/", FILES)
    fs = server.fs()
    fs.pipe_file(f"{bucket}/data/piped", b"0123456789")

    listing = {_strip(fs, e["name"]): e for e in fs.ls(f"{bucket}/data", detail=True)}
    assert set(listing) == {f"{bucket}/data/{n}" for n in ("a.txt", "piped", "sub", "sp ace")}
    assert listing[f"{bucket}/data/a.txt"]["type"] == "file"
    assert listing[f"{bucket}/data/a.txt"]["size"] == 11
    assert listing[f"{bucket}/data/sub"]["type"] == "directory"

    found = server.fs().find(f"{bucket}/data")
    assert sorted(found) == sorted(f"{bucket}/data/{k}" for k in [*FILES, "piped"])

    fs = server.fs()
    assert fs.cat_file(f"{bucket}/data/piped", start=2, end=5) == b"234"
    assert fs.cat_file(f"{bucket}/data/sub/x.bin", start=250, end=260) == FILES["sub/x.bin"][250:260]
    assert fs.cat_file(f"{bucket}/data/sp ace/ünï.txt") == b"unicode"
    with fs.open(f"{bucket}/data/sub/deeper/y", "rb", cache_type="none") as f:
        f.seek(990)
        assert f.read() == b"y" * 10


def test_folder_marker_listing(s3_server, azure_server, gcs_memory_server, gcs_server):
    """Pins what each fsspec backend makes of an empty "p/dir/" object (see the report)."""
    seen = {}
    for server in (s3_server, azure_server, gcs_memory_server, gcs_server):
        bucket = server.new_bucket()
        server.upload_tree(bucket, "p/", {"dir/": b"", "f": b"1"})
        fs = server.fs()
        top = {e["name"][len(bucket) + 1 :]: e["type"] for e in fs.ls(f"{bucket}/p", detail=True)}
        try:
            inner = [(e["name"][len(bucket) + 1 :], e["type"]) for e in server.fs().ls(f"{bucket}/p/dir", detail=True)]
        except FileNotFoundError:
            inner = "FileNotFoundError"
        found = [n[len(bucket) + 1 :] for n in server.fs().find(f"{bucket}/p")]
        seen[f"{server.kind}-{getattr(server, 'backend', '')}"] = (top, inner, found)
    assert seen == {
        "moto-": ({"p/dir": "directory", "p/f": "file"}, [("p/dir/", "file")], ["p/dir/", "p/f"]),
        "azurite-": ({"p/dir": "directory", "p/f": "file"}, [("p/dir", "file")], ["p/dir", "p/f"]),
        "fake-gcs-memory": ({"p/dir": "directory", "p/f": "file"}, [("p/dir", "directory")], ["p/dir/", "p/f"]),
        # the filesystem backend does not store the marker at all
        "fake-gcs-filesystem": ({"p/f": "file"}, "FileNotFoundError", ["p/f"]),
    }


def test_env_reaches_the_server_from_a_subprocess(s3_server, azure_server, gcs_server):
    """`.env` alone configures each SDK the way a user would (no endpoint in code)."""
    code = {
        "s3": "import s3fs; print(s3fs.S3FileSystem().cat_file(sys.argv[1]).decode())",
        "az": "import adlfs; print(adlfs.AzureBlobFileSystem().cat_file(sys.argv[1]).decode())",
        "gs": "import gcsfs; print(gcsfs.GCSFileSystem().cat_file(sys.argv[1]).decode())",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "STORAGE_EMULATOR", "GCSFS_"))}
    procs = []
    for server in (s3_server, azure_server, gcs_server):
        bucket = server.new_bucket()
        server.upload_tree(bucket, "", {"k": f"from {server.kind}".encode()})
        procs.append(
            (
                server,
                subprocess.Popen(
                    [sys.executable, "-c", "import sys\n" + code[server.scheme], f"{bucket}/k"],
                    env={**clean, **server.env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    for server, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == f"from {server.kind}"


def test_version_tokens(s3_server, azure_server, gcs_memory_server):
    # S3: VersionId on a versioned bucket; ETag is the MD5 of the bytes.
    bucket = s3_server.new_bucket(versioned=True)
    client = s3_server.client()
    v1 = client.put_object(Bucket=bucket, Key="k", Body=b"0123456789")["VersionId"]
    client.put_object(Bucket=bucket, Key="k", Body=b"abcdefghij")
    fs = s3_server.fs(version_aware=True)
    assert fs.ls(bucket, detail=True)[0]["VersionId"] != v1
    assert fs.cat_file(f"{bucket}/k", version_id=v1, start=2, end=5) == b"234"
    assert s3_server.fs().info(f"{bucket}/k")["ETag"] == '"' + hashlib.md5(b"abcdefghij").hexdigest() + '"'

    # Azure: etag changes on every write, even of identical bytes.
    bucket = azure_server.new_bucket()
    azure_server.upload_tree(bucket, "", {"k": b"same"})
    e1 = azure_server.fs().info(f"{bucket}/k")["etag"]
    azure_server.upload_tree(bucket, "", {"k": b"same"})
    assert azure_server.fs().info(f"{bucket}/k")["etag"] != e1

    # GCS: generation, pinned reads with version_aware=True and path#generation.
    bucket = gcs_memory_server.new_bucket(versioned=True)
    g1 = gcs_memory_server.put_object(bucket, "k", b"0123456789")["generation"]
    gcs_memory_server.put_object(bucket, "k", b"abcdefghij")
    fs = gcs_memory_server.fs(version_aware=True)
    assert fs.info(f"{bucket}/k")["generation"] != g1
    assert fs.cat_file(f"{bucket}/k#{g1}", start=2, end=5) == b"234"
    assert fs.cat_file(f"{bucket}/k", start=2, end=5) == b"cde"


def test_fake_gcs_filesystem_backend_refuses_versioning(gcs_server):
    with pytest.raises(ValueError, match="memory"):
        gcs_server.new_bucket(versioned=True)


@pytest.mark.parametrize("kind", ["azure", "gcs"])
def test_restart_keeps_data_and_port(kind, request):
    server = request.getfixturevalue(f"fresh_{kind}_server")
    bucket = server.new_bucket()
    server.upload_tree(bucket, "p/", {"kept": b"still here"})
    url = server.url
    server.stop()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    server.start()
    assert server.url == url
    assert server.fs().cat_file(f"{bucket}/p/kept") == b"still here"


def test_moto_restart_is_empty(fresh_s3_server):
    bucket = fresh_s3_server.new_bucket()
    fresh_s3_server.upload_tree(bucket, "", {"k": b"gone after restart"})
    url = fresh_s3_server.url
    fresh_s3_server.restart()
    assert fresh_s3_server.url == url
    with pytest.raises(FileNotFoundError):
        fresh_s3_server.fs().ls(bucket)


class _Exits(Server):
    kind = "exits"

    def command(self):
        return [sys.executable, "-c", "import sys; sys.stderr.write('boom: cannot start\\n'); sys.exit(3)"]


class _Silent(Server):
    kind = "silent"

    def command(self):
        return [sys.executable, "-c", "import sys, time; print('listening soon', flush=True); time.sleep(60)"]


def test_startup_failure_reports_log_tail(tmp_path):
    server = _Exits(tmp_path / "a")
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: cannot start"):
        server.start()
    assert not server.running

    server = _Silent(tmp_path / "b")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)did not answer.*listening soon"):
        server.start(timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert server.proc is None  # terminated and reaped


def test_context_manager_stops_the_server(tmp_path):
    with objstores.fake_gcs_server(tmp_path) as gcs:
        proc = gcs.proc
        assert gcs.running
        bucket = gcs.new_bucket()
        assert gcs.fs().ls(bucket) == []
    assert proc.poll() is not None
    assert not gcs.running


def test_non_loopback_is_refused():
    with pytest.raises(ValueError, match="non-loopback"):
        FaultProxy("http://10.0.0.1:9000")


# -- FaultProxy --------------------------------------------------------------------------------


class _Upstream(http.server.BaseHTTPRequestHandler):
    """A tiny HTTP/1.1 upstream with every body framing the proxy must relay."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"read me until EOF")
            self.close_connection = True
        else:
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"z" * n)

    do_HEAD = do_GET

    def do_PUT(self):
        body = self._body()
        reply = json.dumps({"len": len(body), "sha": hashlib.sha256(body).hexdigest()}).encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_POST = do_PUT


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients cut off by the proxy's kill()/cut() are expected here


@pytest.fixture
def upstream():
    httpd = _QuietServer(("127.0.0.1", 0), _Upstream)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def proxy(upstream):
    with FaultProxy(upstream) as p:
        yield p


def test_proxy_keep_alive_framings(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    received = 0

    def body(resp) -> bytes:
        nonlocal received
        data = resp.read()
        received += len(data)
        return data

    try:
        for _ in range(2):
            conn.request("GET", "/len/5000")
            resp = conn.getresponse()
            assert resp.status == 200 and body(resp) == b"z" * 5000
        conn.request("HEAD", "/len/123")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == "123" and body(resp) == b""
        conn.request("GET", "/chunked")
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert body(resp) == b"first,second,third"
        conn.request("PUT", "/echo", body=b"x" * 70000)
        assert json.loads(body(conn.getresponse()))["len"] == 70000
        conn.request("PUT", "/echo", body=iter([b"ab", b"cd", b"e" * 100000]), encode_chunked=True)
        got = json.loads(body(conn.getresponse()))
        assert got == {"len": 100004, "sha": hashlib.sha256(b"abcd" + b"e" * 100000).hexdigest()}
        conn.request("GET", "/until-close")
        resp = conn.getresponse()
        assert body(resp) == b"read me until EOF"
    finally:
        conn.close()
    assert proxy.connections == 1  # one keep-alive connection carried all seven
    assert proxy.requests == 7 and proxy.refused == 0
    assert proxy.bytes_forwarded == received
    assert [e.status for e in proxy.history] == [200, 200, 200, 200, 201, 201, 200]


def test_proxy_answers_expect_100_continue(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"data")
        f = s.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 201")


def test_proxy_throttle_and_deny_raw(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        proxy.throttle(2)
        for _ in range(2):
            conn.request("GET", "/len/10")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 503 and b"<Code>SlowDown</Code>" in body
            assert b"<Message>Please reduce your request rate.</Message>" in body
        conn.request("GET", "/len/10")
        assert conn.getresponse().read() == b"z" * 10
        proxy.throttle(1, status=429)
        conn.request("PUT", "/echo", body=b"discarded")  # a refused body is drained, keep-alive survives
        resp = conn.getresponse()
        assert resp.status == 429 and b"SlowDown" in resp.read()
        proxy.deny()
        for method in ("GET", "HEAD"):
            conn.request(method, "/len/10")
            resp = conn.getresponse()
            assert resp.status == 403
            assert (b"<Code>AccessDenied</Code>" in resp.read()) == (method == "GET")
        proxy.allow()
        conn.request("GET", "/len/3")
        assert conn.getresponse().read() == b"zzz"
    finally:
        conn.close()
    assert (proxy.requests, proxy.refused, proxy.seen) == (2, 5, 7)
    assert proxy.connections == 1


def test_proxy_kill_mid_transfer_and_restart(proxy):
    port = proxy.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/len/{64 << 20}")
    resp = conn.getresponse()
    got = len(resp.read(1000))
    proxy.kill()
    try:
        while chunk := resp.read(1 << 20):  # read(amt) returns b"" at a premature EOF; a reset raises
            got += len(chunk)
    except OSError:
        pass
    conn.close()
    assert 1000 <= got < 64 << 20
    assert proxy.bytes_forwarded < 64 << 20
    assert proxy.history[-1].status == "killed"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    proxy.restart()
    assert proxy.port == port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/len/7")
    assert conn.getresponse().read() == b"z" * 7
    conn.close()


def test_proxy_cut(proxy):
    proxy.cut(1000)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("HEAD", "/len/5000")  # no body: not cut
    conn.getresponse().read()
    conn.request("GET", "/len/5000")
    with pytest.raises((http.client.IncompleteRead, OSError)):
        conn.getresponse().read()
    conn.close()
    assert proxy.history[-1].status == "cut" and proxy.history[-1].body_bytes == 1000


def test_proxy_close_with_idle_keepalive_connection(upstream):
    p = FaultProxy(upstream).start()
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    conn.request("GET", "/len/1")
    conn.getresponse().read()
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 5
    assert not p._threads
    conn.close()


def test_proxy_in_front_of_s3(s3_server, s3_proxy):
    bucket = s3_server.new_bucket()
    data = bytes(range(256)) * 4
    s3_server.upload_tree(bucket, "p/", {"obj": data})
    assert s3_proxy.env["AWS_ENDPOINT_URL"] == s3_proxy.url
    assert s3_proxy.storage_options["endpoint_url"] == s3_proxy.url

    fs = s3_proxy.fs(**NO_RETRY)
    s3_proxy.reset_counters()
    assert fs.cat_file(f"{bucket}/p/obj", start=100, end=200) == data[100:200]
    assert s3_proxy.bytes_forwarded == 100

    s3_proxy.throttle(1)  # botocore retries the 503 SlowDown by itself
    assert s3_proxy.fs().cat_file(f"{bucket}/p/obj", start=0, end=4) == data[:4]
    assert s3_proxy.refused == 1

    s3_proxy.deny()
    with pytest.raises(PermissionError):
        s3_proxy.fs(**NO_RETRY).ls(bucket)
    s3_proxy.allow()

    s3_proxy.kill()
    fs = s3_proxy.fs(**NO_RETRY)
    fs.retries = 1
    t0 = time.monotonic()
    with pytest.raises(Exception, match="Could not connect"):
        fs.cat_file(f"{bucket}/p/obj")
    assert time.monotonic() - t0 < 10
    s3_proxy.restart()
    assert fs.cat_file(f"{bucket}/p/obj", start=0, end=2) == data[:2]


@pytest.mark.parametrize("kind", ["azure_server", "gcs_server"])
def test_proxy_in_front_of_azure_and_gcs(kind, request):
    server = request.getfixturevalue(kind)
    bucket = server.new_bucket()
    server.upload_tree(bucket, "", {"obj": b"0123456789" * 100})
    with FaultProxy(server) as p:
        fs = p.fs()
        assert fs.cat_file(f"{bucket}/obj", start=5, end=15) == b"5678901234"
        assert p.bytes_forwarded == 10
        assert [e.status for e in p.history] == [206]
        p.deny()
        with pytest.raises(OSError if server.scheme == "gs" else Exception, match="Forbidden|Authorization"):
            p.fs().cat_file(f"{bucket}/obj")
