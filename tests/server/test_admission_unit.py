"""Admission and worker slots, built in the test process (no dispatcher, no worker process).

:class:`~sockshare.server._admission.Admission` is given real pools and real worker
slots whose channel is a stand-in that records what would be sent; client connections
are real TCP connections on 127.0.0.1, so a refusal is seen as the client sees it (a
reset). Together with the end-to-end tests (test_serve_*), these pin the decisions of
admission one by one: placing, batching, queueing, refusing, re-dispatching, and the
forwarding hook of an upgrade's hand-over; and the worker slot's state transitions.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from stand_ins import StandInChannel
from tests._fdcount import fd_count, wait_fd_count

from sockshare.server._admission import Admission
from sockshare.server._config import PoolConfig, ServerConfig
from sockshare.server._policy import ConnInfo
from sockshare.server._slots import TRANSITIONS, PoolState, SlotState, Waiting, WorkerSlot


class Clients:
    """Real TCP connections: the server ends go to admission, the client ends stay here."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.clients: list[socket.socket] = []
        #: the server ends: what admission did not close (a stand-in channel "sent"
        #: them) is closed at the end, as the worker would
        self.servers: list[socket.socket] = []
        self._ids = itertools.count(1)

    def waiting(self, pool: str = "default") -> Waiting:
        c = socket.create_connection(self.listener.getsockname()[:2], timeout=5)
        self.clients.append(c)
        s, addr = self.listener.accept()
        self.servers.append(s)
        hid = f"t.{next(self._ids)}"
        meta: dict[str, Any] = {"handoff_id": hid, "client": list(addr), "pool": pool}
        return Waiting(s, ConnInfo(list(addr), "l", pool, hid, meta), meta, b"", time.monotonic())

    def close(self) -> None:
        for c in self.clients + self.servers:
            c.close()
        self.listener.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    try:
        yield c
    finally:
        c.close()


def build(workers: int = 2, *, max_conns: int | None = None, queue: int = 2,
          max_retries: int = 3) -> tuple[Admission, PoolState, list[WorkerSlot]]:
    pc = PoolConfig("default", app="x:y", workers=workers, max_conns=max_conns, queue=queue)
    cfg = ServerConfig(listeners=[], pools={"default": pc}, max_retries=max_retries)
    pool = PoolState(pc)
    counters = {"redispatches": 0}
    adm = Admission(cfg, {"default": pool}, counters)
    adm.accepting = True   # flushed by the test (as at the end of an accept burst)
    slots = []
    for wid in range(1, workers + 1):
        slot = WorkerSlot(wid, pool)
        pool.workers.append(slot)
        slots.append(slot)
    return adm, pool, slots


def up(slot: WorkerSlot) -> StandInChannel:
    ch = StandInChannel()
    slot.connected(ch, stopping=False)  # type: ignore[arg-type]
    return ch


def state_of(slot: WorkerSlot) -> SlotState:
    """``slot.state`` as a call: mypy keeps an ``assert slot.state is X`` narrowing across
    the method calls that change the state, and would take the next assert as unreachable."""
    return slot.state


def reset_seen(c: socket.socket) -> bool:
    c.settimeout(5)
    try:
        c.recv(1)
    except ConnectionResetError:
        return True
    return False


def test_place_batches_per_worker_and_flush_sends_one_batch_each(clients: Clients) -> None:
    adm, pool, (w1, w2) = build()
    ch1, ch2 = up(w1), up(w2)
    ws = [clients.waiting() for _ in range(4)]
    for w in ws:
        adm.place(w)
    # least-conn counts what is reserved: the four alternate between the two workers
    assert (w1.reserved, w2.reserved) == (2, 2)
    assert not ch1.batches
    assert not ch2.batches
    adm.flush()
    assert [len(b) for b in ch1.batches] == [2]
    assert [len(b) for b in ch2.batches] == [2]
    assert (w1.reserved, len(w1.pending), w2.reserved, len(w2.pending)) == (0, 2, 0, 2)
    assert w1.connections == 2
    assert all(w.sent > 0 for w in ws)
    assert not pool.queue
    assert adm.refused == {}


def test_no_room_queues_then_feed_sends_in_order(clients: Clients) -> None:
    adm, pool, (w1,) = build(1, max_conns=1, queue=4)
    ch = up(w1)
    a, b, c = (clients.waiting() for _ in range(3))
    adm.place(a)
    adm.place(b)
    adm.place(c)
    adm.flush()
    assert [x[0] for x in ch.batches[0]] == [a.sock]
    assert list(pool.queue) == [b, c]
    w1.pending.clear()   # (a closed)
    adm.feed(pool)
    adm.flush()
    assert [x[0] for x in ch.batches[1]] == [b.sock]
    assert list(pool.queue) == [c]


def test_full_queue_refuses_with_a_reset(clients: Clients) -> None:
    adm, pool, _slots = build(1, queue=1)   # the worker is not up: nothing has room
    before = fd_count()
    first, second = clients.waiting(), clients.waiting()
    adm.place(first)
    adm.place(second)
    assert list(pool.queue) == [first]
    assert adm.refused == {"queue_full": 1}
    assert second.sock.fileno() == -1
    assert reset_seen(clients.clients[1])
    adm.refuse_queued("shutdown", "the server is stopping")
    assert adm.refused == {"queue_full": 1, "shutdown": 1}
    assert not pool.queue
    assert reset_seen(clients.clients[0])
    for c in clients.clients:
        c.close()
    wait_fd_count("self", before)   # admission kept no copy of either connection


