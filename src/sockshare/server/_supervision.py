"""Supervision: worker processes and their channels, reload, hung-worker kills.

Each worker *process* has a :class:`~sockshare.server._slots.WorkerSlot` and a
supervisor task (:meth:`Supervisor.start`): it starts the process (the Python runtime for
an ``app``, or a ``worker_cmd`` in any language, given ``SOCKSHARE_CHANNEL`` /
``SOCKSHARE_WORKER_ID``: :meth:`command`), waits for it to exit and restarts it after an
exponential backoff. The process connects its channel to the dispatcher's channel
listener; :meth:`accept_workers` matches it to its slot (by pid, or ``worker:<id>`` for
a wrapper's child) and from then on everything the worker sends is handled in the
channel's read callback (:meth:`_settle`): ACCEPTs become ``active``, REJECTs and
returned tickets go back to admission (``redispatch``), control messages are applied
(:meth:`_apply_control`: closes, hello, descriptors, migration reports), and handoffs the
worker sends are migrations (``Migrations.take``), taken after the controls that came with
them (a worker sends the ``moved_in`` of a connection ahead of its relay). One task per
worker waits for the end of its channel (:meth:`_detach`): what it had accepted is lost
with it unless the process lives on and exits 0.

Reload (:meth:`reload`): with ``--config``, the file is read again first (``_reconfig``:
a bad one stops the reload there); a new slot per worker id (as many as the pool's
``workers``) starts a fresh process; once each is ready they become the pool's workers
and the old ones are retired (:meth:`retire`: ``{"cmd": "drain", "migrate": true}``, or
SIGTERM for a foreign worker; killed only after ``--grace`` + 3 s without progress,
:meth:`_watch_drain`); if one cannot start, the reload is abandoned and the old
ones go on (with the previous configuration).

SIGTTIN / SIGTTOU (:meth:`scale`): one worker more / less in the default pool; the one
removed is retired like a reloaded one (its connections migrate or finish).

``--timeout`` (:meth:`kill_hung`): a worker that leaves a handoff (or a direct migration
to it) unanswered that long is SIGKILLed; its handoffs come back and go elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sockshare._aio import AsyncChannel
from sockshare._channel import _remove_stale_socket
from sockshare._errors import ChannelError, RemoteProtocolError, SockshareError
from sockshare.server._config import ConfigError
from sockshare.server._feedin import ENV_FEEDERS
from sockshare.server._listeners import sd_notify
from sockshare.server._messages import (
    Closed,
    Drain,
    Draining,
    Fatal,
    Fds,
    Fed,
    HandlerTable,
    Hello,
    MigrateAck,
    MoveBack,
    MovedIn,
    MovedOut,
    Moving,
    Opened,
    OrphanQuery,
    Recycle,
    UnknownMessage,
    Unmoved,
    WebCounts,
    decode,
)
from sockshare.server._peers import PEER_SUFFIX
from sockshare.server._platform import split_command, start_process
from sockshare.server._reconfig import reconfigure
from sockshare.server._runtime import REJECT_NO_FDS, REJECT_STOPPING
from sockshare.server._slots import PoolState, SlotState, WorkerSlot
from sockshare.server._tasks import Tasks
from sockshare.server._web import WebSettings

#: the dispatcher's counters of web apps' moves, in WebCounts' order
WEB_COUNTERS = ("web_keepalive_handed_over", "web_ws_migrated_out", "web_ws_migrated_in",
                "web_moves_refused", "web_ws_closed_1012")

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["Supervisor", "describe_exit"]

log = logging.getLogger("sockshare.server")

READY = SlotState.READY


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "unknown status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


class Supervisor:
    """The worker processes: their supervisors, their channels, reloads."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.cfg = d.cfg
        self.pools = d.pools
        self.slots = d.slots
        self.counters = d.counters
        self.admission = d.admission
        #: one supervisor task per slot
        self.tasks = Tasks()
        #: set (and replaced) by :meth:`changed`; the waiters of :meth:`until` count in _waiting
        self._changed = asyncio.Event()
        self._waiting = 0
        # reload: requests are numbered; one reload covers every request made before it
        self._reload_requested = 0
        self._reload_done = 0
        self._reload_task: asyncio.Task[None] | None = None
        #: (request number, future of the outcome: None when it served, else the error)
        self._reload_waiters: list[tuple[int, asyncio.Future[str | None]]] = []
        #: what a worker's reports do (``_messages``), each called with its slot
        m = d.migration
        self.reports: HandlerTable[WorkerSlot] = (
            HandlerTable[WorkerSlot]()
            .on(Closed, self._on_closed)
            .on(Opened, self._on_opened)
            .on(Fed, self._on_fed)
            .on(Hello, self._on_hello)
            .on(Fds, self._on_fds)
            .on(Draining, self._on_draining)
            .on(Unmoved, self._on_unmoved)
            .on(Fatal, self._on_fatal)
            .on(Recycle, self._on_recycle)
            .on(WebCounts, self._on_web_counts)
            .on(MigrateAck, m.acked)
            .on(Moving, m.moving_out)
            .on(MovedOut, m.moved_out)
            .on(MoveBack, m.move_back)
            .on(MovedIn, m.moved_in)
            .on(OrphanQuery, self._on_orphan))

    def start(self, slot: WorkerSlot) -> None:
        """Start ``slot``'s supervisor: it runs (and restarts) the worker process."""
        self.tasks.spawn(self._supervise(slot), self.d.task_failed)

    async def wait_ready(self, slots: list[WorkerSlot], timeout: float) -> list[WorkerSlot]:
        """Wait until each slot is ready (a Python worker: said hello too); the failed ones
        (fatal, exited) are returned; [] means all ready."""
        def failed() -> list[WorkerSlot]:
            return [s for s in slots if s.fatal or s.exits > 0]

        def ready() -> bool:
            return all(s.state is READY and (s.hello or not s.python) for s in slots)

        await self.until(lambda: bool(failed()) or ready() or self.d.stopping, timeout)
        bad = failed()
        if bad:
            return bad
        if ready():
            return []
        return [s for s in slots if s.state is not READY] or slots

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` is true, looking again each time a slot changes
        (:meth:`changed`: a state, a hello, a fatal error, an exit; the dispatcher
        stopping), ``timeout`` seconds at most. Returns ``done()``'s last answer."""
        deadline = time.monotonic() + timeout
        while True:
            changed = self._changed
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._waiting += 1
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                pass
            finally:
                self._waiting -= 1

    def changed(self) -> None:
        """A slot changed what :meth:`until` may look at (state, channel, hello, fatal,
        exits), or the dispatcher is stopping: wake the waiters."""
        if self._waiting:
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    # -- workers: channels -------------------------------------------------------------

    async def accept_workers(self) -> None:
        assert self.d.worker_channels is not None
        while True:
            try:
                ch = await self.d.worker_channels.accept()
            except ChannelError:
                return
            slot = self._match(ch)
            if slot is None and self.d.feeders is not None and self.d.feeders.claim(ch):
                continue
            if slot is None:
                if (self.d.takeover.predecessor and ch.peer.pid == self.d.takeover.predecessor
                        and ch.peer.name == f"dispatcher:{self.d.takeover.predecessor}"):
                    self.d.takeover._handed_over_to_us()
                    self.d.spawn(self.d.takeover.watch_peer(ch))
                    continue
                log.warning("refused a channel from pid %d (%r): not a worker this dispatcher "
                            "started", ch.peer.pid, ch.peer.name)
                with contextlib.suppress(Exception):
                    await ch.aclose()
                continue
            slot.connected(ch, stopping=self.d.stopping)
            self.changed()
            log.info("worker %d (pid %d, pool %s, generation %d) ready", slot.id, ch.peer.pid,
                     slot.pool, slot.generation)
            # Everything the worker sends is handled in the channel's read callback; one
            # task waits for the end (no task woken per read: 2 fewer per connection).
            ch.track_accepts()
            ch.on_activity = lambda slot=slot, ch=ch: self._settle_safely(slot, ch)
            ch.on_settled = lambda n, closed, slot=slot: self._settled(slot, n, closed)
            self.d.spawn(self._watch_worker(slot, ch))
            if slot.retired:
                self.retire(slot, "reload")
            self.admission.feed(slot.pool_state)

    def _match(self, ch: AsyncChannel) -> WorkerSlot | None:
        def free(s: WorkerSlot | None) -> bool:
            return (s is not None and s.channel is None and s.proc is not None
                    and s.proc.returncode is None)

        for slot in self.slots:
            if free(slot) and slot.proc is not None and slot.proc.pid == ch.peer.pid:
                return slot
        # a wrapper (shell script, runtime launcher) may connect from a child process
        name = ch.peer.name
        if name.startswith("worker:") and name[7:].isdigit():
            wid = int(name[7:])
            for slot in self.slots:
                if slot.id == wid and free(slot) and not slot.retired:
                    return slot
        return None

    async def _watch_worker(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        # (when cancelled at teardown, _teardown closes the channel and the sockets)
        await ch.wait_closed()
        self._settle(slot, ch)
        self._drop_abandoned(slot)
        await self._detach(slot, ch)

    def _drop_abandoned(self, slot: WorkerSlot) -> None:
        """Handoffs that closing the channel abandoned (:meth:`_after_exit`: the process
        is gone and its channel did not end; a child of it may hold the channel): the
        channel closed our copies, so they are neither pending nor ever listed as
        accepted or returned. Left in ``slot.pending`` they would count against the slot
        forever, and --timeout would kill each of its next processes."""
        gone = [hid for hid, (t, _w) in slot.pending.items() if t.state == "abandoned"]
        if not gone:
            return
        for hid in gone:
            del slot.pending[hid]
        slot.stats.lost += len(gone)
        self.counters["lost"] += len(gone)
        log.warning("worker %d: %d handoff(s) it never answered were closed with its channel "
                    "(lost)", slot.id, len(gone))

    def _apply_control(self, slot: WorkerSlot, ch: AsyncChannel, obj: dict[str, Any], *,
                       settled: bool = False) -> None:
        """A worker's report (``_messages``): to its handler in :attr:`reports`, after the
        ACCEPTs that preceded it (``settled``: the caller applied them since the last
        read); unknown or malformed ones are logged and ignored."""
        if not settled:
            self._settle(slot, ch)   # count ACCEPTs that preceded this message first
        if obj.get("ev") == "closed" and "cmd" not in obj:
            # the report of every burst: read here as Closed.read would read it (a field
            # it would refuse goes the general way, which says what is wrong)
            n, active = obj.get("n", 1), obj.get("active")
            if (type(n) is int and n >= 0
                    and (active is None or (type(active) is int and active >= 0))):
                self._closed(slot, n)   # (what _on_closed does with it: no object made)
                return
        try:
            msg = decode(obj)
        except UnknownMessage:
            log.debug("worker %d: control message %r", slot.id, obj)
            return
        except RemoteProtocolError as exc:
            log.warning("worker %d: ignored a control message: %s", slot.id, exc)
            return
        if not self.reports.dispatch(slot, msg):
            log.debug("worker %d: control message %r", slot.id, obj)

    def _on_closed(self, slot: WorkerSlot, msg: Closed) -> None:
        self._closed(slot, msg.n)

    def _closed(self, slot: WorkerSlot, n: int) -> None:
        if n > 0:
            slot.active = max(0, slot.active - n)
            self.admission.feed(slot.pool_state)

    def _on_opened(self, slot: WorkerSlot, msg: Opened) -> None:
        """``accept = "worker"``: connections it accepted itself since its last report
        (ahead of their closes): its load, as if handed over."""
        slot.active += msg.n
        slot.stats.accepted_here += msg.n
        self.counters["worker_accepted"] += msg.n

    def _on_fed(self, slot: WorkerSlot, msg: Fed) -> None:
        """It accepted ``n`` handoffs from feeders (``--dispatchers``; ``_feeders``)."""
        slot.active += msg.n
        slot.stats.handoffs += msg.n
        self.counters["handoffs"] += msg.n
        if self.d.feeders is not None:
            self.d.feeders.counted(slot, msg)

    def _on_hello(self, slot: WorkerSlot, msg: Hello) -> None:
        slot.hello = True
        self.changed()
        slot.can_resume = msg.resume
        slot.set_fd_full(False, msg.capacity)   # (connections its descriptors allow)
        peer = msg.peer
        slot.peer_path, slot.peers_sent = "", None   # a new process
        if (peer is not None and peer.endswith(PEER_SUFFIX)
                and os.path.dirname(peer) == os.path.dirname(self.d.chan_path)):
            slot.peer_path = peer
        self.d.migration.push_peers(slot.pool_state)

    def _on_fds(self, slot: WorkerSlot, msg: Fds) -> None:
        slot.set_fd_full(msg.full, msg.capacity)
        if not msg.full:
            self.admission.feed(slot.pool_state)

    def _on_orphan(self, slot: WorkerSlot, msg: OrphanQuery) -> None:
        self.d.spawn(self.d.migration.answer_orphan(slot, msg), critical=False)

    def _on_draining(self, slot: WorkerSlot, msg: Draining) -> None:
        if slot.stops_taking():
            self.changed()
            log.info("worker %d (pid %s) is draining", slot.id, slot.pid)
            self.d.migration.push_peers(slot.pool_state)

    def _on_unmoved(self, slot: WorkerSlot, msg: Unmoved) -> None:
        """Migrations the worker refused itself, connections its drain could not move."""
        self.counters["migrations_refused"] += msg.refused
        self.counters["drain_closed"] += msg.closed
        if msg.closed:
            log.warning("worker %d (pid %s): %d connection(s) could not move (no resume "
                        "handler, not migratable, or refused) and were closed at the end of "
                        "its drain", slot.id, slot.pid, msg.closed)

    def _on_fatal(self, slot: WorkerSlot, msg: Fatal) -> None:
        slot.fatal = True
        self.changed()
        slot.stops_taking()
        log.error("worker %d (pid %s): %s", slot.id, slot.pid, msg.reason)
        if msg.startup and not self.d.ready and not self.d.takeover.predecessor:
            # the app's own startup failed before the server ever served: restarting it
            # forever would only repeat the traceback (as gunicorn and uvicorn do)
            log.error("the app failed to start; stopping (exit status 3)")
            self.d.exit_status = 3
            self.d.stop("app startup failed")

    def _on_web_counts(self, slot: WorkerSlot, msg: WebCounts) -> None:
        """Add what changed since this worker's last report to the server's totals."""
        now = (msg.handed_over, msg.ws_out, msg.ws_in, msg.refused, msg.closed_1012)
        for key, new, old in zip(WEB_COUNTERS, now, slot.web_counts, strict=True):
            self.counters[key] += max(0, new - old)
        slot.web_counts = now

    def _on_recycle(self, slot: WorkerSlot, msg: Recycle) -> None:
        self.d.spawn(self.recycle(slot, msg.reason), critical=False)

    def _settle_safely(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        try:
            self._settle(slot, ch)
            for msg in ch.received_controls():   # (no read in between: settled above)
                self._apply_control(slot, ch, msg, settled=True)
            self._take_migrations(slot, ch)
        except Exception:   # in the channel's read callback: never let it escape
            log.exception("worker %d: settling its channel failed", slot.id)

    def _settled(self, slot: WorkerSlot, accepted: int, closed: int) -> None:
        """A read of the worker's channel that brought only ACCEPTs of compiled handoffs
        and reports of closed connections (AsyncChannel.on_settled): what :meth:`_settle`
        and :meth:`_on_closed` do with them, in that order (the sum of the reports'
        counts clamps at 0 as the reports one by one would)."""
        try:
            if accepted:
                slot.active += accepted
                slot.stats.handoffs += accepted
                self.counters["handoffs"] += accepted
            self._closed(slot, closed)
        except Exception:   # in the channel's read callback: never let it escape
            log.exception("worker %d: settling its channel failed", slot.id)

    def _settle(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        """Apply the answers that arrived: accepts, rejects, returned tickets. (The
        connections the worker migrates out are taken after its controls, by
        :meth:`_take_migrations`.)"""
        accepted = ch.take_raw_accepted()   # (the compiled path's: no tickets)
        for t in ch.accepted():
            entry = slot.pending.pop(t.id, None)
            if entry is None:
                continue
            accepted += 1
            if entry[1].origin is not None:
                self.d.migration.done(entry[1], slot)
        if accepted:
            slot.active += accepted
            slot.stats.handoffs += accepted
            self.counters["handoffs"] += accepted
        back = ch.returned()
        for t in back:
            entry = slot.pending.pop(t.id, None)
            if entry is None and t.compiled and t.socket is not None:
                entry = (t, self.d.listeners.waiting_of(t))   # sent by the compiled path
            if entry is None:
                if t.socket is not None:
                    t.socket.close()
                continue
            w = entry[1]
            if t.state == "rejected" and t.reason == REJECT_NO_FDS:
                # not the connection's fault: no attempt counted, one log line per episode
                self.counters["fd_rejects"] += 1
                if not slot.fd_full:
                    slot.set_fd_full(True)   # (the worker logs it, rate-limited)
                if t.socket is not None:
                    w.sock = t.socket
                    self.admission.redispatch(w, slot, REJECT_NO_FDS, counts=False)
                continue
            if t.state == "rejected" and t.reason == REJECT_STOPPING:
                # it drains (its "draining" may still be on the way): nothing more goes
                # to it, and the connection goes elsewhere without an attempt counted
                slot.stats.rejects += 1
                self.counters["rejects"] += 1
                self._on_draining(slot, Draining())
                if t.socket is not None:
                    w.sock = t.socket
                    self.admission.redispatch(w, slot, REJECT_STOPPING, counts=False)
                continue
            if t.state == "rejected":
                slot.stats.rejects += 1
                self.counters["rejects"] += 1
                why = f"rejected by worker {slot.id}: {t.reason or 'no reason given'}"
            else:
                slot.stats.returned += 1
                self.counters["returned"] += 1
                why = f"worker {slot.id} went away before answering"
            if t.socket is None:
                continue
            w.sock = t.socket
            self.admission.redispatch(w, slot, why)
        if back:
            self.admission.feed(slot.pool_state)

    def _take_migrations(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        """Relay the connections the worker hands over (it migrates them out), each
        counted out of it. After the reports that arrived with them: a connection that
        moved in directly is counted in by its ``moved_in``, which the worker sends ahead
        of the handoff; taken first, its -1 would hit a count without that +1 (clamped
        at 0, it was lost, and the count stayed one too high once the report came)."""
        handoffs = ch.received()
        if not handoffs:
            return
        for h in handoffs:   # (one batch: one write per target, after the last)
            self.d.migration.take(slot, h, flush=False)
        self.admission.flush()

    async def _detach(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        if slot.channel is not ch:
            self._take_migrations(slot, ch)
            return
        # the last reports (a draining worker's final "closed") may sit unread beside its BYE
        while True:
            try:
                msg = await ch.receive_control()   # never blocks on an ended channel
            except ChannelError:
                break
            self._apply_control(slot, ch, msg)
        self._take_migrations(slot, ch)
        slot.channel_ended()
        self.changed()
        proc = slot.proc
        if slot.active and proc is not None and proc.returncode is None:
            # the process lives on: a worker whose channel ended finishes its connections
            # and exits 0; they are lost only if it does not (see _count_unreported)
            slot.unreported = (proc, slot.active)
            log.warning("worker %d (pid %d): its channel ended with %d open connection(s); "
                        "it should finish them and exit", slot.id, ch.peer.pid, slot.active)
        elif slot.active:
            slot.stats.lost += slot.active
            self.counters["lost"] += slot.active
            log.warning("worker %d (pid %d) went away with %d open connection(s): they are lost "
                        "with it", slot.id, ch.peer.pid, slot.active)
        slot.active = 0
        slot.set_fd_full(False)
        # its direct migrations out are settled by their targets now (or died with it)
        self.d.migration.forget_moves_from(ch.peer.pid)
        self.d.migration.push_peers(slot.pool_state)
        with contextlib.suppress(Exception):
            await ch.aclose()
        proc = slot.proc
        if proc is not None and proc.returncode is None and not self.d.stopping:
            # a worker without its channel is useless: give it a moment to exit by itself
            asyncio.get_running_loop().call_later(2.0, self._terminate_if_running, slot, proc,
                                                  "its channel closed")

    def _terminate_if_running(self, slot: WorkerSlot, proc: asyncio.subprocess.Process,
                              why: str) -> None:
        if slot.proc is proc and proc.returncode is None:
            log.warning("worker %d (pid %d): %s; terminating it", slot.id, proc.pid, why)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            asyncio.get_running_loop().call_later(self.cfg.grace + 1.0, self.kill_if_running,
                                                  slot, proc)

    def kill_if_running(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        if slot.proc is proc and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    # -- workers: processes ------------------------------------------------------------

    def command(self, slot: WorkerSlot) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of worker ``slot`` (documented in docs/server.md)."""
        p = slot.pool_state.cfg
        env = dict(os.environ)
        env.update(SOCKSHARE_CHANNEL=self.d.chan_path, SOCKSHARE_WORKER_ID=str(slot.id),
                   SOCKSHARE_POOL=p.name, SOCKSHARE_GENERATION=str(slot.generation))
        if self.cfg.dispatchers > 1:
            env[ENV_FEEDERS] = "1"   # (listen for the feeders: _feedin)
        if p.worker_cmd is not None:
            parts = split_command(p.worker_cmd)
            subst = {"{channel}": self.d.chan_path, "{id}": str(slot.id)}
            has_channel = any("{channel}" in part for part in parts)
            out = []
            for part in parts:
                arg = part
                for k, v in subst.items():
                    arg = arg.replace(k, v)
                out.append(arg)
            if not has_channel:
                out.append(self.d.chan_path)
            return out, env
        assert p.app is not None
        argv = [sys.executable, "-m", "sockshare.server.worker", "--app", p.app,
                "--channel", self.d.chan_path, "--id", str(slot.id), "--pool", p.name,
                "--generation", str(slot.generation), "--grace", str(self.cfg.grace),
                "--log-level", self.cfg.log_level]
        if p.resume is not None:
            argv += ["--resume", p.resume]
        if p.max_conns is not None:
            argv += ["--max-conns", str(p.max_conns)]
        if p.web != WebSettings():
            # in the environment, not argv: a key's password must not show in ps
            argv += ["--interface", p.web.interface]
            env["SOCKSHARE_WEB"] = p.web.to_json()
        if self.cfg.log_config:
            argv += ["--log-config", self.cfg.log_config]
        return argv, env

    def listen_fds(self, slot: WorkerSlot) -> tuple[list[int], str]:
        """``accept = "worker"``: the listening descriptors worker ``slot`` inherits, and
        their description for it (``SOCKSHARE_LISTEN``, JSON: ``{"listeners": [[fd, name,
        address, backlog]], "max_conns": n|null}``).

        Inherited at spawn rather than handed over the channel: every worker process is
        started here (a restart, a reload, a worker past --max-requests, the workers of a
        new dispatcher after an upgrade, which inherited the listeners in turn), so each
        one gets them before its first line runs, with no message, no answer to wait for
        and nothing the dispatcher must count or take back; and a handoff is a connection
        to the dispatcher's books (counted in, refused, re-dispatched), which a listener
        is not. ``worker_cmd`` pools cannot accept (refused by the configuration)."""
        p = slot.pool_state.cfg
        if p.accept != "worker":
            return [], ""
        mine = self.d.listeners.for_pool(p.name)
        desc = {"listeners": [[ls.sock.fileno(), ls.cfg.name, ls.address, ls.cfg.backlog]
                              for ls in mine],
                "max_conns": p.max_conns}
        return [ls.sock.fileno() for ls in mine], json.dumps(desc, separators=(",", ":"))

    def _run_as(self) -> dict[str, Any]:
        """--user/--group: the child sets its ids before it runs anything (before the
        interpreter starts, so before the app is imported)."""
        if self.d.run_as is None:
            return {}
        uid, gid, groups = self.d.run_as
        return {"user": uid, "group": gid, "extra_groups": groups}

    async def _supervise(self, slot: WorkerSlot) -> None:
        assert self.d.stop_event is not None
        failures = 0
        while not self.d.stopping and not slot.retired:
            slot.stats.generation += 1
            slot.generation = slot.stats.generation
            argv, env = self.command(slot)
            spawn = self._run_as()
            fds, listen = self.listen_fds(slot)
            if fds:
                env["SOCKSHARE_LISTEN"] = listen
                spawn["pass_fds"] = fds
            ran = 0.0
            slot.hello = slot.can_resume = slot.fatal = False
            try:
                # own process group: a terminal's Ctrl-C reaches the dispatcher only,
                # which then stops the workers once, gracefully
                proc = await start_process(argv, env, **spawn)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                # (ValueError: e.g. a NUL byte in --worker-cmd)
                log.error("worker %d: cannot start %s: %s", slot.id, shlex.join(argv), exc)
                rc: int | None = None
                pid = 0
                slot.exits += 1
                self.changed()
            else:
                slot.process_started(proc, time.monotonic())
                self.changed()
                pid = proc.pid
                log.info("worker %d started: pid %d, pool %s, generation %d", slot.id, pid,
                         slot.pool, slot.generation)
                watchdog = asyncio.get_running_loop().call_later(
                    self.cfg.connect_timeout, self._connect_timeout, slot, proc)
                try:
                    rc = await proc.wait()
                finally:
                    watchdog.cancel()
                self.d.migration.exited[pid] = (time.monotonic(), slot)
                self._count_unreported(slot, proc, rc)
                if slot.peer_path.endswith(f"{os.sep}{pid}{PEER_SUFFIX}"):
                    # a killed worker could not remove its peer socket
                    with contextlib.suppress(OSError, SockshareError):
                        _remove_stale_socket(slot.peer_path)
                ran = time.monotonic() - slot.started
                slot.exits += 1
                self.changed()
                await self._after_exit(slot)
            if self.d.stopping or slot.retired:
                log.info("worker %d (pid %d, generation %d) exited with %s", slot.id, pid,
                         slot.generation, describe_exit(rc))
                break
            # a clean exit (a worker told to stop, or done) does not grow the backoff
            failures = 1 if rc == 0 or ran >= self.cfg.stable_after else failures + 1
            delay = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (failures - 1))
            slot.backing_off()
            self.changed()
            log.warning("worker %d (pid %d) exited with %s after %.1f s; restarting in %.2f s",
                        slot.id, pid, describe_exit(rc), ran, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.d.stop_event.wait(), delay)
            if self.d.stopping or slot.retired:
                break
            slot.stats.restarts += 1
        slot.supervisor_done()
        self.changed()
        if slot.retired and not self.d.stopping and slot in self.slots:
            self.slots.remove(slot)

    def _count_unreported(self, slot: WorkerSlot, proc: asyncio.subprocess.Process,
                          rc: int | None) -> None:
        """The connections of a worker whose channel ended before it exited: finished if
        it exited 0 (it drains them, within --grace), lost otherwise."""
        left, slot.unreported = slot.unreported, None
        if left is None or left[0] is not proc:
            return
        n = left[1]
        if rc == 0:
            log.info("worker %d (pid %d) exited 0: it finished the %d connection(s) it had "
                     "when its channel ended", slot.id, proc.pid, n)
            return
        slot.stats.lost += n
        self.counters["lost"] += n
        log.warning("worker %d (pid %d) exited with %s: %d open connection(s) lost with it",
                    slot.id, proc.pid, describe_exit(rc), n)

    def _connect_timeout(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        if slot.proc is proc and slot.channel is None and proc.returncode is None:
            log.error("worker %d (pid %d) did not connect to the dispatcher within %.0f s: killed",
                      slot.id, proc.pid, self.cfg.connect_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _after_exit(self, slot: WorkerSlot) -> None:
        """The process is gone; its channel must end too (a forked child may hold it)."""
        ch = slot.channel
        if ch is None:
            return
        if await self.until(lambda: slot.channel is not ch, 1.0):
            return
        with contextlib.suppress(Exception):
            # abandons what is not answered in time (our copies closed: a child of the
            # worker may hold the channel, or, under Wine, an ACCEPT it wrote may still
            # arrive); _watch_worker drops them from the slot
            await ch.aclose()

    # -- retiring, reloading ---------------------------------------------------------

    def retire(self, slot: WorkerSlot, reason: str) -> None:
        """Stop giving ``slot`` connections; ask it to migrate what it can and exit."""
        slot.retire()
        self.changed()
        self.d.migration.push_peers(slot.pool_state)
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return
        if slot.channel is None or not (slot.python and slot.control(
                Drain(migrate=True, reason=reason))):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()   # a foreign worker drains on SIGTERM (docs/server.md)
        self._watch_drain(slot, proc)

    def _watch_drain(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        """Kill a retiring worker only once its drain stopped making progress: ``--grace``
        + 3 s in which its open count never went below its lowest so far, none of its
        connections moved out (``migrated_out``), and none of its direct moves was in
        flight. While its connections keep moving, nothing queued for a move is lost
        to a clock (the worker's own drain works the same way: ``Worker._drain``)."""
        loop = asyncio.get_running_loop()
        limit = self.cfg.grace + 3.0
        tick = min(1.0, max(0.05, limit / 4))
        lowest, out, quiet_since = slot.active, slot.stats.migrated_out, loop.time()

        def look() -> None:
            nonlocal lowest, out, quiet_since
            if slot.proc is not proc or proc.returncode is not None or self.d.stopping:
                return   # (gone; or the shutdown's own deadline applies)
            now = loop.time()
            moving = self.d.migration.moving_from(proc.pid, limit)
            if slot.active < lowest or slot.stats.migrated_out != out or moving:
                lowest, out, quiet_since = min(lowest, slot.active), slot.stats.migrated_out, now
            if now - quiet_since < limit:
                loop.call_later(tick, look)
                return
            self.counters["drain_kills"] += 1
            log.warning("worker %d (pid %d): retiring, %d connection(s) left and no progress "
                        "for %.1f s (--grace %g + 3): killed", slot.id, proc.pid, slot.active,
                        now - quiet_since, self.cfg.grace)
            self.kill_if_running(slot, proc)

        loop.call_later(tick, look)

    async def recycle(self, old: WorkerSlot, reason: str) -> None:
        """Replace one worker (it asked: ``--max-requests``) as a reload replaces them
        all: the new one starts and says hello, then the old one is retired (it stops
        taking connections and drains; nothing is dropped)."""
        pool = old.pool_state
        if (old.recycling or old.retired or old not in pool.workers or self.d.stopping
                or self.d.handover.handed_over or self.d.handover.reload_refusal()):
            return
        old.recycling = True
        new = WorkerSlot(old.id, pool, old.stats)
        self.slots.append(new)
        self.start(new)
        failed = await self.wait_ready([new], self.cfg.connect_timeout)
        if failed or self.d.stopping or old not in pool.workers or self.d.handover.handed_over:
            log.warning("worker %d: its replacement (%s) did not start; it goes on serving",
                        old.id, reason)
            self._abandon([(pool, old, new)])
            old.recycling = False
            return
        pool.workers = [new if w is old else w for w in pool.workers]
        self.retire(old, reason)
        self.counters["recycled"] += 1
        log.info("worker %d (pid %s) replaced (%s) by pid %s", old.id, old.pid, reason, new.pid)

    def scale(self, delta: int, why: str) -> None:
        """SIGTTIN (+1) / SIGTTOU (-1): one worker more or less in the default pool (never
        fewer than one). The new one gets connections once ready; the one removed (the
        newest) is retired: it migrates what can move and finishes the rest."""
        pool = self.pools[self.cfg.default_pool]
        busy = ("the dispatcher is stopping" if self.d.stopping else
                "the dispatcher handed over" if self.d.handover.handed_over else
                self.d.handover.reload_refusal() or
                ("a reload is under way" if self._reload_task is not None
                 and not self._reload_task.done() else ""))
        if busy:
            log.warning("%s: ignored: %s", why, busy)
            return
        if delta > 0:
            slot = WorkerSlot(next(self.d.worker_ids), pool)
            pool.workers.append(slot)
            self.slots.append(slot)
            self.start(slot)
        elif len(pool.workers) <= 1:
            log.warning("%s: ignored: pool %r keeps its last worker", why, pool.cfg.name)
            return
        else:
            slot = pool.workers.pop()
            self.retire(slot, why)
        pool.cfg = dataclasses.replace(pool.cfg, workers=len(pool.workers))
        self.cfg.pools[pool.cfg.name] = pool.cfg
        log.info("%s: pool %r has %d worker(s) now (worker %d %s)", why, pool.cfg.name,
                 len(pool.workers), slot.id, "starting" if delta > 0 else "retiring")

    async def reload(self, why: str = "reload requested", *, wait: bool = False) -> dict[str, Any]:
        """Replace every worker by a fresh process (the app imported again), migrating the
        connections that can move. Concurrent requests are coalesced: one reload covers
        every request made before it started."""
        if self.d.stopping or self.d.handover.handed_over:
            return {"ok": False, "error": "the dispatcher is stopping or handed over"}
        upgrading = self.d.handover.reload_refusal()
        if upgrading:
            log.warning("%s: reload refused: %s", why, upgrading)
            return {"ok": False, "error": f"reload refused: {upgrading}"}
        self._reload_requested += 1
        seq = self._reload_requested
        log.info("%s: reload #%d", why, seq)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._reload_waiters.append((seq, fut))
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = self.d.spawn(self._reload_loop(), critical=False)
        if not wait:
            return {"ok": True, "queued": seq}
        try:
            error = await asyncio.wait_for(asyncio.shield(fut), self.cfg.connect_timeout + 30.0)
        except TimeoutError:
            return {"ok": False, "error": "the reload did not complete in time"}
        return {"ok": error is None, "generation": self.d.generation,
                **({} if error is None else {"error": error})}

    async def _reload_loop(self) -> None:
        while self._reload_done < self._reload_requested and not self.d.stopping:
            target = self._reload_requested
            error = await self._reload_once()
            self._reload_done = target
            for seq, fut in list(self._reload_waiters):
                if seq <= target:
                    self._reload_waiters.remove((seq, fut))
                    if not fut.done():
                        fut.set_result(error)

    def _abandon(self, fresh: list[tuple[PoolState, WorkerSlot | None, WorkerSlot]]) -> None:
        """Stop the new workers of a reload that will not serve."""
        for _p, _o, new in fresh:
            new.retired = True
            if new.proc is not None and new.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    new.proc.terminate()
                asyncio.get_running_loop().call_later(self.cfg.grace + 3.0,
                                                      self.kill_if_running, new, new.proc)

    async def _reload_once(self) -> str | None:
        """One reload: None once the new generation serves, else what went wrong."""
        mono = time.monotonic_ns() // 1000   # (CLOCK_MONOTONIC on Linux; any OS has it)
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={mono}\nSTATUS=reloading")
        revert: Callable[[], None] = lambda: None  # noqa: E731
        if self.d.reconfigure is not None:
            try:
                revert = reconfigure(self.d, self.d.reconfigure)
            except ConfigError as exc:
                self.counters["reload_failures"] += 1
                log.error("reload: %s; the running configuration stays, nothing changed", exc)
                sd_notify(f"READY=1\nSTATUS=reload failed; {self.d.status_line()}")
                return f"configuration not applied: {exc}"
        fresh: list[tuple[PoolState, WorkerSlot | None, WorkerSlot]] = []
        olds: list[WorkerSlot] = []
        for pool in self.pools.values():
            current = list(pool.workers)
            olds += current
            for i in range(pool.cfg.workers):   # (the configuration may have changed it)
                prev = current[i] if i < len(current) else None
                new = (WorkerSlot(prev.id, pool, prev.stats) if prev is not None
                       else WorkerSlot(next(self.d.worker_ids), pool))
                self.slots.append(new)
                fresh.append((pool, prev, new))
                self.start(new)
        failed = await self.wait_ready([n for _p, _o, n in fresh], self.cfg.connect_timeout)
        if self.d.stopping:   # (the shutdown stops every worker, these ones too)
            return "the dispatcher is stopping"
        upgrading = self.d.handover.reload_refusal() or (
            "the dispatcher handed over to a new one" if self.d.handover.handed_over else "")
        if upgrading:   # an upgrade started while the new workers were starting
            self.counters["reload_failures"] += 1
            log.error("reload abandoned: %s", upgrading)
            self._abandon(fresh)
            revert()
            # (RELOADING=1 said above wants its READY=1: the old workers serve on)
            sd_notify(f"READY=1\nSTATUS=reload abandoned; {self.d.status_line()}")
            return f"reload abandoned: {upgrading}"
        if failed:
            self.counters["reload_failures"] += 1
            log.error("reload failed: %s; the old workers go on serving",
                      ", ".join(f"worker {s.id} ({'app error' if s.fatal else s.state})" for s in failed))
            self._abandon(fresh)
            revert()
            sd_notify(f"READY=1\nSTATUS=reload failed; {self.d.status_line()}")
            return "the new workers did not start; the old ones go on serving"
        for pool in self.pools.values():
            pool.workers = [new for p, _o, new in fresh if p is pool]
        for old in olds:
            self.retire(old, "reload")
        self.d.generation += 1
        self.counters["reloads"] += 1
        log.info("reload: generation %d serving (%d worker(s)); %d old worker(s) draining",
                 self.d.generation, len(fresh), len(olds))
        for pool in self.pools.values():
            self.admission.feed(pool)
        sd_notify(f"READY=1\nSTATUS={self.d.status_line()}")
        return None

    # -- hung workers ------------------------------------------------------------------

    def kill_hung(self, now: float) -> None:
        """--timeout: a worker that leaves a handoff unanswered that long is not serving
        (its event loop is blocked, or it is stopped): SIGKILL. Its channel breaks, the
        unanswered handoffs come back and go to other workers, the supervisor starts a
        new one. Connections it had accepted die with it, as with any crash."""
        for slot in self.slots:
            proc = slot.proc
            if (not slot.pending and not slot.raw) or proc is None or proc.returncode is not None \
                    or slot.hung:
                continue
            oldest = min([w.sent for _t, w in slot.pending.values()]
                         + [sent for _fd, _meta, sent, _data in slot.raw.values()])
            if now - oldest <= self.cfg.timeout:
                continue
            slot.hung = True
            self.counters["hung_kills"] += 1
            log.error("worker %d (pid %d) left %d handoff(s) unanswered for %.1f s (--timeout "
                      "%g): killing it; they go to other workers", slot.id, proc.pid,
                      len(slot.pending) + len(slot.raw), now - oldest, self.cfg.timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for (source, _hid), (slot, since) in list(self.d.migration.moving.items()):
            proc = slot.proc
            if now - since <= self.cfg.timeout or proc is None or proc.returncode is not None \
                    or slot.hung:
                continue
            slot.hung = True
            self.counters["hung_kills"] += 1
            log.error("worker %d (pid %d) left a connection migrating in from pid %d unanswered "
                      "for %.1f s (--timeout %g): killing it; the connection goes back", slot.id,
                      proc.pid, source, now - since, self.cfg.timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
