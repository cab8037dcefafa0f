"""systemd socket activation and sd_notify, against real processes and a notify socket
that speaks the systemd protocol (the test plays the service manager)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sockshare
from sockshare.backends._inherit import listen_fds, notify, store_fds
from sockshare.backends._scm import close_fds, recv_with_fds
from tests.conftest import SRC

CHILD = """
import os, sys
from sockshare.backends._inherit import listen_fds
socks = listen_fds()
for name, s in socks:
    if s.type == 1 and s.family == 2:
        c, _ = s.accept(); c.sendall(name.encode() + b" via fd %d" % s.fileno()); c.close()
print(len(socks), os.environ.get("LISTEN_FDS"), [os.get_inheritable(s.fileno()) for _, s in socks])
"""


def test_listen_fds_end_to_end_through_exec() -> None:
    web = socket.create_server(("127.0.0.1", 0))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    env = dict(os.environ, LISTEN_FDNAMES="web:other", PYTHONPATH=SRC)
    p = subprocess.Popen(
        [sys.executable, "-m", "sockshare.backends._inherit", str(web.fileno()), str(other.fileno()),
         "--", sys.executable, "-c", CHILD],
        pass_fds=[web.fileno(), other.fileno()], env=env, stdout=subprocess.PIPE)
    with socket.create_connection(web.getsockname(), timeout=10) as c:
        assert c.recv(100) == b"web via fd 3"
    out, _ = p.communicate(timeout=30)
    assert out.split() == [b"2", b"None", b"[False,", b"False]"]  # cloexec, env unset
    web.close()
    other.close()


@pytest.mark.parametrize(("env", "match"), [
    ({"LISTEN_FDS": "1"}, "LISTEN_PID"),
    ({"LISTEN_FDS": "x", "LISTEN_PID": "{pid}"}, "not a count"),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "{pid}", "LISTEN_FDNAMES": "a"}, "names 1"),
])
def test_malformed_activation_is_an_error(env: dict[str, str], match: str) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    with pytest.raises(sockshare.BackendUnavailable, match=match):
        listen_fds(environ=env)


def test_a_passed_descriptor_that_is_not_a_socket_is_an_error(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        code = ("import sockshare\nfrom sockshare.backends._inherit import listen_fds\n"
                "try:\n    listen_fds()\nexcept sockshare.BackendUnavailable as e:\n    print(e)")
        out = subprocess.run(
            [sys.executable, "-m", "sockshare.backends._inherit", str(f.fileno()), "--",
             sys.executable, "-c", code],
            pass_fds=[f.fileno()], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True,
            timeout=30, check=True)
    assert out.stdout.strip() == b"LISTEN_FDS names fd 3 (unknown), which is not a socket"


def test_activation_for_another_pid_is_ignored() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    assert listen_fds(environ=env) == []
    assert env == {}  # unset either way, so children do not see it


def test_notify_and_fd_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert notify("READY=1") is False  # no NOTIFY_SOCKET: not under systemd
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    assert notify(f"READY=1\nMAINPID={os.getpid()}")
    assert manager.recv(100) == f"READY=1\nMAINPID={os.getpid()}".encode()
    lst = socket.create_server(("127.0.0.1", 0))
    assert store_fds([lst], "web")
    data, fds = recv_with_fds(manager)
    assert data == b"FDSTORE=1\nFDNAME=web"
    assert len(fds) == 1
    held = socket.socket(fileno=fds[0])  # the manager's copy serves the same port
    assert held.getsockname() == lst.getsockname()
    lst.close()
    with socket.create_connection(held.getsockname(), timeout=5):
        conn, _ = held.accept()
        conn.close()
    held.close()
    with pytest.raises(ValueError):
        store_fds([], "bad:name")
    manager.close()
    close_fds([])
