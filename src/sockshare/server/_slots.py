"""What the dispatcher holds: worker slots and their states, pools, waiting connections.

A :class:`WorkerSlot` is one worker *process* (and its successors after crashes) seen
from the dispatcher: its channel, its counts and its :class:`SlotState`. Every change of
state is one of the methods below, so the whole life of a slot reads in one place
(``TRANSITIONS`` lists where each may start from)::

    process_started   (BACKOFF, or the first time)           -> STARTING
    connected         its channel is up                       -> READY
                      (retired: RETIRING; dispatcher stopping: DRAINING)
    stops_taking      it said "draining" or "fatal"           READY -> DRAINING
    retire            a reload replaced it, an upgrade        STARTING, BACKOFF, READY,
                      handed it over                          DRAINING -> RETIRING (with a
                                                              channel) or STOPPED
    channel_ended     its channel is gone                     READY, DRAINING, RETIRING -> GONE
    backing_off       the process exited; restart later       -> BACKOFF
    supervisor_done   stopping, or retired                    -> STOPPED

* ``STARTING``: the process runs (or is about to), its channel is not up yet;
* ``READY``: the channel is up; it gets connections while it has room;
* ``DRAINING``: its channel is up but it takes nothing new (it said ``draining`` or
  ``fatal``, or it connected while the dispatcher was stopping);
* ``RETIRING``: replaced by a reload or handed over by an upgrade; it migrates what it
  can and exits, and is never restarted;
* ``GONE``: its channel ended (the process may still be finishing its connections);
* ``BACKOFF``: the process exited; the supervisor restarts it after a delay;
* ``STOPPED``: the supervisor is done with it (stopping, or retired).

Besides the state, a slot keeps facts that are
not states: ``retired`` (never restart it), ``fatal`` (the app cannot start), ``hung``
(killed for --timeout), ``fd_full`` (out of descriptors), ``hello``/``can_resume`` (what
its hello said).

Nothing here starts a process or does I/O except :meth:`WorkerSlot.control` (a control
message on its channel): the admission unit tests build slots, pools and waiting
connections in the test process with a stand-in channel.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sockshare._aio import AsyncChannel
from sockshare._channel import Handoff, Ticket
from sockshare._errors import SockshareError
from sockshare.server._config import PoolConfig
from sockshare.server._messages import Command, PeerEntry, encode
from sockshare.server._policy import ConnInfo, Policy, make_policy

__all__ = ["PoolState", "SlotState", "Waiting", "WorkerSlot", "WorkerStats"]


class SlotState(StrEnum):
    """The state of a :class:`WorkerSlot` (its value is what ``sockshare status`` shows)."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    RETIRING = "retiring"
    GONE = "gone"
    BACKOFF = "backoff"
    STOPPED = "stopped"


#: where each transition method may take a slot from (documentation and the unit test)
TRANSITIONS: dict[str, tuple[frozenset[SlotState], frozenset[SlotState]]] = {
    "process_started": (frozenset({SlotState.STARTING, SlotState.BACKOFF, SlotState.GONE}),
                        frozenset({SlotState.STARTING})),
    "connected": (frozenset({SlotState.STARTING, SlotState.GONE, SlotState.STOPPED}),
                  frozenset({SlotState.READY, SlotState.DRAINING, SlotState.RETIRING})),
    "stops_taking": (frozenset({SlotState.READY}), frozenset({SlotState.DRAINING})),
    "channel_ended": (frozenset({SlotState.READY, SlotState.DRAINING, SlotState.RETIRING}),
                      frozenset({SlotState.GONE})),
    "backing_off": (frozenset(SlotState), frozenset({SlotState.BACKOFF})),
    "supervisor_done": (frozenset(SlotState), frozenset({SlotState.STOPPED})),
    "retire": (frozenset({SlotState.READY, SlotState.DRAINING, SlotState.STARTING,
                          SlotState.BACKOFF}),
               frozenset({SlotState.RETIRING, SlotState.STOPPED})),
}


@dataclass(eq=False, slots=True)
class Waiting:
    """A client connection the dispatcher holds: queued, batched or in flight.

    ``origin`` is set for a migration: the handoff the source (a worker, or the old
    dispatcher during an upgrade) sent us; it is answered when the target answers."""

    sock: socket.socket
    info: ConnInfo
    meta: dict[str, Any]
    data: bytes
    since: float
    attempts: int = 0
    exclude: int | None = None
    origin: Handoff | None = None
    origin_slot: WorkerSlot | None = None
    #: the source's channel when it handed it over (the slot may have a successor's since)
    origin_channel: object | None = None
    tried: list[WorkerSlot] = field(default_factory=list)
    #: ``meta`` already encoded as JSON (the admission fast path); None once ``meta``
    #: changes after admission
    raw: bytes | None = None
    #: when it was last handed to a worker (time.monotonic(); --timeout counts from it)
    sent: float = 0.0

    def encoded_meta(self) -> bytes | dict[str, Any]:
        return self.raw if self.raw is not None else self.meta


class PoolState:
    """A pool at run time: its workers, its policy, its queue."""

    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        self.policy: Policy = make_policy(cfg.policy, cfg.hash_key)
        self.workers: list[WorkerSlot] = []
        self.queue: deque[Waiting] = deque()
        rebalance = cfg.rebalance
        self.rebalance = (not cfg.policy.startswith("hash-")) if rebalance is None else rebalance


