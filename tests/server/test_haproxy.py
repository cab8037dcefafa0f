"""A real HAProxy in front of two sockshare hosts: PROXY v2, agent-check, rolling restarts
and upgrades with no failed connection.

The test starts Debian's ``haproxy`` itself with ``deploy/haproxy.cfg`` (the file users
copy; its example addresses, ports and stats socket are replaced with the test's) in front
of two ``sockshare serve --proxy-protocol required --agent ...`` that stand for two hosts:
the same ports on 127.0.0.2 (host a) and 127.0.0.3 (host b). A client thread keeps
opening short connections through HAProxy from 127.0.0.5 and checks that each worker saw
its exact address and port in the PROXY header; long-lived connections are held open
beside it. Then:

* a rolling restart: ``sockshare health drain`` on a host, HAProxy marks it DRAIN and
  stops sending it connections, the host is stopped, started again, announces ``ready``,
  HAProxy sends it connections again; the same for the other host;
* a rolling upgrade: ``sockshare upgrade`` on a, then b; HAProxy sees the host DRAIN
  while its upgrade lasts and UP after; the long-lived connections (as many on each
  host) stay open, their sessions go on (they move to the new dispatcher's workers).

The client must see no failed connection at all. Without ``haproxy`` the test is skipped
(``apt-get install haproxy``), except in CI (CI=true), where it fails. Only processes the
test started are stopped, by pid.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LiveServer, ShortLoad, wait_until
from serve_helpers import IN_CI, ROOT, connect, read_line

from sockshare.server._control import request

pytestmark = pytest.mark.timeout(300)

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)
HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}
CLIENT_IP = "127.0.0.5"
APP = "haproxy_apps:handle"


def _need_haproxy() -> str:
    if HAPROXY is None:
        if IN_CI:
            pytest.fail("haproxy is not installed (.ci/run installs it: apt-get install haproxy)")
        pytest.skip("haproxy is not installed: apt-get install haproxy (Debian) to run this test")
    return HAPROXY


def _free_port(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (bounded tries)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port: int = s.getsockname()[1]
        ok = True
        for h in hosts:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise AssertionError(f"no port free on {hosts}")


def haproxy_config(front: int, port: int, agent: int, stats: Path) -> str:
    """deploy/haproxy.cfg with the test's addresses (each example value must be there)."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    for old, new in (("bind :80", f"bind 127.0.0.1:{front}"),
                     ("10.0.0.11:8000", f"{HOSTS['a']}:{port}"),
                     ("10.0.0.12:8000", f"{HOSTS['b']}:{port}"),
                     ("agent-port 9200", f"agent-port {agent}"),
                     ("/run/haproxy/admin.sock", str(stats))):
        assert old in text, f"deploy/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    return text


class HAProxy:
    """``haproxy -db -f CFG`` in the foreground; its stats socket for the servers' state."""

    def __init__(self, tmp: Path, config: str, front: int) -> None:
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(config)
        self.stats = tmp / "haproxy.sock"
        self.log_path = tmp / "haproxy.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([_need_haproxy(), "-db", "-f", str(self.cfg)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.front = ("127.0.0.1", front)
        try:
            wait_until(lambda: self.proc.poll() is not None or self._up(), 15.0, "haproxy to start")
            assert self.proc.poll() is None, f"haproxy exited:\n{self.log()}"
        except BaseException:
            self.close()
            raise

    def _up(self) -> bool:
        try:
            return "sockshare" in self.command("show stat")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(self.stats))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of the backend's servers, by name."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows
                if r["pxname"] == "sockshare" and r["svname"] in HOSTS}

    def wait_state(self, name: str, pred: Any, what: str, timeout: float = 20.0) -> dict[str, str]:
        last: dict[str, str] = {}

        def check() -> bool:
            nonlocal last
            last = self.servers()[name]
            return bool(pred(last))

        try:
            wait_until(check, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}: server {name} is {last.get('status')} weight "
                                 f"{last.get('weight')} (last agent: {last.get('agent_status')} "
                                 f"{last.get('last_agt')})\n{self.log()[-3000:]}") from None
        return last

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _ready(row: dict[str, str]) -> bool:
    return row["status"] == "UP" and int(row["weight"] or 0) > 0


