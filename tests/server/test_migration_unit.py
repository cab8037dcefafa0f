"""The migration relay and its bookkeeping, built in the test process.

:class:`~sockshare.server._migration.Migrations` gets a stand-in for the dispatcher
(the config, the pools, the counters, a real :class:`~sockshare.server._admission.Admission`)
and worker slots whose channels are stand-ins that record what would be sent; the
migrated connections are real TCP connections on 127.0.0.1. The end-to-end tests
(test_live_migration.py) run the same paths through real workers.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from stand_ins import StandInChannel, Ticket

from sockshare import SockshareError
from sockshare.server._admission import Admission
from sockshare.server._config import PoolConfig, ServerConfig
from sockshare.server._gc import MoveBurst
from sockshare.server._messages import MoveBack, MovedIn, MovedOut, MoveKey, Moving, PeerEntry
from sockshare.server._migration import Migrations
from sockshare.server._slots import PoolState, WorkerSlot
from sockshare.server._supervision import Supervisor


@dataclass
class StandInHandoff:
    """A handoff a source worker sent the dispatcher (what the relay uses of Handoff)."""

    socket: socket.socket
    meta: dict[str, Any]
    data: bytes = b""
    answered: bool = False
    answer: str = ""

    @property
    def raw_meta(self) -> bytes:
        """The metadata as it came (the relay forwards it so when it did not change it)."""
        return json.dumps(self.meta, separators=(",", ":")).encode()

    def accept(self) -> None:
        self.answered, self.answer = True, "accept"

    def reject(self, why: str) -> None:
        self.answered, self.answer = True, f"reject: {why}"
        self.socket.close()


class Relay:
    """Migrations with a stand-in dispatcher and three resuming workers."""

    def __init__(self, workers: int = 3) -> None:
        pc = PoolConfig("default", app="x:y", workers=workers)
        self.cfg = ServerConfig(listeners=[], pools={"default": pc})
        self.pool = PoolState(pc)
        self.counters: dict[str, int] = dict.fromkeys(
            ("migrations", "migrations_refused", "migrations_closed", "migrations_direct",
             "migration_requests", "rebalances", "redispatches"), 0)
        self.admission = Admission(self.cfg, {"default": self.pool}, self.counters)
        self.admission.accepting = True   # (no event loop: nothing scheduled for later)
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.d = SimpleNamespace(
            cfg=self.cfg, pools={"default": self.pool}, slots=[], counters=self.counters,
            admission=self.admission,
            handover=SimpleNamespace(handed_over=False, successor_peers={}),
            spawn=lambda coro, critical=True: self.spawned.append(coro), gc_hold=MoveBurst())
        self.mig = Migrations(self.d)  # type: ignore[arg-type]
        self.admission.place_migration = self.mig.place
        self.admission.migration_failed = self.mig.failed
        self.channels: list[StandInChannel] = []
        self.workers: list[WorkerSlot] = []
        for wid in range(1, workers + 1):
            slot = self.add_worker(wid, 1000 + wid)
            self.pool.workers.append(slot)
            self.workers.append(slot)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = [self.listener]

    def add_worker(self, wid: int, pid: int) -> WorkerSlot:
        """A ready worker that resumes and takes direct migrations (not in a pool yet)."""
        slot = WorkerSlot(wid, self.pool)
        slot.proc = SimpleNamespace(pid=pid, returncode=None)  # type: ignore[assignment]
        ch = StandInChannel()
        slot.connected(ch, stopping=False)  # type: ignore[arg-type]
        slot.can_resume = True
        slot.peer_path = f"/run/{pid}.peer"
        self.d.slots.append(slot)
        self.channels.append(ch)
        return slot

    def handoff(self) -> StandInHandoff:
        c = socket.create_connection(self.listener.getsockname()[:2], timeout=5)
        s, addr = self.listener.accept()
        self.sockets += [c, s]
        return StandInHandoff(s, {"resume": {"n": 1}, "handoff_id": "t.1", "client": list(addr),
                                  "pool": "default"})

    def close(self) -> None:
        for coro in self.spawned:
            coro.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    try:
        yield r
    finally:
        r.close()


def test_relay_forwards_at_once_and_answers_the_source_after_the_target(relay: Relay) -> None:
    w1, w2, w3 = relay.workers
    w1.active, w2.active, w3.active = 5, 3, 1
    h = relay.handoff()
    relay.mig.take(w1, h)  # type: ignore[arg-type]
    # in transit: no longer the source's; forwarded now to the idlest other worker
    assert w1.active == 4
    assert [len(b) for b in relay.channels[2].batches] == [1]
    assert relay.channels[2].batches[0][0][0] is h.socket
    assert len(w3.pending) == 1
    assert not h.answered   # the source waits for the target's answer
    (_t, w), = w3.pending.values()
    relay.mig.done(w, w3)
    assert h.answer == "accept"
    assert relay.counters["migrations"] == 1
    assert (w1.stats.migrated_out, w3.stats.migrated_in) == (1, 1)
    assert len(relay.mig.latencies) == 1


def test_no_target_gives_the_connection_back(relay: Relay) -> None:
    w1, w2, w3 = relay.workers
    w2.stops_taking()
    w3.can_resume = False
    w1.active = 2
    h = relay.handoff()
    relay.mig.take(w1, h)  # type: ignore[arg-type]
    assert h.answer.startswith("reject: no other worker of pool 'default'")
    assert w1.active == 2   # it stays the source's
    assert relay.counters["migrations_refused"] == 1
    assert h.socket.fileno() == -1


def test_a_source_that_is_gone_cannot_take_it_back(relay: Relay) -> None:
    w1, _w2, _w3 = relay.workers
    h = relay.handoff()
    relay.mig.take(w1, h)  # type: ignore[arg-type]
    (_t, w), = relay.workers[1].pending.values() or relay.workers[2].pending.values()
    w1.channel_ended()
    relay.mig.failed(w, "the target went away")
    assert relay.counters["migrations_closed"] == 1
    assert relay.counters["migrations_refused"] == 0


def test_a_restarted_source_is_not_given_its_predecessors_connection(relay: Relay) -> None:
    """The source died while its migration was in transit and its slot has a new
    process by the time the relay fails: the connection is closed, not counted as the
    new process's (which never had it and will never report it closed)."""
    w1, _w2, _w3 = relay.workers
    h = relay.handoff()
    relay.mig.take(w1, h)  # type: ignore[arg-type]
    (_t, w), = relay.workers[1].pending.values() or relay.workers[2].pending.values()
    w1.channel_ended()
    w1.connected(StandInChannel(), stopping=False)  # type: ignore[arg-type]
    relay.mig.failed(w, "the target went away")
    assert w1.active == 0
    assert relay.counters["migrations_closed"] == 1
    assert relay.counters["migrations_refused"] == 0


