"""Listeners of every kind, configuration files with pools and routes, graceful stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ROOT, Server, ask, connect, env_with_apps, read_line

from sockshare.server._config import ConfigError, load_toml, parse_bind

pytestmark = pytest.mark.timeout(60)


def test_sigterm_completes_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    srv = Server(tmp_path, workers=2)
    try:
        addr = srv.address()
        socks = []
        for _ in range(6):
            s = connect(addr)
            s.sendall(b"sleep 1.0\n")
            socks.append(s)
        srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 6,
                     what="6 requests running in the workers")
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(ConnectionRefusedError):
            connect(addr, timeout=2).close()
        answers = [json.loads(read_line(s)) for s in socks]
        for s in socks:
            s.close()
        assert len(answers) == 6
        assert {a["id"] for a in answers} == {1, 2}
        assert srv.proc.wait(15) == 0
        assert time.monotonic() - t0 < 5.0
        log = srv.log()
        assert "SIGTERM: stopping" in log
        assert "stopped" in log
        assert "cancelled" not in log
        assert "lost" not in log
        assert not os.path.exists(srv.control)
    finally:
        srv.close()


def test_sigint_stops_too(tmp_path: Path) -> None:
    with Server(tmp_path, workers=1) as srv:
        ask(srv.address())
        assert srv.stop(signal.SIGINT) == 0


def test_unix_listener_stale_file_replaced_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                     # leaves a socket file nobody listens on
    with Server(tmp_path / "a", workers=1, bind=[f"unix:{path}"]) as srv:
        answer = ask(path)
        assert answer["client"] == "unix"
        assert answer["meta"]["peer"]["pid"] == os.getpid()
        # a second server must not steal the live socket
        (tmp_path / "b").mkdir()
        second = subprocess.run(
            [sys.executable, "-m", "sockshare.server._cli", "serve", "serve_apps:app", "--bind",
             f"unix:{path}", "--control", str(tmp_path / "b" / "c.ctl")],
            capture_output=True, text=True, timeout=30, env=env_with_apps(), cwd=ROOT,
            check=False)
        assert second.returncode == 1
        assert "already listens" in second.stderr
        assert ask(path)["id"] == 1
        assert srv.stop() == 0
    assert not os.path.exists(path)


def test_ipv6_listener(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    with Server(tmp_path, workers=1, bind=["[::1]:0", "127.0.0.1:0"]) as srv:
        st = srv.status()
        v6 = next(x["address"] for x in st["listeners"] if x["address"].startswith("["))
        host, _, port = v6.rpartition(":")
        answer = ask((host.strip("[]"), int(port)))
        assert answer["client"][0] == "::1"
        assert ask(srv.address("l1"))["client"][0] == "127.0.0.1"


def test_config_file_pools_and_routes(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text("""
queue = 8
[[listen]]
bind = "127.0.0.1:0"
name = "web"
sniff = true

[[listen]]
bind = "127.0.0.1:0"
name = "admin"
pool = "admin"

[pools.main]
app = "serve_apps:app"
workers = 2
policy = "round-robin"

[pools.beta]
app = "serve_apps:app"
workers = 1

[pools.admin]
app = "serve_apps:app"
workers = 1
max_conns = 5

