"""The control socket, ``sockshare status`` and the Prometheus endpoint."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ROOT, Server, ask, env_with_apps, read_to_close

from sockshare.server._metrics import render

pytestmark = pytest.mark.timeout(60)


def _lines(s: socket.socket) -> list[dict[str, Any]]:
    s.settimeout(5)
    buf = read_to_close(s, until_timeout=True)
    return [json.loads(line) for line in buf.splitlines() if line.strip()]


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_control_socket_is_private(tmp_path: Path) -> None:
    with Server(tmp_path, workers=1) as srv:
        assert stat.S_IMODE(os.stat(srv.control).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(srv.control)).st_mode) == 0o700
        chan = srv.status()["channel"]
        assert stat.S_IMODE(os.stat(chan).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(chan)).st_mode) == 0o700


def test_bad_bytes_to_the_control_socket(tmp_path: Path) -> None:
    with Server(tmp_path, workers=1) as srv:
        addr = srv.address()
        ask(addr)
        base = _fd_count(srv.dispatcher)
        ctl = srv.control

        def session(payload: bytes) -> list[dict[str, Any]]:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(ctl)
                try:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return _lines(s)

        # each bad line gets an error; a good line on the same connection still works
        out = session(b"\xff\xfe\x00garbage\n[1,2]\n{\"cmd\": 5}\n{\"cmd\":\"nope\"}\n"
                      b"{\"cmd\":\"status\"}\n")
        assert [r["ok"] for r in out] == [False, False, False, False, True]
        assert "unknown command" in out[3]["error"]
        assert out[4]["status"]["pid"] == srv.pid
        # a line over the limit: an error, then the connection is closed
        out = session(b"x" * 200_000)
        assert len(out) == 1
        assert not out[0]["ok"]
        # a flood of binary junk: closed after a bounded number of bad lines
        out = session(os.urandom(50_000).replace(b"\n", b"\x00") + b"\n" * 0 +
                      b"".join(os.urandom(20) + b"\n" for _ in range(100)))
        assert 1 <= len(out) <= 20
        assert not any(r["ok"] for r in out)
        # a client that connects and says nothing, then goes away; one that resets
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(ctl)
        s2 = socket.socket(socket.AF_UNIX)
        s2.connect(ctl)
        s2.sendall(b'{"cmd": "sta')
        s2.close()
        # the dispatcher is undisturbed
        assert ask(addr)["id"] == 1
        assert srv.status()["workers"][0]["state"] == "ready"
        srv.wait_for(lambda st: _fd_count(srv.dispatcher) == base, what=f"fd count back to {base}")
        assert srv.proc.poll() is None


def test_status_command_json_and_table(tmp_path: Path) -> None:
    with Server(tmp_path, workers=2) as srv:
        addr = srv.address()
        for _ in range(4):
            ask(addr)
        cmd = [sys.executable, "-m", "sockshare.server._cli", "status", "--control", srv.control]
        out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30,
                             env=env_with_apps(), cwd=ROOT, check=True).stdout
        st = json.loads(out)
        assert st["counters"]["handoffs"] == 4
        assert {w["id"] for w in st["workers"]} == {1, 2}
        table = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                               env=env_with_apps(), cwd=ROOT, check=True).stdout
        for word in ("ID", "POOL", "PID", "HANDOFFS", "RESTARTS", "queue default 0/64"):
            assert word in table, table
        for w in st["workers"]:
            assert str(w["pid"]) in table
        bad = subprocess.run([sys.executable, "-m", "sockshare.server._cli", "status", "--control",
                              str(tmp_path / "nothing.ctl")], capture_output=True, text=True,
                             timeout=30, cwd=ROOT, check=False)
        assert bad.returncode == 1
        assert "no sockshare server answers" in bad.stderr


def test_metrics_endpoint(tmp_path: Path) -> None:
    with Server(tmp_path, "--metrics", "127.0.0.1:0", workers=2) as srv:
        addr = srv.address()
        for _ in range(3):
            ask(addr)
        host, port = srv.status()["metrics"].rsplit(":", 1)
        url = f"http://{host}:{port}"
        srv.wait_for(lambda st: st["counters"]["handoffs"] == 3, what="3 handoffs")
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in text.splitlines() if line and not line.startswith("#")}
        assert sum(v for k, v in samples.items() if k.startswith("sockshare_handoffs_accepted_total{")) == 3
        assert samples['sockshare_queue_depth{pool="default"}'] == 0
        assert samples["sockshare_handoffs_redispatched_total"] == 0
        assert 'sockshare_worker_connections{pool="default",worker="1"}' in samples
        assert 'sockshare_worker_restarts_total{pool="default",worker="2"}' in samples
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/", timeout=5)
        assert e.value.code == 404
        e.value.close()


def test_render_escapes_labels() -> None:
    st = {"counters": {"redispatches": 0, "refused_by_reason": {'a"b': 2}, "sniff_failures": 0,
                       "lost": 0},
          "workers": [], "pools": [{"name": "p\\q", "queue": 1}],
          "listeners": [{"name": "x", "accepted": 5}]}
    text = render(st)
    assert 'sockshare_connections_refused_total{reason="a\\"b"} 2' in text
    assert 'sockshare_queue_depth{pool="p\\\\q"} 1' in text
    assert text.endswith("\n")


def test_stop_command_stops_gracefully(tmp_path: Path) -> None:
    """``sockshare stop``: the graceful stop of SIGTERM through the control socket (the
    way to stop a server on Windows); it returns once the server is gone."""
    with Server(tmp_path, workers=2) as srv:
        ask(srv.address())
        st = srv.status()
        workers = [w["pid"] for w in st["workers"]]
        out = subprocess.run([sys.executable, "-m", "sockshare.server._cli", "stop", "--control",
                              srv.control], capture_output=True, text=True, timeout=30,
                             env=env_with_apps(), cwd=ROOT, check=True).stdout
        assert f"stopping pid {srv.dispatcher}" in out
        assert "stopped" in out
        assert srv.proc.wait(timeout=30) == 0
        log = srv.log()
        assert "stop requested (control socket): stopping (grace 5.0 s)" in log
        assert not os.path.exists(srv.control)
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}"), pid


def test_stop_command_says_stopping_at_once_and_is_no_error(tmp_path: Path) -> None:
    """``sockshare stop`` is a graceful stop as SIGTERM is: the master says
    ``STOPPING=1`` when it begins (docs/server.md, "systemd"), not once the workers have
    drained, and does not log the dispatcher's exit as a crash. (Before, the master
    dropped the dispatcher's STOPPING=1, said it only after the drain, and logged
    ``ERROR ... the dispatcher (pid N) exited with status 0: stopping``.)"""
    from live_helpers import LineClient, LiveServer, pid_alive

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    notify.bind(path)
    notify.settimeout(0.1)
    with notify, LiveServer(tmp_path / "srv", app="live_apps:handle", workers=1,
                            env={"NOTIFY_SOCKET": path}) as srv:
        c = LineClient(srv.address())   # an open connection: the drain takes --grace (5 s)
        c.ask("echo a")
        stop = subprocess.Popen([sys.executable, "-m", "sockshare.server._cli", "stop",
                                 "--control", srv.control], env=env_with_apps(), cwd=ROOT,
                                stdout=subprocess.DEVNULL)
        said: list[str] = []
        try:
            while "STOPPING=1" not in said and srv.proc.poll() is None:
                try:
                    said += notify.recv(4096).decode().split("\n")
                except TimeoutError:
                    pass
            assert "STOPPING=1" in said
            assert pid_alive(srv.dispatcher), "STOPPING=1 came only once the dispatcher had exited"
            assert stop.wait(30) == 0
            assert srv.proc.wait(30) == 0
        finally:
            c.close()
            if stop.poll() is None:
                stop.kill()
                stop.wait()
        assert "ERROR master" not in srv.log()
