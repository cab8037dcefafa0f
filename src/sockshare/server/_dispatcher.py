"""The dispatcher: accepts connections and hands each one to a worker process.

:class:`Dispatcher` is small: it composes the parts, each in its own module, and runs
the life of the process (set up, signals, housekeeping, stop). The parts:

* :mod:`._listeners` -- listening sockets, inherited descriptors, the accept loop, the
  descriptor reserve, sd_notify;
* :mod:`._admission` -- the pools' queues, placing on a worker, batches, refusal;
* :mod:`._supervision` -- worker processes and their channels, reload, hung workers;
* :mod:`._migration` -- the relay, direct moves, orphans, peer lists, rebalancing;
* :mod:`._upgrade` -- both sides of an upgrade;
* :mod:`._master` -- not a part: the process ``sockshare serve`` started, which runs the
  dispatcher generations (``self.master``; its pipe, EOF when it dies: :meth:`_master_gone`);
* :mod:`._status` -- the status snapshot (the control socket, the metrics);
* :mod:`._health` -- the HAProxy agent (``--agent``) and ``GET /healthz``;
* :mod:`._slots` -- worker slots and their states, pools, waiting connections;
* :mod:`._tasks` -- the one helper that keeps background tasks;
* :mod:`._feeders` -- ``--dispatchers N``: the feeder processes that accept and hand
  over beside this one (which then keeps the books), with :mod:`._exclusive`.

What the whole does, end to end:

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
With ``--config`` the file is read again first (``_reconfig``). SIGTTIN/SIGTTOU add or
retire one worker of the default pool; SIGQUIT stops fast (workers killed after
``QUICK_GRACE``).

Upgrade (SIGUSR2, ``sockshare upgrade``): the dispatcher itself is replaced. It starts
``python -m sockshare.backends._inherit FD... -- <its own command line>`` with its
listening sockets (and the metrics socket) passed as ``LISTEN_FDS``/``LISTEN_FDNAMES``
-- the systemd protocol, so socket activation and upgrades share one code path, the
sockets are in place before the new process runs its first line, and no listener is
ever closed or re-bound. The new dispatcher starts its workers and, once they are
ready, asks the old one to hand over (``{"cmd": "takeover"}`` on the old control
socket). Both then serve side by side for a probation (``upgrade_probation`` seconds,
and until the new one answers a status with ready workers); only then does the old one
say ``MAINPID=<new pid>`` (to the master, :mod:`._master`, which follows the new
generation and stays the process a supervisor watches), stop accepting (the kernel's accept queue is shared,
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
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sockshare import _fast
from sockshare._aio import AsyncChannelListener
from sockshare._channel import _remove_stale_socket
from sockshare._errors import BackendUnavailable, SockshareError
from sockshare.backends import _inherit
from sockshare.server import _pidfile, _status
from sockshare.server._admission import Admission
from sockshare.server._config import ServerConfig, parse_bind, resolve_user
from sockshare.server._control import ControlServer, default_path, runtime_dir
from sockshare.server._exclusive import ExclusiveListeners
from sockshare.server._feeders import Feeders
from sockshare.server._feedin import FEED_SUFFIX
from sockshare.server._gc import MoveBurst, freeze_startup
from sockshare.server._health import AGENT_FDNAME, HealthServer, agent_line, http_answer
from sockshare.server._listeners import Listeners, ListenerState, bind_listener, sd_notify
from sockshare.server._master import ENV_MASTER, ENV_MASTER_FD, NOTIFY_SUFFIX
from sockshare.server._messages import Drain, Peers, encode
from sockshare.server._metrics import MetricsServer
from sockshare.server._migration import Migrations
from sockshare.server._peers import PEER_SUFFIX
from sockshare.server._platform import WINDOWS, on_stop_signals
from sockshare.server._rlimit import log_nofile
from sockshare.server._slots import PoolState, SlotState, Waiting, WorkerSlot, WorkerStats
from sockshare.server._supervision import Supervisor
from sockshare.server._tasks import Tasks, log_task_failure
from sockshare.server._upgrade import (
    ENV_UPGRADE_CONTROL,
    ENV_UPGRADE_FROM,
    METRICS_FDNAME,
    Handover,
    Takeover,
)

__all__ = ["Dispatcher", "ListenerState", "PoolState", "SlotState", "Waiting", "WorkerSlot",
           "WorkerStats", "bind_listener"]

log = logging.getLogger("sockshare.server")

#: SIGQUIT (fast stop): seconds workers get after SIGTERM before SIGKILL
QUICK_GRACE = 1.0
#: the signals the dispatcher handles (docs/server.md, "Signals")
_SIGNALS = () if WINDOWS else (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                               signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)


def _remove_dead_sockets(rundir: str) -> None:
    """Channel and control sockets left by dispatchers that were killed (SIGKILL, a crash):
    ``<pid>.chan``/``<pid>.ctl`` whose pid is gone and on which nobody listens; and a
    killed master's ``<pid>.notify`` (a datagram socket: nobody can listen on it).
    (Not on Windows: no socket files there, and ``os.kill(pid, 0)`` would end the process.)"""
    if WINDOWS:
        return
    with contextlib.suppress(OSError):
        for name in os.listdir(rundir):
            stem, ext = os.path.splitext(name)
            if (ext not in (".chan", ".ctl", PEER_SUFFIX, FEED_SUFFIX, NOTIFY_SUFFIX)
                    or not stem.isdigit()):
                continue
            try:
                os.kill(int(stem), 0)
                continue   # alive (or another user's): not ours to touch
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            path = os.path.join(rundir, name)
            if ext == NOTIFY_SUFFIX:
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)
                continue
            with contextlib.suppress(OSError, SockshareError):
                _remove_stale_socket(path)


class Dispatcher:
    """The server process. ``await Dispatcher(cfg).run()`` returns the exit status."""

    def __init__(self, cfg: ServerConfig, *, argv: list[str] | None = None,
                 reconfigure: Callable[[], ServerConfig] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        #: reads the configuration again (``--config``): a reload (SIGHUP) applies it
        self.reconfigure = reconfigure
        #: the command line an upgrade executes again (new code, same arguments)
        self.argv = argv if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        self.pools: dict[str, PoolState] = {name: PoolState(p) for name, p in cfg.pools.items()}
        self.slots: list[WorkerSlot] = []
        #: worker ids (TTIN and reloads with more workers take new ones)
        self.worker_ids = itertools.count(1)
        for pool in self.pools.values():
            for _ in range(pool.cfg.workers):
                slot = WorkerSlot(next(self.worker_ids), pool)
                pool.workers.append(slot)
                self.slots.append(slot)
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "handoffs", "rejects", "returned", "redispatches", "sniff_failures",
             "lost", "migrations", "migrations_refused", "migrations_closed",
             "migration_requests", "rebalances", "reloads", "reload_failures", "upgrades",
             "upgrade_failures", "hung_kills", "migrations_direct", "fd_pauses",
             "fd_rejects", "recycled", "web_keepalive_handed_over", "web_ws_migrated_out",
             "web_ws_migrated_in", "web_moves_refused", "web_ws_closed_1012", "drain_closed",
             "drain_kills", "worker_accepted"), 0)
        self.pid = os.getpid()
        #: --user/--group: (uid, gid, groups) of the workers; None: ours
        self.run_as = resolve_user(cfg.user, cfg.group)
        #: --user: the directory of the channel socket, open to the workers' uid
        self.chan_dir = ""
        #: the master process (``sockshare serve`` as started; 0: none) and the read end
        #: of its pipe, EOF when it is gone (see _master)
        self.master = 0
        self.master_fd = -1
        self.generation = 1
        self.stopping = False
        self._hurry = False
        #: SIGQUIT: a fast stop (see stop)
        self._quick = False
        self._failed = False  # a task died of a bug (see task_failed)
        #: the exit status when it is not 0/1: 3 when the app failed to start
        self.exit_status = 0
        self.stop_event: asyncio.Event | None = None
        #: the dispatcher's own background tasks (the supervisors are the Supervisor's)
        self.tasks = Tasks()
        #: where workers connect their channels
        self.worker_channels: AsyncChannelListener | None = None
        self.chan_path = ""
        self.control: ControlServer | None = None
        #: (new side of an upgrade) where our control socket moves on hand-over
        self.control_final = ""
        self.metrics: MetricsServer | None = None
        self.metrics_sock: socket.socket | None = None
        #: READY=1 said (a new dispatcher: taken over)
        self.ready = False
        self.started_wall = time.time()
        self.started = time.monotonic()
        # the parts (admission first: the others hold it)
        self.admission = Admission(cfg, self.pools, self.counters)
        #: collections held while connections are relayed (a reload's moves: _gc)
        self.gc_hold = MoveBurst()
        self.migration = Migrations(self)
        self.admission.place_migration = self.migration.place
        self.admission.migration_failed = self.migration.failed
        # (several dispatchers: one accept wake-up per connection, see _exclusive)
        self.listeners = Listeners(self) if cfg.dispatchers == 1 else ExclusiveListeners(self)
        self.supervisor = Supervisor(self)
        self.handover = Handover(self)
        self.takeover = Takeover(self)
        self.health = HealthServer(self)
        #: --dispatchers N > 1: the feeder processes (None: this process alone accepts)
        self.feeders = Feeders(self) if cfg.dispatchers > 1 else None

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
            if self.feeders is not None:
                self.feeders.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._teardown())
            raise

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        log_nofile(log, f"dispatcher pid {self.pid}")   # (its workers raise their own)
        try:
            await self._setup()
        except (OSError, SockshareError) as exc:
            log.error("cannot start: %s", exc)
            await self._teardown()
            return 1
        undo_signals = self._handle_signals(loop)
        if self.master_fd >= 0:
            loop.add_reader(self.master_fd, self._master_gone)
        for slot in self.slots:
            self.supervisor.start(slot)
        self.spawn(self.supervisor.accept_workers())
        self.spawn(self._housekeeping())
        self.listeners.start()
        if self.feeders is not None:
            self.feeders.start()
        log.info("dispatcher pid %d%s: %s; %d worker(s) in %d pool(s); control %s", self.pid,
                 f" (master pid {self.master})" if self.master else "",
                 ", ".join(ls.address for ls in self.listeners.all), len(self.slots), len(self.pools),
                 self.control.path if self.control else "-")
        self.spawn(self._announce_ready(), critical=False)
        await self.stop_event.wait()
        await self._shutdown()
        undo_signals()
        if self.exit_status:
            return self.exit_status
        return 0 if (self.ready or not self.takeover.predecessor) and not self._failed else 1

    def _handle_signals(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """The signals of docs/server.md ("Signals"); on Windows only Ctrl+C and
        Ctrl+Break (a graceful stop): the rest goes through the control channel."""
        if WINDOWS:
            return on_stop_signals(loop, self.stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGQUIT, self.stop, "SIGQUIT", True)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, self._on_sigusr2)
        loop.add_signal_handler(signal.SIGUSR1, self._on_sigusr1)
        loop.add_signal_handler(signal.SIGTTIN, self.supervisor.scale, 1, "SIGTTIN")
        loop.add_signal_handler(signal.SIGTTOU, self.supervisor.scale, -1, "SIGTTOU")

        def undo() -> None:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

        return undo

    def stop(self, why: str = "stop requested", quick: bool = False) -> None:
        """Begin a graceful stop (a second call: stop now, workers are killed). ``quick``
        (SIGQUIT): no wait for handoffs in flight; workers get SIGTERM and are killed
        after :data:`QUICK_GRACE` seconds."""
        assert self.stop_event is not None
        if self.stop_event.is_set():
            if not self._hurry:
                log.warning("%s again: killing workers now", why)
                self._hurry = True
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            slot.proc.kill()
            return
        self._quick = quick
        if quick:
            log.info("%s: stopping fast (workers killed after %.1f s)", why, QUICK_GRACE)
        else:
            log.info("%s: stopping (grace %.1f s)", why, self.cfg.grace)
        if not self.handover.handed_over and (self.ready or not self.takeover.predecessor):
            sd_notify("STOPPING=1")
        self.stopping = True
        self.stop_event.set()
        self.supervisor.changed()

    def _master_gone(self) -> None:
        """The master's pipe is readable: EOF, the master died (SIGKILL, a crash). This
        dispatcher is nobody's to watch or signal any more: it stops gracefully (its
        workers get ``grace`` to finish), as a supervisor restarting the server needs."""
        try:
            data = os.read(self.master_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return
        asyncio.get_running_loop().remove_reader(self.master_fd)
        log.critical("the master process (pid %d) is gone: nothing supervises this dispatcher "
                     "any more; stopping", self.master)
        self.stop("master gone")

    def _on_sighup(self) -> None:
        self.spawn(self.reload("SIGHUP"), critical=False)

    def _on_sigusr2(self) -> None:
        self.spawn(self.upgrade("SIGUSR2"), critical=False)

    def _on_sigusr1(self) -> None:
        """SIGUSR1, gunicorn's meaning: the workers reopen their log files (the file
        handlers of ``--log-config``, after logrotate moved them). The master and the
        dispatcher log to stderr: nothing of theirs to reopen. Only workers of the Python
        runtime that are connected get it: one still starting has no handler yet (the
        signal's default action would end it), and a ``--worker-cmd`` program's SIGUSR1
        is its own business."""
        told = 0
        for slot in self.slots:
            pid = slot.pid
            if pid is None or slot.channel is None or slot.pool_state.cfg.worker_cmd:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
                told += 1
        log.info("SIGUSR1: %d worker(s) reopen their log files", told)

    # -- setting up ------------------------------------------------------------------

    async def _setup(self) -> None:
        _fast.report()   # one line if the compiled hot paths should be here and are not
        self.takeover.predecessor = int(os.environ.pop(ENV_UPGRADE_FROM, "0") or 0)
        self.takeover.predecessor_control = os.environ.pop(ENV_UPGRADE_CONTROL, "")
        master, master_fd = os.environ.pop(ENV_MASTER, ""), os.environ.pop(ENV_MASTER_FD, "")
        if master.isdigit() and master_fd.isdigit():
            self.master, self.master_fd = int(master), int(master_fd)
            os.set_inheritable(self.master_fd, False)
        rundir = runtime_dir()
        _remove_dead_sockets(rundir)
        if self.cfg.pid_file:
            _pidfile.claim(self.cfg.pid_file, predecessor=self.takeover.predecessor,
                           owner=self.master)
        if WINDOWS:
            # loopback TCP: each handoff carries a WSADuplicateSocket blob (docs/windows.md)
            self.worker_channels = AsyncChannelListener.listen("tcp://127.0.0.1:0", name="dispatcher")
            self.chan_path = self.worker_channels.address
        elif self.run_as is None:
            self.chan_path = os.path.join(rundir, f"{self.pid}.chan")
            self.worker_channels = AsyncChannelListener.listen(self.chan_path, name="dispatcher")
        else:
            # the runtime directory is ours alone (0700): workers of another uid connect
            # in a directory of their own uid, which they may also put peer sockets in
            uid, gid, _groups = self.run_as
            self.chan_dir = tempfile.mkdtemp(prefix=f"sockshare-{self.pid}-")
            os.chown(self.chan_dir, uid, gid)
            self.chan_path = os.path.join(self.chan_dir, f"{self.pid}.chan")
            self.worker_channels = AsyncChannelListener.listen(
                self.chan_path, name="dispatcher", allow_uids={os.getuid(), uid})
            os.chown(self.chan_path, uid, gid)
        if WINDOWS and self.takeover.predecessor:
            inherited = await self.takeover.fetch_listeners()
        else:
            inherited = self.listeners.inherited()
        self.listeners.open(inherited)
        if self.cfg.pid_file and not self.takeover.predecessor:
            _pidfile.write(self.cfg.pid_file, self.master)   # (an upgrade's: once it has taken over)
        metrics_inherited = inherited.pop(METRICS_FDNAME, [])
        agent_inherited = inherited.pop(AGENT_FDNAME, [])
        for name, socks in inherited.items():
            for s in socks:
                log.warning("inherited descriptor %d (%s) matches no configured listener: closed",
                            s.fileno(), name)
                s.close()
        self.listeners.prepare()
        # under a master the default path is the master's: the same through upgrades
        control = self.cfg.control or default_path(self.master or self.pid)
        if self.takeover.predecessor and (self.cfg.control or self.master):
            # the predecessor still serves at that path: ours moves there on takeover
            self.control_final = control
            control = f"{control}.{self.pid}"
        self.control = ControlServer(control, self._on_control)
        await self.control.start()
        if self.cfg.metrics:
            b = parse_bind(self.cfg.metrics)
            if b.is_unix:
                raise OSError("--metrics takes HOST:PORT")
            msock = metrics_inherited.pop(0) if metrics_inherited else None
            for s in metrics_inherited:
                s.close()
            self.metrics = MetricsServer(b.address[0], b.address[1], self.status, sock=msock,
                                         health=lambda: http_answer(self))
            await self.metrics.start()
            self.metrics_sock = self.metrics.socket
            log.info("metrics on http://%s:%d/metrics", self.metrics.host, self.metrics.port)
        else:
            for s in metrics_inherited:
                s.close()
        if self.cfg.agent:
            b = parse_bind(self.cfg.agent)
            await self.health.start(b.address[0], b.address[1],
                                    sock=agent_inherited.pop(0) if agent_inherited else None)
            log.info("health agent on %s:%d", self.health.host, self.health.port)
        for s in agent_inherited:
            s.close()
        for ls in self.listeners.all:   # listeners survive a crash of this process
            with contextlib.suppress(ValueError, OSError, BackendUnavailable):
                _inherit.store_fds([ls.sock], ls.cfg.name)

    def spawn(self, coro: Any, *, critical: bool = True) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the dispatcher. A *critical* one that dies of a bug
        stops the server; another (a reload, an upgrade, a rebalance) is logged."""
        return self.tasks.spawn(coro, self.task_failed if critical else log_task_failure)

    def task_failed(self, task: asyncio.Task[Any]) -> None:
        """A dispatcher task died of a bug: say so and stop (exit status 1) rather than
        run on without, say, a worker supervisor -- connections would wait forever."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.critical("internal error in %s: %r; stopping", task.get_coro().__qualname__,  # type: ignore[union-attr]
                     exc, exc_info=exc)
        self._failed = True
        if self.stop_event is not None:
            self.stop("internal error")

    async def _announce_ready(self) -> None:
        """READY=1 once the first workers are up; a new dispatcher takes over first."""
        initial = list(self.slots)
        failed = await self.supervisor.wait_ready(initial, self.cfg.connect_timeout)
        if self.stopping:
            return
        if self.takeover.predecessor:
            if failed:
                log.error("upgrade: %d worker(s) of the new dispatcher did not start; giving up "
                          "(pid %d keeps serving)", len(failed), self.takeover.predecessor)
                self.stop("upgrade failed")
                return
            if not await self.takeover.take_over():
                self.stop("upgrade failed")
                return
        self.ready = True
        # (what start-up made -- modules, the configuration, the loop -- never walked by
        # a full collection again: 18 ms each in a reload of 10,000)
        freeze_startup()
        if self.cfg.pid_file and self.takeover.predecessor:
            with contextlib.suppress(_pidfile.PidFileError):
                _pidfile.write(self.cfg.pid_file, self.master)
        sd_notify(f"READY=1\nSTATUS={self.status_line()}")

    # -- stopping ----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.listeners.close_all()
        if self.feeders is not None:
            self.feeders.stop_accepting("the dispatcher is stopping")
        self.listeners.sniffing.cancel()
        inflight = sum(len(s.pending) + len(s.raw) + s.reserved for s in self.slots)
        log.info("listeners closed; %d handoff(s) in flight, %d queued", inflight,
                 self.admission.queued())
        deadline = loop.time() + (0.0 if self._quick else 2.0)
        while loop.time() < deadline and (any(s.pending or s.raw or s.reserved for s in self.slots)
                                          or self.handover.upstream_pending):
            await asyncio.sleep(0.01)
        self.admission.refuse_queued("shutdown", "the server is stopping")
        for slot in self.slots:
            slot.retired = True
            if slot.proc is not None and slot.proc.returncode is None:
                if WINDOWS and not self._hurry and slot.python and slot.channel is not None \
                        and slot.control(Drain(reason="stop")):
                    continue   # (no SIGTERM on Windows: terminate() is TerminateProcess)
                with contextlib.suppress(ProcessLookupError):
                    if self._hurry:
                        slot.proc.kill()
                    else:
                        slot.proc.terminate()
        if self.supervisor.tasks:
            _done, pending = await asyncio.wait(
                set(self.supervisor.tasks),
                timeout=QUICK_GRACE if self._quick else self.cfg.grace + 2.0)
            if pending:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        log.log(logging.INFO if self._quick else logging.WARNING,
                                "worker %d (pid %d) did not stop in time: killed", slot.id,
                                slot.proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            slot.proc.kill()
                await asyncio.wait(pending, timeout=5.0)
        await self._teardown()
        log.info("stopped")

    async def _teardown(self) -> None:
        self.tasks.cancel()
        self.supervisor.tasks.cancel()
        await self.tasks.cancel_and_wait()
        await self.supervisor.tasks.cancel_and_wait()
        self.listeners.close_all()
        for slot in self.slots:
            if slot.channel is not None:
                ch, slot.channel = slot.channel, None
                with contextlib.suppress(Exception):
                    await ch.aclose()
            for t, w in slot.pending.values():
                if t.socket is not None:
                    t.socket.close()
                self.admission.drop(w)
            slot.pending.clear()
        self.admission.drop_batches()
        if self.handover.upstream is not None:
            with contextlib.suppress(Exception):
                await self.handover.upstream.aclose()
            self.handover.upstream = None
        for t, w in self.handover.upstream_pending.values():
            if t.socket is not None:
                t.socket.close()
            self.admission.drop(w)
        self.handover.upstream_pending.clear()
        if self.feeders is not None:
            await self.feeders.close()
        if self.worker_channels is not None:
            self.worker_channels.close()
            self.worker_channels = None
        if self.chan_dir:
            shutil.rmtree(self.chan_dir, ignore_errors=True)
        if self.cfg.pid_file and not self.handover.handed_over:   # (the next one's, else)
            _pidfile.remove(self.cfg.pid_file, self.master)
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        await self.health.close()
        if self.master_fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.master_fd)
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
            self.master_fd = -1
        successor = self.handover.successor
        if successor is not None and successor.returncode is None and not self.handover.handed_over:
            with contextlib.suppress(ProcessLookupError):
                successor.kill()

    async def _housekeeping(self) -> None:
        tick = 0
        next_rebalance = time.monotonic() + self.cfg.rebalance_interval
        while True:
            await asyncio.sleep(0.25)
            tick += 1
            now = time.monotonic()
            self.admission.expire(now)
            if self.cfg.timeout > 0:
                self.supervisor.kill_hung(now)
            if tick % 4 == 0:
                for slot in self.slots:
                    slot.marks.append((now, slot.stats.handoffs))
                    t0, n0 = slot.marks[0]
                    slot.rate = (slot.stats.handoffs - n0) / (now - t0) if now > t0 else 0.0
                self.admission.log_tick(now)
            if now >= next_rebalance and not self.stopping and not self.handover.handed_over:
                next_rebalance = now + self.cfg.rebalance_interval
                self.migration.rebalance(now)
                for pool in self.pools.values():
                    self.migration.push_peers(pool)   # their connection counts
                self.migration.forget_exits(now)

    async def _on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        """A request on the control socket (docs/server.md; not the workers' CONTROL
        frames, see ``_messages``), by its ``"cmd"``."""
        handler = _REQUESTS.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r} "
                                          "(known: ping, status, reload, upgrade, migrate, "
                                          "health, stop)"}
        return await handler(self, req)

    async def _req_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": self.status()}

    async def _req_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pid": self.master or self.pid, "dispatcher": self.pid}

    async def _req_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "stop"}``: a graceful stop, as SIGTERM (``"quick": true``: SIGQUIT);
        the way to stop a server on Windows, which has no SIGTERM."""
        self.stop("stop requested (control socket)", bool(req.get("quick")))
        return {"ok": True, "pid": self.master or self.pid, "dispatcher": self.pid}

    async def _req_listeners(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.handover.share_listeners(req)

    async def _req_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.reload("reload requested (control socket)", wait=bool(req.get("wait")))

    async def _req_upgrade(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.upgrade("upgrade requested (control socket)", wait=bool(req.get("wait")))

    async def _req_migrate(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.migration.command(req)

    async def _req_health(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "health"}``: the agent's line; ``"set": "drain"|"maint"|"ready"``
        changes it by hand first (``_health``)."""
        state = req.get("set")
        if state is not None:
            try:
                return {"ok": True, "line": self.health.set_manual(str(state))}
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
        return {"ok": True, "line": agent_line(self), "manual": self.health.manual or None}

    async def _req_takeover(self, req: dict[str, Any]) -> dict[str, Any]:
        """(From the new dispatcher of an upgrade: see ``_upgrade``.)"""
        return await self.handover.takeover(req)

    async def _req_peers(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "peers"}``: by pool, the workers that take direct migrations now
        (the list each worker gets; the old dispatcher of an upgrade gives it to its
        workers, whose connections then go straight to ours)."""
        return {"ok": True, "pid": self.pid,
                "pools": {name: encode(Peers(self.migration.targets(pool)))["peers"]
                          for name, pool in self.pools.items()}}

    # -- what the control socket asks --------------------------------------------------

    async def reload(self, why: str = "reload requested", *, wait: bool = False) -> dict[str, Any]:
        """Replace every worker by a fresh process (see :meth:`Supervisor.reload`)."""
        return await self.supervisor.reload(why, wait=wait)

    async def upgrade(self, why: str = "upgrade requested", *, wait: bool = False) -> dict[str, Any]:
        """Replace this dispatcher by a new one (see :meth:`Handover.upgrade`)."""
        return await self.handover.upgrade(why, wait=wait)

    def status(self) -> dict[str, Any]:
        """A JSON-compatible snapshot (the control socket's ``status``, the metrics)."""
        snap = _status.snapshot(self)
        if self.feeders is not None:
            snap["dispatchers"] = self.feeders.status()
        return snap

    def status_line(self) -> str:
        return _status.status_line(self)


#: The control socket's commands, by ``"cmd"``.
_REQUESTS: dict[str, Callable[[Dispatcher, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "status": Dispatcher._req_status,
    "ping": Dispatcher._req_ping,
    "stop": Dispatcher._req_stop,
    "reload": Dispatcher._req_reload,
    "upgrade": Dispatcher._req_upgrade,
    "migrate": Dispatcher._req_migrate,
    "health": Dispatcher._req_health,
    "takeover": Dispatcher._req_takeover,
    "listeners": Dispatcher._req_listeners,
    "peers": Dispatcher._req_peers,
}
