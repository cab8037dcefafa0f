"""The Python worker: receives connections from the dispatcher and runs the app on them.

``python -m sockshare.server._worker --app module:callable --channel ADDRESS --id N``
(the dispatcher starts it; ``SOCKSHARE_CHANNEL`` / ``SOCKSHARE_WORKER_ID`` work too).

Life of a worker:

1. import the app (``async def handle(conn: Connection) -> None``) and its *resume*
   handler (``async def resume(conn, state)``: ``--resume module:callable``, or by
   convention ``resume`` next to ``handle`` in the same module), then connect an
   :class:`~sockshare.AsyncChannel` to the dispatcher, HELLO name ``worker:N``, and say
   what it can do: ``{"ev": "hello", "resume": true|false}``. If the app cannot be
   imported the worker still connects, tells the dispatcher (``{"ev": "fatal"}``), rejects
   whatever was already sent to it with the reason and exits with status 3: the
   dispatcher re-dispatches and restarts it with backoff.
2. for each handoff: build a :class:`Connection` (a StreamReader that already holds the
   pre-read bytes, then ``connect_accepted_socket`` on the socket); only then ACCEPT
   the handoff, and the ACCEPT is written out before the app runs (a worker killed
   right after its app wrote to the client must not have the connection re-dispatched).
   A handoff whose connection cannot be set up is REJECTed with a reason, and the
   dispatcher gives it to another worker. A handoff whose meta carries
   ``"resume"`` is a connection *migrated* from another worker: ``resume(conn, state)``
   runs instead of ``handle(conn)``.
3. run the app as a task. An exception in the app is logged, the connection closed; the
   worker goes on. Closed connections are reported to the dispatcher in CONTROL frames,
   ``{"ev": "closed", "n": k}``, batched per event-loop turn, so least-connections and
   ``max_conns`` see real numbers (a migrated connection is not: the dispatcher counts
   it out when the target accepts it).
   Descriptors: the hello says how many connections fit below RLIMIT_NOFILE -
   FD_HEADROOM (``"capacity"``); a handoff whose descriptor lands past that mark is
   REJECTed with REJECT_NO_FDS instead of risking a truncated read (MSG_CTRUNC ends the
   channel), and ``{"ev": "fds", "full": true|false, "capacity": n}`` tells the
   dispatcher when to stop and start again.
4. SIGTERM or SIGINT (or the dispatcher going away, or its ``{"cmd": "drain"}``):
   ``{"ev": "draining"}``, every new handoff is rejected ("worker is shutting down"),
   running handlers get ``--grace`` seconds to finish, what is left is cancelled, the
   channel closed, exit status 0. A second signal cancels the handlers at once.

Migration (docs/server.md, "Moving live connections"). A handler gives its connection
away with ``await conn.migrate(state)``. Detaching a connection from asyncio takes five
steps, in this order, each one undoable until the dispatcher answers:

* flush: every byte the handler wrote leaves the transport (``drain`` with a high-water
  mark of 0, then the transport's write buffer is checked empty);
* pause reading, and copy what the StreamReader holds but the handler did not consume
  (plus ``unread``, bytes the handler took but wants to give back);
* duplicate the descriptor and hand the duplicate to the dispatcher over this worker's
  channel, acknowledged, with meta ``{"resume": state, "migration": {...}, ...}`` and
  the unread bytes as the handoff's pre-read data;
* the dispatcher forwards it to another worker and answers only once that worker
  ACCEPTed (the answers are chained). ACCEPT: the transport is closed here -- that closes
  only this process's descriptor, the connection lives on in the target, so no FIN and
  no RST reach the client; ``migrate`` returns and the handler should return too.
  REJECT (no worker could take it): the duplicate is closed, reading resumes, and
  :class:`MigrationRefused` tells the handler the connection is still its own.
* the channel breaks before an answer (the dispatcher died): the target may already
  serve the connection, so this side must not: its copies are closed and
  :class:`MigrationAborted` is raised. Either way exactly one process serves it.

Direct migration: a handler's own ``migrate()`` (not one the dispatcher asked for)
skips the relay. Each worker that can resume listens on ``<pid>.peer`` beside the
dispatcher's channel and says so in its hello; the dispatcher sends every worker the
pool's other ready workers (``{"cmd": "peers", ...}``); the source hands the duplicate
straight to the one with the fewest connections, on a channel between the two. The
answer is the target's own: ACCEPT (the source closes its copy), or REJECT / the target
dying first (the source tries the relay). A handoff whose ACCEPT the target could not
deliver (its source's end closed) is held, unread, until the dispatcher says whether
the source process has exited: then the target serves it, else closes it. The
dispatcher hears of it in the batched reports (``moved_out`` from the source,
``moved_in`` from the target); a move unanswered after REPORT_DELAY is announced
(``moving``) so that ``--timeout`` covers a hung target.

The dispatcher asks for migrations (rebalancing, reload, upgrade, ``sockshare migrate``)
with ``{"cmd": "migrate", "n": k}`` or ``{"cmd": "drain", "migrate": true}``: the worker
sets ``conn.migration_requested`` on connections that are :attr:`Connection.migratable`;
a handler notices through :meth:`Connection.interruptible` (which raises
:class:`MigrationRequested`) or by watching the event itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sockshare._aio import AsyncChannel, AsyncChannelListener
from sockshare._channel import Handoff, _c_type
from sockshare._errors import ChannelError, SockshareError
from sockshare.protocol import MAX_DATA, MAX_META

__all__ = [
    "MAX_STATE",
    "App",
    "Connection",
    "MigrationAborted",
    "MigrationError",
    "MigrationRefused",
    "MigrationRequested",
    "MigrationUnsupported",
    "Resume",
    "StateError",
    "Worker",
    "WorkerInfo",
    "encode_state",
    "load_app",
    "load_resume",
    "main",
    "open_connection",
]

log = logging.getLogger("sockshare.server.worker")

App = Callable[["Connection"], Awaitable[None]]
Resume = Callable[["Connection", Any], Awaitable[None]]
T = TypeVar("T")
#: StreamReader buffer limit of a Connection (same as asyncio's default).
READ_LIMIT = 2 ** 16
_SOCK_STREAM = int(socket.SOCK_STREAM)
#: Seconds a close report may wait to ride along with the next ACCEPTs (least-conn
#: counts are that much behind at most).
REPORT_DELAY = 0.002
EXIT_APP_ERROR = 3
#: Descriptors a worker keeps free: one channel read may carry 64 (the dispatcher's
#: batch), and the kernel drops descriptors that do not fit (MSG_CTRUNC), which ends the
#: channel. A handoff whose descriptor lands past RLIMIT_NOFILE - FD_HEADROOM is refused
#: with REJECT_NO_FDS (the dispatcher gives it to another worker, and sends this one no
#: more until it says ``{"ev": "fds", "full": false}``).
FD_HEADROOM = 80
REJECT_NO_FDS = "worker out of file descriptors"


def _open_fds() -> int:
    """How many descriptors this process has open: the /proc list where there is one,
    else the lowest free descriptor (which does not see holes)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1   # (the listing's own)
    except OSError:
        try:
            fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return 1 << 30
        os.close(fd)
        return fd


