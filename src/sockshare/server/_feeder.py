"""A feeder: one of the extra dispatchers of ``--dispatchers N`` (``_feeders``).

Started by the dispatcher (the *lead*) as ``python -m sockshare.server._feeder`` with
the listening sockets inherited (``SOCKSHARE_FEEDER_FDS``, in the order of the
configured listeners), the configuration (``SOCKSHARE_FEEDER_CONFIG``: the lead's own,
pickled) and the lead's channel address (``SOCKSHARE_CHANNEL``). It

* connects a channel to the lead (HELLO name ``feeder:<n>``); EOF on it (the lead
  died, or stops): it stops accepting, settles what is in flight and exits;
* accepts on the same listening sockets as the lead (the kernel's accept queue is
  shared: whoever is woken takes the connection), with the lead's own accept loop
  (:class:`~sockshare.server._listeners.Listeners`: bursts, descriptor reserve, the
  sniffer and routes);
* hands each connection to a worker of its pool over a channel of its own to that
  worker (``<worker pid>.feed``, ``_feedin``), acknowledged, with the lead's own
  admission (:class:`~sockshare.server._admission.Admission`): the pool's policy among
  the workers with room, batches per worker, re-dispatch of rejected and returned
  tickets to another worker;
* learns the workers from the lead (``{"cmd": "workers", "w": [[id, pool, pid, path,
  connections, limit], ...]}``, each time it changes, at most every
  :data:`~sockshare.server._feeders.PUBLISH_INTERVAL`): who is ready, and each one's
  load over the whole pool (the lead's exact count: its own handoffs and everything a
  worker accepted from any feeder), to which it adds its own handoffs in flight -- so
  least-connections is over the whole pool;
* gives the lead what no worker can take now (none ready, all full, or it was told to
  stop: an upgrade's hand-over) over the same channel, as an acknowledged handoff: the
  lead queues it, places it, or forwards it to its successor -- a feeder never queues
  and never refuses for a full pool itself;
* reports its counters and CPU time to the lead every half second
  (``{"ev": "feeder", ...}``: ``sockshare status`` shows them per dispatcher).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections import defaultdict
from typing import Any

from sockshare._aio import AsyncChannel
from sockshare._channel import Ticket
from sockshare._errors import SockshareError
from sockshare.server._admission import Admission, close_reset
from sockshare.server._config import ServerConfig
from sockshare.server._exclusive import ExclusiveListeners
from sockshare.server._listeners import ListenerState
from sockshare.server._runtime import REJECT_NO_FDS, REJECT_STOPPING
from sockshare.server._slots import PoolState, SlotState, Waiting, WorkerSlot

__all__ = ["ENV_CONFIG", "ENV_FDS", "ENV_ID", "Feeder", "main"]

log = logging.getLogger("sockshare.server.feeder")

ENV_CONFIG = "SOCKSHARE_FEEDER_CONFIG"
ENV_FDS = "SOCKSHARE_FEEDER_FDS"
ENV_ID = "SOCKSHARE_FEEDER_ID"
#: seconds between two reports to the lead
REPORT_INTERVAL = 0.5
#: seconds a feeder waits for its handoffs in flight when it stops
SETTLE_TIMEOUT = 3.0
#: seconds a new feeder waits for its channels to the workers before it accepts anyway
#: (what it cannot place meanwhile goes to the lead)
START_TIMEOUT = 2.0


class _NoHandover:
    """(What :class:`Listeners` asks of a dispatcher's hand-over: a feeder has none.)"""

    handed_over = False


class Feeder:
    """The feeder process: the lead's listeners and admission, its own channels."""

    def __init__(self, cfg: ServerConfig, fid: int, lead_address: str, fds: list[int]) -> None:
        self.cfg = cfg
        self.fid = fid
        self.name = f"feeder:{fid}"
        self.lead_address = lead_address
        self.fds = fds
        self.pid = os.getpid()
        self.pools: dict[str, PoolState] = {n: PoolState(p) for n, p in cfg.pools.items()}
        self.slots: list[WorkerSlot] = []
        self.counters: dict[str, int] = defaultdict(int)
        self.stopping = False
        self.handover = _NoHandover()
        self.admission = Admission(cfg, self.pools, self.counters)
        self.admission.upstream = self._to_lead
        # (the part of a Dispatcher it uses; one accept wake-up per connection: _exclusive)
        self.listeners = ExclusiveListeners(self)  # type: ignore[arg-type]
        self.lead: AsyncChannel | None = None
        #: the ready workers the lead told us of, by id; and (pid, path) of each slot
        self.by_id: dict[int, WorkerSlot] = {}
        self.where: dict[WorkerSlot, tuple[int, str]] = {}
        #: handoffs each worker process (by pid) accepted from us
        self.accepted_by: dict[int, int] = {}
        #: connections handed to the lead, unanswered
        self.lead_pending: dict[int, tuple[Ticket, Waiting]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.done = asyncio.Event()
        self._accepting = False

    # -- life ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            lead = await asyncio.wait_for(AsyncChannel.connect(self.lead_address, name=self.name),
                                          10.0)
        except (OSError, SockshareError, TimeoutError) as exc:
            log.error("%s: cannot connect to the dispatcher at %s: %s", self.name,
                      self.lead_address, exc)
            return 1
        self.lead = lead
        lead.track_accepts()
        lead.on_activity = self._on_lead
        self._on_lead()   # (what came with the handshake's last read: the first list)
        if len(self.fds) != len(self.cfg.listeners):
            log.error("%s: %d descriptor(s) for %d listener(s)", self.name, len(self.fds),
                      len(self.cfg.listeners))
            return 1
        for fd, lc in zip(self.fds, self.cfg.listeners, strict=True):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.listeners.all.append(ListenerState(lc, sock, owned=False))
        self.listeners.prepare()
        for ls in self.listeners.all:
            # no compiled burst here: its handoffs are answered through the lead's
            # supervisor (raw_pending, waiting_of), and a feeder settles tickets only --
            # a compiled handoff that a retiring worker rejected was closed unanswered
            ls.compiled = None
            ls.sniff_compiled = False
        # it accepts once it can hand over: its channels to the workers the lead lists
        # are open (or after START_TIMEOUT)
        loop.call_later(START_TIMEOUT, self._start_accepting)
        loop.add_signal_handler(signal.SIGTERM, self.done.set)
        self._spawn(self._housekeeping())
        ended = loop.create_task(lead.wait_closed())
        stop = loop.create_task(self.done.wait())
        await asyncio.wait({ended, stop}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        stop.cancel()
        await self._stop()
        return 0

    def _start_accepting(self) -> None:
        if self._accepting or self.stopping:
            return
        self._accepting = True
        self.listeners.start()
        log.info("%s (pid %d) accepting on %s; channels to %d worker(s)", self.name, self.pid,
                 ", ".join(ls.address for ls in self.listeners.all), self._open())
        self._report()

    def _open(self) -> int:
        return sum(1 for s in self.where if s.channel is not None and s.state is SlotState.READY)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _stop(self) -> None:
        """Stop accepting, let what is in flight be answered, close everything."""
        self.stopping = True
        self.listeners.close_all()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline and (
                any(s.pending or s.reserved for s in self.where)
                or (self.lead_pending and self.lead is not None and self.lead.usable)):
            await asyncio.sleep(0.01)
        self.admission.refuse_queued("shutdown", "the feeder is stopping")
        for slot in list(self.where):
            for t, w in slot.pending.values():
                if t.socket is not None:
                    t.socket.close()
                w.sock.close()
            slot.pending.clear()
            if slot.channel is not None:
                with contextlib.suppress(Exception):
                    await slot.channel.aclose()
        if self.lead is not None:
            with contextlib.suppress(Exception):
                await self.lead.aclose()
        for task in list(self.tasks):
            task.cancel()
        log.info("%s (pid %d) stopped: %d handoff(s)", self.name, self.pid,
                 self.counters["handoffs"])

    async def _housekeeping(self) -> None:
        next_report = 0.0
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            self.admission.expire(now)
            if self.cfg.timeout > 0:
                self._hung(now)
            if now >= next_report:
                next_report = now + REPORT_INTERVAL
                self._report()

    def _hung(self, now: float) -> None:
        """``--timeout``: a worker that leaves one of our handoffs unanswered that long is
        hung; the lead, which runs it, kills it (its channel breaks, our tickets come back
        and go to other workers)."""
        lead = self.lead
        for slot, (pid, _path) in list(self.where.items()):
            if not slot.pending or slot.hung or lead is None or not lead.usable:
                continue
            oldest = min(w.sent for _t, w in slot.pending.values())
            if now - oldest > self.cfg.timeout:
                slot.hung = True
                with contextlib.suppress(SockshareError):
                    lead.send_control({"ev": "hung", "pid": pid, "n": len(slot.pending),
                                       "age": round(now - oldest, 3)})

    def _report(self) -> None:
        lead = self.lead
        if lead is None or not lead.usable:
            return
        t = os.times()
        c = self.counters
        with contextlib.suppress(SockshareError):
            lead.send_control({"ev": "feeder", "pid": self.pid, "accepted": c["accepted"],
                               "handoffs": c["handoffs"], "redispatches": c["redispatches"],
                               "rejects": c["rejects"], "returned": c["returned"],
                               "to_lead": c["to_lead"],
                               "refused": sum(self.admission.refused.values()),
                               "workers": self._open(), "accepting": self._accepting,
                               "cpu": round(t.user + t.system, 4)})

    # -- the lead ----------------------------------------------------------------------

    def _on_lead(self) -> None:
        lead = self.lead
        if lead is None:
            return
        try:
            for t in lead.accepted():
                self.lead_pending.pop(t.id, None)
            for t in lead.returned():   # the lead refused it, or is gone: nobody takes it
                entry = self.lead_pending.pop(t.id, None)
                if t.socket is None:
                    continue
                if entry is None:
                    close_reset(t.socket)
                    continue
                entry[1].sock = t.socket
                self.admission.refuse(entry[1], "error", "the dispatcher did not take it")
            for h in lead.received():
                h.reject("a feeder takes no handoffs")
            for msg in lead.received_controls():
                self._apply(msg)
        except Exception:   # never let it escape into the channel's reader
            log.exception("%s: handling the dispatcher's frames failed", self.name)

    def _apply(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("cmd")
        if cmd == "workers":
            self._workers(msg.get("w") or [])
        elif cmd == "exit":   # (a new configuration: the lead starts us again)
            log.info("%s: exiting (%s)", self.name, msg.get("why", "asked"))
            self.done.set()
        elif cmd == "stop":
            # an upgrade's hand-over: the new dispatcher accepts from now on; what comes
            # back from the workers goes to the lead, which forwards it
            log.info("%s: stop accepting (%s)", self.name, msg.get("why", "asked"))
            self.stopping = True
            self._accepting = False
            self.listeners.stop_accepting()
            self._report()
            for slot in list(self.by_id.values()):
                self._retire(slot)
        else:
            log.debug("%s: control message %r", self.name, msg)

    def _to_lead(self, w: Waiting) -> bool:
        """Admission's upstream: no worker can take ``w`` now; the lead will."""
        lead = self.lead
        if lead is None or not lead.usable:
            return False
        try:
            tickets = lead.send_nowait([(w.sock, w.encoded_meta(), w.data)], ack=True)
        except SockshareError:
            return False
        self.lead_pending[tickets[0].id] = (tickets[0], w)
        self.counters["to_lead"] += 1
        return True

    # -- the workers ---------------------------------------------------------------------

    def _workers(self, table: list[Any]) -> None:
        """The lead's list of ready workers and their loads."""
        if self.stopping:
            return
        seen: set[int] = set()
        for wid, pool, pid, path, conns, limit, counted in table:
            slot = self.by_id.get(wid)
            if slot is not None and self.where[slot][0] != pid:
                self._retire(slot)   # a new process for that id (a reload, a restart)
                slot = None
            if slot is None:
                if pool not in self.pools:
                    continue
                slot = WorkerSlot(wid, self.pools[pool])
                self.by_id[wid] = slot
                self.where[slot] = (pid, path)
                self._spawn(self._connect(slot, path))
            # the lead's count (every dispatcher's, exact) and ours it does not hold yet
            slot.active = conns + max(0, self.accepted_by.get(pid, 0) - counted)
            slot.limit = limit
            seen.add(wid)
        for wid in [w for w in self.by_id if w not in seen]:
            self._retire(self.by_id[wid])
        for pool in self.pools.values():
            self.admission.feed(pool)

    def _retire(self, slot: WorkerSlot) -> None:
        """Gone from the lead's list: nothing new for it; its channel closes once what
        is in flight is answered."""
        if self.by_id.get(slot.id) is slot:
            del self.by_id[slot.id]
        slot.state = SlotState.RETIRING
        pool = slot.pool_state
        if slot in pool.workers:
            pool.workers.remove(slot)
        self._close_if_idle(slot)

    def _draining(self, slot: WorkerSlot) -> None:
        """It rejected a handoff because it drains: out of the rotation now. It stays
        listed (``by_id``: the lead's next lists do not bring it back); its channel stays
        for the answers in flight and closes once the lead's list drops it."""
        if slot.state is not SlotState.READY:
            return
        slot.state = SlotState.DRAINING
        pool = slot.pool_state
        if slot in pool.workers:
            pool.workers.remove(slot)
        log.info("%s: worker %d drains: nothing more goes to it", self.name, slot.id)
        self._report()

    def _close_if_idle(self, slot: WorkerSlot) -> None:
        if slot.state is SlotState.RETIRING and not slot.pending and not slot.reserved:
            ch, slot.channel = slot.channel, None
            if ch is not None:
                self._spawn(ch.aclose())

    async def _connect(self, slot: WorkerSlot, path: str) -> None:
        try:
            ch = await asyncio.wait_for(AsyncChannel.connect(path, name=self.name), 5.0)
        except (OSError, SockshareError, TimeoutError) as exc:
            log.warning("%s: cannot connect to worker %d at %s: %s", self.name, slot.id, path, exc)
            await asyncio.sleep(1.0)   # the next list tries again
            if self.by_id.get(slot.id) is slot:
                del self.by_id[slot.id]
            self.where.pop(slot, None)
            return
        if slot.state is not SlotState.STARTING or self.stopping:   # retired meanwhile
            await ch.aclose()
            self.where.pop(slot, None)
            return
        log.debug("%s: channel to worker %d (pid %d) open", self.name, slot.id, ch.peer.pid)
        ch.track_accepts()
        ch.on_activity = lambda: self._settle_safely(slot, ch)
        slot.channel = ch
        slot.state = SlotState.READY
        pool = slot.pool_state
        pool.workers.append(slot)
        pool.workers.sort(key=lambda s: s.id)
        self.admission.feed(pool)
        if not self._accepting and not any(s.state is SlotState.STARTING for s in self.by_id.values()):
            self._start_accepting()   # (which reports)
        else:
            self._report()
        await ch.wait_closed()
        self._settle(slot, ch)
        if slot.channel is ch:
            slot.channel = None
        if slot in pool.workers:
            pool.workers.remove(slot)
        slot.state = SlotState.GONE
        if self.by_id.get(slot.id) is slot:
            del self.by_id[slot.id]
        pid = self.where.pop(slot, (0, ""))[0]
        accepted = self.accepted_by.pop(pid, 0)
        lead = self.lead
        if accepted and lead is not None and lead.usable:
            # what it accepted from us: the lead counts as lost what it never heard of
            # (a worker killed before its "fed" report left)
            with contextlib.suppress(SockshareError):
                lead.send_control({"ev": "gone", "pid": pid, "id": slot.id,
                                   "accepted": accepted})
        with contextlib.suppress(Exception):
            await ch.aclose()

    def _settle_safely(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        try:
            self._settle(slot, ch)
            ch.received_controls()   # (workers send none on a feeder's channel)
        except Exception:   # in the channel's read callback: never let it escape
            log.exception("%s: settling worker %d's channel failed", self.name, slot.id)

    def _settle(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        """The workers' answers: ACCEPTs counted (the lead hears of them from the worker:
        ``fed``), REJECTs and returned tickets re-dispatched, as the lead does."""
        accepted = 0
        for t in ch.accepted():
            if slot.pending.pop(t.id, None) is not None:
                accepted += 1
        if accepted:
            slot.active += accepted   # (until the lead's next list says it exactly)
            pid = self.where[slot][0] if slot in self.where else 0
            self.accepted_by[pid] = self.accepted_by.get(pid, 0) + accepted
            slot.stats.handoffs += accepted
            self.counters["handoffs"] += accepted
        back = ch.returned()
        for t in back:
            entry = slot.pending.pop(t.id, None)
            if entry is None:
                if t.socket is not None:
                    t.socket.close()
                continue
            w = entry[1]
            if t.socket is None:
                continue
            w.sock = t.socket
            if t.state == "rejected" and t.reason == REJECT_NO_FDS:
                slot.set_fd_full(True)
                self.admission.redispatch(w, slot, REJECT_NO_FDS, counts=False)
                continue
            if t.state == "rejected" and t.reason == REJECT_STOPPING:
                # it drains (a reload retired it, a signal): it takes nothing more, and
                # the lead's list says so only later; until then nothing more goes to it
                # (bounced between draining workers, a connection ran out of attempts
                # and was reset). Not the connection's fault: no attempt counted.
                self.counters["rejects"] += 1
                self._draining(slot)
                self.admission.redispatch(w, slot, REJECT_STOPPING, counts=False)
                continue
            if t.state == "rejected":
                self.counters["rejects"] += 1
                why = f"rejected by worker {slot.id}: {t.reason or 'no reason given'}"
            else:
                self.counters["returned"] += 1
                why = f"worker {slot.id} went away before answering"
            self.admission.redispatch(w, slot, why)
        if back:
            self.admission.feed(slot.pool_state)
        self._close_if_idle(slot)


def main() -> int:
    fid = int(os.environ.get(ENV_ID, "1") or 1)
    # the dispatcher that started us wrote it (our environment: our uid alone reads it)
    cfg = pickle.loads(base64.b64decode(os.environ.pop(ENV_CONFIG)))  # noqa: S301
    assert isinstance(cfg, ServerConfig)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s [feeder:{fid} %(process)d] %(levelname)s %(message)s")
    # ^C in a terminal reaches the whole process group: the lead decides (EOF tells us)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fds = [int(x) for x in os.environ.get(ENV_FDS, "").split(",") if x]
    address = os.environ.get("SOCKSHARE_CHANNEL", "")
    return asyncio.run(Feeder(cfg, fid, address, fds).run())


if __name__ == "__main__":
    sys.exit(main())
