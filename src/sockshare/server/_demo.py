"""The built-in demo app: an HTTP/1.1 page, ``/whoami`` and a WebSocket echo.

``sockshare serve`` runs this handler when no application is named. It exists to *show*
the handoff: every answer says which worker process produced it, so a person (or a test)
can see a connection accepted by the dispatcher being served by a worker, and later see
it moved from one worker to another.

Routes (HTTP/1.1 through :mod:`h11`, keep-alive, bounded head and body sizes):

* ``GET /`` -- a self-contained HTML page (inline CSS and JS, no external resources;
  its template is ``demo_page.html``, package data beside this module) naming the worker
  that served it (``#worker-pid``, also in ``document.title``) with a WebSocket panel
  talking to ``/ws``: every reply lands in ``#ws-log``, the worker serving the WebSocket
  now is ``#ws-worker-pid``, its counter ``#ws-count``, and the "Move me" button
  (``#move-me``) migrates it (a ``li.note.moved`` tells from where);
* ``GET /whoami`` -- ``{"worker_pid": ..., "worker_id": ..., "handoff_id": ...}``;
* ``GET /ws`` with ``Upgrade: websocket`` -- RFC 6455 through :mod:`wsproto`: each text
  message comes back as ``{"echo": msg, "worker_pid": ..., "worker_id": ..., "n": k}``
  where ``k`` counts the messages on this connection; ``{"cmd": "move"}`` is not echoed:
  it migrates the connection; pings are answered, closes are completed;
* anything else: 404 (unknown path), 405 (known path, other method), 400 on garbage,
  431 on an oversized head, 413 on a large body, 505 on HTTP/2+ request lines;
  ``Connection: close`` is honoured.

The handler only touches the :class:`DemoConnection` attributes below, so it runs under
the worker runtime as well as under a test harness that builds the same shape by hand.
Bytes the dispatcher already read sit at the front of ``conn.reader`` and are parsed as
the start of the first request like any other bytes.

Live migration (docs/server.md). :func:`resume` sits beside :func:`handle`, so the worker
runtime finds it and connections can move between workers with their state:

* a WebSocket moves between two messages: when the page's "move me" button sends
  ``{"cmd": "move"}``, or when the dispatcher asks (rebalancing, reload, upgrade,
  ``sockshare migrate``). Its state is the message counter; frames are read *whole*, one
  at a time (header, then exactly the payload), so wsproto never holds half a frame
  that would be lost: every byte not yet parsed is still in the reader (or in our small
  look-ahead, given back as ``unread``) and travels with the socket. The new worker
  starts with ``{"event": "moved", "from_pid", "worker_pid", "worker_id", "n", "moves",
  "reason", "latency_ms"}`` and goes on counting: no message is lost or answered twice;
* an idle keep-alive HTTP connection (between two requests) moves when the dispatcher
  asks, with what h11 has buffered of the next request as ``unread``; a request being
  answered is never interrupted (the connection is not migratable meanwhile).

Under the test harness (no ``migrate``), the button answers ``{"event": "move_failed"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import json
import logging
import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from sockshare.server._handler import MigrationError, MigrationRequested

__all__ = [
    "DemoConnection",
    "DemoWorker",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "MAX_WS_MESSAGE_BYTES",
    "handle",
    "render_page",
    "resume",
]

log = logging.getLogger(__name__)

#: Largest request head (request line plus headers) accepted; past it: 431.
MAX_HEAD_BYTES = 16 * 1024
#: Largest request body read (and thrown away); past it: 413 and close.
MAX_BODY_BYTES = 64 * 1024
#: Largest WebSocket text message echoed; past it: close 1009.
MAX_WS_MESSAGE_BYTES = 64 * 1024
#: A keep-alive connection with no request for this long is closed quietly.
HTTP_IDLE_TIMEOUT = 30.0
#: A WebSocket with no frame for this long is closed with 1001.
WS_IDLE_TIMEOUT = 600.0
#: How long a peer may take to answer our close frame.
WS_CLOSE_TIMEOUT = 5.0
#: Bound on any single write (``drain``) to a peer that does not read.
WRITE_TIMEOUT = 30.0
#: After a final response, how long unread request bytes are drained before closing, so
#: the kernel does not answer them with a RST that would destroy the response in flight.
LINGER_TIMEOUT = 2.0
LINGER_BYTES = 256 * 1024

READ_CHUNK = 64 * 1024
SERVER_NAME = b"sockshare-demo"
WS_VERSION = b"13"
#: The page of ``GET /``: package data beside this module (see :func:`render_page`).
PAGE_RESOURCE = "demo_page.html"


class DemoWorker(Protocol):
    """What the handler reads of ``conn.worker``."""

    @property
    def id(self) -> object: ...

    @property
    def pid(self) -> int: ...

    @property
    def generation(self) -> object: ...


class PageSource(Protocol):
    """What the page (:func:`render_page`) reads of a connection; the ASGI demo
    (``_demo_asgi``) fills it from the scope."""

    @property
    def meta(self) -> Mapping[str, Any]: ...

    @property
    def handoff_id(self) -> Any: ...

    @property
    def worker(self) -> DemoWorker: ...


class DemoConnection(Protocol):
    """What the handler reads of the connection the worker runtime hands it."""

    @property
    def reader(self) -> asyncio.StreamReader: ...

    @property
    def writer(self) -> asyncio.StreamWriter: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...

    @property
    def handoff_id(self) -> int: ...

    @property
    def worker(self) -> DemoWorker: ...

    async def close(self) -> None: ...


async def handle(conn: DemoConnection) -> None:
    """Serve one connection: HTTP/1.1 requests until close, or a WebSocket after upgrade."""
    try:
        await _HttpSession(conn).run()
    except (ConnectionError, TimeoutError):
        pass  # the peer went away or stopped reading: nothing left to tell it
    finally:
        await conn.close()


async def resume(conn: DemoConnection, state: Any) -> None:
    """Continue a connection another worker migrated here (``state`` from :func:`handle`)."""
    try:
        if isinstance(state, dict) and state.get("kind") == "ws":
            await _WebSocketSession(conn, state).resumed()
        else:
            await _HttpSession(conn).run()
    except (ConnectionError, TimeoutError):
        pass
    finally:
        await conn.close()


def _can_migrate(conn: DemoConnection) -> bool:
    """A worker-runtime connection whose app has a resume handler (not the test harness)."""
    return bool(getattr(conn, "migratable", False)) and hasattr(conn, "interruptible")


async def _migrate(conn: DemoConnection, state: dict[str, Any], unread: bytes,
                   reason: str = "") -> str:
    """Move the connection; '' when it moved, else why not (it is still ours)."""
    migrate = getattr(conn, "migrate", None)
    if migrate is None:
        return "this server cannot move connections"
    try:
        await migrate(state, unread=unread, reason=reason)
    except MigrationError as exc:
        event = getattr(conn, "migration_requested", None)
        if event is not None:
            event.clear()
        return str(exc)
    return ""


# --------------------------------------------------------------------------- HTTP


def _served_by(conn: PageSource) -> dict[str, Any]:
    return {
        "worker_pid": conn.worker.pid,
        "worker_id": _jsonable(conn.worker.id),
        "handoff_id": conn.handoff_id,
    }


def _jsonable(value: object) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """All values of header ``name`` (h11 lower-cases names), comma lists split."""
    out: list[bytes] = []
    for key, value in headers:
        if key == name:
            out.extend(part.strip() for part in value.split(b",") if part.strip())
    return out


def _has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    return any(v.lower() == token for v in _header(headers, name))


def _head_size(request: h11.Request) -> int:
    """About the wire size of a parsed request head."""
    size = len(request.method) + len(request.target) + 12
    return size + sum(len(name) + len(value) + 4 for name, value in request.headers)


def _request_path(target: bytes) -> str:
    text = target.decode("ascii", "replace")
    if text == "*":
        return text
    return urlsplit(text).path or "/"


class _HttpSession:
    """One TCP connection's HTTP/1.1 conversation."""

    def __init__(self, conn: DemoConnection) -> None:
        self.conn = conn
        self.reader = conn.reader
        self.writer = conn.writer
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    # -- I/O

    async def _next_event(self, timeout: float, *, idle: bool = False) -> Any:
        """The next h11 event (or ``h11.PAUSED``), reading as needed; ``TimeoutError``.

        ``idle``: waiting for the next request, when a migration request may interrupt
        the read (:class:`MigrationRequested`)."""
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout):
                if (idle and self.http.their_state is h11.IDLE and self.http.our_state is h11.IDLE
                        and _can_migrate(self.conn)):
                    data = await self.conn.interruptible(  # type: ignore[attr-defined]
                        self.reader.read(READ_CHUNK))
                else:
                    data = await self.reader.read(READ_CHUNK)
            self.http.receive_data(data)  # b"" is end of stream

    async def _write(self, *events: Any) -> None:
        data = b"".join(self.http.send(e) or b"" for e in events)
        self.writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()

    async def _respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        *,
        head: bool = False,
        extra: Iterable[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"date", formatdate(usegmt=True).encode()),
            (b"server", SERVER_NAME),
            *extra,
        ]
        if close:
            headers.append((b"connection", b"close"))
        events: list[Any] = [h11.Response(status_code=status, headers=headers)]
        if body and not head:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self._write(*events)

    async def _error(
        self,
        status: int,
        detail: str,
        *,
        head: bool = False,
        extra: Iterable[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        """A small text/plain error response, when h11 still lets us send one."""
        if self.http.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
            return
        reason = _REASONS.get(status, "Error")
        body = f"{status} {reason}\n{detail}\n".encode()
        with contextlib.suppress(h11.LocalProtocolError):
            await self._respond(
                status, body, b"text/plain; charset=utf-8", head=head, extra=extra, close=close
            )

    async def _linger(self) -> None:
        """Half-close, then drain what the client still sends, so our reply is not reset."""
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        left = LINGER_BYTES
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                while left > 0:
                    chunk = await self.reader.read(min(left, READ_CHUNK))
                    if not chunk:
                        break
                    left -= len(chunk)

    # -- the request loop

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_event(HTTP_IDLE_TIMEOUT, idle=True)
            except MigrationRequested:
                unread, closed = self.http.trailing_data
                if not closed and not await _migrate(self.conn, {"kind": "http"}, unread):
                    return
                continue
            except h11.RemoteProtocolError as exc:
                await self._error(exc.error_status_hint, "malformed request", close=True)
                await self._linger()
                return
            except TimeoutError:
                if self.http.their_state is not h11.IDLE or self.http.trailing_data[0]:
                    await self._error(408, "request not received in time", close=True)
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees it
                return
            keep_going = await self._serve(event)
            if not keep_going:
                return
            if self.http.our_state is h11.MUST_CLOSE or self.http.their_state is not h11.DONE:
                await self._linger()
                return
            try:
                self.http.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_body(self) -> bool:
        """Read (and drop) the request body; False if too large or cut short."""
        size = 0
        while True:
            event = await self._next_event(HTTP_IDLE_TIMEOUT)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    await self._error(413, f"request body over {MAX_BODY_BYTES} bytes", close=True)
                    await self._linger()
                    return False
            else:  # EndOfMessage (h11 reports a body cut short as RemoteProtocolError)
                return isinstance(event, h11.EndOfMessage)

    async def _serve(self, request: h11.Request) -> bool:
        """Answer one request; False when the connection must end now."""
        if _head_size(request) > MAX_HEAD_BYTES:
            # h11 bounds only an *incomplete* head; one that arrived whole in a read is
            # measured here.
            await self._error(431, f"request head over {MAX_HEAD_BYTES} bytes", close=True)
            await self._linger()
            return False
        try:
            if not await self._read_body():
                return False
        except h11.RemoteProtocolError as exc:
            await self._error(exc.error_status_hint, "malformed request body", close=True)
            await self._linger()
            return False

        method = request.method.upper()
        head = method == b"HEAD"
        if request.http_version not in {b"1.0", b"1.1"}:
            await self._error(505, "HTTP/1.0 and HTTP/1.1 only", head=head, close=True)
            return False
        path = _request_path(request.target)
        try:
            if path == "/ws":
                return await self._serve_ws(request, method)
            if path not in _PAGES:
                await self._error(404, f"no such page: {path}", head=head)
            elif method not in {b"GET", b"HEAD"}:
                await self._error(405, "use GET", head=head, extra=[(b"allow", b"GET, HEAD")])
            elif path == "/":
                page = render_page(self.conn).encode()
                await self._respond(200, page, b"text/html; charset=utf-8", head=head)
            else:
                body = json.dumps(_served_by(self.conn)).encode() + b"\n"
                await self._respond(200, body, b"application/json", head=head)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:
            log.exception("demo: request %s %s failed", method.decode(), path)
            await self._error(500, "internal error", close=True)
            return False
        return True

    async def _serve_ws(self, request: h11.Request, method: bytes) -> bool:
        headers = request.headers
        upgrade = _has_token(headers, b"upgrade", b"websocket") and _has_token(
            headers, b"connection", b"upgrade"
        )
        if not upgrade:
            await self._error(
                426,
                "this is a WebSocket endpoint: connect with Upgrade: websocket",
                head=method == b"HEAD",
                extra=[(b"upgrade", b"websocket")],
            )
            return True
        if method != b"GET":
            await self._error(405, "a WebSocket upgrade is a GET", extra=[(b"allow", b"GET")])
            return True
        if WS_VERSION not in _header(headers, b"sec-websocket-version"):
            await self._error(
                426, "only WebSocket version 13", extra=[(b"sec-websocket-version", WS_VERSION)]
            )
            return True
        keys = _header(headers, b"sec-websocket-key")
        if len(keys) != 1:
            await self._error(400, "exactly one Sec-WebSocket-Key is required")
            return True
        switch = h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", generate_accept_token(keys[0])),
                (b"server", SERVER_NAME),
            ],
        )
        try:
            await self._write(switch)
        except h11.LocalProtocolError:  # pragma: no cover - h11 saw no upgrade request
            await self._error(400, "upgrade not possible here", close=True)
            return False
        trailing, closed = self.http.trailing_data
        await _WebSocketSession(self.conn).run(trailing, closed)
        return False


