"""Web apps under ``sockshare serve``: ASGI 3 and WSGI, on uvicorn's protocol classes.

A worker whose pool runs an ASGI or WSGI app (``--interface``, told apart by
:func:`detect_interface` when ``auto``) serves each connection the dispatcher hands it
with the HTTP/1.1 and WebSocket protocol classes of uvicorn (httptools or h11;
websockets or wsproto), the same code that ``uvicorn`` itself runs per connection. What
sockshare adds around them, in :class:`WebServer`:

* **Connections it did not accept.** Each handoff's socket gets a transport with an
  instance of a subclass of uvicorn's protocol class (:func:`_subclass`); its
  ``connection_made`` feeds the bytes the dispatcher already read (to sniff a Host) to
  the parser first, byte-exact, and sets ``scope["client"]`` to the PROXY header's
  source when the dispatcher read one. Every scope gets
  ``scope["extensions"]["sockshare"]``: the handoff's metadata (docs/server.md).
* **Connections it accepts itself** (``accept = "worker"``, :meth:`WebServer.listen`): on
  duplicates of the pool's listening sockets, inherited from the dispatcher; each one
  registered as a handoff would be (minimal meta), counted in (:class:`Tally`), and the
  listeners closed while the worker is at its limit or its descriptor mark, and for
  good when it drains (docs/server.md, "Accept modes").
* **The ACCEPT first.** The runtime answers the handoff before the transport exists, so
  no byte reaches the client from a worker whose ACCEPT could still be lost.
* **TLS in the worker** (``--ssl-certfile``...): after the ACCEPT, the handshake runs on
  the socket (the dispatcher routed by SNI with ``MSG_PEEK``, so the ClientHello is still
  in the kernel).
* **Lifespan** (ASGI): startup before the worker says hello; a failure is returned, with
  the app's traceback, for the runtime to report as fatal; shutdown after the drain.
* **Limits**: a request head over :attr:`WebSettings.limit_header_size` gets 431 (from any
  HTTP/1 implementation); ``--limit-concurrency N`` serves N connections at once and
  answers a request on one more with uvicorn's 503 (uvicorn itself counts the connection
  asking: its ``--limit-concurrency 1`` refuses every request).
* **An access log** in gunicorn's format (:class:`AccessLog`), and request counting for
  ``--max-requests`` (:attr:`WebServer.requests`; the runtime asks to be recycled).
* **Drain**: idle keep-alive connections closed, requests in progress finished (uvicorn's
  ``shutdown()`` per connection), WebSockets closed with 1012, within the grace period.

WSGI apps run in a thread pool of ``--threads`` threads (a2wsgi's ``WSGIMiddleware``), so
a slow request never blocks the worker's event loop.

The web packages are optional: ``pip install 'sockshare[asgi]'`` (uvicorn with httptools,
websockets, uvloop) and ``'sockshare[wsgi]'`` (also a2wsgi). Without them a web app fails
to load with a message that says what to install.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import inspect
import io
import json
import logging
import os
import random
import socket
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from sockshare._errors import SockshareError
from sockshare.server._handler import MIGRATION_WINDOW, MigrationRefused, MoveWindow, set_nodelay
from sockshare.server._platform import dup_fd

__all__ = [
    "INTERFACES",
    "AccessLog",
    "WebAppError",
    "WebServer",
    "WebSettings",
    "check_interface",
    "detect_interface",
]

log = logging.getLogger("sockshare.web")
access_log = logging.getLogger("sockshare.access")

#: ``--interface`` values.
INTERFACES = ("auto", "asgi", "wsgi", "handler")
#: gunicorn's default access log format (the NCSA "combined" log format).
DEFAULT_ACCESS_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class WebAppError(SockshareError):
    """A web app cannot be served: a missing package, an app of no known interface, a
    TLS file that cannot be read, a lifespan startup that failed."""


@dataclass(frozen=True, slots=True)
class WebSettings:
    """How a pool's workers serve a web app: ``--interface``, TLS and the HTTP settings
    (the names and defaults are uvicorn's and gunicorn's). Sent to the worker as JSON."""

    interface: str = "auto"
    #: WSGI: threads that run requests
    threads: int = 10
    #: uvicorn's HTTP implementation: auto (httptools if installed), h11, httptools
    http: str = "auto"
    #: WebSockets: auto, websockets, websockets-sansio, wsproto, none
    ws: str = "auto"
    #: the worker's event loop: auto (uvloop if installed), asyncio, uvloop
    loop: str = "auto"
    #: ASGI lifespan: auto, on, off
    lifespan: str = "auto"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None
    #: 0 none, 1 optional, 2 required (ssl.CERT_*)
    ssl_cert_reqs: int = 0
    access_log: bool = False
    access_log_format: str | None = None
    #: replace the worker after this many requests (0: never), plus up to jitter more
    max_requests: int = 0
    max_requests_jitter: int = 0
    #: per worker: connections (or requests in progress) served at once; a request on one
    #: more gets 503
    limit_concurrency: int | None = None
    root_path: str = ""
    #: trust X-Forwarded-For / -Proto from --forwarded-allow-ips
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    #: seconds an idle keep-alive connection is kept
    timeout_keep_alive: int = 5
    #: bytes of a request head (request line and headers) before 431
    limit_header_size: int = 64 * 1024
    #: largest WebSocket message
    ws_max_size: int = 16 * 1024 * 1024
    #: seconds between the server's keep-alive pings on a WebSocket (uvicorn's 20; 0: none)
    ws_ping_interval: float = 20.0
    #: seconds a ping waits for its pong before the WebSocket is closed (1011; 0: forever)
    ws_ping_timeout: float = 20.0

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WebSettings:
        raw = json.loads(text) if text else {}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def check(self, where: str) -> None:
        """Raise :class:`WebAppError` naming ``where`` for a value out of range."""
        if self.interface not in INTERFACES:
            raise WebAppError(f"{where}: interface must be one of {', '.join(INTERFACES)}, "
                              f"not {self.interface!r}")
        if self.threads < 1:
            raise WebAppError(f"{where}: threads must be at least 1")
        if self.loop not in ("auto", "asyncio", "uvloop"):
            raise WebAppError(f"{where}: loop must be auto, asyncio or uvloop")
        if self.lifespan not in ("auto", "on", "off"):
            raise WebAppError(f"{where}: lifespan must be auto, on or off")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise WebAppError(f"{where}: ssl_keyfile needs ssl_certfile")
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise WebAppError(f"{where}: ssl_cert_reqs must be 0, 1 or 2")
        if self.max_requests < 0 or self.max_requests_jitter < 0:
            raise WebAppError(f"{where}: max_requests and its jitter must not be negative")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise WebAppError(f"{where}: limit_concurrency must be at least 1")
        if self.limit_header_size < 1024:
            raise WebAppError(f"{where}: limit_header_size must be at least 1024")
        for name in ("ws_ping_interval", "ws_ping_timeout"):
            value = getattr(self, name)
            if not 0 <= value < 1e9:   # (NaN fails too)
                raise WebAppError(f"{where}: {name} must be 0 (off) or a positive number of "
                                  f"seconds, not {value!r}")


def _positional(func: Callable[..., Any]) -> int | None:
    """How many positional parameters ``func`` takes (None: *args, or unknown)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def detect_interface(app: Any) -> str:
    """``handler``, ``asgi`` or ``wsgi``, the way uvicorn tells ASGI 3 from the rest: a
    coroutine function (or an object whose ``__call__`` is one) of one argument is a
    sockshare handler, of three an ASGI 3 app; a plain callable of two arguments
    (``environ, start_response``) is a WSGI app."""
    if not callable(app):
        raise WebAppError(f"{app!r} is not callable")
    if inspect.isclass(app):
        raise WebAppError(f"{app.__name__} is a class: give an instance (ASGI 2 apps are not "
                          "supported; wrap them or use ASGI 3)")
    n = _positional(app)   # (signature() drops a bound self, follows partials)
    call = type(app).__call__ if callable(app) else None
    is_async = (inspect.iscoroutinefunction(app)
                or inspect.iscoroutinefunction(getattr(app, "__wrapped__", None))
                or (not inspect.isroutine(app) and not isinstance(app, functools.partial)
                    and inspect.iscoroutinefunction(call)))
    if is_async and n == 3:
        return "asgi"
    if is_async and n == 1:
        return "handler"
    if not is_async and n == 2:
        return "wsgi"
    if not is_async and n == 1:
        return "handler"   # a plain function that returns an awaitable
    raise WebAppError(
        f"cannot tell what kind of app {app!r} is ({'async, ' if is_async else ''}"
        f"{'?' if n is None else n} positional argument(s)): give --interface asgi, wsgi or "
        "handler")


