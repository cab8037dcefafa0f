"""Direct migration: a worker hands a connection straight to another worker of its pool.

Without it a migration takes two hops, source worker -> dispatcher -> target worker
(the relay). With it, a handler's own ``migrate()`` (not one the dispatcher asked for)
takes one:

* each worker that can resume listens on ``<pid>.peer`` beside the dispatcher's channel
  (:meth:`PeerMigration.listen`) and says so in its hello;
* the dispatcher sends every worker the pool's other ready workers
  (``{"cmd": "peers", "peers": [[id, pid, path, connections], ...]}``,
  :meth:`PeerMigration.set_peers`); channels to them open in the background;
* the source hands the duplicate descriptor to the peer with the fewest connections
  (:meth:`PeerMigration.pick`, :meth:`PeerMigration.move`), acknowledged. The answer is
  the target's own: ACCEPT (the source closes its copy), or REJECT / the target dying
  first (:attr:`Move.BACK`: the source tries the relay);
* the dispatcher hears of it afterwards, in the batched reports: ``moved_out`` from the
  source, ``moved_in`` from the target (:meth:`PeerMigration.moved_in`). A move still
  unanswered after the report delay is announced (``moving``), so that the dispatcher's
  ``--timeout`` covers a hung target: its channel then breaks and the connection comes
  back.

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
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, cast

from sockshare._aio import AsyncChannel, AsyncChannelListener
from sockshare._channel import Handoff
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
    "ORPHAN_TIMEOUT",
    "PEER_CONNECT_TIMEOUT",
    "PEER_SUFFIX",
    "Move",
    "PeerHost",
    "PeerMigration",
]

log = logging.getLogger("sockshare.server.worker")

#: A worker's peer channel socket: ``<its pid>.peer``, beside the dispatcher's channel.
PEER_SUFFIX = ".peer"
#: Seconds to open a channel to a peer worker (in the background).
PEER_CONNECT_TIMEOUT = 5.0
#: Seconds a direct migration whose ACCEPT could not reach its source waits for the
#: dispatcher to say whether that source process is gone (then it is served here).
ORPHAN_TIMEOUT = 5.0


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


def _int_or_none(x: Any) -> int | None:
    """``x`` if it is an integer (from a peer's migration meta), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


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


class PeerMigration:
    """This worker's side of direct migration: its listener for peer workers, its
    channels to them, and the direct migrations held while their source may be alive."""

    def __init__(self, host: PeerHost, *, report_delay: float) -> None:
        self._host = host
        self._report_delay = report_delay
        #: our listener for peer workers (and its path, once listening)
        self._listener: AsyncChannelListener | None = None
        self.path = ""
        #: the pool's other workers, as the dispatcher last listed them: a rotation
        self.peers: dict[int, _Peer] = {}
        self._incoming: set[AsyncChannel] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        #: direct migrations held while the dispatcher says whether their source lives
        self.orphans: dict[tuple[int, int], tuple[Handoff, Connection]] = {}

    def pick(self) -> _Peer | None:
        """The connected peer with the fewest connections (the dispatcher's last count,
        plus what we sent it since); ties rotate."""
        best: _Peer | None = None
        for p in self.peers.values():
            ch = p.ch
            if ch is not None and ch.usable and (best is None or p.load < best.load):
                best = p
        if best is not None:
            best.load += 1
            del self.peers[best.id]   # last in the rotation
            self.peers[best.id] = best
        return best

    async def move(self, peer: _Peer, dup: socket.socket, meta: bytes, data: bytes) -> Move:
        """Hand ``dup`` to ``peer``, acknowledged: :class:`Move` says how it ended.

        The dispatcher hears of it afterwards, in the batched reports: the source says
        ``moved_out``, the target ``moved_in``. Only a move still unanswered after
        the report delay is announced (``moving``), so that the dispatcher's --timeout can
        kill a hung target: its channel then breaks and the connection comes back."""
        ch = peer.ch
        assert ch is not None
        try:
            [ticket] = ch.send_nowait([(dup, meta, data)], ack=True)
        except (SockshareError, ValueError, OSError) as exc:
            log.info("worker %d: direct migration to worker %d failed (%s); via the dispatcher",
                     self._host.info.id, peer.id, exc)
            return Move.BACK
        key = MoveKey(self._host.info.pid, ticket.id)
        announced = False

        def announce() -> None:
            nonlocal announced
            if ticket.state == "pending":
                announced = True
                self._host.control(Moving(peer.id, key))

        timer = asyncio.get_running_loop().call_later(self._report_delay, announce)
        try:
            await ch.wait([ticket])
        finally:
            timer.cancel()
        if ticket.state == "accepted":
            self._host.queue_report(MovedOut(peer.id, key))
            return Move.ACCEPTED
        if announced:
            self._host.queue_report(MoveBack(peer.id, key))
        if ticket.state in ("rejected", "returned") and ticket.socket is not None:
            log.info("worker %d: worker %d %s the migration (%s); via the dispatcher",
                     self._host.info.id, peer.id, ticket.state, ticket.reason or "no reason")
            return Move.BACK
        # Abandoned (our channel to the target closed before it answered): the
        # connection left this worker all the same -- the target may serve it, and
        # reports moved_in if it does -- so the dispatcher must count it out of here.
        self._host.queue_report(MovedOut(peer.id, key))
        return Move.GONE

    def set_peers(self, listed: Sequence[PeerEntry]) -> None:
        """The dispatcher's list of the pool's other workers that take migrations
        directly (a ``peers`` command): channels to new ones open in the background,
        those no longer listed close. This worker is skipped if listed."""
        fresh: dict[int, tuple[int, str, int]] = {
            p.id: (p.pid, p.path, p.connections) for p in listed if p.id != self._host.info.id}
        for wid, p in list(self.peers.items()):
            want = fresh.get(wid)
            if want is None or want[:2] != (p.pid, p.path):
                del self.peers[wid]
                self._close_peer(p)
        for wid, (pid, path, load) in fresh.items():
            known = self.peers.get(wid)
            if known is None:
                peer = self.peers[wid] = _Peer(wid, pid, path, load)
                self._bg(self._connect_peer(peer))
            else:
                known.load = load

    def _close_peer(self, p: _Peer) -> None:
        ch, p.ch = p.ch, None
        if ch is not None:
            self._bg(ch.aclose())   # waits for answers to what is in flight

    async def _connect_peer(self, p: _Peer) -> None:
        try:
            ch = await AsyncChannel.connect(p.path, name=f"peer:{self._host.info.id}",
                                            timeout=PEER_CONNECT_TIMEOUT)
        except (OSError, SockshareError) as exc:
            log.info("worker %d: no direct channel to worker %d (%s); migrations to it go "
                     "through the dispatcher", self._host.info.id, p.id, exc)
            return
        if self.peers.get(p.id) is not p or self._host.stopping.is_set():
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
        pid = ch.peer.pid
        keys = []
        for h, conn in held:
            cast(asyncio.Transport, conn.writer.transport).pause_reading()   # (before it ever read)
            key = (pid, h.id)
            self.orphans[key] = (h, conn)
            keys.append(key)
            self._host.control(OrphanQuery(pid, MoveKey(*key)))
        asyncio.get_running_loop().call_later(ORPHAN_TIMEOUT, self.drop_orphans, keys)

    def adopt(self, msg: OrphanAnswer) -> None:
        """The dispatcher's answer about a held direct migration."""
        entry = self.orphans.pop((msg.key.pid, msg.key.id), None)
        if entry is None:
            return
        h, conn = entry
        if msg.dead and not self._host.stopping.is_set() and self._host.ch is not None:
            log.info("worker %d: the source of %s died before our ACCEPT reached it; "
                     "served here", self._host.info.id, conn.handoff_id)
            cast(asyncio.Transport, conn.writer.transport).resume_reading()
            self._host.serve_adopted(h, conn)
        else:
            log.warning("worker %d: %s: our ACCEPT did not reach its source, which lives; "
                        "closed here", self._host.info.id, conn.handoff_id)
            conn.writer.transport.abort()

    def drop_orphans(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            entry = self.orphans.pop(key, None)
            if entry is not None:
                entry[1].writer.transport.abort()

    def moved_in(self, h: Handoff, conn: Connection) -> None:
        """Report a direct migration in (its latency measured here, as resume starts)."""
        mig = conn.meta.get("migration")
        mig = mig if isinstance(mig, dict) else {}
        started = mig.get("started")
        latency = time.monotonic() - started if isinstance(started, float) else None
        source, source_pid = mig.get("from"), mig.get("from_pid")
        self._host.queue_report(MovedIn(_int_or_none(source), (_int_or_none(source_pid), h.id),
                                        latency))

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