_PAGES = {"/", "/whoami"}

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
    500: "Internal Server Error",
}


# --------------------------------------------------------------------------- WebSocket


class _WebSocketSession:
    """The echo service on an upgraded connection; it can move to another worker."""

    def __init__(self, conn: DemoConnection, state: Mapping[str, Any] | None = None) -> None:
        self.conn = conn
        self.reader = conn.reader
        self.writer = conn.writer
        state = state or {}
        self.count = int(state.get("n", 0))
        self.moves = int(state.get("moves", 0))
        #: bytes read past the upgrade request (h11's trailing data): parsed first
        self.pending = bytearray()
        self.move_asked = False

    async def _send(self, ws: WSConnection, event: Any) -> None:
        self.writer.write(ws.send(event))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()

    async def _close(self, ws: WSConnection, code: int, reason: str) -> None:
        if ws.state is ConnectionState.OPEN:
            await self._send(ws, CloseConnection(code=code, reason=reason))

    # -- reading whole frames

    async def _exactly(self, n: int, *, interruptible: bool = False) -> bytes:
        if len(self.pending) >= n:
            out = bytes(self.pending[:n])
            del self.pending[:n]
            return out
        want = n - len(self.pending)
        if interruptible and not self.pending:
            data: bytes = await self.conn.interruptible(  # type: ignore[attr-defined]
                self.reader.readexactly(want))
        else:
            data = await self.reader.readexactly(want)
        out = bytes(self.pending) + data
        self.pending.clear()
        return out

    async def _frame(self, *, interruptible: bool) -> tuple[bytes, int]:
        """``(frame bytes, 0)`` for one whole frame; ``(header, n)`` for a frame whose
        payload (n bytes with the mask) is over the limit and must be skipped."""
        head = await self._exactly(2, interruptible=interruptible)
        length, masked = head[1] & 0x7F, head[1] & 0x80
        ext = b""
        if length == 126:
            ext = await self._exactly(2)
            length = int.from_bytes(ext, "big")
        elif length == 127:
            ext = await self._exactly(8)
            length = int.from_bytes(ext, "big")
        rest = length + (4 if masked else 0)
        if length > MAX_WS_MESSAGE_BYTES:
            return head + ext, rest
        return head + ext + await self._exactly(rest), 0

    async def _skip(self, n: int) -> None:
        while n > 0:
            chunk = await self._exactly(min(n, READ_CHUNK))
            n -= len(chunk)

    # -- the session

    async def resumed(self) -> None:
        """First words on the new worker, then the same echo service."""
        mig = self.conn.meta.get("migration") or {}
        started = mig.get("started") if isinstance(mig, Mapping) else None
        latency = (time.monotonic() - started) * 1000 if isinstance(started, float) else None
        ws = WSConnection(ConnectionType.SERVER)
        await self._send(ws, TextMessage(data=json.dumps({
            "event": "moved",
            "from_pid": mig.get("from_pid") if isinstance(mig, Mapping) else None,
            "worker_pid": self.conn.worker.pid,
            "worker_id": _jsonable(self.conn.worker.id),
            "n": self.count,
            "moves": self.moves,
            "reason": mig.get("reason") if isinstance(mig, Mapping) else None,
            "latency_ms": None if latency is None else round(latency, 3),
        })))
        await self._loop(ws)

    async def run(self, trailing: bytes, closed: bool) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        self.pending += trailing
        if closed and not trailing:
            ws.receive_data(None)
        await self._loop(ws)

    async def _loop(self, ws: WSConnection) -> None:
        parts: list[str] = []
        size = 0
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage):
                    if ws.state is not ConnectionState.OPEN:
                        continue  # we are closing: late messages are dropped
                    parts.append(event.data)
                    size += len(event.data)
                    if size > MAX_WS_MESSAGE_BYTES:
                        parts.clear()
                        await self._close(ws, CloseReason.MESSAGE_TOO_BIG, "message too big")
                    elif event.message_finished:
                        message = "".join(parts)
                        parts.clear()
                        size = 0
                        await self._message(ws, message)
                elif isinstance(event, BytesMessage):
                    await self._close(ws, CloseReason.UNSUPPORTED_DATA, "text messages only")
                elif isinstance(event, Ping):
                    if ws.state is ConnectionState.OPEN:
                        await self._send(ws, event.response())
                elif isinstance(event, Pong):
                    pass
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._send(ws, event.response())  # completes the handshake
                    elif ws.state is ConnectionState.OPEN:
                        # wsproto reports a protocol violation as a close event while still
                        # OPEN: say why, and drop the connection without waiting.
                        await self._close(ws, event.code, event.reason or "")
                    return
            if ws.state is ConnectionState.CLOSED:
                return
            between = ws.state is ConnectionState.OPEN and not parts
            if between and self.move_asked:
                self.move_asked = False
                if await self._move(ws, "button"):
                    return
            closing = ws.state is ConnectionState.LOCAL_CLOSING
            try:
                async with asyncio.timeout(WS_CLOSE_TIMEOUT if closing else WS_IDLE_TIMEOUT):
                    frame, skip = await self._frame(interruptible=between and _can_migrate(self.conn))
                    if skip:
                        await self._close(ws, CloseReason.MESSAGE_TOO_BIG, "message too big")
                        await self._skip(skip)
                        continue
            except MigrationRequested:
                if await self._move(ws, ""):
                    return
                continue
            except TimeoutError:
                if closing:
                    return
                await self._close(ws, CloseReason.GOING_AWAY, "idle")
                continue
            except asyncio.IncompleteReadError:
                ws.receive_data(None)   # the peer closed mid-frame
                continue
            ws.receive_data(frame)

    async def _move(self, ws: WSConnection, why: str) -> bool:
        """Migrate between two messages; True if the connection is gone to another worker."""
        state = {"kind": "ws", "n": self.count, "moves": self.moves + 1}
        failure = await _migrate(self.conn, state, bytes(self.pending), why)
        if not failure:
            return True
        if why == "button":
            await self._send(ws, TextMessage(data=json.dumps({
                "event": "move_failed", "reason": failure, "worker_pid": self.conn.worker.pid,
                "n": self.count})))
        return False

    async def _message(self, ws: WSConnection, message: str) -> None:
        if message.startswith("{") and message.endswith("}"):
            with contextlib.suppress(ValueError):
                if json.loads(message) == {"cmd": "move"}:
                    self.move_asked = True   # once this frame's events are done
                    return
        await self._echo(ws, message)

    async def _echo(self, ws: WSConnection, message: str) -> None:
        self.count += 1
        reply = {
            "echo": message,
            "worker_pid": self.conn.worker.pid,
            "worker_id": _jsonable(self.conn.worker.id),
            "n": self.count,
        }
        await self._send(ws, TextMessage(data=json.dumps(reply)))


