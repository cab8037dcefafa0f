"""Keep-alive connections of a web app moved on request (``sockshare migrate``,
rebalancing), not by a drain: the move says why (``migration.reason``), a connection
that was not asked to move stays where it is, and one whose move gave up is still
closed by ``--timeout-keep-alive`` (docs/web.md, docs/server.md "Handoff metadata").

Real ``sockshare serve`` processes, real keep-alive clients (``http.client``)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LiveServer

pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")

pytestmark = pytest.mark.timeout(120)


def _get(c: http.client.HTTPConnection, path: str) -> str:
    c.request("GET", path)
    r = c.getresponse()
    assert r.status == 200
    return r.read().decode()


def _worker_ids(srv: LiveServer) -> dict[int, int]:
    return {int(w["pid"]): int(w["id"]) for w in srv.status()["workers"]}


def _pid(c: http.client.HTTPConnection) -> int:
    return int(_get(c, "/").split()[0])


def _ext(c: http.client.HTTPConnection) -> dict[str, Any]:
    return dict(json.loads(_get(c, "/ext")) or {})


def test_a_keep_alive_connection_moved_by_sockshare_migrate_says_request(tmp_path: Path) -> None:
    """``sockshare migrate --from W --count 1`` asks with reason "request" (a handler's
    connection and a WebSocket get it): a keep-alive connection it moves said
    "rebalance", the reason given was dropped on the way to the move."""
    with LiveServer(tmp_path, "--no-rebalance", app="web_apps:combined_app", workers=2) as srv:
        host, port = srv.address()
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            first = _pid(c)
            wid = _worker_ids(srv)[first]
            resp = srv.command({"cmd": "migrate", "from": wid, "count": 1, "wait": True})
            assert resp["ok"], resp
            assert _pid(c) != first, "not moved"
            m = _ext(c)["migration"]
        finally:
            c.close()
        assert (m["reason"], m["count"], m["from"]) == ("request", 1, wid), m


def test_sockshare_migrate_of_every_connection_is_once_not_for_good(tmp_path: Path) -> None:
    """``sockshare migrate --from W`` (no count: "every one that can move") moves the
    keep-alive connections W has now. A connection W takes afterwards was not asked to
    move: it stays on W between its requests. (It left W after its first response, and
    would have been closed, had no worker taken it: the worker stayed in drain mode.)"""
    with LiveServer(tmp_path, "--no-rebalance", app="web_apps:combined_app", workers=2) as srv:
        host, port = srv.address()
        c = http.client.HTTPConnection(host, port, timeout=10)
        later: list[http.client.HTTPConnection] = []
        try:
            first = _pid(c)
            wid = _worker_ids(srv)[first]
            resp = srv.command({"cmd": "migrate", "from": wid, "wait": True})
            assert resp["ok"], resp
            assert _pid(c) != first, "not moved"
            # a new connection on the same worker (least-conn: it has none now)
            for _ in range(10):
                d = http.client.HTTPConnection(host, port, timeout=10)
                later.append(d)
                if _pid(d) == first:
                    break
            else:
                pytest.fail(f"no new connection reached worker {wid}")
            pids = [_pid(d) for _ in range(3)]
            ext = _ext(d)
        finally:
            for x in [c, *later]:
                x.close()
        assert pids == [first] * 3, pids
        assert "migration" not in ext, ext


def test_sockshare_migrate_of_every_connection_moves_one_busy_after_its_response(
        tmp_path: Path) -> None:
    """A connection with a request in progress when ``sockshare migrate --from W`` asks
    for every connection moves once its response is complete (what the drain's hook
    does, on that connection only)."""
    with LiveServer(tmp_path, "--no-rebalance", app="web_apps:asgi", workers=2) as srv:
        host, port = srv.address()
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            first = _pid(c)
            c.request("GET", "/sleep?s=1.5")
            time.sleep(0.3)   # in the app now
            resp = srv.command({"cmd": "migrate", "from": _worker_ids(srv)[first],
                                "wait": False})
            assert resp["ok"], resp
            r = c.getresponse()
            assert int(r.read().decode().split()[0]) == first   # served where it began
            after = _pid(c)
        finally:
            c.close()
        assert after != first


def test_a_connection_whose_handover_gave_up_still_times_out(tmp_path: Path) -> None:
    """A move asked of an idle keep-alive connection whose client has not read its last
    response gives up after 5 s (the connection stays here). The keep-alive timer that
    the move stopped was never started again: the connection, idle, was never closed
    (``--timeout-keep-alive``: "seconds an idle keep-alive connection is kept")."""
    size = 64 * 1024 * 1024   # (more than the kernel buffers hold: some stays in the worker)
    with LiveServer(tmp_path, "--no-rebalance", "--timeout-keep-alive", "3",
                    app="web_apps:asgi", workers=2) as srv:
        addr = srv.address()
        s = socket.create_connection(addr, timeout=30)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            buf = b""
            while b"\r\n\r\n" not in buf or not buf.split(b"\r\n\r\n", 1)[1].strip():
                chunk = s.recv(4096)
                assert chunk, buf
                buf += chunk
            pid = int(buf.split(b"\r\n\r\n", 1)[1].split()[0])   # (the body: "pid port")
            wid = _worker_ids(srv)[pid]
            s.sendall(f"GET /big?n={size} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            time.sleep(0.5)   # the response is complete (written), the client reads none of it
            resp = srv.command({"cmd": "migrate", "from": wid, "count": 1, "wait": False})
            assert resp["ok"], resp
            time.sleep(6.0)   # the move waits 5 s for the client to read, then gives up
            data = b""
            while b"\r\n\r\n" not in data:   # now the client reads it all
                chunk = s.recv(1 << 16)
                assert chunk, "closed before the response was read"
                data += chunk
            got = len(data.split(b"\r\n\r\n", 1)[1])
            while got < size:
                chunk = s.recv(1 << 20)
                assert chunk, "closed before the body was read"
                got += len(chunk)
            # idle from here: closed after --timeout-keep-alive (3 s)
            s.settimeout(8.0)
            try:
                rest = s.recv(4096)
            except TimeoutError:
                pytest.fail("the idle keep-alive connection was not closed after 8 s")
            assert got == size
            assert rest == b"", rest[:100]
        finally:
            s.close()


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """The server closed ``s`` (EOF or reset) within ``seconds``, nothing read before."""
    s.settimeout(seconds)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("impl", ["httptools", "h11"])
def test_a_keep_alive_connection_moved_here_times_out_when_idle(tmp_path: Path, impl: str) -> None:
    """A keep-alive connection that moved to another worker between two requests (a
    reload, rebalancing, ``sockshare migrate``) is kept there, idle, as long as
    ``--timeout-keep-alive`` says -- not for ever: uvicorn starts the timer only when a
    response completes, and the new worker's protocol had served none."""
    with LiveServer(tmp_path, "--no-rebalance", "--timeout-keep-alive", "2", "--http", impl,
                    app="web_apps:combined_app", workers=2) as srv:
        host, port = srv.address()
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            first = _pid(c)
            resp = srv.command({"cmd": "migrate", "from": _worker_ids(srv)[first], "count": 1,
                                "wait": True})
            assert resp["ok"], resp
            assert c.sock is not None
            # moved as soon as it was asked (no request since): idle in the new worker
            assert _closed_within(c.sock, 8.0), "still open 8 s later (--timeout-keep-alive 2)"
        finally:
            c.close()


