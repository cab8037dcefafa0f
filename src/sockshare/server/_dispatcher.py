"""The dispatcher: accepts connections and hands each one to a worker process.

One asyncio process owns every listening socket. Its life::

    bind listeners ─ listen on the private channel address ─ start workers
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
On shutdown, connections still queued are refused with reason ``shutdown``, like a
listen backlog that is closed.

Supervision. Each worker id has a supervisor task: it starts the process (the Python
runtime for an ``app``, or a ``worker_cmd`` in any language, given
``SOCKSHARE_CHANNEL``/``SOCKSHARE_WORKER_ID``), waits for it to exit and restarts it
after an exponential backoff (``backoff_initial`` doubling to ``backoff_max``, reset once
a worker ran ``stable_after`` seconds). When a worker dies, its channel breaks: every
handoff it had not accepted comes back as a returned ticket and is re-dispatched -- not
lost; the connections it had accepted die with it (counted as ``lost``).

The dispatcher never reads or writes client data except what a sniffer consumed, which
travels with the handoff as pre-read bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shlex
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sockshare._aio import AsyncChannel, AsyncChannelListener
from sockshare._channel import Ticket, _remove_stale_socket
from sockshare._errors import ChannelError, SockshareError
from sockshare.backends._scm import peer_credentials
from sockshare.server._config import ListenerConfig, PoolConfig, ServerConfig, parse_bind
from sockshare.server._control import ControlServer, default_path, runtime_dir
from sockshare.server._metrics import MetricsServer
from sockshare.server._policy import ConnInfo, Policy, make_policy

__all__ = ["Dispatcher", "WorkerSlot"]

log = logging.getLogger("sockshare.server")

ACCEPT_BATCH = 64
REFUSAL_LOG_PER_SECOND = 10
_LINGER_RESET = struct.pack("ii", 1, 0)


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "unknown status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _close_reset(sock: socket.socket) -> None:
    """Close so that the client sees a reset at once (no FIN, no TIME_WAIT here)."""
    with contextlib.suppress(OSError):
        if sock.family != getattr(socket, "AF_UNIX", -1):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


@dataclass(eq=False, slots=True)
class Waiting:
    """A client connection the dispatcher holds: queued, batched or in flight."""

    sock: socket.socket
    info: ConnInfo
    meta: dict[str, Any]
    data: bytes
    since: float
    attempts: int = 0
    exclude: int | None = None


class PoolState:
    """A pool at run time: its workers, its policy, its queue."""

    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        self.policy: Policy = make_policy(cfg.policy, cfg.hash_key)
        self.workers: list[WorkerSlot] = []
        self.queue: deque[Waiting] = deque()


class WorkerSlot:
    """One worker id: the process currently behind it, its channel and its counters.

    Implements :class:`~sockshare.server._policy.WorkerView` for the policies.
    """

    def __init__(self, wid: int, pool: PoolState) -> None:
        self.id = wid
        self.pool_state = pool
        self.generation = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: AsyncChannel | None = None
        self.state = "starting"
        self.active = 0
        self.reserved = 0
        self.pending: dict[int, tuple[Ticket, Waiting]] = {}
        self.handoffs = 0
        self.rejects = 0
        self.returned = 0
        self.restarts = 0
        self.lost = 0
        self.started = 0.0
        self.rate = 0.0
        self.marks: deque[tuple[float, int]] = deque(maxlen=6)

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

    def has_room(self) -> bool:
        if self.state != "ready" or self.channel is None:
            return False
        cap = self.pool_state.cfg.max_conns
        return cap is None or self.connections < cap

    def __repr__(self) -> str:
        return f"<worker {self.id} pool={self.pool} pid={self.pid} {self.state}>"


class ListenerState:
    def __init__(self, cfg: ListenerConfig, sock: socket.socket) -> None:
        self.cfg = cfg
        self.sock = sock
        self.accepted = 0
        self.paused = False
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


class Dispatcher:
    """The server process. ``await Dispatcher(cfg).run()`` returns the exit status."""

    def __init__(self, cfg: ServerConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.pools: dict[str, PoolState] = {name: PoolState(p) for name, p in cfg.pools.items()}
        self.slots: list[WorkerSlot] = []
        wid = itertools.count(1)
        for pool in self.pools.values():
            for _ in range(pool.cfg.workers):
                slot = WorkerSlot(next(wid), pool)
                pool.workers.append(slot)
                self.slots.append(slot)
        self._by_id = {s.id: s for s in self.slots}
        self.listeners: list[ListenerState] = []
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "handoffs", "rejects", "returned", "redispatches", "sniff_failures",
             "lost"), 0)
        self.refused: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._batches: dict[WorkerSlot, list[Waiting]] = {}
        self._flush_scheduled = False
        self._stopping = False
        self._hurry = False
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sniffing: set[asyncio.Task[None]] = set()
        self._supervisors: list[asyncio.Task[None]] = []
        self._chan: AsyncChannelListener | None = None
        self._chan_path = ""
        self._control: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._sniff: Callable[..., Awaitable[Any]] | None = None
        self._sniff_rules: dict[str, Any] = {}
        self._log_budget = REFUSAL_LOG_PER_SECOND
        self._log_window = 0.0
        self._log_suppressed = 0
        self._started_wall = time.time()
        self._started = time.monotonic()
        self._pid = os.getpid()

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
        for slot in self.slots:
            self._supervisors.append(loop.create_task(self._supervise(slot)))
        self._spawn(self._accept_workers())
        self._spawn(self._housekeeping())
        for ls in self.listeners:
            loop.add_reader(ls.sock.fileno(), self._on_acceptable, ls)
        log.info("dispatcher pid %d: %s; %d worker(s) in %d pool(s); control %s", self._pid,
                 ", ".join(ls.address for ls in self.listeners), len(self.slots), len(self.pools),
                 self._control.path if self._control else "-")
        await self._stop_event.wait()
        await self._shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        return 0

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
        self._stopping = True
        self._stop_event.set()

    async def _setup(self) -> None:
        rundir = runtime_dir()
        self._chan_path = os.path.join(rundir, f"{self._pid}.chan")
        self._chan = AsyncChannelListener.listen(self._chan_path, name="dispatcher")
        for lc in self.cfg.listeners:
            try:
                sock = bind_listener(lc)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {lc.bind.text}: {exc.strerror or exc}") from exc
            except SockshareError as exc:
                raise OSError(f"cannot listen on {lc.bind.text}: {exc}") from exc
            self.listeners.append(ListenerState(lc, sock))
        if any(lc.sniffs for lc in self.cfg.listeners):
            self._load_sniffer()
        self._control = ControlServer(self.cfg.control or default_path(self._pid), self._on_control)
        await self._control.start()
        if self.cfg.metrics:
            b = parse_bind(self.cfg.metrics)
            if b.is_unix:
                raise OSError("--metrics takes HOST:PORT")
            self._metrics = MetricsServer(b.address[0], b.address[1], self.status)
            await self._metrics.start()
            log.info("metrics on http://%s:%d/metrics", self._metrics.host, self._metrics.port)

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

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        while loop.time() < deadline and any(s.pending or s.reserved for s in self.slots):
            await asyncio.sleep(0.01)
        for pool in self.pools.values():
            while pool.queue:
                self._refuse(pool.queue.popleft(), "shutdown", "the server is stopping")
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGKILL if self._hurry else signal.SIGTERM)
        if self._supervisors:
            _done, pending = await asyncio.wait(self._supervisors, timeout=self.cfg.grace + 2.0)
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
        for task in list(self._tasks) + self._supervisors:
            task.cancel()
        for task in list(self._tasks) + self._supervisors:
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
                w.sock.close()
            slot.pending.clear()
        for items in self._batches.values():
            for w in items:
                w.sock.close()
        self._batches.clear()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if self._control is not None:
            await self._control.close()
        if self._metrics is not None:
            await self._metrics.close()

    def _close_listener(self, ls: ListenerState) -> None:
        if ls.sock.fileno() < 0:
            return
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(ls.sock.fileno())
        ls.sock.close()
        if ls.cfg.bind.is_unix:
            with contextlib.suppress(OSError):
                os.unlink(ls.cfg.bind.address)

    # -- accepting -------------------------------------------------------------------

    def _on_acceptable(self, ls: ListenerState) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = ls.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
                log.error("accept on %s failed: %s; pausing it for 0.5 s", ls.address, exc)
                self._pause(ls, 0.5)
                break
            ls.accepted += 1
            self.counters["accepted"] += 1
            self._admit(ls, sock, addr)

    def _pause(self, ls: ListenerState, delay: float) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(ls.sock.fileno())
        ls.paused = True

        def resume() -> None:
            if not self._stopping and ls.sock.fileno() >= 0:
                ls.paused = False
                loop.add_reader(ls.sock.fileno(), self._on_acceptable, ls)

        loop.call_later(delay, resume)

    def _admit(self, ls: ListenerState, sock: socket.socket, addr: Any) -> None:
        hid = f"{self._pid}.{next(self._ids)}"
        meta: dict[str, Any] = {"handoff_id": hid, "listener": ls.cfg.name}
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
            task.add_done_callback(self._sniffing.discard)
            return
        self._route(ls, sock, meta, b"")

    async def _sniff_then_route(self, ls: ListenerState, sock: socket.socket,
                                meta: dict[str, Any]) -> None:
        assert self._sniff is not None
        try:
            result = await self._sniff(sock, self._sniff_rules[ls.cfg.name], self.cfg.sniff_timeout)
        except asyncio.CancelledError:
            _close_reset(sock)
            raise
        except Exception as exc:
            self.counters["sniff_failures"] += 1
            log.info("sniffing %s from %s failed: %s", meta["handoff_id"], meta.get("client"), exc)
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
        pool = self.pools[w.info.pool]
        if not pool.queue and self._assign(pool, w):
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
        candidates = [s for s in pool.workers if s.has_room()]
        if w.exclude is not None and len(candidates) > 1:
            candidates = [s for s in candidates if s.id != w.exclude]
        if not candidates:
            return False
        pick = pool.policy(candidates, w.info)
        if pick is None:
            return False
        assert isinstance(pick, WorkerSlot)
        pick.reserved += 1
        self._batches.setdefault(pick, []).append(w)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _drain(self, pool: PoolState) -> None:
        while pool.queue and self._assign(pool, pool.queue[0]):
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
                tickets = ch.send_nowait([(w.sock, w.meta, w.data) for w in items], ack=True)
            except ChannelError as exc:
                self._bounce(slot, items, f"the channel is unusable: {exc}")
                continue
            except (SockshareError, ValueError, OSError) as exc:
                for w in items:
                    self._refuse(w, "error", f"cannot hand over: {exc}")
                continue
            for t, w in zip(tickets, items, strict=True):
                slot.pending[t.id] = (t, w)

    def _bounce(self, slot: WorkerSlot, items: list[Waiting], why: str) -> None:
        for w in items:
            self._redispatch(w, slot, why, counts=False)

    def _redispatch(self, w: Waiting, slot: WorkerSlot, why: str, *, counts: bool = True) -> None:
        if counts:
            w.attempts += 1
        w.exclude = slot.id
        if w.attempts > self.cfg.max_retries:
            self._refuse(w, "retries_exhausted",
                         f"handed over {w.attempts} times without being accepted; last: {why}")
            return
        if counts:
            self.counters["redispatches"] += 1
            w.meta["attempt"] = w.attempts
            log.info("re-dispatching %s (%s)", w.info.handoff_id, why)
        self._place(w, front=True)

    def _refuse(self, w: Waiting, reason: str, detail: str, *, count: bool = True) -> None:
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
                log.warning("refused a channel from pid %d (%r): not a worker this dispatcher "
                            "started", ch.peer.pid, ch.peer.name)
                with contextlib.suppress(Exception):
                    await ch.aclose()
                continue
            slot.channel = ch
            slot.state = "draining" if self._stopping else "ready"
            log.info("worker %d (pid %d, pool %s, generation %d) ready", slot.id, ch.peer.pid,
                     slot.pool, slot.generation)
            self._spawn(self._watch_tickets(slot, ch))
            self._spawn(self._watch_controls(slot, ch))
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
            named = self._by_id.get(int(name[7:]))
            if free(named):
                return named
        return None

    async def _watch_tickets(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        # (when cancelled at teardown, _teardown closes the channel and the sockets)
        while await ch.wait_activity():
            self._settle(slot, ch)
        self._settle(slot, ch)
        await self._detach(slot, ch)

    async def _watch_controls(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        while True:
            try:
                msg = await ch.receive_control()
            except ChannelError:
                return
            self._apply_control(slot, ch, msg)

    def _apply_control(self, slot: WorkerSlot, ch: AsyncChannel, msg: dict[str, Any]) -> None:
        self._settle(slot, ch)   # count ACCEPTs that preceded this message first
        ev = msg.get("ev")
        if ev == "closed":
            n = msg.get("n", 1)
            if isinstance(n, int) and n > 0:
                slot.active = max(0, slot.active - n)
                self._drain(slot.pool_state)
        elif ev == "draining":
            if slot.state == "ready":
                slot.state = "draining"
                log.info("worker %d (pid %s) is draining", slot.id, slot.pid)
        elif ev == "fatal":
            slot.state = "draining"
            log.error("worker %d (pid %s): %s", slot.id, slot.pid, msg.get("reason", "fatal error"))
        else:
            log.debug("worker %d: control message %r", slot.id, msg)

    def _settle(self, slot: WorkerSlot, ch: AsyncChannel) -> None:
        """Apply the answers that arrived: accepts, rejects, returned tickets."""
        if slot.pending:
            accepted = [tid for tid, (t, _w) in slot.pending.items() if t.state == "accepted"]
            for tid in accepted:
                del slot.pending[tid]
            slot.active += len(accepted)
            slot.handoffs += len(accepted)
            self.counters["handoffs"] += len(accepted)
        back = ch.returned()
        for t in back:
            entry = slot.pending.pop(t.id, None)
            if entry is None:
                if t.socket is not None:
                    t.socket.close()
                continue
            w = entry[1]
            if t.state == "rejected":
                slot.rejects += 1
                self.counters["rejects"] += 1
                why = f"rejected by worker {slot.id}: {t.reason or 'no reason given'}"
            else:
                slot.returned += 1
                self.counters["returned"] += 1
                why = f"worker {slot.id} went away before answering"
            if t.socket is None:
                continue
            w.sock = t.socket
            self._redispatch(w, slot, why)
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
        if slot.active:
            slot.lost += slot.active
            self.counters["lost"] += slot.active
            log.warning("worker %d (pid %d) went away with %d open connection(s): they are lost "
                        "with it", slot.id, ch.peer.pid, slot.active)
        slot.active = 0
        if slot.state in ("ready", "draining"):
            slot.state = "gone"
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
        return argv, env

    async def _supervise(self, slot: WorkerSlot) -> None:
        assert self._stop_event is not None
        failures = 0
        while not self._stopping:
            slot.generation += 1
            argv, env = self.command(slot)
            ran = 0.0
            try:
                # own process group: a terminal's Ctrl-C reaches the dispatcher only,
                # which then stops the workers once, gracefully
                proc = await asyncio.create_subprocess_exec(*argv, env=env, process_group=0,
                                                            stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                log.error("worker %d: cannot start %s: %s", slot.id, shlex.join(argv), exc)
                rc: int | None = None
                pid = 0
            else:
                slot.proc = proc
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
                ran = time.monotonic() - slot.started
                await self._after_exit(slot)
            if self._stopping:
                slot.state = "stopped"
                log.info("worker %d (pid %d) exited with %s", slot.id, pid, _describe_exit(rc))
                break
            # a clean exit (a worker told to stop, or done) does not grow the backoff
            failures = 1 if rc == 0 or ran >= self.cfg.stable_after else failures + 1
            delay = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (failures - 1))
            slot.state = "backoff"
            log.warning("worker %d (pid %d) exited with %s after %.1f s; restarting in %.2f s",
                        slot.id, pid, _describe_exit(rc), ran, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
            if self._stopping:
                slot.state = "stopped"
                break
            slot.restarts += 1

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

    # -- housekeeping --------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(0.25)
            tick += 1
            now = time.monotonic()
            for pool in self.pools.values():
                while pool.queue and now - pool.queue[0].since > self.cfg.queue_timeout:
                    self._refuse(pool.queue.popleft(), "queue_timeout",
                                 f"waited {self.cfg.queue_timeout:.0f} s for a free worker")
                self._drain(pool)
            if tick % 4 == 0:
                for slot in self.slots:
                    slot.marks.append((now, slot.handoffs))
                    t0, n0 = slot.marks[0]
                    slot.rate = (slot.handoffs - n0) / (now - t0) if now > t0 else 0.0
                if now - self._log_window >= 1.0:
                    self._flush_refusal_log()

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-compatible snapshot (the control socket's ``status``, the metrics)."""
        now = time.monotonic()
        workers = []
        for s in self.slots:
            workers.append({
                "id": s.id, "pool": s.pool, "pid": s.pid, "generation": s.generation,
                "state": s.state, "connections": s.active, "inflight": len(s.pending) + s.reserved,
                "handoffs": s.handoffs, "rate": round(s.rate, 1), "rejects": s.rejects,
                "returned": s.returned, "restarts": s.restarts, "lost": s.lost,
                "uptime": round(now - s.started, 1) if s.pid else 0.0,
            })
        counters: dict[str, Any] = dict(self.counters)
        counters["refused"] = sum(self.refused.values())
        counters["refused_by_reason"] = dict(self.refused)
        return {
            "pid": self._pid,
            "started": self._started_wall,
            "uptime": round(now - self._started, 1),
            "stopping": self._stopping,
            "channel": self._chan_path,
            "control": self._control.path if self._control else None,
            "metrics": (f"{self._metrics.host}:{self._metrics.port}" if self._metrics else None),
            "listeners": [{"name": ls.cfg.name, "bind": ls.cfg.bind.text, "address": ls.address,
                           "sniff": ls.cfg.sniffs and self._sniff is not None,
                           "accepted": ls.accepted} for ls in self.listeners],
            "pools": [{"name": p.cfg.name, "policy": p.cfg.policy, "workers": len(p.workers),
                       "max_conns": p.cfg.max_conns, "queue": len(p.queue),
                       "queue_limit": p.cfg.queue,
                       "app": p.cfg.app, "worker_cmd": p.cfg.worker_cmd}
                      for p in self.pools.values()],
            "workers": workers,
            "counters": counters,
        }

    def _on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "ping":
            return {"ok": True, "pid": self._pid}
        return {"ok": False, "error": f"unknown command {cmd!r} (known: ping, status)"}