def fd_mark() -> int:
    """The descriptor number from which handoffs are refused (see FD_HEADROOM)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1 << 30
    if soft <= 0 or soft > 1 << 30:
        return 1 << 30
    return max(soft - FD_HEADROOM, soft // 3)
#: Largest migration state: compact JSON, UTF-8. The handoff metadata limit is 16 KiB
#: (docs/protocol.md); the other 4 KiB carry the connection's own meta (client, pool...).
MAX_STATE = 12 * 1024
#: Seconds ``migrate`` waits for the client to take what the handler wrote.
FLUSH_TIMEOUT = 10.0
#: Meta keys a migrated connection always keeps (the rest may be trimmed to make room).
_ESSENTIAL_META = ("handoff_id", "client", "peer", "listener", "pool", "route")
#: compact JSON (ASCII): migration metadata, and states (which must also be finite)
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_COMPACT_STRICT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
#: A worker's peer channel socket: ``<its pid>.peer``, beside the dispatcher's channel.
PEER_SUFFIX = ".peer"
#: Seconds to open a channel to a peer worker (in the background).
PEER_CONNECT_TIMEOUT = 5.0
#: Seconds a direct migration whose ACCEPT could not reach its source waits for the
#: dispatcher to say whether that source process is gone (then it is served here).
ORPHAN_TIMEOUT = 5.0


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
        self._runtime: Worker | None = None

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


def connection_now(handoff: Handoff, worker: WorkerInfo, *,
                   limit: int = READ_LIMIT) -> Connection | None:
    """:func:`open_connection` without waiting, on CPython's selector loop: the transport
    at once, instead of connect_accepted_socket and its two turns of the loop waiting for
    connection_made (which still runs, scheduled, before any byte is read) -- a migrated
    connection resumes sooner. None where that is not possible (another loop, a socket
    that is not a stream)."""
    loop = asyncio.get_running_loop()
    make = getattr(loop, "_make_socket_transport", None)
    if make is None or _c_type(handoff.socket) & 0xF != _SOCK_STREAM:
        return None
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    if handoff.data:
        reader.feed_data(handoff.data)
    if handoff.socket.gettimeout() != 0.0:  # an AsyncChannel already made it non-blocking
        handoff.socket.setblocking(False)
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
    transport, protocol = await loop.connect_accepted_socket(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock=handoff.socket)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    decoded = handoff._meta   # (already decoded to look for "resume": not twice)
    return Connection(reader, writer, decoded if isinstance(decoded, dict) else None, worker,
                      raw_meta=handoff.raw_meta)


class _Peer:
    """Another worker of the pool, as the dispatcher last described it, and our channel
    to it once open."""

    __slots__ = ("ch", "id", "load", "path", "pid")

    def __init__(self, wid: int, pid: int, path: str, load: int) -> None:
        self.id = wid
        self.pid = pid
        self.path = path
        self.load = load
        self.ch: AsyncChannel | None = None


class Worker:
    """The worker's event-loop side: one channel, many handler tasks."""

    def __init__(self, app: App | None, info: WorkerInfo, channel: str, *, grace: float = 10.0,
                 app_error: str = "", resume: Resume | None = None) -> None:
        self.app = app
        self.resume = resume
        self.info = info
        self.address = channel
        self.grace = grace
        self.app_error = app_error
        self.ch: AsyncChannel | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.conns: dict[Connection, None] = {}   # insertion-ordered: oldest first
        self.stopping = asyncio.Event()
        self._migrate_all = ""
        self._signals = 0
        self._closed_unreported = 0
        self._flush_scheduled = False
        self._reports: list[dict[str, Any]] = []
        #: direct migration: our listener for peer workers, and the pool's other workers
        self._peer_listener: AsyncChannelListener | None = None
        self.peer_path = ""
        self._peers: dict[int, _Peer] = {}
        self._incoming: set[AsyncChannel] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._accepting_peers: asyncio.Task[None] | None = None
        #: direct migrations held while the dispatcher says whether their source lives
        self._orphans: dict[tuple[int, int], tuple[Handoff, Connection]] = {}
        #: handoffs are refused from this descriptor number on; we said we are full
        self._fd_mark = fd_mark()
        self._fd_full = False
        self._fd_refused = 0
        self._fd_capacity = 1 << 30
        self._fd_timer: asyncio.TimerHandle | None = None
        self._fd_logged = -1e9

    # -- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("worker %d: %s, draining (%d connection(s) running, grace %.1f s)",
                     self.info.id, signal.Signals(signum).name, len(self.tasks), self.grace)
            self.stopping.set()
        else:
            log.warning("worker %d: second signal, cancelling %d handler(s)", self.info.id,
                        len(self.tasks))
            for t in self.tasks:
                t.cancel()

    # -- reporting -------------------------------------------------------------------

    def _control(self, obj: dict[str, Any], *, soon: bool = False) -> None:
        if self.ch is not None:
            with contextlib.suppress(SockshareError):
                self.ch.send_control(obj, soon=soon)

    def _closed_one(self) -> None:
        # Reported in batches: with the next ACCEPTs (same write) or after REPORT_DELAY,
        # whichever comes first -- not one write, and one dispatcher wake-up, per close.
        self._closed_unreported += 1
        if self._fd_full:
            self._check_fds()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(REPORT_DELAY, self._flush_report, True)

    def _refuse_no_fds(self, h: Handoff) -> None:
        """``h``'s descriptor is past the mark: refuse it (our copy is closed, the sender
        keeps its own), and tell the dispatcher once that we are full."""
        fd = h.socket.fileno()
        h.reject(REJECT_NO_FDS)
        self._fd_refused += 1
        if not self._fd_full:
            self._fd_full = True
            now = time.monotonic()
            if now - self._fd_logged >= 10.0:
                log.warning("worker %d: descriptor %d reached the mark %d (RLIMIT_NOFILE - %d): "
                            "refusing handoffs until connections close (%d refused so far)",
                            self.info.id, fd, self._fd_mark, FD_HEADROOM, self._fd_refused)
                self._fd_logged = now
            self._control({"ev": "fds", "full": True}, soon=True)
            if self._fd_timer is None:
                self._fd_timer = asyncio.get_running_loop().call_later(0.1, self._fd_tick)

    def _check_fds(self) -> None:
        """Full: are there descriptors below the mark again? (How many are open: the
        /proc list where there is one, else the lowest free one, which ignores holes.)"""
        if not self._fd_full:
            return
        free = self._fd_mark - _open_fds()
        # how many connections it can hold: those it has, one per free descriptor (at
        # most what it could at the start: connections closing still count in conns)
        capacity = min(self._fd_capacity, len(self.conns) + free)
        if free > 0 and free >= min(FD_HEADROOM // 4, max(1, capacity // 4)):
            self._fd_full = False
            self._fd_capacity = capacity
            self._control({"ev": "fds", "full": False, "capacity": capacity}, soon=True)
            return
        if self._fd_timer is None:   # (no connection may close to call us again)
            self._fd_timer = asyncio.get_running_loop().call_later(0.1, self._fd_tick)

    def _fd_tick(self) -> None:
        self._fd_timer = None
        self._check_fds()

    def _queue_report(self, obj: dict[str, Any]) -> None:
        """A report that may wait as long as a close report (direct migrations)."""
        self._reports.append(obj)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(REPORT_DELAY, self._flush_report, True)

    def _flush_report(self, soon: bool = False) -> None:
        self._flush_scheduled = False
        n, self._closed_unreported = self._closed_unreported, 0
        reports, self._reports = self._reports, []
        for obj in reports:   # first: a connection that moved in may be among the closed
            self._control(obj, soon=soon)
        if n:
            self._control({"ev": "closed", "n": n, "active": len(self.tasks)}, soon=soon)

    # -- migration -------------------------------------------------------------------

    def migration_meta(self, conn: Connection, state: Any, started: float,
                       reason: str = "") -> bytes:
        """The handoff meta of a migrating connection, encoded (compact JSON, ASCII),
        within the 16 KiB meta limit."""
        previous = conn.meta.get("migration")
        count = previous.get("count", 0) if isinstance(previous, dict) else 0
        migration = {"from": self.info.id, "from_pid": self.info.pid,
                     "count": count + 1 if isinstance(count, int) else 1,
                     "started": started,
                     "reason": reason or conn.migration_reason or "handler"}
        meta = {k: v for k, v in conn.meta.items() if k not in ("resume", "attempt", "migration")}
        meta["migration"] = migration
        meta["resume"] = state
        raw = _COMPACT.encode(meta).encode()
        if len(raw) > MAX_META:
            meta = {k: meta[k] for k in (*_ESSENTIAL_META, "migration", "resume") if k in meta}
            raw = _COMPACT.encode(meta).encode()
            if len(raw) > MAX_META:
                raise StateError(f"migration state and connection metadata are over the "
                                 f"{MAX_META}-byte metadata limit")
        return raw

    async def migrate_out(self, conn: Connection, meta: bytes, unread: bytes) -> None:
        ch = self.ch
        if ch is None or ch.closed:
            raise MigrationRefused("the worker has no channel to the dispatcher")
        writer = conn.writer
        transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        if transport.is_closing():
            raise MigrationRefused("the connection is closing")
        # 1. everything written leaves the transport
        transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await writer.drain()
                while transport.get_write_buffer_size():
                    await asyncio.sleep(0.001)
        except TimeoutError:
            transport.set_write_buffer_limits()
            raise MigrationRefused(f"the client did not take what was written within "
                                   f"{FLUSH_TIMEOUT:.0f} s") from None
        except BaseException:
            transport.set_write_buffer_limits()
            raise
        # 2. stop reading; what is buffered (and not consumed) travels with the socket
        transport.pause_reading()
        data = unread + bytes(conn._buffer())
        raw_sock = transport.get_extra_info("socket")
        try:
            if len(data) > MAX_DATA:
                raise MigrationRefused(f"{len(data)} unread bytes are over the {MAX_DATA}-byte "
                                       f"limit of a handoff")
            # 3. a duplicate of the descriptor goes to the dispatcher; the transport keeps
            # the original until the answer
            dup = socket.socket(raw_sock.family, raw_sock.type, raw_sock.proto,
                                os.dup(raw_sock.fileno()))
        except BaseException:
            transport.set_write_buffer_limits()
            transport.resume_reading()
            raise
        requested = conn._requested_event is not None and conn._requested_event.is_set()
        if self._peers and not requested and not self.stopping.is_set():
            # the handler's own migration: straight to a peer worker, one hop instead of
            # two; if it says no (or dies before answering) the dispatcher gets a try
            peer = self._pick_peer()
            if peer is not None:
                outcome = await self._move_direct(peer, dup, meta, data)
                if outcome == "accepted":
                    conn._detached()
                    transport.abort()
                    log.debug("worker %d: %s migrated to worker %d", self.info.id,
                              conn.handoff_id, peer.id)
                    return
                if outcome == "gone":
                    conn._detached()
                    transport.abort()
                    raise MigrationAborted(f"worker {peer.id} did not answer before its channel "
                                           f"closed; the connection is no longer served here")
        try:
            ticket = await ch.send(dup, meta=meta, data=data)
        except (SockshareError, ValueError, OSError) as exc:
            dup.close()
            os.set_blocking(raw_sock.fileno(), False)
            transport.set_write_buffer_limits()
            transport.resume_reading()
            raise MigrationRefused(f"cannot hand the connection to the dispatcher: {exc}") from exc
        if ticket.state == "accepted":
            # 4. the target has it: close this process's descriptor only (no FIN, no RST)
            conn._detached()
            transport.abort()
            log.debug("worker %d: %s migrated", self.info.id, conn.handoff_id)
            return
        if ticket.socket is not None:
            ticket.socket.close()
        if ticket.state == "rejected":
            conn._requested.clear()
            os.set_blocking(raw_sock.fileno(), False)   # the receiver may have changed it
            transport.set_write_buffer_limits()
            transport.resume_reading()
            raise MigrationRefused(f"no worker took the connection: {ticket.reason or 'refused'}")
        conn._detached()
        transport.abort()
        raise MigrationAborted(f"the channel to the dispatcher broke mid-migration ({ticket.reason}); "
                               f"the connection is no longer served here")

    # -- direct migration: peer workers ----------------------------------------------

    def _pick_peer(self) -> _Peer | None:
        """The connected peer with the fewest connections (the dispatcher's last count,
        plus what we sent it since); ties rotate."""
        best: _Peer | None = None
        for p in self._peers.values():
            ch = p.ch
            if ch is not None and ch.usable and (best is None or p.load < best.load):
                best = p
        if best is not None:
            best.load += 1
            del self._peers[best.id]   # last in the rotation
            self._peers[best.id] = best
        return best

    async def _move_direct(self, peer: _Peer, dup: socket.socket, meta: bytes,
                           data: bytes) -> str:
        """Hand ``dup`` to ``peer``, acknowledged. ``"accepted"`` (dup closed), ``"back"``
        (rejected, or the peer went away before answering: dup is ours again) or
        ``"gone"`` (our end closed first: the peer may serve it, dup was closed).

        The dispatcher hears of it afterwards, in the batched reports: the source says
        ``moved_out``, the target ``moved_in``. Only a move still unanswered after
        REPORT_DELAY is announced (``moving``), so that the dispatcher's --timeout can
        kill a hung target: its channel then breaks and the connection comes back."""
        ch = peer.ch
        assert ch is not None
        try:
            [ticket] = ch.send_nowait([(dup, meta, data)], ack=True)
        except (SockshareError, ValueError, OSError) as exc:
            log.info("worker %d: direct migration to worker %d failed (%s); via the dispatcher",
                     self.info.id, peer.id, exc)
            return "back"
        key = [self.info.pid, ticket.id]
        announced = False

        def announce() -> None:
            nonlocal announced
            if ticket.state == "pending":
                announced = True
                self._control({"ev": "moving", "to": peer.id, "key": key})

        timer = asyncio.get_running_loop().call_later(REPORT_DELAY, announce)
        try:
            await ch.wait([ticket])
        finally:
            timer.cancel()
        if ticket.state == "accepted":
            self._queue_report({"ev": "moved_out", "to": peer.id, "key": key})
            return "accepted"
        if announced:
            self._queue_report({"ev": "move_back", "to": peer.id, "key": key})
        if ticket.state in ("rejected", "returned") and ticket.socket is not None:
            log.info("worker %d: worker %d %s the migration (%s); via the dispatcher",
                     self.info.id, peer.id, ticket.state, ticket.reason or "no reason")
            return "back"
        return "gone"

    def _set_peers(self, listed: Any) -> None:
        """The dispatcher's list of the pool's other workers that take migrations
        directly, ``[[id, pid, path, connections], ...]``: channels to new ones open in
        the background, those no longer listed close."""
        fresh: dict[int, tuple[int, str, int]] = {}
        if isinstance(listed, list):
            for item in listed:
                if (isinstance(item, list) and len(item) == 4 and isinstance(item[0], int)
                        and isinstance(item[1], int) and isinstance(item[2], str)
                        and isinstance(item[3], int) and item[0] != self.info.id):
                    fresh[item[0]] = (item[1], item[2], item[3])
        for wid, p in list(self._peers.items()):
            want = fresh.get(wid)
            if want is None or want[:2] != (p.pid, p.path):
                del self._peers[wid]
                self._close_peer(p)
        for wid, (pid, path, load) in fresh.items():
            known = self._peers.get(wid)
            if known is None:
                peer = self._peers[wid] = _Peer(wid, pid, path, load)
                self._bg(self._connect_peer(peer))
            else:
                known.load = load

    def _close_peer(self, p: _Peer) -> None:
        ch, p.ch = p.ch, None
        if ch is not None:
            self._bg(ch.aclose())   # waits for answers to what is in flight

    async def _connect_peer(self, p: _Peer) -> None:
        try:
            ch = await AsyncChannel.connect(p.path, name=f"peer:{self.info.id}",
                                            timeout=PEER_CONNECT_TIMEOUT)
        except (OSError, SockshareError) as exc:
            log.info("worker %d: no direct channel to worker %d (%s); migrations to it go "
                     "through the dispatcher", self.info.id, p.id, exc)
            return
        if self._peers.get(p.id) is not p or self.stopping.is_set():
            await ch.aclose()
            return
        p.ch = ch
        await ch.wait_closed()
        if p.ch is ch:
            p.ch = None
        await ch.aclose()

    def _open_peer_listener(self) -> None:
        """Listen for peer workers beside the dispatcher's channel (a path only: no
        peers for abstract or TCP channel addresses)."""
        if self.address.startswith(("@", "tcp://")) or not os.path.isabs(self.address):
            return
        path = os.path.join(os.path.dirname(self.address), f"{self.info.pid}{PEER_SUFFIX}")
        try:
            self._peer_listener = AsyncChannelListener.listen(path, name=f"worker:{self.info.id}")
        except (OSError, SockshareError) as exc:
            log.warning("worker %d: cannot listen for peer workers at %s (%s); migrations "
                        "go through the dispatcher", self.info.id, path, exc)
            return
        self.peer_path = path
        self._accepting_peers = self._bg(self._accept_peers(self._peer_listener))

    async def _accept_peers(self, listener: AsyncChannelListener) -> None:
        while True:
            try:
                ch = await listener.accept()
            except (ChannelError, OSError):
                return
            except SockshareError as exc:   # a bad handshake: that peer only
                log.warning("worker %d: refused a peer channel: %s", self.info.id, exc)
                continue
            if self._peer_listener is not listener:   # closed meanwhile
                await ch.aclose()
                return
            ch.on_activity = lambda ch=ch: self._on_peer_activity(ch)
            self._incoming.add(ch)
            self._bg(self._watch_peer(ch))

    async def _watch_peer(self, ch: AsyncChannel) -> None:
        await ch.wait_closed()
        self._incoming.discard(ch)
        await ch.aclose()

    def _on_peer_activity(self, ch: AsyncChannel) -> None:
        try:
            self._take(ch, from_peer=True)
            ch.received_controls()   # (peers send none)
        except Exception:   # never let it escape into the channel's reader
            log.exception("worker %d: handling a peer worker's frames failed", self.info.id)

    def _orphaned(self, ch: AsyncChannel, held: list[tuple[Handoff, Connection]]) -> None:
        """Direct migrations whose ACCEPT could not reach the source: its end of the
        channel closed first. If the source *process* is gone, nobody else can serve
        them, so this worker may; if it lives, it may have taken them back, so this one
        must not. Held (not reading) while the dispatcher, which saw its workers exit,
        answers; closed without an answer within ORPHAN_TIMEOUT."""
        pid = ch.peer.pid
        keys = []
        for h, conn in held:
            cast(asyncio.Transport, conn.writer.transport).pause_reading()   # (before it ever read)
            key = (pid, h.id)
            self._orphans[key] = (h, conn)
            keys.append(key)
            self._control({"ev": "orphan", "pid": pid, "key": list(key)})
        asyncio.get_running_loop().call_later(ORPHAN_TIMEOUT, self._drop_orphans, keys)

    def _adopt(self, msg: dict[str, Any]) -> None:
        """The dispatcher's answer about a held direct migration."""
        key = msg.get("key")
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(x, int) for x in key)):
            return
        entry = self._orphans.pop((key[0], key[1]), None)
        if entry is None:
            return
        h, conn = entry
        if msg.get("dead") is True and not self.stopping.is_set() and self.ch is not None:
            log.info("worker %d: the source of %s died before our ACCEPT reached it; "
                     "served here", self.info.id, conn.handoff_id)
            cast(asyncio.Transport, conn.writer.transport).resume_reading()
            self._task(self._run(conn, True, self.ch, h))
        else:
            log.warning("worker %d: %s: our ACCEPT did not reach its source, which lives; "
                        "closed here", self.info.id, conn.handoff_id)
            conn.writer.transport.abort()

    def _drop_orphans(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            entry = self._orphans.pop(key, None)
            if entry is not None:
                entry[1].writer.transport.abort()

    def _moved_in(self, h: Handoff, conn: Connection) -> None:
        """Report a direct migration in (its latency measured here, as resume starts)."""
        mig = conn.meta.get("migration")
        mig = mig if isinstance(mig, dict) else {}
        started = mig.get("started")
        latency = time.monotonic() - started if isinstance(started, float) else None
        self._queue_report({"ev": "moved_in", "from": mig.get("from"),
                            "key": [mig.get("from_pid"), h.id], "latency": latency})

    def _bg(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._bg_done)
        return task

    def _bg_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %d: background task failed", self.info.id, exc_info=task.exception())

    async def _close_peers(self) -> None:
        self._drop_orphans(list(self._orphans))
        if self._accepting_peers is not None:   # (it waits on the listener's descriptor)
            self._accepting_peers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting_peers
            self._accepting_peers = None
        if self._peer_listener is not None:
            self._peer_listener.close()
            self._peer_listener = None
        for p in list(self._peers.values()):
            self._close_peer(p)
        self._peers.clear()
        for ch in list(self._incoming):
            self._bg(ch.aclose())
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)
        for t in list(self._background):
            t.cancel()

    def _request_migrations(self, n: int | None, reason: str) -> int:
        picked = 0
        for conn in list(self.conns):
            if n is not None and picked >= n:
                break
            if n is None:   # everyone: also those that become migratable later
                conn.request_migration(reason)
                picked += conn.migratable
            elif conn.migratable and not conn._migrating and not conn.migration_requested.is_set():
                conn.request_migration(reason)
                picked += 1
        return picked

    def _apply_control(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("cmd")
        reason = str(msg.get("reason") or "request")
        if cmd == "migrate":
            n = msg.get("n")
            count = n if isinstance(n, int) and n >= 0 else None
            picked = self._request_migrations(count, reason) if self.resume is not None else 0
            self._control({"ev": "migrate_ack", "n": picked, "req": msg.get("req")})
        elif cmd == "peers":
            self._set_peers(msg.get("peers"))
        elif cmd == "orphan":
            self._adopt(msg)
        elif cmd == "drain":
            if msg.get("migrate") and self.resume is not None:
                self._migrate_all = reason
            if not self.stopping.is_set():
                log.info("worker %d: the dispatcher asked to drain (%s)", self.info.id, reason)
                self.stopping.set()
        else:
            log.debug("worker %d: control message %r", self.info.id, msg)

    # -- handoffs --------------------------------------------------------------------

    def _resuming(self, h: Handoff, from_peer: bool = False) -> bool | None:
        """Whether ``h`` resumes a migrated connection; None if it was rejected (no
        resume handler here, or a plain connection from a peer worker)."""
        # (the dispatcher writes the key literally: no decoding for plain connections)
        try:
            resuming = b'"resume"' in h.raw_meta and "resume" in h.meta
        except SockshareError:  # metadata that is not a JSON object: a plain connection
            resuming = False
        if resuming and self.resume is None:
            h.reject("this worker's app has no resume handler")
            return None
        if from_peer and not resuming:
            h.reject("a peer worker may only hand over connections it migrates")
            return None
        return resuming

    async def _serve(self, h: Handoff, ch: AsyncChannel, from_peer: bool = False) -> None:
        """One handoff on its own (the path for loops without a synchronous transport)."""
        if self.stopping.is_set():
            h.reject("worker is shutting down")
            return
        resuming = self._resuming(h, from_peer)
        if resuming is None:
            return
        try:
            conn = await open_connection(h, self.info)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("worker %d: cannot set up handoff %d: %s", self.info.id, h.id, exc)
            if not h.answered:
                h.reject(f"cannot set up the connection: {exc}")
            return
        try:
            h.accept()
            ch.flush()
        except SockshareError as exc:  # the channel broke under us: the sender still has it
            log.warning("worker %d: could not accept handoff %d: %s", self.info.id, h.id, exc)
            conn.writer.transport.abort()
            return
        await self._run(conn, resuming, ch, h if from_peer else None)

    async def _run(self, conn: Connection, resuming: bool, ch: AsyncChannel,
                   from_peer: Handoff | None = None) -> None:
        """Serve an accepted connection once its ACCEPT has left (``from_peer``: the
        handoff, when a peer worker migrated it here directly)."""
        # The ACCEPT leaves before the app may write a byte: were this process killed
        # between the two, the dispatcher would take the connection back and give it
        # to another worker, and the client would hear from both.
        if ch.buffered:
            await ch.drain()
        if not ch.usable:
            if from_peer is not None:   # served here after all if its source is dead
                self._orphaned(ch, [(from_peer, conn)])
                return
            log.warning("worker %d: the channel closed before the ACCEPT of %s left",
                        self.info.id, conn.handoff_id)
            conn.writer.transport.abort()
            return
        if from_peer is not None:
            self._moved_in(from_peer, conn)
        state = conn.meta.pop("resume", None) if resuming else None
        conn._runtime = self
        conn._migratable = self.resume is not None
        self.conns[conn] = None
        if self._migrate_all:
            conn.request_migration(self._migrate_all)
        try:
            if resuming:
                assert self.resume is not None
                await self.resume(conn, state)
            else:
                assert self.app is not None
                await self.app(conn)
        except asyncio.CancelledError:
            log.info("worker %d: handler for %s cancelled", self.info.id, conn.handoff_id)
        except Exception:
            log.exception("worker %d: %s failed on %s", self.info.id,
                          "resume handler" if resuming else "handler", conn.handoff_id)
        finally:
            self.conns.pop(conn, None)
            if not conn.closed:
                await conn.close()
            if not conn.migrated:   # the dispatcher counted a migrated one out already
                self._closed_one()

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_activity(self) -> None:
        """The channel's read callback: start what arrived, apply controls."""
        try:
            if self.ch is not None:
                self._take(self.ch)
                for msg in self.ch.received_controls():
                    self._apply_control(msg)
        except Exception:   # never let it escape into the channel's reader
            log.exception("worker %d: handling the dispatcher's frames failed", self.info.id)

    def _take(self, ch: AsyncChannel, from_peer: bool = False) -> None:
        """Set up every handoff that arrived in this read (on the dispatcher's channel,
        or a peer worker's), accept them all, send the ACCEPTs (and pending reports, to
        the dispatcher) in one write, then start the handlers."""
        handoffs = ch.received()
        if not handoffs:
            return
        if self.stopping.is_set():
            for h in handoffs:
                with contextlib.suppress(SockshareError):
                    h.reject("worker is shutting down")
            return
        ready: list[tuple[Handoff, Connection, bool]] = []
        mark = self._fd_mark
        try:   # (a reject or accept raises once the channel is broken)
            for h in handoffs:
                if h.socket.fileno() >= mark:
                    self._refuse_no_fds(h)
                    continue
                resuming = self._resuming(h, from_peer)
                if resuming is None:
                    continue
                try:
                    conn = connection_now(h, self.info)
                except (OSError, RuntimeError, ValueError) as exc:
                    log.warning("worker %d: cannot set up handoff %d: %s", self.info.id, h.id, exc)
                    h.reject(f"cannot set up the connection: {exc}")
                    continue
                if conn is None:   # no synchronous transport here: the general path
                    self._task(self._serve(h, ch, from_peer))
                    continue
                ready.append((h, conn, resuming))
            if not ready:
                return
            for h, _conn, _resuming in ready:
                h.accept()
            if not from_peer and (self._closed_unreported or self._reports):
                self._flush_report(soon=True)   # rides along with the ACCEPTs
            ch.flush()
        except SockshareError as exc:  # the channel broke under us: the sender has them
            log.warning("worker %d: could not accept %d handoff(s): %s", self.info.id,
                        len(handoffs), exc)
            if from_peer and ready:   # unless the sender is dead: ask
                self._orphaned(ch, [(h, conn) for h, conn, _resuming in ready])
                return
            for _h, conn, _resuming in ready:   # before they read a byte (next loop turn)
                conn.writer.transport.abort()
            return
        for h, conn, resuming in ready:
            self._task(self._run(conn, resuming, ch, h if from_peer else None))

    # -- life ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.ch = await AsyncChannel.connect(self.address, name=f"worker:{self.info.id}")
        except (OSError, SockshareError) as exc:
            log.error("worker %d: cannot connect to the dispatcher at %s: %s", self.info.id,
                      self.address, exc)
            return 1
        ch = self.ch
        if self.app is None:
            return await self._fail(ch)
        if self.resume is not None:
            self._open_peer_listener()
        hello: dict[str, Any] = {"ev": "hello", "resume": self.resume is not None,
                                 "pid": self.info.pid, "peer": self.peer_path or None}
        if self._fd_mark < 1 << 30:
            # connections it can hold before the mark, one descriptor each
            self._fd_capacity = max(1, self._fd_mark - _open_fds())
            hello["capacity"] = self._fd_capacity
        self._control(hello)
        # handoffs start, and controls apply, in the read callback: no task hop, and no
        # task woken per read
        ch.on_activity = self._on_activity
        receiver = loop.create_task(ch.wait_closed())
        stop = loop.create_task(self.stopping.wait())
        await asyncio.wait({receiver, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not self.stopping.is_set():
            log.info("worker %d: the dispatcher closed the channel; finishing %d connection(s)",
                     self.info.id, len(self.tasks))
            self.stopping.set()
        else:
            self._control({"ev": "draining"})
            if self._migrate_all:
                n = self._request_migrations(None, self._migrate_all)
                log.info("worker %d: asked %d connection(s) to migrate (%s)", self.info.id, n,
                         self._migrate_all)
        await self._drain()
        await self._close_peers()
        self._flush_report()
        for t in (receiver, stop):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, SockshareError, OSError):
            await ch.aclose()
        log.info("worker %d (pid %d) stopped", self.info.id, self.info.pid)
        return 0

    async def _drain(self) -> None:
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=self.grace)
            if pending:
                log.warning("worker %d: %d handler(s) still running after %.1f s: cancelled",
                            self.info.id, len(pending), self.grace)
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=1.0)

    async def _fail(self, ch: AsyncChannel) -> int:
        reason = f"the app cannot be loaded: {self.app_error}"
        self._control({"ev": "fatal", "reason": reason})
        # whatever the dispatcher sent before it read "fatal" goes back with the reason
        with contextlib.suppress(TimeoutError, ChannelError):
            async with asyncio.timeout(0.2):
                async for h in ch:
                    h.reject(reason)
        with contextlib.suppress(TimeoutError, SockshareError, OSError):
            await ch.aclose()
        return EXIT_APP_ERROR


