"""Upgrade: the dispatcher replaced by a new one, old side and new side.

Old side (:class:`Handover`; SIGUSR2, ``sockshare upgrade``): :meth:`Handover.upgrade`
starts ``python -m sockshare.backends._inherit FD... -- <its own command line>`` with
its listening sockets (and the metrics and agent sockets) passed as ``LISTEN_FDS`` /
``LISTEN_FDNAMES`` -- the systemd protocol, so socket activation and upgrades share one
code path and no listener is ever closed or re-bound. When the new dispatcher asks to
take over (:meth:`Handover.takeover`, on the control socket), both serve side by side
for a probation (``upgrade_probation`` seconds, and until the new one answers a status
with a ready worker in each pool: :meth:`_prove_successor`). Only then does the old one
hand over (:meth:`_hand_over`): ``MAINPID=`` to the master (:mod:`._master`, which
follows the new one; to systemd when there is no master), stop accepting (the kernel's
accept queue is shared), connect a channel to the new dispatcher (the *upstream*),
forward its queue over it (admission's ``upstream`` hook), and retire its workers with
migration: it lists the new dispatcher's workers to them (the ``peers`` control command,
:attr:`Handover.successor_peers`), so their connections go straight to a new worker;
what cannot travels worker → old dispatcher → new dispatcher → new worker. It stops
when its last worker has exited. A new dispatcher that dies first leaves the old one
serving, as if nothing had started.

On Windows there is no descriptor inheritance to speak of (and no ``exec``): the old
dispatcher starts the new one with the same command line and nothing else; the new one
asks the old one for the listeners on the control channel (``{"cmd": "listeners",
"pid": ...}``, :meth:`Handover.share_listeners`), which answers with
``socket.share(new pid)`` blobs (``WSADuplicateSocket``: the duplicates are in the new
process before the answer leaves), and takes them with ``socket.fromshare``
(:meth:`Takeover.fetch_listeners`). Only the process the old one started may ask, once.

New side (:class:`Takeover`): started with ``SOCKSHARE_UPGRADE_FROM`` /
``SOCKSHARE_UPGRADE_CONTROL``, it takes the inherited listeners, starts its workers and,
once they are ready, asks for the hand-over (:meth:`Takeover.take_over`). When the old
dispatcher's channel connects, the listeners' socket files and the control path become
its own (:meth:`_handed_over_to_us`) and :meth:`watch_peer` takes what arrives:
migrations (into the relay) and queued connections (into admission).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from sockshare._aio import AsyncChannel
from sockshare._channel import Ticket
from sockshare._errors import ChannelError, SockshareError
from sockshare.backends import _inherit
from sockshare.server._control import request
from sockshare.server._health import AGENT_FDNAME
from sockshare.server._listeners import sd_notify
from sockshare.server._master import ENV_MASTER, ENV_MASTER_FD, SUCCESSOR_FIELD, pass_master_fd
from sockshare.server._messages import PeerEntry, Peers, decode
from sockshare.server._platform import WINDOWS, start_process
from sockshare.server._policy import ConnInfo
from sockshare.server._slots import Waiting
from sockshare.server._supervision import describe_exit

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["ENV_UPGRADE_CONTROL", "ENV_UPGRADE_FROM", "METRICS_FDNAME", "Handover", "Takeover"]

log = logging.getLogger("sockshare.server")

#: LISTEN_FDNAMES name of the metrics socket passed to a new dispatcher on upgrade.
METRICS_FDNAME = "sockshare.metrics"
#: Environment of a dispatcher started by ``upgrade``: the predecessor's pid and control.
ENV_UPGRADE_FROM = "SOCKSHARE_UPGRADE_FROM"
ENV_UPGRADE_CONTROL = "SOCKSHARE_UPGRADE_CONTROL"
#: How often an old dispatcher that handed over asks the new one for its workers again,
#: how long it waits for an answer, and after how many unanswered asks in a row its
#: workers are told nobody (they relay).
SUCCESSOR_PEERS_EVERY = 0.5
SUCCESSOR_PEERS_TIMEOUT = 1.0
SUCCESSOR_PEERS_MISSES = 3


class Handover:
    """The old side of an upgrade: start the successor, prove it, hand over to it."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.cfg = d.cfg
        self.pools = d.pools
        self.slots = d.slots
        self.counters = d.counters
        self.admission = d.admission
        self.successor: asyncio.subprocess.Process | None = None
        self._successor_ready: asyncio.Future[bool] | None = None
        #: the successor asked to take over and serves beside us until it has shown
        #: that it serves (see _prove_successor)
        self._probation: asyncio.Task[None] | None = None
        self.handed_over = False
        #: our channel to the successor, once handed over, and what is in flight on it
        self.upstream: AsyncChannel | None = None
        self.upstream_pending: dict[int, tuple[Ticket, Waiting]] = {}
        #: (Windows) the successor took its listeners (share_listeners answers once)
        self._shared = False
        #: forwarded in this turn of the loop: they leave together (``_flush_forward``)
        self._forwarding: list[Waiting] = []
        #: once handed over: by pool, the new dispatcher's workers that take direct
        #: migrations (its ``peers`` answer, asked again every SUCCESSOR_PEERS_EVERY s):
        #: our workers' connections go straight to them
        self.successor_peers: dict[str, tuple[PeerEntry, ...]] = {}
        self._peers_missed = False

    def _passed_sockets(self) -> list[tuple[str, socket.socket]]:
        """What a new dispatcher takes over: the listeners, the metrics and agent sockets."""
        socks = [(ls.cfg.name, ls.sock) for ls in self.d.listeners.all if ls.sock.fileno() >= 0]
        if self.d.metrics_sock is not None and self.d.metrics_sock.fileno() >= 0:
            socks.append((METRICS_FDNAME, self.d.metrics_sock))
        agent = self.d.health.socket
        if agent is not None and agent.fileno() >= 0:
            socks.append((AGENT_FDNAME, agent))
        return socks

    def share_listeners(self, req: dict[str, Any]) -> dict[str, Any]:
        """(Windows) ``{"cmd": "listeners", "pid": P}`` from the successor this one
        started: each socket ``share(P)``'d, base64 (the handles are in P already)."""
        proc = self.successor
        if not WINDOWS:
            return {"ok": False, "error": "listeners: Windows only (elsewhere they are inherited)"}
        if proc is None or req.get("pid") != proc.pid or self.handed_over:
            return {"ok": False, "error": "listeners refused: not the dispatcher this one started"}
        if self._shared:
            return {"ok": False, "error": "listeners refused: already taken"}
        self._shared = True
        out = [[name, base64.b64encode(sock.share(proc.pid)).decode("ascii")]   # type: ignore[attr-defined,unused-ignore]
               for name, sock in self._passed_sockets()]
        log.info("upgrade: %d listening socket(s) shared with pid %d", len(out), proc.pid)
        return {"ok": True, "sockets": out}

    async def upgrade(self, why: str = "upgrade requested", *, wait: bool = False) -> dict[str, Any]:
        """Start a new dispatcher (the same command line: new code) with our listeners;
        hand over to it once it says its workers are ready."""
        if self.d.stopping or self.handed_over:
            return {"ok": False, "error": "the dispatcher is stopping or already handed over"}
        if self.successor is not None:
            return {"ok": False, "error": f"an upgrade is under way (pid {self.successor.pid})"}
        loop = asyncio.get_running_loop()
        if WINDOWS:
            return await self._upgrade_windows(why, wait)
        env_add, fds = _inherit.pass_listen_fds(self._passed_sockets())
        env = dict(os.environ, **env_add)
        env[ENV_UPGRADE_FROM] = str(self.d.pid)
        env[ENV_UPGRADE_CONTROL] = self.d.control.path if self.d.control else ""
        argv = [sys.executable, "-m", "sockshare.backends._inherit", *map(str, fds), "--", *self.d.argv]
        log.info("%s: starting a new dispatcher: %s", why, shlex.join(self.d.argv))
        master_fd = -1
        try:
            if self.d.master_fd >= 0:
                # the master's pipe goes on to the new generation (numbered above the
                # descriptors the exec wrapper renumbers)
                master_fd = pass_master_fd(self.d.master_fd, _inherit.SD_LISTEN_FDS_START + len(fds))
                env[ENV_MASTER] = str(self.d.master)
                env[ENV_MASTER_FD] = str(master_fd)
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, pass_fds=[*fds, master_fd] if master_fd >= 0 else fds,
                stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            self.counters["upgrade_failures"] += 1
            log.error("upgrade: cannot start the new dispatcher: %s", exc)
            return {"ok": False, "error": str(exc)}
        finally:
            if master_fd >= 0:
                os.close(master_fd)
        if self.d.master:
            sd_notify(f"{SUCCESSOR_FIELD}={proc.pid}")   # (the master stops it too on stop)
        return await self._started(proc, loop, wait)

    async def _upgrade_windows(self, why: str, wait: bool) -> dict[str, Any]:
        """The same command line; the listeners go by share/fromshare once it asks."""
        env = dict(os.environ)
        env[ENV_UPGRADE_FROM] = str(self.d.pid)
        env[ENV_UPGRADE_CONTROL] = self.d.control.path if self.d.control else ""
        log.info("%s: starting a new dispatcher: %s", why, shlex.join(self.d.argv))
        self._shared = False
        try:
            proc = await start_process(self.d.argv, env)
        except OSError as exc:
            self.counters["upgrade_failures"] += 1
            log.error("upgrade: cannot start the new dispatcher: %s", exc)
            return {"ok": False, "error": str(exc)}
        return await self._started(proc, asyncio.get_running_loop(), wait)

    async def _started(self, proc: asyncio.subprocess.Process, loop: asyncio.AbstractEventLoop,
                       wait: bool) -> dict[str, Any]:
        self.successor = proc
        self._successor_ready = loop.create_future()
        watcher = self.d.spawn(self._watch_successor(proc), critical=False)
        if not wait:
            return {"ok": True, "pid": proc.pid, "state": "starting"}
        await asyncio.wait({self._successor_ready, watcher},
                           timeout=self.cfg.connect_timeout + 30.0 + self.cfg.upgrade_probation,
                           return_when=asyncio.FIRST_COMPLETED)
        if self.handed_over:
            return {"ok": True, "pid": proc.pid, "state": "handed over"}
        return {"ok": False, "pid": proc.pid, "error": "the new dispatcher did not take over"}

    def reload_refusal(self) -> str:
        """Why a reload cannot be done now because of an upgrade ("" if it can). The new
        dispatcher starts workers of its own from the code as it is, and retires ours: a
        reload here would be lost (or would start workers that nobody retires)."""
        if self.successor is not None and not self.handed_over:
            return (f"an upgrade is under way (new dispatcher pid {self.successor.pid}, which "
                    "starts its own workers with the current code); retry once it is over")
        if self.d.takeover.predecessor and not self.d.ready:
            return (f"an upgrade is under way (this dispatcher is taking over from pid "
                    f"{self.d.takeover.predecessor}); retry once it has taken over")
        return ""

    async def _watch_successor(self, proc: asyncio.subprocess.Process) -> None:
        try:
            late = self.cfg.connect_timeout + 30.0 + self.cfg.upgrade_probation
            rc = await asyncio.wait_for(proc.wait(), late)
        except TimeoutError:
            if self.handed_over:
                return
            log.error("upgrade: the new dispatcher (pid %d) did not take over in time: killed",
                      proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            rc = await proc.wait()
        if self.handed_over:
            return   # it runs on; its exit is none of our business any more
        self.counters["upgrade_failures"] += 1
        probation, self._probation = self._probation, None
        if probation is not None:
            probation.cancel()
        log.error("upgrade failed: the new dispatcher (pid %d) exited with %s before %s; this "
                  "one (pid %d) goes on serving", proc.pid, describe_exit(rc),
                  "it had shown that it serves" if probation is not None else "taking over",
                  self.d.pid)
        self.successor = None
        if self._successor_ready is not None and not self._successor_ready.done():
            self._successor_ready.set_result(False)

    async def takeover(self, req: dict[str, Any]) -> dict[str, Any]:
        """The new dispatcher is ready. It serves beside this one (both accept on the
        same listening sockets) until it has shown that it serves; only then does this
        one hand over (:meth:`_hand_over`). Dying before that, it leaves this one serving,
        as if the upgrade had never started."""
        proc = self.successor
        pid, chan, control = req.get("pid"), req.get("channel"), req.get("control")
        if proc is None or pid != proc.pid or not isinstance(chan, str):
            return {"ok": False, "error": "takeover refused: not the dispatcher this one started"}
        if self.handed_over:
            return {"ok": False, "error": "already handed over"}
        if self._probation is not None:
            return {"ok": False, "error": "a takeover is already under way"}
        self._probation = self.d.spawn(self._prove_successor(
            proc, chan, control if isinstance(control, str) else ""), critical=False)
        log.info("upgrade: pid %d is ready; both serve until it has shown that it serves "
                 "(at least %.1f s), then this one hands over", proc.pid, self.cfg.upgrade_probation)
        return {"ok": True, "pid": self.d.pid, "probation": self.cfg.upgrade_probation}

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
            if proc.returncode is not None or self.successor is not proc or self.d.stopping:
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
        if proc.returncode is None and self.successor is proc and not self.d.stopping:
            await self._hand_over(proc, chan, control)

    async def _probe_successor(self, pid: int, control: str) -> str:
        """'' if the new dispatcher answers a status with a ready worker in each pool,
        else what is wrong."""
        try:
            resp = await asyncio.to_thread(request, control, {"cmd": "status"}, timeout=2.0)
        except (OSError, SockshareError, ValueError) as exc:
            return f"its control socket did not answer: {exc}"
        st = resp.get("status")
        if not resp.get("ok") or not isinstance(st, dict) or st.get("dispatcher", st.get("pid")) != pid:
            return f"its control socket answered {resp!r:.200}"
        ready = {w.get("pool") for w in st.get("workers", ()) if isinstance(w, dict)
                 and w.get("state") == "ready"}
        missing = [p for p in self.pools if p not in ready]
        return f"no ready worker in pool(s) {', '.join(missing)}" if missing else ""

    async def _hand_over(self, proc: asyncio.subprocess.Process, chan: str, control: str) -> None:
        """The new dispatcher has shown that it serves: give it everything. Its workers
        are listed to ours first, so that their connections go straight to them."""
        pid = proc.pid
        self.successor_peers = {}
        if self.cfg.direct_migration and control and not WINDOWS:   # (no peers there)
            await self._ask_successor_peers(pid, control)
        try:
            up = await AsyncChannel.connect(chan, name=f"dispatcher:{self.d.pid}")
        except (OSError, SockshareError) as exc:
            log.error("upgrade: cannot connect to the new dispatcher's channel (%s): killing "
                      "it", exc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return
        if proc.returncode is not None or self.d.stopping:
            with contextlib.suppress(Exception):
                await up.aclose()
            return
        self.handed_over = True
        up.track_accepts()   # (the answers settled one by one, not by a scan of all pending)
        self.upstream = up
        self.admission.upstream = self.forward
        sd_notify(f"MAINPID={pid}")
        self.d.listeners.stop_accepting()
        if self.d.feeders is not None:
            self.d.feeders.stop_accepting(f"handed over to pid {pid}")
        if self.d.metrics is not None:
            await self.d.metrics.close()
            self.d.metrics = None
        await self.d.health.close()   # the new one answers (drain until we have exited)
        self.d.spawn(self._watch_upstream(up))
        if self.successor_peers:
            self.d.spawn(self._follow_successor_peers(pid, control), critical=False)
        for slot in list(self.slots):
            self.d.supervisor.retire(slot, "upgrade")
        for pool in self.pools.values():
            pool.workers = []
            self.admission.feed(pool)
        self.counters["upgrades"] += 1
        if self._successor_ready is not None and not self._successor_ready.done():
            self._successor_ready.set_result(True)
        log.info("upgrade: handed over to pid %d; draining %d worker(s)", pid, len(self.slots))
        self.d.spawn(self._exit_when_workers_gone())

    async def _ask_successor_peers(self, pid: int, *controls: str) -> bool:
        """Ask the new dispatcher (``pid``) which of its workers take direct migrations
        (its ``peers`` control command, at the first of ``controls`` where it answers);
        False if it did not (then ours relay)."""
        try:
            pools = await asyncio.to_thread(_successor_pools, pid, controls)
            found: dict[str, tuple[PeerEntry, ...]] = {}
            for name, listed in pools.items():
                msg = decode({"cmd": "peers", "peers": listed})
                if isinstance(msg, Peers):
                    found[str(name)] = msg.peers
        except (OSError, SockshareError, ValueError) as exc:
            if not self._peers_missed:   # (once until it answers again: asked every 0.5 s)
                log.info("upgrade: the new dispatcher did not list its workers (%s); our "
                         "connections go through it until it does", exc)
            self._peers_missed = True
            return False
        if self._peers_missed and found:
            log.info("upgrade: the new dispatcher lists its workers again")
        self._peers_missed = False
        self.successor_peers = found
        return True

    async def _follow_successor_peers(self, pid: int, control: str) -> None:
        """While our workers drain, the new dispatcher's list again (its connection
        counts and room change as ours arrive), pushed to them. After
        SUCCESSOR_PEERS_MISSES unanswered asks in a row (or with the channel to it
        closed), they are told nobody -- they relay -- until it answers again."""
        misses = 0
        while self.slots and not self.d.stopping:
            await asyncio.sleep(SUCCESSOR_PEERS_EVERY)
            # (once the channel arrived, it moved its control socket onto our path)
            final = self.d.control.path if self.d.control is not None else ""
            if not self.slots:
                return
            up = self.upstream
            if up is not None and not up.closed and await self._ask_successor_peers(pid, final, control):
                misses = 0
            else:
                misses += 1
                if misses < SUCCESSOR_PEERS_MISSES and up is not None and not up.closed:
                    continue
                self.successor_peers = {}
            for pool in self.pools.values():
                self.d.migration.push_peers(pool)

    def forward(self, w: Waiting) -> bool:
        """Send ``w`` to the new dispatcher (False: there is none to send it to). The ones
        forwarded in one turn of the loop leave together, in one batch (a reload's or an
        upgrade's thousands of moves: a write per 64, not one each)."""
        up = self.upstream
        if up is None or up.closed:
            return False
        self._forwarding.append(w)
        if len(self._forwarding) == 1:
            asyncio.get_running_loop().call_soon(self._flush_forward)
        return True

    def _flush_forward(self) -> None:
        batch, self._forwarding = self._forwarding, []
        up = self.upstream
        if not batch:
            return
        try:
            if up is None or up.closed:
                raise ChannelError("the channel to the new dispatcher is closed")
            tickets = up.send_nowait([(w.sock, w.encoded_meta(), w.data) for w in batch], ack=True)
        except (SockshareError, ValueError, OSError) as exc:
            for w in batch:
                self._forward_failed(w, exc)
            return
        for t, w in zip(tickets, batch, strict=True):
            self.upstream_pending[t.id] = (t, w)

    def _forward_failed(self, w: Waiting, exc: BaseException) -> None:
        log.warning("upgrade: cannot forward %s to the new dispatcher: %s", w.info.handoff_id, exc)
        # (a migration goes back to its source, which keeps serving it)
        self.admission.refuse(w, "upgrade", f"cannot forward it to the new dispatcher: {exc}")

    async def _watch_upstream(self, up: AsyncChannel) -> None:
        while True:
            alive = await up.wait_activity()
            for t in up.accepted():
                entry = self.upstream_pending.pop(t.id, None)
                if entry is not None and entry[1].origin is not None:
                    self.d.migration.done(entry[1], None)
            for t in up.returned():
                entry = self.upstream_pending.pop(t.id, None)
                if entry is None:
                    if t.socket is not None:
                        t.socket.close()
                    continue
                w = entry[1]
                if t.socket is not None:
                    w.sock = t.socket
                self.admission.refuse(w, "upgrade", f"the new dispatcher did not take it: {t.reason}")
            if not alive:
                return

    async def _exit_when_workers_gone(self) -> None:
        while self.slots or self.upstream_pending or any(p.queue for p in self.pools.values()):
            await asyncio.sleep(0.05)
        self.d.stop("handed over to the new dispatcher")


def _successor_pools(pid: int, controls: tuple[str, ...]) -> dict[str, Any]:
    """The ``peers`` answer of dispatcher ``pid`` at the first of ``controls`` where it
    answers (another process there -- ourselves, before it moved its control socket
    onto our path -- is passed over); raises the last error."""
    err: Exception = SockshareError("no control socket to ask")
    for path in controls:
        if not path:
            continue
        try:
            resp = request(path, {"cmd": "peers"}, timeout=SUCCESSOR_PEERS_TIMEOUT)
        except (OSError, SockshareError) as exc:
            err = exc
            continue
        pools = resp.get("pools")
        if resp.get("ok") and resp.get("pid") == pid and isinstance(pools, dict):
            return pools
        err = ValueError(f"{path} answered {resp!r:.200}")
    raise err


class Takeover:
    """The new side of an upgrade: take over from the dispatcher that started this one."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.cfg = d.cfg
        self.pools = d.pools
        self.admission = d.admission
        #: the old dispatcher's pid (0: not started by an upgrade) and control socket
        self.predecessor = 0
        self.predecessor_control = ""

    async def fetch_listeners(self) -> dict[str, list[socket.socket]]:
        """(Windows) The predecessor's listening sockets, by name, with ``fromshare``."""
        if not self.predecessor_control:
            raise SockshareError("upgrade: no control file of the old dispatcher to ask")
        resp = await asyncio.to_thread(request, self.predecessor_control,
                                       {"cmd": "listeners", "pid": self.d.pid}, timeout=30.0)
        if not resp.get("ok"):
            raise SockshareError(f"upgrade: the old dispatcher did not share its listeners: "
                                 f"{resp.get('error')}")
        out: dict[str, list[socket.socket]] = {}
        for name, blob in resp.get("sockets") or []:
            sock = socket.fromshare(base64.b64decode(blob))   # type: ignore[attr-defined,unused-ignore]
            out.setdefault(str(name), []).append(sock)
        log.info("upgrade: took %d listening socket(s) from pid %d",
                 sum(map(len, out.values())), self.predecessor)
        return out

    async def take_over(self) -> bool:
        log.info("upgrade: workers ready; asking pid %d to hand over", self.predecessor)
        try:
            resp = await asyncio.to_thread(
                request, self.predecessor_control,
                {"cmd": "takeover", "pid": self.d.pid, "channel": self.d.chan_path,
                 "control": self.d.control.path if self.d.control else ""}, timeout=30.0)
        except (OSError, SockshareError, ValueError) as exc:
            log.error("upgrade: the old dispatcher did not answer: %s", exc)
            return False
        if not resp.get("ok"):
            log.error("upgrade: the old dispatcher refused: %s", resp.get("error"))
            return False
        log.info("upgrade: took over from pid %d (it serves beside this one for %s s, then "
                 "hands over)", self.predecessor, resp.get("probation", "?"))
        return True

    def _handed_over_to_us(self) -> None:
        """The old dispatcher connected its channel: it no longer accepts, its workers
        drain into ours. The listeners' socket files and the control path are ours now
        (not before: were this process to die during the probation, the old one goes on
        with them)."""
        for ls in self.d.listeners.all:
            ls.owned = True
        if self.d.control_final and self.d.control is not None:
            with contextlib.suppress(OSError):
                self.d.control.move(self.d.control_final)
            self.d.control_final = ""
        log.info("upgrade: pid %d handed over; its workers drain into ours", self.predecessor)

    async def watch_peer(self, ch: AsyncChannel) -> None:
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
                    self.d.migration.take(None, h, flush=False)   # (flushed below)
                    continue
                h.accept()
                meta = meta if isinstance(meta, dict) else {}
                pool = str(meta.get("pool"))
                if pool not in self.pools:
                    pool = self.cfg.default_pool
                meta["pool"] = pool
                info = ConnInfo(meta.get("client"), str(meta.get("listener", "")), pool,
                                str(meta.get("handoff_id", "")), meta)
                self.admission.place(Waiting(h.socket, info, meta, h.data, time.monotonic()), front=True)
            self.admission.flush()   # this read's migrations, one batch per target
            ch.returned()
            if not alive:
                self.d.health.predecessor_gone = True   # the upgrade is over: ready again
                with contextlib.suppress(Exception):
                    await ch.aclose()
                return
