"""Run the web test apps under ``sockshare serve`` and under the reference servers.

:func:`sockshare` starts ``sockshare serve APP`` through the server tests' :class:`Server`
(its own control socket, stopped by pid) with this directory as the working directory,
so the workers import the apps here. :class:`RefServer` starts uvicorn (ASGI) or gunicorn
(WSGI) on a free port of 127.0.0.1, waits (bounded) until it answers and stops it by pid.
The rest are small bounded helpers: raw HTTP over a socket, descriptor counts of a
worker, waiting for a condition.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_helpers import Server, read_to_close

WEB_DIR = Path(__file__).resolve().parent
#: the response headers the comparisons look at
COMPARED_HEADERS = ("content-type", "content-length", "transfer-encoding", "set-cookie")


def sockshare(tmp: Path, app: str, *args: str, workers: int = 2) -> Server:
    """``sockshare serve APP --workers N ARGS`` on 127.0.0.1, every worker ready."""
    return Server(tmp, *args, app=app, workers=workers, cwd=WEB_DIR)


def base_url(server: Server) -> str:
    host, port = server.address()
    return f"http://{host}:{port}"


def worker_pids(server: Server) -> list[int]:
    return [int(w["pid"]) for w in server.status()["workers"] if w["pid"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}")
        time.sleep(0.02)


def wait_fds_at_most(pid: int, limit: int, timeout: float = 5.0) -> None:
    """The worker's descriptors come back down to ``limit`` (closes may lag a little)."""
    wait_until(lambda: fds(pid) <= limit, timeout,
               f"worker {pid} to close its descriptors ({fds(pid)} open, baseline {limit}): "
               f"{sorted(os.listdir(f'/proc/{pid}/fd'), key=int)}")


class RefServer:
    """uvicorn (``kind="uvicorn"``, ASGI) or gunicorn (``kind="gunicorn"``, WSGI)
    serving ``app`` on a free port of 127.0.0.1 with one worker."""

    def __init__(self, tmp: Path, kind: str, app: str) -> None:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / f"{kind}.log"
        if kind == "uvicorn":
            argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", "1"]
        elif kind == "gunicorn":
            argv = [sys.executable, "-m", "gunicorn", "-w", "1", app,
                    "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "2"]
        else:
            raise ValueError(kind)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=str(WEB_DIR), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the reference server exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.05)
        raise AssertionError(f"the reference server did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """SIGTERM to its process group (gunicorn's arbiter and worker), SIGKILL after 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> RefServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_http(addr: tuple[str, int], data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection, half-close, read until the server closes."""
    with socket.create_connection(addr, timeout) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        return read_to_close(s)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    line = response.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), response[:200]
    return int(line.split()[1])


def headers_of(headers: Any) -> dict[str, str | None]:
    """The headers that matter, from an httpx ``Headers`` (set-cookie: all of them)."""
    out: dict[str, str | None] = {}
    for name in COMPARED_HEADERS:
        values = headers.get_list(name)
        out[name] = "; ".join(values) if values else None
    return out
