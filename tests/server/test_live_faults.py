"""Faults during migration: a worker SIGKILLed while a connection moves out of it or into
it. The rule: the connection ends up served by exactly one worker, or closed -- never by
two (the echo counter would skip or repeat, two workers would count it), never leaked
(the dispatcher's descriptor count comes back to its baseline).

Timing is made deterministic with SIGSTOP: a stopped target holds the forwarded handoff
unanswered, so the kill lands exactly "in the middle".
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, LiveServer, ask_demo, fd_count, wait_until

pytestmark = pytest.mark.timeout(180)

APP = "live_apps:handle"


def _idle(st: dict[str, Any]) -> bool:
    return all(w["inflight"] == 0 for w in st["workers"]) and all(
        w["state"] == "ready" for w in st["workers"])


def _baseline(srv: LiveServer) -> int:
    srv.wait_for(_idle, what="idle")
    time.sleep(0.2)
    return fd_count(srv.dispatcher)


def _wait_fds(srv: LiveServer, expected: int) -> None:
    wait_until(lambda: fd_count(srv.dispatcher) <= expected, timeout=10,
               what=f"dispatcher fds back to {expected} (now {fd_count(srv.dispatcher)})")


#: how a handler's own migration travels: relayed by the dispatcher, or straight to the
#: other worker (the default)
RELAY = ("--no-direct-migration",)
DIRECT: tuple[str, ...] = ()


def _kill_source_mid_move(srv: LiveServer, c: LineClient) -> tuple[int, int]:
    """Have ``c``'s worker migrate it to the other one, stopped (SIGSTOP): the handoff
    waits there unanswered (relayed, at the dispatcher's; direct, announced after a few
    ms) while the source is SIGKILLed; then the target goes on. (source, target) pids."""
    w = srv.workers()
    first = c.ask("echo a")
    source = first["pid"]
    target = w[2]["pid"] if first["id"] == 1 else w[1]["pid"]
    _kill_source_while_moving(srv, source, target, lambda: c.send("move\n"))
    return source, target


def _kill_source_while_moving(srv: LiveServer, source: int, target: int,
                              move: Callable[[], object]) -> None:
    """``move()`` starts a migration from ``source`` to ``target``, stopped (SIGSTOP):
    once the dispatcher shows it in flight, ``source`` is SIGKILLed; then the target goes
    on."""
    os.kill(target, signal.SIGSTOP)
    try:
        move()
        # (a direct one shows once announced: after ANNOUNCE_DELAY)
        srv.wait_for(lambda st: any(x["inflight"] == 1 and x["pid"] == target
                                    for x in st["workers"]), what="the migration in flight")
        os.kill(source, signal.SIGKILL)
        srv.wait_for(lambda st: any(x["restarts"] == 1 for x in st["workers"]),
                     what="the source restarted")
    finally:
        os.kill(target, signal.SIGCONT)


@pytest.mark.parametrize("mode", ["relay", "direct"])
def test_source_killed_while_its_connection_moves_out(tmp_path: Path, mode: str) -> None:
    """Relayed: the dispatcher holds the connection, so the target serves it although
    its source is dead. Direct: the target's ACCEPT cannot reach the dead source; it
    holds the connection, unread, until the dispatcher confirms that the source process
    has exited (so it cannot have taken the connection back), then serves it."""
    flags = RELAY if mode == "relay" else DIRECT
    with LiveServer(tmp_path, "--no-rebalance", "--policy", "round-robin", *flags, app=APP,
                    workers=2) as srv:
        base = _baseline(srv)
        c = LineClient(srv.address())
        source, target = _kill_source_mid_move(srv, c)
        moved = c.read()
        assert moved["moved"]
        assert moved["pid"] == target
        assert moved["from"] == source
        assert c.ask("echo b") == {"n": 2, "pid": target, "id": moved["id"], "echo": "b"}
        st = srv.wait_for(lambda st: _idle(st) and st["counters"]["migrations"] == 1, what="settled")
        assert sum(x["connections"] for x in st["workers"]) == 1
        assert st["counters"]["migrations_direct"] == (1 if mode == "direct" else 0)
        assert st["counters"]["lost"] == 0   # counted out on the target's accept
        if mode == "direct":
            assert "the source is gone" in srv.log()
        c.close()
        srv.wait_for(lambda st: sum(x["connections"] for x in st["workers"]) == 0, what="closed")
        _wait_fds(srv, base)


DEMO = "sockshare.server._demo_asgi:app"


def test_a_websocket_whose_source_dies_mid_move_is_served_by_its_target(tmp_path: Path) -> None:
    """A web app's WebSocket moving straight to the other worker, whose source is killed
    before the target's ACCEPT can reach it: the target holds the socket, not started
    (nothing read), asks the dispatcher, hears that the source is gone, and serves it --
    the client sees the move and goes on, nothing counted lost."""
    import json

    from websockets.sync.client import connect

    with LiveServer(tmp_path, "--no-rebalance", "--policy", "round-robin", app=DEMO,
                    workers=2) as srv:
        host, port = srv.address()
        with connect(f"ws://{host}:{port}/ws", open_timeout=10) as ws:
            first = ask_demo(ws, "a")["worker_pid"]
            ws.send(json.dumps({"cmd": "move"}))   # once: the peer channels are open
            moved = json.loads(str(ws.recv(timeout=15)))
            assert moved["event"] == "moved", moved
            source, target = moved["worker_pid"], first
            wait_until(lambda: srv.status()["counters"]["migrations"] == 1, timeout=10,
                       what="the first move counted")
            _kill_source_while_moving(srv, source, target,
                                      lambda: ws.send(json.dumps({"cmd": "move"})))
            again = json.loads(str(ws.recv(timeout=15)))
            assert again["event"] == "moved", again
            assert again["worker_pid"] == target
            assert again["from_pid"] == source
            assert ask_demo(ws, "b")["worker_pid"] == target
            st = srv.wait_for(lambda st: st["counters"]["migrations"] == 2, what="counted")
            assert st["counters"]["migrations_direct"] == 2
            assert st["counters"]["lost"] == 0, srv.log()[-3000:]
            assert "the source is gone" in srv.log()


def _sockets(pid: int) -> set[str]:
    """The sockets process ``pid`` has open (``socket:[inode]``)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:"):
                out.add(link)
    return out