#: how each explicit ``--interface`` calls the app
_CALLS = {"asgi": ("app(scope, receive, send)", 3), "wsgi": ("app(environ, start_response)", 2),
          "handler": ("app(conn)", 1)}


def check_interface(app: Any, interface: str) -> None:
    """An explicit ``--interface`` that cannot call ``app`` (its signature does not take
    that many positional arguments): raise :class:`WebAppError` saying what the app looks
    like, at load time, rather than a TypeError on every request. An app whose signature
    cannot be read is taken at its word."""
    if interface not in _CALLS:
        return
    call, n = _CALLS[interface]
    try:
        sig = inspect.signature(app)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*range(n))
    except TypeError as exc:
        try:
            looks: str | None = detect_interface(app)
        except WebAppError:
            looks = None
        what = {"asgi": "an ASGI app", "wsgi": "a WSGI app", "handler": "a handler"}
        hint = (f"it looks like {what[looks]}: give --interface {looks} or auto" if looks
                else "give --interface auto to have it detected")
        raise WebAppError(f"--interface {interface}: the app cannot be called as {call} "
                          f"({exc}); {hint}") from None


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise WebAppError(f"serving a web app needs {module.partition('.')[0]}: pip install "
                          f"'sockshare[{extra}]' ({exc})") from None


# -- the access log --------------------------------------------------------------------


