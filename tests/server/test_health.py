"""The health agent (``--agent``, HAProxy's agent-check) and ``GET /healthz``, on a real
``sockshare serve``: the weight follows the load, ``drain``/``maint`` by hand, ``maint``
while no worker is ready, ``drain`` while stopping and during an upgrade (on both
dispatchers, the agent port never refusing a connection), and the settings' checks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LiveServer, wait_until
from serve_helpers import ROOT, Server, env_with_apps, hold, reset_close

from sockshare.server._config import ConfigError, parse_document
from sockshare.server._control import request

pytestmark = pytest.mark.timeout(120)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def agent(addr: tuple[str, int]) -> str:
    """One agent-check: connect, read the line until the agent closes."""
    with socket.create_connection(addr, timeout=5.0) as s:
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert out.endswith(b"\n"), out
    assert out.count(b"\n") == 1, out
    return out.decode().strip()


def healthz(addr: tuple[str, int]) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/healthz", timeout=5.0) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def health_cli(control: str, *args: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "sockshare.cli", "health", *args, "--control", control],
                         capture_output=True, text=True, timeout=30, env=env_with_apps(),
                         cwd=str(ROOT), check=False)
    return out.returncode, (out.stdout + out.stderr).strip()


def test_weight_follows_the_load_and_manual_states(tmp_path: Path) -> None:
    with Server(tmp_path, "--agent", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                "--max-conns", "2", workers=2) as srv:
        st = srv.status()
        ag, metrics = _addr(st["agent"]), _addr(st["metrics"])
        addr = srv.address()
        assert agent(ag) == "ready 100%"
        assert healthz(metrics) == (200, "ready 100%\n")
        held: list[socket.socket] = []
        try:
            for _ in range(2):           # 2 of 4 places taken
                held.append(hold(addr)[0])
            wait_until(lambda: agent(ag) == "ready 50%", 10.0, "ready 50%")
            for _ in range(2):           # full: the floor, still ready
                held.append(hold(addr)[0])
            wait_until(lambda: agent(ag) == "ready 10%", 10.0, "ready 10% (the floor)")
            assert healthz(metrics)[0] == 200
        finally:
            for s in held:
                reset_close(s)
        wait_until(lambda: agent(ag) == "ready 100%", 10.0, "ready 100% again")

        assert health_cli(srv.control) == (0, "ready 100%")
        assert health_cli(srv.control, "drain") == (1, "drain")
        assert agent(ag) == "drain"
        assert healthz(metrics) == (503, "drain\n")
        s, answer = hold(addr)          # drained: it still serves what it is sent
        reset_close(s)
        assert answer["pid"]
        assert health_cli(srv.control, "maint") == (1, "maint")
        assert agent(ag) == "maint"
        assert health_cli(srv.control, "ready") == (0, "ready 100%")
        assert agent(ag) == "ready 100%"
        resp = request(srv.control, {"cmd": "health", "set": "sideways"})
        assert not resp["ok"]
        assert "drain" in resp["error"]
        # an agent client that sends something first (HAProxy's agent-send) gets the line
        with socket.create_connection(ag, timeout=5.0) as s:
            s.sendall(b"hello agent\n")
            assert s.recv(100) == b"ready 100%\n"


def test_maint_while_no_worker_is_ready(tmp_path: Path) -> None:
    # a worker command that never connects its channel: no worker is ever ready
    with Server(tmp_path, "--agent", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                "--worker-cmd", f"{sys.executable} -c 'import time; time.sleep(60)'",
                app=None, workers=1, ready=0) as srv:
        st = srv.status()
        assert agent(_addr(st["agent"])) == "maint"
        assert healthz(_addr(st["metrics"])) == (503, "maint\n")


def test_drain_while_stopping(tmp_path: Path) -> None:
    with Server(tmp_path, "--agent", "127.0.0.1:0", workers=1) as srv:
        ag = _addr(srv.status()["agent"])
        s, _ = hold(srv.address())      # keeps the worker busy through the grace time
        try:
            srv.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: agent(ag) == "drain", 5.0, "drain while stopping")
        finally:
            reset_close(s)
        assert srv.stop() == 0


def test_drain_during_upgrade_on_both_dispatchers(tmp_path: Path) -> None:
    flag = tmp_path / "slow-import"
    with LiveServer(tmp_path, "--agent", "127.0.0.1:0", "--upgrade-probation", "0.5",
                    app="live_apps:handle", workers=1,
                    env={"LIVE_APPS_SLOW_IMPORT": str(flag)}) as srv:
        old = srv.current()   # (the dispatcher; srv.pid is the master, the same throughout)
        ag = _addr(srv.status()["agent"])
        assert agent(ag) == "ready 100%"
        seen: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    seen.append(agent(ag))
                except (OSError, AssertionError) as exc:
                    errors.append(repr(exc))
                time.sleep(0.02)

        flag.touch()         # the new dispatcher's workers take 5 s to import the app
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            resp = srv.command({"cmd": "upgrade", "wait": False})
            assert resp["ok"], resp
            wait_until(lambda: "drain" in seen, 5.0, "drain while the new dispatcher starts")
            assert srv.current() == old
            wait_until(lambda: srv.current() != old, 30.0, "the new dispatcher")
            wait_until(lambda: not os.path.exists(f"/proc/{old}"), 30.0,
                       "the old dispatcher to exit")
            wait_until(lambda: seen[-1:] == ["ready 100%"], 10.0, "ready once the upgrade is over")
        finally:
            stop.set()
            poller.join(10)
        assert not errors, errors[:5]
        first = seen.index("drain")
        assert set(seen[first:seen.index("ready 100%", first)]) == {"drain"}, seen


def test_agent_setting_checks() -> None:
    doc: dict[str, Any] = {"agent": "127.0.0.1:9200", "pools": {"web": {"app": "m:f"}}}
    assert parse_document(doc).agent == "127.0.0.1:9200"
    for bad in ("unix:/run/agent.sock", "nope", 9200):
        with pytest.raises(ConfigError):
            parse_document({**doc, "agent": bad}).validate()
