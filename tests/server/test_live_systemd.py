"""``sockshare serve`` under a service manager that speaks systemd's protocols.

There is no systemd here, so :class:`Manager` plays it, driven by ``deploy/sockshare.socket``
and ``deploy/sockshare.service``: it binds the ``ListenStream=`` socket itself (on port 0),
starts ``ExecStart=`` through the exec wrapper with ``LISTEN_FDS``/``LISTEN_FDNAMES``
(``FileDescriptorName=``), owns a ``NOTIFY_SOCKET`` datagram socket with SO_PASSCRED
(so it knows which pid said what), follows ``MAINPID=``, keeps ``FDSTORE=1`` descriptors
(deduplicated by inode, as systemd does), sends ``ExecReload=``'s SIGHUP, and after a
SIGKILL of the main process restarts it with the stored descriptors, like
``Restart=on-failure``. The main process is the master (``sockshare serve`` as started):
an upgrade does not change it, and only it notifies (``NotifyAccess=main``).
"""

from __future__ import annotations

import array
import configparser
import contextlib
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, pid_alive, wait_gone, wait_until
from serve_helpers import ROOT, env_with_apps

from sockshare.server._control import request

pytestmark = pytest.mark.timeout(180)

DEPLOY = ROOT / "deploy"


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(DEPLOY / name)
    return cp


class Manager:
    """A tiny service manager: notify socket, fd store, MAINPID, restarts."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.service = _unit("sockshare.service")
        self.socket_unit = _unit("sockshare.socket")
        self.notify_path = str(tmp / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []   # (sender pid, text)
        self.store: dict[tuple[int, int], tuple[str, socket.socket]] = {}
        self.main_pid = 0
        self.started: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        self.log = open(tmp / "server.log", "ab")
        self.control = str(tmp / "ctl" / "server.ctl")

    # -- the notify socket ---------------------------------------------------------

    def _read_notify(self) -> None:
        self.notify.settimeout(0.1)
        ucred = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, anc, _flags, _ = self.notify.recvmsg(
                    4096, socket.CMSG_SPACE(ucred) + socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            pid, fds = 0, []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:ucred])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds += list(arr)
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self.lock:
                self.messages.append((pid, text))
                if "MAINPID" in fields and pid == self.main_pid:
                    self.main_pid = int(fields["MAINPID"])
                if fields.get("FDSTORE") == "1":
                    name = fields.get("FDNAME", "stored")
                    for fd in fds:
                        st = os.fstat(fd)
                        key = (st.st_dev, st.st_ino)
                        if key in self.store or len(self.store) >= int(
                                self.service["Service"]["FileDescriptorStoreMax"]):
                            os.close(fd)   # systemd keeps one copy of each socket
                        else:
                            self.store[key] = (name, socket.socket(fileno=fd))
                else:
                    for fd in fds:
                        os.close(fd)

    def said(self, text: str, pid: int | None = None, after: int = 0) -> bool:
        with self.lock:
            return any(text in m and (pid is None or p == pid) for p, m in self.messages[after:])

    def wait_said(self, text: str, pid: int | None = None, after: int = 0, timeout: float = 30) -> None:
        wait_until(lambda: self.said(text, pid, after), timeout=timeout,
                   what=f"{text!r} from {pid} (got {self.messages[after:]})")

    def mark(self) -> int:
        with self.lock:
            return len(self.messages)

    # -- starting ------------------------------------------------------------------

    def argv(self) -> list[str]:
        """ExecStart=, with the test's app, control socket and a short grace."""
        words = shlex.split(self.service["Service"]["ExecStart"])
        assert words[0].endswith("/sockshare")
        assert words[1] == "serve"
        out = [sys.executable, "-m", "sockshare.cli", *words[1:]]
        out[out.index("myapp:handle")] = "live_apps:handle"
        out[out.index("--grace") + 1] = "3"
        return [*out, "--control", self.control, "--workers", "2"]

    def start(self, socks: list[tuple[str, socket.socket]]) -> int:
        env = env_with_apps()
        env["NOTIFY_SOCKET"] = self.notify_path
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in socks)
        fds = [s.fileno() for _, s in socks]
        p = subprocess.Popen(
            [sys.executable, "-m", "sockshare.backends._inherit", *map(str, fds), "--", *self.argv()],
            pass_fds=fds, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=str(ROOT))
        self.started.append(p)
        self.pids.add(p.pid)
        with self.lock:
            self.main_pid = p.pid
        return p.pid

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = request(self.control, {"cmd": "status"})["status"]
        self.pids.add(st["pid"])
        self.pids.update(w["pid"] for w in st["workers"] if w["pid"])
        return st

    def close(self) -> None:
        for pid in sorted(self.pids):
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pid in sorted(self.pids):
            if not wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self._stop.set()
        self._reader.join(5)
        self.notify.close()
        for _name, s in self.store.values():
            s.close()
        self.log.close()


