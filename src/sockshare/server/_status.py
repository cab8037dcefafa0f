"""Status: the snapshot that ``sockshare status``, the control socket and the metrics read.

One function, :func:`snapshot`, reads every part of the dispatcher (listeners, pools,
worker slots, migrations, the upgrade) into a JSON-compatible dict; the metrics page
(:mod:`._metrics`) renders the same dict. Nothing here changes anything.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sockshare.server._slots import SlotState, WorkerSlot

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["percentile", "snapshot", "status_line"]

READY = SlotState.READY


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def snapshot(d: Dispatcher) -> dict[str, Any]:
    """A JSON-compatible snapshot (the control socket's ``status``, the metrics)."""
    now = time.monotonic()
    workers = []
    moving_in: dict[WorkerSlot, int] = {}
    for target, _since in d.migration.moving.values():
        moving_in[target] = moving_in.get(target, 0) + 1
    for s in sorted(d.slots, key=lambda s: (s.id, s.generation)):
        st = s.stats
        workers.append({
            "id": s.id, "pool": s.pool, "pid": s.pid, "generation": s.generation,
            "state": s.state.value, "connections": s.active,
            "inflight": len(s.pending) + len(s.raw) + s.reserved + moving_in.get(s, 0),
            "handoffs": st.handoffs, "rate": round(s.rate, 1), "rejects": st.rejects,
            "returned": st.returned, "restarts": st.restarts, "lost": st.lost,
            "migrated_in": st.migrated_in, "migrated_out": st.migrated_out,
            "accepted_here": st.accepted_here,
            "resume": s.can_resume, "retiring": s.retired, "fd_full": s.fd_full,
            "uptime": round(now - s.started, 1) if s.pid else 0.0,
        })
    counters: dict[str, Any] = dict(d.counters)
    counters["refused"] = sum(d.admission.refused.values())
    counters["refused_by_reason"] = dict(d.admission.refused)
    # accept bursts, and those that waited the accept window (docs/perf-dispatcher.md)
    counters["accept_bursts"] = getattr(d.listeners, "bursts", 0)
    counters["accept_windows"] = getattr(d.listeners, "windows", 0)
    lat = list(d.migration.latencies)
    return {
        # the pid to watch and signal: the master's (the same through upgrades), else ours
        "pid": d.master or d.pid,
        "dispatcher": d.pid,
        "master": d.master or None,
        "argv": d.argv,
        "ready": d.ready,
        "started": d.started_wall,
        "uptime": round(now - d.started, 1),
        "stopping": d.stopping,
        "generation": d.generation,
        "handed_over": d.handover.handed_over,
        "predecessor": d.takeover.predecessor or None,
        "successor": d.handover.successor.pid if d.handover.successor is not None else None,
        "channel": d.chan_path,
        "control": d.control.path if d.control else None,
        "metrics": (f"{d.metrics.host}:{d.metrics.port}" if d.metrics else None),
        "agent": (f"{d.health.host}:{d.health.port}" if d.health.serving else None),
        "listeners": [{"name": ls.cfg.name, "bind": ls.cfg.bind.text, "address": ls.address,
                       "sniff": ls.cfg.sniffs and d.listeners.sniff is not None,
                       "accepted": ls.accepted} for ls in d.listeners.all],
        "pools": [{"name": p.cfg.name, "policy": p.cfg.policy, "workers": len(p.workers),
                   "max_conns": p.cfg.max_conns, "queue": len(p.queue),
                   "queue_limit": p.cfg.queue, "rebalance": p.rebalance,
                   "app": p.cfg.app, "worker_cmd": p.cfg.worker_cmd}
                  for p in d.pools.values()],
        "workers": workers,
        "counters": counters,
        "migration_latency": {"samples": len(lat),
                              "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
                              "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
                              "histogram": d.migration.latency_histogram.snapshot()},
    }

def status_line(d: Dispatcher) -> str:
    up = sum(s.state is READY for s in d.slots)
    return (f"{up} worker(s) ready, generation {d.generation}, "
            f"{d.counters['migrations']} migration(s)")