@dataclass(slots=True)
class WorkerStats:
    """Counters of one worker id, shared by its successive processes (restarts, reloads)."""

    generation: int = 0
    handoffs: int = 0
    rejects: int = 0
    returned: int = 0
    restarts: int = 0
    lost: int = 0
    migrated_in: int = 0
    migrated_out: int = 0
    #: accept = "worker": connections it accepted itself (its ``opened`` reports)
    accepted_here: int = 0


class WorkerSlot:
    """One worker process (and its successors after crashes): channel, counts, state.

    Implements :class:`~sockshare.server._policy.WorkerView` for the policies.
    """

    def __init__(self, wid: int, pool: PoolState, stats: WorkerStats | None = None) -> None:
        self.id = wid
        self.pool_state = pool
        self.stats = stats or WorkerStats()
        self.generation = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: AsyncChannel | None = None
        self.state = SlotState.STARTING
        self.active = 0
        self.reserved = 0
        self.pending: dict[int, tuple[Ticket, Waiting]] = {}
        #: handoffs in flight sent by the compiled path (its channel's ``raw_pending``:
        #: id -> (descriptor, meta JSON, sent)); counted like ``pending``
        self.raw: dict[int, tuple[int, bytes, float, bytes]] = {}
        self.started = 0.0
        self.rate = 0.0
        self.marks: deque[tuple[float, int]] = deque(maxlen=6)
        #: said {"ev": "hello", "resume": true}: a migration target
        self.can_resume = False
        self.hello = False
        #: where it listens for peer workers (direct migration), and what we told it last
        self.peer_path = ""
        self.peers_sent: tuple[PeerEntry, ...] | None = None
        self.fatal = False
        self.exits = 0
        #: replaced by a reload / handed over by an upgrade: never restarted
        self.retired = False
        #: a replacement is starting for it (--max-requests)
        self.recycling = False
        #: a web app's worker's last counter report (``_messages.WebCounts``)
        self.web_counts: tuple[int, ...] = (0, 0, 0, 0, 0)
        self.rebalance_after = 0.0
        #: killed for leaving a handoff unanswered past --timeout (until restarted)
        self.hung = False
        #: connections it may have (max_conns; 0 while it says it is out of descriptors)
        self.limit = pool.cfg.max_conns if pool.cfg.max_conns is not None else sys.maxsize
        self.fd_full = False
        #: (process, connections) whose channel ended while the process lived on: lost
        #: only if it does not exit cleanly (it finishes them first)
        self.unreported: tuple[asyncio.subprocess.Process, int] | None = None

    # -- the transitions (see the module docstring) -------------------------------------

    def process_started(self, proc: asyncio.subprocess.Process, now: float) -> None:
        """The supervisor started a new process for this slot."""
        self.proc = proc
        self.hung = False
        self.started = now
        self.state = SlotState.STARTING

    def connected(self, ch: AsyncChannel, *, stopping: bool) -> None:
        """Its process connected its channel."""
        self.channel = ch
        raw = getattr(ch, "raw_pending", None)   # (the unit tests' stand-in channels: none)
        self.raw = raw if isinstance(raw, dict) else {}
        if self.retired or stopping:
            self.state = SlotState.RETIRING if self.retired else SlotState.DRAINING
        else:
            self.state = SlotState.READY

    def stops_taking(self) -> bool:
        """It said ``draining`` (or ``fatal``): no new connections. True if it was ready."""
        if self.state == SlotState.READY:
            self.state = SlotState.DRAINING
            return True
        return False

    def channel_ended(self) -> None:
        """Its channel is gone (the process may live on a little)."""
        self.channel = None
        if self.state in (SlotState.READY, SlotState.DRAINING, SlotState.RETIRING):
            self.state = SlotState.GONE

    def backing_off(self) -> None:
        """The process exited; the supervisor restarts it after a delay."""
        self.state = SlotState.BACKOFF

    def supervisor_done(self) -> None:
        self.state = SlotState.STOPPED

    def retire(self) -> None:
        """Replaced (reload) or handed over (upgrade): never restarted."""
        self.retired = True
        if self.state in (SlotState.READY, SlotState.DRAINING, SlotState.STARTING,
                          SlotState.BACKOFF):
            self.state = SlotState.RETIRING if self.channel is not None else SlotState.STOPPED

    # -- the WorkerView and the counts --------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def pool(self) -> str:
        return self.pool_state.cfg.name

    @property
    def connections(self) -> int:
        return self.active + len(self.pending) + len(self.raw) + self.reserved

    @property
    def max_conns(self) -> int | None:
        return self.pool_state.cfg.max_conns

    @property
    def python(self) -> bool:
        return self.pool_state.cfg.app is not None

    def has_room(self) -> bool:
        if self.state != SlotState.READY or self.channel is None:
            return False
        return self.connections < self.limit

    def set_fd_full(self, full: bool, capacity: int | None = None) -> None:
        """Out of descriptors: no handoffs. Not any more, with descriptors for
        ``capacity`` connections in all: that many at most (it says so again if that was
        too many)."""
        self.fd_full = full
        cap = self.pool_state.cfg.max_conns
        self.limit = 0 if full else (cap if cap is not None else sys.maxsize)
        if capacity is not None and not full:
            self.limit = min(self.limit, max(1, capacity))

    def control(self, msg: Command) -> bool:
        """Send ``msg`` to the worker; False if it has no channel (or it broke)."""
        if self.channel is None:
            return False
        try:
            self.channel.send_control(encode(msg))
        except SockshareError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<worker {self.id} pool={self.pool} pid={self.pid} {self.state}>"
