"""WebSocket keep-alive pings under ``sockshare serve``, with uvicorn's names and defaults:
``--ws-ping-interval`` (20 s; 0: no pings) and ``--ws-ping-timeout`` (20 s; 0: wait
forever). A real server with the ASGI demo app and a raw client (wsproto) that sees every
ping: they come at the interval, go on after the WebSocket moved to another worker, and
a client that never answers is closed with 1011 once the timeout passed."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from serve_helpers import Server
from web_helpers import WEB_DIR, sockshare, worker_pids

wsproto = pytest.importorskip("wsproto", reason="pip install wsproto (the test extra)")
pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")

from wsproto import WSConnection  # noqa: E402
from wsproto.connection import ConnectionType  # noqa: E402
from wsproto.events import (  # noqa: E402
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

pytestmark = pytest.mark.timeout(120)
APP = "sockshare.server._demo_asgi:app"


class _Client:
    """A blocking WebSocket client that answers pings only when told to."""

    def __init__(self, addr: tuple[str, int], *, pong: bool) -> None:
        self.sock = socket.create_connection(addr, timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pong = pong
        self.pings: list[float] = []
        self.pending: list[Event] = []
        self.sock.sendall(self.ws.send(Request(host=f"{addr[0]}:{addr[1]}", target="/ws")))
        assert isinstance(self.next_event(10), AcceptConnection)

    def next_event(self, timeout: float) -> Event | None:
        """The next event other than a ping (pings are recorded, and answered if
        ``pong``); None when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, Ping):
                    self.pings.append(time.monotonic())
                    if self.pong:
                        self.sock.sendall(self.ws.send(event.response()))
                    continue
                return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
            if not data and not self.pending:
                return None

    def ask(self, obj: dict[str, object]) -> dict[str, object]:
        self.sock.sendall(self.ws.send(TextMessage(data=json.dumps(obj))))
        event = self.next_event(10)
        assert isinstance(event, TextMessage), event
        reply: dict[str, object] = json.loads(event.data)
        return reply

    def pings_for(self, seconds: float) -> int:
        """Wait ``seconds``, answering pings (a message meanwhile fails the test)."""
        before = len(self.pings)
        event = self.next_event(seconds)
        assert event is None, event
        return len(self.pings) - before

    def close(self) -> None:
        self.sock.close()


def test_pings_come_at_the_interval_and_go_on_after_a_move(tmp_path: Path) -> None:
    with sockshare(tmp_path, APP, "--ws-ping-interval", "0.3", "--ws-ping-timeout", "5",
                   "--no-rebalance") as srv:
        client = _Client(srv.address(), pong=True)
        try:
            first = client.ask({"hello": 1})
            assert client.pings_for(1.6) >= 3   # every 0.3 s (and the RTT), answered
            client.sock.sendall(client.ws.send(TextMessage(data=json.dumps({"cmd": "move"}))))
            moved = client.next_event(10)
            assert isinstance(moved, TextMessage), moved
            notice = json.loads(moved.data)
            assert notice["event"] == "moved"
            assert notice["worker_pid"] != first["worker_pid"]
            assert notice["worker_pid"] in worker_pids(srv)
            # the new worker pings it too, and it is still served there
            assert client.pings_for(1.6) >= 3
            assert client.ask({"hello": 2})["worker_pid"] == notice["worker_pid"]
        finally:
            client.close()


def test_a_client_that_never_answers_is_closed_with_1011(tmp_path: Path) -> None:
    with sockshare(tmp_path, APP, "--ws-ping-interval", "0.3", "--ws-ping-timeout", "0.5",
                   workers=1) as srv:
        # (before the connection: the server's first ping comes 0.3 s after the handshake,
        # its close 0.5 s after that -- at least 0.8 s from here however slow the rest)
        t0 = time.monotonic()
        client = _Client(srv.address(), pong=False)
        try:
            client.ask({"hello": 1})
            event = client.next_event(10)
            assert isinstance(event, CloseConnection), event
            assert event.code == 1011
            assert 0.8 <= time.monotonic() - t0 < 6
            assert len(client.pings) == 1
        finally:
            client.close()


def test_no_pings_with_an_interval_of_0(tmp_path: Path) -> None:
    """0 on the command line: no pings, though the environment says every 0.3 s (the
    command line wins, its 0 included: with the default of 20 s alone this test could
    not tell an interval of 0 from one ignored)."""
    with Server(tmp_path, "--ws-ping-interval", "0", app=APP, workers=1, cwd=WEB_DIR,
                env={"SOCKSHARE_WS_PING_INTERVAL": "0.3"}) as srv:
        client = _Client(srv.address(), pong=True)
        try:
            client.ask({"hello": 1})
            assert client.pings_for(1.5) == 0
            assert client.ask({"hello": 2})["n"] == 2
        finally:
            client.close()
