"""nginx (Debian's nginx-light, installed by ./run) as a neutral static piece gateway for tests.

``NginxPieces(workdir, pieces_dir)`` serves the files in ``pieces_dir`` (named by piece CID, e.g.
symlinks to CAR files) at ``/piece/{cid}`` on 127.0.0.1, a free port, with Range as nginx does it.
``max_ranges=0`` makes it ignore Range (200 with the whole file), the way a naive server would.
Everything nginx writes (pid, temp paths, log) stays in ``workdir``; it runs in the foreground as
one process (``daemon off; master_process off;``), so ``kill()`` (SIGKILL) takes the server away at
once, and ``start()`` brings it back on the same port. Stop it in a ``finally`` (``close()``), or use
it as a context manager.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from objstores import LOOPBACK, free_port

STARTUP_TIMEOUT = 10.0
STOP_GRACE = 5.0


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


class NginxPieces:
    def __init__(self, workdir: str | os.PathLike, pieces_dir: str | os.PathLike, *, max_ranges: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pieces_dir = Path(pieces_dir).resolve()
        self.max_ranges = max_ranges
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "nginx.log"
        self.binary = nginx_binary()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def config(self) -> str:
        tmp = self.workdir
        ranges = f"max_ranges {self.max_ranges};" if self.max_ranges is not None else ""
        # As root, workers would otherwise run as nobody and could not read pytest's 0700 temp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        temps = "\n".join(
            f"    {kind}_temp_path {tmp / ('temp-' + kind)};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
{user}
daemon off;
master_process off;
worker_processes 1;
error_log stderr info;
pid {tmp / 'nginx.pid'};
events {{ worker_connections 128; }}
http {{
    access_log off;
{temps}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen {LOOPBACK}:{self.port};
        location /piece/ {{
            alias {self.pieces_dir}/;
            {ranges}
        }}
    }}
}}
"""

    def start(self) -> "NginxPieces":
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (./run setup installs nginx-light)")
        if self.proc is not None and self.proc.poll() is None:
            return self
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.workdir), "-c", str(conf), "-e", "stderr"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"nginx exited with code {code} at start-up: {self.log_tail()}")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not answer on {self.url} within {STARTUP_TIMEOUT:.0f} s: {self.log_tail()}")
            time.sleep(0.03)

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=1)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def kill(self) -> None:
        """SIGKILL: the server is gone at once (connections reset, the port refuses)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_GRACE)
        self.proc = None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_GRACE)

    close = stop

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError as exc:
            return f"<no log: {exc}>"

    def __enter__(self) -> "NginxPieces":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
