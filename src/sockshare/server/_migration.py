"""Migration: the relay, direct moves, orphans, peer lists, rebalancing.

A live connection moves from one worker to another in one of two ways.

*Relayed* (two hops, chained acknowledgements): the source sends it to the dispatcher as
a HANDOFF on its own channel, meta ``{"resume": state}``; :meth:`Migrations.take` makes a
:class:`~sockshare.server._slots.Waiting` with ``origin`` set, and :meth:`place` picks a
target of the pool that can resume (fewest connections; the source and the workers
already tried excluded) and forwards it at once through admission's batches. The
source is answered only when the target has: :meth:`done` (ACCEPT after the target's
ACCEPT) or :meth:`failed` (REJECT: no worker could take it; the source keeps serving
it; a source that is gone cannot, so our copy is closed). Every descriptor copy has one
owner at a time. After an upgrade's hand-over, a migration with no local target goes to
the new dispatcher (``Handover.forward``).

*Direct* (one hop): every ready worker that resumes gets the list of its peers
(:meth:`push_peers`, ``{"cmd": "peers", ...}``) and moves a handler's connection to one
itself; the dispatcher learns of it afterwards from ``moved_out``/``moved_in`` reports
(and ``moving`` for one still unanswered, which ``--timeout`` watches: see
``Supervisor.kill_hung``). A target whose ACCEPT could not reach a source that closed
first asks whether it may serve the *orphan* (:meth:`answer_orphan`): yes only if the
source is a worker of ours that exited, or a process not ours (an upgrade's old worker)
that no longer runs.

*Asked for*: :meth:`ask_migrate` sends ``{"cmd": "migrate", ...}`` to a worker and waits
for its ``migrate_ack``; the rebalancer (:meth:`rebalance`: load spread past a threshold,
or a worker over ``max_conns``) and ``sockshare migrate`` (:meth:`command`) use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sockshare._channel import Handoff
from sockshare._errors import SockshareError
from sockshare.server._messages import (
    Migrate,
    MigrateAck,
    MoveBack,
    MovedIn,
    MovedOut,
    Moving,
    OrphanAnswer,
    OrphanQuery,
    PeerEntry,
    Peers,
)
from sockshare.server._metrics import Histogram
from sockshare.server._platform import pid_alive
from sockshare.server._policy import ConnInfo, LeastConnections
from sockshare.server._slots import PoolState, SlotState, Waiting, WorkerSlot

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["LATENCY_SAMPLES", "ORPHAN_MEMORY", "ORPHAN_WAIT", "REBALANCE_BATCH", "REBALANCE_RATE",
           "Migrations"]

log = logging.getLogger("sockshare.server")

READY = SlotState.READY
#: Migrations asked of one worker per rebalancing round, at most: the batch is half
#: the spread (or the excess over ``max_conns``), so a large imbalance evens out in one
#: or two rounds; but the busy worker moves them all at once, so this many at most (its
#: other connections wait for its event loop meanwhile: a few ms)
REBALANCE_BATCH = 512
#: Connections a worker is asked to move per second, at most: the next round for the
#: same worker waits until its last batch had time to leave at this rate (and at least
#: ``rebalance_interval``)
REBALANCE_RATE = 1000.0
#: Migration latencies kept for the percentiles in ``status``.
LATENCY_SAMPLES = 2048
#: seconds to wait for a worker to be reaped before saying it lives (the worker waits 5)
ORPHAN_WAIT = 3.0
#: seconds a worker's exit is remembered for those questions
ORPHAN_MEMORY = 60.0


#: seconds ``sockshare migrate`` waits for the worker to say how many it flagged (2 s
#: was too short for a worker with 10,000 WebSockets on a busy 2-core machine: the command
#: failed, "did not answer", while the connections moved)
COMMAND_ACK_TIMEOUT = 10.0


class Migrations:
    """The relay and the bookkeeping of direct moves."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.cfg = d.cfg
        self.pools = d.pools
        self.slots = d.slots
        self.counters = d.counters
        self.admission = d.admission
        #: direct migrations still unanswered a few ms after they left: (source pid,
        #: handoff id) -> (target, since); for --timeout and the status
        self.moving: dict[tuple[int, int], tuple[WorkerSlot, float]] = {}
        #: the same for targets that are not ours (an upgrade's old workers moving to the
        #: new dispatcher's; or ours without a channel): a drain's progress only, for a
        #: while (their --timeout is not ours)
        self.moving_away: dict[tuple[int, int], float] = {}
        #: worker pids that exited (reaped), and when: a target whose ACCEPT could not
        #: reach a dead source may serve the connection
        self.exited: dict[int, tuple[float, WorkerSlot]] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.latency_histogram = Histogram()
        #: where migrated connections go: fewest connections, ties rotate (whatever the
        #: pool's policy: a migration moves a connection *away* from its worker)
        self._policy = LeastConnections()
        self._req_ids = itertools.count(1)
        #: migrate requests waiting for their migrate_ack, by request number
        self.acks: dict[int, asyncio.Future[int]] = {}

    # -- the relay -----------------------------------------------------------------------

    def take(self, source: WorkerSlot | None, h: Handoff, *, flush: bool = True) -> None:
        """A connection handed to us by a worker (or the old dispatcher) to move on.
        ``flush=False``: one of several read at once; the caller sends them all with one
        :meth:`Admission.flush` (a batch, one write per target) once it took the last."""
        self.d.gc_hold.moved()
        try:
            meta = h.meta
        except ValueError:
            h.reject("undecodable metadata")
            return
        if not isinstance(meta, dict) or "resume" not in meta:
            h.reject('a worker may only hand over connections it migrates (meta "resume")')
            return
        # non-blocking, as the paused transport of the source had it (an AsyncChannel
        # delivers it so already; a no-op then)
        with contextlib.suppress(OSError):
            h.socket.setblocking(False)
        pool = meta.get("pool")
        raw: bytes | None = h.raw_meta   # (forwarded as it came, unless changed here)
        if pool not in self.pools:
            pool = self.cfg.default_pool
            meta["pool"] = pool
            raw = None
        info = ConnInfo(meta.get("client"), str(meta.get("listener", "")), pool,
                        str(meta.get("handoff_id", "")), meta)
        if source is not None:
            # in transit: no longer the source's (which will not report it closed) unless
            # it comes back refused; so a source that dies now does not count it lost
            source.active = max(0, source.active - 1)
        self.place(Waiting(h.socket, info, meta, h.data, time.monotonic(), origin=h,
                           origin_slot=source,
                           origin_channel=source.channel if source is not None else None,
                           raw=raw), flush=flush)

    def place(self, w: Waiting, *, flush: bool = True) -> None:
        pool = self.pools.get(w.info.pool) or self.pools[self.cfg.default_pool]
        candidates = [s for s in pool.workers if s.has_room() and s.can_resume
                      and s is not w.origin_slot and s not in w.tried]
        if candidates:
            pick = self._policy(candidates, w.info)
            assert isinstance(pick, WorkerSlot)
            self.admission.reserve(pick, w)
            if flush:   # a migration is latency-bound: forward it now (or with its batch)
                self.admission.flush()
            return
        if self.d.handover.handed_over and self.d.handover.forward(w):
            return
        self.failed(w, f"no other worker of pool {pool.cfg.name!r} can take it")

    def failed(self, w: Waiting, why: str) -> None:
        """No target: the source gets its connection back (REJECT) and keeps serving it;
        a source that is gone cannot, so our copy is closed (FIN, not RST)."""
        h = w.origin
        assert h is not None
        # (the same process: a slot whose worker died may have a successor by now, which
        # never had this connection)
        source_alive = (w.origin_slot is None or (w.origin_slot.channel is not None
                                                  and w.origin_slot.channel is w.origin_channel)
                        ) and not h.answered
        if not h.answered:
            with contextlib.suppress(SockshareError):
                h.reject(why[:1000])   # closes our copy
        w.sock.close()
        if source_alive:
            if w.origin_slot is not None:
                w.origin_slot.active += 1   # it stays the source's
            self.counters["migrations_refused"] += 1
            log.info("migration of %s refused: %s", w.info.handoff_id, why)
        else:
            self.counters["migrations_closed"] += 1
            log.warning("migration of %s: the source is gone and %s; closed", w.info.handoff_id, why)

    # -- direct migrations (worker to worker; we hear of them afterwards) --------------

    def push_peers(self, pool: PoolState) -> None:
        """Tell every ready worker of ``pool`` that resumes which others take its
        migrations directly, ``{"cmd": "peers", "peers": [[id, pid, path, connections,
        room]]}`` (when that changed): the workers of the pool that are ready, not retired
        and have room (:meth:`targets`). A worker that a reload retires gets the list too
        (the new generation): its connections go straight there. Once an upgrade handed
        over, our workers get the new dispatcher's list for their pool (its workers, as
        it last told us: :meth:`Handover.successor_peers`). A worker that is not listed,
        or lists nobody, relays."""
        if not self.cfg.direct_migration:
            return
        # (a worker that gave no peer socket in its hello is never listed, nor told)
        ready = [s for s in pool.workers if self._peer_capable(s) and s.state is READY]
        handover = self.d.handover
        targets = (handover.successor_peers.get(pool.cfg.name, ()) if handover.handed_over
                   else self.targets(pool))
        # (a reload's old workers are no longer the pool's, but still its: they move
        # their connections to the new ones; an upgrade's, to the new dispatcher's)
        leaving = [s for s in self.slots if s.pool_state is pool and s.retired
                   and s.state is SlotState.RETIRING and self._peer_capable(s)]
        for s in ready + leaving:
            listed = tuple(e for e in targets if e.pid != s.pid)
            if listed != s.peers_sent and s.control(Peers(listed)):
                s.peers_sent = listed

    @staticmethod
    def _peer_capable(s: WorkerSlot) -> bool:
        return bool(s.channel is not None and s.can_resume and s.peer_path and s.pid)

    def targets(self, pool: PoolState) -> tuple[PeerEntry, ...]:
        """The workers of ``pool`` that take direct migrations now: ready, not retired,
        with room (under ``max_conns`` and their descriptors), each with that room."""
        if not self.cfg.direct_migration:
            return ()
        return tuple(PeerEntry(o.id, o.pid or 0, o.peer_path, o.connections,   # (pid set)
                               None if o.limit >= sys.maxsize
                               else max(0, o.limit - o.connections))
                     for o in pool.workers
                     if o.state is READY and self._peer_capable(o) and not o.retired
                     and o.has_room())

    def moved_in(self, slot: WorkerSlot, msg: MovedIn) -> None:
        """The target's report of direct migrations: counted in."""
        for _hid, latency in msg.arrivals():   # (measured by the target as resume started)
            slot.active += 1
            slot.stats.migrated_in += 1
            self.counters["migrations"] += 1
            self.counters["migrations_direct"] += 1
            if latency is not None and 0 <= latency < 60:
                self.record_latency(latency)

    def moving_out(self, slot: WorkerSlot, msg: Moving) -> None:
        """The source's direct moves still unanswered after a few ms: --timeout watches
        them."""
        target = next((s for s in slot.pool_state.workers if s.id == msg.to
                       and s.channel is not None), None)
        now = time.monotonic()
        for key in msg.keys:
            if target is not None:
                self.moving[key] = (target, now)
            else:
                self.moving_away[key] = now

    def moved_out(self, slot: WorkerSlot, msg: MovedOut) -> None:
        """The source's direct moves left: counted out."""
        keys = msg.keys
        slot.active = max(0, slot.active - len(keys))
        slot.stats.migrated_out += len(keys)
        self.admission.feed(slot.pool_state)
        for key in keys:
            self.moving.pop(key, None)
            self.moving_away.pop(key, None)

    def move_back(self, slot: WorkerSlot, msg: MoveBack) -> None:
        """Announced direct moves came back to their source."""
        for key in msg.keys:
            self.moving.pop(key, None)
            self.moving_away.pop(key, None)

    def moving_from(self, pid: int, within: float) -> bool:
        """Whether worker ``pid`` has announced direct moves still unanswered: to ours
        (--timeout watches those), or announced less than ``within`` seconds ago to
        others (an upgrade's new workers, which we cannot kill when they hang)."""
        if any(k[0] == pid for k in self.moving):
            return True
        since = time.monotonic() - within
        return any(k[0] == pid and t >= since for k, t in self.moving_away.items())

    def forget_moves_from(self, pid: int) -> None:
        """Worker ``pid`` is gone: its moves are settled by their targets now."""
        for table in (self.moving, self.moving_away):
            for key in [k for k in table if k[0] == pid]:
                del table[key]

    async def answer_orphan(self, slot: WorkerSlot, msg: OrphanQuery) -> None:
        """A target could not deliver its ACCEPT of a direct migration: the source's end
        closed first. Dead (a worker of ours that exited in the last ORPHAN_MEMORY s; not
        ours -- an upgrade's old worker -- and no longer running): the target serves it.
        Alive: it must not. A source still running gets ORPHAN_WAIT seconds to be reaped
        (a SIGKILL is seen within ms)."""
        pid = msg.pid
        dead = False
        if pid > 0:
            deadline = time.monotonic() + ORPHAN_WAIT
            while True:
                now = time.monotonic()
                exited = self.exited.get(pid)
                if exited is not None and now - exited[0] < ORPHAN_MEMORY:
                    dead = True
                    source = exited[1]
                    # it died counting the connection as its own: not lost after all
                    ch = source.channel
                    if ch is not None and ch.peer.pid == pid:   # (not detached yet)
                        source.active = max(0, source.active - 1)
                    else:
                        source.stats.lost = max(0, source.stats.lost - 1)
                        self.counters["lost"] = max(0, self.counters["lost"] - 1)
                    source.stats.migrated_out += 1
                    break
                # (ours until its exit is recorded above: its returncode is set a turn
                # of the loop before that)
                ours = any(s.proc is not None and s.proc.pid == pid for s in self.slots)
                if not ours and pid not in self.exited and not pid_alive(pid):
                    # (an upgrade's old worker, its predecessor's: gone, so nobody else
                    # can serve the connection; our counts never had it)
                    dead = True
                    break
                if (not ours and pid in self.exited) or now >= deadline:
                    break
                await asyncio.sleep(0.01)
        log.info("direct migration from pid %s whose ACCEPT was lost: the source is %s; "
                 "worker %d %s it", pid, "gone" if dead else "alive", slot.id,
                 "serves" if dead else "closes")
        slot.control(OrphanAnswer(msg.key, dead))

    def done(self, w: Waiting, target: WorkerSlot | None) -> None:
        h = w.origin
        assert h is not None
        with contextlib.suppress(SockshareError):
            h.accept()
        self.counters["migrations"] += 1
        if w.origin_slot is not None:
            w.origin_slot.stats.migrated_out += 1
        if target is not None:
            target.stats.migrated_in += 1
        mig = w.meta.get("migration")
        started = mig.get("started") if isinstance(mig, dict) else None
        now = time.monotonic()
        if isinstance(started, float) and 0 <= now - started < 60:
            self.record_latency(now - started)   # CLOCK_MONOTONIC is system-wide
        else:
            self.record_latency(now - w.since)

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.latency_histogram.observe(seconds)

    # -- migration requests, rebalancing -----------------------------------------------

    async def ask_migrate(self, slot: WorkerSlot, n: int | None, reason: str,
                          timeout: float = 2.0) -> int:
        """Ask ``slot`` to migrate up to ``n`` connections (None: all that can); returns how
        many it flagged (-1: no answer)."""
        req = next(self._req_ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.acks[req] = fut
        self.counters["migration_requests"] += 1
        if not slot.control(Migrate(n, reason, req)):
            self.acks.pop(req, None)
            return -1
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.acks.pop(req, None)
            return -1

    def rebalance(self, now: float) -> None:
        for pool in self.pools.values():
            if not pool.rebalance:
                continue
            ws = [s for s in pool.workers if s.state is READY and s.can_resume and s.channel]
            if len(ws) < 2:
                continue
            busiest = max(ws, key=lambda s: (s.active, -s.id))
            idlest = min(ws, key=lambda s: (s.connections, s.id))
            cap = pool.cfg.max_conns
            excess = busiest.active - cap if cap is not None and busiest.active > cap else 0
            spread = busiest.active - idlest.connections
            threshold = max(self.cfg.rebalance_min, self.cfg.rebalance_spread * busiest.active)
            if (excess <= 0 and spread <= threshold) or now < busiest.rebalance_after:
                continue
            n = min(REBALANCE_BATCH, max(excess, spread // 2))
            if n <= 0:
                continue
            busiest.rebalance_after = now + max(self.cfg.rebalance_interval, n / REBALANCE_RATE)
            self.counters["rebalances"] += 1
            log.info("rebalance: worker %d has %d connection(s), worker %d %d: asking %d to move",
                     busiest.id, busiest.active, idlest.id, idlest.connections, n)
            self.d.spawn(self.ask_migrate(busiest, n, "rebalance"), critical=False)

    async def command(self, req: dict[str, Any]) -> dict[str, Any]:
        wid, count = req.get("from"), req.get("count")
        if not isinstance(wid, int) or (count is not None and (not isinstance(count, int) or count < 0)):
            return {"ok": False, "error": 'migrate takes {"from": worker id, "count": n or null}'}
        slots = [s for s in self.slots if s.id == wid and s.state is READY and not s.retired]
        if not slots:
            return {"ok": False, "error": f"worker {wid} is not a ready worker"}
        slot = slots[0]
        if not slot.can_resume:
            return {"ok": False, "error": f"worker {wid}'s app has no resume handler: it cannot migrate"}
        others = [s for s in slot.pool_state.workers if s is not slot and s.can_resume and s.has_room()]
        if not others:
            return {"ok": False, "error": f"no other worker of pool {slot.pool!r} can take connections"}
        before = slot.stats.migrated_out
        refused_before = self.counters["migrations_refused"]
        # (a worker busy with thousands of connections, on a loaded machine, may take
        # seconds to answer; meanwhile the ones it flagged are moving already)
        flagged = await self.ask_migrate(slot, count, "request", timeout=COMMAND_ACK_TIMEOUT)
        if flagged < 0:
            return {"ok": False, "error": f"worker {wid} did not answer"}

        def done() -> int:   # moved, or refused (it stays on its worker)
            return (slot.stats.migrated_out - before
                    + self.counters["migrations_refused"] - refused_before)

        if req.get("wait") and flagged:
            # until every flagged one moved or was refused, or none did for ``timeout``
            # seconds (one in the middle of a request moves when its handler lets it)
            quiet = float(req.get("timeout") or 10.0)
            last, since = done(), time.monotonic()
            while done() < flagged:
                now = time.monotonic()
                if done() != last:
                    last, since = done(), now
                elif now - since >= quiet or slot.proc is None or slot.proc.returncode is not None:
                    break
                await asyncio.sleep(0.01)
        moved = slot.stats.migrated_out - before
        return {"ok": True, "worker": wid, "asked": count, "flagged": flagged, "migrated": moved,
                "refused": self.counters["migrations_refused"] - refused_before}

    def acked(self, slot: WorkerSlot, msg: MigrateAck) -> None:
        """A worker's ``migrate_ack``: how many connections it flagged."""
        fut = self.acks.pop(msg.req or 0, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.n)

    def forget_exits(self, now: float) -> None:
        for pid in [p for p, (t, _s) in self.exited.items() if now - t > ORPHAN_MEMORY]:
            del self.exited[pid]
