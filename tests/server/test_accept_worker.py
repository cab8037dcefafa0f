"""``--accept worker``: the workers accept on the pool's listeners themselves.

Real ``sockshare serve`` processes with a Starlette app, real clients: new connections
are answered by both workers (the kernel spreads them); ``status`` counts what the
workers accepted (their ``opened`` reports) and what closed; keep-alive clients, an
opted-in WebSocket and a stream of new connections go through reloads with no failure
(the old workers stop accepting first, what waits in the accept queue goes to the new
ones); ``--max-conns`` makes a full worker stop accepting (the connection waits, it is
not refused); the descriptors of the workers come back to their count. And the
combinations that cannot work are refused with a ConfigError.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LiveServer, wait_until
from serve_helpers import env_with_apps
from test_web_handover import CountingSocket, KeepAliveClients

from sockshare import SockshareError
from sockshare.server._config import ConfigError, parse_document

pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")

pytestmark = pytest.mark.timeout(120)

APP = "web_apps:combined_app"


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _get(addr: tuple[str, int]) -> int:
    """One request on a new connection: the pid of the worker that answered."""
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
    try:
        c.request("GET", "/", headers={"connection": "close"})
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200, (r.status, body)
        return int(body.split()[0])
    finally:
        c.close()


class NewConnections:
    """Requests on a new connection each, back to back from ``n`` threads, until
    :meth:`finish`; every failure (a reset, a refusal, a timeout) is recorded."""

    def __init__(self, addr: tuple[str, int], n: int = 2) -> None:
        self.addr = addr
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self.done = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pids.add(_get(self.addr))
                self.done += 1
            except Exception as exc:
                self.failures.append(repr(exc))

    def finish(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def _conns(st: dict[str, Any]) -> int:
    return sum(int(w["connections"]) for w in st["workers"])


def _idle(addr: tuple[str, int], n: int) -> list[http.client.HTTPConnection]:
    """``n`` keep-alive connections, each after one answered request."""
    out = []
    for _ in range(n):
        c = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        assert r.status == 200
        out.append(c)
    return out


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_workers_accept_count_and_keep_every_client_through_reloads(tmp_path: Path,
                                                                     loop: str) -> None:
    with LiveServer(tmp_path, "--accept", "worker", "--grace", "3", "--loop", loop, app=APP,
                    workers=2) as srv:
        addr = srv.address()
        st = srv.status()
        workers = {int(w["pid"]) for w in st["workers"]}
        # new connections, a few at a time: both workers answer them
        load = NewConnections(addr, n=4)
        try:
            wait_until(lambda: load.pids >= workers or bool(load.failures), timeout=20,
                       what="both workers answering new connections")
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        # the app sees the minimal metadata of a connection its worker accepted
        c = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
        c.request("GET", "/ext")
        assert json.loads(c.getresponse().read()) == {"pool": "default", "listener": "main",
                                                      "accepted": "worker"}
        c.close()
        # descriptors: each worker back to its count after a few hundred connections
        before = {pid: _fds(pid) for pid in workers}
        for _ in range(200):
            _get(addr)
        wait_until(lambda: all(_fds(pid) <= n for pid, n in before.items()), timeout=10,
                   what=f"the workers' descriptors back to {before}")
        # the status counts the open connections the workers accepted, then their closes
        held = _idle(addr, 6)
        try:
            srv.wait_for(lambda s: _conns(s) == 6, timeout=10, what="6 connections counted")
        finally:
            for c in held:
                c.close()
        st = srv.wait_for(lambda s: _conns(s) == 0, timeout=10, what="0 connections counted")
        assert st["counters"]["worker_accepted"] >= 200 + 6
        assert st["counters"]["handoffs"] == 0   # (the dispatcher accepted none)

        # reloads under keep-alive clients, an opted-in WebSocket and new connections
        host, port = addr
        clients = KeepAliveClients(addr, n=6)
        ws = CountingSocket(f"ws://{host}:{port}/count")
        load = NewConnections(addr, n=2)
        try:
            wait_until(lambda: clients.requests >= 20 and ws.seen >= 10, timeout=20,
                       what="the first answers")
            for _ in range(3):
                done = load.done
                resp = srv.command({"cmd": "reload", "wait": True})
                assert resp["ok"], resp
                wait_until(lambda done=done: load.done >= done + 20, timeout=20,
                           what="new connections after the reload")
            n, seen = clients.requests, ws.seen
            wait_until(lambda: clients.requests >= n + 20 and ws.seen >= seen + 10, timeout=20,
                       what="answers after the reloads")
        finally:
            load.finish()
            clients.finish()
            ws.finish()
        assert load.failures == [], load.failures[:5]
        assert clients.failures == [], clients.failures[:5]
        assert ws.errors == [], ws.errors[:3]
        assert len(clients.pids) >= 3
        assert len(ws.pids) >= 3
        assert load.done > 60
        st = srv.wait_for(lambda s: _conns(s) == 0, timeout=10,
                          what="every connection counted out")
        assert st["counters"]["web_keepalive_handed_over"] >= 6
        assert st["counters"]["web_moves_refused"] == 0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_full_worker_stops_accepting_and_the_connection_waits(tmp_path: Path, loop: str) -> None:
    with LiveServer(tmp_path, "--accept", "worker", "--max-conns", "2", "--loop", loop, app=APP,
                    workers=1) as srv:
        addr = srv.address()
        held = _idle(addr, 2)
        try:
            srv.wait_for(lambda s: _conns(s) == 2, timeout=10, what="2 connections counted")
            # a third one: the kernel completes its handshake, the worker does not accept
            # it while it is full; it is answered once a connection closes
            third = socket.create_connection(addr, timeout=10)
            third.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            third.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.recv(100)
            assert _conns(srv.status()) == 2
            held.pop().close()
            third.settimeout(10)
            assert third.recv(100).startswith(b"HTTP/1.1 200 ")
            third.close()
        finally:
            for c in held:
                c.close()
        srv.wait_for(lambda s: _conns(s) == 0, timeout=10, what="0 connections counted")


def _doc(pool: dict[str, Any], *, listen: dict[str, Any] | None = None,
         routes: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"listen": [{"bind": "127.0.0.1:0", "name": "web", **(listen or {})}],
                           "pools": {"default": {"app": "m:app", "accept": "worker", **pool}},
                           **top}
    if routes is not None:
        doc["pools"]["other"] = {"app": "m:other"}
        doc["routes"] = routes
    return doc


@pytest.mark.parametrize(("doc", "words"), [
    (_doc({}, listen={"sniff": True}), "sniff = true"),
    (_doc({}, listen={"proxy": "optional"}), "PROXY protocol"),
    (_doc({}, routes=[{"host": "a.example", "pool": "other"}]), "routes[0] routes by Host"),
    (_doc({}, routes=[{"sni": "a.example", "pool": "other"}]), "routes[0] routes by SNI"),
    (_doc({}, dispatchers=2), "--dispatchers 2"),
    (_doc({"app": None, "worker_cmd": "php w.php"}), "not worker_cmd"),
    (_doc({"interface": "handler"}), "not --interface handler"),
    (_doc({"accept": "kernel"}), "accept must be one of dispatcher, worker"),
])
def test_combinations_that_cannot_work_are_refused(doc: dict[str, Any], words: str) -> None:
    pool = doc["pools"]["default"]
    if pool.get("app") is None:
        pool.pop("app", None)
    with pytest.raises(ConfigError) as err:
        parse_document(doc).validate()
    assert isinstance(err.value, SockshareError)
    assert words in str(err.value), str(err.value)


def test_a_listener_of_its_own_is_accepted() -> None:
    doc = _doc({}, listen={"pool": "default"})
    doc["listen"].append({"bind": "127.0.0.1:0", "name": "other", "sniff": True, "pool": "other"})
    doc["pools"]["other"] = {"app": "m:other"}
    doc["routes"] = [{"host": "b.example", "pool": "other", "listener": "other"}]
    cfg = parse_document(doc)
    cfg.validate()
    assert cfg.pools["default"].accept == "worker"
    assert [lc.name for lc in cfg.worker_listeners("default")] == ["web"]


def test_an_upgrade_keeps_every_client_and_new_connections(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--accept", "worker", "--grace", "3", app=APP, workers=2) as srv:
        addr = srv.address()
        clients = KeepAliveClients(addr, n=4)
        load = NewConnections(addr, n=2)
        try:
            wait_until(lambda: clients.requests >= 20 and load.done >= 20, timeout=20,
                       what="the first answers")
            old = srv.current()
            assert srv.command({"cmd": "upgrade", "wait": True})["ok"]
            wait_until(lambda: srv.current() != old, timeout=30, what="the new dispatcher")
            done, n = load.done, clients.requests
            wait_until(lambda: load.done >= done + 20 and clients.requests >= n + 20,
                       timeout=20, what="answers after the upgrade")
        finally:
            load.finish()
            clients.finish()
        assert load.failures == [], load.failures[:5]
        assert clients.failures == [], clients.failures[:5]
        st = srv.wait_for(lambda s: _conns(s) == 0, timeout=15, what="every connection counted out")
        assert st["counters"]["worker_accepted"] > 0   # (the new dispatcher's workers')


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_ends_in_the_worker_that_accepted(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    with LiveServer(tmp_path / "srv", "--accept", "worker", "--ssl-certfile", str(cert),
                    "--ssl-keyfile", str(key), app=APP, workers=2) as srv:
        host, port = srv.address()
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        for _ in range(10):
            c = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)
            c.request("GET", "/")
            r = c.getresponse()
            assert r.status == 200
            r.read()
            c.close()
        # a client that speaks plain HTTP to it is closed; the worker goes on
        with socket.create_connection((host, port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            with contextlib.suppress(OSError):
                plain.recv(100)
        assert _get_tls(host, port, ctx) == 200
        srv.wait_for(lambda s: _conns(s) == 0, timeout=10, what="0 connections counted")


def _get_tls(host: str, port: int, ctx: ssl.SSLContext) -> int:
    c = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)
    try:
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_a_handler_app_with_accept_worker_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    # ``auto`` cannot tell before the app is imported: the worker says so, the server stops
    proc = subprocess.run(
        [sys.executable, "-m", "sockshare.server._cli", "serve", "serve_apps:app", "--accept",
         "worker", "--workers", "1", "--bind", "127.0.0.1:0", "--control",
         str(tmp_path / "ctl" / "s.ctl")],
        env=env_with_apps(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'accept = "worker" needs an ASGI or WSGI app' in proc.stdout + proc.stderr
