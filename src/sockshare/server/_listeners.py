"""The listening side: listening sockets, inherited descriptors, the accept loop.

Where a connection enters. :meth:`Listeners.open` binds each configured listener, or
takes it from ``LISTEN_FDS`` (systemd socket activation, or the old dispatcher of an
upgrade: :func:`sockshare.backends._inherit.listen_fds`), matched by
``LISTEN_FDNAMES`` name or by address; the sockets go into systemd's fd store so they
survive a crash of the dispatcher. When a listening socket is readable,
:meth:`Listeners.on_acceptable` accepts a burst (up to ``ACCEPT_BATCH``, or as many as
Linux says wait in the queue), and each accepted socket is *admitted*: its metadata
built (the common case -- TCP, no sniffer, no routes -- encoded once per listener), or
sniffed first (a task per connection, at most ``sniff_max`` at once), routed to a pool
and given to :meth:`~sockshare.server._admission.Admission.place`. The batches of the
burst are flushed when it ends. With the compiled module, a static route's burst is one
C call (:meth:`Listeners._dispatch_compiled`), and so is a sniffing listener's whose
HTTP heads are queued at accept (:meth:`Listeners._dispatch_sniffed`; the others go to
the Python sniffer).

The accept window (``accept_window``, :meth:`Listeners.on_acceptable`): under load, a
burst waits a few hundred microseconds before it is accepted, so that more connections
share one wake-up and one HANDOFF frame per worker; a connection after a quiet gap, or
one client at a time, is accepted at once.

Holds. A listener stops accepting (connections wait in the kernel's accept queue; none
is refused) while it has a *hold*: ``emfile`` (accept failed: 0.5 s), ``fds`` (an
accepted descriptor reached ``RLIMIT_NOFILE - fd_reserve``: every lower one is taken;
released when the lowest free descriptor is back under the mark) or ``sniff``
(``sniff_max`` connections are being sniffed).

``accept = "worker"`` (docs/server.md, "Accept modes"): a listener whose pool's workers
accept holds ``worker`` for good; the workers inherit a duplicate of it at spawn.

Also here: :func:`sd_notify`, the dispatcher's word to systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sockshare import _fast
from sockshare._aio import AsyncChannel
from sockshare._channel import _remove_stale_socket
from sockshare._errors import BackendUnavailable, SockshareError
from sockshare._state import Ticket
from sockshare.backends import _inherit
from sockshare.backends._scm import peer_credentials
from sockshare.protocol import FLAG_ACK, MAX_PAYLOAD, SocketKind
from sockshare.server._admission import close_reset
from sockshare.server._config import ListenerConfig, Network, accept_window_us, parse_proxy_allow
from sockshare.server._policy import ConnInfo, LeastConnections
from sockshare.server._slots import SlotState, Waiting, WorkerSlot
from sockshare.server._tasks import Tasks

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["ACCEPT_BATCH", "ListenerState", "Listeners", "bind_listener", "sd_notify"]

log = logging.getLogger("sockshare.server")

ACCEPT_BATCH = 64
#: the compiled path's channel handoff ids: a range of their own (the channel's own
#: counter, shared by every channel of the process, starts at 1)
COMPILED_IDS = 1 << 62
#: an upper bound of one compiled HANDOFF entry's bytes besides the listener's constant
#: metadata: entry header, handoff id digits, IPv6 host with a scope, port, quotes
_ENTRY_SLACK = 20 + 24 + 110 + 8
_READY = SlotState.READY
#: seconds between two looks at the free descriptors while accepting is held for them
FD_PROBE_INTERVAL = 0.02
_TCP_INFO = int(getattr(socket, "TCP_INFO", 0))
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_U32 = struct.Struct("=I")
_monotonic = time.monotonic
_exp = math.exp
#: seconds: the time constant of a listener's smoothed arrival rate (the accept window)
WINDOW_TAU = 0.001
#: the compiled sniffing path: a connection accepted before its first bytes came is
#: tried again at the listener's next burst, or after this many seconds if none comes...
UNSNIFFED_RETRY = 0.001
#: ...until it has waited this long: then the Python sniffer takes it (a task that waits
#: for its bytes, up to the sniff timeout)
UNSNIFFED_MAX = 0.005
_sleep = time.sleep


def sd_notify(state: str, fds: list[int] | None = None) -> None:
    """sd_notify that never disturbs the dispatcher (no NOTIFY_SOCKET: nothing)."""
    try:
        _inherit.notify(state, fds or ())
    except (OSError, BackendUnavailable) as exc:
        log.warning("sd_notify %r failed: %s", state.split("\n", maxsplit=1)[0], exc)


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
        #: accept = "worker": the pool whose workers accept on it (the dispatcher never does)
        self.worker_pool: str | None = None
        #: set by the dispatcher once the sniffer is known (see Listeners.prepare)
        self.static_route: tuple[str, str, str, str] | None = None
        #: connections go through the sniffer (set with static_route)
        self.sniffs = False
        #: the accept window's view of the load (Listeners.on_acceptable): when the last
        #: burst began, how many connections it and the one before took, and the arrival
        #: rate (connections per second, smoothed over WINDOW_TAU)
        self.burst_t = 0.0
        self.burst_n = 0
        self.burst_n2 = 0
        self.rate = 0.0
        #: the compiled path's constants (Listeners.prepare): metadata around the handoff
        #: id and the client address, the kind code, an entry's largest size
        self.compiled: tuple[bytes, bytes, bytes, bytes, int] | None = None
        #: a sniffing listener's compiled path (Listeners._dispatch_sniffed) is possible:
        #: TCP, HTTP sniffed (until the whole head), no PROXY header (set by prepare)
        self.sniff_compiled = False
        #: its constants, for the routes, pools and default pool they were made from (a
        #: reload replaces them; Listeners._sniff_constants): (routes, pools, default_pool,
        #: (pool, prefix, mid, end, kind, entry_max, max_head))
        self.sniff_consts: tuple[Any, Any, Any,
                                 tuple[str, bytes, bytes, bytes, bytes, int, int] | None] | None = None
        #: connections of that path accepted before their first bytes came: (descriptor,
        #: address, when first tried), tried again in C by the next burst
        #: (Listeners._dispatch_sniffed); a retry is armed while there are some
        self.unsniffed: list[tuple[int, Any, float]] = []
        self.retry_armed = False
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
        elif sys.platform == "win32":
            # on Windows SO_REUSEADDR would let another socket bind the same port and
            # take its connections: claim it (as the channel does, docs/windows.md)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)   # type: ignore[attr-defined,unused-ignore]
            if b.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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


def defer_accept(sock: socket.socket, lc: ListenerConfig) -> None:
    """``defer_accept`` of a TCP listener: TCP_DEFER_ACCEPT (Linux), so that accept
    returns a connection once its first bytes came (the sniffer then finds the head
    queued), or after about ``defer_accept`` seconds if none did (Linux waits until the
    handshake's next retransmission: 1 s gives 1 s, 2 gives 3, 5 gives 7). Elsewhere:
    a warning, and the listener accepts as usual."""
    opt = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if opt is None or not sys.platform.startswith("linux"):
        log.warning("listener %s: defer_accept needs Linux (TCP_DEFER_ACCEPT); ignored", lc.name)
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, lc.defer_accept)
    except OSError as exc:
        log.warning("listener %s: TCP_DEFER_ACCEPT not set: %s", lc.name, exc)


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


class Listeners:
    """The dispatcher's listening sockets, and everything that accepts on them."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.cfg = d.cfg
        self.pools = d.pools
        self.slots = d.slots
        self.counters = d.counters
        self.admission = d.admission
        self._place = d.admission.place
        self._pid = d.pid
        self.all: list[ListenerState] = []
        #: the number in the next handoff id ("<pid>.<n>")
        self._seq = 1
        #: the next channel handoff id of the compiled path
        self._hid = COMPILED_IDS
        #: connections being sniffed (one task each)
        self.sniffing = Tasks()
        self.sniff: Callable[..., Awaitable[Any]] | None = None
        #: the sniffer's no-wait attempt (a whole head already queued), or None
        self.sniff_now: Callable[..., Any] | None = None
        self._sniff_rules: dict[str, Any] = {}
        #: the sniffer's bound of the metadata it adds (set when it is loaded)
        self._max_sniff_meta = 0
        #: per listener with a PROXY setting: the rules for a source not in its
        #: proxy_allow_from (no PROXY parsing), and the networks allowed (None: any)
        self._untrusted_rules: dict[str, Any] = {}
        self._proxy_allow: dict[str, tuple[Network, ...] | None] = {}
        #: RLIMIT_NOFILE, and the descriptor number past which accepting pauses
        self._fd_limit, reserve = self._fd_limits()
        self._fd_high = self._fd_limit - reserve if self._fd_limit else 1 << 30
        self._fd_logged = -1e9
        #: the accept window in seconds (0.0: off), and the setting it was read from
        #: (a reload may change it: cfg.accept_window is compared by identity per burst)
        self._window_text = self.cfg.accept_window
        self._window = accept_window_us(self._window_text) / 1e6
        #: accept bursts (wake-ups of a listener), and those that waited the window
        self.bursts = 0
        self.windows = 0

    def open(self, inherited: dict[str, list[socket.socket]]) -> None:
        """Every configured listener: taken from ``inherited`` (removed from it) or bound."""
        for lc in self.cfg.listeners:
            sock = self._take_inherited(inherited, lc)
            owned = True
            if sock is not None:
                # systemd's socket files stay systemd's; a predecessor's become ours
                # when it hands over (Takeover._handed_over_to_us)
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
            if lc.defer_accept:
                defer_accept(sock, lc)
            self.all.append(ListenerState(lc, sock, owned=owned))

    def prepare(self) -> None:
        """Load the sniffer if a listener sniffs; settle each listener's route."""
        if any(lc.sniffs for lc in self.cfg.listeners):
            self._load_sniffer()
        worker = {lc.name: p.name for p in self.cfg.pools.values() if p.accept == "worker"
                  for lc in self.cfg.worker_listeners(p.name)}
        for ls in self.all:
            if ls.cfg.name in worker:
                # accept = "worker": the pool's workers accept on it (a duplicate each,
                # inherited at spawn: Supervisor.listen_fds); the dispatcher only holds it
                # open (upgrades, the fd store), so it never accepts there
                ls.worker_pool = worker[ls.cfg.name]
                ls.holds.add("worker")
        self.settle_routes()

    def settle_routes(self) -> None:
        """Each listener's static route and its compiled metadata, from the running
        configuration: at start, and again at every reload that re-reads it (``routes``
        and ``default_pool`` are live: a listener compiled for one pool kept handing to
        it after a reload that added ``[[routes]]``)."""
        for ls in self.all:
            ls.static_route = self._static_route(ls)
            ls.compiled = None
            ls.sniffs = ls.cfg.sniffs and self.sniff is not None
            if ls.static_route is not None and ls.tcp_info and not ls.sniffs:
                _pool, _why, head, tail = ls.static_route
                prefix = f'{{"handoff_id":"{self._pid}.'.encode()
                mid = f'",{head}"client":["'.encode()
                end = f'],{tail}}}'.encode()
                ls.compiled = (prefix, mid, end, SocketKind.code_of(ls.sock),
                               _ENTRY_SLACK + len(prefix) + len(mid) + len(end))
            rules = self._sniff_rules.get(ls.cfg.name)
            ls.sniff_compiled = (ls.sniffs and ls.tcp_info and ls.cfg.proxy == "off"
                                 and rules is not None and rules.http
                                 and rules.http_until == "headers")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for ls in self.all:
            if not ls.holds:
                loop.add_reader(ls.sock.fileno(), self.on_acceptable, ls)

    def for_pool(self, pool: str) -> list[ListenerState]:
        """The listeners whose workers accept (``accept = "worker"``) for ``pool``."""
        return [ls for ls in self.all if ls.worker_pool == pool]

    def stop_accepting(self) -> None:
        """Hand-over of an upgrade: the new dispatcher accepts from now on (the kernel's
        accept queue is shared: nothing is lost)."""
        loop = asyncio.get_running_loop()
        for ls in self.all:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_reader(ls.sock.fileno())
            if ls.unsniffed:   # (accepted already: sniffed and served by this dispatcher)
                self._flush_unsniffed(ls)

    def close_all(self) -> None:
        for ls in self.all:
            self.close(ls)

    def inherited(self) -> dict[str, list[socket.socket]]:
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
        from sockshare.server._sniff import MAX_SNIFF_META, SniffRules, sniff, sniff_now

        self._max_sniff_meta = MAX_SNIFF_META
        self.sniff = sniff
        self.sniff_now = sniff_now
        for lc in self.cfg.listeners:
            if lc.sniffs:
                # routing stays here (cfg.route: globs, listener, proxy presence); the
                # sniffer only reads, so no tables and no default pool
                self._sniff_rules[lc.name] = SniffRules(
                    proxy=lc.proxy,  # type: ignore[arg-type]  # validated by ServerConfig
                    http=lc.sniff, tls=lc.sniff)
                if lc.proxy != "off":
                    self._untrusted_rules[lc.name] = SniffRules(proxy="off", http=lc.sniff,
                                                                tls=lc.sniff)
                    self._proxy_allow[lc.name] = parse_proxy_allow(lc.proxy_allow)

    def proxy_trusted(self, lc: ListenerConfig, addr: Any) -> bool:
        """Whether a PROXY header from ``addr`` (the accepted socket's peer) is believed:
        its address is in the listener's ``proxy_allow_from`` (UNIX listeners: always,
        the socket file's permissions say who may connect)."""
        if lc.bind.is_unix:
            return True
        nets = self._proxy_allow.get(lc.name)
        if nets is None:
            return True
        try:
            ip = ipaddress.ip_address(str(addr[0]).partition("%")[0])
        except (ValueError, IndexError, TypeError):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in nets)

    def close(self, ls: ListenerState) -> None:
        pending, ls.unsniffed = ls.unsniffed, []
        for fd, _a, _t in pending:   # (stopping: reset, as the sniffing tasks are)
            ls.accepted += 1
            self.counters["accepted"] += 1
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.close(fd)
                continue
            close_reset(sock)
        if ls.sock.fileno() < 0:
            return
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(ls.sock.fileno())
        ls.sock.close()
        if ls.cfg.bind.is_unix and ls.owned and not self.d.handover.handed_over:
            with contextlib.suppress(OSError):
                os.unlink(ls.cfg.bind.address)

    def on_acceptable(self, ls: ListenerState) -> None:
        """The loop's reader callback of a listening socket: one accept burst.

        The accept window: when connections come fast -- the listener's smoothed arrival
        rate says about one more arrives within the window, and its last two bursts were
        not single connections -- the burst waits ``accept_window`` (a sleep of the whole
        loop, 300 µs by default) before it is accepted, so that one wake-up, one HANDOFF
        frame per worker and the workers' ACCEPTs are shared by more connections
        (docs/perf-dispatcher.md). A connection after a quiet gap of a few milliseconds,
        or from one client at a time, is accepted at once."""
        window = self._window
        if self.cfg.accept_window is not self._window_text:   # (a reload changed it)
            self._window_text = self.cfg.accept_window
            window = self._window = accept_window_us(self._window_text) / 1e6
        if window:
            now = _monotonic()
            n = ls.burst_n
            # the arrival rate: each connection counts 1/WINDOW_TAU, decaying with that
            # time constant from when its burst began (a quiet gap of a few ms forgets the
            # load that came before)
            rate = (ls.rate + n / WINDOW_TAU) * _exp((ls.burst_t - now) / WINDOW_TAU)
            ls.rate = rate
            ls.burst_t = now
            # wait when about one more connection should come within the window (the
            # estimate is low by up to half when bursts are WINDOW_TAU apart), and the last
            # two bursts were not single connections: one client at a time, however fast,
            # never waits
            if rate * window >= 0.5 and n + ls.burst_n2 >= 3:
                _sleep(window)
                self.windows += 1
            ls.burst_n2 = n
        before = ls.accepted
        self.bursts += 1
        admission = self.admission
        admission.accepting = True
        try:
            self._accept_burst(ls)
        finally:
            admission.accepting = False
            if window:
                ls.burst_n = ls.accepted - before
        if admission.batches:
            # hand this burst over now, not one turn of the loop later (a turn costs
            # more than the handoff itself at a few connections a burst)
            admission.flush()

    def _accept_burst(self, ls: ListenerState) -> None:
        accept = ls.sock._accept  # type: ignore[attr-defined]  # the C accept, see ListenerState
        family, type_, proto = ls.kind
        budget = ACCEPT_BATCH
        waiting = 0
        if ls.sniffs:
            # (the connections waiting for their first bytes count as being sniffed; they
            # go first in the compiled burst, within its budget)
            waiting = len(ls.unsniffed)
            room = self.cfg.sniff_max - len(self.sniffing) - waiting
            if room <= 0 and waiting:
                # the room is taken by the waiting ones: to the Python sniffer now. Only a
                # sniffing task ends a "sniff" hold (_sniffed), and sniff_now may take them
                # all at once with no task: hold only if tasks now fill the room
                self._flush_unsniffed(ls)
                waiting = 0
                room = self.cfg.sniff_max - len(self.sniffing)
            if room <= 0:
                self.hold(ls, "sniff")
                return
            budget = min(budget, room) + waiting
        sp = _fast.speedups
        if sp is not None and ls.tcp_info:
            if ls.compiled is not None and self._dispatch_compiled(ls, sp, budget):
                return
            if ls.sniff_compiled and self._dispatch_sniffed(ls, sp, budget):
                return
            # (not taken: the waiting ones went to the Python sniffer, in their places)
            self._accept_compiled(ls, sp, budget - waiting)
            return
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

    def _dispatch_compiled(self, ls: ListenerState, sp: _fast.Speedups, budget: int) -> bool:
        """The whole burst in C (sockshare._speedups.dispatch_burst) when nothing in it
        needs Python: a TCP listener with a static route (no sniffing, no routes), a
        ``least-conn`` pool with no queue, workers with room, no hand-over under way.
        Each connection is accepted, given its metadata (the same JSON as :meth:`_admit`
        writes), placed as LeastConnections would place it, registered in its worker's
        channel (``raw_pending``) and packed into one HANDOFF frame per worker, with no
        Python object per connection; an ACCEPT closes our copy in C. A REJECT, or a
        channel that ends, makes a Ticket and a :class:`Waiting` of it
        (:meth:`waiting_of`): re-dispatched like any other. False: take the Python path."""
        assert ls.static_route is not None
        assert ls.compiled is not None
        found = self._compiled_workers(ls.static_route[0])
        if found is None:
            return False
        policy, workers, slots, room, peer_max = found
        prefix, mid, end, kind, entry_max = ls.compiled
        budget = min(budget, room, max(1, (peer_max - 2) // entry_max))
        frames, n, status, last_fd, policy._last, self._seq, self._hid = sp.dispatch_burst(
            ls.sock.fileno(), budget, self._fd_high, self._seq, self._hid, policy._last,
            prefix, mid, end, kind, FLAG_ACK, time.monotonic(), workers)
        self._sent_compiled(ls, n, frames, slots, status=status, last_fd=last_fd)
        return True

    def _compiled_workers(self, name: str) -> tuple[
            LeastConnections, list[tuple[int, int, int, dict[int, tuple[int, bytes, float, bytes]]]],
            list[WorkerSlot], int, int] | None:
        """The compiled paths' view of pool ``name``: ``(policy, workers, slots, room,
        peer_max)`` -- its policy, the workers with room as ``(id, connections, room, raw
        dict)``, their slots, their room together, the smallest frame limit of their channels;
        None when the burst must take the Python path (not ``least-conn``, a queue, no
        worker with room, a hand-over under way)."""
        pool = self.pools.get(name)
        if pool is None or pool.queue or self.admission.upstream is not None:
            return None
        policy = pool.policy
        if type(policy) is not LeastConnections:
            return None
        workers: list[tuple[int, int, int, dict[int, tuple[int, bytes, float, bytes]]]] = []
        slots: list[WorkerSlot] = []
        room = 0
        peer_max = MAX_PAYLOAD
        for slot in pool.workers:
            ch = slot.channel
            if slot.state is not _READY or type(ch) is not AsyncChannel or not ch.usable:
                continue
            n = slot.connections
            if n >= slot.limit:
                continue
            r = min(slot.limit - n, ACCEPT_BATCH)
            workers.append((slot.id, n, r, ch.raw_pending))
            slots.append(slot)
            room += r
            peer_max = min(peer_max, ch.peer.max_payload)
        if not workers:
            return None
        return policy, workers, slots, room, peer_max

    def _sent_compiled(self, ls: ListenerState, n: int,
                       frames: list[tuple[int, bytes, list[int], int]], slots: list[WorkerSlot],
                       *, status: int, last_fd: int) -> None:
        """After a compiled burst: its counts, its frames to the channels, its status."""
        if n:
            ls.accepted += n
            self.counters["accepted"] += n
            for k, frame, fds, count in frames:
                ch = slots[k].channel
                assert ch is not None
                ch.send_compiled(frame, fds, count)
        if status == -1:
            self._fds_low(last_fd)
        elif status > 0:   # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
            log.error("accept on %s failed: %s; pausing it for 0.5 s", ls.address,
                      os.strerror(status))
            self._pause(ls, 0.5)

    def _sniff_constants(self, ls: ListenerState) -> tuple[str, bytes, bytes, bytes, bytes, int,
                                                           int] | None:
        """The compiled sniffing path's constants for ``ls``: ``(pool, prefix, mid, end,
        kind, entry_max, max_head)``, or None where the route depends on the connection
        (routes configured) or the pool ends TLS (plain bytes read for it are refused:
        :meth:`_route`). Made again when a reload changed the routes, the pools or the
        default pool."""
        cfg = self.cfg
        cached = ls.sniff_consts
        if (cached is not None and cached[0] is cfg.routes and cached[1] is cfg.pools
                and cached[2] == cfg.default_pool):
            return cached[3]
        consts = None
        if not cfg.routes:
            rules = self._sniff_rules[ls.cfg.name]
            pool, why = cfg.route(ls.cfg, {})
            pcfg = cfg.pools.get(pool)
            if pcfg is not None and not pcfg.web.tls:
                prefix = f'{{"handoff_id":"{self._pid}.'.encode()
                mid = f'","listener":{json.dumps(ls.cfg.name)},"client":["'.encode()
                end = f',"route":{json.dumps(why)},"pool":{json.dumps(pool)}}}'.encode()
                # the largest entry: the constant metadata, the sniffed part at its limit,
                # the head at its limit
                entry_max = (_ENTRY_SLACK + len(prefix) + len(mid) + len(end)
                             + self._max_sniff_meta + rules.max_http_head)
                consts = (pool, prefix, mid, end, SocketKind.code_of(ls.sock), entry_max,
                          rules.max_http_head)
        ls.sniff_consts = (cfg.routes, cfg.pools, cfg.default_pool, consts)
        return consts

    def _dispatch_sniffed(self, ls: ListenerState, sp: _fast.Speedups, budget: int) -> bool:
        """:meth:`_dispatch_compiled` for a listener that sniffs the HTTP Host
        (sockshare._speedups.dispatch_sniffed): each connection whose whole, plain
        HTTP/1.x head is already queued is sniffed in C -- the head read and sent along
        as pre-read data, the request in its metadata, as :meth:`_admit` and
        ``sniff_now`` would do it -- and handed over with the burst. The others (nothing
        queued yet, TLS, anything unusual) come back untouched and take the Python
        sniffer (:meth:`_admit`: ``sniff_now``, else a task), which also says what is
        wrong. False: the whole burst takes the Python path."""
        consts = self._sniff_constants(ls)
        found = None if consts is None else self._compiled_workers(consts[0])
        # (a peer whose frames cannot hold one entry of the largest head: the Python
        # path, which sizes each handoff as it is, not a burst C would refuse whole)
        if consts is None or found is None or found[4] - 2 < consts[5]:
            if ls.unsniffed:
                self._flush_unsniffed(ls)
            return False
        _name, prefix, mid, end, kind, entry_max, max_head = consts
        policy, workers, slots, room, peer_max = found
        budget = min(budget, room, max(1, (peer_max - 2) // entry_max), sp.MAX_FDS)
        pending, ls.unsniffed = ls.unsniffed, []
        now = time.monotonic()
        # (the call owns the pending descriptors from here: frames, left, or closed)
        frames, n, status, last_fd, policy._last, self._seq, self._hid, left = \
            sp.dispatch_sniffed(ls.sock.fileno(), budget, self._fd_high, self._seq, self._hid,
                                policy._last, prefix, mid, end, kind, FLAG_ACK, now, workers,
                                max_head, self._max_sniff_meta, peer_max,
                                [(fd, addr) for fd, addr, _t in pending])
        try:   # (the frames leave first: what is left may raise in the Python path)
            self._sent_compiled(ls, n, frames, slots, status=status, last_fd=last_fd)
        finally:
            if left:
                self._sniff_left(ls, sp, left, {fd: t for fd, _a, t in pending}, now)
        return True

    def _sniff_left(self, ls: ListenerState, sp: _fast.Speedups, left: list[tuple[int, Any, int]],
                    since: dict[int, float], now: float) -> None:
        """The connections of a compiled sniffing burst that C did not sniff: nothing
        queued yet (-1): kept for the next burst (:attr:`ListenerState.unsniffed`) for up
        to UNSNIFFED_MAX; else to the Python sniffer (0: untouched, or waited long
        enough), or refused (an errno: their head failed mid-read)."""
        family, type_, proto = ls.kind
        make, counters = socket.socket, self.counters
        owned = 0
        try:
            for fd, addr, err in left:
                owned += 1
                if err == -1:
                    first = since.get(fd, now)
                    if now - first < UNSNIFFED_MAX and not self.d.stopping:
                        ls.unsniffed.append((fd, addr, first))
                        continue
                try:
                    sock = make(family, type_, proto, fd)
                except OSError:   # (the client already gone, say) never leave the fd behind
                    os.close(fd)
                    continue
                ls.accepted += 1
                counters["accepted"] += 1
                if err > 0:
                    n = self._seq
                    self._seq = n + 1
                    meta: dict[str, Any] = {"handoff_id": f"{self._pid}.{n}",
                                            "listener": ls.cfg.name, "client": [addr[0], addr[1]]}
                    from sockshare.server._sniff import SniffError

                    self._sniff_failed(ls, sock, meta, SniffError(
                        f"connection failed while sniffing: {os.strerror(err)}", "closed"))
                else:
                    self._admit(ls, sock, addr)
        except BaseException:
            sp.close_fds([f for f, _a, _e in left[owned:]])
            raise
        if ls.unsniffed and not ls.retry_armed:
            ls.retry_armed = True
            asyncio.get_running_loop().call_later(UNSNIFFED_RETRY, self._retry_unsniffed, ls)

    def _retry_unsniffed(self, ls: ListenerState) -> None:
        """The retry of connections accepted before their first bytes came, when no
        burst of their listener came first: a burst now (they go first)."""
        ls.retry_armed = False
        if not ls.unsniffed:
            return
        if ls.holds or self.d.stopping or self.d.handover.handed_over or ls.sock.fileno() < 0:
            self._flush_unsniffed(ls)
            return
        admission = self.admission
        admission.accepting = True
        try:
            self._accept_burst(ls)
        finally:
            admission.accepting = False
        if ls.unsniffed and "sniff" in ls.holds:
            self._flush_unsniffed(ls)
        if admission.batches:
            admission.flush()

    def _flush_unsniffed(self, ls: ListenerState) -> None:
        """The connections waiting for their first bytes, to the Python sniffer now (a
        hold, a hand-over, or the compiled path not taken)."""
        pending, ls.unsniffed = ls.unsniffed, []
        family, type_, proto = ls.kind
        owned = 0
        try:
            for fd, addr, _t in pending:
                owned += 1
                try:
                    sock = socket.socket(family, type_, proto, fd)
                except OSError:
                    os.close(fd)
                    continue
                ls.accepted += 1
                self.counters["accepted"] += 1
                self._admit(ls, sock, addr)
        except BaseException:
            for fd, _a, _t in pending[owned:]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def waiting_of(self, t: Ticket) -> Waiting:
        """A handoff of the compiled path that came back (rejected, or its channel
        ended), as the :class:`Waiting` that :meth:`_admit` would have made."""
        assert t.socket is not None
        assert isinstance(t.meta, bytes)
        meta: dict[str, Any] = json.loads(t.meta)
        info = ConnInfo(meta["client"], meta["listener"], meta["pool"], meta["handoff_id"], meta)
        now = time.monotonic()
        return Waiting(t.socket, info, meta, t.data, now, raw=t.meta, sent=now)

    def _accept_compiled(self, ls: ListenerState, sp: _fast.Speedups, budget: int) -> None:
        """:meth:`_accept_burst` with the accept loop in C (sockshare._speedups): one
        call accepts until EAGAIN (no TCP_INFO question, no exception per burst)."""
        family, type_, proto = ls.kind
        items, status = sp.accept_many(ls.sock.fileno(), budget, self._fd_high)
        make, admit, counters = socket.socket, self._admit, self.counters
        owned = 0   # items[:owned] are no longer this loop's to close
        try:
            for fd, addr in items:
                try:
                    sock = make(family, type_, proto, fd)
                except OSError:  # (the client already gone, say) never leave the fd behind
                    owned += 1
                    os.close(fd)
                    continue
                owned += 1
                ls.accepted += 1
                counters["accepted"] += 1
                admit(ls, sock, addr)
        except BaseException:
            sp.close_fds([f for f, _a in items[owned:]])
            raise
        if status == -1:
            self._fds_low(items[-1][0])
        elif status > 0:   # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
            log.error("accept on %s failed: %s; pausing it for 0.5 s", ls.address,
                      os.strerror(status))
            self._pause(ls, 0.5)

    def _pause(self, ls: ListenerState, delay: float) -> None:
        self.hold(ls, "emfile")
        asyncio.get_running_loop().call_later(delay, self.release, ls, "emfile")

    def hold(self, ls: ListenerState, why: str) -> None:
        """Stop accepting on ``ls`` for ``why`` (connections wait in the kernel's
        accept queue meanwhile: nothing is refused)."""
        if not ls.holds and ls.sock.fileno() >= 0:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                asyncio.get_running_loop().remove_reader(ls.sock.fileno())
        ls.holds.add(why)
        if ls.unsniffed:   # (no next burst to try them again: the Python sniffer's now)
            self._flush_unsniffed(ls)

    def release(self, ls: ListenerState, why: str) -> None:
        if why not in ls.holds:
            return
        ls.holds.discard(why)
        if (not ls.holds and not self.d.stopping and not self.d.handover.handed_over
                and ls.sock.fileno() >= 0):
            asyncio.get_running_loop().add_reader(ls.sock.fileno(), self.on_acceptable, ls)
            if why != "emfile":
                self.on_acceptable(ls)   # what waits in the accept queue, now

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
        for ls in self.all:
            self.hold(ls, "fds")
        asyncio.get_running_loop().call_later(FD_PROBE_INTERVAL, self._probe_fds)

    def _probe_fds(self) -> None:
        """While held for descriptors: the lowest free one (what the next accept would
        get), every FD_PROBE_INTERVAL; below the mark by an eighth of the reserve, resume."""
        if not any("fds" in ls.holds for ls in self.all):
            return
        try:
            fd = os.open(os.devnull, os.O_RDONLY)   # the lowest free descriptor
        except OSError:
            fd = self._fd_limit
        else:
            os.close(fd)
        if fd < self._fd_high - max(1, (self._fd_limit - self._fd_high) // 8) or self.d.stopping:
            for ls in self.all:
                self.release(ls, "fds")
            return
        asyncio.get_running_loop().call_later(FD_PROBE_INTERVAL, self._probe_fds)

    def _static_route(self, ls: ListenerState) -> tuple[str, str, str, str] | None:
        """For a TCP listener with no sniffer and a configuration without routes, where
        every connection goes: ``(pool, why, json_head, json_tail)``, the constant parts
        of its metadata encoded once. None where the route depends on the connection."""
        if ls.cfg.bind.is_unix or (ls.cfg.sniffs and self.sniff is not None) or self.cfg.routes:
            return None
        pool, why = self.cfg.route(ls.cfg, {})
        head = f'"listener":{json.dumps(ls.cfg.name)},'
        tail = f'"route":{json.dumps(why)},"pool":{json.dumps(pool)}'
        return pool, why, head, tail

    def _admit(self, ls: ListenerState, sock: socket.socket, addr: Any) -> None:
        n = self._seq
        self._seq = n + 1
        hid = f"{self._pid}.{n}"
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
        if ls.cfg.sniffs and self.sniff is not None:
            rules = self._sniff_rules[ls.cfg.name]
            if ls.cfg.proxy != "off" and not self.proxy_trusted(ls.cfg, addr):
                if ls.cfg.proxy == "required":
                    info = ConnInfo(meta["client"], ls.cfg.name, "", hid, meta)
                    self.admission.refuse(
                        Waiting(sock, info, meta, b"", time.monotonic()), "proxy_untrusted",
                        f"a PROXY header is required on listener {ls.cfg.name!r} and "
                        f"{meta['client'][0]} is not in its proxy_allow_from")
                    return
                # optional: a PROXY header from it would be a forgery; its bytes are data
                rules = self._untrusted_rules[ls.cfg.name]
                if not (rules.http or rules.tls):
                    self._route(ls, sock, meta, b"")
                    return
            sock.setblocking(False)
            if self.sniff_now is not None:
                # the common case, without a task: the head is already queued
                try:
                    result = self.sniff_now(sock, rules)
                except Exception as exc:   # (the connection failed mid-way)
                    self._sniff_failed(ls, sock, meta, exc)
                    return
                if result is not None:
                    self._sniff_done(ls, sock, meta, result)
                    return
            self.sniffing.spawn(self._sniff_then_route(ls, sock, meta, rules), self._sniffed)
            return
        self._route(ls, sock, meta, b"")

    def _sniffed(self, task: asyncio.Task[None]) -> None:
        # (Tasks has dropped it already)
        if len(self.sniffing) < self.cfg.sniff_max:
            for ls in self.all:
                if "sniff" in ls.holds:
                    self.release(ls, "sniff")

    async def _sniff_then_route(self, ls: ListenerState, sock: socket.socket,
                                meta: dict[str, Any], rules: Any) -> None:
        assert self.sniff is not None
        try:
            result = await self.sniff(sock, rules, self.cfg.sniff_timeout)
        except asyncio.CancelledError:
            close_reset(sock)
            raise
        except Exception as exc:
            self._sniff_failed(ls, sock, meta, exc)
            return
        self._sniff_done(ls, sock, meta, result)

    def _sniff_failed(self, ls: ListenerState, sock: socket.socket, meta: dict[str, Any],
                      exc: Exception) -> None:
        # (one log line: the refusal's, rate-limited with the others)
        self.counters["sniff_failures"] += 1
        info = ConnInfo(meta["client"], ls.cfg.name, "", meta["handoff_id"], meta)
        status = getattr(exc, "http_status", None)
        self.admission.refuse(Waiting(sock, info, meta, b"", time.monotonic()),
                              "sniff_failed", str(exc), count=True, http_status=status)

    def _sniff_done(self, ls: ListenerState, sock: socket.socket, meta: dict[str, Any],
                    result: Any) -> None:
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
        w = Waiting(sock, info, meta, data, time.monotonic())
        cfg = self.pools[pool].cfg if pool in self.pools else None
        if data and cfg is not None and cfg.web.tls:
            # bytes were read (plain HTTP, or anything not TLS) for a pool whose workers
            # end TLS: no worker of it can take them; say so once, as a web server would
            self.admission.refuse(w, "not_tls", f"pool {pool!r} ends TLS, and the client sent "
                                  f"{'plain HTTP' if meta.get('protocol') == 'http' else 'no TLS'}",
                                  http_status=400 if meta.get("protocol") == "http" else None)
            return
        self._place(w)
