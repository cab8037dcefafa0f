"""Direct migration: a worker hands a connection straight to another worker of its pool.

Without it a migration takes two hops, source worker -> dispatcher -> target worker
(the relay). With it, a migration takes one -- a handler's own ``migrate()``, a moving
WebSocket or keep-alive connection of a web app, and the moves the dispatcher asks for
(rebalancing, ``sockshare migrate``, a reload: it lists the new generation to the
workers it retires):

* each worker that can resume listens on ``<pid>.peer`` beside the dispatcher's channel
  (:meth:`PeerMigration.listen`) and says so in its hello;
* the dispatcher sends every worker the pool's other ready workers
  (``{"cmd": "peers", "peers": [[id, pid, path, connections], ...]}``,
  :meth:`PeerMigration.set_peers`); channels to them open in the background;
* the source hands the duplicate descriptor to the peer with the fewest connections
  that has room (:meth:`PeerMigration.pick`, :meth:`PeerMigration.move`), acknowledged;
  the moves to one peer started in one turn of the loop leave together (one write, as
  the relay's do). The answer is the target's own: ACCEPT (the source closes its copy),
  or REJECT / the target dying first (:attr:`Move.BACK`: the source tries the relay);
* the dispatcher hears of it afterwards, in the batched reports, one message per peer
  and turn of the loop for all the moves it covers: ``moved_out`` from the source,
  ``moved_in`` from the target (:meth:`PeerMigration.moved_in`). The moves of a batch
  still unanswered after :data:`ANNOUNCE_DELAY` are announced (``moving``), so that
  the dispatcher's ``--timeout`` covers a hung target: its channel then breaks and the
  connections come back.

Orphans. A handoff whose ACCEPT the target could not deliver (its source's end closed
first) may or may not have been taken back by its source: it is held, unread
(:meth:`PeerMigration.hold`), until the dispatcher, which sees its workers exit, says
whether the source *process* is gone (``{"cmd": "orphan", "dead": ...}``,
:meth:`PeerMigration.adopt`): then the target serves it, else closes it. Without an
answer within :data:`ORPHAN_TIMEOUT` it is closed. Either way exactly one process serves
the connection.

The runtime (``_runtime.Worker``) owns the channel to the dispatcher and the handlers;
this module reaches it only through :class:`PeerHost`, so a test can drive it with a
stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from sockshare._aio import AsyncChannel, AsyncChannelListener
from sockshare._channel import Handoff, Ticket
from sockshare._errors import ChannelError, SockshareError
from sockshare.server._handler import Connection, WorkerInfo
from sockshare.server._messages import (
    Message,
    MoveBack,
    MovedIn,
    MovedOut,
    MoveKey,
    Moving,
    OrphanAnswer,
    OrphanQuery,
    PeerEntry,
    Report,
)

__all__ = [
    "ANNOUNCE_DELAY",
    "ORPHAN_TIMEOUT",
    "PEER_WAIT",
    "PEER_CONNECT_TIMEOUT",
    "PEER_SUFFIX",
    "Move",
    "Orphan",
    "PeerHost",
    "PeerMigration",
]

log = logging.getLogger("sockshare.server.worker")
T = TypeVar("T")

#: A worker's peer channel socket: ``<its pid>.peer``, beside the dispatcher's channel.
PEER_SUFFIX = ".peer"
#: Seconds to open a channel to a peer worker (in the background).
PEER_CONNECT_TIMEOUT = 5.0
#: Seconds a direct migration whose ACCEPT could not reach its source waits for the
#: dispatcher to say whether that source process is gone (then it is served here).
ORPHAN_TIMEOUT = 5.0
#: Moves to one peer queued in one turn of the loop leave together; this many leave at
#: once (no more can join before answers come: the migration window).
PEER_BATCH = 256
#: Moves in a row to one peer at most (:meth:`PeerMigration.pick`): its batches stay
#: whole; the peers' counts stay within this many of each other.
STICK = 32
#: Moves one report message covers at most (each key is ~20 bytes of JSON).
REPORT_KEYS = 256
#: Seconds after which the moves of a batch still unanswered are announced to the
#: dispatcher (``moving``): from then on its --timeout watches them, and its drain
#: watch counts them as progress. Not sooner: on a busy machine most batches take a few
#: milliseconds, and a message each would cost the three processes more than the moves.
ANNOUNCE_DELAY = 0.1
#: Seconds a peer that refused a move is not picked (the moves go to the others, or
#: through the dispatcher, which knows why).
PEER_REST = 0.5
#: Seconds a worker asked to drain by moving its connections waits for its channels to
#: the peers the dispatcher just listed (the new generation of a reload) to open.
PEER_WAIT = 0.5


class Move(enum.Enum):
    """How a direct move ended (:meth:`PeerMigration.move`)."""

    #: the peer took the connection; the duplicate was closed
    ACCEPTED = "accepted"
    #: rejected, or the peer went away before answering: the duplicate is ours again
    BACK = "back"
    #: our end closed first: the peer may serve it; the duplicate was closed
    GONE = "gone"


class PeerHost(Protocol):
    """What :class:`PeerMigration` needs of the worker runtime."""

    @property
    def info(self) -> WorkerInfo: ...

    @property
    def stopping(self) -> asyncio.Event: ...

    @property
    def ch(self) -> AsyncChannel | None:
        """The channel to the dispatcher (None before it is open)."""

    def control(self, msg: Message, *, soon: bool = False) -> None:
        """Send a control message to the dispatcher now."""

    def queue_report(self, msg: Report) -> None:
        """Send it with the next batch of reports."""

    def take(self, ch: AsyncChannel, from_peer: bool = False) -> None:
        """Set up and start the handoffs that arrived on ``ch``."""

    def serve_adopted(self, h: Handoff, conn: Connection) -> None:
        """Serve a held direct migration whose source died (its ACCEPT is sent)."""


def _chunks(items: Sequence[T]) -> Iterator[tuple[T, tuple[T, ...]]]:
    """``items`` in reports of at most REPORT_KEYS: each its first and the rest (a
    report's ``key`` and its ``more``)."""
    for i in range(0, len(items), REPORT_KEYS):
        yield items[i], tuple(items[i + 1:i + REPORT_KEYS])


def _int_or_none(x: Any) -> int | None:
    """``x`` if it is an integer (from a peer's migration meta), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


_Batch = list[tuple[socket.socket, bytes, bytes, "asyncio.Future[Ticket]"]]


class _Peer:
    """Another worker of the pool, as the dispatcher last described it, and our channel
    to it once open."""

    __slots__ = ("batch", "ch", "connecting", "id", "inflight", "load", "path", "pid", "resting",
                 "room")

    def __init__(self, wid: int, pid: int, path: str, load: int, room: int | None) -> None:
        self.id = wid
        self.pid = pid
        self.path = path
        self.load = load
        #: how many more it may be given (None: no limit), less what we sent since
        self.room = room
        #: our moves to it not answered yet (the dispatcher's counts cannot have them)
        self.inflight = 0
        #: it refused a move (out of descriptors, stopping): not picked before this time
        self.resting = 0.0
        self.ch: AsyncChannel | None = None
        #: moves queued in this turn of the loop (they leave together)
        self.batch: _Batch = []
        #: its channel is being opened
        self.connecting = True


class Orphan(NamedTuple):
    """A direct migration held while the dispatcher says whether its source lives."""

    handoff: Handoff
    #: serve it here (its source died)
    serve: Callable[[], None]
    #: close it (its source lives, or no answer came)
    drop: Callable[[], None]


class PeerMigration:
    """This worker's side of direct migration: its listener for peer workers, its
    channels to them, and the direct migrations held while their source may be alive."""

    def __init__(self, host: PeerHost, *, announce_delay: float = ANNOUNCE_DELAY) -> None:
        self._host = host
        self._announce_delay = announce_delay
        #: our listener for peer workers (and its path, once listening)
        self._listener: AsyncChannelListener | None = None
        self.path = ""
        #: the pool's other workers, as the dispatcher last listed them: a rotation
        self.peers: dict[int, _Peer] = {}
        self._incoming: set[AsyncChannel] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        #: direct migrations held while the dispatcher says whether their source lives
        self.orphans: dict[tuple[int, int], Orphan] = {}
        #: moves announced to the dispatcher (``moving``) and not answered yet
        self._announced: set[MoveKey] = set()
        #: reports gathered in this turn of the loop, one message each per peer / source:
        #: moves out and back by target id, arrivals by (source id, source pid)
        self._out: dict[int, list[MoveKey]] = {}
        self._back: dict[int, list[MoveKey]] = {}
        self._in: dict[tuple[int | None, int | None], list[tuple[int, float | None]]] = {}
        self._reports_due = False
        self._closing = False
        #: the last peer picked, and the moves :meth:`expect` says are still to come
        self._last: _Peer | None = None
        self._expected = 0

    def pick(self) -> _Peer | None:
        """The peer with the fewest connections that has room (the dispatcher's last
        count, plus what we sent it since), if its channel is open (else None: the
        relay); ties rotate. While :meth:`expect` says
        many moves are coming, the last one picked stays the pick as long as it has at
        most ``stick`` more than the fewest: runs of moves to one peer leave in one batch
        (one write, one answer), instead of every batch split over all of them."""
        best: _Peer | None = None
        now = 0.0
        for p in self.peers.values():
            if p.resting:
                now = now or time.monotonic()
                if p.resting > now:
                    continue
                p.resting = 0.0
            if (p.room is None or p.room > 0) and (best is None or p.load < best.load):
                best = p
        if best is None or best.ch is None or not best.ch.usable:
            # (the one with the fewest has no channel open -- still opening, or it could
            # not be opened: the dispatcher places this one, by its exact counts, rather
            # than all of them going to the peers whose channels are open)
            return None
        last = self._last
        stick = self._stick()
        if (last is not None and last is not best and stick > 1
                and self.peers.get(last.id) is last and last.ch is not None and last.ch.usable
                and (last.room is None or last.room > 0) and last.load < best.load + stick):
            best = last
        else:
            del self.peers[best.id]   # last in the rotation
            self.peers[best.id] = best
        best.load += 1
        best.inflight += 1
        if best.room is not None:
            best.room -= 1
        self._last = best
        if self._expected:
            self._expected -= 1
        return best

    def _stick(self) -> int:
        """How far ahead of the others the last peer picked may stay the pick: STICK,
        less as the moves :meth:`expect` announced run out (the last ones spread one by
        one, so that the counts end within one or two of each other)."""
        return max(1, min(STICK, self._expected // (4 * max(1, len(self.peers)))))

    def expect(self, n: int) -> None:
        """About ``n`` moves are coming (a drain, a request to move ``n``): runs of up to
        STICK to one peer, shorter as they run out (:meth:`pick`)."""
        self._expected = max(0, n)

    async def move(self, peer: _Peer, dup: socket.socket, meta: bytes, data: bytes) -> Move:
        """Hand ``dup`` to ``peer``, acknowledged: :class:`Move` says how it ended.

        The moves to ``peer`` started in this turn of the loop leave together at its end
        (``send_nowait``: frames of up to 64, one write). The dispatcher hears of them
        afterwards, in the batched reports: the source says ``moved_out``, the target
        ``moved_in``. Only moves still unanswered after ANNOUNCE_DELAY are announced
        (``moving``), so that the dispatcher's --timeout can kill a hung target: its
        channel then breaks and the connections come back. A move cancelled before it
        left leaves its duplicate closed."""
        ch = peer.ch
        assert ch is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Ticket] = loop.create_future()
        batch = peer.batch
        batch.append((dup, meta, data, fut))
        if len(batch) == 1:
            loop.call_soon(self._send, peer, ch)
        elif len(batch) >= PEER_BATCH:
            self._send(peer, ch)
        try:
            ticket = await fut
        except (SockshareError, ValueError, OSError) as exc:
            log.info("worker %d: direct migration to worker %d failed (%s); via the dispatcher",
                     self._host.info.id, peer.id, exc)
            peer.inflight -= 1
            self._unpick(peer)
            return Move.BACK
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # (cancelled just as it left: settled like one cancelled on its way)
                sent = fut.result()
                self._bg(self._settle(peer, ch, sent, MoveKey(self._host.info.pid, sent.id)))
            else:
                peer.inflight -= 1
            raise
        key = MoveKey(self._host.info.pid, ticket.id)
        try:
            await ch.wait([ticket])
        except asyncio.CancelledError:
            # the handoff left: its answer still comes, and is reported when it does
            # (unreported, an announced move would make the dispatcher take the target
            # for hung at --timeout; the source's count would stay one too many)
            self._bg(self._settle(peer, ch, ticket, key))
            raise
        except BaseException:
            self._ended(peer, key)
            raise
        return self._outcome(peer, ticket, key)

    def _ended(self, peer: _Peer, key: MoveKey) -> bool:
        """A move to ``peer`` is answered (or given up): whether it had been announced."""
        peer.inflight -= 1
        announced = key in self._announced
        self._announced.discard(key)
        return announced

    async def _settle(self, peer: _Peer, ch: AsyncChannel, ticket: Ticket, key: MoveKey) -> None:
        """The answer to a move whose mover was cancelled, reported as :meth:`move`
        would have; a connection that came back is closed here (nobody waits for it)."""
        with contextlib.suppress(SockshareError, OSError, ValueError):
            await ch.wait([ticket])
        if self._outcome(peer, ticket, key) is Move.BACK and ticket.socket is not None:
            ticket.socket.close()

    def _outcome(self, peer: _Peer, ticket: Ticket, key: MoveKey) -> Move:
        """Report an answered move (moved_out, or move_back if it was announced)."""
        announced = self._ended(peer, key)
        if ticket.state == "accepted":
            self._report(self._out, peer.id, key)
            return Move.ACCEPTED
        if announced:
            self._report(self._back, peer.id, key)
        if ticket.state in ("rejected", "returned") and ticket.socket is not None:
            log.info("worker %d: worker %d %s the migration (%s); via the dispatcher",
                     self._host.info.id, peer.id, ticket.state, ticket.reason or "no reason")
            self._unpick(peer)
            # (out of descriptors, draining: the next moves go elsewhere for a while)
            peer.resting = time.monotonic() + PEER_REST
            return Move.BACK
        # Abandoned (our channel to the target closed before it answered): the
        # connection left this worker all the same -- the target may serve it, and
        # reports moved_in if it does -- so the dispatcher must count it out of here.
        self._report(self._out, peer.id, key)
        return Move.GONE

    @staticmethod
    def _unpick(peer: _Peer) -> None:
        """A move to ``peer`` that did not happen: its count and room as they were."""
        peer.load = max(0, peer.load - 1)
        if peer.room is not None:
            peer.room += 1

    def _send(self, peer: _Peer, ch: AsyncChannel) -> None:
        """Send the moves queued for ``peer`` (one write for all); each mover gets its
        ticket, or the reason none was sent (then the duplicate is still its own)."""
        batch, peer.batch = peer.batch, []
        live: _Batch = []
        for item in batch:
            if item[3].done():   # (its move was cancelled before it left: still ours)
                item[0].close()
            else:
                live.append(item)
        if not live:
            return
        sent: list[Ticket] = []
        try:
            tickets = ch.send_nowait([(d, m, x) for d, m, x, _f in live], ack=True)
        except (SockshareError, ValueError, OSError) as exc:
            if len(live) == 1 or not ch.usable:
                for *_rest, fut in live:
                    fut.set_exception(exc)
                return
            for d, m, x, fut in live:   # (one of them cannot go: that one only)
                try:
                    [ticket] = ch.send_nowait([(d, m, x)], ack=True)
                except (SockshareError, ValueError, OSError) as one:
                    fut.set_exception(one)
                else:
                    sent.append(ticket)
                    fut.set_result(ticket)
        else:
            sent = tickets
            for ticket, (*_rest, fut) in zip(tickets, live, strict=True):
                fut.set_result(ticket)
        if sent:
            asyncio.get_running_loop().call_later(self._announce_delay, self._announce,
                                                  peer.id, sent)

    def _announce(self, peer_id: int, tickets: list[Ticket]) -> None:
        """The moves of a batch still unanswered: one ``moving`` (--timeout watches)."""
        pid = self._host.info.pid
        keys = [MoveKey(pid, t.id) for t in tickets if t.state == "pending"]
        for first, more in _chunks(keys):
            self._announced.add(first)
            self._announced.update(more)
            self._host.control(Moving(peer_id, first, more))

    def _report(self, table: dict[int, list[MoveKey]], peer_id: int, key: MoveKey) -> None:
        table.setdefault(peer_id, []).append(key)
        self._reports_soon()

    def _reports_soon(self) -> None:
        if not self._reports_due:
            self._reports_due = True
            asyncio.get_running_loop().call_soon(self._flush_reports)

    def _flush_reports(self) -> None:
        """This turn's moves out, back and in: one report message per peer (and per
        REPORT_KEYS moves), with the next batch of reports."""
        self._reports_due = False
        for table, kind in ((self._out, MovedOut), (self._back, MoveBack)):
            for peer_id, keys in table.items():
                for first, more in _chunks(keys):
                    self._host.queue_report(kind(peer_id, first, more))
            table.clear()
        for (source, source_pid), arrivals in self._in.items():
            for (hid, latency), rest in _chunks(arrivals):
                self._host.queue_report(MovedIn(source, (source_pid, hid), latency, rest))
        self._in.clear()

    async def wait_connected(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the channel to every listed peer is
        open or failed to open: a drain's moves then go straight there from the first,
        instead of through the dispatcher while the channels open."""
        deadline = time.monotonic() + timeout
        while any(p.ch is None and p.connecting for p in self.peers.values()):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.002)

    def set_peers(self, listed: Sequence[PeerEntry]) -> None:
        """The dispatcher's list of the pool's other workers that take migrations
        directly (a ``peers`` command): channels to new ones open in the background,
        those no longer listed close. This worker (its pid) is skipped if listed."""
        fresh: dict[int, PeerEntry] = {   # (by pid: a reload's new worker has our id)
            p.id: p for p in listed if p.pid != self._host.info.pid}
        for wid, p in list(self.peers.items()):
            want = fresh.get(wid)
            if want is None or (want.pid, want.path) != (p.pid, p.path):
                del self.peers[wid]
                self._close_peer(p)
        for wid, entry in fresh.items():
            known = self.peers.get(wid)
            if known is None:
                peer = self.peers[wid] = _Peer(wid, entry.pid, entry.path, entry.connections,
                                               entry.room)
                self._bg(self._connect_peer(peer))
            else:   # (the dispatcher's count, and ours on the way, which it cannot have)
                known.load = entry.connections + known.inflight
                known.room = None if entry.room is None else max(0, entry.room - known.inflight)
                if known.ch is None and not known.connecting and not self._closing:
                    known.connecting = True   # (its channel failed to open: again)
                    self._bg(self._connect_peer(known))

    def _close_peer(self, p: _Peer) -> None:
        ch, p.ch = p.ch, None
        if ch is not None:
            self._bg(ch.aclose())   # waits for answers to what is in flight

    async def _connect_peer(self, p: _Peer) -> None:
        try:
            ch = await AsyncChannel.connect(p.path, name=f"peer:{self._host.info.id}",
                                            timeout=PEER_CONNECT_TIMEOUT)
        except (OSError, SockshareError) as exc:
            p.connecting = False
            log.info("worker %d: no direct channel to worker %d (%s); migrations to it go "
                     "through the dispatcher", self._host.info.id, p.id, exc)
            return
        p.connecting = False
        if self.peers.get(p.id) is not p or self._closing:
            # (a draining worker keeps connecting: its connections move through them)
            await ch.aclose()
            return
        p.ch = ch
        await ch.wait_closed()
        if p.ch is ch:
            p.ch = None
        await ch.aclose()

    def listen(self, address: str) -> None:
        """Listen for peer workers beside the dispatcher's channel (a path only: no
        peers for abstract or TCP channel addresses)."""
        if address.startswith(("@", "tcp://")) or not os.path.isabs(address):
            return
        path = os.path.join(os.path.dirname(address), f"{self._host.info.pid}{PEER_SUFFIX}")
        try:
            self._listener = AsyncChannelListener.listen(path, name=f"worker:{self._host.info.id}")
        except (OSError, SockshareError) as exc:
            log.warning("worker %d: cannot listen for peer workers at %s (%s); migrations "
                        "go through the dispatcher", self._host.info.id, path, exc)
            return
        self.path = path
        self._accepting = self._bg(self._accept_peers(self._listener))

    async def _accept_peers(self, listener: AsyncChannelListener) -> None:
        while True:
            try:
                ch = await listener.accept()
            except (ChannelError, OSError):
                return
            except SockshareError as exc:   # a bad handshake: that peer only
                log.warning("worker %d: refused a peer channel: %s", self._host.info.id, exc)
                continue
            if self._listener is not listener:   # closed meanwhile
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
            self._host.take(ch, from_peer=True)
            ch.received_controls()   # (peers send none)
        except Exception:   # never let it escape into the channel's reader
            log.exception("worker %d: handling a peer worker's frames failed", self._host.info.id)

    def hold(self, ch: AsyncChannel, held: list[tuple[Handoff, Connection]]) -> None:
        """Direct migrations whose ACCEPT could not reach the source: its end of the
        channel closed first. If the source *process* is gone, nobody else can serve
        them, so this worker may; if it lives, it may have taken them back, so this one
        must not. Held (not reading) while the dispatcher, which saw its workers exit,
        answers; closed without an answer within ORPHAN_TIMEOUT."""
        orphans = []
        for h, conn in held:
            transport = cast(asyncio.Transport, conn.writer.transport)
            transport.pause_reading()   # (before it ever read)

            def serve(h: Handoff = h, conn: Connection = conn,
                      transport: asyncio.Transport = transport) -> None:
                transport.resume_reading()
                self._host.serve_adopted(h, conn)

            orphans.append(Orphan(h, serve, transport.abort))
        self.hold_orphans(ch, orphans)

    def hold_orphans(self, ch: AsyncChannel, held: list[Orphan]) -> None:
        """:meth:`hold` for any kind of connection: each says how to serve and drop it
        (a web app's are sockets not started yet)."""
        pid = ch.peer.pid
        keys = []
        for orphan in held:
            key = (pid, orphan.handoff.id)
            self.orphans[key] = orphan
            keys.append(key)
            self._host.control(OrphanQuery(pid, MoveKey(*key)))
        asyncio.get_running_loop().call_later(ORPHAN_TIMEOUT, self.drop_orphans, keys)

    def adopt(self, msg: OrphanAnswer) -> None:
        """The dispatcher's answer about a held direct migration."""
        orphan = self.orphans.pop((msg.key.pid, msg.key.id), None)
        if orphan is None:
            return
        if msg.dead and not self._host.stopping.is_set() and self._host.ch is not None:
            log.info("worker %d: the source of handoff %d died before our ACCEPT reached "
                     "it; served here", self._host.info.id, orphan.handoff.id)
            orphan.serve()
        else:
            log.warning("worker %d: handoff %d: our ACCEPT did not reach its source, which "
                        "lives; closed here", self._host.info.id, orphan.handoff.id)
            orphan.drop()

    def drop_orphans(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            orphan = self.orphans.pop(key, None)
            if orphan is not None:
                orphan.drop()

    def moved_in(self, h: Handoff, conn: Connection) -> None:
        """Report a direct migration in (its latency measured here, as resume starts)."""
        self.arrived(h.id, conn.meta)

    def arrived(self, hid: int, meta: dict[str, Any]) -> None:
        """A direct migration in, handoff ``hid`` with this meta: reported with the
        others from the same source at the end of this turn of the loop (one
        ``moved_in``), its latency measured now."""
        mig = meta.get("migration")
        mig = mig if isinstance(mig, dict) else {}
        started = mig.get("started")
        latency = time.monotonic() - started if isinstance(started, float) else None
        if latency is not None and not (0 <= latency < 1e9):
            latency = None
        source = (_int_or_none(mig.get("from")), _int_or_none(mig.get("from_pid")))
        self._in.setdefault(source, []).append((hid, latency))
        self._reports_soon()

    def _bg(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._bg_done)
        return task

    def _bg_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %d: background task failed", self._host.info.id, exc_info=task.exception())

    async def close(self) -> None:
        self._closing = True
        self.drop_orphans(list(self.orphans))
        if self._accepting is not None:   # (it waits on the listener's descriptor)
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for p in list(self.peers.values()):
            self._close_peer(p)
        self.peers.clear()
        for ch in list(self._incoming):
            self._bg(ch.aclose())
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)
        for t in list(self._background):
            t.cancel()