# --------------------------------------------------------------------------- the page


def _script_json(value: object) -> str:
    """JSON safe to put inside ``<script>``: no ``</script>`` or ``<!--`` can appear."""
    return (
        json.dumps(value)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_page(conn: PageSource) -> str:
    """The HTML of ``GET /`` for this connection."""
    info = _served_by(conn)
    info["worker_generation"] = _jsonable(conn.worker.generation)
    client = conn.meta.get("client")
    if isinstance(client, (tuple, list)) and len(client) >= 2:
        client_text = f"{client[0]}:{client[1]}"
    else:
        client_text = "" if client is None else str(client)
    e = html.escape
    return _page_template().format(
        pid=e(str(info["worker_pid"])),
        worker_id=e(str(info["worker_id"])),
        generation=e(str(info["worker_generation"])),
        handoff_id=e(str(info["handoff_id"])),
        client=e(client_text or "unknown"),
        served_json=_script_json(info),
    )


@functools.cache
def _page_template() -> str:
    """``demo_page.html``, package data beside this module, read once. It is a
    :meth:`str.format` template: ``{pid}``, ``{worker_id}``, ``{generation}``,
    ``{handoff_id}``, ``{client}`` and ``{served_json}`` are filled in, and the literal
    braces of its CSS and JS are doubled."""
    return resources.files(__package__).joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")
