"""A web app's worker runtime (:class:`sockshare.server._runtime.Worker` with a
:class:`sockshare.server._web.WebServer`), built in the test process: what it reports of
handoffs it accepted but could not start. Real sockets; the channel that could not send
its ACCEPTs is a stand-in (only what ``_start_web_later`` uses of an AsyncChannel)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import pytest

from sockshare.server import WorkerInfo

pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")

from sockshare.server._runtime import Worker
from sockshare.server._web import WebServer, WebSettings

INFO = WorkerInfo(id=3, pid=os.getpid(), generation=1, pool="default")


async def app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that is never called here."""


class FeederThatBroke:
    """A feeder's channel (``--dispatchers N``) whose ACCEPTs never left."""

    buffered = 1
    usable = False

    async def drain(self) -> None:
        return None


def test_handoffs_whose_accepts_never_left_are_counted_out_once() -> None:
    """A feeder's handoffs are counted in by the worker's ``fed`` report; if the channel
    closes before their ACCEPTs leave, the worker closes them and counts each out once.
    It counted each twice (``WebServer.forget`` counts the close, and
    ``_start_web_later`` counted it again), so the dispatcher's count of the worker's
    connections fell below what it held."""

    async def main() -> int:
        web = WebServer(app, "asgi", WebSettings(lifespan="off"), on_tally=lambda: None)
        worker = Worker(None, INFO, "unused", web=web)
        pairs = [socket.socketpair() for _ in range(3)]
        try:
            for ours, _theirs in pairs:
                web.register(ours, {"handoff_id": "1.1"}, b"")
            await worker._start_web_later(FeederThatBroke(), web,  # type: ignore[arg-type]
                                          [ours for ours, _theirs in pairs], None)
            assert web.open_connections == 0
            for _ours, theirs in pairs:   # closed on our side
                assert theirs.recv(1) == b""
            return web.tally.closed
        finally:
            for ours, theirs in pairs:
                ours.close()
                theirs.close()

    assert asyncio.run(main()) == 3


def test_a_handoff_whose_accept_fails_is_closed_and_not_kept() -> None:
    """``Handoff.accept`` raising (the channel broke: "the sender has the connection
    back: close your copy and do not serve it"): the worker registered the connection
    before its ACCEPT and kept it registered, unclosed -- a connection it never serves,
    which its drain then waited for (``--grace`` longer to exit) -- and its copy stayed
    open until collected."""
    from sockshare import ChannelBroken
    from sockshare._state import Handoff

    def broken(_id: int, _reason: str | None) -> None:
        raise ChannelBroken("the dispatcher is gone")

    async def main() -> tuple[int, bytes]:
        web = WebServer(app, "asgi", WebSettings(lifespan="off"), on_tally=lambda: None)
        worker = Worker(None, INFO, "unused", web=web)
        ours, theirs = socket.socketpair()
        try:
            h = Handoff(1, ours, b"", b'{"handoff_id":"1.1"}', True, broken)
            worker._take_web(FeederThatBroke(), [h], web)  # type: ignore[arg-type]
            theirs.settimeout(2.0)
            return web.open_connections, theirs.recv(1)
        finally:
            ours.close()
            theirs.close()

    assert asyncio.run(main()) == (0, b"")


async def _ws_app(scope: Any, receive: Any, send: Any) -> None:
    """A WebSocket that opens and reads until it is closed."""
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


def test_a_websocket_closed_by_a_drain_is_counted_once() -> None:
    """A plain stop's drain sends every WebSocket 1012 at once and, once ``grace`` passed
    without progress, gives what is still open its last chance: a client that never
    answers the close frame is counted once (``ws_closed_1012`` and ``drain_closed``),
    not again at the last chance."""

    async def main() -> tuple[int, int, bytes]:
        web = WebServer(_ws_app, "asgi", WebSettings(lifespan="off"), on_tally=lambda: None)
        lst = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(lst.getsockname())
        ours, _ = lst.accept()
        lst.close()
        try:
            web.register(ours, {"handoff_id": "1.1"}, b"")
            web.start(ours)
            client.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            client.setblocking(False)
            head = b""
            for _ in range(200):
                await asyncio.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    head += client.recv(4096)
                if b"\r\n\r\n" in head:
                    break
            assert head.startswith(b"HTTP/1.1 101"), head
            await web.drain(0.3)   # (the client never answers the close frame)
            got = b""
            with contextlib.suppress(OSError):
                got = client.recv(64)
            return web.counts["ws_closed_1012"], web.drain_closed, got[:4]
        finally:
            client.close()
            ours.close()

    closed_1012, drain_closed, first = asyncio.run(main())
    assert first[:1] == b"\x88"   # a close frame...
    assert first[2:4] == (1012).to_bytes(2, "big")   # ...with 1012
    assert (closed_1012, drain_closed) == (1, 1)