class AccessLog:
    """ASGI middleware: one line per HTTP request on the ``sockshare.access`` logger, in a
    gunicorn-style format (``%(h)s`` remote address, ``%(l)s`` '-', ``%(u)s`` user,
    ``%(t)s`` time, ``%(r)s`` request line, ``%(m)s`` method, ``%(U)s`` path, ``%(q)s``
    query, ``%(H)s`` protocol, ``%(s)s`` status, ``%(b)s`` body bytes, ``%(f)s`` referer,
    ``%(a)s`` user agent, ``%(T)s`` seconds, ``%(M)s`` milliseconds, ``%(D)s``
    microseconds, ``%(L)s`` decimal seconds, ``%(p)s`` worker pid)."""

    def __init__(self, app: ASGIApp, fmt: str | None = None) -> None:
        self.app = app
        self.fmt = fmt or DEFAULT_ACCESS_FORMAT
        self.pid = str(os.getpid())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        size = 0

        async def logged_send(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(self.fmt, self.atoms(scope, status, size,
                                                     time.perf_counter() - started))

    def atoms(self, scope: Scope, status: int, size: int, took: float) -> dict[str, str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope.get("raw_path") or scope.get("path", "").encode()
        target = path.decode("latin-1") + (f"?{query}" if query else "")
        proto = f"HTTP/{scope.get('http_version', '1.1')}"
        method = scope.get("method", "-")
        return {
            "h": client[0] if client else "-", "l": "-", "u": "-",
            "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
            "r": f"{method} {target} {proto}", "m": method, "U": scope.get("path", ""),
            "q": query, "H": proto, "s": str(status), "b": str(size) if size else "-",
            "B": str(size), "f": headers.get("referer", "-"), "a": headers.get("user-agent", "-"),
            "T": str(int(took)), "M": str(int(took * 1000)), "D": str(int(took * 1e6)),
            "L": f"{took:.6f}", "p": self.pid,
        }


# -- per-connection state ----------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Conn:
    """What the protocol instances of one connection need from the handoff."""

    meta: dict[str, Any]
    client: tuple[str, int] | None
    app: ASGIApp
    pre: bytes
    done: bool = False
    #: a connection moved here from another worker: its handoff meta ``"resume"``
    resume: dict[str, Any] | None = None
    #: its descriptor number: its key in ``WebServer._conns``
    fd: int = -1


def _fd_of(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1


def _head_end(tail: bytes, data: bytes) -> int:
    """Offset in ``data`` just past the first blank line, or -1; ``tail`` is the last
    bytes (at most 3) of the head read before ``data``: the blank line may straddle two
    reads."""
    if tail:
        i = (tail + data[:3]).find(b"\r\n\r\n")
        if i >= 0:
            return i + 4 - len(tail)
    i = data.find(b"\r\n\r\n")
    return -1 if i < 0 else i + 4


def _subclass(base: type[asyncio.Protocol], web: WebServer, http: bool) -> type[asyncio.Protocol]:
    """uvicorn's protocol class ``base``, with the per-connection set-up of a handed-off
    socket (:class:`_Conn`), the request-head limit (HTTP) and the closed report."""

    h11: Any = None
    if http and base.__module__.endswith("h11_impl"):
        h11 = __import__("h11")
    #: httptools: the scope gets its extension in on_headers_complete and the app is
    #: called directly (no wrapper coroutine per request, ``_conn_app``)
    direct = http and h11 is None

    limit = web.settings.limit_header_size
    #: uvicorn's own, what runs when no handover hook is installed
    plain: Callable[[Any], None] = getattr(base, "on_response_complete", lambda _self: None)

    class Handed(base):  # type: ignore[valid-type,misc]
        _ss_conn: _Conn | None = None
        #: accepted by this worker through ``create_server`` (uvloop): its listener
        _ss_listener: Listening | None = None
        _ss_head = 0          # bytes of the request head read so far (HTTP)
        _ss_in_head = True
        _ss_tail = b""        # its last 3 bytes
        #: asked to move once its response in progress is complete (``sockshare migrate``
        #: of every connection: :meth:`WebServer.request_handover`)
        _ss_move_reason = ""

        if h11 is not None or (http and web.settings.limit_concurrency is not None):
            # (only then: one Python call less per connection otherwise)
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                if h11 is not None:
                    self._ss_watch()
                if http and web.settings.limit_concurrency is not None:
                    # uvicorn counts the connection asking among the open ones (with 1,
                    # every request would get 503): N serves N connections at once, the
                    # next gets 503
                    self.limit_concurrency = web.settings.limit_concurrency + 1

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            lst = self._ss_listener
            if lst is not None:
                # accepted by uvloop's server (the class of its listener, the factory
                # uvloop calls: :meth:`WebServer._serve`): registered now, by its
                # transport (its descriptor would take a socket object to learn; the
                # WebSocket protocol that an upgrade makes finds it by its transport
                # too). What :meth:`WebServer._accepted` does, inline: per connection.
                super().connection_made(transport)
                key = id(transport)
                conns = web._conns
                made = self._ss_conn = conns[key] = _Conn(lst.meta, None, lst.app, b"", False,
                                                          None, key)
                if len(conns) == 1:
                    web._idle.clear()
                elif len(conns) >= web.accept_limit and "limit" not in web._accept_holds:
                    # not from inside uvloop's accept callback: closing its server there
                    # aborts the connection being accepted. (So a worker may take the rest
                    # of one accept burst past its limit: the connections that came
                    # together.)
                    asyncio.get_running_loop().call_soon(web._full)
                tally = web.tally
                tally.opened += 1
                if not tally.due:
                    web.on_tally()
                self.app = web.direct_app if direct else made.app
                # (a client that never sends: closed after --timeout-keep-alive, as below)
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)
                return
            c = web._conns.get(id(transport)) or web._conns.get(_fd_of(transport))
            super().connection_made(transport)
            if c is None:
                return
            self._ss_conn = c
            if c.client is not None:
                self.client = c.client
            self.app = web.direct_app if direct else c.app
            if c.pre:
                pre, c.pre = c.pre, b""
                self.data_received(pre)
            elif http:
                # nothing read yet: a new connection whose client never sends, or a
                # keep-alive one moved here between two requests, is kept
                # --timeout-keep-alive seconds (uvicorn starts the timer only when a
                # response completes: it kept such a connection for ever). Its first
                # bytes stop the timer (uvicorn's data_received).
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

        if http:
            # The head's bytes are counted as they arrive, from the end of a request
            # (its body read, as the parser says) to the blank line that ends the next
            # head. Not from the end of the response: a client that has read all of it
            # may already be sending the next request's body.
            def data_received(self, data: bytes) -> None:
                c = self._ss_conn
                if self._ss_in_head:
                    # the common case inline (a whole head in one read, none begun
                    # before): one find, no call
                    end = -1 if self._ss_tail else data.find(b"\r\n\r\n")
                    if 0 <= end <= limit - 4:
                        self._ss_in_head = False
                        if direct and c is not None and end + 4 == len(data):
                            # httptools, one head and nothing after it: this read makes
                            # one request's scope, which gets its extension here, before
                            # its task first runs (the next turn of the loop: uvicorn
                            # creates it in on_headers_complete, and this worker's loop
                            # runs no task eagerly) -- no call per request
                            super().data_received(data)
                            scope = self.scope
                            if scope is not None and "extensions" not in scope:
                                scope["extensions"] = {"sockshare": c.meta}
                            return
                    elif self._ss_count(data):
                        web._too_large(self)
                        return
                if not direct:
                    super().data_received(data)
                    return
                # anything else (a body, pipelined requests, a head over several reads):
                # requests begun here call the app through the wrapper that puts the
                # extension in their scope
                before = self.cycle
                if c is not None:
                    self.app = c.app
                try:
                    super().data_received(data)
                finally:
                    if c is not None:
                        self.app = web.direct_app
                cycle = self.cycle
                if (cycle is not before and cycle is not None and cycle.more_body
                        and cycle.scope is self.scope):
                    # this read ended a head (after a pipelined request, say) whose body
                    # is still to come: the bytes that follow are its body, not a head.
                    # (A cycle made in this read has no response yet, so uvicorn's
                    # on_message_complete did set more_body if the message ended.)
                    self._ss_in_head = False

            def _ss_count(self, data: bytes) -> bool:
                """Count the head bytes in ``data``; True: past the limit."""
                end = _head_end(self._ss_tail, data)
                self._ss_head += len(data) if end < 0 else end
                if end >= 0:
                    self._ss_in_head = False
                    self._ss_tail = b""
                else:
                    self._ss_tail = (self._ss_tail + data[-3:])[-3:]
                return self._ss_head > web.settings.limit_header_size

            def _ss_request_read(self) -> None:
                self._ss_in_head = True
                self._ss_head = 0
                self._ss_tail = b""

            def _ss_on_response_handover(self) -> None:
                """``on_response_complete`` while a handover is under way (installed on
                the class, and on the requests in progress, by
                :attr:`WebServer.handover_reason`; on one connection, by
                :meth:`WebServer.request_handover` of every connection: no call per
                response otherwise)."""
                plain(self)
                reason = web.handover_reason or self._ss_move_reason
                # between two requests now: the connection moves. Its reading paused
                # here and now, not at the next turn of the loop: that turn's poll could
                # read a quick client's next request here, which would then be served
                # here (the move put off to its response) instead of moving with the
                # connection
                if (reason and self._ss_conn is not None and web._handover_if_idle(self, reason)
                        and self._ss_move_reason):
                    # (asked of this connection once: its move is under way)
                    self._ss_move_reason = ""
                    self.__dict__.pop("on_response_complete", None)

            if h11 is None:   # httptools: its callbacks, in the order of the bytes
                # (the end of a head: data_received saw its blank line; its scope's
                # extension: data_received too, after the parser)
                def on_message_complete(self) -> None:
                    super().on_message_complete()
                    self._ss_in_head = True   # (_ss_request_read, inline: per request)
                    self._ss_head = 0
                    self._ss_tail = b""
            else:   # h11: its events, watched on their way to uvicorn
                def _ss_watch(self) -> None:
                    conn = self.conn
                    next_event = conn.next_event

                    def watched() -> Any:
                        event = next_event()
                        if type(event) is h11.Request:
                            self._ss_in_head = False
                        elif type(event) is h11.EndOfMessage:
                            self._ss_request_read()
                            pending = conn.trailing_data[0]   # the next head, begun
                            if pending:
                                self._ss_count(bytes(pending))
                        return event

                    conn.next_event = watched

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                c = self._ss_conn
                if c is not None and not c.done:
                    c.done = True
                    web._lost(c)

    Handed.__name__ = Handed.__qualname__ = f"Sockshare{base.__name__}"
    return Handed


@dataclass(slots=True, eq=False)
class Listening:
    """A listening socket this worker accepts on (``accept = "worker"``): the descriptor
    it inherited from the dispatcher (kept, never read) and, while it accepts, a
    duplicate of it that the loop reads (closed to stop: the kernel's accept queue is
    shared, so what waits there goes to the other workers)."""

    fd: int
    name: str
    address: str
    backlog: int
    #: the duplicate being read (None: not accepting)
    sock: socket.socket | None = None
    #: uvloop: the server that accepts on ``sock`` (it closes ``sock``)
    server: asyncio.AbstractServer | None = None
    #: what every connection accepted on it shares (made once: a connection costs no
    #: dict and no closure): its ``scope["extensions"]["sockshare"]``, and the app
    #: that puts it there
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    app: Any = None


#: connections accepted per listener per wake-up at most (the other workers take the rest)
ACCEPT_BURST = 32


#: what a relayed handover came to: the target took it, it is still ours, or the
#: channel broke before the answer (it may be served there: never here again)
Outcome = str
Relay = Callable[[socket.socket, bytes, bytes], Awaitable[Outcome]]
#: the handoff meta ``"resume"`` of a keep-alive connection moved between requests
KEEP_ALIVE_RESUME = {"http": "keep-alive"}
_COMPACT = json.JSONEncoder(separators=(",", ":"))
#: seconds a connection waits for the client to take the last response before it moves
FLUSH_WAIT = 5.0
#: Seconds between two looks at a drain's progress.
DRAIN_TICK = 0.25


# -- the server ------------------------------------------------------------------------


class Tally:
    """The connections a worker opened (accepted itself) and closed since its last
    report to the dispatcher, shared by the worker, which reports them in batches, and
    its :class:`WebServer`, which counts them: a connection costs no call into the
    worker, only when a report is not yet due (``due``) or descriptors are watched
    (``watch``: the worker is at its descriptor mark and looks again as they close)."""

    __slots__ = ("closed", "due", "opened", "watch")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.due = False
        self.watch = False


class WebServer:
    """Serves one worker's handed-off connections with one web app (see the module
    docstring). Connections opened and closed are counted in :attr:`tally`;
    ``on_tally`` is called when it needs the worker: a report not yet due, or
    descriptors watched."""

    def __init__(self, app: Any, interface: str, settings: WebSettings,
                 on_tally: Callable[[], None]) -> None:
        if interface not in ("asgi", "wsgi"):
            raise WebAppError(f"interface {interface!r} is not a web interface")
        config_mod = _require("uvicorn.config", "asgi")
        server_mod = _require("uvicorn.server", "asgi")
        self.settings = settings
        self.interface = interface
        self.on_tally = on_tally
        self.tally = Tally()
        self.requests = 0
        jitter = random.randint(0, settings.max_requests_jitter) if settings.max_requests_jitter else 0
        self.max_requests = settings.max_requests + jitter if settings.max_requests else 0
        #: called once when max_requests is reached
        self.on_max_requests: Callable[[], None] | None = None
        asgi: ASGIApp
        if interface == "wsgi":
            a2wsgi = _require("a2wsgi", "wsgi")
            asgi = a2wsgi.WSGIMiddleware(app, workers=settings.threads)
        else:
            asgi = app
        if settings.access_log:
            asgi = AccessLog(asgi, settings.access_log_format)
        self.app = asgi
        ssl_kwargs: dict[str, Any] = {}
        if settings.tls:
            ssl_kwargs = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile,
                          "ssl_keyfile_password": settings.ssl_keyfile_password,
                          "ssl_ca_certs": settings.ssl_ca_certs,
                          "ssl_cert_reqs": settings.ssl_cert_reqs}
        lifespan = settings.lifespan if interface == "asgi" else "off"
        self.config = config_mod.Config(
            app=self._counting, interface="asgi3", http=settings.http, ws=settings.ws,
            lifespan=lifespan, log_config=None, access_log=False,
            proxy_headers=settings.proxy_headers, forwarded_allow_ips=settings.forwarded_allow_ips,
            root_path=settings.root_path, limit_concurrency=settings.limit_concurrency,
            timeout_keep_alive=settings.timeout_keep_alive, server_header=False,
            headers=[("server", "sockshare")], ws_max_size=settings.ws_max_size,
            ws_ping_interval=settings.ws_ping_interval or None,
            ws_ping_timeout=settings.ws_ping_timeout or None,
            h11_max_incomplete_event_size=settings.limit_header_size, **ssl_kwargs)
        try:
            self.config.load()
        except (OSError, ssl.SSLError) as exc:
            raise WebAppError(f"cannot load the TLS certificate or key: {exc}") from None
        except SystemExit as exc:
            raise WebAppError(f"uvicorn refused the configuration (exit {exc.code})") from None
        self.ssl: ssl.SSLContext | None = self.config.ssl
        self.http_class: type[Any] = _subclass(
            self.config.http_protocol_class, self, http=True)
        ws_class = self.config.ws_protocol_class
        if ws_class is not None:
            self.config.ws_protocol_class = _subclass(ws_class, self, http=False)
        self.ws_class: type[Any] | None = None
        if interface == "asgi" and settings.ws in ("auto", "websockets-sansio"):
            # the WebSocket protocol that can move (_wsmove): uvicorn's sans-I/O one
            sansio = _require("uvicorn.protocols.websockets.websockets_sansio_impl", "asgi")
            from sockshare.server._wsmove import movable_class

            self.ws_class = _subclass(movable_class(sansio.WebSocketsSansIOProtocol, self), self,
                                      http=False)
            self.config.ws_protocol_class = self.ws_class
        uv = logging.getLogger("uvicorn.error")
        if uv.level == logging.NOTSET:
            # uvicorn's protocols log a TRACE line per connection made and lost when the
            # level *set on this logger* is at most TRACE (5), which NOTSET (0) is: the
            # level it gets from its parents, set, makes that a comparison again
            uv.setLevel(uv.getEffectiveLevel())
        self.state = server_mod.ServerState()
        self.lifespan = self.config.lifespan_class(self.config)
        self._conns: dict[int, _Conn] = {}
        #: set by the runtime: hands a connection (a duplicate of its socket) to the
        #: dispatcher, which gives it to another worker (docs/web.md, "Keep-alive handover")
        self.relay: Relay | None = None
        #: set by the runtime: this worker's id (``migration["from"]`` of what leaves it)
        self.worker_id: Any = None
        #: :attr:`handover_reason`'s value
        self._handover_reason = ""
        self._moving: set[asyncio.Protocol] = set()
        #: WebSockets on their way to another worker (progress for a drain), and the
        #: bound on how many go at once
        self.ws_moving = 0
        self.ws_slots = MoveWindow(MIGRATION_WINDOW)
        #: moves that hold a duplicate descriptor now (each frees it when it ends), and
        #: the moves waiting for one of those (:meth:`dup_for_move`)
        self.fd_holders = 0
        self._fd_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: True while :meth:`_protocol` builds the WebSocket protocol of a connection
        #: that resumes here (``_wsmove``: it needs no handshake set-up)
        self.making_resumed = False
        #: keep-alive connections handed over / refused by every target (closed as
        #: uvicorn would) / WebSockets closed with 1012
        self.counts = {"handed_over": 0, "handover_refused": 0, "ws_closed_1012": 0,
                       "ws_migrated_out": 0, "ws_migrated_in": 0, "ws_refused": 0, "ws_lost": 0}
        #: connections a drain closed because they could not move (WebSockets given
        #: 1012, keep-alive connections no worker took or whose TLS ended here, what was
        #: cut at the end): the worker reports them (``unmoved``, ``drain_closed``)
        self.drain_closed = 0
        self._ticker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        #: accept = "worker": the listeners this worker accepts on (:meth:`listen`), why
        #: it does not now ("start", "limit", "fds", "emfile", "stopped"), how many
        #: connections it takes at most (max_conns, its descriptors)
        self.listening: list[Listening] = []
        self.pool = ""
        self.accept_limit = 1 << 30
        self.fd_mark = 1 << 30
        self._accept_holds: set[str] = {"start"}
        self._fds_resume_at = 0

    @property
    def handover_reason(self) -> str:
        """While set (a reload, an upgrade, recycling), every keep-alive connection moves
        to another worker as soon as it is between two requests."""
        return self._handover_reason

    @handover_reason.setter
    def handover_reason(self, reason: str) -> None:
        self._handover_reason = reason
        cls = self.http_class
        hook = getattr(cls, "_ss_on_response_handover", None)
        if hook is None:
            return
        if not reason:
            if "on_response_complete" in cls.__dict__:
                del cls.on_response_complete
            return
        if "on_response_complete" in cls.__dict__:
            return
        # The hook on the class: each request's cycle binds ``on_response_complete``
        # when its head is read (uvicorn), so the requests read from now on call it;
        # the ones in progress (or queued behind a pipelined one) have the plain method
        # bound already: re-bound here. (Off the rest of the time: no call per response.)
        cls.on_response_complete = hook
        for proto in [p for p in self.state.connections if isinstance(p, cls)]:
            self._rehook(proto)

    @staticmethod
    def _rehook(proto: Any) -> None:
        """The requests of ``proto`` in progress (or queued behind a pipelined one) call
        its ``on_response_complete`` as it is now (each bound it when its head was read)."""
        cycles: list[Any] = [cycle for cycle, _app in getattr(proto, "pipeline", ())]
        current = getattr(proto, "cycle", None)
        if current is not None:
            cycles.append(current)
        hooked = proto.on_response_complete
        for pending in cycles:
            bound = getattr(pending, "on_response", None)
            if getattr(bound, "__self__", None) is proto and not pending.response_complete:
                pending.on_response = hooked

    # -- the app, as uvicorn calls it ----------------------------------------------------

    async def _counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app uvicorn's Config wraps (proxy headers...); per connection, the
        protocol's ``app`` is a closure around this (:meth:`_conn_app`)."""
        if scope["type"] == "http":
            self.requests += 1
            if self.max_requests and self.requests == self.max_requests and self.on_max_requests:
                self.on_max_requests()
        await self.app(scope, receive, send)

    @functools.cached_property
    def direct_app(self) -> ASGIApp:
        """What a connection's protocol calls: uvicorn's loaded app is _counting, wrapped
        by its middleware when configured; when neither counting nor a middleware is
        wanted, the app itself (one coroutine less per request)."""
        loaded: ASGIApp = self.config.loaded_app
        if loaded == self._counting and not self.max_requests:
            loaded = self.app
        return loaded

    def _conn_app(self, meta: dict[str, Any]) -> ASGIApp:
        # (a WebSocket's, or an h11 connection's: the scope is made where we cannot add
        # to it, so a wrapper puts the extension in)
        loaded = self.direct_app

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            ext = scope.get("extensions")
            if ext is None:
                scope["extensions"] = {"sockshare": meta}
            else:
                ext["sockshare"] = meta
            await loaded(scope, receive, send)

        return app

    # -- life ----------------------------------------------------------------------------

    async def startup(self) -> str | None:
        """Run the lifespan startup; the error (with the app's traceback) if it failed."""
        self._tick()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        errors = _Capture()
        uv = logging.getLogger("uvicorn.error")
        uv.addHandler(errors)
        try:
            await self.lifespan.startup()
        finally:
            uv.removeHandler(errors)
        if self.lifespan.should_exit:
            return "the app's lifespan startup failed" + (f":\n{errors.text}" if errors.text else "")
        return None

    async def shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        with contextlib.suppress(Exception):
            await self.lifespan.shutdown()
        if self.interface == "wsgi":
            executor = getattr(getattr(self.app, "app", self.app), "executor", None)
            if executor is not None:
                executor.shutdown(wait=False)

    def _tick(self) -> None:
        date = formatdate(time.time(), usegmt=True).encode()
        self.state.default_headers = [(b"date", date), *self.config.encoded_headers]

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._tick()

    # -- connections -----------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def refusal(self, data: bytes) -> str | None:
        """Why a handoff with these pre-read bytes cannot be served here (None: it can)."""
        if self.ssl is not None and data:
            return (f"{len(data)} byte(s) were read before the TLS handshake: sniff TLS "
                    "with MSG_PEEK (a TLS pool cannot take HTTP sniffing)")
        return None

    def conn_for(self, transport: asyncio.BaseTransport) -> _Conn | None:
        """The handoff a protocol instance's transport came from (or the connection
        uvloop's server accepted on it)."""
        return self._conns.get(id(transport)) or self._conns.get(_fd_of(transport))

    def register(self, sock: Any, meta: dict[str, Any], data: bytes,
                 resume: dict[str, Any] | None = None) -> None:
        """Note a handed-off connection before its transport exists."""
        client = None
        proxy = meta.get("proxy")
        if isinstance(proxy, dict):
            src = proxy.get("src")
            if isinstance(src, list) and len(src) == 2:
                client = (str(src[0]), int(src[1]))
        fd = sock.fileno()
        self._conns[fd] = _Conn(meta, client, self._conn_app(meta), data, resume=resume, fd=fd)
        self._idle.clear()

    def start(self, sock: Any) -> None:
        """Give the (accepted) connection its transport; uvicorn's protocol takes over.
        TLS connections complete their handshake in a task."""
        loop = asyncio.get_running_loop()
        make = getattr(loop, "_make_socket_transport", None)
        set_nodelay(sock)
        if self.ssl is None and make is not None:
            fd = sock.fileno()
            c = self._conns.get(fd)
            try:
                sock.setblocking(False)
                make(sock, self._protocol(c.resume if c is not None else None))
            except (OSError, ValueError, RuntimeError) as exc:
                # (a socket the client reset meanwhile, say): this one only
                log.info("connection %s: cannot start: %s",
                         c.meta.get("handoff_id") if c is not None else "?", exc)
                sock.close()
                self.forget(fd)
            return
        task = loop.create_task(self._start_async(sock))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    def _protocol(self, resume: dict[str, Any] | None = None) -> asyncio.Protocol:
        """A protocol instance: HTTP, or the movable WebSocket for a WebSocket that
        another worker handed over (``resume["ws"]``)."""
        if resume is not None and "ws" in resume and self.ws_class is not None:
            self.making_resumed = True
            try:
                ws: asyncio.Protocol = self.ws_class(config=self.config, server_state=self.state,
                                                     app_state=self.lifespan.state)
            finally:
                self.making_resumed = False
            return ws
        proto: asyncio.Protocol = self.http_class(config=self.config, server_state=self.state,
                                                  app_state=self.lifespan.state)
        return proto

    async def _start_async(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        c = self._conns.get(fd)
        resume = c.resume if c is not None else None
        try:
            await loop.connect_accepted_socket(lambda: self._protocol(resume), sock, ssl=self.ssl,
                                               ssl_handshake_timeout=10.0 if self.ssl else None)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("connection %s: TLS handshake failed: %s",
                     self._conns.get(fd, _Conn({}, None, self.app, b"")).meta.get("handoff_id"), exc)
            sock.close()
            self.forget(fd)

    def forget(self, fd: int, *, counted: bool = True) -> None:
        """A registered connection that never got (or lost) its protocol; reported
        closed unless ``counted`` is False (one the dispatcher never counted in: a peer
        worker's migration whose ACCEPT did not reach it, and that is closed here)."""
        c = self._conns.pop(fd, None)
        if c is not None and not c.done:
            c.done = True
            if counted:
                self._count_closed()
        if not self._conns:
            self._idle.set()
        if self._accept_holds:
            self._room_again()

    def _unregister(self, c: _Conn) -> None:
        """``c`` is no longer ours: by its key (a scan of every connection for each one
        that leaves made a reload of 10,000 WebSockets quadratic: seconds of CPU in the
        old worker, which then looked stuck)."""
        if self._conns.get(c.fd) is c:
            del self._conns[c.fd]
        else:
            for fd, known in list(self._conns.items()):   # (not registered by its fd)
                if known is c:
                    del self._conns[fd]
                    break
        if self._accept_holds:
            self._room_again()

    def _lost(self, c: _Conn) -> None:
        conns = self._conns
        if conns.get(c.fd) is c:   # (_unregister's common case, inline: per connection)
            del conns[c.fd]
            if self._accept_holds:
                self._room_again()
        else:
            self._unregister(c)
        tally = self.tally
        tally.closed += 1
        if not tally.due or tally.watch:
            self.on_tally()
        if not conns:
            self._idle.set()

    def _count_closed(self) -> None:
        tally = self.tally
        tally.closed += 1
        if not tally.due or tally.watch:
            self.on_tally()

    def _too_large(self, proto: Any) -> None:
        """431 for a request head past the limit, then close."""
        body = b"Request Header Fields Too Large"
        proto.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
            b"charset=utf-8\r\nconnection: close\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
        proto.transport.close()

    # -- accept = "worker": this worker accepts ---------------------------------------------

    def listen(self, listening: list[Listening], pool: str, limit: int | None,
               fd_mark: int) -> None:
        """Accept on ``listening`` once :meth:`start_accepting` is called, at most
        ``limit`` connections at once (None: no limit but the descriptors: a connection
        whose descriptor reaches ``fd_mark`` stops accepting until some close)."""
        self.listening = listening
        self.pool = pool
        self.accept_limit = limit if limit is not None else 1 << 30
        self.fd_mark = fd_mark

    def start_accepting(self) -> None:
        if self.listening:
            self._release("start")

    def stop_accepting(self) -> None:
        """For good (a drain): close our duplicates and the inherited descriptors; what
        waits in the kernel's accept queue is the other workers' (the new generation's)."""
        if not self.listening or "stopped" in self._accept_holds:
            return
        self._hold("stopped")
        for lst in self.listening:
            with contextlib.suppress(OSError):
                os.close(lst.fd)
        log.info("stopped accepting on %s", ", ".join(lst.name for lst in self.listening))

    def _hold(self, why: str) -> None:
        if not self._accept_holds:
            self._close_listeners()
        self._accept_holds.add(why)

    def _release(self, why: str) -> None:
        if why not in self._accept_holds:
            return
        self._accept_holds.discard(why)
        if not self._accept_holds:
            self._open_listeners()

    def _room(self) -> int:
        return self.accept_limit - len(self._conns)

    def _room_again(self) -> None:
        """A connection left: accept again below the marks (with some slack, so that a
        worker at its limit does not stop and start at every close)."""
        holds = self._accept_holds
        if "limit" in holds and self._room() >= max(1, self.accept_limit // 20):
            self._release("limit")
        if "fds" in holds and len(self._conns) <= self._fds_resume_at:
            self._release("fds")

    def _open_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        direct = getattr(loop, "_make_socket_transport", None) is not None
        for lst in self.listening:
            if lst.sock is not None:
                continue
            try:
                sock = socket.socket(fileno=dup_fd(lst.fd))
            except OSError as exc:   # (EMFILE: try again in a while)
                log.warning("listener %s: cannot accept: %s", lst.name, exc)
                self._close_listeners()
                self._accept_holds.add("emfile")
                loop.call_later(0.5, self._release, "emfile")
                return
            sock.setblocking(False)
            lst.sock = sock
            if direct:   # asyncio: accepted here, a burst at a time, each started as a handoff
                loop.add_reader(sock.fileno(), self._on_acceptable, lst)
            else:   # uvloop: its server accepts and makes the transport (in C)
                task = loop.create_task(self._serve(lst, sock))
                self.state.tasks.add(task)
                task.add_done_callback(self.state.tasks.discard)

    async def _serve(self, lst: Listening, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if lst.app is None:
            self._listener_app(lst)
        # uvloop calls the protocol class itself (no Python factory per connection): a
        # subclass per listener says where its connections came from
        cls: Callable[..., asyncio.Protocol] = type(
            self.http_class.__name__, (self.http_class,), {"_ss_listener": lst})
        make = functools.partial(cls, config=self.config, server_state=self.state,
                                 app_state=self.lifespan.state)
        try:
            server = await loop.create_server(
                make, sock=sock, backlog=lst.backlog,
                ssl=self.ssl, ssl_handshake_timeout=10.0 if self.ssl is not None else None)
        except OSError as exc:
            log.warning("listener %s: cannot accept: %s", lst.name, exc)
            sock.close()
            if lst.sock is sock:
                lst.sock = None
            return
        if lst.sock is not sock:   # stopped meanwhile
            server.close()
            return
        lst.server = server

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for lst in self.listening:
            sock, lst.sock = lst.sock, None
            server, lst.server = lst.server, None
            if server is not None:
                server.close()   # (closes sock)
            elif sock is not None and getattr(loop, "_make_socket_transport", None) is not None:
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    loop.remove_reader(sock.fileno())
                sock.close()
            # (uvloop's server not made yet: _serve closes it once it is)

    def _on_acceptable(self, lst: Listening) -> None:
        """asyncio: accept a burst on ``lst``, each connection registered and started
        exactly as a handed-off one."""
        sock = lst.sock
        if sock is None:
            return
        for _ in range(ACCEPT_BURST):
            if self._room() <= 0:
                self._hold("limit")
                return
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:   # EMFILE, ENFILE, ENOBUFS: the queue keeps them
                log.warning("listener %s: accept failed: %s; again in 0.5 s", lst.name, exc)
                self._hold("emfile")
                asyncio.get_running_loop().call_later(0.5, self._release, "emfile")
                return
            self._accepted(conn.fileno(), lst, addr)
            self.start(conn)
            if self._accept_holds:
                return

    def _full(self) -> None:
        if self._room() <= 0:
            self._hold("limit")

    def _listener_app(self, lst: Listening) -> ASGIApp:
        """The meta and app of the connections accepted on ``lst``, made once."""
        lst.meta = {"pool": self.pool, "listener": lst.name, "accepted": "worker"}
        app = lst.app = self._conn_app(lst.meta)
        return app

    def _accepted(self, fd: int, lst: Listening, addr: Any) -> _Conn:
        """Register a connection this worker accepted (``fd``: its key, the descriptor
        or, under uvloop, its transport's id), with its listener's meta (minimal: no
        sniffing here, the client is ``scope["client"]``), and count it in."""
        app = lst.app
        if app is None:
            app = self._listener_app(lst)
        c = _Conn(lst.meta, None, app, b"", fd=fd)
        self._conns[fd] = c
        if self._idle.is_set():
            self._idle.clear()
        self.tally.opened += 1
        if not self.tally.due:
            self.on_tally()
        if 0 <= fd < 1 << 30 and fd >= self.fd_mark and "fds" not in self._accept_holds:
            log.warning("descriptor %d reached the mark %d: not accepting until connections "
                        "close", fd, self.fd_mark)
            self._fds_resume_at = max(0, len(self._conns) - max(1, len(self._conns) // 10))
            self._hold("fds")
        return c

    # -- keep-alive handover ----------------------------------------------------------------

    def _idle_http(self, proto: Any) -> bool:
        """Between two requests, nothing of the next one read: the connection can move
        with no byte of it in this process."""
        transport = getattr(proto, "transport", None)
        if (self.ssl is not None or not isinstance(proto, self.http_class)
                or proto._ss_conn is None or transport is None or transport.is_closing()
                or proto in self._moving):
            return False   # (TLS ended here: its state is this process's, it cannot move)
        return self._still_idle(proto)

    def request_handover(self, n: int | None, reason: str) -> int:
        """Move up to ``n`` idle keep-alive connections to other workers (None: all of
        them, and each one with a request in progress once its response is complete --
        these, not the connections that come later: only a drain,
        :attr:`handover_reason`, moves every connection it has). Returns how many were
        asked to move now."""
        if self.relay is None:
            return 0
        picked = 0
        hook = getattr(self.http_class, "_ss_on_response_handover", None)
        for proto in list(self.state.connections):
            if n is not None and picked >= n:
                break
            if self._idle_http(proto):
                self._handover_if_idle(proto, reason)
                picked += 1
            elif self._is_ws(proto):
                if hasattr(proto, "request_move") and proto.request_move(reason):
                    picked += 1   # (it moves if the app takes the offer: docs/web.md)
            elif (n is None and hook is not None and not self.handover_reason
                    and self.ssl is None and isinstance(proto, self.http_class)
                    and proto._ss_conn is not None):
                # a request in progress: it moves once its response is complete
                proto._ss_move_reason = reason
                proto.on_response_complete = hook.__get__(proto)
                self._rehook(proto)
        return picked

    def _handover_if_idle(self, proto: Any, reason: str) -> bool:
        """Start moving ``proto`` if it is idle (True: started)."""
        if self.relay is None or not self._idle_http(proto):
            return False
        self._moving.add(proto)
        proto.transport.pause_reading()   # now: no byte of a next request may come in
        task = asyncio.get_running_loop().create_task(self._handover(proto, reason))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)
        return True

    async def dup_for_move(self, raw: socket.socket) -> socket.socket:
        """A duplicate of ``raw`` for a move (the transport keeps ``raw`` until a target
        has the connection: a move holds two descriptors on its way). Out of descriptors
        (EMFILE, ENFILE) while other moves hold some: wait until one of them ends (it
        frees its duplicate, and its connection's descriptor if it left) and try again,
        first come first served. A worker near its limit then moves its connections a
        few at a time instead of refusing all but the first few -- which a drain never
        asked again, and closed at its end (19,746 WebSockets of a worker of 19,906 at a
        20,000-descriptor limit dropped by a reload). With no move holding one, nothing
        will free a descriptor: :class:`MigrationRefused`, the reason given. The caller
        calls :meth:`move_ended` once the duplicate is closed."""
        while True:
            try:
                fd = dup_fd(raw.fileno())
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self.fd_holders:
                    raise MigrationRefused(
                        f"cannot duplicate the connection's descriptor: {exc}") from None
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._fd_waiters.append(fut)
                await fut
                continue
            try:
                dup = socket.socket(raw.family, raw.type, raw.proto, fd)
            except OSError:
                os.close(fd)
                raise
            self.fd_holders += 1
            return dup

    def move_ended(self) -> None:
        """A move that held a duplicate descriptor ended (the duplicate is closed): the
        next move waiting for a descriptor tries again."""
        self.fd_holders -= 1
        waiters = self._fd_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():   # (a cancelled waiter is skipped)
                fut.set_result(None)
                return
        # (none waits: nothing to do)

    async def _handover(self, proto: Any, reason: str) -> None:
        """Hand one idle keep-alive connection over: stop reading, let the last response
        leave, give a duplicate of the socket to the dispatcher, and close ours once a
        target ACCEPTed it (no FIN, no RST: the client never notices). Refused: it
        stays here (closed as uvicorn closes idle ones if we are draining)."""
        assert self.relay is not None
        c: _Conn = proto._ss_conn
        transport = proto.transport
        timer = getattr(proto, "timeout_keep_alive_task", None)
        try:
            if timer is not None:   # the keep-alive timeout must not close it meanwhile
                timer.cancel()
            deadline = time.monotonic() + FLUSH_WAIT
            while transport.get_write_buffer_size() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            if transport.is_closing():
                return
            if transport.get_write_buffer_size() or not self._still_idle(proto):
                # the client is slow to read, or a request came first: serve it here,
                # and try again once its response is complete
                transport.resume_reading()
                self._keep_alive_again(proto)
                return
            raw = transport.get_extra_info("socket")
            try:
                dup = await self.dup_for_move(raw)
            except MigrationRefused as exc:
                outcome = f"rejected: {exc}"
            else:
                try:
                    meta = {k: v for k, v in c.meta.items()
                            if k not in ("resume", "migration", "attempt")}
                    previous = c.meta.get("migration")
                    count = previous.get("count", 0) if isinstance(previous, dict) else 0
                    meta["migration"] = {"from": self.worker_id, "from_pid": os.getpid(),
                                         "count": (count if isinstance(count, int) else 0) + 1,
                                         "started": time.monotonic(),
                                         "reason": reason or "rebalance"}
                    meta["resume"] = KEEP_ALIVE_RESUME
                    outcome = await self.relay(dup, _COMPACT.encode(meta).encode(), b"")
                finally:
                    self.move_ended()
        finally:
            self._moving.discard(proto)
        if outcome == "accepted":
            self.counts["handed_over"] += 1
            self._detach(proto, c)
        elif outcome == "gone":
            self._detach(proto, c)
        else:
            self._handover_refused(proto, outcome)

    @staticmethod
    def _still_idle(proto: Any) -> bool:
        """Between two requests, no byte of the next one read. (httptools: the start of
        a next head read with the end of the last request, in the same read, is not
        counted in ``_ss_head``; the parser began a message for it, with a new scope:
        the last cycle's is not the protocol's any more.)"""
        cycle = getattr(proto, "cycle", None)
        return (proto._ss_in_head and not proto._ss_head
                and (cycle is None or (cycle.response_complete
                                       and cycle.scope is getattr(proto, "scope", None)))
                and not getattr(proto, "pipeline", None))

    def detach(self, proto: Any) -> None:
        """A connection another worker now serves: close our descriptor only."""
        c = proto._ss_conn
        if c is None:
            proto.transport.abort()
            return
        self._detach(proto, c)

    def _detach(self, proto: Any, c: _Conn) -> None:
        """The connection lives on elsewhere: close this process's descriptor only."""
        c.done = True   # (the dispatcher counted it out; no closed report)
        self._unregister(c)
        proto.transport.abort()
        if not self._conns:
            self._idle.set()

    def _handover_refused(self, proto: Any, why: str) -> None:
        self.counts["handover_refused"] += 1
        log.info("keep-alive connection %s stays here: %s", proto._ss_conn.meta.get("handoff_id"), why)
        transport = proto.transport
        if transport.is_closing():
            return
        if self.handover_reason:
            self.drain_closed += 1
            proto.shutdown()   # draining: closed between requests, as uvicorn does
        else:
            transport.resume_reading()
            self._keep_alive_again(proto)

    def _keep_alive_again(self, proto: Any) -> None:
        """``proto`` stays here after a move that did not happen: idle, it gets its
        keep-alive timer again (the move stopped it; uvicorn starts one only when a
        response completes, so without this the connection was kept for ever)."""
        if proto.transport.is_closing() or not self._still_idle(proto):
            return   # (a request in progress: its response starts the timer)
        timer = getattr(proto, "timeout_keep_alive_task", None)
        if timer is not None:
            timer.cancel()
        proto.timeout_keep_alive_task = asyncio.get_running_loop().call_later(
            proto.timeout_keep_alive, proto.timeout_keep_alive_handler)

    def _is_ws(self, proto: Any) -> bool:
        return not isinstance(proto, self.http_class)

    async def drain(self, grace: float) -> None:
        """Stop taking requests. Plain stop: idle keep-alive connections close, requests
        in progress finish, WebSockets close with 1012 (uvicorn's shutdown). With a
        handover (reload, upgrade, recycling: :attr:`handover_reason`): keep-alive
        connections move to the new workers as they fall idle, and WebSockets stay
        until they close or ``grace`` ends, then get 1012. ``grace`` bounds the time
        *without progress* (:meth:`_wait_idle`): while connections keep closing or moving
        the drain goes on; after ``grace`` seconds in which none did, what is left gets
        1012 / its last chance, and one second later is cut."""
        moving = bool(self.handover_reason) and self.relay is not None
        if moving and self.ssl is not None:
            # TLS ended in this worker: its keys and sequence numbers are in this process
            # (no kTLS here), so its keep-alive connections cannot move: closed between
            # requests, as uvicorn does; WebSockets stay until grace ends
            http = [p for p in self.state.connections if not self._is_ws(p)]
            if http:
                self.counts["handover_refused"] += len(http)
                self.drain_closed += len(http)
                log.info("%d keep-alive TLS connection(s) cannot move (TLS ended in this "
                         "worker): closed between requests", len(http))
            for proto in http:
                self._shutdown(proto)
        elif moving:
            self.request_handover(None, self.handover_reason)
        else:
            for proto in list(self.state.connections):
                self._shutdown(proto)
        await self._wait_idle(grace)
        if self._conns:   # grace is over: WebSockets get 1012, requests their last chance
            for proto in list(self.state.connections):
                self._shutdown(proto)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._idle.wait()
        if self._conns:
            log.warning("%d connection(s) still open after %.1f s without progress: cut",
                        len(self._conns), grace + 1.0)
            for proto in list(self.state.connections):
                transport = getattr(proto, "transport", None)
                if transport is not None:
                    if not self._is_ws(proto):   # (a WebSocket was counted at its 1012)
                        self.drain_closed += 1
                    transport.abort()
        for task in list(self.state.tasks):
            if not task.done():
                task.cancel()

    def _open_count(self) -> int:
        """Connections and tasks still open (a drain's progress: this going down)."""
        return len(self._conns) + len(self.state.tasks)

    async def _wait_idle(self, grace: float) -> None:
        """Wait until every connection is gone, as long as their number keeps going
        down (or a handover is in flight); at most ``grace`` seconds without that."""
        loop = asyncio.get_running_loop()
        lowest = self._open_count()
        quiet_since = loop.time()
        while not self._idle.is_set():
            left = quiet_since + grace - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(DRAIN_TICK, left)):
                    await self._idle.wait()
            n = self._open_count()
            if n < lowest or self._moving or self.ws_moving:
                lowest = min(lowest, n)
                quiet_since = loop.time()

    def _shutdown(self, proto: Any) -> None:
        if getattr(proto, "_ss_moving", False):
            return   # on its way to another worker, which may serve it already: not ours
        if self._is_ws(proto) and getattr(proto, "handshake_complete", True):
            self.counts["ws_closed_1012"] += 1
            self.drain_closed += 1
        with contextlib.suppress(Exception):
            proto.shutdown()


class _Capture(logging.Handler):
    """Collects the error records (with tracebacks) uvicorn logs during startup."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        out = io.StringIO()
        out.write(record.getMessage())
        if record.exc_info:
            out.write("\n")
            out.write("".join(traceback.format_exception(*record.exc_info)))
        self.lines.append(out.getvalue())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