[[routes]]
host = "*.beta.test"
pool = "beta"
""")
    with Server(tmp_path, "--config", str(cfg), app=None, workers=None, bind=[], ready=4) as srv:
        web, admin = srv.address("web"), srv.address("admin")

        def http(host: str) -> dict[str, Any]:
            with connect(web) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                reply: dict[str, Any] = json.loads(read_line(s))
                return reply

        assert {http("www.example")["pool"] for _ in range(4)} == {"main"}
        assert {http("www.example")["id"] for _ in range(4)} == {1, 2}
        beta = http("x.beta.test")
        assert beta["pool"] == "beta"
        assert beta["meta"]["route"] == "routes[0]"
        assert http("X.Beta.Test:8080")["pool"] == "beta"
        assert ask(admin)["pool"] == "admin"
        assert ask(admin)["meta"]["route"] == "listener"
        pools = {p["name"]: p for p in srv.status()["pools"]}
        assert pools["admin"]["max_conns"] == 5
        assert pools["main"]["queue_limit"] == 8


def test_sniff_failure_is_counted_and_logged(tmp_path: Path) -> None:
    with Server(tmp_path, "--proxy-protocol", "required", workers=1) as srv:
        addr = srv.address()
        with connect(addr) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")     # no PROXY header
            s.settimeout(5)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        with connect(addr) as s:
            s.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 80\r\nwho\n")
            answer = json.loads(read_line(s))
        assert answer["meta"]["proxy"]["src"] == ["10.1.2.3", 5555]
        assert answer["pre"] == 0
        st = srv.status()
        assert st["counters"]["sniff_failures"] == 1
        assert st["counters"]["refused_by_reason"] == {"sniff_failed": 1}
        assert "(sniff_failed): expected a PROXY protocol header" in srv.log()   # one line


@pytest.mark.parametrize(("text", "message"), [
    ("[pools.a]\napp='m:f'\nworkers=0\n[[listen]]\nbind='127.0.0.1:1'\n", "workers"),
    ("[pools.a]\napp='m:f'\nworker_cmd='x'\n[[listen]]\nbind='127.0.0.1:1'\n", "exactly one"),
    ("[pools.a]\napp='m:f'\nbogus=1\n[[listen]]\nbind='127.0.0.1:1'\n", "bogus"),
    ("[pools.a]\napp='m:f'\n[[listen]]\nbind='127.0.0.1:1'\n[[routes]]\npool='b'\n", "unknown pool"),
    ("[pools.a]\napp='m:f'\npolicy='fastest'\n[[listen]]\nbind='127.0.0.1:1'\n", "policy"),
    ("[pools.a]\napp='m:f'\n[[listen]]\nbind='::1:80'\n", "brackets"),
    ("[pools.a]\napp='m:f'\n", "no listener"),
    ("pools = 3", "pools"),
    ("[pools.a\n", "config"),
    ("direct_migration = 'no'\n[pools.a]\napp='m:f'\n[[listen]]\nbind='127.0.0.1:1'\n",
     "direct_migration must be bool"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_toml(p).validate()


def test_direct_migration_is_on_unless_turned_off(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[pools.a]\napp='m:f'\n[[listen]]\nbind='127.0.0.1:1'\n")
    assert load_toml(p).direct_migration is True
    p.write_text("direct_migration = false\n" + p.read_text())
    assert load_toml(p).direct_migration is False


def test_parse_bind() -> None:
    assert parse_bind("127.0.0.1:80").address == ("127.0.0.1", 80)
    assert parse_bind("[::1]:8080").address == ("::1", 8080)
    assert parse_bind(":80").address == ("0.0.0.0", 80)
    assert parse_bind("unix:/tmp/x.sock").address == "/tmp/x.sock"
    for bad in ("nope", "1.2.3.4:99999", "[::1]80", "unix:"):
        with pytest.raises(ConfigError):
            parse_bind(bad)


def test_bad_command_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "sockshare.server._cli", "serve", "a:b",
                        "--worker-cmd", "x"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                       check=False)
    assert r.returncode == 2
    assert "not both" in r.stderr


def test_metadata_of_the_fast_admission_path_is_exact(tmp_path: Path) -> None:
    """Without sniffing or routes the dispatcher encodes each connection's metadata
    itself (constant parts once): names with quotes, backslashes and non-ASCII letters
    reach the worker exactly as configured, with the client's address."""
    cfg = tmp_path / "serve.toml"
    cfg.write_text(r"""
[[listen]]
bind = "127.0.0.1:0"
name = "front \"ü\" \\ door"
pool = "pööl \"1\""

[pools."pööl \"1\""]
app = "serve_apps:app"
workers = 1
""")
    with Server(tmp_path, "--config", str(cfg), app=None, workers=None, bind=[]) as srv:
        st = srv.status()
        host, port = st["listeners"][0]["address"].rsplit(":", 1)
        with connect((host, int(port))) as s:
            s.sendall(b"who\n")
            answer = json.loads(read_line(s))
            local = s.getsockname()
        meta = answer["meta"]
        assert meta == {"handoff_id": answer["hid"], "listener": 'front "ü" \\ door',
                        "client": [local[0], local[1]], "route": "listener",
                        "pool": 'pööl "1"'}


def test_peers_that_hang_up_on_the_worker_channel_cost_only_themselves(tmp_path: Path) -> None:
    """Connecting to the dispatcher's ``<pid>.chan`` and hanging up (or saying nothing)
    before HELLO once ended its worker-accept task, and the server exited 1. Now each
    such peer is refused alone: the server serves on, and a restarted worker still gets
    in."""
    from sockshare.server._control import runtime_dir

    with Server(tmp_path, workers=2) as srv:
        srv.wait_ready(2)
        chan = os.path.join(runtime_dir(), f"{srv.dispatcher}.chan")
        silent = []
        for i in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(chan)
            if i % 2:
                s.close()  # hangs up at once
            else:
                silent.append(s)  # says nothing
        ask(srv.address())
        victim = next(iter(srv.workers().values()))["pid"]
        assert victim not in (os.getpid(), srv.proc.pid, srv.dispatcher)
        os.kill(victim, signal.SIGKILL)
        srv.wait_for(lambda st: sum(w["state"] == "ready" for w in st["workers"]) == 2
                     and victim not in {w["pid"] for w in st["workers"]},
                     timeout=20, what="the killed worker replaced")
        for _ in range(5):
            ask(srv.address())
        for s in silent:
            s.close()
        assert srv.proc.poll() is None
        assert "internal error" not in srv.log()
