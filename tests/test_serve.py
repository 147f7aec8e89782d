"""Issue 11: `packerfs serve`, the HTTP piece gateway, with real clients (curl, aria2c, node).

Each gateway is a `packerfs serve` subprocess on a free loopback port (port 0, read back from
its first line), stopped in a finally (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import stop_process, PACKERFS, ROOT, packerfs, run_tool, write_random
from packerfs.crypt import write_age_identity

MiB = 1 << 20
BIN = "8MiB"
START_TIMEOUT = 30


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


class Gateway:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def get(self, path: str, headers: dict | None = None, method: str = "GET", timeout: float = 30):
        request = urllib.request.Request(self.url + path, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def wait_ready(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = json.loads(self.get("/status", self.auth)[2])
            if status["state"] == "ready":
                return status
            assert status["state"] != "failed", status["errors"]
            time.sleep(0.1)
        raise TimeoutError("the gateway's scan did not finish")

    auth: dict = {}


@contextmanager
def gateway(src: Path, state: Path, tmp_path: Path, *options, token: str | None = None):
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    args = [*PACKERFS, "serve", str(src), "--listen", "127.0.0.1:0", "-t", str(state), *map(str, options)]
    with open(log, "wb") as err:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
    try:
        line = b""
        deadline = time.monotonic() + START_TIMEOUT
        os.set_blocking(process.stdout.fileno(), False)
        while b"\n" not in line and time.monotonic() < deadline and process.poll() is None:
            line += process.stdout.read() or b""
            time.sleep(0.05)
        match = re.search(rb"(https?://127\.0\.0\.1:\d+)", line)
        assert match, f"the gateway did not start: {line!r} {log.read_text()[-2000:]}"
        g = Gateway(process, match.group(1).decode(), log)
        if token:
            g.auth = {"Authorization": f"Bearer {token}"}
        yield g
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """An age-encrypted source packed into 8 MiB bins: (src, state, out, options)."""
    base = tmp_path_factory.mktemp("served")
    src = base / "src"
    write_random(src / "big.bin", 19 * MiB + 5, 1)
    write_random(src / "dir" / "small.txt", 5000, 2)
    write_random(src / "dir" / "mid.bin", 3 * MiB, 3)
    key = base / "key.txt"
    options = ["--recipient", write_age_identity(str(key)), "--bin-size", BIN]
    out, state = base / "out", base / "state"
    packerfs("pack", src, out, "-t", state, *options)
    return src, state, out, options


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; ./run setup installs it")
        pytest.skip(f"{tool} is not installed")
    return found


def test_curl_and_aria2c_fetch_the_pieces_pack_wrote(packed, tmp_path):
    src, state, out, options = packed
    curl, aria2c = need("curl"), need("aria2c")
    rows = manifest(out)
    assert len(rows) >= 3
    with gateway(src, state, tmp_path, *options) as g:
        g.wait_ready()
        for row in rows:
            car = (out / row["car_file"]).read_bytes()
            for cid in (row["piece_cid"], row["piece_cid_v2"]):
                got = tmp_path / f"{cid}.car"
                run_tool(curl, "-sfS", "-o", got, f"{g.url}/piece/{cid}", check=True)
                assert got.read_bytes() == car
            # ranges, and a resumed download (-C -) of a half-copied piece
            ranged = run_tool(curl, "-sfS", "-r", "1000-1999", f"{g.url}/piece/{row['piece_cid']}", check=True)
            assert ranged.stdout == car[1000:2000]
            half = tmp_path / "half.car"
            half.write_bytes(car[: len(car) // 2])
            run_tool(curl, "-sfS", "-C", "-", "-o", half, f"{g.url}/piece/{row['piece_cid']}", check=True)
            assert half.read_bytes() == car
            head = run_tool(curl, "-sfSI", f"{g.url}/piece/{row['piece_cid']}", check=True).stdout.decode().lower()
            assert f"content-length: {len(car)}" in head
            assert "content-type: application/vnd.ipld.car; version=1" in head
            assert f'etag: "{row["piece_cid"]}"' in head and "accept-ranges: bytes" in head
        row = max(rows, key=lambda r: int(r["car_size"]))
        parallel = tmp_path / "aria"
        result = run_tool(aria2c, "-q", "-x", "4", "-s", "4", "-k", "1M", "--allow-overwrite=true", "-d", parallel,
                          "-o", "piece.car", f"{g.url}/piece/{row['piece_cid']}", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (parallel / "piece.car").read_bytes() == (out / row["car_file"]).read_bytes()
        # Curio's PieceLocator asks /piece?id=
        status, headers, body = g.get(f"/piece?id={row['piece_cid']}", method="HEAD")
        assert status == 200 and int(headers["content-length"]) == int(row["car_size"]) and body == b""
        assert g.get("/manifest.csv")[2] == (out / "manifest.csv").read_bytes()
        assert g.get("/manifest.json")[2] == (out / "manifest.json").read_bytes()
    log = g.log.read_text()
    assert re.search(r'"GET /piece/baga\S+" 206 range=1000-1999 bytes=1000', log), log[-3000:]
    assert "Traceback" not in log


@pytest.mark.interop
def test_downloaded_pieces_have_the_commp_in_their_url(packed, tmp_path):
    """The commP of what came over HTTP, by @web3-storage/data-segment, is the CID the URL named."""
    from test_piece import DATA_SEGMENT, NODE_SCRIPT

    if not DATA_SEGMENT.exists():
        pytest.fail("node_modules/@web3-storage/data-segment is absent; ./run setup installs it")
    src, state, out, options = packed
    rows = manifest(out)
    paths = []
    with gateway(src, state, tmp_path, *options) as g:
        for row in rows:
            status, _, body = g.get(f"/piece/{row['piece_cid_v2']}")
            assert status == 200
            path = tmp_path / f"{row['car_file']}"
            path.write_bytes(body)
            paths.append(path)
    script = tmp_path / "commp.mjs"
    script.write_text(NODE_SCRIPT)
    proc = run_tool(need("node"), script, DATA_SEGMENT, *paths, timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)
    assert [t["v1"] for t in theirs] == [r["piece_cid"] for r in rows]
    assert [t["v2"] for t in theirs] == [r["piece_cid_v2"] for r in rows]


def test_status_codes_and_odd_ranges(packed, tmp_path):
    src, state, out, options = packed
    token = "t0k3n-" + os.urandom(8).hex()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    row = manifest(out)[0]
    car = (out / row["car_file"]).read_bytes()
    piece = f"/piece/{row['piece_cid']}"
    with gateway(src, state, tmp_path, *options, "--token-file", token_file, token=token) as g:
        assert g.get(piece)[0] == 401
        assert g.get(piece, {"Authorization": "Bearer wrong"})[0] == 401
        assert g.get(piece, {"Authorization": f"Basic {token}"})[0] == 401
        status, headers, body = g.get(piece, g.auth)
        assert status == 200 and body == car
        assert g.get("/piece/baga6ea4seaqnotapiecehere", g.auth)[0] == 404
        assert g.get("/elsewhere", g.auth)[0] == 404
        assert g.get(piece, {**g.auth}, method="DELETE")[0] == 405
        status, headers, _ = g.get(piece, {**g.auth, "Range": "bytes=999999999999-"})
        assert status == 416 and headers["content-range"] == f"bytes */{len(car)}"
        assert g.get(piece, {**g.auth, "Range": "bytes=-0"})[0] == 416
        status, headers, body = g.get(piece, {**g.auth, "Range": "bytes=-100"})
        assert status == 206 and body == car[-100:]
        assert headers["content-range"] == f"bytes {len(car) - 100}-{len(car) - 1}/{len(car)}"
        # malformed or several ranges are ignored (RFC 9110 allows it): the whole piece, never a 500
        for odd in ("bytes=5-2", "bytes=0-1,5-6", "pages=1-2", "bytes=x-y", "bytes=" + "9" * 10_000):
            status, _, body = g.get(piece, {**g.auth, "Range": odd})
            assert status == 200 and body == car, odd
        # If-Range: the same ETag resumes, another one gets the whole piece
        etag = f'"{row["piece_cid"]}"'
        assert g.get(piece, {**g.auth, "Range": "bytes=10-", "If-Range": etag})[2] == car[10:]
        assert g.get(piece, {**g.auth, "Range": "bytes=10-", "If-Range": '"other"'})[2] == car
    refused = packerfs("serve", src, "--listen", "192.0.2.1:0", "-t", state, *options, check=False, timeout=60)
    assert refused.returncode == 2 and "--token-file" in refused.stderr.decode()


def test_a_changed_source_ends_the_response_short_and_spares_other_pieces(tmp_path):
    src = tmp_path / "src"
    write_random(src / "a-first", 10 * MiB, 1)
    write_random(src / "b-second", 10 * MiB, 2)
    options = ["--no-encryption", "--bin-size", BIN]
    out, state = tmp_path / "out", tmp_path / "state"
    packerfs("pack", src, out, "-t", state, *options)
    rows = manifest(out)
    with gateway(src, state, tmp_path, *options) as g:
        g.wait_ready()
        with open(src / "a-first", "r+b") as f:  # after the scan: only reads can notice
            f.seek(100)
            f.write(b"changed")
        status, headers, body = _raw_get(g.url, f"/piece/{rows[0]['piece_cid']}")
        assert status == 200 and len(body) < int(headers["content-length"])
        assert body == (out / rows[0]["car_file"]).read_bytes()[: len(body)]  # never a wrong byte
        last = rows[-1]
        assert g.get(f"/piece/{last['piece_cid']}")[2] == (out / last["car_file"]).read_bytes()
        status = json.loads(g.get("/status")[2])
        assert status["stale"] == ["a-first"]
    log = g.log.read_text()
    assert "a-first" in log and "ends short" in log and "ABORTED" in log and "Traceback" not in log


def _raw_get(base: str, path: str) -> tuple[int, dict, bytes]:
    """GET that keeps what arrived when the server closes the connection early."""
    import http.client

    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        body = bytearray()
        try:
            while chunk := answer.read(65536):
                body += chunk
        except http.client.IncompleteRead as short:
            body += short.partial
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, bytes(body)
    finally:
        conn.close()


def test_concurrent_clients_and_a_stalled_one(packed, tmp_path):
    src, state, out, options = packed
    rows = manifest(out)
    cars = {r["piece_cid"]: (out / r["car_file"]).read_bytes() for r in rows}
    with gateway(src, state, tmp_path, *options) as g:
        host, port = g.url.split("//")[1].split(":")
        # a slowloris: one connection that sends half a request head and nothing more,
        # and one that asks for a piece and never reads it
        stalled_head = socket.create_connection((host, int(port)))
        stalled_head.sendall(b"GET /piece/")
        stalled_reader = socket.create_connection((host, int(port)))
        stalled_reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled_reader.sendall(f"GET /piece/{rows[0]['piece_cid']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            def client(seed: int) -> int:
                rng = random.Random(seed)
                checked = 0
                for _ in range(6):
                    cid = rng.choice(list(cars))
                    car = cars[cid]
                    start = rng.randrange(len(car))
                    end = min(len(car), start + rng.randrange(1, 3 * MiB))
                    status, _, body = g.get(f"/piece/{cid}", {"Range": f"bytes={start}-{end - 1}"}, timeout=30)
                    assert status == 206 and body == car[start:end]
                    checked += 1
                return checked

            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                assert sum(pool.map(client, range(16))) == 96
            assert time.monotonic() - started < 60
        finally:
            stalled_head.close()
            stalled_reader.close()
        status = json.loads(g.get("/status")[2])
        assert status["pieces_served"] >= 96


def test_tls(packed, tmp_path):
    src, state, out, options = packed
    openssl, curl = need("openssl"), need("curl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run_tool(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", check=True)
    row = manifest(out)[0]
    with gateway(src, state, tmp_path, *options, "--tls-cert", cert, "--tls-key", key) as g:
        assert g.url.startswith("https://")
        got = run_tool(curl, "-sfS", "--cacert", cert, f"{g.url}/piece/{row['piece_cid']}", check=True).stdout
        assert got == (out / row["car_file"]).read_bytes()


@pytest.mark.fuse
def test_serve_beside_a_mount_of_the_same_state(tmp_path):
    """The mount owns the state and scans; the gateway follows what it seals and serves the same bytes."""
    from test_mount import mount

    src = tmp_path / "src"
    write_random(src / "one", 9 * MiB, 1)
    write_random(src / "two", 5 * MiB, 2)
    options = ["--no-encryption", "--bin-size", BIN]
    state = tmp_path / "state"
    with mount(src, tmp_path / "mnt", state, *options) as m:
        with gateway(src, state, tmp_path, *options) as g:
            m.wait_ready()
            cars = {name: (m.mnt / name).read_bytes() for name in m.cars()}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = json.loads(g.get("/status")[2])
                if status["cars"] == sorted(cars):
                    break
                time.sleep(0.2)
            assert status["state"] == "following" and status["cars"] == sorted(cars)
            rows = {r["car_file"]: r for r in csv.DictReader(g.get("/manifest.csv")[2].decode().splitlines())}
            for name, data in cars.items():
                assert g.get(f"/piece/{rows[name]['piece_cid']}")[2] == data


def test_serve_an_object_store_source(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket("serve")
    rng = random.Random(4)
    for key, size in (("a/one", 3 * MiB), ("b", 6 * MiB), ("c", 1000)):
        s3_server.put_object(bucket, key, rng.randbytes(size))
    url = f"s3://{bucket}"
    options = ["--no-encryption", "--bin-size", BIN]
    out, state = tmp_path / "out", tmp_path / "state"
    packerfs("pack", url, out, "-t", state, *options)
    with gateway(url, state, tmp_path, *options) as g:
        g.wait_ready()
        for row in manifest(out):
            assert g.get(f"/piece/{row['piece_cid_v2']}")[2] == (out / row["car_file"]).read_bytes()
        assert json.loads(g.get("/status")[2])["source"] == url


def test_a_client_that_hangs_up_ends_its_transfer(packed, tmp_path):
    """Nothing is regenerated for a client that left: its transfer ends and the log says so."""
    src, state, out, options = packed
    row = max(manifest(out), key=lambda r: int(r["car_size"]))
    with gateway(src, state, tmp_path, *options) as g:
        g.wait_ready()
        host, port = g.url.split("//")[1].split(":")
        conn = socket.create_connection((host, int(port)))
        conn.sendall(f"GET /piece/{row['piece_cid']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert len(conn.recv(65536)) > 0
        conn.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = json.loads(g.get("/status")[2])
            if not status["transfers"]:
                break
            time.sleep(0.1)
        assert status["transfers"] == []
        time.sleep(0.5)
    log = g.log.read_text()
    line = [l for l in log.splitlines() if f"GET /piece/{row['piece_cid']}" in l][-1]
    assert "CLIENT GONE" in line and int(re.search(r"bytes=(\d+)", line).group(1)) < int(row["car_size"]), line


def test_bad_serve_arguments_give_one_line(tmp_path):
    src = tmp_path / "src"
    write_random(src / "f", 100, 1)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        for extra, expected in (
            (["--listen", f"127.0.0.1:{port}"], "Address already in use"),
            (["--listen", "nowhere"], "HOST:PORT"),
            (["--token-file", str(tmp_path / "absent")], "cannot read"),
            (["--tls-cert", str(tmp_path / "c.pem")], "go together"),
        ):
            result = packerfs("serve", src, "-t", tmp_path / "state", "--no-encryption", *extra, check=False, timeout=60)
            message = result.stderr.decode()
            errors = [line for line in message.splitlines() if " INFO " not in line]
            assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], message
    finally:
        taken.close()


def test_max_connections_caps_transfers(packed, tmp_path):
    src, state, out, options = packed
    row = max(manifest(out), key=lambda r: int(r["car_size"]))
    with gateway(src, state, tmp_path, *options, "--max-connections", "1") as g:
        g.wait_ready()
        host, port = g.url.split("//")[1].split(":")
        holder = socket.create_connection((host, int(port)))  # takes the one transfer and reads nothing
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        holder.sendall(f"GET /piece/{row['piece_cid']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            deadline = time.monotonic() + 20
            while not json.loads(g.get("/status")[2])["transfers"] and time.monotonic() < deadline:
                time.sleep(0.05)
            status, headers, body = g.get(f"/piece/{row['piece_cid']}")
            assert status == 503 and headers["retry-after"] == "5" and b"retry later" in body
            assert g.get(f"/piece/{row['piece_cid']}", method="HEAD")[0] == 200  # HEAD sends no body: not capped
        finally:
            holder.close()