def test_not_a_migration_is_rejected(relay: Relay) -> None:
    h = relay.handoff()
    h.meta = {"handoff_id": "x"}
    relay.mig.take(relay.workers[0], h)  # type: ignore[arg-type]
    assert "resume" in h.answer


def test_direct_move_reports(relay: Relay) -> None:
    w1, w2, _w3 = relay.workers
    w1.active = 3
    relay.mig.moving_out(w1, Moving(2, MoveKey(1001, 7)))
    assert relay.mig.moving[(1001, 7)][0] is w2
    relay.mig.moved_out(w1, MovedOut(2, MoveKey(1001, 7)))
    relay.mig.moved_in(w2, MovedIn(1, (1001, 7), 0.002))
    assert not relay.mig.moving
    assert (w1.active, w2.active) == (2, 1)
    assert (w1.stats.migrated_out, w2.stats.migrated_in) == (1, 1)
    assert relay.counters["migrations_direct"] == 1
    assert list(relay.mig.latencies) == [0.002]


def test_peer_lists_name_the_others_with_room_once(relay: Relay) -> None:
    _w1, _w2, w3 = relay.workers
    relay.mig.push_peers(relay.pool)
    peers = relay.channels[0].controls[-1]
    assert peers == {"cmd": "peers", "peers": [[2, 1002, "/run/1002.peer", 0],
                                               [3, 1003, "/run/1003.peer", 0]]}
    relay.mig.push_peers(relay.pool)   # nothing changed: nothing sent
    assert len(relay.channels[0].controls) == 1
    w3.retire()
    relay.mig.push_peers(relay.pool)
    assert relay.channels[0].controls[-1]["peers"] == [[2, 1002, "/run/1002.peer", 0]]
    # a retired worker is listed to nobody, and is told who takes its connections: the
    # others, as before (not sent again)
    assert len(relay.channels[2].controls) == 1


