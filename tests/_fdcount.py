"""Test helpers: descriptor accounting through /proc, and real peer processes.

* :func:`fd_table`, :func:`fd_count`, :func:`wait_fd_count`: read ``/proc/<pid>/fd`` of
  any process we started (or of ourselves), and wait, with a bounded poll, for a count
  to come back to its baseline (the export agent closes duplicates on its own thread).
* :class:`PeerProcess`: ``tests/helpers/peer.py`` started as a separate process and
  driven by JSON lines over pipes; :class:`PeerConnection` drives a forked copy of one
  over a UNIX connection. Every read has a deadline; :meth:`PeerProcess.close` kills
  (by its own pid only) what it started.

Kept out of ``conftest.py`` on purpose (the lead owns that file): the test modules
import what they need from here.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEER_SCRIPT = Path(__file__).parent / "helpers" / "peer.py"
REPLY_TIMEOUT = 20.0


# --- descriptor accounting -----------------------------------------------------


def fd_table(pid: int | str = "self") -> dict[int, str]:
    """``{fd: readlink target}`` of a process (entries that vanish mid-read are skipped)."""
    base = f"/proc/{pid}/fd"
    out: dict[int, str] = {}
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def fd_count(pid: int | str = "self") -> int:
    """How many descriptors the process holds right now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fd_count(pid: int | str, expected: int, *, timeout: float = 5.0,
                  before: dict[int, str] | None = None, what: str = "") -> None:
    """Poll until ``pid`` holds exactly ``expected`` descriptors; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n == expected:
            return
        if time.monotonic() >= deadline:
            now = fd_table(pid)
            diff = ""
            if before is not None:
                extra = {k: v for k, v in now.items() if before.get(k) != v}
                gone = {k: v for k, v in before.items() if now.get(k) != v}
                diff = f"; new/changed: {extra}; gone: {gone}"
            raise AssertionError(
                f"{what or 'process'} {pid} holds {n} fds, expected {expected} after "
                f"{timeout} s{diff}"
            )
        time.sleep(0.005)


def settled_fd_count(pid: int | str = "self", timeout: float = 5.0) -> int:
    """The fd count once it stops moving (an agent thread may still be opening or
    closing its ends), or the last count after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def socket_inodes(pid: int | str = "self") -> set[int]:
    """The inode numbers of every socket the process holds."""
    out = set()
    for target in fd_table(pid).values():
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


# --- peers ---------------------------------------------------------------------


class PeerError(Exception):
    """A command failed in the peer: ``name`` is the exception class, ``mro`` its bases."""

    def __init__(self, name: str, mro: list[str], msg: str) -> None:
        super().__init__(f"{name}: {msg}")
        self.name = name
        self.mro = mro
        self.msg = msg


class Commands:
    """JSON-lines request/response over some byte channel."""

    pid: int
    #: the descriptor count a test compares against (set by the fixture that made it)
    baseline: int = 0

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _read_some(self, timeout: float) -> bytes:
        raise NotImplementedError

    def __init__(self) -> None:
        self._buf = b""

    def read_reply(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer {self.pid} did not answer in {timeout} s")
            chunk = self._read_some(left)
            if not chunk:
                raise EOFError(f"peer {self.pid} hung up")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def send(self, op: str, **kw: Any) -> None:
        """Send a command without waiting (pair with :meth:`reply`)."""
        self._write(json.dumps({"op": op, **kw}).encode() + b"\n")

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Any:
        r = self.read_reply(timeout)
        if "err" in r:
            raise PeerError(r["err"], r["mro"], r["msg"])
        return r["ok"]

    def call(self, op: str, wait: float = REPLY_TIMEOUT, **kw: Any) -> Any:
        """Run one command (``wait``: how long for its answer); return its value or
        raise :class:`PeerError`."""
        self.send(op, **kw)
        return self.reply(wait)

    def fails(self, op: str, wait: float = REPLY_TIMEOUT, **kw: Any) -> PeerError:
        """Run one command that must fail; return the error."""
        try:
            value = self.call(op, wait, **kw)
        except PeerError as exc:
            return exc
        raise AssertionError(f"{op} {kw} succeeded in peer {self.pid}: {value!r}")


class PeerProcess(Commands):
    """``tests/helpers/peer.py`` in its own process, driven over stdin/stdout pipes."""

    def __init__(self, *, link: socket.socket | None = None) -> None:
        super().__init__()
        args = [sys.executable, str(PEER_SCRIPT)]
        pass_fds: tuple[int, ...] = ()
        if link is not None:
            args += ["--link", str(link.fileno())]
            pass_fds = (link.fileno(),)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=pass_fds, bufsize=0)
        self.pid = self.proc.pid
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out = self.proc.stdout.fileno()

    def _write(self, data: bytes) -> None:
        self._in.write(data)

    def _read_some(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            raise TimeoutError(f"peer {self.pid} did not answer in time")
        return os.read(self._out, 65536)

    def kill(self) -> None:
        """SIGKILL the peer (our own child, by pid) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        """Close its stdin (it exits at EOF); kill it if it does not; close our pipes."""
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class PeerConnection(Commands):
    """A forked peer serving commands on a UNIX connection it made to us."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        super().__init__()
        self.conn = conn
        self.pid = pid

    def _write(self, data: bytes) -> None:
        self.conn.settimeout(REPLY_TIMEOUT)
        self.conn.sendall(data)

    def _read_some(self, timeout: float) -> bytes:
        self.conn.settimeout(timeout)
        return self.conn.recv(65536)

    def close(self) -> None:
        self.conn.close()


def settle(peer: Commands, extra: int = 0, *, timeout: float = 5.0) -> None:
    """Wait (bounded) until ``peer`` is back to its baseline fd count (plus ``extra``)."""
    wait_fd_count(peer.pid, peer.baseline + extra, timeout=timeout, what="peer")


def reap(pid: int, timeout: float = 10.0) -> int:
    """Wait (bounded) for a child of one of our peers to disappear; return 0 when gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            return 0
        if state == b"Z":
            return 0
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} is still running after {timeout} s")