def test_a_peers_migrations_whose_accepts_never_left_are_held_and_closed_uncounted() -> None:
    """A peer worker's direct migrations whose ACCEPTs could not leave (its end closed
    first): held, not started, while the dispatcher says whether the source lives; it
    does: closed here, and not reported closed -- they were never counted in (a direct
    move is counted in by ``moved_in``, sent when it is served)."""
    from sockshare.server._messages import MoveKey, OrphanAnswer, OrphanQuery

    class Stand:   # (what a held migration needs of its Handoff and its channel)
        def __init__(self, hid: int, sock: socket.socket) -> None:
            self.id, self.socket, self.data = hid, sock, b""
            self.meta = {"handoff_id": f"1.{hid}", "migration": {"from": 1, "from_pid": 99}}

    class PeerThatLeft(FeederThatBroke):
        peer = type("P", (), {"pid": 99})()

    async def main() -> tuple[int, list[Any]]:
        web = WebServer(app, "asgi", WebSettings(lifespan="off"), on_tally=lambda: None)
        worker = Worker(None, INFO, "unused", web=web)
        sent: list[Any] = []
        def control(msg: Any, *, soon: bool = False) -> None:
            sent.append(msg)

        worker.control = control  # type: ignore[method-assign]
        pairs = [socket.socketpair() for _ in range(2)]
        try:
            held: list[Any] = []
            for hid, (ours, _theirs) in enumerate(pairs, 1):
                web.register(ours, {"handoff_id": f"1.{hid}"}, b"")
                held.append((Stand(hid, ours), {"handoff_id": f"1.{hid}"}, None))
            await worker._start_web_later(PeerThatLeft(), web,  # type: ignore[arg-type]
                                          [ours for ours, _theirs in pairs], held)
            assert sorted(worker.peers.orphans) == [(99, 1), (99, 2)]
            assert [type(m) for m in sent] == [OrphanQuery, OrphanQuery]
            for hid in (1, 2):   # the source lives: closed
                worker.peers.adopt(OrphanAnswer(MoveKey(99, hid), False))
            assert not worker.peers.orphans
            assert web.open_connections == 0
            for _ours, theirs in pairs:
                assert theirs.recv(1) == b""
            return web.tally.closed, sent
        finally:
            for ours, theirs in pairs:
                ours.close()
                theirs.close()

    closed, _sent = asyncio.run(main())
    assert closed == 0


def test_a_peers_move_past_max_conns_is_refused_and_nothing_is_registered() -> None:
    """A web app's worker at its pool's ``max_conns`` refuses a peer worker's move
    (REJECT "worker at max_conns": the source relays it, the dispatcher places it by
    its exact counts), its copy closed, nothing registered or counted; one under the
    limit is not refused for it."""
    from sockshare._state import Handoff

    answers: list[tuple[int, str | None]] = []

    def answer(hid: int, reason: str | None) -> None:
        answers.append((hid, reason))

    meta = (b'{"handoff_id":"1.5","migration":{"from":1,"from_pid":99},'
            b'"resume":{"ws":{"from":99,"scope":{}}}}')

    async def main() -> tuple[int, int]:
        web = WebServer(app, "asgi", WebSettings(lifespan="off"), on_tally=lambda: None)
        worker = Worker(None, INFO, "unused", web=web, max_conns=1)
        held, other = socket.socketpair()
        ours, theirs = socket.socketpair()
        try:
            web.register(held, {"handoff_id": "1.1"}, b"")   # (one open already)
            h = Handoff(5, ours, b"", meta, True, answer)
            worker._take_web(FeederThatBroke(), [h], web, from_peer=True)  # type: ignore[arg-type]
            return web.open_connections, ours.fileno()
        finally:
            for s in (held, other, ours, theirs):
                s.close()

    open_now, fd = asyncio.run(main())
    assert answers == [(5, "worker at max_conns")]
    assert open_now == 1
    assert fd == -1   # (our copy closed by the REJECT)