def test_a_reloads_old_workers_are_told_the_new_ones_and_an_upgrades_the_new_dispatchers(
        relay: Relay) -> None:
    """A reload replaces the pool's workers, then retires the old ones: they are no
    longer the pool's, but their connections go straight to the new ones (with their
    room: max_conns, descriptors). An upgrade's hand-over: they are told the new
    dispatcher's workers for their pool, as its ``peers`` command listed them (nobody
    if it did not answer), and again when that list changes."""
    old = list(relay.workers)
    fresh = [relay.add_worker(wid, 2000 + wid) for wid in (1, 2, 3)]   # (the old ids)
    fresh[0].set_fd_full(False, capacity=10)
    fresh[0].active = 4
    relay.pool.workers = fresh
    for slot in old:
        slot.retire()
    relay.mig.push_peers(relay.pool)
    new_list = [[1, 2001, "/run/2001.peer", 4, 6], [2, 2002, "/run/2002.peer", 0],
                [3, 2003, "/run/2003.peer", 0]]
    for ch in relay.channels[:3]:   # each old worker: all three new ones
        assert ch.controls[-1] == {"cmd": "peers", "peers": new_list}
    assert relay.channels[3].controls[-1]["peers"] == new_list[1:]   # not itself
    assert relay.mig.targets(relay.pool) == (
        PeerEntry(1, 2001, "/run/2001.peer", 4, 6), PeerEntry(2, 2002, "/run/2002.peer", 0),
        PeerEntry(3, 2003, "/run/2003.peer", 0, None))
    relay.d.handover.handed_over = True
    for slot in fresh:
        slot.retire()
    relay.mig.push_peers(relay.pool)
    for ch in relay.channels:
        assert ch.controls[-1] == {"cmd": "peers", "peers": []}
    sent = [len(ch.controls) for ch in relay.channels]
    relay.mig.push_peers(relay.pool)
    assert [len(ch.controls) for ch in relay.channels] == sent
    successor = (PeerEntry(1, 3001, "/run/3001.peer", 7, 100), PeerEntry(2, 3002, "/run/3002.peer", 9))
    relay.d.handover.successor_peers = {"default": successor, "other": (PeerEntry(5, 1, "/x", 0),)}
    relay.mig.push_peers(relay.pool)
    for ch in relay.channels:
        assert ch.controls[-1] == {"cmd": "peers", "peers": [[1, 3001, "/run/3001.peer", 7, 100],
                                                             [2, 3002, "/run/3002.peer", 9]]}