def test_socket_activation_notify_fd_store_and_crash_restart(tmp_path: Path) -> None:
    m = Manager(tmp_path)
    try:
        # -- start: the .socket unit's listener, passed as LISTEN_FDS
        listen = m.socket_unit["Socket"]["ListenStream"]
        host, _, _port = listen.rpartition(":")
        lsock = socket.create_server((host, 0), backlog=int(m.socket_unit["Socket"]["Backlog"]))
        name = m.socket_unit["Socket"]["FileDescriptorName"]
        addr = lsock.getsockname()
        first = m.start([(name, lsock)])
        m.wait_said("READY=1", pid=first)
        assert m.said("FDSTORE=1\nFDNAME=main", pid=first)
        st = m.status()
        assert st["listeners"][0]["address"] == f"{addr[0]}:{addr[1]}"
        stored = [s for n, s in m.store.values() if n == name]
        assert len(stored) == 1   # the same socket as ours: one copy in the store
        assert os.fstat(stored[0].fileno()).st_ino == os.fstat(lsock.fileno()).st_ino
        long = LineClient(addr)
        assert long.ask("echo 1")["n"] == 1

        # -- ExecReload=/bin/kill -HUP $MAINPID
        assert "kill -HUP $MAINPID" in m.service["Service"]["ExecReload"]
        mark = m.mark()
        os.kill(m.main_pid, signal.SIGHUP)
        m.wait_said("RELOADING=1", pid=first, after=mark)
        assert m.said("MONOTONIC_USEC=", pid=first, after=mark)
        m.wait_said("READY=1", pid=first, after=mark + 1)
        moved = long.read()
        assert moved["moved"]
        assert moved["reason"] == "reload"

        # -- upgrade: SIGUSR2 to the main process; the main pid stays (the master), the
        # dispatcher behind it changes; READY=1 again from the main pid
        mark = m.mark()
        old_dispatcher = st["dispatcher"]
        assert st["pid"] == st["master"] == first != old_dispatcher
        os.kill(m.main_pid, signal.SIGUSR2)
        moved = long.read()
        assert moved["moved"]
        assert moved["reason"] == "upgrade"
        assert wait_gone(old_dispatcher, 30)
        m.wait_said("READY=1", pid=first, after=mark)
        assert long.ask("echo 2")["n"] == 2
        st = m.status()
        second = st["dispatcher"]
        assert second != old_dispatcher
        assert st["pid"] == m.main_pid == first
        assert not m.said("MAINPID=")
        assert not m.said("STOPPING=1"), "nothing said the service stops"
        with m.lock:
            assert {pid for pid, _text in m.messages} == {first}   # NotifyAccess=main

        # -- crash of the main process: the dispatcher notices and stops gracefully (its
        # workers too); only the fd store still holds the listener
        lsock.close()
        workers = [w["pid"] for w in st["workers"] if w["pid"]]
        os.kill(first, signal.SIGKILL)
        assert wait_gone(first, 10)
        for pid in [second, *workers]:
            assert wait_gone(pid, 15), pid
        assert m.started[0].wait(5) == -signal.SIGKILL
        long.close()
        waiting = LineClient(addr)   # queued in the kernel: the listener never closed
        waiting.send("echo 1\n")
        # -- Restart=on-failure: the stored descriptors come back as LISTEN_FDS
        mark = m.mark()
        third = m.start([(n, s) for n, s in m.store.values()])
        m.wait_said("READY=1", pid=third, after=mark)
        assert waiting.read()["n"] == 1
        waiting.close()
        again = LineClient(addr)
        assert again.ask("echo 1")["pid"] in {w["pid"] for w in m.status()["workers"]}
        again.close()

        # -- stop
        mark = m.mark()
        os.kill(third, signal.SIGTERM)
        m.wait_said("STOPPING=1", pid=third, after=mark)
        assert m.started[-1].wait(30) == 0
    finally:
        m.close()


def test_bad_listen_fds_is_refused(tmp_path: Path) -> None:
    """LISTEN_FDS naming a descriptor that is not a socket: exit 1 with the reason."""
    env = env_with_apps()
    with open(tmp_path / "f", "w") as f:
        env["LISTEN_FDNAMES"] = "main"
        out = subprocess.run(
            [sys.executable, "-m", "sockshare.backends._inherit", str(f.fileno()), "--",
             sys.executable, "-m", "sockshare.cli", "serve", "live_apps:handle", "--bind",
             "127.0.0.1:0", "--control", str(tmp_path / "ctl" / "c.ctl")],
            pass_fds=[f.fileno()], env=env, check=False, capture_output=True, text=True, timeout=60,
            cwd=str(ROOT))
    assert out.returncode == 1
    assert "LISTEN_FDS names fd 3 (main), which is not a socket" in out.stderr
