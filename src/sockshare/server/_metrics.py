"""Prometheus metrics: ``--metrics 127.0.0.1:9100`` serves ``GET /metrics``.

The same listener answers ``GET /healthz`` (readiness: 200 or 503, see ``_health``).

The text exposition format (version 0.0.4) is written by hand here rather than with
``prometheus_client``: it is a few dozen lines, every value already lives in the
dispatcher's status snapshot (the same dict ``sockshare status`` prints), and the server
keeps to the standard library plus h11/wsproto. :func:`render` turns a snapshot into the
text; :class:`MetricsServer` is a minimal HTTP/1.0-style responder on the event loop
(one request per connection, a 5 s read deadline, an 8 KiB request-head limit).

Series (``pool``/``worker`` labels where it makes sense; counters end in ``_total``,
durations are in seconds)::

    sockshare_connections_accepted_total{listener}  accepted by the dispatcher
    sockshare_connections_refused_total{reason}     closed unserved
    sockshare_connections_lost_total                open connections that died with a worker
    sockshare_connections_sniff_failed_total        connections whose sniffing failed
    sockshare_handoffs_accepted_total{pool,worker}  handoffs the worker accepted
    sockshare_handoffs_rejected_total{pool,worker}  handoffs the worker rejected
    sockshare_handoffs_returned_total{pool,worker}  handoffs given back by a dying channel
    sockshare_handoffs_redispatched_total           returned/rejected handoffs sent again
    sockshare_queue_depth{pool}                     connections waiting for a free worker
    sockshare_worker_connections{pool,worker}       open connections (as reported)
    sockshare_worker_inflight{pool,worker}          handoffs not yet answered
    sockshare_worker_restarts_total{pool,worker}
    sockshare_worker_accepted_total{pool,worker}    accept = "worker": accepted by the worker
    sockshare_worker_up{pool,worker}                1 when its channel is connected
    sockshare_migrations_total{result}              ok | refused (the source kept it) |
                                                    closed (the source was gone, no target)
    sockshare_migrations_direct_total               of the ok ones, those that went
                                                    straight from worker to worker
    sockshare_migrations_in_total{pool,worker}      connections moved to / away from a worker
    sockshare_migrations_out_total{pool,worker}
    sockshare_migration_requests_total              asked of workers (rebalance, reload...)
    sockshare_rebalances_total                      rebalancing rounds that asked for moves
    sockshare_migration_duration_seconds            histogram (``_bucket{le}``, ``_sum``,
                                                    ``_count``), 0.1 ms .. 10 s
    sockshare_reloads_total{result}                 ok | failed
    sockshare_upgrades_total{result}                ok | failed (this dispatcher's)
    sockshare_hung_workers_killed_total
    sockshare_generation                            worker generation (reloads + 1)
    sockshare_workers_retiring                      old workers still draining
    sockshare_dispatcher_handoffs_total{dispatcher} --dispatchers N: handed over by the lead
                                                    (``lead``) / each feeder (``feeder1``...)
    sockshare_dispatcher_cpu_seconds_total{dispatcher}  their CPU time (user + system)
    sockshare_dispatcher_accepting{dispatcher}      1 while it accepts

The names of 0.1.0 are still written, with the same values, for one release: their HELP
text starts with ``DEPRECATED`` and names the replacement (:data:`DEPRECATED`).
``sockshare_migration_latency_seconds{quantile}`` (a gauge of recent quantiles, which
cannot be summed across dispatchers) is the one deprecated series with no exact
replacement: the histogram gives the same figures with ``histogram_quantile()``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

__all__ = ["DEPRECATED", "LATENCY_BUCKETS", "Histogram", "MetricsServer", "render"]

log = logging.getLogger("sockshare.server.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: Upper bounds (seconds) of the migration duration histogram: 0.1 ms to 10 s, three
#: buckets a decade (a direct migration takes 0.3-2 ms here; a relayed one under load,
#: or one that waits for a busy target, tens of ms; past 10 s only ``+Inf`` counts it).
LATENCY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                          0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Old series name -> the name that replaces it (both are written until the next release).
DEPRECATED: Final = {
    "sockshare_accepted_total": "sockshare_connections_accepted_total",
    "sockshare_refused_total": "sockshare_connections_refused_total",
    "sockshare_lost_total": "sockshare_connections_lost_total",
    "sockshare_sniff_failures_total": "sockshare_connections_sniff_failed_total",
    "sockshare_handoffs_total": "sockshare_handoffs_accepted_total",
    "sockshare_rejects_total": "sockshare_handoffs_rejected_total",
    "sockshare_returned_total": "sockshare_handoffs_returned_total",
    "sockshare_redispatches_total": "sockshare_handoffs_redispatched_total",
    "sockshare_migration_latency_seconds": "sockshare_migration_duration_seconds",
}


class Histogram:
    """Counts of observations per bucket, their sum and number, since the start.

    ``observe`` is a binary search and an increment; :meth:`snapshot` gives the
    cumulative counts that the exposition format wants (JSON-compatible, for ``status``).
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1   # le: value <= bound
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        cumulative, n = [], 0
        for c in self.counts:
            n += c
            cumulative.append(n)
        return {"le": list(self.bounds), "buckets": cumulative, "sum": self.sum,
                "count": self.count}


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: Any) -> str:
    if not kw:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kw.items()) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Out:
    """Families are written whole; a renamed counter's old name is written after it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._old: dict[str, tuple[str, str, list[str]]] = {}
        self._current = ""

    def family(self, name: str, kind: str, help_: str) -> None:
        self._end()
        self._current = name
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for old, new in DEPRECATED.items():
            if new == name and kind != "histogram":
                self._old[name] = (old, kind, [])

    def sample(self, name: str, value: float, **labels: Any) -> None:
        line = f"{_labels(**labels)} {_num(value)}"
        self.lines.append(name + line)
        entry = self._old.get(name)
        if entry is not None:
            entry[2].append(entry[0] + line)

    def _end(self) -> None:
        entry = self._old.pop(self._current, None)
        if entry is not None:
            old, kind, samples = entry
            self.lines.append(f"# HELP {old} DEPRECATED, removed in the next release: "
                              f"use {self._current} (same value).")
            self.lines.append(f"# TYPE {old} {kind}")
            self.lines.extend(samples)

    def text(self) -> str:
        self._end()
        return "\n".join(self.lines) + "\n"


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

    o.family("sockshare_connections_accepted_total", "counter",
             "Connections accepted by the dispatcher.")
    for lst in status["listeners"]:
        o.sample("sockshare_connections_accepted_total", lst["accepted"], listener=lst["name"])
    o.family("sockshare_connections_refused_total", "counter",
             "Connections closed without being served, by reason.")
    for reason, n in sorted(c["refused_by_reason"].items()):
        o.sample("sockshare_connections_refused_total", n, reason=reason)
    o.family("sockshare_connections_lost_total", "counter",
             "Open connections that died with their worker.")
    o.sample("sockshare_connections_lost_total", c["lost"])
    o.family("sockshare_connections_sniff_failed_total", "counter",
             "Connections whose sniffing failed.")
    o.sample("sockshare_connections_sniff_failed_total", c["sniff_failures"])
    for name, key, help_ in (
        ("sockshare_handoffs_accepted_total", "handoffs", "Handoffs accepted by a worker."),
        ("sockshare_handoffs_rejected_total", "rejects", "Handoffs rejected by a worker."),
        ("sockshare_handoffs_returned_total", "returned",
         "Handoffs given back by a broken channel."),
        ("sockshare_worker_restarts_total", "restarts", "Worker restarts."),
        ("sockshare_worker_accepted_total", "accepted_here",
         "Connections a worker accepted itself (accept = worker)."),
    ):
        o.family(name, "counter", help_)
        for w in workers:
            o.sample(name, w.get(key, 0), pool=w["pool"], worker=w["id"])
    o.family("sockshare_handoffs_redispatched_total", "counter",
             "Returned or rejected handoffs sent again.")
    o.sample("sockshare_handoffs_redispatched_total", c["redispatches"])
    o.family("sockshare_queue_depth", "gauge", "Connections waiting for a free worker.")
    for p in status["pools"]:
        o.sample("sockshare_queue_depth", p["queue"], pool=p["name"])
    for name, key, help_ in (
        ("sockshare_worker_connections", "connections", "Open connections of a worker."),
        ("sockshare_worker_inflight", "inflight", "Handoffs sent to a worker, not yet answered."),
    ):
        o.family(name, "gauge", help_)
        for w in workers:
            o.sample(name, w.get(key, 0), pool=w["pool"], worker=w["id"])
    o.family("sockshare_worker_up", "gauge", "1 when the worker's channel is connected.")
    for w in workers:
        # (ready, draining and retiring: the states with a channel, see _slots.SlotState;
        # a retiring worker finishes its connections on it)
        o.sample("sockshare_worker_up",
                 1 if w["state"] in ("ready", "draining", "retiring") else 0,
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
        for w in workers:
            o.sample(name, w.get(key, 0), pool=w["pool"], worker=w["id"])
    o.family("sockshare_migration_requests_total", "counter", "Migrations asked of workers.")
    o.sample("sockshare_migration_requests_total", c.get("migration_requests", 0))
    o.family("sockshare_rebalances_total", "counter", "Rebalancing rounds that asked for moves.")
    o.sample("sockshare_rebalances_total", c.get("rebalances", 0))
    o.family("sockshare_drain_unmoved_total", "counter",
             "Retiring workers' drains: connections that could not move and were closed "
             "(closed), workers killed after --grace without progress (killed).")
    o.sample("sockshare_drain_unmoved_total", c.get("drain_closed", 0), result="closed")
    o.sample("sockshare_drain_unmoved_total", c.get("drain_kills", 0), result="killed")
    lat = status.get("migration_latency") or {}
    hist = lat.get("histogram") or Histogram().snapshot()
    name = "sockshare_migration_duration_seconds"
    o.family(name, "histogram",
             "Migration duration, from migrate() called to the target's ACCEPT.")
    for le, n in zip(hist["le"], hist["buckets"], strict=False):
        o.sample(f"{name}_bucket", n, le=repr(float(le)))
    o.sample(f"{name}_bucket", hist["count"], le="+Inf")
    o.sample(f"{name}_sum", hist["sum"])
    o.sample(f"{name}_count", hist["count"])
    o.family("sockshare_migration_latency_seconds", "gauge",
             "DEPRECATED, removed in the next release: use the histogram "
             "sockshare_migration_duration_seconds. Quantiles of the last 2048 migrations.")
    for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
        o.sample("sockshare_migration_latency_seconds", lat.get(key, 0) / 1000, quantile=q)
    o.family("sockshare_reloads_total", "counter", "Reloads (new worker generations).")
    o.sample("sockshare_reloads_total", c.get("reloads", 0), result="ok")
    o.sample("sockshare_reloads_total", c.get("reload_failures", 0), result="failed")
    o.family("sockshare_workers_recycled_total", "counter",
             "Workers replaced at their own request (--max-requests).")
    o.sample("sockshare_workers_recycled_total", c.get("recycled", 0))
    o.family("sockshare_web_moves_total", "counter",
             "Web connections moved to another worker: keep-alive HTTP between requests, "
             "and WebSockets of apps that opt in (docs/web.md).")
    o.sample("sockshare_web_moves_total", c.get("web_keepalive_handed_over", 0), kind="keep-alive")
    o.sample("sockshare_web_moves_total", c.get("web_ws_migrated_out", 0), kind="websocket")
    o.family("sockshare_web_moves_refused_total", "counter",
             "Moves of web connections that no worker took, or that could not move "
             "(TLS in the worker, compression state): they stayed (reasons in the log).")
    o.sample("sockshare_web_moves_refused_total", c.get("web_moves_refused", 0))
    o.family("sockshare_web_websockets_closed_1012_total", "counter",
             "WebSockets closed with 1012 (service restart) at the end of a drain.")
    o.sample("sockshare_web_websockets_closed_1012_total", c.get("web_ws_closed_1012", 0))
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
    ds = status.get("dispatchers")
    if ds:   # --dispatchers N (_feeders)
        names = [("lead" if d["role"] == "lead" else f"feeder{d['id']}", d) for d in ds]
        o.family("sockshare_dispatcher_handoffs_total", "counter",
                 "Handoffs accepted by workers, by the dispatcher process that sent them "
                 "(a restarted feeder counts from 0).")
        for name, d in names:
            o.sample("sockshare_dispatcher_handoffs_total", d.get("handoffs", 0), dispatcher=name)
        o.family("sockshare_dispatcher_cpu_seconds_total", "counter",
                 "CPU time (user + system) of each dispatcher process.")
        for name, d in names:
            o.sample("sockshare_dispatcher_cpu_seconds_total", d.get("cpu", 0), dispatcher=name)
        o.family("sockshare_dispatcher_accepting", "gauge",
                 "1 while the dispatcher process accepts connections.")
        for name, d in names:
            o.sample("sockshare_dispatcher_accepting", int(bool(d.get("accepting"))),
                     dispatcher=name)
    return o.text()


class MetricsServer:
    """``GET /metrics`` on a TCP address, rendered from ``snapshot()`` at each request."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]], *,
                 sock: socket.socket | None = None,
                 health: Callable[[], tuple[str, str]] | None = None) -> None:
        self.host = host
        self.port = port
        self._snapshot = snapshot
        #: ``GET /healthz``: () -> (HTTP status, body); None: 404 (see ``_health``)
        self._health = health
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
            elif parts[1].split(b"?")[0] == b"/healthz" and self._health is not None:
                status, body = self._health()
                ctype = "text/plain; charset=utf-8"
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
