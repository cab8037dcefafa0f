"""``--dispatchers N``: the dispatcher (the *lead*) and its N-1 feeder processes.

One asyncio process accepts, places and hands over every connection; past some rate
that is one core's worth. With ``--dispatchers N`` the lead starts N-1 *feeders*
(``python -m sockshare.server._feeder``, :mod:`._feeder`) that accept on the same
listening sockets (inherited) and hand connections straight to the workers, each over
a channel of its own to each worker (``_feedin``). What stays the lead's alone:
supervision, reload, upgrade, migration, rebalancing, the control socket, metrics --
and the books.

The books. A worker counts in what it accepted from a feeder with ``{"ev": "fed",
"n": k}`` on its channel to the lead, before the close report of any of them (the same
stream), so the lead's count of each worker's connections (``active``) stays exact
with any number of feeders, and migrations, ``max_conns``, rebalancing and the status
see every connection. The lead tells each feeder the ready workers and their loads
(:meth:`Feeders.publish`: ``{"cmd": "workers", "w": [[id, pool, pid, path,
connections, limit], ...]}``, when it changed, at most every :data:`PUBLISH_INTERVAL`);
a feeder adds its own handoffs in flight, so least-connections is over the whole pool
(a feeder's view is at most one interval old: ``max_conns`` may be passed by what the
feeders hand over within it).

What a feeder cannot place (no worker ready, every one full, or after the hand-over of
an upgrade) it hands to the lead over its channel (acknowledged): the lead queues it,
places it or forwards it. Rejected and returned tickets a feeder re-dispatches itself.

Life. A feeder exits on EOF from the lead (the lead died or stops); the lead restarts
one that exits (backoff as for workers). On an upgrade the new dispatcher brings its
own feeders; at the hand-over the old lead tells its feeders to stop accepting
(``{"cmd": "stop"}``). Status: :meth:`Feeders.status`, per dispatcher its pid, accepted
connections, handoffs and CPU seconds (each feeder reports every half second).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import pickle
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from sockshare._aio import AsyncChannel
from sockshare._channel import Handoff
from sockshare._errors import SockshareError
from sockshare.server._feeder import ENV_CONFIG, ENV_FDS, ENV_ID
from sockshare.server._feedin import FEED_SUFFIX
from sockshare.server._messages import Fed
from sockshare.server._policy import ConnInfo
from sockshare.server._slots import SlotState, Waiting, WorkerSlot

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["PUBLISH_INTERVAL", "Feeders"]

log = logging.getLogger("sockshare.server")

#: seconds between two looks at the workers' loads for the feeders while they change
PUBLISH_INTERVAL = 0.005
#: ... and once they have not changed for a second (an idle server sleeps)
IDLE_PUBLISH_INTERVAL = 0.1
_NO_LIMIT = 1 << 62


class Feeders:
    """The lead's side: the feeder processes, their channels, the workers' table."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.cfg = d.cfg
        self.n = d.cfg.dispatchers - 1
        self.procs: dict[int, asyncio.subprocess.Process | None] = dict.fromkeys(
            range(1, self.n + 1))
        self.channels: dict[int, AsyncChannel] = {}
        #: each feeder's last report (``{"ev": "feeder", ...}``)
        self.reports: dict[int, dict[str, Any]] = {}
        self.restarts = 0
        #: handoffs the workers counted in from feeders (``fed``)
        self.fed = 0
        #: connections feeders handed to us (no worker could take them there)
        self.overflow = 0
        #: (worker pid, feeder) -> handoffs of that feeder the worker counted in
        self.fed_by: dict[tuple[int, int], int] = {}
        self._sent: dict[int, list[list[Any]]] = {}
        self._stopped = False
        self._resend = 0.0
        self._config_raw = pickle.dumps(d.cfg)
        self._config = base64.b64encode(self._config_raw).decode()
        #: feeders asked to exit for a new configuration (restarted at once)
        self._renewing: set[int] = set()

    # -- the processes -------------------------------------------------------------------

    def start(self) -> None:
        for k in self.procs:
            self.d.spawn(self._supervise(k))
        self.d.spawn(self._publisher())
        log.info("%d feeder(s) accept beside this dispatcher (--dispatchers %d)", self.n,
                 self.n + 1)

    async def _supervise(self, k: int) -> None:
        failures = 0
        while not self._stopped and not self.d.stopping:
            fds = [ls.sock.fileno() for ls in self.d.listeners.all]
            env = dict(os.environ)
            env.update({ENV_CONFIG: self._config, ENV_FDS: ",".join(map(str, fds)),
                        ENV_ID: str(k), "SOCKSHARE_CHANNEL": self.d.chan_path})
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sockshare.server._feeder", pass_fds=fds, env=env)
            except OSError as exc:
                log.error("cannot start feeder %d: %s", k, exc)
                proc = None
            started = time.monotonic()
            if proc is not None:
                self.procs[k] = proc
                rc = await proc.wait()
                self.procs[k] = None
                if self._stopped or self.d.stopping:
                    return
                if rc == 0 and k in self._renewing:
                    self._renewing.discard(k)
                    log.info("feeder %d (pid %d) exited for the new configuration", k, proc.pid)
                    failures = 0
                    continue
                log.warning("feeder %d (pid %d) exited (%s); restarting it", k, proc.pid,
                            f"signal {-rc}" if rc < 0 else f"status {rc}")
                self.restarts += 1
            ran = time.monotonic() - started
            failures = 1 if ran >= self.cfg.stable_after else failures + 1
            await asyncio.sleep(min(self.cfg.backoff_max,
                                    self.cfg.backoff_initial * 2 ** (failures - 1)))

    def stop_accepting(self, why: str) -> None:
        """The feeders stop accepting (an upgrade's hand-over, a stop) and are not
        restarted any more; they exit when our channels close."""
        if self._stopped:
            return
        self._stopped = True
        for ch in list(self.channels.values()):
            with contextlib.suppress(SockshareError):
                ch.send_control({"cmd": "stop", "why": why})

    async def close(self) -> None:
        """(The dispatcher's teardown.) Close their channels: EOF, they exit; killed
        after two seconds."""
        self._stopped = True
        for ch in list(self.channels.values()):
            with contextlib.suppress(Exception):
                await ch.aclose()
        self.channels.clear()
        procs = [p for p in self.procs.values() if p is not None and p.returncode is None]
        if procs:
            _done, pending = await asyncio.wait({asyncio.ensure_future(p.wait()) for p in procs},
                                                timeout=SETTLE_WAIT)
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=2.0)

    def kill(self) -> None:
        """(A dispatcher dying of an exception.) No feeder outlives it."""
        for p in self.procs.values():
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()

    # -- their channels -------------------------------------------------------------------

    def claim(self, ch: AsyncChannel) -> bool:
        """A channel on the workers' listener that is no worker's: ours if a feeder of
        ours opened it (its name and pid)."""
        name = ch.peer.name
        if not name.startswith("feeder:") or not name[7:].isdigit():
            return False
        k = int(name[7:])
        proc = self.procs.get(k)
        if proc is None or proc.pid != ch.peer.pid or k in self.channels:
            return False
        self.channels[k] = ch
        ch.track_accepts()
        ch.on_activity = lambda: self._on_activity(k, ch)
        self._on_activity(k, ch)   # (what came with the handshake's last read)
        self.d.spawn(self._watch(k, ch), critical=False)
        log.info("feeder %d (pid %d) connected", k, ch.peer.pid)
        if self._stopped:
            with contextlib.suppress(SockshareError):
                ch.send_control({"cmd": "stop", "why": "the dispatcher is stopping"})
        else:
            self.publish()
        return True

    async def _watch(self, k: int, ch: AsyncChannel) -> None:
        await ch.wait_closed()
        self._on_activity(k, ch)
        if self.channels.get(k) is ch:
            del self.channels[k]
        self.reports.pop(k, None)
        self._lead_accepts()   # (the last one gone: we accept again, at once)
        self._sent.pop(k, None)
        with contextlib.suppress(Exception):
            await ch.aclose()

    def _on_activity(self, k: int, ch: AsyncChannel) -> None:
        try:
            for msg in ch.received_controls():
                if msg.get("ev") == "feeder":
                    self.reports[k] = msg
                    self._lead_accepts()
                elif msg.get("ev") == "hung":
                    self._hung(k, msg)
                elif msg.get("ev") == "gone":
                    self._gone(k, msg)
            ch.accepted()
            ch.returned()
            for h in ch.received():
                self._admit(h)
        except Exception:   # in the channel's read callback: never let it escape
            log.exception("feeder %d: handling its frames failed", k)

    def _hung(self, k: int, msg: dict[str, Any]) -> None:
        """Feeder ``k`` says a worker left one of its handoffs unanswered past --timeout:
        killed as if it were one of ours (``Supervisor.kill_hung``)."""
        slot = next((s for s in self.d.slots if s.pid is not None and s.pid == msg.get("pid")),
                    None)
        if slot is None or slot.hung or slot.proc is None:
            return
        slot.hung = True
        self.d.counters["hung_kills"] += 1
        log.error("worker %d (pid %d) left %s handoff(s) of feeder %d unanswered for %s s "
                  "(--timeout %g): killing it; they go to other workers", slot.id,
                  slot.proc.pid, msg.get("n"), k, msg.get("age"), self.cfg.timeout)
        with contextlib.suppress(ProcessLookupError):
            slot.proc.kill()

    def _gone(self, k: int, msg: dict[str, Any]) -> None:
        """Feeder ``k``'s channel to a worker process ended; it had accepted
        ``accepted`` of the feeder's handoffs. Those the worker never counted in (killed
        before its ``fed`` report left) were open in it: lost with it."""
        pid, accepted = msg.get("pid"), msg.get("accepted")
        if isinstance(pid, int) and isinstance(accepted, int):
            self.d.spawn(self._count_lost(k, pid, msg.get("id"), accepted), critical=False)

    async def _count_lost(self, k: int, pid: int, wid: Any, accepted: int) -> None:
        slot = next((s for s in self.d.slots if s.id == wid and s.proc is not None
                     and s.proc.pid == pid), None)
        # after the lead has read the worker's last reports and seen it exit
        if slot is not None and not await self.d.supervisor.until(
                lambda: slot.proc is None or slot.proc.pid != pid
                or (slot.proc.returncode is not None and slot.channel is None), 5.0):
            return   # (alive: a feeder's channel closed, not the worker)
        counted = self.fed_by.pop((pid, k), 0)
        if accepted <= counted:
            return
        self.d.counters["lost"] += accepted - counted
        if slot is not None:
            slot.stats.lost += accepted - counted
        log.warning("worker pid %d went away with %d connection(s) from feeder %d it had not "
                    "reported: lost with it", pid, accepted - counted, k)

    def _admit(self, h: Handoff) -> None:
        """A connection a feeder could not place: ours now, as if we had accepted it."""
        try:
            meta = h.meta
        except SockshareError:
            meta = None
        pool = meta.get("pool") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or not isinstance(pool, str) or pool not in self.d.pools:
            with contextlib.suppress(SockshareError):
                h.reject(f"no pool {pool!r} here")
            return
        sock = h.socket
        try:
            h.accept()
        except SockshareError:
            return   # (the feeder is gone: its copy went with it, ours closes here)
        self.overflow += 1
        attempts = meta.get("attempt", 0)
        info = ConnInfo(meta.get("client"), str(meta.get("listener", "")), pool,
                        str(meta.get("handoff_id", "")), meta)
        w = Waiting(sock, info, meta, h.data, time.monotonic(),
                    attempts=attempts if isinstance(attempts, int) else 0)
        self.d.admission.place(w)

    def _lead_accepts(self) -> None:
        """The lead accepts only while no feeder does: a connection a feeder hands over
        costs the lead its books (``fed``, ``closed``: a third of handing it over,
        measured), so the lead's core is kept for that, and the ceiling is the feeders'
        combined. When none accepts (none up yet, all crashed, restarting), the lead
        accepts again at once; connections wait in the kernel's queue meanwhile."""
        feeding = any(r.get("accepting") and r.get("workers") and k in self.channels
                      for k, r in self.reports.items())
        for ls in self.d.listeners.all:
            if feeding and "feeders" not in ls.holds:
                self.d.listeners.hold(ls, "feeders")
            elif not feeding and "feeders" in ls.holds:
                self.d.listeners.release(ls, "feeders")

    # -- the workers' table ---------------------------------------------------------------

    def counted(self, slot: WorkerSlot, msg: Fed) -> None:
        """A worker counted in handoffs from a feeder (``fed``)."""
        self.fed += msg.n
        pid = slot.pid
        if msg.by is not None and pid is not None:
            key = (pid, msg.by)
            self.fed_by[key] = self.fed_by.get(key, 0) + msg.n

    def table(self) -> list[list[Any]]:
        """The ready workers a feeder may hand to, with their loads: those of the pools'
        rotation, as the lead's own admission. (Not every ready slot: while a reload
        waits for its new workers, a new one is ready beside the old one of the same id,
        and a list with both made each feeder swap its channel between the two at every
        list -- each closed channel reported ``gone``, and the lead counted what the
        worker had accepted through it as lost.)"""
        base = os.path.dirname(self.d.chan_path)
        out: list[list[Any]] = []
        for pool in self.d.pools.values():
            for slot in pool.workers:
                pid = slot.pid
                if (slot.state is not SlotState.READY or not slot.hello or not slot.python
                        or pid is None or slot.channel is None):
                    continue
                out.append([slot.id, slot.pool, pid, os.path.join(base, f"{pid}{FEED_SUFFIX}"),
                            slot.connections, min(slot.limit, _NO_LIMIT)])
        return out

    def publish(self) -> bool:
        """Send each feeder the table if it changed since its last one (True if it had)."""
        if not self.channels or self._stopped:
            return False
        changed = False
        base = self.table()
        now = time.monotonic()
        for k, ch in list(self.channels.items()):
            # each feeder also hears how many of *its* handoffs each worker counted in:
            # what it handed since, the lead's count does not hold yet
            table = [[*row, self.fed_by.get((row[2], k), 0)] for row in base]
            if self._sent.get(k) == table:
                if now < self._resend:
                    continue
            else:
                changed = True
            try:
                ch.send_control({"cmd": "workers", "w": table})
            except SockshareError:
                continue
            self._sent[k] = table
        if now >= self._resend:   # (once a second even if nothing changed)
            self._resend = now + 1.0
        if len(self.fed_by) > 4 * len(base) * max(1, self.n) + 64:   # workers gone
            pids = {row[2] for row in base}
            self.fed_by = {key: v for key, v in self.fed_by.items() if key[0] in pids}
        return changed

    async def _publisher(self) -> None:
        busy_until = 0.0
        next_look = 0.0
        while not self._stopped:
            now = time.monotonic()
            await asyncio.sleep(PUBLISH_INTERVAL if now < busy_until else IDLE_PUBLISH_INTERVAL)
            if self.publish():
                busy_until = time.monotonic() + 1.0
            if now >= next_look:   # a reload with --config changed what the feeders run?
                next_look = now + 1.0
                self._renew_if_changed()

    def _renew_if_changed(self) -> None:
        """The configuration changed (a reload with ``--config``: pools' policies, routes,
        limits): the feeders exit once what they have in flight is answered, and start
        again with it (the lead accepts meanwhile)."""
        raw = pickle.dumps(self.d.cfg)
        if raw == self._config_raw or self._stopped:
            return
        self._config_raw = raw
        self._config = base64.b64encode(raw).decode()
        log.info("the configuration changed: the feeders start again with it")
        for k, ch in list(self.channels.items()):
            self._renewing.add(k)
            with contextlib.suppress(SockshareError):
                ch.send_control({"cmd": "exit", "why": "new configuration"})

    # -- status ----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Per dispatcher (the lead first): pid, accepted, handoffs, CPU seconds."""
        t = os.times()
        c = self.d.counters
        out: list[dict[str, Any]] = [{
            "id": 0, "role": "lead", "pid": self.d.pid, "accepted": c["accepted"],
            "accepting": not any("feeders" in ls.holds for ls in self.d.listeners.all),
            "handoffs": c["handoffs"] - self.fed, "from_feeders": self.overflow,
            "cpu": round(t.user + t.system, 4)}]
        for k, proc in self.procs.items():
            r = self.reports.get(k, {})
            out.append({"id": k, "role": "feeder", "pid": proc.pid if proc is not None else None,
                        "up": k in self.channels,
                        **{key: r.get(key, 0) for key in ("accepted", "handoffs", "redispatches",
                                                          "rejects", "returned", "to_lead",
                                                          "refused", "cpu", "workers")},
                        "accepting": bool(r.get("accepting"))})
        return out


#: seconds the teardown waits for the feeders to exit before killing them
SETTLE_WAIT = 5.0
