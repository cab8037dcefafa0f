"""Fixtures for the carrier tests: fresh addresses per carrier, and hygiene checks.

Every test in this folder runs under :func:`_hygiene`: it fails if the test leaves a
descriptor open in this process (``/proc/self/fd``) or leaves behind any resource named
by :class:`Addresses` (socket file, FIFO, ``/dev/shm`` ring, POSIX or System V queue,
a queue's owner record in ``/dev/shm``).
The whole run also checks ``/dev/shm`` and ``ipcs -q`` for anything of ours at the end.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sockshare
from sockshare import carriers
from sockshare.carriers import _libc
from tests._fdcount import fd_count, fd_table, settled_fd_count, wait_fd_count

SCHEMES = list(carriers.CARRIERS)
AVAILABLE = carriers.available()
CHILD = Path(__file__).with_name("child.py")
SRC = str(Path(__file__).resolve().parents[2] / "src")

SHM_PREFIX = "sstest-"
SYSV_BASE = 0x5C5C0000  # keys 0x5C5C0000..0x5C5CFFFF are this suite's
_counter = itertools.count()


def needs(scheme: str) -> None:
    """Skip unless ``scheme`` works on this machine."""
    status = AVAILABLE[scheme]
    if not status.available:
        pytest.skip(f"{scheme}:// not available here: {status.detail}")


def mq_exists(name: str) -> bool:
    mqd = _libc.call("mq_open", ("/" + name).encode(), os.O_RDONLY, 0, None)
    if mqd >= 0:
        _libc.call("mq_close", mqd)
        return True
    return _libc.get_errno() != errno.ENOENT


def sysv_exists(key: int) -> bool:
    return _libc.call("msgget", key - (1 << 32) if key >= 1 << 31 else key, 0) >= 0


def sysv_keys_in_use() -> set[int]:
    out = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, timeout=10, check=False).stdout
    keys = set()
    for line in out.splitlines():
        field = line.split()[:1]
        if field and field[0].startswith("0x"):
            keys.add(int(field[0], 16))
    return keys


class Addresses:
    """Fresh, unique addresses for each carrier, remembered for the leftover check."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.paths: list[Path] = []
        self.mq: list[str] = []
        self.shm: list[str] = []
        self.sysv: list[int] = []

    def url(self, scheme: str, tag: str = "") -> str:
        n = next(_counter)
        name = f"{SHM_PREFIX}{os.getpid()}-{n}{tag}"
        if scheme in ("unix", "unixgram", "fifo"):
            path = self.dir / f"{n}{tag}.{scheme}"
            self.paths.append(path)
            return f"{scheme}://{path}"
        if scheme in ("tcp", "udp"):
            return f"{scheme}://127.0.0.1:0"
        if scheme == "mq":
            self.mq.append(name)
            return f"mq:///{name}"
        if scheme == "shm":
            self.shm.append(name)
            return f"shm://{name}"
        if scheme == "sysvmq":
            for _ in range(200):
                key = SYSV_BASE + random.randrange(0x10000)
                if not sysv_exists(key):
                    self.sysv.append(key)
                    return f"sysvmq://{key:#x}"
            raise AssertionError("no free System V key")
        raise ValueError(scheme)

    def free_port(self, kind: socket.SocketKind) -> int:
        """A loopback port nobody listens on (bound, then released)."""
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    def leftovers(self) -> list[str]:
        found = [str(p) for p in self.paths if os.path.lexists(p)]
        found += [f"mq /{n}" for n in self.mq if mq_exists(n)]
        found += [f"sysv {k:#x}" for k in self.sysv if sysv_exists(k)]
        shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        records = [f".sockshare-mq.{n}" for n in self.mq] + [f".sockshare-sysvmq.{k:08x}" for k in self.sysv]
        found += [f"/dev/shm/{e}" for e in shm for r in records if e == r or e.startswith(f"{r}.")]
        for name in self.shm:
            found += [f"/dev/shm/{e}" for e in shm if e == name or e.startswith(f".{name}.")]
        return found


def _start_token_agent() -> None:
    """One export/import round trip, so the export agent's own fds predate the baseline."""
    a, b = socket.socketpair()
    try:
        s = sockshare.import_socket(sockshare.export_socket(a, os.getpid()))
        s.close()
    finally:
        a.close()
        b.close()


@pytest.fixture
def addrs(sock_dir: Path) -> Addresses:
    return Addresses(sock_dir)


@pytest.fixture
def token_agent() -> None:
    """Marker fixture: this test exports tokens (see :func:`_hygiene`)."""


@pytest.fixture(autouse=True)
def _hygiene(request: pytest.FixtureRequest, addrs: Addresses) -> Iterator[None]:
    before = fd_table()
    baseline = fd_count()
    if "token_agent" in request.fixturenames:
        _start_token_agent()
        before = fd_table()
        baseline = settled_fd_count(timeout=2.0)
    yield
    wait_fd_count("self", baseline, timeout=5.0, before=before, what="the test process")
    left = addrs.leftovers()
    assert not left, f"resources left behind: {left}"


@pytest.fixture(scope="session", autouse=True)
def _nothing_of_ours_left() -> Iterator[None]:
    yield
    sysv_records = f".sockshare-sysvmq.{SYSV_BASE >> 16:04x}"
    shm = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    shm = [e for e in shm if SHM_PREFIX in e or e.startswith(sysv_records)]
    assert not shm, f"left in /dev/shm: {shm}"
    ours = [k for k in sysv_keys_in_use() if SYSV_BASE <= k < SYSV_BASE + 0x10000]
    assert not ours, f"System V queues left (ipcs -q): {[hex(k) for k in ours]}"


# --- child processes ------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Child:
    """``child.py`` in its own process, ended by pid (SIGKILL) if still running at close."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._buf = b""

    def line(self, timeout: float = 20.0) -> str:
        """The next stdout line (fails after ``timeout``, with the child's stderr)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                raise AssertionError(f"child {self.pid} said nothing in time: {self.stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by pid
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            child.close()