def test_expired_wait_is_refused(clients: Clients) -> None:
    adm, pool, _slots = build(1)
    w = clients.waiting()
    adm.place(w)
    adm.expire(w.since + adm.cfg.queue_timeout + 1)
    assert adm.refused == {"queue_timeout": 1}
    assert not pool.queue


def test_an_expired_wait_behind_a_younger_redispatch_is_refused(clients: Clients) -> None:
    # A re-dispatched connection goes to the head of the queue, and may have waited less
    # than the connections behind it (a compiled-path handoff that came back counts from
    # its return; several re-dispatches stack up newest first): one that waited past
    # --queue-timeout is refused wherever it stands in the queue.
    adm, pool, (w1,) = build(1, queue=4)   # the worker is not up: nothing has room
    old = clients.waiting()
    adm.place(old)
    back = clients.waiting()
    back.since = old.since + 20
    adm.redispatch(back, w1, "rejected by worker 1")
    assert list(pool.queue) == [back, old]
    adm.expire(old.since + adm.cfg.queue_timeout + 1)
    assert adm.refused == {"queue_timeout": 1}
    assert list(pool.queue) == [back]
    assert old.sock.fileno() == -1
    assert reset_seen(clients.clients[0])


def test_redispatch_prefers_another_worker_then_gives_up(clients: Clients) -> None:
    adm, _pool, (w1, w2) = build(2, max_retries=1)
    up(w1)
    up(w2)
    w = clients.waiting()
    adm.redispatch(w, w1, "rejected by worker 1")
    assert w.attempts == 1
    assert w.meta["attempt"] == 1
    assert w.exclude == 1
    assert (w1.reserved, w2.reserved) == (0, 1)
    assert adm.counters["redispatches"] == 1
    adm.flush()
    w2.pending.clear()
    adm.redispatch(w, w2, "rejected by worker 2")
    assert adm.refused == {"retries_exhausted": 1}
    assert w.sock.fileno() == -1


def test_a_draining_worker_gets_nothing_and_its_batch_comes_back(clients: Clients) -> None:
    adm, _pool, (w1, w2) = build()
    channels = {w1: up(w1), w2: up(w2)}
    w = clients.waiting()
    adm.place(w)
    first = w1 if w1.reserved else w2
    assert first.stops_taking()
    assert first.state is SlotState.DRAINING
    adm.flush()   # its batch bounces (no attempt counted) to the other worker
    other = w2 if first is w1 else w1
    assert w.attempts == 0
    assert other.reserved == 1
    adm.flush()
    assert len(other.pending) == 1
    assert not first.pending
    assert [x[0] for x in channels[other].batches[0]] == [w.sock]
    assert not channels[first].batches


def test_after_hand_over_what_finds_no_room_goes_upstream(clients: Clients) -> None:
    adm, pool, _slots = build(1)
    queued = clients.waiting()
    adm.place(queued)
    forwarded: list[Waiting] = []

    def forward(w: Waiting) -> bool:
        forwarded.append(w)
        return True

    adm.upstream = forward
    adm.feed(pool)
    fresh = clients.waiting()
    adm.place(fresh)
    assert forwarded == [queued, fresh]
    assert not pool.queue
    for w in forwarded:   # (the upgrade's channel would have taken them)
        w.sock.close()


def test_a_migration_goes_to_the_relay(clients: Clients) -> None:
    adm, _pool, _slots = build(1)
    relayed: list[Waiting] = []
    adm.place_migration = relayed.append
    w = clients.waiting()
    w.origin = object()  # type: ignore[assignment]  # (the source's handoff)
    adm.place(w)
    assert relayed == [w]
    w.sock.close()


def test_slot_transitions_follow_the_table() -> None:
    pool = PoolState(PoolConfig("default", app="x:y"))
    for name, (sources, targets) in TRANSITIONS.items():
        for state in sources:
            slot = WorkerSlot(1, pool)
            slot.state = state
            if name == "process_started":
                slot.process_started(None, 1.0)  # type: ignore[arg-type]
            elif name == "connected":
                slot.connected(StandInChannel(), stopping=False)  # type: ignore[arg-type]
            elif name == "retire":
                slot.retire()
                assert slot.retired
            else:
                getattr(slot, name)()
            assert slot.state in targets, (name, state, slot.state)
    slot = WorkerSlot(1, pool)
    assert state_of(slot) is SlotState.STARTING
    assert not slot.has_room()
    up(slot)
    assert state_of(slot) is SlotState.READY
    assert slot.has_room()
    slot.retire()
    assert state_of(slot) is SlotState.RETIRING
    assert not slot.has_room()
    slot.channel_ended()
    assert state_of(slot) is SlotState.GONE
    assert slot.channel is None
    # a slot that connects while the dispatcher stops takes nothing
    other = WorkerSlot(2, pool)
    other.connected(StandInChannel(), stopping=True)  # type: ignore[arg-type]
    assert other.state is SlotState.DRAINING
    # the status shows the plain string
    assert f"{other.state}" == "draining"
    assert state_of(other) == "draining"