class Load(ShortLoad):
    """Short connections through HAProxy in a loop (two threads); every failure kept,
    and which host answered, in order."""

    pause = 0.005

    def __init__(self, addr: tuple[str, int], threads: int = 2) -> None:
        self.answers: list[str] = []
        super().__init__(addr, threads)

    def _once(self) -> None:
        with connect(self.addr, src=CLIENT_IP, timeout=10.0) as s:
            me = list(s.getsockname()[:2])
            s.sendall(b"who\n")
            line = read_line(s)
        if not line:
            raise ConnectionError("closed without an answer")
        answer = json.loads(line)
        src = (answer.get("proxy") or {}).get("src")
        if src != me:
            raise ConnectionError(f"the worker saw {src}, the client is {me}")
        with self.lock:
            self.answers.append(str(answer["host"]))

    def mark(self) -> int:
        with self.lock:
            return len(self.answers)

    def since(self, mark: int) -> Counter[str]:
        with self.lock:
            return Counter(self.answers[mark:])


class Long:
    """A long-lived connection through HAProxy: one line, one answer, as often as asked;
    the server's count of lines goes on across migrations (the same session)."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = connect(addr, src=CLIENT_IP, timeout=10.0)
        self.me = list(self.sock.getsockname()[:2])
        self.buf = b""
        self.n = 0
        self.first = self.ask()

    def ask(self) -> dict[str, Any]:
        self.sock.sendall(b"ping\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the connection was closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        assert out["n"] == self.n + 1, (out, self.n)
        self.n += 1
        return out


class Hosts:
    """The two sockshare hosts: same ports, addresses 127.0.0.2 and 127.0.0.3."""

    def __init__(self, tmp: Path, port: int, agent: int) -> None:
        self.tmp, self.port, self.agent = tmp, port, agent
        self.servers: dict[str, LiveServer] = {}
        self.starts: Counter[str] = Counter()

    def start(self, name: str) -> LiveServer:
        self.starts[name] += 1
        ip = HOSTS[name]
        srv = LiveServer(self.tmp / f"{name}{self.starts[name]}", "--proxy-protocol", "required",
                         "--agent", f"{ip}:{self.agent}", "--upgrade-probation", "0.5",
                         app=APP, workers=2, bind=[f"{ip}:{self.port}"],
                         env={"HAPROXY_TEST_HOST": name})
        self.servers[name] = srv
        return srv

    def health(self, name: str, state: str | None = None) -> str:
        req: dict[str, Any] = {"cmd": "health"}
        if state is not None:
            req["set"] = state
        resp = request(self.servers[name].control, req, timeout=5.0)
        assert resp["ok"], resp
        return str(resp["line"])

    def wait_ready(self, name: str, timeout: float) -> None:
        wait_until(lambda: self.health(name).startswith("ready"), timeout,
                   f"the agent of {name} to say ready")

    def close(self) -> None:
        for srv in self.servers.values():
            srv.close()


def _longs(front: tuple[str, int], per_host: int = 3) -> list[Long]:
    """``per_host`` long-lived connections on each host, no more: with ``balance
    leastconn`` a host holding more of them would get no new connection at all."""
    kept: list[Long] = []
    for _ in range(10 * per_host * len(HOSTS)):
        c = Long(front)
        if sum(k.first["host"] == c.first["host"] for k in kept) < per_host:
            kept.append(c)
            if len(kept) == per_host * len(HOSTS):
                return kept
        else:
            c.sock.close()
    for c in kept:
        c.sock.close()
    raise AssertionError(f"could not open {per_host} connections on each host")


def _serving(load: Load, name: str, hosts: Hosts, proxy: HAProxy) -> None:
    """Wait (bounded) until the load gets answers from host ``name`` again."""
    mark = load.mark()
    try:
        wait_until(lambda: load.since(mark)[name] >= 5, 20.0)
    except AssertionError:
        raise AssertionError(f"{name} does not get connections: its agent says "
                             f"{hosts.health(name)!r}, haproxy {proxy.servers()[name]}") from None


def test_haproxy_rolling_restart_and_upgrade(tmp_path: Path) -> None:
    _need_haproxy()
    port = _free_port(*HOSTS.values())
    agent = _free_port(*HOSTS.values())
    front = _free_port("127.0.0.1")
    hosts = Hosts(tmp_path, port, agent)
    proxy: HAProxy | None = None
    load: Load | None = None
    longs: list[Long] = []
    try:
        for name in HOSTS:
            hosts.start(name)
            assert hosts.health(name) == "ready 100%"
        proxy = HAProxy(tmp_path, haproxy_config(front, port, agent, tmp_path / "haproxy.sock"), front)
        for name in HOSTS:
            proxy.wait_state(name, _ready, f"{name} up in haproxy")

        # the client's exact address and port reach the worker, on both hosts
        load = Load(proxy.front)
        mark = load.mark()
        wait_until(lambda: set(load.since(mark)) == set(HOSTS) if load else False, 20.0,
                   "answers from both hosts")
        longs = _longs(proxy.front)
        for c in longs:
            assert c.first["proxy"]["src"] == c.me, c.first
            assert c.first["client"][0] != CLIENT_IP    # the peer is HAProxy

        # rolling restart: drain through the agent, stop, start, ready; a then b
        for name in HOSTS:
            assert hosts.health(name, "drain") == "drain"
            proxy.wait_state(name, lambda r: r["status"].startswith("DRAIN"), f"{name} drained")
            time.sleep(0.5)   # connections already sent to it finish
            drained = load.mark()
            wait_until(lambda m=drained: load is not None and sum(load.since(m).values()) >= 20,
                       20.0, "load while drained")
            assert load.since(drained)[name] == 0, f"{name} got connections while drained"
            for c in [c for c in longs if c.first["host"] == name]:
                assert c.ask()["host"] == name   # a drained host keeps its connections
            assert hosts.servers[name].stop() == 0
            hosts.servers[name].close()
            for c in [c for c in longs if c.first["host"] == name]:
                c.sock.close()   # (they ended with the host)
            longs = [c for c in longs if c.first["host"] != name]
            hosts.start(name)
            proxy.wait_state(name, _ready, f"{name} ready again after its restart")
            _serving(load, name, hosts, proxy)
        assert not load.failures, load.failures[:10]
        restart_conns = sum(load.since(0).values())
        print(f"\nrolling restart: {restart_conns} connections through HAProxy, "
              f"{len(load.failures)} failed")

        # rolling upgrade: a then b; the long-lived connections on each stay open
        for c in longs:
            c.sock.close()
        longs = _longs(proxy.front)
        for name in HOSTS:
            srv = hosts.servers[name]
            old = srv.current()
            seen: set[str] = set()
            watching = threading.Event()

            def watch(who: str = name, out: set[str] = seen, until: threading.Event = watching) -> None:
                while not until.is_set():
                    with contextlib.suppress(OSError, KeyError):
                        out.add(proxy.servers()[who]["status"] if proxy else "")
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                resp = srv.command({"cmd": "upgrade", "wait": True})
                assert resp["ok"], resp
                assert resp["pid"] != old
                wait_until(lambda s=srv, o=old: s.current() != o, 20.0, "the new dispatcher answering")
                # the agent says drain until the old dispatcher is gone, then ready
                hosts.wait_ready(name, 30.0)
                proxy.wait_state(name, _ready, f"{name} ready after its upgrade", timeout=30.0)
            finally:
                watching.set()
                watcher.join(10)
            assert any(st.startswith("DRAIN") for st in seen), seen   # HAProxy saw the drain
            for c in longs:
                answer = c.ask()
                assert answer["host"] == c.first["host"]
                assert answer["proxy"]["src"] == c.me, answer
                if c.first["host"] == name:
                    assert answer["moves"] >= 1, answer   # moved to the new workers
            _serving(load, name, hosts, proxy)
        load.finish()
        assert not load.failures, load.failures[:10]
        assert sum(load.since(0).values()) > 100
        print(f"rolling upgrade: {sum(load.since(0).values()) - restart_conns} connections "
              f"through HAProxy, {len(load.failures)} failed; {len(longs)} long-lived "
              "connections open throughout")
    finally:
        if load is not None:
            load.finish()
        for c in longs:
            with contextlib.suppress(OSError):
                c.sock.close()
        if proxy is not None:
            proxy.close()
        hosts.close()