def test_an_orphan_of_a_process_not_ours_is_served_only_once_that_process_is_gone(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target asks about a direct migration whose ACCEPT could not reach its source,
    a process this dispatcher never started (an upgrade's old worker): served once that
    process no longer runs, closed while it runs (it may have taken it back); our
    counts are not touched (they never had it)."""
    import subprocess
    import sys

    from sockshare.server import _migration
    from sockshare.server._messages import OrphanQuery

    monkeypatch.setattr(_migration, "ORPHAN_WAIT", 0.3)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = dict(relay.counters)
        target = relay.workers[0]
        asyncio.run(relay.mig.answer_orphan(target, OrphanQuery(gone.pid, MoveKey(gone.pid, 7))))
        assert relay.channels[0].controls[-1] == {"cmd": "orphan", "key": [gone.pid, 7], "dead": True}
        asyncio.run(relay.mig.answer_orphan(target, OrphanQuery(alive.pid, MoveKey(alive.pid, 8))))
        assert relay.channels[0].controls[-1] == {"cmd": "orphan", "key": [alive.pid, 8], "dead": False}
        assert relay.counters == before
        assert [(w.stats.lost, w.stats.migrated_out, w.active) for w in relay.workers] == [(0, 0, 0)] * 3
    finally:
        alive.kill()
        alive.wait()


def test_rebalance_asks_the_busiest_worker(relay: Relay) -> None:
    w1, _w2, _w3 = relay.workers
    w1.active = 40
    relay.mig.rebalance(100.0)
    assert relay.counters["rebalances"] == 1
    assert len(relay.spawned) == 1
    assert relay.spawned[0].cr_frame.f_locals["slot"] is w1  # type: ignore[attr-defined]
    relay.mig.rebalance(100.1)   # not again before rebalance_after
    assert relay.counters["rebalances"] == 1


@dataclass
class ReportingChannel(StandInChannel):
    """A source worker's channel after one read: its handoffs and controls (what the
    supervisor's read callback takes from an AsyncChannel)."""

    handoffs: list[StandInHandoff] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)

    def accepted(self) -> list[Ticket]:
        return []

    def take_raw_accepted(self) -> int:
        return 0   # (handoffs of the compiled dispatcher path: none here)

    def returned(self) -> list[Ticket]:
        return []

    def received(self) -> list[StandInHandoff]:
        out, self.handoffs = self.handoffs, []
        return out

    def received_controls(self) -> list[dict[str, Any]]:
        out, self.reports = self.reports, []
        return out


def test_a_connection_moved_in_and_relayed_out_in_one_read_is_not_counted(relay: Relay) -> None:
    """A worker that got a connection directly from a peer and migrates it on through the
    dispatcher sends the ``moved_in`` ahead of the handoff. Read together, the supervisor
    must count it in before it counts it out: the other way round the -1 hit 0 (clamped)
    and the +1 then left the worker counting a connection it no longer had."""
    w1, w2, w3 = relay.workers
    relay.d.migration = relay.mig
    sup = Supervisor(relay.d)  # type: ignore[arg-type]
    ch = ReportingChannel()
    ch.reports.append({"ev": "moved_in", "from": 1, "key": [1001, 5], "latency": 0.001})
    ch.handoffs.append(relay.handoff())
    sup._settle_safely(w2, ch)  # type: ignore[arg-type]
    assert w2.active == 0
    assert w2.stats.migrated_in == 1
    # relayed on to another worker, which counts it in once it accepts
    assert len(relay.channels[0].batches) + len(relay.channels[2].batches) == 1
    assert (w1.active, w3.active) == (0, 0)


def test_the_relay_holds_the_dispatchers_collector_while_moves_go_on(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each relayed move holds the dispatcher's collections (``_gc.MoveBurst``, as in the
    workers): a reload of 10,000 cost it 59 ms of collections, now none. They come back
    once the moves stop."""
    import gc

    from sockshare.server import _gc

    monkeypatch.setattr(_gc, "QUIET", 0.2)
    enabled = gc.isenabled()
    gc.enable()

    async def main() -> tuple[bool, bool]:
        relay.mig.take(relay.workers[0], relay.handoff())  # type: ignore[arg-type]
        during = gc.isenabled()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not relay.d.gc_hold.holding:
                break
        return during, gc.isenabled()

    try:
        assert asyncio.run(main()) == (False, True)
    finally:
        if not enabled:
            gc.disable()


def test_moves_to_a_target_not_ours_count_as_a_drains_progress_only(relay: Relay) -> None:
    """After an upgrade's hand-over, an old worker's moves go to the new dispatcher's
    workers, which the old one does not know: announced (``moving``), they count as its
    drain's progress until answered (``moved_out``, ``move_back``) or until the worker
    is gone -- and --timeout, which is for our own workers, never sees them."""
    source = relay.workers[0]
    pid = source.pid or 0
    relay.mig.moving_out(source, Moving(9, MoveKey(pid, 1), (MoveKey(pid, 2), MoveKey(pid, 3))))
    assert relay.mig.moving == {}
    assert set(relay.mig.moving_away) == {(pid, 1), (pid, 2), (pid, 3)}
    assert relay.mig.moving_from(pid, 10.0)
    assert not relay.mig.moving_from(pid + 1, 10.0)
    # (for a while only: a target that never answers does not hold a drain forever)
    assert not relay.mig.moving_from(pid, 0.0)
    relay.mig.moved_out(source, MovedOut(9, MoveKey(pid, 1)))
    relay.mig.move_back(source, MoveBack(9, MoveKey(pid, 2)))
    assert set(relay.mig.moving_away) == {(pid, 3)}
    relay.mig.forget_moves_from(pid)
    assert not relay.mig.moving_from(pid, 10.0)


def test_the_successors_peers_are_taken_only_from_the_successor(tmp_path: Path) -> None:
    """The old dispatcher of an upgrade asks ``peers`` at the new one's final control
    path first, then at its temporary one: an answer from another process (itself,
    before the new one moved its socket onto the path) is passed over, and the error
    says what answered."""
    import threading

    from sockshare.server._upgrade import _successor_pools

    def serve(path: str, answer: dict[str, Any]) -> socket.socket:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen()

        def run() -> None:
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                with c:
                    c.recv(65536)
                    c.sendall(json.dumps(answer).encode() + b"\n")

        threading.Thread(target=run, daemon=True).start()
        return srv

    ours = serve(str(tmp_path / "final"), {"ok": True, "pid": 1, "pools": {"default": []}})
    theirs = serve(str(tmp_path / "temp"), {"ok": True, "pid": 2, "pools": {
        "default": [[1, 2001, "/run/2001.peer", 3]]}})
    try:
        got = _successor_pools(2, (str(tmp_path / "final"), str(tmp_path / "temp")))
        assert got == {"default": [[1, 2001, "/run/2001.peer", 3]]}
        with pytest.raises(ValueError, match="answered"):
            _successor_pools(2, (str(tmp_path / "final"),))
        with pytest.raises(SockshareError):
            _successor_pools(2, (str(tmp_path / "nobody"),))
    finally:
        for srv in (ours, theirs):   # (wakes the thread in accept)
            srv.shutdown(socket.SHUT_RDWR)
            srv.close()