@pytest.mark.parametrize(("accept", "loop"), [("dispatcher", "auto"), ("worker", "uvloop"),
                                             ("worker", "asyncio")])
def test_a_connection_that_never_sends_is_closed(tmp_path: Path, accept: str, loop: str) -> None:
    """docs/web.md, "Bad input": a client that never sends -- the connection is closed
    (keep-alive timeout ``--timeout-keep-alive``)."""
    with LiveServer(tmp_path, "--timeout-keep-alive", "2", "--accept", accept, "--loop", loop,
                    app="web_apps:asgi", workers=1) as srv:
        s = socket.create_connection(srv.address(), timeout=10)
        try:
            srv.wait_for(lambda st: st["workers"][0]["connections"] == 1, 5, "the connection")
            assert _closed_within(s, 8.0), "still open 8 s later (--timeout-keep-alive 2)"
        finally:
            s.close()


def test_a_websocket_move_refused_on_the_way_is_counted(tmp_path: Path) -> None:
    """docs/web.md: ``migrate`` raises ``MigrationRefused`` if no worker took it or it
    cannot move, "the reason is logged and counted" (``web_moves_refused``). A move
    refused once under way -- the client had not taken what was written within 10 s,
    or no descriptor to duplicate -- raised it, uncounted and unlogged."""
    size = 64 * 1024 * 1024
    with LiveServer(tmp_path, "--no-rebalance", app="web_apps:combined_app", workers=2) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(30)
        s.connect(srv.address())
        try:
            s.sendall(f"GET /flood?n={size} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                      "connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "sec-websocket-version: 13\r\n\r\n".encode())
            time.sleep(11.0)   # read nothing: the move waits 10 s, then is refused
            data = b""
            while b"refused: " not in data[-4096:]:
                chunk = s.recv(1 << 20)
                assert chunk, data[:200]
                data += chunk
            assert data.startswith(b"HTTP/1.1 101"), data[:200]
        finally:
            s.close()
        st = srv.wait_for(lambda st: st["counters"]["web_moves_refused"] >= 1, 5,
                          "the refusal counted")
        assert st["counters"]["web_moves_refused"] == 1
        assert "did not take what was written" in srv.log()


