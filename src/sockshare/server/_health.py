"""Health: HAProxy's ``agent-check`` on ``--agent ADDR``, and ``GET /healthz``.

A load balancer in front of several sockshare hosts wants to know, for each host, whether
to send it new connections and how many. This module answers that from the dispatcher's
own state; nothing here changes how connections are served.

**The agent** (``--agent 127.0.0.1:9200``, ``agent = "..."`` in TOML): a TCP listener on
the dispatcher. Every connection gets one line and is closed -- HAProxy's ``agent-check``
protocol (a client may send something first, HAProxy's ``agent-send``: it is read and
ignored)::

    ready 100%     every worker of every pool is up and idle
    ready 37%      the weight falls with the load, down to WEIGHT_FLOOR (10%)
    drain          stopping (SIGTERM, SIGINT), upgrading (from ``sockshare upgrade`` until
                   the old dispatcher has exited, on both sides), or drained by hand
                   (``sockshare health drain``)
    maint          a pool has no ready worker (starting, crashed, the app fails to
                   import), or put in maintenance by hand (``sockshare health maint``)

The weight of a pool is ``100 x ready workers / workers x (1 - load)``, where the load
is (open + in-flight + queued connections) / (the sum of the ready workers'
``max_conns``); without ``max_conns`` there is no "full", so the load is 0, or 1 while
connections wait in the queue. The host's weight is its weakest pool's, at least
:data:`WEIGHT_FLOOR` percent: a busy host still gets a share (HAProxy's weight 0 would be
a drain), and HAProxy multiplies the percentage by the server's configured ``weight``.

**HTTP readiness** (Kubernetes ``readinessProbe``): ``GET /healthz`` on the metrics
listener (``--metrics``) answers ``200`` with the agent's line as the body when it is
``ready``, ``503`` with it otherwise. It is on the metrics listener rather than the agent
port because an agent answers at once, before a client speaks, so one port cannot serve
both protocols.

**By hand**: ``sockshare health`` prints the line (exit status 0 when ``ready``, 1
otherwise: an ``exec`` probe); ``sockshare health drain`` (or ``maint``) makes the agent
say so while the server goes on serving everything it is sent, ``sockshare health
ready`` goes back to the computed state. A rolling restart behind HAProxy is: ``health
drain``, wait for HAProxy to stop sending new connections (one ``agent-inter``), stop,
start (the new process starts ``ready`` once its workers are). The manual setting lives
in the process: a restart or an upgrade starts from the computed state (an upgrade
answers ``drain`` by itself while it lasts).

**Upgrades.** The agent's listening socket travels to the new dispatcher with the other
listeners (``LISTEN_FDNAMES`` name :data:`AGENT_FDNAME`), so the port never closes. Both
dispatchers answer ``drain`` from the moment the upgrade starts until the old one has
exited (its channel to the new one closes); the old one stops answering at the
hand-over, as it stops accepting (or, should it be killed first, until its pid is gone).
If the upgrade fails, the old one answers as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Final

from sockshare.server._pidfile import pid_alive
from sockshare.server._slots import SlotState

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["AGENT_FDNAME", "MANUAL_STATES", "WEIGHT_FLOOR", "HealthServer", "agent_line",
           "agent_state", "http_answer"]

log = logging.getLogger("sockshare.server.health")

#: LISTEN_FDNAMES name of the agent socket passed to a new dispatcher on upgrade.
AGENT_FDNAME: Final = "sockshare.agent"
#: The lowest weight (percent) a ready host announces, however loaded.
WEIGHT_FLOOR: Final = 10
#: What ``sockshare health STATE`` accepts: ``ready`` clears a manual drain/maint.
MANUAL_STATES: Final = ("ready", "drain", "maint")
#: Seconds a client of the agent may take to send (and close) whatever it sends.
READ_TIMEOUT: Final = 2.0



def _pool_weight(d: Dispatcher, name: str) -> float | None:
    """A pool's weight in percent (before the floor); None when no worker is ready."""
    pool = d.pools[name]
    ready = [s for s in pool.workers if s.state is SlotState.READY and s.channel is not None
             and not s.retired]
    if not ready:
        return None
    share = len(ready) / max(1, len(pool.workers))
    used = sum(s.connections for s in ready) + len(pool.queue)
    if pool.cfg.max_conns is not None:
        capacity = sum(0 if s.fd_full else s.limit for s in ready)
        load = 1.0 if capacity <= 0 else min(1.0, used / capacity)
    else:
        load = 1.0 if pool.queue else 0.0
    return 100.0 * share * (1.0 - load)


def agent_state(d: Dispatcher) -> tuple[str, int]:
    """``(state, weight)``: ``("ready", 10..100)``, ``("drain", 0)`` or ``("maint", 0)``."""
    health = d.health
    if d.stopping or d.handover.handed_over or d.handover.successor is not None:
        return "drain", 0
    if d.takeover.predecessor and not health.predecessor_gone:
        if pid_alive(d.takeover.predecessor):
            return "drain", 0
        health.predecessor_gone = True   # (killed before it could hand over)
    if health.manual == "drain":
        return "drain", 0
    if health.manual == "maint":
        return "maint", 0
    weights = [_pool_weight(d, name) for name in d.pools]
    if not weights or any(w is None for w in weights):
        return "maint", 0
    weight = min(w for w in weights if w is not None)
    return "ready", max(WEIGHT_FLOOR, min(100, round(weight)))


def agent_line(d: Dispatcher) -> str:
    """The agent's answer, without the newline: ``ready 80%``, ``drain``, ``maint``."""
    state, weight = agent_state(d)
    return f"ready {weight}%" if state == "ready" else state


def http_answer(d: Dispatcher) -> tuple[str, str]:
    """``GET /healthz``: (HTTP status, body)."""
    line = agent_line(d)
    return ("200 OK" if line.startswith("ready") else "503 Service Unavailable"), line + "\n"


class HealthServer:
    """The agent listener: one line per connection. :attr:`manual` is the state set by
    hand (``""``: none); :attr:`predecessor_gone` is set by the new side of an upgrade
    when the old dispatcher's channel closes."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.manual = ""
        self.predecessor_gone = False
        self.host = ""
        self.port = 0
        self._server: asyncio.Server | None = None
        #: the listening socket (kept to pass it to a new dispatcher on upgrade)
        self.socket: socket.socket | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> None:
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=128)
        sock.setblocking(False)
        self.socket = sock
        self._server = await asyncio.start_server(self._client, sock=sock, limit=4096)
        self.host, self.port = sock.getsockname()[:2]

    async def close(self) -> None:
        """Stop answering (on hand-over and at exit). The socket object is closed in this
        process only: a new dispatcher's copy goes on listening."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def set_manual(self, state: str) -> str:
        """``sockshare health STATE``: ``drain``/``maint`` until ``ready``. Returns the
        agent's line after the change."""
        if state not in MANUAL_STATES:
            raise ValueError(f"state must be one of {', '.join(MANUAL_STATES)}, not {state!r}")
        if state != self.manual and (state, self.manual) != ("ready", ""):
            log.info("health: %s by hand (was %s)", state, self.manual or "computed")
        self.manual = "" if state == "ready" else state
        return agent_line(self.d)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(agent_line(self.d).encode() + b"\n")
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            # read (and drop) whatever the client sends until it closes: closing with
            # unread bytes would send a reset, which may overtake our line
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_TIMEOUT):
                    while await reader.read(4096):
                        pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a health check must never hurt the dispatcher
            log.exception("agent request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