def load_app(spec: str) -> App:
    """Import ``module:callable``; the callable takes a :class:`Connection`."""
    from sockshare.server._policy import load_callable

    func = load_callable(spec)

    if inspect.iscoroutinefunction(func):
        return func

    async def call(conn: Connection) -> None:
        result = func(conn)
        if inspect.isawaitable(result):
            await result

    return call


def resume_spec(app: str, resume: str | None) -> str | None:
    """Which resume handler goes with ``app``: ``resume`` if given (``"-"``: none), else
    the convention -- ``resume`` beside the handler (``myapp:handle`` -> ``myapp:resume``,
    ``myapp:api.handle`` -> ``myapp:api.resume``)."""
    if resume is not None:
        return None if resume in ("", "-", "none") else resume
    module, sep, attr = app.partition(":")
    if not sep:
        return None
    parts = attr.split(".")
    parts[-1] = "resume"
    return f"{module}:{'.'.join(parts)}"


def load_resume(app: str, resume: str | None) -> Resume | None:
    """Import the resume handler of ``app`` (None when the app has none). An explicit
    ``resume`` that cannot be imported raises; a missing conventional one is None."""
    from sockshare.server._policy import load_callable

    spec = resume_spec(app, resume)
    if spec is None:
        return None
    try:
        func = load_callable(spec)
    except (ImportError, AttributeError, TypeError):
        if resume is not None:
            raise
        return None
    if inspect.iscoroutinefunction(func):
        return func

    async def call(conn: Connection, state: Any) -> None:
        result = func(conn, state)
        if inspect.isawaitable(result):
            await result

    return call


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sockshare.server._worker",
                                description="A sockshare Python worker (started by the dispatcher).")
    p.add_argument("--app", required=True, help="module:callable, async def handle(conn)")
    p.add_argument("--resume", default=None,
                   help="module:callable, async def resume(conn, state) (default: resume beside "
                        "the app's handler, if there is one; '-': none)")
    p.add_argument("--channel", default=os.environ.get("SOCKSHARE_CHANNEL"),
                   help="the dispatcher's channel address (default: $SOCKSHARE_CHANNEL)")
    p.add_argument("--id", type=int, default=int(os.environ.get("SOCKSHARE_WORKER_ID", "0")))
    p.add_argument("--pool", default=os.environ.get("SOCKSHARE_POOL", "default"))
    p.add_argument("--generation", type=int,
                   default=int(os.environ.get("SOCKSHARE_GENERATION", "0")))
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    info = WorkerInfo(args.id, os.getpid(), args.generation, args.pool)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker:{info.id}[{info.pid}] %(name)s: %(message)s")
    if not args.channel:
        log.error("no channel address: give --channel or set SOCKSHARE_CHANNEL")
        return 2
    app: App | None = None
    resume: Resume | None = None
    error = ""
    try:
        app = load_app(args.app)
        resume = load_resume(args.app, args.resume)
    except Exception as exc:
        app = None
        error = f"{args.app}: {type(exc).__name__}: {exc}"
        log.error("worker %d: %s", info.id, error)
    worker = Worker(app, info, args.channel, grace=args.grace, app_error=error, resume=resume)
    return asyncio.run(worker.run())


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: apps import the exception
    # classes from sockshare.server._worker, and they must be the ones raised here.
    import importlib

    sys.exit(importlib.import_module("sockshare.server._worker").main())