def test_what_a_web_drain_closes_is_counted_as_drain_closed(tmp_path: Path) -> None:
    """docs/server.md ("Draining by progress"): what cannot move is closed -- for a web
    app, WebSockets that did not opt in get 1012 -- and "the closed ones are counted:
    ``drain_closed``" (the worker's ``unmoved`` report), which ``sockshare reload``
    prints as "M closed (could not move)". A web worker never reported them."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with LiveServer(tmp_path, "--grace", "1", app="web_apps:asgi", workers=1) as srv:
        host, port = srv.address()
        with connect(f"ws://{host}:{port}/ws", open_timeout=10) as ws:
            ws.send("a")
            ws.recv(timeout=10)
            resp = srv.command({"cmd": "reload", "wait": True})
            assert resp["ok"], resp

            def until_closed() -> None:
                while True:
                    ws.recv(timeout=10)

            with pytest.raises(ConnectionClosed) as closed:
                until_closed()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012
        st = srv.wait_for(lambda st: st["counters"]["web_ws_closed_1012"] >= 1, 10,
                          "the 1012 close counted")
        assert st["counters"]["drain_closed"] == 1, st["counters"]


def _response(s: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a content-length: its status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), body


@pytest.mark.parametrize("impl", ["httptools", "h11"])
def test_the_start_of_the_next_request_read_with_the_last_keeps_the_connection(
        tmp_path: Path, impl: str) -> None:
    """docs/web.md: "The connection is moved only when no byte of the next request has
    been read". A client that sent the start of its next request in the same write as
    the last one (a pipelining client): those bytes were in the old worker's parser
    when the connection moved after the response (httptools: the bytes after a request
    in the same read were not counted as a head begun), and the rest of the request
    reached the new worker alone: 400."""
    with LiveServer(tmp_path, "--http", impl, app="web_apps:asgi", workers=2) as srv:
        s = socket.create_connection(srv.address(), timeout=15)
        try:
            s.sendall(b"GET /sleep?s=1.5 HTTP/1.1\r\nhost: x\r\n\r\nGET / HT")
            time.sleep(0.3)   # the first request in the app
            resp = srv.command({"cmd": "reload", "wait": False})
            assert resp["ok"], resp
            status, body = _response(s)
            assert status == 200, body
            first = int(body.split()[0])
            time.sleep(1.0)   # (a move would have happened by now)
            s.sendall(b"TP/1.1\r\nhost: x\r\n\r\n")
            status, body = _response(s)
            assert status == 200, (status, body)
            assert int(body.split()[0]) == first   # served where it was read
        finally:
            s.close()


def _frame(s: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """The next frame a server sent (unmasked, short): its opcode and payload."""
    def need(n: int) -> None:
        while len(buf) < n:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed: {bytes(buf)!r}")
            buf.extend(chunk)

    need(2)
    n, pos = buf[1] & 0x7F, 2
    if n == 126:
        need(4)
        n, pos = int.from_bytes(buf[2:4], "big"), 4
    need(pos + n)
    opcode, payload = buf[0] & 0x0F, bytes(buf[pos:pos + n])
    del buf[:pos + n]
    return opcode, payload


def test_a_websocket_opened_while_its_worker_drains_is_asked_to_move(tmp_path: Path) -> None:
    """An opted-in WebSocket whose upgrade request was read partly before a reload's
    drain began and completed after it: it was offered the extension but never asked
    to move (the drain had asked the WebSockets open at its start), and got 1012 when
    ``--grace`` ended instead of moving with its state (docs/web.md)."""
    with LiveServer(tmp_path, "--grace", "3", app="web_apps:combined_app", workers=1) as srv:
        s = socket.create_connection(srv.address(), timeout=15)
        try:
            s.sendall(b"GET /where HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n")
            time.sleep(0.3)
            old = {w["pid"] for w in srv.status()["workers"]}
            resp = srv.command({"cmd": "reload", "wait": False})
            assert resp["ok"], resp
            srv.wait_for(lambda st: any(w["retiring"] for w in st["workers"]), 20,
                         "the old worker draining")
            s.sendall(b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"sec-websocket-version: 13\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(1)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 101"), head
            buf = bytearray()
            opcode, first = _frame(s, buf)
            assert opcode == 1, (opcode, first)
            assert json.loads(first)["pid"] in old
            opcode, second = _frame(s, buf)
            assert opcode == 1, (opcode, second)   # (8: closed, 1012)
            moved = json.loads(second)
            assert moved["pid"] not in old
            assert moved["migration"]["reason"] == "reload", moved
        finally:
            s.close()


def test_a_websocket_asked_once_is_not_counted_again(tmp_path: Path) -> None:
    """``migrate`` of up to ``n`` connections (rebalancing, ``sockshare migrate --count``)
    asks connections not yet asked, as a handler worker does (docs/server.md: "sets
    ``conn.migration_requested`` on up to *k* connections"). A web worker asked the same
    WebSockets again each time -- those of an app that does not move them used up every
    request, and its keep-alive connections were never asked."""
    import contextlib

    from websockets.sync.client import connect

    with LiveServer(tmp_path, "--no-rebalance", app="web_apps:combined_app", workers=2) as srv, \
            contextlib.ExitStack() as stack:
        host, port = srv.address()
        sockets = [stack.enter_context(connect(f"ws://{host}:{port}/echo", open_timeout=10))
                   for _ in range(4)]
        pids = []
        for ws in sockets:
            ws.send("x")
            pids.append(int(str(ws.recv(timeout=10)).split()[0]))
        a = pids[0]
        assert pids.count(a) == 2, pids   # (least-conn: two on each worker)
        # a keep-alive connection on the same worker: of two, one is there (least-conn)
        keep = [stack.enter_context(contextlib.closing(
            http.client.HTTPConnection(host, port, timeout=10))) for _ in range(2)]
        c = next(k for k in keep if _pid(k) == a)
        wid = _worker_ids(srv)[a]
        flagged = []
        for _ in range(2):
            resp = srv.command({"cmd": "migrate", "from": wid, "count": 2, "wait": False})
            assert resp["ok"], resp
            flagged.append(resp["flagged"])
            time.sleep(0.3)
        moved = _pid(c) != a
        # two of the three asked, then the third: the keep-alive connection moved
        assert flagged == [2, 1], flagged
        assert moved