def _give_up_midway(source: int, target: int, ask_to_move: Callable[[], None],
                    say_early: Callable[[], None]) -> set[str]:
    """Stop ``target``, let the app on ``source`` ask for a move it gives up on after
    0.5 s, say something while nobody reads, then let the target go on; returns the
    source's sockets from before (its connection's included)."""
    before = _sockets(source)
    os.kill(target, signal.SIGSTOP)
    try:
        ask_to_move()
        time.sleep(1.0)   # the app's deadline passes; the move is announced
        say_early()   # (read by nobody until the move is answered)
    finally:
        os.kill(target, signal.SIGCONT)
    return before


def _after_giving_up(srv: LiveServer, source: int, target: int, before: set[str],
                     ask: Callable[[str], str]) -> None:
    """What a move given up on midway must leave: the connection the target's alone
    (every answer from it), the source's socket closed, the move counted once, and the
    target alive past --timeout (not taken for hung)."""
    srv.wait_for(lambda st: st["counters"]["migrations"] == 3, what="the third move counted")
    wait_until(lambda: before - _sockets(source), timeout=10,
               what="the source's socket of the connection closed")
    time.sleep(4.0)   # past --timeout (3 s)
    for i in range(5):
        assert ask(f"m{i}") == f"{target} m{i}"
    st = srv.status()
    assert st["counters"]["hung_kills"] == 0, srv.log()[-3000:]
    assert st["counters"]["lost"] == 0
    assert sorted(w["connections"] for w in st["workers"]) == [0, 1]
    assert target in {w["pid"] for w in st["workers"]}


def test_a_websocket_whose_mover_gives_up_midway_lives_where_the_answer_puts_it(
        tmp_path: Path) -> None:
    """An app gives its WebSocket's move a deadline (``asyncio.wait_for``) and goes on
    when it passes, the WebSocket still on its way to a worker that is stopped: a move
    cannot be called back, so the app's cancellation waits for the answer -- the source
    neither serves the WebSocket again nor forgets the move. Once the target answers
    (SIGCONT), the WebSocket lives there alone, the source's socket is closed, and the
    dispatcher does not take the target for hung at --timeout."""
    from websockets.sync.client import connect

    pytest.importorskip("starlette", reason="pip install starlette (or the test extra)")
    with LiveServer(tmp_path, "--no-rebalance", "--timeout", "3", app="web_apps:combined_app",
                    workers=2) as srv:
        host, port = srv.address()
        with connect(f"ws://{host}:{port}/impatient?t=0.5", open_timeout=10) as ws:
            source = int(str(ws.recv(timeout=10)).split()[1])
            for _ in range(2):   # there and back: the channels between the two are open
                ws.send("move")
                target, source = source, int(str(ws.recv(timeout=10)).split()[1])

            def ask(text: str) -> str:
                ws.send(text)
                return str(ws.recv(timeout=10))

            before = _give_up_midway(source, target, lambda: ws.send("move"),
                                     lambda: ws.send("early"))
            here, pid, took = str(ws.recv(timeout=10)).split()
            assert (here, int(pid)) == ("here", target)
            assert int(took) > 500   # (on its way past the app's deadline: it fired)
            assert ws.recv(timeout=10) == f"{target} early"
            _after_giving_up(srv, source, target, before, ask)


