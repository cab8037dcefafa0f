"""Admission: the pools' queues, placing a connection on a worker, refusal.

A connection the listeners accepted (or one handed back, or a migration relayed through
the dispatcher) becomes a :class:`~sockshare.server._slots.Waiting`, and
:meth:`Admission.place` decides where it goes::

    place(w) ──▶ assign: pool's policy among the ready workers with room
       │             └─▶ reserve: into this loop turn's batch for that worker
       │                    └─▶ flush (end of the accept burst, or next loop turn):
       │                         one send_nowait per worker; tickets become ``pending``
       │ no worker has room
       ├──▶ (handed over in an upgrade) forwarded to the new dispatcher: ``upstream``
       ├──▶ the pool's FIFO queue (bounded; a re-dispatch goes to its head)
       └──▶ refused: RST, one rate-limited log line, ``refused{reason}`` counted

:meth:`feed` moves queued connections to workers as room appears (a worker ready, a
close reported, a ticket back). :meth:`redispatch` puts a returned or rejected handoff
back (another worker first) until ``max_retries``. A migration (``w.origin`` set) is not
admission's: :attr:`place_migration` and :attr:`migration_failed` hand it to the relay
(see :mod:`._migration`).

No process and no listening socket here: the only I/O is ``send_nowait`` on a worker's
channel and closing a refused socket, so the unit tests build an :class:`Admission` with
stand-in channels in the test process (tests/server/test_admission_unit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

from sockshare._errors import ChannelError, SockshareError
from sockshare.backends._scm import MSG_DONTWAIT
from sockshare.server._config import ServerConfig
from sockshare.server._slots import PoolState, SlotState, Waiting, WorkerSlot

__all__ = ["REFUSAL_LOG_PER_SECOND", "Admission", "close_reset"]

log = logging.getLogger("sockshare.server")

REFUSAL_LOG_PER_SECOND = 10
_LINGER_RESET = struct.pack("ii", 1, 0)
READY = SlotState.READY


def close_reset(sock: socket.socket) -> None:
    """Close so that the client sees a reset at once (no FIN, no TIME_WAIT here)."""
    with contextlib.suppress(OSError):
        if sock.family != getattr(socket, "AF_UNIX", -1):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


_REASONS = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
#: connections answered with an HTTP error and closing gracefully, at most (past it: reset)
MAX_LINGERING = 256
_lingering: set[socket.socket] = set()


def http_refusal(sock: socket.socket, status: int) -> bool:
    """Answer an HTTP client that is refused with ``status`` (what an HTTP server would
    say, not a reset) and close once it has read it: the write side is shut at once, the
    socket closed when the client closes or after a second (a reset would discard the
    answer from the client's receive buffer). False if it could not be written (the
    caller resets the connection)."""
    if len(_lingering) >= MAX_LINGERING:
        return False
    reason = _REASONS.get(status, "Error")
    body = f"{status} {reason}\n".encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)   # (Windows has no MSG_DONTWAIT: this is what counts there)
        if sock.send(head + body, MSG_DONTWAIT) < len(head) + len(body):
            return False
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        sock.close()
        return True
    _lingering.add(sock)

    def done() -> None:
        if sock in _lingering:
            _lingering.discard(sock)
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(sock)
            sock.close()

    def readable() -> None:
        try:   # drain what the client still sends; its FIN (b"") ends the wait
            if sock.recv(65536, MSG_DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        done()

    loop.add_reader(sock, readable)
    loop.call_later(1.0, done)
    return True


def _no_relay(w: Waiting, why: str = "") -> None:
    raise RuntimeError("a migration reached an Admission without a migration relay")


class Admission:
    """The pools' queues and the batches of handoffs of this loop turn."""

    def __init__(self, cfg: ServerConfig, pools: dict[str, PoolState],
                 counters: dict[str, int]) -> None:
        self.cfg = cfg
        self.pools = pools
        self.counters = counters
        #: refused connections by reason
        self.refused: dict[str, int] = {}
        #: this loop turn's handoffs, per worker (sent by :meth:`flush`)
        self.batches: dict[WorkerSlot, list[Waiting]] = {}
        self._flush_scheduled = False
        #: inside an accept burst: the listeners flush at its end
        self.accepting = False
        self._log_budget = REFUSAL_LOG_PER_SECOND
        self._log_window = 0.0
        self._log_suppressed = 0
        #: the relay, for migrations (set by the dispatcher: :mod:`._migration`)
        self.place_migration: Callable[[Waiting], None] = _no_relay
        self.migration_failed: Callable[[Waiting, str], None] = _no_relay
        #: once this dispatcher has handed over (upgrade): forwards a connection to the
        #: new one (False: could not)
        self.upstream: Callable[[Waiting], bool] | None = None

    def place(self, w: Waiting, *, front: bool = False) -> None:
        """Send ``w`` to a worker with room, or queue it, or refuse it."""
        if w.origin is not None:
            self.place_migration(w)
            return
        pool = self.pools[w.info.pool]
        if not pool.queue and self.assign(pool, w):
            return
        if self.upstream is not None and self.upstream(w):
            return
        if front:
            pool.queue.appendleft(w)
        elif len(pool.queue) < pool.cfg.queue:
            pool.queue.append(w)
        else:
            self.refuse(w, "queue_full",
                        f"every worker of pool {pool.cfg.name!r} is full and "
                        f"{len(pool.queue)} connection(s) already wait")
            return
        self.feed(pool)

    def assign(self, pool: PoolState, w: Waiting) -> bool:
        # WorkerSlot.has_room, inlined: once per connection
        candidates = [s for s in pool.workers if s.state is READY and s.channel is not None
                      and s.connections < s.limit]
        if w.exclude is not None and len(candidates) > 1:
            candidates = [s for s in candidates if s.id != w.exclude]
        if not candidates:
            return False
        pick = pool.policy(candidates, w.info)
        if pick is None:
            return False
        assert isinstance(pick, WorkerSlot)
        self.reserve(pick, w)
        return True

    def reserve(self, slot: WorkerSlot, w: Waiting) -> None:
        slot.reserved += 1
        batch = self.batches.get(slot)
        if batch is None:
            self.batches[slot] = [w]
        else:
            batch.append(w)
        if not self._flush_scheduled and not self.accepting:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def feed(self, pool: PoolState) -> None:
        """Hand what waits in ``pool``'s queue to workers with room (after the handed-over
        dispatcher: to its successor), in order, until one does not fit."""
        while pool.queue and self.assign(pool, pool.queue[0]):
            pool.queue.popleft()
        upstream = self.upstream
        if upstream is not None:
            while pool.queue and upstream(pool.queue[0]):
                pool.queue.popleft()

    def flush(self) -> None:
        """Send this loop turn's handoffs: one send_nowait per worker."""
        self._flush_scheduled = False
        batches, self.batches = self.batches, {}
        for slot, items in batches.items():
            slot.reserved -= len(items)
            ch = slot.channel
            if ch is None or slot.state is not READY:
                self.bounce(slot, items, "the worker went away before the handoff was sent")
                continue
            try:
                tickets = ch.send_nowait([(w.sock, w.encoded_meta(), w.data) for w in items], ack=True)
            except ChannelError as exc:
                self.bounce(slot, items, f"the channel is unusable: {exc}")
                continue
            except (SockshareError, ValueError, OSError) as exc:
                for w in items:
                    self.refuse(w, "error", f"cannot hand over: {exc}")
                continue
            now = time.monotonic()
            for t, w in zip(tickets, items, strict=True):
                w.sent = now
                slot.pending[t.id] = (t, w)

    def bounce(self, slot: WorkerSlot, items: list[Waiting], why: str) -> None:
        for w in items:
            self.redispatch(w, slot, why, counts=False)

    def redispatch(self, w: Waiting, slot: WorkerSlot, why: str, *, counts: bool = True) -> None:
        if counts:
            w.attempts += 1
        w.exclude = slot.id
        if w.origin is not None:
            w.tried.append(slot)
        if w.attempts > self.cfg.max_retries:
            self.refuse(w, "retries_exhausted",
                        f"handed over {w.attempts} times without being accepted; last: {why}")
            return
        if counts:
            self.counters["redispatches"] += 1
            if w.origin is None:
                w.meta["attempt"] = w.attempts
                w.raw = None
            log.info("re-dispatching %s (%s)", w.info.handoff_id, why)
        self.place(w, front=True)

    def refuse(self, w: Waiting, reason: str, detail: str, *, count: bool = True,
               http_status: int | None = None) -> None:
        """Close a connection no worker will serve: with a reset, or, for an HTTP client
        (``http_status``), with the answer an HTTP server would give."""
        if w.origin is not None:
            self.migration_failed(w, detail)
            return
        if count:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        if http_status is None and w.data and w.meta.get("protocol") == "http":
            # a sniffed HTTP request that no worker will take: what a full server says
            http_status = 503
        if http_status is None or not http_refusal(w.sock, http_status):
            close_reset(w.sock)
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            self.flush_refusal_log()
            self._log_window = now
            self._log_budget = REFUSAL_LOG_PER_SECOND
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning("refused %s from %s (%s): %s", w.info.handoff_id, w.info.client, reason, detail)
        else:
            self._log_suppressed += 1

    def flush_refusal_log(self) -> None:
        if self._log_suppressed:
            log.warning("refused %d more connection(s) in the last second (totals: %s)",
                        self._log_suppressed, self.refused)
            self._log_suppressed = 0

    def drop(self, w: Waiting) -> None:
        """Close our copy of a held connection (a migration: its source decides)."""
        if w.origin is not None and not w.origin.answered:
            with contextlib.suppress(SockshareError):
                w.origin.reject("the dispatcher is stopping")
        w.sock.close()

    # -- for the housekeeping and the shutdown ------------------------------------------

    def expire(self, now: float) -> None:
        """Refuse what waited past ``queue_timeout``; feed the rest."""
        timeout = self.cfg.queue_timeout
        for pool in self.pools.values():
            # (not only from the head: a re-dispatch goes to the head of the queue and
            # may have waited less than those behind it)
            if any(now - w.since > timeout for w in pool.queue):
                expired = [w for w in pool.queue if now - w.since > timeout]
                kept = [w for w in pool.queue if now - w.since <= timeout]
                pool.queue.clear()
                pool.queue.extend(kept)
                for w in expired:
                    self.refuse(w, "queue_timeout", f"waited {timeout:.0f} s for a free worker")
            self.feed(pool)

    def queued(self) -> int:
        return sum(len(p.queue) for p in self.pools.values())

    def refuse_queued(self, reason: str, detail: str) -> None:
        for pool in self.pools.values():
            while pool.queue:
                self.refuse(pool.queue.popleft(), reason, detail)

    def drop_batches(self) -> None:
        for items in self.batches.values():
            for w in items:
                self.drop(w)
        self.batches.clear()

    def log_tick(self, now: float) -> None:
        """The summary line of the refusals not logged, once their second is over."""
        if now - self._log_window >= 1.0:
            self.flush_refusal_log()
