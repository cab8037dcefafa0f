"""Prometheus metrics: ``--metrics 127.0.0.1:9100`` serves ``GET /metrics``.

The text exposition format (version 0.0.4) is written by hand here rather than with
``prometheus_client``: it is a few dozen lines, every value already lives in the
dispatcher's status snapshot (the same dict ``sockshare status`` prints), and the server
keeps to the standard library plus h11/wsproto. :func:`render` turns a snapshot into the
text; :class:`MetricsServer` is a minimal HTTP/1.0-style responder on the event loop
(one request per connection, a 5 s read deadline, an 8 KiB request-head limit).

Series (``pool``/``worker`` labels where it makes sense)::

    sockshare_accepted_total{listener}         connections accepted by the dispatcher
    sockshare_handoffs_total{pool,worker}      handoffs the worker accepted
    sockshare_rejects_total{pool,worker}       handoffs the worker rejected
    sockshare_returned_total{pool,worker}      handoffs given back by a dying channel
    sockshare_redispatches_total               returned/rejected handoffs sent again
    sockshare_refused_total{reason}            connections closed unserved
    sockshare_sniff_failures_total
    sockshare_lost_total                       open connections that died with a worker
    sockshare_queue_depth{pool}                connections waiting for a free worker
    sockshare_worker_connections{pool,worker}  open connections (as reported)
    sockshare_worker_inflight{pool,worker}     handoffs not yet answered
    sockshare_worker_restarts_total{pool,worker}
    sockshare_worker_up{pool,worker}           1 when its channel is connected
    sockshare_migrations_total{result}         ok | refused (the source kept it) |
                                               closed (the source was gone, no target)
    sockshare_migrations_direct_total          of the ok ones, those that went straight from
                                               worker to worker (not relayed)
    sockshare_migrations_in_total{pool,worker} connections moved to / away from a worker
    sockshare_migrations_out_total{pool,worker}
    sockshare_migration_requests_total         asked of workers (rebalance, reload...)
    sockshare_rebalances_total                 rebalancing rounds that asked for moves
    sockshare_migration_latency_seconds{quantile}  0.5 and 0.99 of the last 2048
    sockshare_reloads_total{result}            ok | failed
    sockshare_upgrades_total{result}           ok | failed (this dispatcher's)
    sockshare_generation                       worker generation (reloads + 1)
    sockshare_workers_retiring                 old workers still draining
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["MetricsServer", "render"]

log = logging.getLogger("sockshare.server.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: Any) -> str:
    if not kw:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kw.items()) + "}"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: Any) -> None:
        v = int(value) if float(value).is_integer() else value
        self.lines.append(f"{name}{_labels(**labels)} {v}")


def render(status: dict[str, Any]) -> str:
    """The exposition text for a dispatcher status snapshot."""
    o = _Out()
    c = status["counters"]
    # one series per worker id: a reload has an old and a new process behind one id for
    # a while; their counters are shared (the same numbers), their gauges add up
    workers: list[dict[str, Any]] = []
    by_id: dict[Any, dict[str, Any]] = {}
    for w in sorted(status["workers"], key=lambda w: bool(w.get("retiring"))):
        seen = by_id.get((w["pool"], w["id"]))
        if seen is None:
            row = dict(w)
            by_id[(w["pool"], w["id"])] = row
            workers.append(row)
        else:
            seen["connections"] += w["connections"]
            seen["inflight"] += w["inflight"]

    o.family("sockshare_accepted_total", "counter", "Connections accepted by the dispatcher.")
    for lst in status["listeners"]:
        o.sample("sockshare_accepted_total", lst["accepted"], listener=lst["name"])
    for name, key, help_ in (
        ("sockshare_handoffs_total", "handoffs", "Handoffs accepted by a worker."),
        ("sockshare_rejects_total", "rejects", "Handoffs rejected by a worker."),
        ("sockshare_returned_total", "returned", "Handoffs returned by a broken channel."),
        ("sockshare_worker_restarts_total", "restarts", "Worker restarts."),
    ):
        o.family(name, "counter", help_)
        for w in workers:
            o.sample(name, w[key], pool=w["pool"], worker=w["id"])
    o.family("sockshare_redispatches_total", "counter", "Returned or rejected handoffs sent again.")
    o.sample("sockshare_redispatches_total", c["redispatches"])
    o.family("sockshare_refused_total", "counter", "Connections closed without being served.")
    for reason, n in sorted(c["refused_by_reason"].items()):
        o.sample("sockshare_refused_total", n, reason=reason)
    o.family("sockshare_sniff_failures_total", "counter", "Connections whose sniffing failed.")
    o.sample("sockshare_sniff_failures_total", c["sniff_failures"])
    o.family("sockshare_lost_total", "counter", "Open connections that died with their worker.")
    o.sample("sockshare_lost_total", c["lost"])
    o.family("sockshare_queue_depth", "gauge", "Connections waiting for a free worker.")
    for p in status["pools"]:
        o.sample("sockshare_queue_depth", p["queue"], pool=p["name"])
    for name, key, help_ in (
        ("sockshare_worker_connections", "connections", "Open connections of a worker."),
        ("sockshare_worker_inflight", "inflight", "Handoffs sent to a worker, not yet answered."),
    ):
        o.family(name, "gauge", help_)
        for w in workers:
            o.sample(name, w[key], pool=w["pool"], worker=w["id"])
    o.family("sockshare_worker_up", "gauge", "1 when the worker's channel is connected.")
    current = workers
    for w in current:
        o.sample("sockshare_worker_up", 1 if w["state"] in ("ready", "draining") else 0,
                 pool=w["pool"], worker=w["id"])
    o.family("sockshare_migrations_total", "counter", "Connections migrated between workers.")
    for result, key in (("ok", "migrations"), ("refused", "migrations_refused"),
                        ("closed", "migrations_closed")):
        o.sample("sockshare_migrations_total", c.get(key, 0), result=result)
    o.family("sockshare_migrations_direct_total", "counter",
             "Migrations that went straight from worker to worker.")
    o.sample("sockshare_migrations_direct_total", c.get("migrations_direct", 0))
    for name, key, help_ in (
        ("sockshare_migrations_in_total", "migrated_in", "Connections migrated to a worker."),
        ("sockshare_migrations_out_total", "migrated_out", "Connections migrated away from a worker."),
    ):
        o.family(name, "counter", help_)
        for w in current:
            o.sample(name, w.get(key, 0), pool=w["pool"], worker=w["id"])
    o.family("sockshare_migration_requests_total", "counter", "Migrations asked of workers.")
    o.sample("sockshare_migration_requests_total", c.get("migration_requests", 0))
    o.family("sockshare_rebalances_total", "counter", "Rebalancing rounds that asked for moves.")
    o.sample("sockshare_rebalances_total", c.get("rebalances", 0))
    lat = status.get("migration_latency") or {}
    o.family("sockshare_migration_latency_seconds", "gauge",
             "Migration latency (migrate() called to the target's ACCEPT), recent quantiles.")
    for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
        o.sample("sockshare_migration_latency_seconds", lat.get(key, 0) / 1000, quantile=q)
    o.family("sockshare_reloads_total", "counter", "Reloads (new worker generations).")
    o.sample("sockshare_reloads_total", c.get("reloads", 0), result="ok")
    o.sample("sockshare_reloads_total", c.get("reload_failures", 0), result="failed")
    o.family("sockshare_upgrades_total", "counter", "Upgrades of the dispatcher started here.")
    o.sample("sockshare_upgrades_total", c.get("upgrades", 0), result="ok")
    o.sample("sockshare_upgrades_total", c.get("upgrade_failures", 0), result="failed")
    o.family("sockshare_hung_workers_killed_total", "counter",
             "Workers killed for leaving a handoff unanswered past --timeout.")
    o.sample("sockshare_hung_workers_killed_total", c.get("hung_kills", 0))
    o.family("sockshare_generation", "gauge", "Worker generation (1 + successful reloads).")
    o.sample("sockshare_generation", status.get("generation", 1))
    o.family("sockshare_workers_retiring", "gauge", "Old workers still draining.")
    o.sample("sockshare_workers_retiring", sum(bool(w.get("retiring")) for w in status["workers"]))
    return "\n".join(o.lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on a TCP address, rendered from ``snapshot()`` at each request."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]], *,
                 sock: socket.socket | None = None) -> None:
        self.host = host
        self.port = port
        self._snapshot = snapshot
        self._server: asyncio.Server | None = None
        #: the listening socket (kept to pass it to a new dispatcher on upgrade)
        self.socket: socket.socket | None = sock

    async def start(self) -> None:
        if self.socket is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self.socket = socket.create_server((self.host, self.port), family=family)
        self.socket.setblocking(False)
        self._server = await asyncio.start_server(self._client, sock=self.socket, limit=8192)
        self.host, self.port = self.socket.getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                status, body, ctype = "400 Bad Request", "bad request\n", "text/plain"
            elif parts[0] not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
            elif parts[1].split(b"?")[0] != b"/metrics":
                status, body, ctype = "404 Not Found", "see /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", render(self._snapshot()), CONTENT_TYPE
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode() + (b"" if parts[:1] == [b"HEAD"] else data))
            await writer.drain()
        except Exception:  # a metrics scrape must never hurt the dispatcher
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
