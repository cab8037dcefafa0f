"""The demo app's handler over real loopback sockets, with real HTTP and WebSocket clients.

The dispatcher and worker runtime may not exist yet, so :class:`DemoServer` stands in for
them: it accepts on ``127.0.0.1:0``, builds the ``reader``/``writer`` pair the way the
worker runtime does (``loop.connect_accepted_socket`` on a ``StreamReaderProtocol``, with
bytes "the dispatcher already read" fed into the reader first), wraps them with the
attributes the handler reads, and awaits :func:`sockshare.server._demo.handle`. It runs its
event loop in a thread so the clients here can be the ordinary blocking ones.

:class:`DemoServer` is imported by ``test_demo_browser.py`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from sockshare.server._demo import MAX_HEAD_BYTES, MAX_WS_MESSAGE_BYTES, handle

TIMEOUT = 10.0
WORKER_ID = 7
GENERATION = 3

PreRead = Callable[[asyncio.AbstractEventLoop, socket.socket], Awaitable[bytes]]


# --------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class FakeWorker:
    id: int
    pid: int
    generation: int


@dataclass
class HarnessConnection:
    """The shape of the worker runtime's ``Connection``, built by hand."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    meta: dict[str, Any]
    handoff_id: int
    worker: FakeWorker
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class DemoServer:
    """Serve :func:`handle` on 127.0.0.1 from a thread; ``with DemoServer() as s: s.port``.

    ``pre_read(loop, sock)`` plays the dispatcher: what it returns is fed into the reader
    before anything the socket delivers later (it may consume bytes from the socket itself,
    or invent bytes the client never sent).
    """

    pre_read: PreRead | None = None
    port: int = 0
    accepted: int = 0
    pre_reads: list[bytes] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _lsock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _main: asyncio.Task[None] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> DemoServer:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        lsock.setblocking(False)
        self._lsock = lsock
        self.port = lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._thread_main, name="demo-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(TIMEOUT):
            raise RuntimeError("demo server thread did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._main is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                self._loop.call_soon_threadsafe(self._main.cancel)
        if self._thread is not None:
            self._thread.join(TIMEOUT)
            assert not self._thread.is_alive(), "demo server thread did not stop"
        if self._lsock is not None:
            self._lsock.close()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _thread_main(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # how __exit__ stops it
            asyncio.run(self._serve())

    async def _serve(self) -> None:
        assert self._lsock is not None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._main = asyncio.current_task()
        self._ready.set()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                sock, addr = await loop.sock_accept(self._lsock)
                self.accepted += 1
                task = loop.create_task(self._one(loop, sock, addr, self.accepted))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: Any, handoff_id: int
    ) -> None:
        sock.setblocking(False)
        try:
            pre = await self.pre_read(loop, sock) if self.pre_read else b""
            self.pre_reads.append(pre)
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            if pre:
                reader.feed_data(pre)  # what the dispatcher read comes first
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except BaseException:
            sock.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        conn = HarnessConnection(
            reader=reader,
            writer=writer,
            meta={"client": addr, "handoff_id": handoff_id},
            handoff_id=handoff_id,
            worker=FakeWorker(id=WORKER_ID, pid=os.getpid(), generation=GENERATION),
        )
        try:
            await handle(conn)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            await conn.close()


async def read_request_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """A dispatcher's sniffer: consume the socket up to the end of the first line."""
    return await _read_until(loop, sock, b"\r\n")


async def read_request_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """A dispatcher's sniffer that reads the whole head (request line and headers)."""
    return await _read_until(loop, sock, b"\r\n\r\n")


async def _read_until(loop: asyncio.AbstractEventLoop, sock: socket.socket, end: bytes) -> bytes:
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while end not in data:
            chunk = await loop.sock_recv(sock, 1)  # byte by byte: never past ``end``
            if not chunk:
                break
            data += chunk
    return data


# --------------------------------------------------------------------------- clients


def raw_exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, then read until the server closes; everything it said."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(payload)
        out = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    raise AssertionError(f"server did not close; got {out[:200]!r}")


class WsClient:
    """A tiny blocking WebSocket client on wsproto, for tests."""

    def __init__(self, port: int, *, path: str = "/ws", early: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []
        # ``early`` goes out in the same write as the upgrade request (before the 101).
        self.sock.sendall(self.ws.send(Request(host=f"127.0.0.1:{port}", target=path)) + early)
        event = self.next_event()
        if isinstance(event, RejectConnection):
            self.close()
            raise AssertionError(f"upgrade rejected with {event.status_code}")
        assert isinstance(event, AcceptConnection), event

    def next_event(self) -> Event:
        deadline = time.monotonic() + TIMEOUT
        while not self.pending:
            self.pending.extend(self.ws.events())
            if self.pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no WebSocket event")
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
        return self.pending.pop(0)

    def send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def ask(self, text: str) -> dict[str, Any]:
        self.send(TextMessage(data=text))
        event = self.next_event()
        assert isinstance(event, TextMessage), event
        assert event.message_finished
        reply: dict[str, Any] = json.loads(event.data)
        return reply

    def read_to_eof(self) -> bytes:
        out = b""
        while chunk := self.sock.recv(65536):
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[DemoServer]:
    with DemoServer() as srv:
        yield srv
    assert srv.errors == []


def _status_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def _headers(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


# --------------------------------------------------------------------------- HTTP


def test_page_and_whoami_share_one_keepalive_connection(server: DemoServer) -> None:
    pid = os.getpid()
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        client.request("GET", "/")
        resp = client.getresponse()
        page = resp.read().decode()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
        assert resp.getheader("Connection") is None  # kept alive
        assert f'<span id="worker-pid">{pid}</span>' in page
        assert re.search(rf"<title>[^<]*\b{pid}\b[^<]*</title>", page)
        assert '<dd id="worker-id">7</dd>' in page
        assert '<dd id="handoff-id">1</dd>' in page
        assert 'id="ws-log"' in page
        assert 'id="move-me"' in page
        assert 'id="migration-slot"' in page
        # self-contained: nothing fetched from anywhere else
        assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", page)
        assert "@import" not in page

        client.request("GET", "/whoami")
        resp = client.getresponse()
        body = resp.read()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/json"
        assert json.loads(body) == {"worker_pid": pid, "worker_id": WORKER_ID, "handoff_id": 1}

        client.request("GET", "/whoami?again=1")
        resp = client.getresponse()
        assert json.loads(resp.read())["handoff_id"] == 1
    finally:
        client.close()
    assert server.accepted == 1  # three requests, one connection


def test_head_not_found_and_wrong_method_keep_the_connection(server: DemoServer) -> None:
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        client.request("HEAD", "/whoami")
        resp = client.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("Content-Length") or 0) > 0
        assert resp.read() == b""

        client.request("GET", "/nope")
        resp = client.getresponse()
        assert resp.status == 404
        assert b"/nope" in resp.read()

        client.request("POST", "/whoami", body=b'{"x": 1}', headers={"Content-Type": "application/json"})
        resp = client.getresponse()
        assert resp.status == 405
        assert resp.getheader("Allow") == "GET, HEAD"
        resp.read()

        client.request("DELETE", "/")
        resp = client.getresponse()
        assert resp.status == 405
        resp.read()

        client.request("GET", "/ws")  # no upgrade
        resp = client.getresponse()
        assert resp.status == 426
        assert resp.getheader("Upgrade") == "websocket"
        resp.read()

        client.request("GET", "/whoami")
        resp = client.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["worker_pid"] == os.getpid()
    finally:
        client.close()
    assert server.accepted == 1


def test_pipelined_requests_in_one_write(server: DemoServer) -> None:
    req = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(server.port, req + req + last)
    assert out.count(b"HTTP/1.1 200 ") == 2
    assert out.count(b"HTTP/1.1 404 ") == 1
    assert out.index(b"HTTP/1.1 404 ") > out.rindex(b"HTTP/1.1 200 ")


def test_connection_close_is_honoured(server: DemoServer) -> None:
    out = raw_exchange(server.port, b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status_line(out) == b"HTTP/1.1 200 "
    assert _headers(out)["connection"] == "close"
    body = out.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["worker_pid"] == os.getpid()

    # HTTP/1.0 without keep-alive closes too
    out = raw_exchange(server.port, b"GET /whoami HTTP/1.0\r\n\r\n")
    assert _status_line(out).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO THERE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ],
    ids=["words", "tls-hello", "bad-header", "bad-length"],
)
def test_garbage_gets_a_clean_400(server: DemoServer, garbage: bytes) -> None:
    out = raw_exchange(server.port, garbage)
    assert _status_line(out) == b"HTTP/1.1 400 "
    assert _headers(out)["connection"] == "close"
    assert out.split(b"\r\n\r\n", 1)[1].startswith(b"400 Bad Request")


def test_unknown_http_version_gets_505(server: DemoServer) -> None:
    out = raw_exchange(server.port, b"GET / HTTP/9.9\r\nHost: x\r\n\r\n")
    assert _status_line(out) == b"HTTP/1.1 505 "
    assert _headers(out)["connection"] == "close"


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "never-ending-head"])
def test_oversized_head_is_refused(server: DemoServer, complete: bool) -> None:
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 100)
    out = raw_exchange(server.port, big + (b"\r\n\r\n" if complete else b""))
    assert _status_line(out) == b"HTTP/1.1 431 "
    assert _headers(out)["connection"] == "close"


