"""Web apps keep their keep-alive clients through reloads, upgrades and recycling.

Real ``sockshare serve`` processes with an ASGI app and a Flask (WSGI) app; real
keep-alive clients (``http.client``, one connection each, never reconnecting: a closed
connection is a failure) send requests all along while the server reloads, upgrades and
replaces workers past ``--max-requests``. Each answer names the worker process, so the
test sees every connection move to the new workers. WebSockets of an app that does not
opt in to migration stay on their old worker and are closed with 1012 when the grace
time ends. Descriptors of the dispatcher come back to their count after each phase.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LiveServer, ask_demo, wait_until
from serve_helpers import IN_CI

pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")

pytestmark = pytest.mark.timeout(180)


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class KeepAliveClients:
    """``n`` keep-alive connections, each asking ``GET /`` in turn from a thread until
    :meth:`finish`; every failure and every worker pid seen is recorded."""

    def __init__(self, addr: tuple[str, int], n: int = 8) -> None:
        self.conns = [http.client.HTTPConnection(addr[0], addr[1], timeout=10) for _ in range(n)]
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self.ports: dict[int, int] = {}
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, c in enumerate(self.conns):
                try:
                    c.request("GET", "/")
                    r = c.getresponse()
                    body = r.read().decode()
                    assert r.status == 200, (r.status, body)
                    pid, _port = body.split()
                    self.pids.add(int(pid))
                    assert c.sock is not None
                    port = c.sock.getsockname()[1]
                    if self.ports.setdefault(i, port) != port:
                        self.failures.append(f"connection {i} reconnected")
                    self.requests += 1
                except Exception as exc:
                    self.failures.append(f"connection {i}: {exc!r}")
                    c.close()
            time.sleep(0.01)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(15)
        for c in self.conns:
            c.close()


def _answers_other_than(srv: LiveServer, pid: int) -> bool:
    try:
        return srv.current() != pid
    except Exception:
        return False


def _server(tmp: Path, app: str, *args: str) -> LiveServer:
    return LiveServer(tmp, "--grace", "3", *args, app=app, workers=2)


def _reload(srv: LiveServer) -> None:
    resp = srv.command({"cmd": "reload", "wait": True})
    assert resp["ok"], resp


@pytest.mark.parametrize("app", ["web_apps:asgi", "web_apps:flask_app"])
def test_keep_alive_clients_survive_reloads_and_upgrades(tmp_path: Path, app: str) -> None:
    reloads = 20 if IN_CI or app.endswith("asgi") else 8
    with _server(tmp_path, app) as srv:
        fds = _fds(srv.dispatcher)
        clients = KeepAliveClients(srv.address())
        try:
            wait_until(lambda: clients.requests >= 20, timeout=20, what="the first requests")
            for _ in range(reloads):
                _reload(srv)
                time.sleep(0.1)
            served_before = len(clients.pids)
            migrations = srv.status()["counters"]["migrations"]
            wait_until(lambda: srv.status()["counters"]["web_keepalive_handed_over"] >= 8 * reloads,
                       timeout=10, what="the handovers counted in the status")
            for _ in range(2):
                old = srv.current()
                resp = srv.command({"cmd": "upgrade", "wait": True})
                assert resp["ok"], resp
                wait_until(lambda old=old: _answers_other_than(srv, old), timeout=30,
                           what="the new dispatcher on the control socket")
            n = clients.requests
            wait_until(lambda: clients.requests >= n + 40, timeout=20, what="requests after the upgrades")
        finally:
            clients.finish()
        assert clients.failures == [], clients.failures[:5]
        # every generation served these same connections
        assert served_before >= reloads + 1
        assert migrations >= 8 * reloads   # (the counters start again with each dispatcher)
        st = srv.status()
        assert {w["pid"] for w in st["workers"]} & clients.pids
        pid = st["dispatcher"]
        wait_until(lambda: _fds(pid) <= fds + 2, timeout=10,
                   what=f"the dispatcher's descriptors back to {fds}")


def test_max_requests_recycles_without_dropping_a_keep_alive_client(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--max-requests", "150", "--max-requests-jitter", "20",
                    app="web_apps:asgi", workers=1) as srv:
        clients = KeepAliveClients(srv.address(), n=6)
        try:
            wait_until(lambda: len(clients.pids) >= 4, timeout=60,
                       what="three workers replaced past --max-requests")
        finally:
            clients.finish()
        assert clients.failures == [], clients.failures[:5]
        assert srv.status()["counters"]["recycled"] >= 3


def test_websockets_of_apps_that_do_not_opt_in_close_with_1012_after_grace(tmp_path: Path) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with _server(tmp_path, "web_apps:asgi") as srv:
        host, port = srv.address()
        with connect(f"ws://{host}:{port}/ws", open_timeout=10) as ws:
            ws.send("a")
            old_pid = int(str(ws.recv(timeout=10)).split()[0])
            started = time.monotonic()
            _reload(srv)
            # still served by the old worker after the reload
            ws.send("b")
            assert int(str(ws.recv(timeout=10)).split()[0]) == old_pid

            def until_closed() -> None:
                while True:
                    ws.send("c")
                    ws.recv(timeout=10)
                    time.sleep(0.1)

            with pytest.raises(ConnectionClosed) as closed:
                until_closed()
            took = time.monotonic() - started
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012
            assert 2.5 <= took <= 9.0, took   # --grace 3
        wait_until(lambda: srv.status()["counters"]["web_ws_closed_1012"] == 1, timeout=10,
                   what="the 1012 close counted")




class CountingSocket:
    """One WebSocket to ``web_apps:starlette_app`` that keeps ``depth`` messages in
    flight (so that some are always on their way while the connection moves) and checks
    every answer: numbered 1, 2, 3... in order, the text it sent."""

    def __init__(self, url: str, depth: int = 4) -> None:
        from websockets.sync.client import connect

        self._cm = connect(url, open_timeout=10)
        self.ws = self._cm.__enter__()
        self.depth = depth
        self.sent = 0
        self.seen = 0
        self.pids: set[int] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while self.sent - self.seen < self.depth:
                    self.sent += 1
                    self.ws.send(f"m{self.sent}")
                n, pid, text = str(self.ws.recv(timeout=10)).split()
                self.seen += 1
                if (int(n), text) != (self.seen, f"m{self.seen}"):
                    self.errors.append(f"got {n} {text}, expected {self.seen} m{self.seen}")
                self.pids.add(int(pid))
                time.sleep(0.005)
        except Exception as exc:
            self.errors.append(repr(exc))

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._cm.__exit__(None, None, None)


def test_opted_in_websockets_move_with_their_state_and_in_flight_messages(tmp_path: Path) -> None:
    with _server(tmp_path, "web_apps:starlette_app") as srv:
        host, port = srv.address()
        sockets = [CountingSocket(f"ws://{host}:{port}/count") for _ in range(4)]
        try:
            wait_until(lambda: all(s.seen >= 10 or s.errors for s in sockets), timeout=20,
                       what="the first echoes")
            assert [s.errors for s in sockets] == [[]] * len(sockets)
            for _ in range(5):
                _reload(srv)
                time.sleep(0.2)
            wait_until(lambda: srv.status()["counters"]["web_ws_migrated_out"] >= 4 * 5, timeout=10,
                       what="the WebSocket moves counted in the status")
            assert srv.status()["counters"]["web_moves_refused"] == 0
            old = srv.current()
            assert srv.command({"cmd": "upgrade", "wait": True})["ok"]
            wait_until(lambda: _answers_other_than(srv, old), timeout=30, what="the new dispatcher")
            seen = [s.seen for s in sockets]
            wait_until(lambda: all(s.seen >= n + 20 for s, n in zip(sockets, seen, strict=True)),
                       timeout=20, what="echoes after the upgrade")
        finally:
            for s in sockets:
                s.finish()
        for s in sockets:
            assert s.errors == [], s.errors[:3]
            assert len(s.pids) >= 6   # it lived in every generation


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_keep_alive_answers_are_not_held_back_by_nagle(tmp_path: Path, loop: str) -> None:
    """A response written in two parts (head, then body) on a handed-over socket leaves
    at once: the worker sets TCP_NODELAY (asyncio does so only when the socket's proto
    says TCP, and an accepted socket's says 0). Without it each request waits 40 ms for
    the client's delayed ACK."""
    with LiveServer(tmp_path, "--loop", loop, app="web_apps:asgi", workers=1) as srv:
        host, port = srv.address()
        c = http.client.HTTPConnection(host, port, timeout=10)
        took = []
        for _ in range(15):
            started = time.perf_counter()
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            took.append(time.perf_counter() - started)
        c.close()
        took.sort()
        assert took[len(took) // 2] < 0.02, took


class PlainSocket:
    """WebSockets to an endpoint that does not opt in: echo after echo; when the server
    closes one, its close code and time are noted and a new one is opened."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.closes: list[tuple[int | None, float]] = []
        self.errors: list[str] = []
        self.echoes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        while not self._stop.is_set():
            try:
                with connect(self.url, open_timeout=10) as ws:
                    while not self._stop.is_set():
                        ws.send("p")
                        ws.recv(timeout=10)
                        self.echoes += 1
                        time.sleep(0.05)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                self.closes.append((code, time.monotonic()))
            except Exception as exc:
                self.errors.append(repr(exc))
                time.sleep(0.1)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(15)


def test_reloads_upgrades_and_recycling_under_mixed_load(tmp_path: Path) -> None:
    """The whole promise at once (docs/web.md): 20 reloads, 2 upgrades and --max-requests
    recycling while keep-alive clients that never reconnect, WebSockets that opt in and
    WebSockets that do not are all busy. 0 failed requests, 0 resets; the opted-in
    WebSockets keep an unbroken, ordered sequence; the others are closed with 1012 only,
    once their worker's grace is over."""
    grace = 1.5
    with LiveServer(tmp_path, "--grace", str(grace), "--max-requests", "3000",
                    app="web_apps:combined_app", workers=2) as srv:
        host, port = srv.address()
        fds = _fds(srv.dispatcher)
        http = KeepAliveClients((host, port), n=6)
        counting = [CountingSocket(f"ws://{host}:{port}/count", depth=2) for _ in range(3)]
        plain = [PlainSocket(f"ws://{host}:{port}/echo") for _ in range(2)]
        try:
            wait_until(lambda: http.requests >= 20 and all(c.seen >= 5 for c in counting),
                       timeout=20, what="the first answers")
            for i in range(20):
                _reload(srv)
                if i in (9, 19):   # an upgrade after the 10th and the 20th reload
                    old = srv.current()
                    resp = srv.command({"cmd": "upgrade", "wait": True})
                    assert resp["ok"], resp
                    wait_until(lambda old=old: _answers_other_than(srv, old), timeout=30,
                               what="the new dispatcher")
                time.sleep(0.2)
            n = http.requests
            wait_until(lambda: http.requests >= n + 30, timeout=20, what="requests after it all")
            pid = srv.current()
        finally:
            http.finish()
            for c in counting:
                c.finish()
            for p in plain:
                p.finish()
        assert http.failures == [], http.failures[:5]
        for c in counting:
            assert c.errors == [], c.errors[:3]
            assert len(c.pids) >= 10   # it moved with (nearly) every generation
        closes = [close for p in plain for close in p.closes]
        assert [p.errors for p in plain] == [[], []]
        assert closes, "no plain WebSocket was ever closed: were workers retired?"
        # (when: test_websockets_of_apps_that_do_not_opt_in_close_with_1012_after_grace)
        assert {code for code, _t in closes} == {1012}
        wait_until(lambda: _fds(pid) <= fds + 4, timeout=15,
                   what=f"the dispatcher's descriptors back near {fds}")


def test_rebalancing_moves_idle_keep_alive_connections_to_a_new_worker(tmp_path: Path) -> None:
    """20 keep-alive clients on one worker; TTIN adds a second one, and rebalancing moves
    idle keep-alive connections to it between two requests: the clients never reconnect
    and both workers end up serving them."""
    import signal

    with LiveServer(tmp_path, app="web_apps:asgi", workers=1) as srv:
        clients = KeepAliveClients(srv.address(), n=20)
        try:
            wait_until(lambda: clients.requests >= 40, timeout=20, what="the first requests")
            first = set(clients.pids)
            os.kill(srv.pid, signal.SIGTTIN)
            srv.wait_ready(2)
            wait_until(lambda: len(clients.pids - first) >= 1, timeout=20,
                       what="a client answered by the new worker")
            st = srv.wait_for(lambda st: min(w["connections"] for w in st["workers"]) >= 5,
                              timeout=20, what="the connections spread over both workers")
        finally:
            clients.finish()
        assert clients.failures == [], clients.failures[:5]
        assert st["counters"]["rebalances"] >= 1
        srv.wait_for(lambda st: st["counters"]["web_keepalive_handed_over"] >= 5, timeout=10,
                     what="the handovers counted (reported once a second)")


@pytest.mark.parametrize("accept", ["dispatcher", "worker"])
def test_a_request_in_progress_at_the_reload_moves_after_its_response(tmp_path: Path,
                                                                      accept: str) -> None:
    """The handover hook is on only while connections move: a request already in
    progress when the reload begins (its response not yet sent) still gets it, and its
    connection moves as soon as that response is complete."""
    with _server(tmp_path, "web_apps:asgi", "--accept", accept) as srv:
        addr = srv.address()
        c = http.client.HTTPConnection(addr[0], addr[1], timeout=20)
        try:
            c.request("GET", "/")
            r = c.getresponse()
            first = int(r.read().decode().split()[0])
            assert c.sock is not None
            port = c.sock.getsockname()[1]
            # a request in progress on its worker while the reload begins: its response
            # is due `busy` seconds later, at least 0.5 s after the reload returned (the
            # new workers are serving, the old ones were told to drain); on a machine
            # so loaded that the reload took longer, again with a longer request
            busy = 2.0
            for _attempt in range(4):
                sent = time.monotonic()
                c.request("GET", f"/sleep?s={busy}")
                time.sleep(0.3)
                resp = srv.command({"cmd": "reload", "wait": True})
                assert resp["ok"], resp
                in_time = time.monotonic() - sent < busy - 0.5
                r = c.getresponse()
                assert r.status == 200
                assert int(r.read().decode().split()[0]) == first   # served where it began
                if in_time:
                    break
                busy *= 2
                # (which worker serves it now: the next round's -- once the old one is
                # gone, so that the request does not reach it between its response and
                # the connection's move, or before a drain it has not begun yet)
                wait_until(lambda old=first: old not in {w["pid"] for w in srv.status()["workers"]},
                           timeout=30, what="the old worker gone")
                c.request("GET", "/")
                r = c.getresponse()
                first = int(r.read().decode().split()[0])
            else:
                pytest.fail("every reload took longer than the request in progress")
            c.request("GET", "/")
            r = c.getresponse()
            assert r.status == 200
            after = int(r.read().decode().split()[0])
            assert c.sock is not None
            assert c.sock.getsockname()[1] == port   # the same connection
        finally:
            c.close()
        assert after != first, srv.log()[-4000:]
        assert after in {w["pid"] for w in srv.status()["workers"]}
        wait_until(lambda: srv.status()["counters"]["web_keepalive_handed_over"] >= 1,
                   timeout=10, what="the handover counted in the status")


def test_moved_connections_carry_where_they_came_from_and_how_often_they_moved(
        tmp_path: Path) -> None:
    """``scope["extensions"]["sockshare"]["migration"]`` of a WebSocket and of a keep-alive
    connection after one reload and after a second: ``count`` 1 then 2, ``from`` the id
    of the worker it left, ``from_pid`` that worker's pid, ``reason`` "reload" (docs/web.md,
    docs/server.md: the same fields as a handler connection's)."""
    import json

    from websockets.sync.client import connect

    with _server(tmp_path, "web_apps:combined_app") as srv:
        host, port = srv.address()
        keep = http.client.HTTPConnection(host, port, timeout=10)

        def ext() -> dict[str, Any]:
            keep.request("GET", "/ext")
            r = keep.getresponse()
            assert r.status == 200
            return dict(json.loads(r.read()) or {})

        def worker_ids() -> dict[int, int]:
            return {int(w["pid"]): int(w["id"]) for w in srv.status()["workers"]}

        with connect(f"ws://{host}:{port}/where", open_timeout=10) as ws:
            first = json.loads(str(ws.recv(timeout=10)))
            assert first["migration"] is None
            assert "migration" not in ext()
            pid, ids = first["pid"], worker_ids()
            http_pid = None
            for count in (1, 2):
                _reload(srv)
                moved = json.loads(str(ws.recv(timeout=15)))
                m = moved["migration"]
                assert moved["pid"] != pid
                assert (m["count"], m["from_pid"], m["from"], m["reason"]) == \
                    (count, pid, ids[pid], "reload"), m
                assert isinstance(m["started"], float)
                h = ext()["migration"]
                assert (h["count"], h["reason"]) == (count, "reload"), h
                assert h["from_pid"] in ids, (h, ids)
                assert h["from"] == ids[h["from_pid"]], (h, ids)
                assert h["from_pid"] != http_pid
                http_pid = h["from_pid"]
                pid, ids = moved["pid"], worker_ids()
        keep.close()


def _demo_sockets(stack: contextlib.ExitStack, host: str, port: int, n: int) -> list[Any]:
    """``n`` WebSockets to the demo app's ``/ws``, each closed when ``stack`` ends."""
    from websockets.sync.client import connect

    return [stack.enter_context(connect(f"ws://{host}:{port}/ws", open_timeout=10))
            for _ in range(n)]


def test_a_reload_and_a_migration_move_websockets_straight_to_the_other_workers(
        tmp_path: Path) -> None:
    """Direct migration (docs/server.md): the WebSockets of a reload go from each old worker
    straight to a new one (the dispatcher lists the new generation to the workers it
    retires), and a ``migrate`` request's from one worker straight to the other -- none
    through the dispatcher, none lost, every one answering on its new worker, the new
    workers' counts within a few of each other, the dispatcher's descriptors as before."""
    n = 40
    with _server(tmp_path, "sockshare.server._demo_asgi:app", "--no-rebalance") as srv:
        host, port = srv.address()
        fds = _fds(srv.dispatcher)
        with contextlib.ExitStack() as stack:   # (each client closed at the end)
            sockets = _demo_sockets(stack, host, port, n)
            ask = ask_demo
            first = {ask(ws, "a")["worker_pid"] for ws in sockets}
            assert len(first) == 2
            _reload(srv)
            st = srv.wait_for(lambda st: st["counters"]["migrations"] == n, timeout=15,
                              what="the reload's moves counted")
            pids = [ask(ws, "b")["worker_pid"] for ws in sockets]
            assert not set(pids) & first
            assert st["counters"]["migrations_direct"] == n, st["counters"]
            assert st["counters"]["lost"] == 0
            counts = sorted(pids.count(p) for p in set(pids))
            assert counts[-1] - counts[0] <= 4, counts
            source = next(w for w in st["workers"] if w["pid"] == pids[0] and not w["retiring"])
            resp = srv.command({"cmd": "migrate", "from": source["id"], "count": None,
                                "wait": True}, timeout=60)
            assert resp["ok"], resp
            assert resp["migrated"] == pids.count(pids[0]), resp
            after = [ask(ws, "c")["worker_pid"] for ws in sockets]
            assert set(after) == set(pids) - {pids[0]}
            st = srv.wait_for(lambda st: st["counters"]["migrations"] == n + resp["migrated"],
                              timeout=15, what="the migration's moves counted")
            assert st["counters"]["migrations_direct"] == st["counters"]["migrations"]
            assert st["counters"]["migrations_refused"] == 0
        srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 0
                     and len(st["workers"]) == 2, what="the connections closed, the old workers gone")
        # (each worker's channel, as at the start; nothing held for a move)
        wait_until(lambda: _fds(srv.dispatcher) == fds, timeout=10,
                   what=f"the dispatcher's {fds} descriptors (it has {_fds(srv.dispatcher)})")


def test_an_upgrade_moves_websockets_straight_to_the_new_dispatchers_workers(
        tmp_path: Path) -> None:
    """Direct migration across an upgrade (docs/server.md): the old dispatcher lists the
    new one's workers (its ``peers`` command) to the workers it retires, so each
    WebSocket goes old worker -> new worker, through neither dispatcher: the new one
    counts every move as direct, none lost, each answering on a new worker, the new
    workers' counts within a few of each other; its ``peers`` command lists its two."""
    n = 40
    with _server(tmp_path, "sockshare.server._demo_asgi:app", "--no-rebalance") as srv:
        host, port = srv.address()
        with contextlib.ExitStack() as stack:   # (each client closed at the end)
            sockets = _demo_sockets(stack, host, port, n)
            ask = ask_demo
            first = {ask(ws, "a")["worker_pid"] for ws in sockets}
            assert len(first) == 2
            old = srv.current()
            resp = srv.command({"cmd": "upgrade", "wait": True})
            assert resp["ok"], resp
            wait_until(lambda: _answers_other_than(srv, old), timeout=30, what="the new dispatcher")
            st = srv.wait_for(lambda st: st["counters"]["migrations"] == n, timeout=20,
                              what="the upgrade's moves counted by the new dispatcher")
            pids = [ask(ws, "b")["worker_pid"] for ws in sockets]
            assert not set(pids) & first
            assert set(pids) == {w["pid"] for w in st["workers"]}
            assert st["counters"]["migrations_direct"] == n, st["counters"]
            assert st["counters"]["lost"] == 0
            counts = sorted(pids.count(p) for p in set(pids))
            assert counts[-1] - counts[0] <= 4, counts
            listed = srv.command({"cmd": "peers"})
            assert listed["ok"], listed
            assert sorted(e[1] for e in listed["pools"]["default"]) == sorted(set(pids))
