"""Helpers for the live-connection tests: a line client, a server that survives upgrades,
descriptor counts, and bounded waits.

:class:`LiveServer` is :class:`serve_helpers.Server` that follows the dispatcher across
``sockshare upgrade``: the process it started (``self.proc``) exits after handing over,
the new one is found through the (same) control socket, and :meth:`LiveServer.close`
stops whichever dispatcher is current -- only pids that this server reported, which the
test started directly or indirectly.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from serve_helpers import Server, connect, read_line

from sockshare._errors import SockshareError
from sockshare.server._control import request


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class LineClient:
    """One connection to ``live_apps``: ``ask("echo x")`` returns the JSON answer."""

    def __init__(self, addr: Any, timeout: float = 10.0) -> None:
        self.sock = connect(addr, timeout=timeout)
        self.buf = b""

    @classmethod
    def wrap(cls, sock: socket.socket, timeout: float = 10.0) -> LineClient:
        """A client on a socket connected by other means."""
        c = cls.__new__(cls)
        sock.settimeout(timeout)
        c.sock, c.buf = sock, b""
        return c

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed (buffered {self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, cmd: str) -> dict[str, Any]:
        self.send(cmd + "\n")
        return self.read()

    def read_eof(self, timeout: float = 10.0) -> bytes:
        """Wait for the server to close: what was still sent, b'' on a clean FIN."""
        self.sock.settimeout(timeout)
        out = self.buf
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        self.sock.close()


class LiveServer(Server):
    """A ``sockshare serve`` that may be upgraded (its dispatcher pid changes)."""

    def __init__(self, tmp: Path, *args: str, **kw: Any) -> None:
        self.dispatchers: set[int] = set()
        super().__init__(tmp, *args, **kw)
        self.dispatchers.add(self.pid)

    def status(self) -> dict[str, Any]:
        st = super().status()
        self.dispatchers.add(st["pid"])
        self.dispatchers.add(st.get("dispatcher") or st["pid"])
        if st.get("successor"):
            self.dispatchers.add(st["successor"])
        return st

    def current(self) -> int:
        """The current dispatcher's pid (``status()["pid"]`` is the master's, stable)."""
        st = self.status()
        pid: int = st.get("dispatcher") or st["pid"]
        return pid

    def command(self, req: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        return request(self.control, req, timeout=timeout)

    def wait_ready(self, n: int, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not (self.dispatchers - {self.pid}):
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.status()
            except (OSError, AssertionError, ValueError, SockshareError):
                last = None
            if last is not None and sum(w["state"] == "ready" for w in last["workers"]) >= n:
                return dict(last)
            time.sleep(0.05)
        raise AssertionError(f"{n} worker(s) not ready within {timeout} s: {last}\n{self.log()}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.status()
        super().close()   # SIGTERM to the master: it stops every generation
        for pid in sorted(self.dispatchers):
            if pid != self.pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pid in sorted(self.dispatchers):
            if pid != self.pid and not wait_gone(pid, 15.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class ShortLoad:
    """Short connections (``who``) in a loop from a few threads until :meth:`finish`
    (or ``limit`` answers): every failure kept, and which worker answered each.

    A subclass changes what one connection does (:meth:`_once`) and the ``pause``
    after each."""

    pause = 0.0

    def __init__(self, addr: Any, threads: int = 4, limit: int | None = None) -> None:
        self.addr = addr
        self.limit = limit
        self.stop = threading.Event()
        self.ok = 0
        self.by_worker: dict[int, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _once(self) -> None:
        with connect(self.addr, timeout=10) as s:
            s.sendall(b"who\n")
            line = read_line(s)
        if b'"pid"' not in line:
            raise ConnectionError(f"bad answer {line!r}")
        wid = int(line.split(b'"id": ', 1)[1].split(b",", 1)[0])
        with self.lock:
            self.ok += 1
            self.by_worker[wid] = self.by_worker.get(wid, 0) + 1
            if self.limit is not None and self.ok >= self.limit:
                self.stop.set()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._once()
            except (OSError, ValueError, IndexError) as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
            if self.pause:
                time.sleep(self.pause)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def room_for(n: int) -> None:
    """This test process needs ``n`` descriptors more than it has: raise its soft
    RLIMIT_NOFILE (skip if the hard limit is too low)."""
    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def wait_until(pred: Any, timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.02)


def is_clean_eof(c: LineClient, timeout: float = 10.0) -> bool:
    """The server closed with FIN (not RST) and sent nothing more."""
    try:
        return c.read_eof(timeout) == b""
    except ConnectionResetError:
        return False


def tcp_rst_close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


__all__ = ["LineClient", "LiveServer", "ShortLoad", "fd_count", "is_clean_eof", "pid_alive", "read_line",
           "room_for", "tcp_rst_close", "wait_gone", "wait_until"]


def ask_demo(ws: Any, text: str) -> dict[str, Any]:
    """Send ``text`` on a WebSocket of the demo app (``/ws``); its echo (a "moved"
    notice that comes first is skipped)."""
    ws.send(text)
    while True:
        msg = json.loads(str(ws.recv(timeout=15)))
        if msg.get("echo") == text:
            return dict(msg)