def test_request_line_read_by_the_dispatcher_is_parsed_first() -> None:
    """The sniffer consumed the request line from the socket; the handler still sees it."""
    with DemoServer(pre_read=read_request_line) as srv:
        client = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
        try:
            client.request("GET", "/whoami")
            resp = client.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["worker_pid"] == os.getpid()
            client.request("GET", "/whoami")  # the next request comes from the socket only
            resp = client.getresponse()
            assert resp.status == 200
            resp.read()
        finally:
            client.close()
    assert srv.errors == []
    assert srv.pre_reads == [b"GET /whoami HTTP/1.1\r\n"]
    assert srv.accepted == 1


def test_pre_read_bytes_come_before_the_sockets_own() -> None:
    """Bytes the client never sent, fed in first, are the start of the request."""

    async def invent(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
        return b"GET /whoami HTTP/1.1\r\n"

    with DemoServer(pre_read=invent) as srv:
        # The client sends headers only; without the pre-read line this is garbage (400).
        out = raw_exchange(srv.port, b"Host: x\r\nConnection: close\r\n\r\n")
    assert srv.errors == []
    assert _status_line(out) == b"HTTP/1.1 200 "
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["handoff_id"] == 1


def test_large_request_body_is_refused(server: DemoServer) -> None:
    body = b"x" * (200 * 1024)
    head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    out = raw_exchange(server.port, head + body)
    assert _status_line(out) == b"HTTP/1.1 413 "


# --------------------------------------------------------------------------- WebSocket


def test_websocket_echo_counts_and_names_the_worker(server: DemoServer) -> None:
    pid = os.getpid()
    ws = WsClient(server.port)
    try:
        for n, text in enumerate(["hello", "zwei \u00fc\u00f1\u00ee", "x" * 5000], start=1):
            assert ws.ask(text) == {"echo": text, "worker_pid": pid, "worker_id": WORKER_ID, "n": n}

        ws.send(Ping(payload=b"are you there"))
        pong = ws.next_event()
        assert isinstance(pong, Pong)
        assert pong.payload == b"are you there"

        assert ws.ask("after the ping")["n"] == 4

        ws.send(CloseConnection(code=1000, reason="bye"))
        close = ws.next_event()
        assert isinstance(close, CloseConnection)
        assert close.code == 1000
        assert ws.read_to_eof() == b""  # the server then closes TCP
    finally:
        ws.close()
    assert server.accepted == 1


def test_websocket_fragments_are_reassembled(server: DemoServer) -> None:
    ws = WsClient(server.port)
    try:
        ws.send(TextMessage(data="frag", message_finished=False))
        ws.send(TextMessage(data="mented", message_finished=True))
        event = ws.next_event()
        assert isinstance(event, TextMessage)
        assert json.loads(event.data) == {
            "echo": "fragmented",
            "worker_pid": os.getpid(),
            "worker_id": WORKER_ID,
            "n": 1,
        }
    finally:
        ws.close()


def test_websocket_frame_sent_with_the_upgrade_request(server: DemoServer) -> None:
    """A frame in the same segment as the handshake (h11's trailing data) is not lost."""
    early = bytes(FrameProtocol(client=True, extensions=[]).send_data("early bird", fin=True))
    ws = WsClient(server.port, early=early)
    try:
        event = ws.next_event()
        assert isinstance(event, TextMessage)
        assert json.loads(event.data)["echo"] == "early bird"
        assert ws.ask("next")["n"] == 2
    finally:
        ws.close()


def test_websocket_after_the_dispatcher_read_the_whole_head() -> None:
    with DemoServer(pre_read=read_request_head) as srv:
        ws = WsClient(srv.port)
        try:
            assert ws.ask("hi") == {"echo": "hi", "worker_pid": os.getpid(), "worker_id": WORKER_ID, "n": 1}
        finally:
            ws.close()
    assert srv.errors == []
    assert srv.pre_reads[0].startswith(b"GET /ws HTTP/1.1\r\n")
    assert srv.pre_reads[0].endswith(b"\r\n\r\n")


def _closes_with(server: DemoServer, message: BytesMessage | TextMessage, code: int) -> None:
    """``message`` makes the server close with ``code``; our close answer, then EOF."""
    ws = WsClient(server.port)
    try:
        ws.send(message)
        event = ws.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == code
        ws.send(event.response())
        assert ws.read_to_eof() == b""
    finally:
        ws.close()


def test_websocket_binary_message_closes_with_1003(server: DemoServer) -> None:
    _closes_with(server, BytesMessage(data=b"\x00\x01"), 1003)


def test_websocket_message_too_big_closes_with_1009(server: DemoServer) -> None:
    _closes_with(server, TextMessage(data="y" * (MAX_WS_MESSAGE_BYTES + 1)), 1009)


def test_websocket_unmasked_frame_is_a_protocol_error(server: DemoServer) -> None:
    ws = WsClient(server.port)
    try:
        # a server-style (unmasked) frame from a client violates RFC 6455 section 5.1
        ws.sock.sendall(FrameProtocol(client=False, extensions=[]).send_data("bad", fin=True))
        event = ws.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1002
        assert ws.read_to_eof() == b""
    finally:
        ws.close()


def test_websocket_upgrade_with_wrong_version_is_refused(server: DemoServer) -> None:
    req = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n"
    )
    out = raw_exchange(server.port, req + b"Connection: close\r\n\r\n")
    assert _status_line(out) == b"HTTP/1.1 426 "
    assert _headers(out)["sec-websocket-version"] == "13"
