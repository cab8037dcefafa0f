"""The worker runtime: one process, one channel to the dispatcher, many handler tasks.

Started by the dispatcher as ``python -m sockshare.server.worker --app module:callable
--channel ADDRESS --id N`` (:mod:`sockshare.server.worker` calls :func:`main`;
``SOCKSHARE_CHANNEL`` / ``SOCKSHARE_WORKER_ID`` work too). The handler API it serves is
in ``_handler``; direct migration between workers in ``_peers``.

Life of a worker (:meth:`Worker.run`):

1. import the app (``async def handle(conn: Connection) -> None``) and its *resume*
   handler (``async def resume(conn, state)``: ``--resume module:callable``, or by
   convention ``resume`` next to ``handle`` in the same module: :func:`resume_spec`), then
   connect an :class:`~sockshare.AsyncChannel` to the dispatcher, HELLO name ``worker:N``,
   and say what it can do: ``{"ev": "hello", "resume": true|false, "pid", "peer"}``. If the
   app cannot be imported the worker still connects, tells the dispatcher
   (``{"ev": "fatal"}``), rejects whatever was already sent to it with the reason and
   exits with status 3 (:data:`EXIT_APP_ERROR`): the dispatcher re-dispatches and
   restarts it with backoff.
2. for each handoff (:meth:`Worker.take`, called from the channel's read callback: no
   task hop): build a :class:`~sockshare.server.Connection` (a StreamReader that already
   holds the pre-read bytes, then the transport on the socket); only then ACCEPT the
   handoff, and the ACCEPT is written out before the app runs or the transport reads a
   byte (a worker killed right after its app wrote to the client, or after it read the
   request, must not have the connection re-dispatched: docs/protocol.md, 5.3). A
   handoff whose connection cannot be set up is REJECTed with a reason, and the
   dispatcher gives it to another worker. A handoff whose meta carries ``"resume"`` is a
   connection *migrated* from another worker: ``resume(conn, state)`` runs instead of
   ``handle(conn)``.
3. run the app as a task (:meth:`Worker._run`). An exception in the app is logged, the
   connection closed; the worker goes on. Closed connections are reported to the
   dispatcher in CONTROL frames, ``{"ev": "closed", "n": k}``, batched per
   :data:`REPORT_DELAY` or riding along with the next ACCEPTs, so least-connections and
   ``max_conns`` see real numbers (a migrated connection is not: the dispatcher counts it
   out when the target accepts it).
   Descriptors: the hello says how many connections fit below RLIMIT_NOFILE -
   :data:`FD_HEADROOM` (``"capacity"``); a handoff whose descriptor lands past that mark
   is REJECTed with :data:`REJECT_NO_FDS` instead of risking a truncated read
   (MSG_CTRUNC ends the channel), and ``{"ev": "fds", "full": true|false, "capacity": n}``
   tells the dispatcher when to stop and start again.
4. SIGTERM or SIGINT (or the dispatcher going away, or its ``{"cmd": "drain"}``):
   ``{"ev": "draining"}``, every new handoff is rejected (:data:`REJECT_STOPPING`),
   running handlers finish or move for as long as that makes progress, ``--grace``
   seconds without progress at most (:meth:`Worker._drain`); what is left is cancelled
   and counted (``{"ev": "unmoved"}``), the channel closed, exit status 0. A second
   signal cancels the handlers at once. At start the soft RLIMIT_NOFILE is raised to
   the hard limit (``_rlimit``).

``accept = "worker"`` (a web app's pool): the worker also accepts on the listening
descriptors it inherited (``$SOCKSHARE_LISTEN``, :func:`_inherited_listeners`) once its
hello is out, counts those connections in with ``{"ev": "opened", "n": k}`` in the same
batched reports as the closes (ahead of them), and stops accepting before anything else
when it drains (``WebServer.listen``; docs/server.md, "Accept modes").

Migrating out (:meth:`Worker.migrate_out`, behind ``conn.migrate(state)``; docs/server.md,
"Moving live connections"). Detaching a connection from asyncio takes these steps, in
this order, each one undoable until the target answers:

* flush: every byte the handler wrote leaves the transport (``drain`` with a high-water
  mark of 0, then the transport's write buffer is checked empty);
* pause reading, and copy what the StreamReader holds but the handler did not consume
  (plus ``unread``, bytes the handler took but wants to give back);
* duplicate the descriptor and hand the duplicate over, acknowledged, with meta
  ``{"resume": state, "migration": {...}, ...}`` (:meth:`Worker.migration_meta`) and the
  unread bytes as the handoff's pre-read data: straight to a peer worker for the
  handler's own migrations (``_peers``), else to the dispatcher, which forwards it to
  another worker and answers only once that worker ACCEPTed (the answers are chained);
* ACCEPT: the transport is closed here -- that closes only this process's descriptor,
  the connection lives on in the target, so no FIN and no RST reach the client.
  REJECT (no worker could take it): the duplicate is closed, reading resumes, and
  ``MigrationRefused`` tells the handler the connection is still its own. The channel
  breaking before an answer (the dispatcher died): the target may already serve the
  connection, so this side must not: its copies are closed and ``MigrationAborted`` is
  raised. Either way exactly one process serves it.

The dispatcher asks for migrations (rebalancing, reload, upgrade, ``sockshare migrate``)
with ``{"cmd": "migrate", "n": k}`` or ``{"cmd": "drain", "migrate": true}``: the runtime
calls ``request_migration`` on connections that are migratable
(:meth:`Worker._request_migrations`).
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
import time
from collections.abc import Coroutine
from typing import Any, ClassVar, cast

from sockshare._aio import AsyncChannel
from sockshare._channel import Handoff
from sockshare._errors import ChannelError, RemoteProtocolError, SockshareError
from sockshare._state import Ticket
from sockshare.protocol import MAX_DATA, MAX_META
from sockshare.server._feedin import ENV_FEEDERS, FeedIn
from sockshare.server._gc import MoveBurst, freeze_for_exit, freeze_startup
from sockshare.server._handler import (
    MIGRATION_WINDOW,
    App,
    Connection,
    MigrationAborted,
    MigrationRefused,
    MoveWindow,
    Resume,
    StateError,
    WorkerInfo,
    answer_first,
    connection_now,
    open_connection,
)
from sockshare.server._messages import (
    Closed,
    Drain,
    Draining,
    Fatal,
    Fds,
    Fed,
    HandlerTable,
    Hello,
    Message,
    Migrate,
    MigrateAck,
    Opened,
    OrphanAnswer,
    Peers,
    Recycle,
    Report,
    UnknownMessage,
    Unmoved,
    WebCounts,
    decode,
    encode,
)
from sockshare.server._peers import PEER_WAIT, Move, Orphan, PeerMigration
from sockshare.server._platform import WINDOWS, close_fd, dup_fd, run
from sockshare.server._rlimit import log_nofile
from sockshare.server._web import (
    KEEP_ALIVE_RESUME,
    Listening,
    Tally,
    WebAppError,
    WebServer,
    WebSettings,
    check_interface,
    detect_interface,
)

__all__ = [
    "EXIT_APP_ERROR",
    "FD_HEADROOM",
    "REJECT_NO_FDS",
    "REJECT_STOPPING",
    "REPORT_DELAY",
    "Worker",
    "fd_mark",
    "load_app",
    "load_resume",
    "main",
    "resume_spec",
]

log = logging.getLogger("sockshare.server.worker")

#: Seconds a close report may wait to ride along with the next ACCEPTs (least-conn
#: counts are that much behind at most).
REPORT_DELAY = 0.002
#: The same for a worker that accepts itself (``accept = "worker"``): its opened and
#: closed reports are the only writes to the dispatcher per connection, and at 2 ms they
#: cost both processes more than the connection's own work (a write and a wake-up each;
#: measured: 15% of the worker's CPU). Its own limits are enforced here, so the
#: dispatcher's counts may be that much behind (a handover flushes them first).
ACCEPT_REPORT_DELAY = 0.05
EXIT_APP_ERROR = 3
#: Descriptors a worker keeps free: one channel read may carry 64 (the dispatcher's
#: batch), and the kernel drops descriptors that do not fit (MSG_CTRUNC), which ends the
#: channel. A handoff whose descriptor lands past RLIMIT_NOFILE - FD_HEADROOM is refused
#: with REJECT_NO_FDS (the dispatcher gives it to another worker, and sends this one no
#: more until it says ``{"ev": "fds", "full": false}``).
FD_HEADROOM = 80
REJECT_NO_FDS = "worker out of file descriptors"
#: The REJECT of every handoff once a worker drains: it takes nothing more (the
#: dispatcher and the feeders send it nothing more from the first one on, and give the
#: connection to another worker without counting an attempt: not the connection's fault).
REJECT_STOPPING = "worker is shutting down"
#: The REJECT of a peer worker's move that would take this one past its pool's
#: ``max_conns``: each source counts down its own copy of the room the dispatcher listed,
#: so several at once could overshoot; the source relays it (the dispatcher places it by
#: its counts, which hear of direct moves within milliseconds).
REJECT_FULL = "worker at max_conns"
#: Seconds ``migrate`` waits for the client to take what the handler wrote.
FLUSH_TIMEOUT = 10.0
#: Seconds between two looks at a drain's progress.
DRAIN_TICK = 0.25
#: Meta keys a migrated connection always keeps (the rest may be trimmed to make room).
_ESSENTIAL_META = ("handoff_id", "client", "peer", "listener", "pool", "route")
#: compact JSON (ASCII) of migration metadata
_COMPACT = json.JSONEncoder(separators=(",", ":"))


class _RefusedThere(MigrationRefused):
    """Refused by the dispatcher (no target could take it), which counts it."""


class _NoFds(MigrationRefused):
    """Refused here: no descriptor to duplicate the connection's (EMFILE, ENFILE)."""


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