def test_a_handler_connection_whose_mover_gives_up_midway_lives_where_the_answer_puts_it(
        tmp_path: Path) -> None:
    """The same with a handler (``live_apps``, ``impatient 0.5``): the handler goes on
    past its deadline; the connection is the target's alone once it answers, the
    source's handler ends without counting it closed, its socket closed."""
    import json

    with LiveServer(tmp_path, "--no-rebalance", "--timeout", "3", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        source = c.ask("echo a")["pid"]
        for _ in range(2):   # there and back
            c.send("move\n")
            target, source = source, c.read()["pid"]

        def ask(text: str) -> str:
            answer = c.ask(f"echo {text}")
            return f"{answer['pid']} {answer['echo']}"

        before = _give_up_midway(source, target, lambda: c.send("impatient 0.5\n"),
                                 lambda: c.send("echo early\n"))
        moved = c.read()
        assert (moved.get("moved"), moved["pid"], moved["from"]) == (True, target, source), moved
        assert moved["latency_us"] > 500_000   # (past the handler's deadline: it fired)
        early = c.read()
        assert (early["pid"], early["echo"], early["n"]) == (target, "early", 2), json.dumps(early)
        _after_giving_up(srv, source, target, before, ask)
        c.close()


#: the resume meta a peer worker sends: a handler's state, a web app's WebSocket
_RESUMES: dict[str, dict[str, Any]] = {
    APP: {"n": 1, "pids": [1]},
    DEMO: {"ws": {"from": 1, "deflate": None, "state": {"n": 0, "moves": 1},
                  "scope": {"path": "/ws", "raw_path": "/ws", "query_string": "",
                            "headers": [], "subprotocols": []}}},
}


@pytest.mark.parametrize("app", [APP, DEMO])
def test_a_direct_migration_whose_source_lives_is_not_served(tmp_path: Path, app: str) -> None:
    """The other side of that rule, with a real peer: a process that hands a worker (a
    handler's, a web app's) a migrating connection on its peer socket and closes its
    channel before the ACCEPT can reach it, while it lives. The worker must not serve it
    (the sender might have taken it back): closed, nothing read from it, nothing counted."""
    import socket as _socket

    import sockshare

    with LiveServer(tmp_path, "--no-rebalance", app=app, workers=1) as srv:
        st = srv.status()
        pid = st["workers"][0]["pid"]
        path = os.path.join(os.path.dirname(st["channel"]), f"{pid}.peer")
        server = _socket.create_server(("127.0.0.1", 0))
        client = _socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        try:
            with sockshare.Channel.connect(path, name="test") as ch:
                os.kill(pid, signal.SIGSTOP)    # it reads the handoff only after we left
                try:
                    meta = {"resume": _RESUMES[app],
                            "migration": {"from": 99, "from_pid": os.getpid(), "count": 1,
                                          "started": time.monotonic(), "reason": "test"}}
                    ch.close_timeout = 0.2
                    t = ch.send(conn, meta=meta, data=b"", ack=True)
                    ch.close()
                finally:
                    os.kill(pid, signal.SIGCONT)
            assert t.state == "abandoned"
            conn.close()
            client.settimeout(15)
            assert client.recv(1024) == b""     # closed by the worker, never served
            assert srv.status()["counters"]["migrations"] == 0
            assert "lives; closed here" in srv.log()
        finally:
            client.close()
            server.close()


@pytest.mark.parametrize("mode", ["relay", "direct"])
def test_target_killed_while_the_connection_moves_in(tmp_path: Path, mode: str) -> None:
    flags = RELAY if mode == "relay" else DIRECT
    with LiveServer(tmp_path, "--no-rebalance", "--policy", "round-robin", *flags, app=APP,
                    workers=2) as srv:
        base = _baseline(srv)
        w = srv.workers()
        c = LineClient(srv.address())
        first = c.ask("echo a")
        target = w[2]["pid"] if first["id"] == 1 else w[1]["pid"]
        os.kill(target, signal.SIGSTOP)
        c.send("move\n")
        srv.wait_for(lambda st: any(x["inflight"] == 1 for x in st["workers"]),
                     what="the migration in flight")
        os.kill(target, signal.SIGKILL)
        # no other worker: the dispatcher gives it back; the source goes on serving
        refused = c.read()
        assert "refused" in refused
        assert refused["pid"] == first["pid"]
        assert c.ask("echo b") == {"n": 2, "pid": first["pid"], "id": first["id"], "echo": "b"}
        st = srv.wait_for(_idle, what="target restarted")
        assert st["counters"]["migrations_refused"] == 1
        # relayed, the dispatcher got it back. Direct, the source did, then tried the
        # relay: the dispatcher may not have seen the target die yet and forward it there
        assert st["counters"]["returned"] == 1 if mode == "relay" else st["counters"]["returned"] <= 1
        assert sum(x["connections"] for x in st["workers"]) == 1
        c.close()
        srv.wait_for(lambda st: sum(x["connections"] for x in st["workers"]) == 0, what="closed")
        _wait_fds(srv, base)


@pytest.mark.parametrize("mode", ["relay", "direct"])
def test_target_killed_with_a_third_worker_free(tmp_path: Path, mode: str) -> None:
    """Direct: the source gets it back when the target dies, and the relay gives it to
    the third worker."""
    flags = RELAY if mode == "relay" else DIRECT
    with LiveServer(tmp_path, "--no-rebalance", "--policy", "round-robin", *flags, app=APP,
                    workers=3) as srv:
        base = _baseline(srv)
        c = LineClient(srv.address())
        first = c.ask("echo a")
        others = [x["pid"] for x in srv.status()["workers"] if x["pid"] != first["pid"]]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            c.send("move\n")
            srv.wait_for(lambda st: sum(x["inflight"] for x in st["workers"]) == 1,
                         what="the migration in flight")
            st = srv.status()
            stuck = next(x["pid"] for x in st["workers"] if x["inflight"] == 1)
            os.kill(stuck, signal.SIGKILL)
        finally:
            for pid in others:
                with contextlib.suppress(ProcessLookupError):   # (the killed one, reaped)
                    os.kill(pid, signal.SIGCONT)
        moved = c.read()
        survivor = next(p for p in others if p != stuck)
        assert moved["moved"]
        assert moved["pid"] == survivor
        assert c.ask("echo b")["n"] == 2
        c.close()
        srv.wait_for(lambda st: _idle(st) and sum(x["connections"] for x in st["workers"]) == 0,
                     what="settled")
        _wait_fds(srv, base)


def test_random_kills_during_a_migration_storm(tmp_path: Path) -> None:
    """Clients move their connections in a loop while workers are SIGKILLed at random.
    Every connection must either go on answering in order, or end (EOF/reset) -- and the
    dispatcher must hold no stray descriptor once it is over."""
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=3) as srv:
        base = _baseline(srv)
        addr = srv.address()
        stop = threading.Event()
        results: dict[str, int] = {"ok": 0, "ended": 0, "bad": 0, "migrations": 0}
        problems: list[str] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            rng = random.Random(k)
            while not stop.is_set():
                try:
                    c = LineClient(addr, timeout=15)
                except OSError as exc:
                    with lock:
                        problems.append(f"connect: {exc}")
                    return
                n = 0
                try:
                    while not stop.is_set():
                        if rng.random() < 0.5:
                            c.send("move\n")
                            answer = c.read()
                            if "moved" in answer:
                                with lock:
                                    results["migrations"] += 1
                            elif "refused" not in answer:
                                raise AssertionError(f"unexpected {answer}")
                        n += 1
                        answer = c.ask(f"echo {n}")
                        if answer.get("n") != n or answer.get("echo") != str(n):
                            with lock:
                                results["bad"] += 1
                                problems.append(f"client {k}: expected n={n}, got {answer}")
                            break
                    with lock:
                        results["ok"] += 1
                except (EOFError, ConnectionResetError, BrokenPipeError):
                    with lock:
                        results["ended"] += 1   # its worker was killed: closed, not hung
                except TimeoutError:
                    with lock:
                        problems.append(f"client {k}: hung")
                finally:
                    c.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        rng = random.Random(42)
        try:
            for _ in range(5):
                time.sleep(0.6)
                victims = [w["pid"] for w in srv.status()["workers"] if w["pid"] and w["state"] == "ready"]
                os.kill(rng.choice(victims), signal.SIGKILL)
            time.sleep(0.6)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not problems, problems[:5]
        assert results["bad"] == 0
        assert results["migrations"] > 50, results
        st = srv.wait_for(lambda st: _idle(st) and sum(w["connections"] for w in st["workers"]) == 0,
                          timeout=20, what="every connection closed and counted")
        print(f"storm: {results}; dispatcher counters {st['counters']}")
        _wait_fds(srv, base)
