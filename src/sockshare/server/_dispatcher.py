"""The dispatcher: accepts connections and hands each one to a worker process.

One asyncio process owns every listening socket. Its life::

    bind listeners (or take them: LISTEN_FDS) ─ channel address ─ start workers ─ READY=1
        │
        ▼  (listener readable: up to 64 accepts per wake-up)
    accept ─▶ [sniff] ─▶ route to a pool ─▶ policy picks a worker ─▶ batch
        │                                  │ none has room
        │                                  ▼
        │                        pool queue (bounded) ──full──▶ refused (RST, logged, counted)
        ▼  (once per loop turn, per worker: one send_nowait, up to 64 fds per sendmsg)
    HANDOFF [ACK] ──▶ worker ── ACCEPT: the dispatcher closes its copy, leaves the data path
                            └── REJECT / channel breaks: ticket comes back ─▶ re-dispatch
                                (another worker first; after ``max_retries``: refused)

Counting. A worker's load is ``open + in flight``: a handoff counts from the moment the
policy picks the worker (``reserved``), through ``pending`` (sent, unanswered), to
``active`` (accepted), until the worker reports it ``closed`` in a CONTROL frame
(``{"ev": "closed", "n": k}``). Pending tickets are settled *before* a control message is
applied, and ACCEPT always precedes the close report on the stream, so the count is exact,
not an estimate. ``max_conns`` bounds that number per worker.

Queue and refusal. When no worker of the pool has room (or none is up yet), a new
connection waits in the pool's FIFO queue (``queue`` entries, ``queue_timeout`` seconds).
Past the queue, or after the timeout, it is *refused*: closed at once with SO_LINGER 0
(the client sees a reset, never a half answer), one log line (rate-limited to 10/s with a
summary of the rest) and ``refused{reason}`` counted. Re-dispatched connections go to the
head of the queue and are never refused for a full queue (they were admitted already).

Descriptors. Accepting stops short of RLIMIT_NOFILE: when an accepted descriptor reaches
``limit - fd_reserve`` (descriptors are allocated lowest first, so every one below it is
taken), every listener is held until the lowest free descriptor is back under the mark;
connections wait in the kernel's accept queue meanwhile, and the reserve is there for
starting workers and answering the control socket. A worker says in its hello how many
connections its descriptors allow (``capacity``: a cap like ``max_conns``), refuses a
handoff with REJECT_NO_FDS when it is out of them anyway (no attempt counted; it gets
nothing more until ``{"ev": "fds", "full": false}``). Sniffing listeners are also held
while ``sniff_max`` connections are being sniffed.

Supervision. Each worker *process* has a :class:`WorkerSlot` and a supervisor task: it
starts the process (the Python runtime for an ``app``, or a ``worker_cmd`` in any
language, given ``SOCKSHARE_CHANNEL``/``SOCKSHARE_WORKER_ID``), waits for it to exit and
restarts it after an exponential backoff. Slots of the same worker id share their
counters (:class:`WorkerStats`), so a reload does not reset them. When a worker dies, its
channel breaks: every handoff it had not accepted comes back and is re-dispatched; the
connections it had accepted die with it (``lost``).

Migration: a relay with chained acknowledgements. A worker migrating a connection
sends it to the dispatcher as a HANDOFF on its own channel, meta ``{"resume": state}``.
The dispatcher forwards it to another worker of the pool that can resume (fewest
connections; the source and the workers already tried excluded) and answers the source
only when the target has answered: ACCEPT after the target's ACCEPT, REJECT when no
worker could take it (the source then keeps serving it). So every descriptor copy has
one owner at a time: the source closes its copy on our ACCEPT, we close ours on the
target's ACCEPT (the channel does that), and a copy whose owner dies is closed by the
kernel. If the source dies mid-way, the forward goes on: the target serves, or our copy
is closed. Migrations are asked for by the rebalancer (load spread past a threshold,
or a worker over ``max_conns``), by ``sockshare migrate``, by a reload and by an upgrade.
A handler's own migration skips the relay (one hop instead of two): the dispatcher keeps
every ready worker's list of peers (``{"cmd": "peers"}``) and learns of the move from
the workers' reports (``moved_in``/``moved_out``; ``moving`` for one still unanswered,
which ``--timeout`` watches); see the worker module.

Reload (SIGHUP, ``sockshare reload``): a new slot per worker id starts a fresh process
(the app is imported again); once every one of them is ready they become the pool's
workers, and the old ones get ``{"cmd": "drain", "migrate": true}``: they reject new
handoffs (re-dispatched to the new ones), migrate what can move, finish the rest within
``grace`` and exit. If a new worker cannot start (an import error), the reload is
abandoned and the old workers go on. The listeners never close: nothing is refused.

Upgrade (SIGUSR2, ``sockshare upgrade``): the dispatcher itself is replaced. It starts
``python -m sockshare.backends._inherit FD... -- <its own command line>`` with its
listening sockets (and the metrics socket) passed as ``LISTEN_FDS``/``LISTEN_FDNAMES``
-- the systemd protocol, so socket activation and upgrades share one code path, the
sockets are in place before the new process runs its first line, and no listener is
ever closed or re-bound. The new dispatcher starts its workers and, once they are
ready, asks the old one to hand over (``{"cmd": "takeover"}`` on the old control
socket). Both then serve side by side for a probation (``upgrade_probation`` seconds,
and until the new one answers a status with ready workers); only then does the old one
tell systemd ``MAINPID=<new pid>``, stop accepting (the kernel's accept queue is shared,
so nothing is lost), connect a channel to the new dispatcher, forward its queue over
it, and drain its workers with migration: their connections travel worker → old
dispatcher → new dispatcher → new worker. It exits when its last worker has. If the new
dispatcher dies before the hand-over (before or right after its takeover request), the
old one simply goes on serving: it never stopped.

systemd: listeners may come from socket activation (``LISTEN_FDS``, matched to the
configured listeners by ``LISTEN_FDNAMES`` or address), they are put in the fd store
(``FDSTORE=1``, ``FDNAME=<listener>``) so they survive a crash of the dispatcher, and the
service manager hears ``READY=1``, ``RELOADING=1``, ``STOPPING=1`` and, on upgrade,
``MAINPID=``.

The dispatcher never reads or writes client data except what a sniffer consumed, which
travels with the handoff as pre-read bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sockshare._aio import AsyncChannel, AsyncChannelListener
from sockshare._channel import Handoff, Ticket, _remove_stale_socket
from sockshare._errors import BackendUnavailable, ChannelError, SockshareError
from sockshare.backends import _inherit
from sockshare.backends._scm import peer_credentials
from sockshare.server._config import ListenerConfig, PoolConfig, ServerConfig, parse_bind
from sockshare.server._control import ControlServer, default_path, request, runtime_dir
from sockshare.server._metrics import Histogram, MetricsServer
from sockshare.server._policy import ConnInfo, LeastConnections, Policy, make_policy
from sockshare.server._worker import PEER_SUFFIX, REJECT_NO_FDS

__all__ = ["Dispatcher", "WorkerSlot", "WorkerStats"]

log = logging.getLogger("sockshare.server")

ACCEPT_BATCH = 64
#: seconds between two looks at the free descriptors while accepting is held for them
FD_PROBE_INTERVAL = 0.02
_TCP_INFO = int(getattr(socket, "TCP_INFO", 0))
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_U32 = struct.Struct("=I")
REFUSAL_LOG_PER_SECOND = 10
_LINGER_RESET = struct.pack("ii", 1, 0)
#: LISTEN_FDNAMES name of the metrics socket passed to a new dispatcher on upgrade.
METRICS_FDNAME = "sockshare.metrics"
#: Environment of a dispatcher started by ``upgrade``: the predecessor's pid and control.
ENV_UPGRADE_FROM = "SOCKSHARE_UPGRADE_FROM"
ENV_UPGRADE_CONTROL = "SOCKSHARE_UPGRADE_CONTROL"
#: Migrations asked of one worker per rebalancing round, at most.
REBALANCE_BATCH = 64
#: Migration latencies kept for the percentiles in ``status``.
LATENCY_SAMPLES = 2048
#: seconds to wait for a worker to be reaped before saying it lives (the worker waits 5)
ORPHAN_WAIT = 3.0
#: seconds a worker's exit is remembered for those questions
ORPHAN_MEMORY = 60.0


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "unknown status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %r", task.get_coro().__qualname__,  # type: ignore[union-attr]
                  task.exception(), exc_info=task.exception())


def _close_reset(sock: socket.socket) -> None:
    """Close so that the client sees a reset at once (no FIN, no TIME_WAIT here)."""
    with contextlib.suppress(OSError):
        if sock.family != getattr(socket, "AF_UNIX", -1):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _sd_notify(state: str, fds: list[int] | None = None) -> None:
    """sd_notify that never disturbs the dispatcher (no NOTIFY_SOCKET: nothing)."""
    try:
        _inherit.notify(state, fds or ())
    except (OSError, BackendUnavailable) as exc:
        log.warning("sd_notify %r failed: %s", state.split("\n", maxsplit=1)[0], exc)


def _remove_dead_sockets(rundir: str) -> None:
    """Channel and control sockets left by dispatchers that were killed (SIGKILL, a crash):
    ``<pid>.chan``/``<pid>.ctl`` whose pid is gone and on which nobody listens."""
    with contextlib.suppress(OSError):
        for name in os.listdir(rundir):
            stem, ext = os.path.splitext(name)
            if ext not in (".chan", ".ctl", PEER_SUFFIX) or not stem.isdigit():
                continue
            try:
                os.kill(int(stem), 0)
                continue   # alive (or another user's): not ours to touch
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(OSError, SockshareError):
                _remove_stale_socket(os.path.join(rundir, name))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


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
        self.state = "starting"
        self.active = 0
        self.reserved = 0
        self.pending: dict[int, tuple[Ticket, Waiting]] = {}
        self.started = 0.0
        self.rate = 0.0
        self.marks: deque[tuple[float, int]] = deque(maxlen=6)
        #: said {"ev": "hello", "resume": true}: a migration target
        self.can_resume = False
        self.hello = False
        #: where it listens for peer workers (direct migration), and what we told it last
        self.peer_path = ""
        self.peers_sent: list[list[Any]] | None = None
        self.fatal = False
        self.exits = 0
        #: replaced by a reload / handed over by an upgrade: never restarted
        self.retired = False
        self.rebalance_after = 0.0
        #: killed for leaving a handoff unanswered past --timeout (until restarted)
        self.hung = False
        #: connections it may have (max_conns; 0 while it says it is out of descriptors)
        self.limit = pool.cfg.max_conns if pool.cfg.max_conns is not None else sys.maxsize
        self.fd_full = False
        #: (process, connections) whose channel ended while the process lived on: lost
        #: only if it does not exit cleanly (it finishes them first)
        self.unreported: tuple[asyncio.subprocess.Process, int] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def pool(self) -> str:
        return self.pool_state.cfg.name

    @property
    def connections(self) -> int:
        return self.active + len(self.pending) + self.reserved

    @property
    def max_conns(self) -> int | None:
        return self.pool_state.cfg.max_conns

    @property
    def python(self) -> bool:
        return self.pool_state.cfg.app is not None

    def has_room(self) -> bool:
        if self.state != "ready" or self.channel is None:
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

    def control(self, obj: dict[str, Any]) -> bool:
        if self.channel is None:
            return False
        try:
            self.channel.send_control(obj)
        except SockshareError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<worker {self.id} pool={self.pool} pid={self.pid} {self.state}>"


class ListenerState:
    def __init__(self, cfg: ListenerConfig, sock: socket.socket, *, owned: bool = True) -> None:
        self.cfg = cfg
        self.sock = sock
        self.accepted = 0
        #: why it does not accept now: "emfile" (accept failed), "fds" (the fd reserve
        #: is reached), "sniff" (sniff_max connections are being sniffed)
        self.holds: set[str] = set()
        #: the socket file (UNIX) is ours to remove on stop (not systemd's, not handed over)
        self.owned = owned
        # socket.accept() builds enums for family/type/proto on every call (1 us): the
        # raw numbers once, and the C-level accept
        self.kind = (int(sock.family), int(sock.type) & 0xF, int(sock.proto))
        self.tcp_info = (sys.platform.startswith("linux") and _TCP_INFO > 0
                         and self.kind[0] in (int(socket.AF_INET), int(socket.AF_INET6)))
        #: set by the dispatcher once the sniffer is known (see Dispatcher._static_route)
        self.static_route: tuple[str, str, str, str] | None = None
        #: connections go through the sniffer (set with static_route)
        self.sniffs = False
        if cfg.bind.is_unix:
            self.address = f"unix:{cfg.bind.address}"
        else:
            host, port = sock.getsockname()[:2]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listener(cfg: ListenerConfig) -> socket.socket:
    """Create, bind and listen; UNIX paths: a stale socket file is replaced, a live one
    (another process accepts on it) is not."""
    b = cfg.bind
    sock = socket.socket(b.family, socket.SOCK_STREAM)
    try:
        if b.is_unix:
            _remove_stale_socket(b.address)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if b.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(b.address)
        sock.listen(cfg.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _same_address(sock: socket.socket, cfg: ListenerConfig) -> bool:
    try:
        name = sock.getsockname()
    except OSError:
        return False
    b = cfg.bind
    if sock.family != b.family:
        return False
    if b.is_unix:
        return bool(name == b.address)
    host, port = b.address[0], b.address[1]
    return port != 0 and name[1] == port and (name[0] == host or host in ("", "0.0.0.0", "::"))


class Dispatcher:
    """The server process. ``await Dispatcher(cfg).run()`` returns the exit status."""

    def __init__(self, cfg: ServerConfig, *, argv: list[str] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        #: the command line an upgrade executes again (new code, same arguments)
        self.argv = argv if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        self.pools: dict[str, PoolState] = {name: PoolState(p) for name, p in cfg.pools.items()}
        self.slots: list[WorkerSlot] = []
        wid = itertools.count(1)
        for pool in self.pools.values():
            for _ in range(pool.cfg.workers):
                slot = WorkerSlot(next(wid), pool)
                pool.workers.append(slot)
                self.slots.append(slot)
        self.listeners: list[ListenerState] = []
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "handoffs", "rejects", "returned", "redispatches", "sniff_failures",
             "lost", "migrations", "migrations_refused", "migrations_closed",
             "migration_requests", "rebalances", "reloads", "reload_failures", "upgrades",
             "upgrade_failures", "hung_kills", "migrations_direct", "fd_pauses",
             "fd_rejects"), 0)
        #: direct migrations still unanswered a few ms after they left: (source pid,
        #: handoff id) -> (target, since); for --timeout and the status
        self._moving: dict[tuple[int, int], tuple[WorkerSlot, float]] = {}
        #: worker pids that exited (reaped), and when: a target whose ACCEPT could not
        #: reach a dead source may serve the connection
        self._exited: dict[int, tuple[float, WorkerSlot]] = {}
        self.refused: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._batches: dict[WorkerSlot, list[Waiting]] = {}
        self._flush_scheduled = False
        self._accepting = False  # inside an accept burst: it flushes at its end
        self._failed = False  # a task died of a bug (see _task_failed)
        self._stopping = False
        self._hurry = False
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sniffing: set[asyncio.Task[None]] = set()
        #: RLIMIT_NOFILE, and the descriptor number past which accepting pauses
        self._fd_limit, reserve = self._fd_limits()
        self._fd_high = self._fd_limit - reserve if self._fd_limit else 1 << 30
        self._fd_logged = -1e9
        self._supervisors: set[asyncio.Task[None]] = set()
        self._chan: AsyncChannelListener | None = None
        self._chan_path = ""
        self._control: ControlServer | None = None
        self._control_final = ""
        self._metrics: MetricsServer | None = None
        self._metrics_sock: socket.socket | None = None
        self._sniff: Callable[..., Awaitable[Any]] | None = None
        self._sniff_rules: dict[str, Any] = {}
        self._log_budget = REFUSAL_LOG_PER_SECOND
        self._log_window = 0.0
        self._log_suppressed = 0
        self._started_wall = time.time()
        self._started = time.monotonic()
        self._pid = os.getpid()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._latency_histogram = Histogram()
        #: where migrated connections go: fewest connections, ties rotate (whatever the
        #: pool's policy: a migration moves a connection *away* from its worker)
        self._migration_policy = LeastConnections()
        self._req_ids = itertools.count(1)
        self._acks: dict[int, asyncio.Future[int]] = {}
        # reload: requests are numbered; one reload covers every request made before it
        self._reload_requested = 0
        self._reload_done = 0
        self._reload_task: asyncio.Task[None] | None = None
        #: (request number, future of the outcome: None when it served, else the error)
        self._reload_waiters: list[tuple[int, asyncio.Future[str | None]]] = []
        self._reload_ok = True
        self.generation = 1
        # upgrade, old side
        self._successor: asyncio.subprocess.Process | None = None
        self._successor_ready: asyncio.Future[bool] | None = None
        #: the successor asked to take over and serves beside us until it has shown
        #: that it serves (see _prove_successor)
        self._probation: asyncio.Task[None] | None = None
        self._handed_over = False
        self._upstream: AsyncChannel | None = None
        self._upstream_pending: dict[int, tuple[Ticket, Waiting]] = {}
        # upgrade, new side
        self._predecessor = 0
        self._predecessor_control = ""
        self._ready = False

    # -- life ------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        except BaseException:
            # whatever went wrong, leave no socket files and no orphaned workers behind
            for slot in self.slots:
                if slot.proc is not None and slot.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._teardown())
            raise

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self._setup()
        except (OSError, SockshareError) as exc:
            log.error("cannot start: %s", exc)
            await self._teardown()
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, self._on_sigusr2)
        for slot in self.slots:
            self._start_supervisor(slot)
        self._spawn(self._accept_workers())
        self._spawn(self._housekeeping())
        for ls in self.listeners:
            loop.add_reader(ls.sock.fileno(), self._on_acceptable, ls)
        log.info("dispatcher pid %d: %s; %d worker(s) in %d pool(s); control %s", self._pid,
                 ", ".join(ls.address for ls in self.listeners), len(self.slots), len(self.pools),
                 self._control.path if self._control else "-")
        self._spawn(self._announce_ready(), critical=False)
        await self._stop_event.wait()
        await self._shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
        return 0 if (self._ready or not self._predecessor) and not self._failed else 1

    def stop(self, why: str = "stop requested") -> None:
        """Begin a graceful stop (a second call: stop now, workers are killed)."""
        assert self._stop_event is not None
        if self._stop_event.is_set():
            if not self._hurry:
                log.warning("%s again: killing workers now", why)
                self._hurry = True
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            slot.proc.kill()
            return
        log.info("%s: stopping (grace %.1f s)", why, self.cfg.grace)
        if not self._handed_over and (self._ready or not self._predecessor):
            _sd_notify("STOPPING=1")
        self._stopping = True
        self._stop_event.set()

    def _on_sighup(self) -> None:
        self._spawn(self.reload("SIGHUP"), critical=False)

    def _on_sigusr2(self) -> None:
        self._spawn(self.upgrade("SIGUSR2"), critical=False)

    async def _setup(self) -> None:
        self._predecessor = int(os.environ.pop(ENV_UPGRADE_FROM, "0") or 0)
        self._predecessor_control = os.environ.pop(ENV_UPGRADE_CONTROL, "")
        rundir = runtime_dir()
        _remove_dead_sockets(rundir)
        self._chan_path = os.path.join(rundir, f"{self._pid}.chan")
        self._chan = AsyncChannelListener.listen(self._chan_path, name="dispatcher")
        inherited = self._inherited()
        for lc in self.cfg.listeners:
            sock = self._take_inherited(inherited, lc)
            owned = True
            if sock is not None:
                # systemd's socket files stay systemd's; a predecessor's become ours
                # when it hands over (_handed_over_to_us)
                owned = False
                log.info("listener %s: inherited descriptor %d", lc.name, sock.fileno())
            else:
                try:
                    sock = bind_listener(lc)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on {lc.bind.text}: "
                                             f"{exc.strerror or exc}") from exc
                except SockshareError as exc:
                    raise OSError(f"cannot listen on {lc.bind.text}: {exc}") from exc
            self.listeners.append(ListenerState(lc, sock, owned=owned))
        metrics_inherited = inherited.pop(METRICS_FDNAME, [])
        for name, socks in inherited.items():
            for s in socks:
                log.warning("inherited descriptor %d (%s) matches no configured listener: closed",
                            s.fileno(), name)
                s.close()
        if any(lc.sniffs for lc in self.cfg.listeners):
            self._load_sniffer()
        for ls in self.listeners:
            ls.static_route = self._static_route(ls)
            ls.sniffs = ls.cfg.sniffs and self._sniff is not None
        control = self.cfg.control or default_path(self._pid)
        if self._predecessor and self.cfg.control:
            # the predecessor still serves at that path: ours moves there on takeover
            self._control_final = control
            control = f"{control}.{self._pid}"
        self._control = ControlServer(control, self._on_control)
        await self._control.start()
        if self.cfg.metrics:
            b = parse_bind(self.cfg.metrics)
            if b.is_unix:
                raise OSError("--metrics takes HOST:PORT")
            msock = metrics_inherited.pop(0) if metrics_inherited else None
            for s in metrics_inherited:
                s.close()
            self._metrics = MetricsServer(b.address[0], b.address[1], self.status, sock=msock)
            await self._metrics.start()
            self._metrics_sock = self._metrics.socket
            log.info("metrics on http://%s:%d/metrics", self._metrics.host, self._metrics.port)
        else:
            for s in metrics_inherited:
                s.close()
        for ls in self.listeners:   # listeners survive a crash of this process
            with contextlib.suppress(ValueError, OSError, BackendUnavailable):
                _inherit.store_fds([ls.sock], ls.cfg.name)

    def _inherited(self) -> dict[str, list[socket.socket]]:
        """LISTEN_FDS sockets (systemd, or a predecessor dispatcher) by name, validated by
        :func:`sockshare.backends._inherit.listen_fds`; duplicates of one socket (socket
        unit plus fd store) are closed."""
        out: dict[str, list[socket.socket]] = {}
        seen: set[tuple[int, int]] = set()
        for name, sock in _inherit.listen_fds():
            st = os.fstat(sock.fileno())
            if (st.st_dev, st.st_ino) in seen:
                sock.close()
                continue
            seen.add((st.st_dev, st.st_ino))
            out.setdefault(name, []).append(sock)
        return out

    def _take_inherited(self, inherited: dict[str, list[socket.socket]],
                        lc: ListenerConfig) -> socket.socket | None:
        candidates = inherited.get(lc.name) or []
        pick = next((s for s in candidates if s.family == lc.bind.family), None)
        if pick is None:
            for socks in inherited.values():
                pick = next((s for s in socks if _same_address(s, lc)), None)
                if pick is not None:
                    break
        if pick is None:
            return None
        for socks in inherited.values():
            if pick in socks:
                socks.remove(pick)
        if pick.type != socket.SOCK_STREAM:
            pick.close()
            raise OSError(f"listener {lc.name}: the inherited socket is not a stream socket")
        if not pick.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            pick.listen(lc.backlog)
        pick.setblocking(False)
        return pick

    def _load_sniffer(self) -> None:
        from sockshare.server._sniff import SniffRules, sniff

        self._sniff = sniff
        for lc in self.cfg.listeners:
            if lc.sniffs:
                # routing stays here (cfg.route: globs, listener, proxy presence); the
                # sniffer only reads, so no tables and no default pool
                self._sniff_rules[lc.name] = SniffRules(
                    proxy=lc.proxy,  # type: ignore[arg-type]  # validated by ServerConfig
                    http=lc.sniff, tls=lc.sniff)

    def _spawn(self, coro: Any, *, critical: bool = True) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the dispatcher. A *critical* one that dies of a bug
        stops the server; another (a reload, an upgrade, a rebalance) is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._task_failed if critical else _log_task_failure)
        return task

    def _start_supervisor(self, slot: WorkerSlot) -> None:
        task = asyncio.get_running_loop().create_task(self._supervise(slot))
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        task.add_done_callback(self._task_failed)

    def _task_failed(self, task: asyncio.Task[Any]) -> None:
        """A dispatcher task died of a bug: say so and stop (exit status 1) rather than
        run on without, say, a worker supervisor -- connections would wait forever."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.critical("internal error in %s: %r; stopping", task.get_coro().__qualname__,  # type: ignore[union-attr]
                     exc, exc_info=exc)
        self._failed = True
        if self._stop_event is not None:
            self.stop("internal error")

    async def _wait_ready(self, slots: list[WorkerSlot], timeout: float) -> list[WorkerSlot]:
        """Wait until each slot is ready (a Python worker: said hello too); the failed ones
        (fatal, exited) are returned; [] means all ready."""
        deadline = time.monotonic() + timeout
        while True:
            failed = [s for s in slots if s.fatal or s.exits > 0]
            if failed:
                return failed
            if all(s.state == "ready" and (s.hello or not s.python) for s in slots):
                return []
            if time.monotonic() > deadline or self._stopping:
                return [s for s in slots if s.state != "ready"] or slots
            await asyncio.sleep(0.02)

    async def _announce_ready(self) -> None:
        """READY=1 once the first workers are up; a new dispatcher takes over first."""
        initial = list(self.slots)
        failed = await self._wait_ready(initial, self.cfg.connect_timeout)
        if self._stopping:
            return
        if self._predecessor:
            if failed:
                log.error("upgrade: %d worker(s) of the new dispatcher did not start; giving up "
                          "(pid %d keeps serving)", len(failed), self._predecessor)
                self.stop("upgrade failed")
                return
            if not await self._take_over():
                self.stop("upgrade failed")
                return
        self._ready = True
        _sd_notify(f"READY=1\nSTATUS={self._status_line()}")

    def _status_line(self) -> str:
        up = sum(s.state == "ready" for s in self.slots)
        return (f"{up} worker(s) ready, generation {self.generation}, "
                f"{self.counters['migrations']} migration(s)")

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for ls in self.listeners:
            self._close_listener(ls)
        for t in list(self._sniffing):
            t.cancel()
        inflight = sum(len(s.pending) + s.reserved for s in self.slots)
        log.info("listeners closed; %d handoff(s) in flight, %d queued", inflight,
                 sum(len(p.queue) for p in self.pools.values()))
        deadline = loop.time() + 2.0
        while loop.time() < deadline and (any(s.pending or s.reserved for s in self.slots)
                                          or self._upstream_pending):
            await asyncio.sleep(0.01)
        for pool in self.pools.values():
            while pool.queue:
                self._refuse(pool.queue.popleft(), "shutdown", "the server is stopping")
        for slot in self.slots:
            slot.retired = True
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGKILL if self._hurry else signal.SIGTERM)
        if self._supervisors:
            _done, pending = await asyncio.wait(set(self._supervisors), timeout=self.cfg.grace + 2.0)
            if pending:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        log.warning("worker %d (pid %d) did not stop in time: killed", slot.id,
                                    slot.proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            slot.proc.kill()
                await asyncio.wait(pending, timeout=5.0)
        await self._teardown()
        log.info("stopped")

    async def _teardown(self) -> None:
        for task in list(self._tasks) + list(self._supervisors):
            task.cancel()
        for task in list(self._tasks) + list(self._supervisors):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for ls in self.listeners:
            self._close_listener(ls)
        for slot in self.slots:
            if slot.channel is not None:
                ch, slot.channel = slot.channel, None
                with contextlib.suppress(Exception):
                    await ch.aclose()
            for t, w in slot.pending.values():
                if t.socket is not None:
                    t.socket.close()
                self._drop(w)
            slot.pending.clear()
        for items in self._batches.values():
            for w in items:
                self._drop(w)
        self._batches.clear()
        if self._upstream is not None:
            with contextlib.suppress(Exception):
                await self._upstream.aclose()
            self._upstream = None
        for t, w in self._upstream_pending.values():
            if t.socket is not None:
                t.socket.close()
            self._drop(w)
        self._upstream_pending.clear()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if self._control is not None:
            await self._control.close()
        if self._metrics is not None:
            await self._metrics.close()
        if self._successor is not None and self._successor.returncode is None and not self._handed_over:
            with contextlib.suppress(ProcessLookupError):
                self._successor.kill()

    def _drop(self, w: Waiting) -> None:
        """Close our copy of a held connection (a migration: its source decides)."""
        if w.origin is not None and not w.origin.answered:
            with contextlib.suppress(SockshareError):
                w.origin.reject("the dispatcher is stopping")
        w.sock.close()

    def _close_listener(self, ls: ListenerState) -> None:
        if ls.sock.fileno() < 0:
            return
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(ls.sock.fileno())
        ls.sock.close()
        if ls.cfg.bind.is_unix and ls.owned and not self._handed_over:
            with contextlib.suppress(OSError):
                os.unlink(ls.cfg.bind.address)

    # -- accepting -------------------------------------------------------------------

    def _on_acceptable(self, ls: ListenerState) -> None:
        self._accepting = True
        try:
            self._accept_burst(ls)
        finally:
            self._accepting = False
        if self._batches:
            # hand this burst over now, not one turn of the loop later (a turn costs
            # more than the handoff itself at a few connections a burst)
            self._flush()

    def _accept_burst(self, ls: ListenerState) -> None:
        accept = ls.sock._accept  # type: ignore[attr-defined]  # the C accept, see ListenerState
        family, type_, proto = ls.kind
        budget = ACCEPT_BATCH
        if ls.sniffs:
            room = self.cfg.sniff_max - len(self._sniffing)
            if room <= 0:
                self._hold(ls, "sniff")
                return
            budget = min(budget, room)
        if ls.tcp_info:
            # Linux tells a TCP listener's accept queue length (TCP_INFO, tcpi_unacked):
            # accept that many instead of until EAGAIN -- the BlockingIOError that ends
            # a burst costs 4.5 us, the question 0.5 us
            try:
                ready = _U32.unpack_from(ls.sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, 28), 24)[0]
            except OSError:
                ready = ACCEPT_BATCH
            budget = min(ready, budget) or 1   # 0: a race; one try settles it
        for _ in range(budget):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
                log.error("accept on %s failed: %s; pausing it for 0.5 s", ls.address, exc)
                self._pause(ls, 0.5)
                break
            try:
                sock = socket.socket(family, type_, proto, fd)
            except OSError:  # (the client already gone, say) never leave the fd behind
                os.close(fd)
                continue
            ls.accepted += 1
            self.counters["accepted"] += 1
            self._admit(ls, sock, addr)
            if fd >= self._fd_high:   # (descriptors are allocated lowest first)
                self._fds_low(fd)
                break

    def _pause(self, ls: ListenerState, delay: float) -> None:
        self._hold(ls, "emfile")
        asyncio.get_running_loop().call_later(delay, self._release, ls, "emfile")

    def _hold(self, ls: ListenerState, why: str) -> None:
        """Stop accepting on ``ls`` for ``why`` (connections wait in the kernel's
        accept queue meanwhile: nothing is refused)."""
        if not ls.holds and ls.sock.fileno() >= 0:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                asyncio.get_running_loop().remove_reader(ls.sock.fileno())
        ls.holds.add(why)

    def _release(self, ls: ListenerState, why: str) -> None:
        if why not in ls.holds:
            return
        ls.holds.discard(why)
        if (not ls.holds and not self._stopping and not self._handed_over
                and ls.sock.fileno() >= 0):
            asyncio.get_running_loop().add_reader(ls.sock.fileno(), self._on_acceptable, ls)
            if why != "emfile":
                self._on_acceptable(ls)   # what waits in the accept queue, now

    # -- the descriptor reserve --------------------------------------------------------

    def _fd_limits(self) -> tuple[int, int]:
        """``(limit, reserve)``: RLIMIT_NOFILE, and how many descriptors are kept free
        for what must never fail for lack of one: starting workers (pipes, their
        channels), the control socket, the metrics endpoint, an upgrade."""
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return 0, 0
        if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0 or soft > 1 << 30:
            soft = 1 << 30
        reserve = self.cfg.fd_reserve
        if reserve is None:
            reserve = 16 + 8 * len(self.slots)
        return soft, max(0, min(reserve, soft // 2))

    def _fds_low(self, fd: int) -> None:
        """An accepted descriptor reached ``limit - reserve``: every descriptor below it
        is taken. Stop accepting until some are free again."""
        self.counters["fd_pauses"] += 1
        now = time.monotonic()
        if now - self._fd_logged >= 10.0:   # (one line per 10 s at most)
            log.warning("descriptor %d reached the reserve (RLIMIT_NOFILE %d, %d kept for "
                        "workers and control): accepting paused until descriptors are free; "
                        "connections wait in the kernel's queue (%d pause(s) so far)", fd,
                        self._fd_limit, self._fd_limit - self._fd_high, self.counters["fd_pauses"])
            self._fd_logged = now
        for ls in self.listeners:
            self._hold(ls, "fds")
        asyncio.get_running_loop().call_later(FD_PROBE_INTERVAL, self._probe_fds)

    def _probe_fds(self) -> None:
        """While held for descriptors: the lowest free one (what the next accept would
        get), every FD_PROBE_INTERVAL; below the mark by an eighth of the reserve, resume."""
        if not any("fds" in ls.holds for ls in self.listeners):
            return
        try:
            fd = os.open(os.devnull, os.O_RDONLY)   # the lowest free descriptor
        except OSError:
            fd = self._fd_limit
        else:
            os.close(fd)
        if fd < self._fd_high - max(1, (self._fd_limit - self._fd_high) // 8) or self._stopping:
            for ls in self.listeners:
                self._release(ls, "fds")
            return
        asyncio.get_running_loop().call_later(FD_PROBE_INTERVAL, self._probe_fds)

    def _static_route(self, ls: ListenerState) -> tuple[str, str, str, str] | None:
        """For a TCP listener with no sniffer and a configuration without routes, where
        every connection goes: ``(pool, why, json_head, json_tail)``, the constant parts
        of its metadata encoded once. None where the route depends on the connection."""
        if ls.cfg.bind.is_unix or (ls.cfg.sniffs and self._sniff is not None) or self.cfg.routes:
            return None
        pool, why = self.cfg.route(ls.cfg, {})
        head = f'"listener":{json.dumps(ls.cfg.name)},'
        tail = f'"route":{json.dumps(why)},"pool":{json.dumps(pool)}'
        return pool, why, head, tail

    def _admit(self, ls: ListenerState, sock: socket.socket, addr: Any) -> None:
        hid = f"{self._pid}.{next(self._ids)}"
        static = ls.static_route
        if static is not None:
            # The common case, in one step: metadata built and encoded here (what
            # _route would produce, in the same key order), no routing rules to try.
            pool, why, head, tail = static
            host, port = addr[0], addr[1]
            client = [host, port]
            meta: dict[str, Any] = {"handoff_id": hid, "listener": ls.cfg.name, "client": client,
                                    "route": why, "pool": pool}
            raw = (f'{{"handoff_id":"{hid}",{head}"client":["{host}",{port}],{tail}}}'.encode()
                   if '"' not in host and "\\" not in host else None)
            self._place(Waiting(sock, ConnInfo(client, ls.cfg.name, pool, hid, meta), meta, b"",
                                time.monotonic(), raw=raw))
            return
        meta = {"handoff_id": hid, "listener": ls.cfg.name}
        if ls.cfg.bind.is_unix:
            meta["client"] = "unix"
            with contextlib.suppress(OSError, SockshareError):
                pid, uid, _gid = peer_credentials(sock)
                meta["peer"] = {"pid": pid, "uid": uid}
        else:
            meta["client"] = [addr[0], addr[1]]
        if ls.cfg.sniffs and self._sniff is not None:
            sock.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._sniff_then_route(ls, sock, meta))
            self._sniffing.add(task)
            task.add_done_callback(self._sniffed)
            return
        self._route(ls, sock, meta, b"")

    def _sniffed(self, task: asyncio.Task[None]) -> None:
        self._sniffing.discard(task)
        if len(self._sniffing) < self.cfg.sniff_max:
            for ls in self.listeners:
                if "sniff" in ls.holds:
                    self._release(ls, "sniff")

    async def _sniff_then_route(self, ls: ListenerState, sock: socket.socket,
                                meta: dict[str, Any]) -> None:
        assert self._sniff is not None
        try:
            result = await self._sniff(sock, self._sniff_rules[ls.cfg.name], self.cfg.sniff_timeout)
        except asyncio.CancelledError:
            _close_reset(sock)
            raise
        except Exception as exc:
            # (one log line: the refusal's, rate-limited with the others)
            self.counters["sniff_failures"] += 1
            self._refuse(Waiting(sock, ConnInfo(meta["client"], ls.cfg.name, "", meta["handoff_id"],
                                                meta), meta, b"", time.monotonic()),
                         "sniff_failed", str(exc), count=True)
            return
        sniffed = dict(getattr(result, "meta", {}) or {})
        for key in ("handoff_id", "listener", "client"):
            sniffed.pop(key, None)
        meta.update(sniffed)
        pool = getattr(result, "pool", None)
        self._route(ls, sock, meta, bytes(getattr(result, "data", b"") or b""), pool)

    def _route(self, ls: ListenerState, sock: socket.socket, meta: dict[str, Any], data: bytes,
               pool: str | None = None) -> None:
        if pool is None or pool not in self.pools:
            pool, meta["route"] = self.cfg.route(ls.cfg, meta)
        else:
            meta["route"] = "sniffer"
        meta["pool"] = pool
        info = ConnInfo(meta["client"], ls.cfg.name, pool, meta["handoff_id"], meta)
        self._place(Waiting(sock, info, meta, data, time.monotonic()))

    # -- placing -----------------------------------------------------------------------

    def _place(self, w: Waiting, *, front: bool = False) -> None:
        """Send ``w`` to a worker with room, or queue it, or refuse it."""
        if w.origin is not None:
            self._place_migration(w)
            return
        pool = self.pools[w.info.pool]
        if not pool.queue and self._assign(pool, w):
            return
        if self._handed_over and self._forward_upstream(w):
            return
        if front:
            pool.queue.appendleft(w)
        elif len(pool.queue) < pool.cfg.queue:
            pool.queue.append(w)
        else:
            self._refuse(w, "queue_full",
                         f"every worker of pool {pool.cfg.name!r} is full and "
                         f"{len(pool.queue)} connection(s) already wait")
            return
        self._drain(pool)

    def _assign(self, pool: PoolState, w: Waiting) -> bool:
        # WorkerSlot.has_room, inlined: once per connection
        candidates = [s for s in pool.workers if s.state == "ready" and s.channel is not None
                      and s.connections < s.limit]
        if w.exclude is not None and len(candidates) > 1:
            candidates = [s for s in candidates if s.id != w.exclude]
        if not candidates:
            return False
        pick = pool.policy(candidates, w.info)
        if pick is None:
            return False
        assert isinstance(pick, WorkerSlot)
        self._reserve(pick, w)
        return True

    def _reserve(self, slot: WorkerSlot, w: Waiting) -> None:
        slot.reserved += 1
        batch = self._batches.get(slot)
        if batch is None:
            self._batches[slot] = [w]
        else:
            batch.append(w)
        if not self._flush_scheduled and not self._accepting:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _drain(self, pool: PoolState) -> None:
        while pool.queue and self._assign(pool, pool.queue[0]):
            pool.queue.popleft()
        if self._handed_over:
            while pool.queue and self._forward_upstream(pool.queue[0]):
                pool.queue.popleft()

    def _flush(self) -> None:
        """Send this loop turn's handoffs: one send_nowait per worker."""
        self._flush_scheduled = False
        batches, self._batches = self._batches, {}
        for slot, items in batches.items():
            slot.reserved -= len(items)
            ch = slot.channel
            if ch is None or slot.state != "ready":
                self._bounce(slot, items, "the worker went away before the handoff was sent")
                continue
            try:
                tickets = ch.send_nowait([(w.sock, w.encoded_meta(), w.data) for w in items], ack=True)
            except ChannelError as exc:
                self._bounce(slot, items, f"the channel is unusable: {exc}")
                continue
            except (SockshareError, ValueError, OSError) as exc:
                for w in items:
                    self._refuse(w, "error", f"cannot hand over: {exc}")
                continue
            now = time.monotonic()
            for t, w in zip(tickets, items, strict=True):
                w.sent = now
                slot.pending[t.id] = (t, w)

    def _bounce(self, slot: WorkerSlot, items: list[Waiting], why: str) -> None:
        for w in items:
            self._redispatch(w, slot, why, counts=False)

    def _redispatch(self, w: Waiting, slot: WorkerSlot, why: str, *, counts: bool = True) -> None:
        if counts:
            w.attempts += 1
        w.exclude = slot.id
        if w.origin is not None:
            w.tried.append(slot)
        if w.attempts > self.cfg.max_retries:
            self._refuse(w, "retries_exhausted",
                         f"handed over {w.attempts} times without being accepted; last: {why}")
            return
        if counts:
            self.counters["redispatches"] += 1
            if w.origin is None:
                w.meta["attempt"] = w.attempts
                w.raw = None
            log.info("re-dispatching %s (%s)", w.info.handoff_id, why)
        self._place(w, front=True)

    def _refuse(self, w: Waiting, reason: str, detail: str, *, count: bool = True) -> None:
        if w.origin is not None:
            self._migration_failed(w, detail)
            return
        if count:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        _close_reset(w.sock)
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            self._flush_refusal_log()
            self._log_window = now
            self._log_budget = REFUSAL_LOG_PER_SECOND
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning("refused %s from %s (%s): %s", w.info.handoff_id, w.info.client, reason, detail)
        else:
            self._log_suppressed += 1

    def _flush_refusal_log(self) -> None:
        if self._log_suppressed:
            log.warning("refused %d more connection(s) in the last second (totals: %s)",
                        self._log_suppressed, self.refused)
            self._log_suppressed = 0

    # -- migration relay -------------------------------------------------------------

    def _migration_in(self, source: WorkerSlot | None, h: Handoff) -> None:
        """A connection handed to us by a worker (or the old dispatcher) to move on."""
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
        if pool not in self.pools:
            pool = self.cfg.default_pool
            meta["pool"] = pool
        info = ConnInfo(meta.get("client"), str(meta.get("listener", "")), pool,
                        str(meta.get("handoff_id", "")), meta)
        if source is not None:
            # in transit: no longer the source's (which will not report it closed) unless
            # it comes back refused; so a source that dies now does not count it lost
            source.active = max(0, source.active - 1)
        self._place_migration(Waiting(h.socket, info, meta, h.data, time.monotonic(), origin=h,
                                      origin_slot=source))

    def _place_migration(self, w: Waiting) -> None:
        pool = self.pools.get(w.info.pool) or self.pools[self.cfg.default_pool]
        candidates = [s for s in pool.workers if s.has_room() and s.can_resume
                      and s is not w.origin_slot and s not in w.tried]
        if candidates:
            pick = self._migration_policy(candidates, w.info)
            assert isinstance(pick, WorkerSlot)
            self._reserve(pick, w)
            self._flush()   # a migration is latency-bound: forward it now
            return
        if self._handed_over and self._forward_upstream(w):
            return
        self._migration_failed(w, f"no other worker of pool {pool.cfg.name!r} can take it")

    def _migration_failed(self, w: Waiting, why: str) -> None:
        """No target: the source gets its connection back (REJECT) and keeps serving it;
        a source that is gone cannot, so our copy is closed (FIN, not RST)."""
        h = w.origin
        assert h is not None
        source_alive = (w.origin_slot is None or w.origin_slot.channel is not None) and not h.answered
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

    def _push_peers(self, pool: PoolState) -> None:
        """Tell every ready worker of ``pool`` that resumes which others take its own
        migrations directly, ``{"cmd": "peers", "peers": [[id, pid, path, connections]]}``
        (when that changed). A worker that is not listed, or lists nobody, relays."""
        if not self.cfg.direct_migration:
            return
        ready = [s for s in pool.workers if s.state == "ready" and s.channel is not None
                 and s.can_resume and s.peer_path and not s.retired and s.pid]
        for s in ready:
            listed = [[o.id, o.pid, o.peer_path, o.connections] for o in ready
                      if o is not s and o.has_room()]
            if listed != s.peers_sent and s.control({"cmd": "peers", "peers": listed}):
                s.peers_sent = listed

    def _direct_event(self, slot: WorkerSlot, ev: str, msg: dict[str, Any]) -> None:
        """Reports of direct migrations: the source's ``moving`` (still unanswered after
        a few ms), ``moved_out`` or ``move_back``; the target's ``moved_in``."""
        key_raw = msg.get("key")
        key = (tuple(key_raw) if isinstance(key_raw, list) and len(key_raw) == 2
               and all(isinstance(x, int) for x in key_raw) else None)
        if ev == "moved_in":
            slot.active += 1
            slot.stats.migrated_in += 1
            self.counters["migrations"] += 1
            self.counters["migrations_direct"] += 1
            latency = msg.get("latency")   # measured by the target as resume started
            if isinstance(latency, float) and 0 <= latency < 60:
                self._record_latency(latency)
            return
        if ev == "moved_out":
            slot.active = max(0, slot.active - 1)
            slot.stats.migrated_out += 1
            self._drain(slot.pool_state)
        if key is None:
            return
        if ev == "moving":
            target = next((s for s in slot.pool_state.workers if s.id == msg.get("to")
                           and s.channel is not None), None)
            if target is not None:
                self._moving[key] = (target, time.monotonic())
        else:
            self._moving.pop(key, None)

    async def _answer_orphan(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        """A target could not deliver its ACCEPT of a direct migration: the source's end
        closed first. Dead (a worker of ours that exited in the last ORPHAN_MEMORY s):
        the target serves it. Alive, or not ours: it must not. A source still running
        gets ORPHAN_WAIT seconds to be reaped (a SIGKILL is seen within ms)."""
        pid = msg.get("pid")
        dead = False
        if isinstance(pid, int) and pid > 0:
            deadline = time.monotonic() + ORPHAN_WAIT
            while True:
                now = time.monotonic()
                exited = self._exited.get(pid)
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
                running = any(s.proc is not None and s.proc.pid == pid and s.proc.returncode is None
                              for s in self.slots)
                if not running or now >= deadline:
                    break
                await asyncio.sleep(0.01)
        log.info("direct migration from pid %s whose ACCEPT was lost: the source is %s; "
                 "worker %d %s it", pid, "gone" if dead else "alive (or not ours)", slot.id,
                 "serves" if dead else "closes")
        slot.control({"cmd": "orphan", "key": msg.get("key"), "dead": dead})

    def _migration_done(self, w: Waiting, target: WorkerSlot | None) -> None:
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
            self._record_latency(now - started)   # CLOCK_MONOTONIC is system-wide
        else:
            self._record_latency(now - w.since)

    def _record_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)
        self._latency_histogram.observe(seconds)

    # -- workers: channels -------------------------------------------------------------

    async def _accept_workers(self) -> None:
        assert self._chan is not None
        while True:
            try:
                ch = await self._chan.accept()
            except ChannelError:
                return
            slot = self._match(ch)
            if slot is None:
                if (self._predecessor and ch.peer.pid == self._predecessor
                        and ch.peer.name == f"dispatcher:{self._predecessor}"):
                    self._handed_over_to_us()
                    self._spawn(self._watch_peer(ch))
                    continue
                log.warning("refused a channel from pid %d (%r): not a worker this dispatcher "
                            "started", ch.peer.pid, ch.peer.name)
                with contextlib.suppress(Exception):
                    await ch.aclose()
                continue
            slot.channel = ch
            if slot.retired or self._stopping:
                slot.state = "retiring" if slot.retired else "draining"
            else:
                slot.state = "ready"
            log.info("worker %d (pid %d, pool %s, generation %d) ready", slot.id, ch.peer.pid,
                     slot.pool, slot.generation)
            # Everything the worker sends is handled in the channel's read callback; one
            # task waits for the end (no task woken per read: 2 fewer per connection).
            ch.track_accepts()
            ch.on_activity = lambda slot=slot, ch=ch: self._settle_safely(slot, ch)
            self._spawn(self._watch_worker(slot, ch))
            if slot.retired:
                self._retire(slot, "reload")
            self._drain(slot.pool_state)

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
        await self._detach(slot, ch)

    def _apply_control(self, slot: WorkerSlot, ch: AsyncChannel, msg: dict[str, Any]) -> None:
        self._settle(slot, ch)   # count ACCEPTs that preceded this message first
        ev = msg.get("ev")
        if ev == "closed":
            n = msg.get("n", 1)
            if isinstance(n, int) and n > 0:
                slot.active = max(0, slot.active - n)
                self._drain(slot.pool_state)
        elif ev == "hello":
            slot.hello = True
            slot.can_resume = bool(msg.get("resume"))
            capacity = msg.get("capacity")   # (connections its descriptors allow)
            slot.set_fd_full(False, capacity if isinstance(capacity, int) else None)
            peer = msg.get("peer")
            slot.peer_path, slot.peers_sent = "", None   # a new process
            if (isinstance(peer, str) and peer.endswith(PEER_SUFFIX)
                    and os.path.dirname(peer) == os.path.dirname(self._chan_path)):
                slot.peer_path = peer
            self._push_peers(slot.pool_state)
        elif ev == "fds":
            full = bool(msg.get("full"))
            capacity = msg.get("capacity")
            slot.set_fd_full(full, capacity if isinstance(capacity, int) else None)
            if not full:
                self._drain(slot.pool_state)
        elif ev in ("moved_in", "moved_out", "moving", "move_back"):
            self._direct_event(slot, ev, msg)
        elif ev == "orphan":
            self._spawn(self._answer_orphan(slot, msg), critical=False)
        elif ev == "migrate_ack":
            fut = self._acks.pop(msg.get("req") or 0, None)
            n = msg.get("n")
            if fut is not None and not fut.done():
                fut.set_result(n if isinstance(n, int) else 0)
        elif ev == "draining":
            if slot.state == "ready":
                slot.state = "draining"
                log.info("worker %d (pid %s) is draining", slot.id, slot.pid)
                self._push_peers(slot.pool_state)
        elif ev == "fatal":
            slot.fatal = True
            if slot.state == "ready":
                slot.state = "draining"
            log.error("worker %d (pid %s): %s", slot.id, slot.pid, msg.get("reason", "fatal error"))
        else:
            log.debug("worker %d: control message %r", slot.id, msg)

    def _settle_safely(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        try:
            self._settle(slot, ch)
            for msg in ch.received_controls():
                self._apply_control(slot, ch, msg)
        except Exception:   # in the channel's read callback: never let it escape
            log.exception("worker %d: settling its channel failed", slot.id)

    def _settle(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        """Apply the answers that arrived: accepts, rejects, returned tickets; and take
        the connections the worker migrates out."""
        accepted = 0
        for t in ch.accepted():
            entry = slot.pending.pop(t.id, None)
            if entry is None:
                continue
            accepted += 1
            if entry[1].origin is not None:
                self._migration_done(entry[1], slot)
        if accepted:
            slot.active += accepted
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
            if t.state == "rejected" and t.reason == REJECT_NO_FDS:
                # not the connection's fault: no attempt counted, one log line per episode
                self.counters["fd_rejects"] += 1
                if not slot.fd_full:
                    slot.set_fd_full(True)   # (the worker logs it, rate-limited)
                if t.socket is not None:
                    w.sock = t.socket
                    self._redispatch(w, slot, REJECT_NO_FDS, counts=False)
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
            self._redispatch(w, slot, why)
        for h in ch.received():
            self._migration_in(slot, h)
        if back:
            self._drain(slot.pool_state)

    async def _detach(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        if slot.channel is not ch:
            return
        # the last reports (a draining worker's final "closed") may sit unread beside its BYE
        while True:
            try:
                msg = await ch.receive_control()   # never blocks on an ended channel
            except ChannelError:
                break
            self._apply_control(slot, ch, msg)
        slot.channel = None
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
        if slot.state in ("ready", "draining", "retiring"):
            slot.state = "gone"
        # its direct migrations out are settled by their targets now (or died with it)
        for key in [k for k in self._moving if k[0] == ch.peer.pid]:
            del self._moving[key]
        self._push_peers(slot.pool_state)
        with contextlib.suppress(Exception):
            await ch.aclose()
        proc = slot.proc
        if proc is not None and proc.returncode is None and not self._stopping:
            # a worker without its channel is useless: give it a moment to exit by itself
            asyncio.get_running_loop().call_later(2.0, self._terminate_if_running, slot, proc,
                                                  "its channel closed")

    def _terminate_if_running(self, slot: WorkerSlot, proc: asyncio.subprocess.Process,
                              why: str) -> None:
        if slot.proc is proc and proc.returncode is None:
            log.warning("worker %d (pid %d): %s; terminating it", slot.id, proc.pid, why)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            asyncio.get_running_loop().call_later(self.cfg.grace + 1.0, self._kill_if_running,
                                                  slot, proc)

    def _kill_if_running(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        if slot.proc is proc and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    # -- workers: processes ------------------------------------------------------------

    def command(self, slot: WorkerSlot) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of worker ``slot`` (documented in docs/server.md)."""
        p = slot.pool_state.cfg
        env = dict(os.environ)
        env.update(SOCKSHARE_CHANNEL=self._chan_path, SOCKSHARE_WORKER_ID=str(slot.id),
                   SOCKSHARE_POOL=p.name, SOCKSHARE_GENERATION=str(slot.generation))
        if p.worker_cmd is not None:
            parts = shlex.split(p.worker_cmd)
            subst = {"{channel}": self._chan_path, "{id}": str(slot.id)}
            has_channel = any("{channel}" in part for part in parts)
            out = []
            for part in parts:
                arg = part
                for k, v in subst.items():
                    arg = arg.replace(k, v)
                out.append(arg)
            if not has_channel:
                out.append(self._chan_path)
            return out, env
        assert p.app is not None
        argv = [sys.executable, "-m", "sockshare.server._worker", "--app", p.app,
                "--channel", self._chan_path, "--id", str(slot.id), "--pool", p.name,
                "--generation", str(slot.generation), "--grace", str(self.cfg.grace),
                "--log-level", self.cfg.log_level]
        if p.resume is not None:
            argv += ["--resume", p.resume]
        return argv, env

    async def _supervise(self, slot: WorkerSlot) -> None:
        assert self._stop_event is not None
        failures = 0
        while not self._stopping and not slot.retired:
            slot.stats.generation += 1
            slot.generation = slot.stats.generation
            argv, env = self.command(slot)
            ran = 0.0
            slot.hello = slot.can_resume = slot.fatal = False
            try:
                # own process group: a terminal's Ctrl-C reaches the dispatcher only,
                # which then stops the workers once, gracefully
                proc = await asyncio.create_subprocess_exec(*argv, env=env, process_group=0,
                                                            stdin=asyncio.subprocess.DEVNULL)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                # (ValueError: e.g. a NUL byte in --worker-cmd)
                log.error("worker %d: cannot start %s: %s", slot.id, shlex.join(argv), exc)
                rc: int | None = None
                pid = 0
                slot.exits += 1
            else:
                slot.proc = proc
                slot.hung = False
                pid = proc.pid
                slot.started = time.monotonic()
                slot.state = "starting"
                log.info("worker %d started: pid %d, pool %s, generation %d", slot.id, pid,
                         slot.pool, slot.generation)
                watchdog = asyncio.get_running_loop().call_later(
                    self.cfg.connect_timeout, self._connect_timeout, slot, proc)
                try:
                    rc = await proc.wait()
                finally:
                    watchdog.cancel()
                self._exited[pid] = (time.monotonic(), slot)
                self._count_unreported(slot, proc, rc)
                if slot.peer_path.endswith(f"{os.sep}{pid}{PEER_SUFFIX}"):
                    # a killed worker could not remove its peer socket
                    with contextlib.suppress(OSError, SockshareError):
                        _remove_stale_socket(slot.peer_path)
                ran = time.monotonic() - slot.started
                slot.exits += 1
                await self._after_exit(slot)
            if self._stopping or slot.retired:
                log.info("worker %d (pid %d, generation %d) exited with %s", slot.id, pid,
                         slot.generation, _describe_exit(rc))
                break
            # a clean exit (a worker told to stop, or done) does not grow the backoff
            failures = 1 if rc == 0 or ran >= self.cfg.stable_after else failures + 1
            delay = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (failures - 1))
            slot.state = "backoff"
            log.warning("worker %d (pid %d) exited with %s after %.1f s; restarting in %.2f s",
                        slot.id, pid, _describe_exit(rc), ran, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
            if self._stopping or slot.retired:
                break
            slot.stats.restarts += 1
        slot.state = "stopped"
        if slot.retired and not self._stopping and slot in self.slots:
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
                    slot.id, proc.pid, _describe_exit(rc), n)

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
        for _ in range(100):
            await asyncio.sleep(0.01)
            if slot.channel is not ch:
                return
        with contextlib.suppress(Exception):
            await ch.aclose()   # returns its pending tickets; _watch_tickets re-dispatches

    # -- retiring, reloading ---------------------------------------------------------

    def _retire(self, slot: WorkerSlot, reason: str) -> None:
        """Stop giving ``slot`` connections; ask it to migrate what it can and exit."""
        slot.retired = True
        if slot.state in ("ready", "draining", "starting", "backoff"):
            slot.state = "retiring" if slot.channel is not None else "stopped"
        self._push_peers(slot.pool_state)
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return
        if slot.channel is None or not (slot.python and slot.control(
                {"cmd": "drain", "migrate": True, "reason": reason})):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()   # a foreign worker drains on SIGTERM (docs/server.md)
        loop = asyncio.get_running_loop()
        loop.call_later(self.cfg.grace + 3.0, self._kill_if_running, slot, proc)

    async def reload(self, why: str = "reload requested", *, wait: bool = False) -> dict[str, Any]:
        """Replace every worker by a fresh process (the app imported again), migrating the
        connections that can move. Concurrent requests are coalesced: one reload covers
        every request made before it started."""
        if self._stopping or self._handed_over:
            return {"ok": False, "error": "the dispatcher is stopping or handed over"}
        upgrading = self._upgrading()
        if upgrading:
            log.warning("%s: reload refused: %s", why, upgrading)
            return {"ok": False, "error": f"reload refused: {upgrading}"}
        self._reload_requested += 1
        seq = self._reload_requested
        log.info("%s: reload #%d", why, seq)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._reload_waiters.append((seq, fut))
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = self._spawn(self._reload_loop(), critical=False)
        if not wait:
            return {"ok": True, "queued": seq}
        try:
            error = await asyncio.wait_for(asyncio.shield(fut), self.cfg.connect_timeout + 30.0)
        except TimeoutError:
            return {"ok": False, "error": "the reload did not complete in time"}
        return {"ok": error is None, "generation": self.generation,
                **({} if error is None else {"error": error})}

    def _upgrading(self) -> str:
        """Why a reload cannot be done now because of an upgrade ("" if it can). The new
        dispatcher starts workers of its own from the code as it is, and retires ours: a
        reload here would be lost (or would start workers that nobody retires)."""
        if self._successor is not None and not self._handed_over:
            return (f"an upgrade is under way (new dispatcher pid {self._successor.pid}, which "
                    "starts its own workers with the current code); retry once it is over")
        if self._predecessor and not self._ready:
            return (f"an upgrade is under way (this dispatcher is taking over from pid "
                    f"{self._predecessor}); retry once it has taken over")
        return ""

    async def _reload_loop(self) -> None:
        while self._reload_done < self._reload_requested and not self._stopping:
            target = self._reload_requested
            error = await self._reload_once()
            self._reload_done = target
            for seq, fut in list(self._reload_waiters):
                if seq <= target:
                    self._reload_waiters.remove((seq, fut))
                    if not fut.done():
                        fut.set_result(error)

    def _abandon(self, fresh: list[tuple[PoolState, WorkerSlot, WorkerSlot]]) -> None:
        """Stop the new workers of a reload that will not serve."""
        for _p, _o, new in fresh:
            new.retired = True
            if new.proc is not None and new.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    new.proc.terminate()
                asyncio.get_running_loop().call_later(self.cfg.grace + 3.0,
                                                      self._kill_if_running, new, new.proc)

    async def _reload_once(self) -> str | None:
        """One reload: None once the new generation serves, else what went wrong."""
        mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        _sd_notify(f"RELOADING=1\nMONOTONIC_USEC={mono}\nSTATUS=reloading")
        fresh: list[tuple[PoolState, WorkerSlot, WorkerSlot]] = []
        for pool in self.pools.values():
            for old in list(pool.workers):
                new = WorkerSlot(old.id, pool, old.stats)
                self.slots.append(new)
                fresh.append((pool, old, new))
                self._start_supervisor(new)
        failed = await self._wait_ready([n for _p, _o, n in fresh], self.cfg.connect_timeout)
        if self._stopping:   # (the shutdown stops every worker, these ones too)
            return "the dispatcher is stopping"
        upgrading = self._upgrading() or ("the dispatcher handed over to a new one"
                                          if self._handed_over else "")
        if upgrading:   # an upgrade started while the new workers were starting
            self.counters["reload_failures"] += 1
            log.error("reload abandoned: %s", upgrading)
            self._abandon(fresh)
            return f"reload abandoned: {upgrading}"
        if failed:
            self.counters["reload_failures"] += 1
            log.error("reload failed: %s; the old workers go on serving",
                      ", ".join(f"worker {s.id} ({'app error' if s.fatal else s.state})" for s in failed))
            self._abandon(fresh)
            _sd_notify(f"READY=1\nSTATUS=reload failed; {self._status_line()}")
            return "the new workers did not start; the old ones go on serving"
        for pool in self.pools.values():
            pool.workers = [new for p, _o, new in fresh if p is pool]
        for _p, old, _n in fresh:
            self._retire(old, "reload")
        self.generation += 1
        self.counters["reloads"] += 1
        log.info("reload: generation %d serving; %d old worker(s) draining", self.generation,
                 len(fresh))
        for pool in self.pools.values():
            self._drain(pool)
        _sd_notify(f"READY=1\nSTATUS={self._status_line()}")
        return None

    # -- migration requests, rebalancing -----------------------------------------------

    async def ask_migrate(self, slot: WorkerSlot, n: int | None, reason: str,
                          timeout: float = 2.0) -> int:
        """Ask ``slot`` to migrate up to ``n`` connections (None: all that can); returns how
        many it flagged (-1: no answer)."""
        req = next(self._req_ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[req] = fut
        self.counters["migration_requests"] += 1
        if not slot.control({"cmd": "migrate", "n": n, "reason": reason, "req": req}):
            self._acks.pop(req, None)
            return -1
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._acks.pop(req, None)
            return -1

    def _rebalance(self, now: float) -> None:
        for pool in self.pools.values():
            if not pool.rebalance:
                continue
            ws = [s for s in pool.workers if s.state == "ready" and s.can_resume and s.channel]
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
            busiest.rebalance_after = now + max(2.0, 2 * self.cfg.rebalance_interval)
            self.counters["rebalances"] += 1
            log.info("rebalance: worker %d has %d connection(s), worker %d %d: asking %d to move",
                     busiest.id, busiest.active, idlest.id, idlest.connections, n)
            self._spawn(self.ask_migrate(busiest, n, "rebalance"), critical=False)

    async def _migrate_command(self, req: dict[str, Any]) -> dict[str, Any]:
        wid, count = req.get("from"), req.get("count")
        if not isinstance(wid, int) or (count is not None and (not isinstance(count, int) or count < 0)):
            return {"ok": False, "error": 'migrate takes {"from": worker id, "count": n or null}'}
        slots = [s for s in self.slots if s.id == wid and s.state == "ready" and not s.retired]
        if not slots:
            return {"ok": False, "error": f"worker {wid} is not a ready worker"}
        slot = slots[0]
        if not slot.can_resume:
            return {"ok": False, "error": f"worker {wid}'s app has no resume handler: it cannot migrate"}
        others = [s for s in slot.pool_state.workers if s is not slot and s.can_resume and s.has_room()]
        if not others:
            return {"ok": False, "error": f"no other worker of pool {slot.pool!r} can take connections"}
        before = slot.stats.migrated_out
        flagged = await self.ask_migrate(slot, count, "request")
        if flagged < 0:
            return {"ok": False, "error": f"worker {wid} did not answer"}
        moved = 0
        if req.get("wait") and flagged:
            deadline = time.monotonic() + float(req.get("timeout") or 10.0)
            while slot.stats.migrated_out - before < flagged and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        moved = slot.stats.migrated_out - before
        return {"ok": True, "worker": wid, "asked": count, "flagged": flagged, "migrated": moved}

    # -- upgrade: the old dispatcher ---------------------------------------------------

    async def upgrade(self, why: str = "upgrade requested", *, wait: bool = False) -> dict[str, Any]:
        """Start a new dispatcher (the same command line: new code) with our listeners;
        hand over to it once it says its workers are ready."""
        if self._stopping or self._handed_over:
            return {"ok": False, "error": "the dispatcher is stopping or already handed over"}
        if self._successor is not None:
            return {"ok": False, "error": f"an upgrade is under way (pid {self._successor.pid})"}
        loop = asyncio.get_running_loop()
        socks = [(ls.cfg.name, ls.sock) for ls in self.listeners if ls.sock.fileno() >= 0]
        if self._metrics_sock is not None and self._metrics_sock.fileno() >= 0:
            socks.append((METRICS_FDNAME, self._metrics_sock))
        env_add, fds = _inherit.pass_listen_fds(socks)
        env = dict(os.environ, **env_add)
        env[ENV_UPGRADE_FROM] = str(self._pid)
        env[ENV_UPGRADE_CONTROL] = self._control.path if self._control else ""
        argv = [sys.executable, "-m", "sockshare.backends._inherit", *map(str, fds), "--", *self.argv]
        log.info("%s: starting a new dispatcher: %s", why, shlex.join(self.argv))
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, pass_fds=fds,
                                                        stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            self.counters["upgrade_failures"] += 1
            log.error("upgrade: cannot start the new dispatcher: %s", exc)
            return {"ok": False, "error": str(exc)}
        self._successor = proc
        self._successor_ready = loop.create_future()
        watcher = self._spawn(self._watch_successor(proc), critical=False)
        if not wait:
            return {"ok": True, "pid": proc.pid, "state": "starting"}
        await asyncio.wait({self._successor_ready, watcher},
                                     timeout=self.cfg.connect_timeout + 30.0,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._handed_over:
            return {"ok": True, "pid": proc.pid, "state": "handed over"}
        return {"ok": False, "pid": proc.pid, "error": "the new dispatcher did not take over"}

    async def _watch_successor(self, proc: asyncio.subprocess.Process) -> None:
        try:
            rc = await asyncio.wait_for(proc.wait(), self.cfg.connect_timeout + 30.0)
        except TimeoutError:
            if self._handed_over:
                return
            log.error("upgrade: the new dispatcher (pid %d) did not take over in time: killed",
                      proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            rc = await proc.wait()
        if self._handed_over:
            return   # it runs on; its exit is none of our business any more
        self.counters["upgrade_failures"] += 1
        probation, self._probation = self._probation, None
        if probation is not None:
            probation.cancel()
        log.error("upgrade failed: the new dispatcher (pid %d) exited with %s before %s; this "
                  "one (pid %d) goes on serving", proc.pid, _describe_exit(rc),
                  "it had shown that it serves" if probation is not None else "taking over",
                  self._pid)
        self._successor = None
        if self._successor_ready is not None and not self._successor_ready.done():
            self._successor_ready.set_result(False)

    async def _takeover(self, req: dict[str, Any]) -> dict[str, Any]:
        """The new dispatcher is ready. It serves beside this one (both accept on the
        same listening sockets) until it has shown that it serves; only then does this
        one hand over (:meth:`_hand_over`). Dying before that, it leaves this one serving,
        as if the upgrade had never started."""
        proc = self._successor
        pid, chan, control = req.get("pid"), req.get("channel"), req.get("control")
        if proc is None or pid != proc.pid or not isinstance(chan, str):
            return {"ok": False, "error": "takeover refused: not the dispatcher this one started"}
        if self._handed_over:
            return {"ok": False, "error": "already handed over"}
        if self._probation is not None:
            return {"ok": False, "error": "a takeover is already under way"}
        self._probation = self._spawn(self._prove_successor(
            proc, chan, control if isinstance(control, str) else ""), critical=False)
        log.info("upgrade: pid %d is ready; both serve until it has shown that it serves "
                 "(at least %.1f s), then this one hands over", proc.pid, self.cfg.upgrade_probation)
        return {"ok": True, "pid": self._pid, "probation": self.cfg.upgrade_probation}

    async def _prove_successor(self, proc: asyncio.subprocess.Process, chan: str,
                               control: str) -> None:
        """Probation: ``upgrade_probation`` seconds with the new dispatcher alive, then its
        control socket must answer a status with a ready worker in every pool (its event
        loop runs, its workers are up). Then hand over. Not within ``connect_timeout``:
        it is killed, and :meth:`_watch_successor` says that this one goes on serving."""
        deadline = time.monotonic() + self.cfg.upgrade_probation + self.cfg.connect_timeout
        await asyncio.sleep(self.cfg.upgrade_probation)
        why = "no control socket"
        while True:
            if proc.returncode is not None or self._successor is not proc or self._stopping:
                return   # (its exit is reported by _watch_successor)
            if control:
                why = await self._probe_successor(proc.pid, control)
                if not why:
                    break
            if time.monotonic() > deadline:
                log.error("upgrade: the new dispatcher (pid %d) has not shown that it serves "
                          "(%s): killing it", proc.pid, why)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
            await asyncio.sleep(0.1)
        if proc.returncode is None and self._successor is proc and not self._stopping:
            await self._hand_over(proc, chan)

    async def _probe_successor(self, pid: int, control: str) -> str:
        """'' if the new dispatcher answers a status with a ready worker in each pool,
        else what is wrong."""
        try:
            resp = await asyncio.to_thread(request, control, {"cmd": "status"}, timeout=2.0)
        except (OSError, SockshareError, ValueError) as exc:
            return f"its control socket did not answer: {exc}"
        st = resp.get("status")
        if not resp.get("ok") or not isinstance(st, dict) or st.get("pid") != pid:
            return f"its control socket answered {resp!r:.200}"
        ready = {w.get("pool") for w in st.get("workers", ()) if isinstance(w, dict)
                 and w.get("state") == "ready"}
        missing = [p for p in self.pools if p not in ready]
        return f"no ready worker in pool(s) {', '.join(missing)}" if missing else ""

    async def _hand_over(self, proc: asyncio.subprocess.Process, chan: str) -> None:
        """The new dispatcher has shown that it serves: give it everything."""
        pid = proc.pid
        try:
            up = await AsyncChannel.connect(chan, name=f"dispatcher:{self._pid}")
        except (OSError, SockshareError) as exc:
            log.error("upgrade: cannot connect to the new dispatcher's channel (%s): killing "
                      "it", exc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return
        if proc.returncode is not None or self._stopping:
            with contextlib.suppress(Exception):
                await up.aclose()
            return
        self._handed_over = True
        self._upstream = up
        _sd_notify(f"MAINPID={pid}")
        loop = asyncio.get_running_loop()
        for ls in self.listeners:   # the kernel's accept queue is shared: nothing is lost
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_reader(ls.sock.fileno())
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        self._spawn(self._watch_upstream(up))
        for slot in list(self.slots):
            self._retire(slot, "upgrade")
        for pool in self.pools.values():
            pool.workers = []
            self._drain(pool)
        self.counters["upgrades"] += 1
        if self._successor_ready is not None and not self._successor_ready.done():
            self._successor_ready.set_result(True)
        log.info("upgrade: handed over to pid %d; draining %d worker(s)", pid, len(self.slots))
        self._spawn(self._exit_when_drained())

    def _forward_upstream(self, w: Waiting) -> bool:
        up = self._upstream
        if up is None or up.closed:
            return False
        try:
            [t] = up.send_nowait([(w.sock, w.encoded_meta(), w.data)], ack=True)
        except (SockshareError, ValueError, OSError) as exc:
            log.warning("upgrade: cannot forward %s to the new dispatcher: %s", w.info.handoff_id, exc)
            return False
        self._upstream_pending[t.id] = (t, w)
        return True

    async def _watch_upstream(self, up: AsyncChannel) -> None:
        while True:
            alive = await up.wait_activity()
            for tid, (t, w) in list(self._upstream_pending.items()):
                if t.state == "accepted":
                    del self._upstream_pending[tid]
                    if w.origin is not None:
                        self._migration_done(w, None)
            for t in up.returned():
                entry = self._upstream_pending.pop(t.id, None)
                if entry is None:
                    if t.socket is not None:
                        t.socket.close()
                    continue
                w = entry[1]
                if t.socket is not None:
                    w.sock = t.socket
                self._refuse(w, "upgrade", f"the new dispatcher did not take it: {t.reason}")
            if not alive:
                return

    async def _exit_when_drained(self) -> None:
        while self.slots or self._upstream_pending or any(p.queue for p in self.pools.values()):
            await asyncio.sleep(0.05)
        self.stop("handed over to the new dispatcher")

    # -- upgrade: the new dispatcher -------------------------------------------------

    async def _take_over(self) -> bool:
        log.info("upgrade: workers ready; asking pid %d to hand over", self._predecessor)
        try:
            resp = await asyncio.to_thread(
                request, self._predecessor_control,
                {"cmd": "takeover", "pid": self._pid, "channel": self._chan_path,
                 "control": self._control.path if self._control else ""}, timeout=30.0)
        except (OSError, SockshareError, ValueError) as exc:
            log.error("upgrade: the old dispatcher did not answer: %s", exc)
            return False
        if not resp.get("ok"):
            log.error("upgrade: the old dispatcher refused: %s", resp.get("error"))
            return False
        log.info("upgrade: took over from pid %d (it serves beside this one for %s s, then "
                 "hands over)", self._predecessor, resp.get("probation", "?"))
        return True

    def _handed_over_to_us(self) -> None:
        """The old dispatcher connected its channel: it no longer accepts, its workers
        drain into ours. The listeners' socket files and the control path are ours now
        (not before: were this process to die during the probation, the old one goes on
        with them)."""
        for ls in self.listeners:
            ls.owned = True
        if self._control_final and self._control is not None:
            with contextlib.suppress(OSError):
                self._control.move(self._control_final)
            self._control_final = ""
        log.info("upgrade: pid %d handed over; its workers drain into ours", self._predecessor)

    async def _watch_peer(self, ch: AsyncChannel) -> None:
        """Connections the old dispatcher hands us: migrations (chained answers) and its
        queue (ours at once)."""
        while True:
            alive = await ch.wait_activity()
            for h in ch.received():
                try:
                    meta = h.meta
                except ValueError:
                    h.reject("undecodable metadata")
                    continue
                if isinstance(meta, dict) and "resume" in meta:
                    self._migration_in(None, h)
                    continue
                h.accept()
                meta = meta if isinstance(meta, dict) else {}
                pool = str(meta.get("pool"))
                if pool not in self.pools:
                    pool = self.cfg.default_pool
                meta["pool"] = pool
                info = ConnInfo(meta.get("client"), str(meta.get("listener", "")), pool,
                                str(meta.get("handoff_id", "")), meta)
                self._place(Waiting(h.socket, info, meta, h.data, time.monotonic()), front=True)
            ch.returned()
            if not alive:
                with contextlib.suppress(Exception):
                    await ch.aclose()
                return

    # -- housekeeping --------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        tick = 0
        next_rebalance = time.monotonic() + self.cfg.rebalance_interval
        while True:
            await asyncio.sleep(0.25)
            tick += 1
            now = time.monotonic()
            for pool in self.pools.values():
                while pool.queue and now - pool.queue[0].since > self.cfg.queue_timeout:
                    self._refuse(pool.queue.popleft(), "queue_timeout",
                                 f"waited {self.cfg.queue_timeout:.0f} s for a free worker")
                self._drain(pool)
            if self.cfg.timeout > 0:
                self._kill_hung(now)
            if tick % 4 == 0:
                for slot in self.slots:
                    slot.marks.append((now, slot.stats.handoffs))
                    t0, n0 = slot.marks[0]
                    slot.rate = (slot.stats.handoffs - n0) / (now - t0) if now > t0 else 0.0
                if now - self._log_window >= 1.0:
                    self._flush_refusal_log()
            if now >= next_rebalance and not self._stopping and not self._handed_over:
                next_rebalance = now + self.cfg.rebalance_interval
                self._rebalance(now)
                for pool in self.pools.values():
                    self._push_peers(pool)   # their connection counts
                for pid in [p for p, (t, _s) in self._exited.items() if now - t > ORPHAN_MEMORY]:
                    del self._exited[pid]

    def _kill_hung(self, now: float) -> None:
        """--timeout: a worker that leaves a handoff unanswered that long is not serving
        (its event loop is blocked, or it is stopped): SIGKILL. Its channel breaks, the
        unanswered handoffs come back and go to other workers, the supervisor starts a
        new one. Connections it had accepted die with it, as with any crash."""
        for slot in self.slots:
            proc = slot.proc
            if not slot.pending or proc is None or proc.returncode is not None or slot.hung:
                continue
            oldest = min(w.sent for _t, w in slot.pending.values())
            if now - oldest <= self.cfg.timeout:
                continue
            slot.hung = True
            self.counters["hung_kills"] += 1
            log.error("worker %d (pid %d) left %d handoff(s) unanswered for %.1f s (--timeout "
                      "%g): killing it; they go to other workers", slot.id, proc.pid,
                      len(slot.pending), now - oldest, self.cfg.timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for (source, _hid), (slot, since) in list(self._moving.items()):
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

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-compatible snapshot (the control socket's ``status``, the metrics)."""
        now = time.monotonic()
        workers = []
        moving_in: dict[WorkerSlot, int] = {}
        for target, _since in self._moving.values():
            moving_in[target] = moving_in.get(target, 0) + 1
        for s in sorted(self.slots, key=lambda s: (s.id, s.generation)):
            st = s.stats
            workers.append({
                "id": s.id, "pool": s.pool, "pid": s.pid, "generation": s.generation,
                "state": s.state, "connections": s.active,
                "inflight": len(s.pending) + s.reserved + moving_in.get(s, 0),
                "handoffs": st.handoffs, "rate": round(s.rate, 1), "rejects": st.rejects,
                "returned": st.returned, "restarts": st.restarts, "lost": st.lost,
                "migrated_in": st.migrated_in, "migrated_out": st.migrated_out,
                "resume": s.can_resume, "retiring": s.retired, "fd_full": s.fd_full,
                "uptime": round(now - s.started, 1) if s.pid else 0.0,
            })
        counters: dict[str, Any] = dict(self.counters)
        counters["refused"] = sum(self.refused.values())
        counters["refused_by_reason"] = dict(self.refused)
        lat = list(self._latencies)
        return {
            "pid": self._pid,
            "argv": self.argv,
            "ready": self._ready,
            "started": self._started_wall,
            "uptime": round(now - self._started, 1),
            "stopping": self._stopping,
            "generation": self.generation,
            "handed_over": self._handed_over,
            "predecessor": self._predecessor or None,
            "successor": self._successor.pid if self._successor is not None else None,
            "channel": self._chan_path,
            "control": self._control.path if self._control else None,
            "metrics": (f"{self._metrics.host}:{self._metrics.port}" if self._metrics else None),
            "listeners": [{"name": ls.cfg.name, "bind": ls.cfg.bind.text, "address": ls.address,
                           "sniff": ls.cfg.sniffs and self._sniff is not None,
                           "accepted": ls.accepted} for ls in self.listeners],
            "pools": [{"name": p.cfg.name, "policy": p.cfg.policy, "workers": len(p.workers),
                       "max_conns": p.cfg.max_conns, "queue": len(p.queue),
                       "queue_limit": p.cfg.queue, "rebalance": p.rebalance,
                       "app": p.cfg.app, "worker_cmd": p.cfg.worker_cmd}
                      for p in self.pools.values()],
            "workers": workers,
            "counters": counters,
            "migration_latency": {"samples": len(lat),
                                  "p50_ms": round(_percentile(lat, 0.50) * 1000, 3),
                                  "p99_ms": round(_percentile(lat, 0.99) * 1000, 3),
                                  "histogram": self._latency_histogram.snapshot()},
        }

    async def _on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "ping":
            return {"ok": True, "pid": self._pid}
        if cmd == "reload":
            return await self.reload("reload requested (control socket)", wait=bool(req.get("wait")))
        if cmd == "upgrade":
            return await self.upgrade("upgrade requested (control socket)", wait=bool(req.get("wait")))
        if cmd == "migrate":
            return await self._migrate_command(req)
        if cmd == "takeover":
            return await self._takeover(req)
        return {"ok": False, "error": f"unknown command {cmd!r} "
                                      "(known: ping, status, reload, upgrade, migrate)"}
