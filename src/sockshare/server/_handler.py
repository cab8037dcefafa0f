"""The handler API: what an app's ``handle(conn)`` and ``resume(conn, state)`` see.

An app is ``async def handle(conn: Connection) -> None``, and optionally
``async def resume(conn: Connection, state) -> None`` for connections migrated to it. Both
are given a :class:`Connection`: asyncio streams over a socket another process accepted,
whose reader yields first the bytes the dispatcher already read (to sniff a route, a Host
or an SNI) and then what the client sends next. ``conn.meta`` says where it came from
(docs/server.md has the table) and ``conn.worker`` (:class:`WorkerInfo`) who serves it.

Moving a connection. ``await conn.migrate(state)`` gives the connection, with ``state``
(JSON, at most :data:`MAX_STATE` bytes: :func:`encode_state` checks it), to another worker
of the pool, where ``resume(conn, state)`` carries on with the same socket and every byte
not consumed here. The steps (flush, pause reading, hand a duplicate of the descriptor
over, close this side's copy only once the target ACCEPTed) are the runtime's
(``_runtime.Worker.migrate_out``); what the handler learns is one of:

* it returns: the target has the connection; the handler should return too;
* :class:`StateError` or :class:`MigrationUnsupported`: raised before anything was touched;
* :class:`MigrationRefused`: no worker took it; reading resumed, the connection is still
  the handler's, nothing lost;
* :class:`MigrationAborted`: the channel broke while the connection was on its way; the
  target may serve it, so this side closed its copies -- it is never served twice.

All four are :class:`MigrationError`, a :class:`~sockshare.SockshareError`.

The dispatcher asks for migrations (rebalancing, reload, upgrade, ``sockshare migrate``):
the runtime then calls :meth:`Connection.request_migration` on connections that are
:attr:`Connection.migratable`, which sets :attr:`Connection.migration_requested`; a handler
notices through :meth:`Connection.interruptible` (it raises :class:`MigrationRequested`,
which is not an error) or by watching the event itself.

:func:`open_connection` (and :func:`connection_now`, its no-wait form on CPython's
selector loop) turn a received :class:`~sockshare.Handoff` into a :class:`Connection`; the
runtime uses them, and tests can too. Nothing here knows about the runtime beyond the
small :class:`Migrator` protocol the runtime fills in.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sockshare._channel import Handoff
from sockshare._errors import SockshareError
from sockshare.backends._fds import socket_family, socket_type
from sockshare.protocol import MAX_DATA

__all__ = [
    "MAX_STATE",
    "MIGRATION_WINDOW",
    "READ_LIMIT",
    "App",
    "Connection",
    "MigrationAborted",
    "MigrationError",
    "MigrationRefused",
    "MigrationRequested",
    "MigrationUnsupported",
    "Migrator",
    "MoveWindow",
    "Resume",
    "StateError",
    "WorkerInfo",
    "connection_now",
    "encode_state",
    "open_connection",
]

App = Callable[["Connection"], Awaitable[None]]
Resume = Callable[["Connection", Any], Awaitable[None]]
T = TypeVar("T")
#: StreamReader buffer limit of a Connection (same as asyncio's default).
READ_LIMIT = 2 ** 16
_SOCK_STREAM = int(socket.SOCK_STREAM)
#: Largest migration state: compact JSON, UTF-8. The handoff metadata limit is 16 KiB
#: (docs/protocol.md); the other 4 KiB carry the connection's own meta (client, pool...).
MAX_STATE = 12 * 1024
#: Migrations a worker relays through the dispatcher at once; the others wait their
#: turn. Without a bound, a drain of 10,000 WebSockets handed the dispatcher 10,000
#: handoffs to forward at once: its queue to each new worker went past the channel's
#: OUT_LIMIT, so it stopped reading that worker's ACCEPTs, and the moves stalled for
#: longer than --grace (the old workers then closed what was left). 256, not the 128 of
#: before: fewer, larger batches (each a few writes, reads and wake-ups in three
#: processes) made a reload of 20,000 WebSockets 14-17 % cheaper in server CPU a move
#: (five interleaved pairs, docs/server.md, "The migration window"); two old workers'
#: windows of typical metadata (1-2 KiB) stay within the dispatcher's 1 MiB OUT_LIMIT,
#: and even at the 16 KiB limit within HARD_OUT_LIMIT.
MIGRATION_WINDOW = 256
#: compact JSON of states, which must also be finite
_COMPACT_STRICT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class MoveWindow:
    """At most ``size`` migrations at once (``async with window:``); the others wait
    their turn, first come first served: :class:`asyncio.Semaphore`'s behaviour, but
    O(1) a release. (3.11's semaphore looks through every waiter it woke that has not run
    yet on each release: with thousands of moves queued behind a window of 128, about
    60 futures looked at a move, 10-15 % of a draining worker's Python time.)"""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Waiters queued (cancelled ones included until their turn comes)."""
        return len(self._waiters)

    async def __aenter__(self) -> None:
        if self._free > 0:   # (then nobody waits: a slot goes to a waiter, not to _free)
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()   # given a slot, cancelled before it ran: pass it on
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():   # (a cancelled waiter is skipped)
                fut.set_result(None)   # the slot is its now
                return
        self._free += 1


class MigrationError(SockshareError):
    """A migration did not happen. Subclasses say who has the connection now."""


class MigrationUnsupported(MigrationError):
    """This connection cannot move: the app has no resume handler, or the handler set
    ``conn.migratable = False``. Nothing was touched."""


class StateError(MigrationError, ValueError):
    """The state is not JSON-compatible, or over :data:`MAX_STATE` bytes. Nothing was
    touched: the connection is still the handler's."""


class MigrationRefused(MigrationError):
    """No other worker could take the connection (or it could not be detached): it is
    still the handler's, reading resumed, nothing lost."""


class MigrationAborted(MigrationError):
    """The channel to the dispatcher broke while the connection was on its way. It may
    already be served by the target, so this side closed its copies: it is gone from
    here, never served twice."""


class MigrationRequested(Exception):
    """Raised by :meth:`Connection.interruptible` when the dispatcher asked this
    connection to move: call ``await conn.migrate(state)`` (or go on serving)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the dispatcher asked this connection to migrate ({reason})")
        self.reason = reason


def encode_state(state: Any) -> bytes:
    """Compact JSON of a migration state; :class:`StateError` if it cannot travel."""
    try:
        raw = _COMPACT_STRICT.encode(state).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateError(f"migration state must be JSON-compatible: {exc}") from None
    if len(raw) > MAX_STATE:
        raise StateError(f"migration state of {len(raw)} bytes of JSON is over the limit of "
                         f"{MAX_STATE} bytes")
    return raw


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Which worker is serving: id (stable across restarts), pid, generation (bumped at
    each restart of this id) and pool."""

    id: int
    pid: int
    generation: int
    pool: str


class Migrator(Protocol):
    """What :meth:`Connection.migrate` needs of the runtime that serves the connection
    (``_runtime.Worker``; a test may give a stand-in)."""

    @property
    def resume(self) -> Resume | None: ...

    def migration_meta(self, conn: Connection, state: Any, started: float,
                       reason: str = "") -> bytes: ...

    async def migrate_out(self, conn: Connection, meta: bytes, unread: bytes) -> None: ...


async def answer_first(move: asyncio.Future[Any]) -> None:
    """Wait until ``move`` -- a connection on its way to another worker -- is answered,
    whatever cancels the waiter meanwhile: a move cannot be called back once its
    descriptor left, so a cancelled mover (an ``asyncio.wait_for`` around ``migrate``)
    takes effect once the answer is applied (the connection gone, or ours again), never
    with the connection in between. Its outcome is the caller's to read."""
    while not move.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(move)


class Connection:
    """One client connection handed to this worker, as the app sees it.

    ``reader`` yields the bytes the dispatcher already read (``meta``'s sniffer fields
    were parsed from them) and then what the client sends next, seamlessly. ``meta``
    holds ``client`` (``[host, port]``, or ``"unix"``), ``pool``, ``route``,
    ``listener``, ``handoff_id``, ``attempt`` (when re-dispatched), ``migration``
    (``{"from", "from_pid", "count", "started", "reason"}`` when it was migrated here) and
    whatever the sniffer found (``host``, ``sni``, ``proxy``, ``method``, ``path``...);
    the table is in docs/server.md.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 meta: dict[str, Any] | None, worker: WorkerInfo, *, raw_meta: bytes = b"") -> None:
        self.reader = reader
        self.writer = writer
        self._meta = meta
        self._raw_meta = raw_meta
        self.worker = worker
        self._closed = False
        self._migrated = False
        self._migrating = False
        self._migratable = False
        self._requested_event: asyncio.Event | None = None
        self._reason = ""
        self._runtime: Migrator | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The handoff's metadata (decoded on first use: many handlers never look)."""
        meta = self._meta
        if meta is None:
            try:
                meta = json.loads(self._raw_meta) if self._raw_meta else {}
            except ValueError:  # undecodable: the connection itself is still fine
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
            self._meta = meta
        return meta

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._meta = value

    @property
    def _requested(self) -> asyncio.Event:
        # made on first use: most connections are never asked to migrate
        event = self._requested_event
        if event is None:
            event = self._requested_event = asyncio.Event()
        return event

    @property
    def handoff_id(self) -> str:
        return str(self.meta.get("handoff_id", ""))

    @property
    def client_address(self) -> Any:
        """``(host, port)`` for TCP clients; the peer name (a string) for UNIX ones."""
        client = self.meta.get("client")
        if isinstance(client, list):
            return tuple(client)
        if client is None:
            return self.writer.get_extra_info("peername")
        return client

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def migrated(self) -> bool:
        """True once the connection was handed to another worker."""
        return self._migrated

    @property
    def resumed(self) -> bool:
        """True when this connection was migrated here from another worker."""
        return "migration" in self.meta

    # -- migration -----------------------------------------------------------------

    @property
    def migratable(self) -> bool:
        """Whether the dispatcher may ask this connection to move. True by default when
        the app has a resume handler; a handler sets it False while it cannot move
        (in the middle of a request) -- such connections are drained instead."""
        return self._migratable and not self._closed

    @migratable.setter
    def migratable(self, value: bool) -> None:
        self._migratable = bool(value)

    @property
    def migration_requested(self) -> asyncio.Event:
        """Set when the dispatcher asked this connection to move (see :attr:`migration_reason`)."""
        return self._requested

    @property
    def migration_reason(self) -> str:
        """``rebalance``, ``reload``, ``upgrade``, ``request``... ('' when not asked)."""
        return self._reason

    def request_migration(self, reason: str) -> None:
        """Ask the handler to migrate (what the runtime does when the dispatcher asks)."""
        self._reason = reason
        self._requested.set()

    async def interruptible(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` (a read, typically) unless a migration is requested first: then
        ``aw`` is cancelled and :class:`MigrationRequested` raised. Cancelling a
        StreamReader read loses no data: bytes stay in the reader until a read returns.

        While :attr:`migratable` is False, requests do not interrupt."""
        if not self._migratable:
            return await aw
        if self._requested.is_set():
            if inspect.iscoroutine(aw):
                aw.close()
            raise MigrationRequested(self._reason or "requested")
        task = asyncio.ensure_future(aw)
        waiter = asyncio.ensure_future(self._requested.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            waiter.cancel()
            raise
        if task.done():
            waiter.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.cancelled():
            raise MigrationRequested(self._reason or "requested")
        return task.result()   # it completed while being cancelled: keep its result

    async def migrate(self, state: Any = None, *, unread: bytes = b"", reason: str = "") -> None:
        """Give this connection, with ``state``, to another worker of the pool, where
        ``resume(conn, state)`` continues it with the same socket and every byte not
        consumed here (what the reader holds, after ``unread``). ``reason`` shows in the
        target's ``conn.meta["migration"]["reason"]`` (default: why the dispatcher asked,
        or ``"handler"``).

        Returns once the target accepted; the handler should return then (the
        connection is no longer usable here). Raises :class:`StateError` or
        :class:`MigrationUnsupported` before touching anything,
        :class:`MigrationRefused` when the connection is still the handler's, and
        :class:`MigrationAborted` when it is gone from here.
        """
        rt = self._runtime
        if self._closed:
            raise MigrationError("the connection is already closed")
        if self._migrating:
            raise MigrationError("this connection is already migrating")
        if rt is None or rt.resume is None:
            raise MigrationUnsupported(
                "this worker's app has no resume handler: define async def resume(conn, state) "
                "next to handle, or give --resume module:callable")
        if not self._migratable:
            raise MigrationUnsupported("the handler marked this connection as not migratable")
        started = time.monotonic()
        encode_state(state)
        meta = rt.migration_meta(self, state, started, reason)
        if len(unread) + len(self._buffer()) > MAX_DATA:
            self._requested.clear()   # (answered: not interrupted again at once)
            raise MigrationRefused(f"{len(unread) + len(self._buffer())} unread bytes are over "
                                   f"the {MAX_DATA}-byte limit of a handoff")
        self._migrating = True
        try:
            await rt.migrate_out(self, meta, bytes(unread))
        finally:
            self._migrating = False

    def _buffer(self) -> bytearray:
        buf: bytearray = getattr(self.reader, "_buffer")  # noqa: B009 - no public API for it
        return buf

    def _detached(self) -> None:
        """The connection left: mark it closed without touching the socket again."""
        self._closed = True
        self._migrated = True

    async def close(self) -> None:
        """Close the connection (flushing what was written); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError, RuntimeError):
            await self.writer.wait_closed()

    def __repr__(self) -> str:
        return f"<Connection {self.handoff_id} from {self.client_address!r} on worker {self.worker.id}>"


_TCP_FAMILIES = (int(socket.AF_INET), int(getattr(socket, "AF_INET6", -1)))


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on a handed-over TCP socket. asyncio sets it only on sockets whose
    ``proto`` says TCP, and a socket accepted from a listener made with proto 0 (the
    dispatcher's, most servers') says 0: without it, a small write that follows another
    waits for the client's delayed ACK, 40 ms on Linux."""
    if socket_family(sock) in _TCP_FAMILIES:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connection_now(handoff: Handoff, worker: WorkerInfo, *,
                   limit: int = READ_LIMIT) -> Connection | None:
    """:func:`open_connection` without waiting, on CPython's selector loop: the transport
    at once, instead of connect_accepted_socket and its two turns of the loop waiting for
    connection_made (which still runs, scheduled, before any byte is read) -- a migrated
    connection resumes sooner. None where that is not possible (another loop, a socket
    that is not a stream)."""
    loop = asyncio.get_running_loop()
    make = getattr(loop, "_make_socket_transport", None)
    if make is None or socket_type(handoff.socket) & 0xF != _SOCK_STREAM:
        return None
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    if handoff.data:
        reader.feed_data(handoff.data)
    if handoff.socket.gettimeout() != 0.0:  # an AsyncChannel already made it non-blocking
        handoff.socket.setblocking(False)
    set_nodelay(handoff.socket)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = make(handoff.socket, protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    decoded = handoff._meta   # (already decoded to look for "resume": not twice)
    return Connection(reader, writer, decoded if isinstance(decoded, dict) else None, worker,
                      raw_meta=handoff.raw_meta)


async def open_connection(handoff: Handoff, worker: WorkerInfo, *,
                          limit: int = READ_LIMIT) -> Connection:
    """Wrap a received handoff in asyncio streams; pre-read bytes come first."""
    conn = connection_now(handoff, worker, limit=limit)
    if conn is not None:
        return conn
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    if handoff.data:
        reader.feed_data(handoff.data)
    set_nodelay(handoff.socket)
    transport, protocol = await loop.connect_accepted_socket(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock=handoff.socket)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    decoded = handoff._meta   # (already decoded to look for "resume": not twice)
    return Connection(reader, writer, decoded if isinstance(decoded, dict) else None, worker,
                      raw_meta=handoff.raw_meta)