class Worker:
    """The worker's event-loop side: one channel, many handler tasks."""

    def __init__(self, app: App | None, info: WorkerInfo, channel: str, *, grace: float = 10.0,
                 app_error: str = "", resume: Resume | None = None,
                 web: WebServer | None = None, max_conns: int | None = None) -> None:
        self.app = app
        #: the pool's max_conns: the most connections a peer's move may bring this one to
        #: (REJECT_FULL); accept = "worker": the web server's accept limit
        self._max_conns = max_conns
        #: an ASGI/WSGI app's server (``--interface asgi|wsgi``); None: a handler app
        self.web = web
        #: connections opened and closed, not yet reported (shared with the web server,
        #: which counts its own), and whether a report is due
        self._tally = web.tally if web is not None else Tally()
        if web is not None:
            web.on_tally = self._tallied
            web.on_max_requests = self._max_requests
            web.relay = self._relay_out
            web.worker_id = info.id
        self.resume = resume
        self.info = info
        self.address = channel
        self.grace = grace
        self.app_error = app_error
        self.ch: AsyncChannel | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.conns: dict[Connection, None] = {}   # insertion-ordered: oldest first
        #: accepted by :meth:`take`, not in ``conns`` yet (their ``_run`` not started)
        self._starting = 0
        self.stopping = asyncio.Event()
        self._migrate_all = ""
        self._signals = 0
        self._report_delay = ACCEPT_REPORT_DELAY if web is not None and web.listening else REPORT_DELAY
        self._reports: list[Report] = []
        #: direct migration: our listener and channels for peer workers, held orphans
        self.peers = PeerMigration(self)
        #: --dispatchers N: channels from the feeders (``_feedin``)
        self.feed = FeedIn(info.id, self.take) if os.environ.get(ENV_FEEDERS) == "1" else None
        #: handoffs are refused from this descriptor number on; we said we are full
        self._fd_mark = fd_mark()
        self._fd_full = False
        self._fd_refused = 0
        self._fd_capacity = 1 << 30
        self._fd_timer: asyncio.TimerHandle | None = None
        self._fd_logged = -1e9
        self._startup_failed = False
        #: migrations under way (``migrate_out``) and done (the connection left): a
        #: drain's progress
        self._in_flight = 0
        self._moves = 0
        #: not yet reported (``Unmoved``): migrations refused here, connections a drain
        #: could not move and closed
        self._refused_here = 0
        #: connections refused for want of descriptors while others were in flight: one
        #: is asked again each time a migration ends (conn -> why it was asked)
        self._fd_retry: dict[Connection, str] = {}
        self._migration_slots = MoveWindow(MIGRATION_WINDOW)
        self._unmoved_closed = 0
        #: handoffs to the dispatcher queued in this turn of the loop (``_hand_over``)
        self._out_batch: list[tuple[socket.socket, bytes, bytes, asyncio.Future[Ticket]]] = []
        #: full garbage collections wait while connections move (``_gc``)
        self.gc_hold = MoveBurst()

    def _stop(self) -> None:
        """Begin to leave: no full garbage collection from now on (MoveBurst.retire)."""
        self.gc_hold.retire()
        self.stopping.set()

    # -- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        self._stop_accepting()
        if self._signals == 1:
            log.info("worker %d: %s, draining (%d connection(s) running, grace %.1f s)",
                     self.info.id, signal.Signals(signum).name, len(self.tasks), self.grace)
            self._stop()
        else:
            log.warning("worker %d: second signal, cancelling %d handler(s)", self.info.id,
                        len(self.tasks))
            for t in self.tasks:
                t.cancel()

    # -- reporting -------------------------------------------------------------------

    def control(self, msg: Message, *, soon: bool = False) -> None:
        if self.ch is not None:
            with contextlib.suppress(SockshareError):
                self.ch.send_control(encode(msg), soon=soon)

    def _stop_accepting(self) -> None:
        """accept = "worker": a drain stops accepting first, before anything moves."""
        if self.web is not None:
            self.web.stop_accepting()

    def _closed_one(self) -> None:
        self._tally.closed += 1
        self._tallied()

    def _tallied(self) -> None:
        """Connections were counted in or out (:class:`Tally`: the web server counts its
        own and calls this only when no report is due yet, or descriptors are watched).
        Reported in batches: with the next ACCEPTs (same write) or after the report
        delay, whichever comes first -- not one write, and one dispatcher wake-up, per
        connection; a connection accepted here is counted in ahead of its close."""
        if self._fd_full and self._fd_timer is None and self._tally.closed:
            # look again soon, not on every close: each look lists /proc/self/fd
            self._fd_timer = asyncio.get_running_loop().call_later(0.01, self._fd_tick)
        if not self._tally.due:
            self._tally.due = True
            asyncio.get_running_loop().call_later(self._report_delay, self._flush_report, True)

    async def _relay_out(self, dup: socket.socket, meta: bytes, data: bytes) -> str:
        """Hand ``dup`` (a duplicate of a connection's socket) to the dispatcher, which
        gives it to another worker: ``"accepted"``, ``"rejected"`` (it stays ours) or
        ``"gone"`` (the channel broke before the answer: it may be served there)."""
        ch = self.ch
        if ch is None or ch.closed:
            dup.close()
            return "rejected"
        self.gc_hold.moved()
        peer = self.peers.pick() if self.peers.peers else None
        if peer is not None:   # straight to a peer worker (as ``_migrate_out``)
            outcome = await self.peers.move(peer, dup, meta, data)
            if outcome is Move.ACCEPTED:
                return "accepted"
            if outcome is Move.GONE:
                return "gone"
        try:
            ticket = await self._hand_over(ch, dup, meta, data)
        except (SockshareError, ValueError, OSError) as exc:
            dup.close()
            return f"rejected: {exc}"
        if ticket.state == "accepted":
            return "accepted"
        if ticket.socket is not None:
            ticket.socket.close()
        return f"rejected: {ticket.reason or 'refused'}" if ticket.state == "rejected" else "gone"

    async def _hand_over(self, ch: AsyncChannel, sock: socket.socket, meta: bytes,
                         data: bytes) -> Ticket:
        """Hand ``sock`` to the dispatcher, acknowledged, and wait for the answer: what
        ``ch.send`` does, but batched -- the handoffs queued in one turn of the loop leave
        together at its end (``send_nowait``: up to 64 in a frame, one write), so a
        drain that starts a hundred moves at once costs the three processes a few writes
        and reads, not a hundred each. Raises what ``send_nowait`` raises (the socket is
        still the caller's then)."""
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        batch = self._out_batch
        batch.append((sock, meta, data, fut))
        if len(batch) == 1:
            asyncio.get_running_loop().call_soon(self._send_out_batch, ch)
        elif len(batch) == MIGRATION_WINDOW:
            # a window's worth (no more moves can join it before answers come) leaves
            # now, not after every other task woken in this turn: a drain that wakes
            # 10,000 WebSockets at once used to send nothing until all of them had set
            # up their move (seconds on a saturated machine, which the dispatcher took
            # for a drain without progress); now the first moves go while the others
            # are being set up
            try:
                self._send_out_batch(ch)
            except Exception:   # (a bug: our future has it too, and raises it below)
                log.exception("worker %d: sending a batch of handoffs failed", self.info.id)
        ticket = await fut
        await ch.wait([ticket])
        return ticket

    def _send_out_batch(self, ch: AsyncChannel) -> None:
        batch, self._out_batch = self._out_batch, []
        live = [(sock, meta, data, fut) for sock, meta, data, fut in batch if not fut.done()]
        for sock, _meta, _data, fut in batch:
            if fut.done():   # (its move was cancelled before it left: still ours)
                sock.close()
        if not live:
            return
        if self._reports or self._tally.closed or self._tally.opened:
            # counted in before counted out (see migrate_out): the reports first, in the
            # same write
            self._flush_report(soon=True)
        try:
            tickets = ch.send_nowait([(sock, meta, data) for sock, meta, data, _fut in live])
        except Exception as exc:
            if not isinstance(exc, (SockshareError, ValueError, OSError)):
                # (a bug: still, no move waits forever for an answer)
                for _sock, _meta, _data, fut in live:
                    fut.set_exception(MigrationRefused(f"cannot hand over: {exc!r}"))
                raise
            if len(live) == 1 or not ch.usable:
                for _sock, _meta, _data, fut in live:
                    fut.set_exception(exc)
                return
            for sock, meta, data, fut in live:   # (one of them cannot go: that one only)
                try:
                    [ticket] = ch.send_nowait([(sock, meta, data)])
                except (SockshareError, ValueError, OSError) as one:
                    fut.set_exception(one)
                else:
                    fut.set_result(ticket)
            return
        for ticket, (_sock, _meta, _data, fut) in zip(tickets, live, strict=True):
            fut.set_result(ticket)

    def _web_counts(self) -> WebCounts | None:
        if self.web is None:
            return None
        c = self.web.counts
        return WebCounts(c["handed_over"], c["ws_migrated_out"], c["ws_migrated_in"],
                         c["handover_refused"] + c["ws_refused"], c["ws_closed_1012"])

    async def _report_web_counts(self) -> None:
        """The web counters (status, metrics), once a second when they changed."""
        last = self._web_counts()
        while True:
            await asyncio.sleep(1.0)
            now = self._web_counts()
            if now != last and now is not None:
                self.control(now)
                last = now

    def _max_requests(self) -> None:
        assert self.web is not None
        log.info("worker %d: served %d requests (--max-requests): asking to be replaced",
                 self.info.id, self.web.requests)
        self.control(Recycle("max-requests"))

    def _full(self, open_now: int) -> bool:
        """At the pool's ``max_conns`` with ``open_now`` connections (a peer's move is
        refused: ``REJECT_FULL``)."""
        return self._max_conns is not None and open_now >= self._max_conns

    def _refuse_no_fds(self, h: Handoff) -> None:
        """``h``'s descriptor is past the mark: refuse it (our copy is closed, the sender
        keeps its own), and tell the dispatcher once that we are full."""
        fd = h.socket.fileno()
        h.reject(REJECT_NO_FDS)
        self._fd_refused += 1
        if not self._fd_full:
            self._fd_full = self._tally.watch = True
            now = time.monotonic()
            if now - self._fd_logged >= 10.0:
                log.warning("worker %d: descriptor %d reached the mark %d (RLIMIT_NOFILE - %d): "
                            "refusing handoffs until connections close (%d refused so far)",
                            self.info.id, fd, self._fd_mark, FD_HEADROOM, self._fd_refused)
                self._fd_logged = now
            self.control(Fds(full=True), soon=True)
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
            self._fd_full = self._tally.watch = False
            self._fd_capacity = capacity
            self.control(Fds(full=False, capacity=capacity), soon=True)
            return
        if self._fd_timer is None:   # (no connection may close to call us again)
            self._fd_timer = asyncio.get_running_loop().call_later(0.1, self._fd_tick)

    def _fd_tick(self) -> None:
        self._fd_timer = None
        self._check_fds()

    def queue_report(self, msg: Report) -> None:
        """A report that may wait as long as a close report (direct migrations)."""
        self._reports.append(msg)
        if not self._tally.due:
            self._tally.due = True
            asyncio.get_running_loop().call_later(REPORT_DELAY, self._flush_report, True)

    def _flush_report(self, soon: bool = False) -> None:
        tally = self._tally
        tally.due = False
        n, tally.closed = tally.closed, 0
        reports, self._reports = self._reports, []
        if tally.opened:   # (first: counted in before counted out)
            reports.insert(0, Opened(tally.opened))
            tally.opened = 0
        if self._refused_here or self._unmoved_closed:
            reports.append(Unmoved(self._refused_here, self._unmoved_closed))
            self._refused_here = self._unmoved_closed = 0
        for msg in reports:   # first: a connection that moved in may be among the closed
            self.control(msg, soon=soon)
        if n:
            self.control(Closed(n, active=len(self.tasks)), soon=soon)

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
        """Move ``conn`` to another worker (see the module docstring); counted as in
        flight meanwhile (a drain waits for it), and as refused here when it is refused
        before anything left this process."""
        self._in_flight += 1
        self.gc_hold.moved()
        requested = conn.migration_requested.is_set()
        held_fd = True   # (a duplicate of the descriptor: freed now)
        try:
            async with self._migration_slots:   # (MIGRATION_WINDOW at once)
                await self._migrate_out(conn, meta, unread)
        except _RefusedThere:
            raise   # (the dispatcher counted it: migrations_refused)
        except MigrationRefused as exc:
            # the request is answered: a handler that goes on (``except
            # MigrationRefused: continue``) must wait for its next line, not be
            # interrupted again at once -- which, with nothing awaited in between, spins
            # and starves the event loop (every migration in flight with it)
            conn._requested.clear()
            if isinstance(exc, _NoFds):
                held_fd = False
                if requested and self._in_flight > 1:
                    # out of descriptors because so many migrations are in flight: each
                    # one that ends frees one, and gives this one another try
                    self._fd_retry[conn] = conn.migration_reason or "request"
            if conn not in self._fd_retry:   # (one that tries again is not refused yet)
                self._refused_here += 1
                self._schedule_report()
            raise
        except MigrationAborted:
            self._moves += 1   # (gone from here: progress too)
            raise
        else:
            self._moves += 1
        finally:
            self._in_flight -= 1
            if held_fd and self._fd_retry:
                self._retry_one(conn)

    def _retry_one(self, done: Connection) -> None:
        """A migration ended (a descriptor is free): ask one connection refused for want
        of descriptors to move again."""
        for conn, reason in list(self._fd_retry.items()):
            if conn is done or conn._migrating:
                continue   # (still unwinding its refusal: the next one)
            del self._fd_retry[conn]
            if not conn.closed and conn.migratable:
                conn.request_migration(reason)
                return

    def _schedule_report(self) -> None:
        if not self._tally.due:
            self._tally.due = True
            asyncio.get_running_loop().call_later(REPORT_DELAY, self._flush_report, True)

    async def _migrate_out(self, conn: Connection, meta: bytes, unread: bytes) -> None:
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
            try:
                fd = dup_fd(raw_sock.fileno())
            except OSError as exc:   # EMFILE / ENFILE: out of descriptors
                raise _NoFds(f"cannot duplicate the connection's descriptor: "
                                       f"{exc.strerror or exc}") from exc
            try:
                dup = socket.socket(raw_sock.family, raw_sock.type, raw_sock.proto, fd)
            except OSError as exc:
                close_fd(fd)
                raise MigrationRefused(f"cannot wrap the duplicated descriptor: {exc}") from exc
        except BaseException:
            transport.set_write_buffer_limits()
            transport.resume_reading()
            raise
        # 3b. from here the duplicate may leave: a mover cancelled now (an
        # ``asyncio.wait_for`` around ``migrate``) is cancelled once the answer is
        # applied -- the connection detached, or reading here again -- never in between
        move = asyncio.ensure_future(self._send_out(
            conn, dup, transport=transport, raw_sock=raw_sock, ch=ch, meta=meta, data=data))
        try:
            await asyncio.shield(move)
        except asyncio.CancelledError:
            await answer_first(move)
            if not move.cancelled():
                move.exception()   # (a refusal: the cancellation is what the mover gets)
            raise

    async def _send_out(self, conn: Connection, dup: socket.socket, *, transport: asyncio.Transport,
                        raw_sock: Any, ch: AsyncChannel, meta: bytes, data: bytes) -> None:
        """:meth:`_migrate_out` once the duplicate is made: to a peer worker, or through
        the dispatcher; the connection detached, or reading here again."""
        if self.peers.peers:
            # straight to a peer worker the dispatcher listed (the handler's own
            # migration, or one it asked for: then the peers it lists are the targets
            # it chose -- for a reload, the new generation), one hop instead of two; if
            # it says no (or dies before answering) the dispatcher gets a try
            peer = self.peers.pick()
            if peer is not None:
                outcome = await self.peers.move(peer, dup, meta, data)
                if outcome is Move.ACCEPTED:
                    conn._detached()
                    transport.abort()
                    log.debug("worker %d: %s migrated to worker %d", self.info.id,
                              conn.handoff_id, peer.id)
                    return
                if outcome is Move.GONE:
                    conn._detached()
                    transport.abort()
                    raise MigrationAborted(f"worker {peer.id} did not answer before its channel "
                                           f"closed; the connection is no longer served here")
        try:
            # (the reports go first, in the same write: were this connection moved in
            # directly, the dispatcher must count it in before it counts it out)
            ticket = await self._hand_over(ch, dup, meta, data)
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
            raise _RefusedThere(f"no worker took the connection: {ticket.reason or 'refused'}")
        conn._detached()
        transport.abort()
        raise MigrationAborted(f"the channel to the dispatcher broke mid-migration ({ticket.reason}); "
                               f"the connection is no longer served here")

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

    def _apply_control(self, obj: dict[str, Any]) -> None:
        """A command from the dispatcher (``_messages``): to its handler in
        :attr:`_COMMANDS`; unknown or malformed ones are logged and ignored."""
        try:
            msg = decode(obj)
        except UnknownMessage:
            log.debug("worker %d: control message %r", self.info.id, obj)
            return
        except RemoteProtocolError as exc:
            log.warning("worker %d: ignored a control message: %s", self.info.id, exc)
            return
        if not self._COMMANDS.dispatch(self, msg):
            log.debug("worker %d: control message %r", self.info.id, obj)

    def _on_migrate(self, msg: Migrate) -> None:
        reason = msg.reason or "request"
        self.gc_hold.moved()   # (before the first one leaves: the set-up allocates too)
        if self.web is not None:   # idle keep-alive connections move
            picked = self.web.request_handover(msg.n, reason)
        else:
            picked = self._request_migrations(msg.n, reason) if self.resume is not None else 0
        self.peers.expect(picked)
        self.control(MigrateAck(picked, msg.req))

    def _on_peers(self, msg: Peers) -> None:
        self.peers.set_peers(msg.peers)

    def _on_orphan(self, msg: OrphanAnswer) -> None:
        self.peers.adopt(msg)

    def _on_drain(self, msg: Drain) -> None:
        reason = msg.reason or "request"
        self._stop_accepting()
        if msg.migrate and self.resume is not None:
            self._migrate_all = reason
        if msg.migrate and self.web is not None:
            self.web.handover_reason = reason
        if msg.migrate:
            self.gc_hold.moved()
        if not self.stopping.is_set():
            log.info("worker %d: the dispatcher asked to drain (%s)", self.info.id, reason)
            self._stop()

    #: What a worker does with each of the dispatcher's commands.
    _COMMANDS: ClassVar[HandlerTable[Worker]] = (HandlerTable()
                                                 .on(Migrate, _on_migrate)
                                                 .on(Peers, _on_peers)
                                                 .on(OrphanAnswer, _on_orphan)
                                                 .on(Drain, _on_drain))

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
        """One handoff on its own (the path for loops without a synchronous transport).
        Their transport reads as soon as it is made, so it is made only once the ACCEPT
        was written: a setup that fails then closes the connection (no REJECT)."""
        if self.stopping.is_set():
            h.reject(REJECT_STOPPING)
            return
        resuming = self._resuming(h, from_peer)
        if resuming is None:
            return
        try:
            h.accept()
            if ch is not self.ch and not from_peer:   # a feeder's: counted in first
                self.queue_report(self._fed(ch, 1))
            ch.flush()
        except SockshareError as exc:  # the channel broke under us: the sender still has it
            log.warning("worker %d: could not accept handoff %d: %s", self.info.id, h.id, exc)
            h.socket.close()
            return
        if ch.buffered:
            await ch.drain()
        if not ch.usable:   # (a peer's migration too: its source may have taken it back)
            log.warning("worker %d: the channel closed before the ACCEPT of handoff %d left",
                        self.info.id, h.id)
            h.socket.close()
            if ch is not self.ch and not from_peer:   # counted in by our "fed", out here
                self._closed_one()
            return
        try:
            conn = await open_connection(h, self.info)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("worker %d: cannot set up handoff %d: %s", self.info.id, h.id, exc)
            h.socket.close()
            if not from_peer:   # counted in by the ACCEPT (or "fed"): out again
                self._closed_one()
            return
        await self._run(conn, resuming, ch, h if from_peer else None)

    async def _run(self, conn: Connection, resuming: bool, ch: AsyncChannel,
                   from_peer: Handoff | None = None, held: bool = False, *,
                   starting: bool = False) -> None:
        """Serve an accepted connection once its ACCEPT has left (``from_peer``: the
        handoff, when a peer worker migrated it here directly; ``held``: its transport
        was paused by :meth:`take` until then; ``starting``: counted in ``_starting``
        until it is in ``conns``)."""
        # The ACCEPT leaves before the app may write a byte, or the transport read one:
        # were this process killed between the two, the dispatcher would take the
        # connection back and give it to another worker, and the client would hear from
        # both, or (its request read here) the other worker would wait for a request
        # that never comes.
        try:
            if ch.buffered:
                await ch.drain()
        finally:
            if starting:   # (no await from here to ``conns``: counted one way or the other)
                self._starting -= 1
        if not ch.usable:
            if from_peer is not None:   # served here after all if its source is dead
                self.peers.hold(ch, [(from_peer, conn)])
                return
            log.warning("worker %d: the channel closed before the ACCEPT of %s left",
                        self.info.id, conn.handoff_id)
            conn.writer.transport.abort()
            if ch is not self.ch:   # a feeder's: counted in by our "fed", out here
                self._closed_one()
            return
        if held:   # the ACCEPT is out: the connection may be read now
            cast(asyncio.Transport, conn.writer.transport).resume_reading()
        if from_peer is not None:
            self.peers.moved_in(from_peer, conn)
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
            self._fd_retry.pop(conn, None)
            if not conn.closed:
                await conn.close()
            if not conn.migrated:   # the dispatcher counted a migrated one out already
                self._closed_one()

    def _fed(self, ch: AsyncChannel, n: int) -> Fed:
        """The report that counts in ``n`` handoffs a feeder sent on ``ch`` (``_feedin``)."""
        return Fed(n, self.feed.channels.get(ch) if self.feed is not None else None)

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def serve_adopted(self, h: Handoff, conn: Connection) -> None:
        """Serve a held direct migration whose source died (see ``_peers``)."""
        assert self.ch is not None
        self._task(self._run(conn, True, self.ch, h))

    def _on_activity(self) -> None:
        """The channel's read callback: start what arrived, apply controls."""
        try:
            if self.ch is not None:
                self.take(self.ch)
                for msg in self.ch.received_controls():
                    self._apply_control(msg)
        except Exception:   # never let it escape into the channel's reader
            log.exception("worker %d: handling the dispatcher's frames failed", self.info.id)

    def take(self, ch: AsyncChannel, from_peer: bool = False) -> None:
        """Set up every handoff that arrived in this read (on the dispatcher's channel,
        or a peer worker's), accept them all, send the ACCEPTs (and pending reports, to
        the dispatcher) in one write, then start the handlers.

        A transport made here reads from the next turn of the loop on. Should the
        ACCEPTs stay queued (the channel's socket full: rare), the transports are
        paused until they are written (:meth:`_run`): a process killed meanwhile lost
        its ACCEPTs with it, the sender takes the connections back, and none of their
        bytes may have been read here."""
        handoffs = ch.received()
        if not handoffs:
            return
        if self.web is not None:
            self._take_web(ch, handoffs, self.web, from_peer)
            return
        if self.stopping.is_set():
            for h in handoffs:
                with contextlib.suppress(SockshareError):
                    h.reject(REJECT_STOPPING)
            return
        ready: list[tuple[Handoff, Connection, bool]] = []
        moved_in = False
        mark = self._fd_mark
        try:   # (a reject or accept raises once the channel is broken)
            for h in handoffs:
                if h.socket.fileno() >= mark:
                    self._refuse_no_fds(h)
                    continue
                if from_peer and self._full(len(self.conns) + self._starting + len(ready)):
                    h.reject(REJECT_FULL)
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
                moved_in = moved_in or resuming
            if moved_in:
                self.gc_hold.moved()
            if not ready:
                return
            for h, _conn, _resuming in ready:
                h.accept()
            if ch is not self.ch and not from_peer:
                # a feeder's: counted in with the next batch of reports (REPORT_DELAY: no
                # write to the dispatcher, no wake-up of it, per handoff), ahead of its close
                self.queue_report(self._fed(ch, len(ready)))
            elif not from_peer and (self._tally.closed or self._reports):
                # rides along with the ACCEPTs, after them (the dispatcher's compiled read
                # settles leading ACCEPTs and takes the reports that follow: one read)
                ch.queue_answers()
                self._flush_report(soon=True)
            ch.flush()
        except SockshareError as exc:  # the channel broke under us: the sender has them
            log.warning("worker %d: could not accept %d handoff(s): %s", self.info.id,
                        len(handoffs), exc)
            if from_peer and ready:   # unless the sender is dead: ask
                self.peers.hold(ch, [(h, conn) for h, conn, _resuming in ready])
                return
            for _h, conn, _resuming in ready:   # before they read a byte (next loop turn)
                conn.writer.transport.abort()
            return
        held = ch.buffered
        if held:   # (before the next turn of the loop, when the transports would read)
            for _h, conn, _resuming in ready:
                cast(asyncio.Transport, conn.writer.transport).pause_reading()
        self._starting += len(ready)   # (until each _run puts it in conns)
        for h, conn, resuming in ready:
            self._task(self._run(conn, resuming, ch, h if from_peer else None, held,
                                 starting=True))

    def _take_web(self, ch: AsyncChannel, handoffs: list[Handoff], web: WebServer,
                  from_peer: bool = False) -> None:
        """:meth:`take` for a web app: ACCEPT, and only once the ACCEPTs left, give each
        socket its transport (uvicorn's protocol then reads the request)."""
        if self.stopping.is_set():
            for h in handoffs:
                with contextlib.suppress(SockshareError):
                    h.reject(REJECT_STOPPING)
            return
        accepted: list[socket.socket] = []
        #: the ones to take (checked), then the ones taken: accepted and registered
        chosen: list[tuple[Handoff, dict[str, Any], Any]] = []
        taken: list[Handoff] = []
        moved_in = False
        mark = self._fd_mark
        try:
            for h in handoffs:
                if h.socket.fileno() >= mark:
                    self._refuse_no_fds(h)
                    continue
                why = web.refusal(h.data)
                if why is None and from_peer and b'"resume"' not in h.raw_meta:
                    why = "a peer worker may only hand over connections it migrates"
                if why is None and from_peer and self._full(web.open_connections + len(chosen)):
                    why = REJECT_FULL
                meta = h.meta
                resume = None
                if why is None and b'"resume"' in h.raw_meta:
                    resume = meta.get("resume")
                    meta = {k: v for k, v in meta.items() if k != "resume"}
                    if resume == KEEP_ALIVE_RESUME:   # moved between requests
                        resume = None
                    elif not (isinstance(resume, dict) and isinstance(resume.get("ws"), dict)
                              and web.ws_class is not None):
                        why = "this worker takes no such migrated connection"
                    else:
                        moved_in = True
                if why is not None:
                    h.reject(why)
                    continue
                chosen.append((h, meta, resume))
            for h, meta, resume in chosen:
                h.accept()   # (first: raised, the sender has the connection back)
                web.register(h.socket, meta, h.data, resume)
                accepted.append(h.socket)
                taken.append(h)
            if moved_in:
                self.gc_hold.moved()
            if not accepted:
                return
            # (a peer's: counted in once the ACCEPTs left, moved_in below)
            if not from_peer and ch is not self.ch:   # a feeder's: counted in with the next reports
                self.queue_report(self._fed(ch, len(accepted)))
            elif not from_peer and (self._tally.closed or self._reports or self._tally.opened):
                ch.queue_answers()   # (the ACCEPTs first, as in take)
                self._flush_report(soon=True)   # rides along with the ACCEPTs
            ch.flush()
            if not ch.usable:   # (the write failed: the sender never heard of them)
                raise ChannelError("the channel closed before the ACCEPTs left")
        except SockshareError as exc:  # the channel broke: the sender still has them
            log.warning("worker %d: could not accept %d handoff(s): %s", self.info.id,
                        len(handoffs), exc)
            if from_peer and chosen:
                # a peer worker's end closed before our ACCEPTs reached it: unless it is
                # dead, it may have taken them back -- ask the dispatcher (held, not
                # started: nothing read); counted in only if served
                self.peers.hold_orphans(ch, [
                    self._web_orphan(web, h, meta, resume, registered=i < len(taken))
                    for i, (h, meta, resume) in enumerate(chosen)])
                held = {id(h.socket) for h, _m, _r in chosen}
                for h in handoffs:
                    if id(h.socket) not in held:
                        h.socket.close()
                return
            for sock in accepted:
                fd = sock.fileno()
                sock.close()
                web.forget(fd)
            ours = {id(sock) for sock in accepted}
            for h in handoffs:   # the others are the sender's: our copies closed
                if id(h.socket) not in ours:
                    h.socket.close()
            return
        if ch.buffered:   # the ACCEPTs first, then the first byte to the client
            self._task(self._start_web_later(ch, web, accepted, chosen if from_peer else None))
            return
        if from_peer:   # counted in with the next reports: one for the read
            for h in taken:
                self.peers.arrived(h.id, h.meta)
        for sock in accepted:
            web.start(sock)

    def _web_orphan(self, web: WebServer, h: Handoff, meta: dict[str, Any], resume: Any,
                    *, registered: bool) -> Orphan:
        """A web app's direct migration whose ACCEPT did not reach its source: its
        socket waits, not started (nothing read), for the dispatcher's answer."""
        sock = h.socket

        def serve() -> None:
            if not registered:
                web.register(sock, meta, h.data, resume)
            self.peers.arrived(h.id, h.meta)
            web.start(sock)

        def drop() -> None:
            fd = sock.fileno()
            sock.close()
            if registered:   # (never counted in: moved_in is sent when it is served)
                web.forget(fd, counted=False)

        return Orphan(h, serve, drop)

    async def _start_web_later(self, ch: AsyncChannel, web: WebServer,
                               socks: list[socket.socket],
                               from_peer: list[tuple[Handoff, dict[str, Any], Any]] | None
                               ) -> None:
        """Start the connections once their ACCEPTs left (``from_peer``: a peer worker's
        migrations, held instead of closed if they cannot leave)."""
        with contextlib.suppress(SockshareError, OSError):
            await ch.drain()
        if (ch.buffered or not ch.usable) and from_peer is not None:
            self.peers.hold_orphans(ch, [self._web_orphan(web, h, meta, resume, registered=True)
                                         for h, meta, resume in from_peer])
            return
        if ch.buffered or not ch.usable:
            log.warning("worker %d: the channel closed before %d ACCEPT(s) left",
                        self.info.id, len(socks))
            for sock in socks:
                fd = sock.fileno()
                sock.close()
                web.forget(fd)   # (counted out: a feeder's was counted in by our "fed")
            return
        if from_peer is not None:
            for h, _meta, _resume in from_peer:
                self.peers.arrived(h.id, h.meta)
        for sock in socks:
            web.start(sock)

    # -- life ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if WINDOWS:
            # the dispatcher says drain on the channel; a console's Ctrl+C / Ctrl+Break
            # (which reach every process on the console) are the dispatcher's to handle
            for sig in (signal.SIGINT, getattr(signal, "SIGBREAK", signal.SIGINT)):
                signal.signal(sig, signal.SIG_IGN)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
            # (before the channel connects: the dispatcher signals connected workers only)
            loop.add_signal_handler(signal.SIGUSR1, reopen_log_files, self.info.id)
        if self.web is not None:   # lifespan startup, before the dispatcher hears of us
            failed = await self.web.startup()
            if failed:
                log.error("worker %d: %s", self.info.id, failed)
                self.app_error = failed
                self._startup_failed = True
        freeze_startup()   # (the app and its imports: never walked by a collection again)
        try:
            self.ch = await AsyncChannel.connect(self.address, name=f"worker:{self.info.id}")
        except (OSError, SockshareError) as exc:
            log.error("worker %d: cannot connect to the dispatcher at %s: %s", self.info.id,
                      self.address, exc)
            return 1
        ch = self.ch
        if (self.app is None and self.web is None) or self._startup_failed:
            return await self._fail(ch)
        if self.resume is not None or self.web is not None:
            self.peers.listen(self.address)
        if self.feed is not None:
            self.feed.listen(self.address, ch)
        capacity = None
        if self._fd_mark < 1 << 30:
            # connections it can hold before the mark, one descriptor each
            self._fd_capacity = capacity = max(1, self._fd_mark - _open_fds())
        # (a web app's worker takes keep-alive connections moved between requests)
        self.control(Hello(self.resume is not None or self.web is not None, self.info.pid,
                           self.peers.path or None, capacity))
        # handoffs start, and controls apply, in the read callback: no task hop, and no
        # task woken per read
        ch.on_activity = self._on_activity
        reporter = loop.create_task(self._report_web_counts()) if self.web is not None else None
        if self.web is not None and self.web.listening:
            # accept = "worker": from now on (the dispatcher knows us), up to max_conns
            # and the connections our descriptors allow
            limit = self._max_conns
            if capacity is not None:
                limit = capacity if limit is None else min(limit, capacity)
            self.web.listen(self.web.listening, self.info.pool, limit, self._fd_mark)
            self.web.start_accepting()
        receiver = loop.create_task(ch.wait_closed())
        stop = loop.create_task(self.stopping.wait())
        await asyncio.wait({receiver, stop}, return_when=asyncio.FIRST_COMPLETED)
        self._stop_accepting()
        if self.feed is not None:
            self.feed.stop_listening()
        if not self.stopping.is_set():
            log.info("worker %d: the dispatcher closed the channel; finishing %d connection(s)",
                     self.info.id, len(self.tasks))
            self._stop()
        else:
            self.control(Draining())
            if self._migrate_all or (self.web is not None and self.web.handover_reason):
                # (a reload lists the new generation just before it asks us to drain:
                # straight there from the first move, not through the dispatcher)
                await self.peers.wait_connected(PEER_WAIT)
                self.peers.expect(len(self.conns) + (len(self.web.state.connections)
                                                      if self.web is not None else 0))
            if self._migrate_all:
                n = self._request_migrations(None, self._migrate_all)
                log.info("worker %d: asked %d connection(s) to migrate (%s)", self.info.id, n,
                         self._migrate_all)
        await self._drain()
        if self.web is not None:
            await self.web.drain(self.grace)
            self._unmoved_closed += self.web.drain_closed   # (reported below: unmoved)
            await self.web.shutdown()
            if reporter is not None:
                reporter.cancel()
            counts = self._web_counts()
            if counts is not None and counts != WebCounts():
                self.control(counts)
        await self.peers.close()
        if self.feed is not None:
            await self.feed.close()
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
        """Wait for the handlers to finish or move, as long as they make progress:
        fewer of them, a migration in flight, or one that left since the last look.
        ``--grace`` bounds the time *without* progress: then what is left (handlers that
        cannot move: no resume handler, not migratable, or refused) is cancelled, closed
        and counted (``Unmoved``). A second signal cancels at once."""
        if not self.tasks:
            return
        loop = asyncio.get_running_loop()
        lowest = len(self.tasks)
        moves = self._moves
        quiet_since = loop.time()
        while self.tasks:
            left = quiet_since + self.grace - loop.time()
            if left <= 0:
                break
            await asyncio.wait(set(self.tasks), timeout=min(DRAIN_TICK, left))
            n = len(self.tasks)
            if n < lowest or self._in_flight or self._moves != moves:
                lowest, moves = min(lowest, n), self._moves
                quiet_since = loop.time()
        pending = set(self.tasks)
        if not pending:
            return
        log.warning("worker %d: %d handler(s) still running after %.1f s without progress "
                    "(none finished or moved): cancelled", self.info.id, len(pending), self.grace)
        self._unmoved_closed += sum(1 for c in self.conns if not c.closed)
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=1.0)

    async def _fail(self, ch: AsyncChannel) -> int:
        if self._startup_failed:
            reason = self.app_error
            self.control(Fatal(reason, startup=True))
        else:
            reason = f"the app cannot be loaded: {self.app_error}"
            self.control(Fatal(reason))
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
    p = argparse.ArgumentParser(prog="python -m sockshare.server.worker",
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
    p.add_argument("--max-conns", type=int, default=None,
                   help="the pool's max_conns: a peer worker's move past it is refused")
    p.add_argument("--log-level", default="info")
    p.add_argument("--interface", default="auto", choices=("auto", "asgi", "wsgi", "handler"))
    p.add_argument("--web", default=os.environ.get("SOCKSHARE_WEB", ""),
                   help="the pool's web settings, JSON (WebSettings; default: $SOCKSHARE_WEB)")
    p.add_argument("--log-config", default=None, help="a logging dictConfig file (JSON) or an "
                   "INI file for logging.config.fileConfig")
    return p


def reopen_log_files(worker_id: object = None) -> int:
    """SIGUSR1: close and reopen every file handler of this process's loggers (after
    logrotate moved the files: the handlers would go on writing to the moved ones).
    Returns how many were reopened."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values()
                if isinstance(lg, logging.Logger)]
    reopened = 0
    seen: set[int] = set()
    for lg in loggers:
        for h in lg.handlers:
            if not isinstance(h, logging.FileHandler) or id(h) in seen:
                continue
            seen.add(id(h))
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.close()
                    h.stream = None
                h.stream = h._open()
                reopened += 1
            except OSError as exc:   # (the directory went away, say: say so, go on)
                log.error("SIGUSR1: cannot reopen %s: %s", h.baseFilename, exc)
            finally:
                h.release()
    log.info("worker %s: SIGUSR1: %d log file(s) reopened", worker_id, reopened)
    return reopened


def _configure_logging(info: WorkerInfo, level: str, config: str | None) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker:{info.id}[{info.pid}] %(name)s: %(message)s")
    if config:
        from logging import config as logging_config

        if config.endswith(".json"):
            with open(config, encoding="utf-8") as f:
                logging_config.dictConfig(json.load(f))
        else:
            logging_config.fileConfig(config, disable_existing_loggers=False)


def _load_web(spec: str, interface: str, settings: WebSettings
              ) -> tuple[App | None, WebServer | None]:
    """Import ``spec`` and tell its interface: a handler app, or a web app's server."""
    from sockshare.server._policy import load_callable

    obj = load_callable(spec)
    if interface != "auto":
        check_interface(obj, interface)
    kind = detect_interface(obj) if interface == "auto" else interface
    if kind == "handler":
        return load_app(spec), None
    return None, WebServer(obj, kind, settings, on_tally=lambda: None)


#: accept = "worker": the listening descriptors this worker inherited, JSON (written by
#: the dispatcher's ``Supervisor.listen_fds``)
ENV_LISTEN = "SOCKSHARE_LISTEN"


def _inherited_listeners(text: str) -> tuple[list[Listening], int | None]:
    """The listeners of ``$SOCKSHARE_LISTEN`` (each descriptor made non-inheritable: the
    app's own child processes do not get them), and the pool's max_conns."""
    if not text:
        return [], None
    try:
        desc = json.loads(text)
        out = []
        for fd, name, address, backlog in desc["listeners"]:
            os.set_inheritable(int(fd), False)
            out.append(Listening(int(fd), str(name), str(address), int(backlog)))
        max_conns = desc.get("max_conns")
        return out, int(max_conns) if max_conns is not None else None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        log.error("%s: cannot use the inherited listeners: %s", ENV_LISTEN, exc)
        return [], None


def _run_loop(main: Coroutine[Any, Any, int], loop: str) -> int:
    """``asyncio.run`` on the loop ``--loop`` asks for (auto: uvloop if installed)."""
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                main.close()
                log.error("--loop uvloop: uvloop is not installed (pip install uvloop)")
                return 2
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return run(main)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    info = WorkerInfo(args.id, os.getpid(), args.generation, args.pool)
    try:
        _configure_logging(info, args.log_level, args.log_config)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        logging.basicConfig()
        log.error("--log-config %s: %s", args.log_config, exc)
        return 2
    if not args.channel:
        log.error("no channel address: give --channel or set SOCKSHARE_CHANNEL")
        return 2
    log_nofile(log, f"worker {info.id}")   # (before fd_mark reads the limit)
    app: App | None = None
    resume: Resume | None = None
    web: WebServer | None = None
    error = ""
    settings = WebSettings.from_json(args.web)
    listening, max_conns = _inherited_listeners(os.environ.get(ENV_LISTEN, ""))
    if args.max_conns is not None:
        max_conns = args.max_conns
    not_web = False
    try:
        app, web = _load_web(args.app, args.interface, settings)
        if web is None and listening:
            not_web = True
            raise WebAppError("accept = \"worker\" needs an ASGI or WSGI app; this one is a "
                              "handler (use accept = \"dispatcher\")")
        if web is not None:
            web.listening = listening
        if web is None:
            resume = load_resume(args.app, args.resume)
    except WebAppError as exc:
        app = web = None
        error = f"{args.app}: {exc}"
        log.error("worker %d: %s", info.id, error)
    except Exception as exc:
        app = web = None
        error = f"{args.app}: {type(exc).__name__}: {exc}"
        log.error("worker %d: %s", info.id, error)
    worker = Worker(app, info, args.channel, grace=args.grace, app_error=error, resume=resume,
                    web=web, max_conns=max_conns)
    if not_web:   # (a configuration error, not a crash: the server says so and stops)
        worker._startup_failed = True
    status = _run_loop(worker.run(), settings.loop if web is not None else "asyncio")
    freeze_for_exit()   # (exit now, not after a last walk of every object)
    return status
