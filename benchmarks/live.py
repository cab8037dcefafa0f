"""Benchmark: live connections that never drop -- reloads, upgrades, migrations, crashes.

Run:  python benchmarks/live.py [--reloads 50] [--upgrades 10] [--migrations 1000]
                                [--kills 10] [--naive 10] [--ws 20] [--short-rate 200]
                                [--relay]

What it does: starts ``sockshare serve`` (the built-in demo app, 2 workers) on a free port
of 127.0.0.1 and puts it under a steady load (tests/server/loadgen.py): short
``GET /whoami`` connections (``--short-rate`` per second from 4 clients) and ``--ws``
long-lived WebSocket connections, each sending a numbered message every 50 ms and
checking every echo (order, counter, nothing lost, nothing twice). Then, one phase after
the other under that load:

* ``reloads``     -- ``sockshare reload`` N times, each waited for (new workers, the
  old ones migrate their connections and exit);
* ``upgrades``    -- ``sockshare upgrade`` N times (a new dispatcher process takes over
  the listeners; its predecessor's workers migrate their connections to the new ones);
* ``migrations``  -- N WebSocket clients ask ``{"cmd": "move"}``: the demo migrates the
  connection to the other worker; the latency is the new worker's ``latency_ms``, from
  ``migrate()`` being called on the old worker to ``resume`` starting on the new one
  (CLOCK_MONOTONIC is system-wide). They go straight from worker to worker; with
  ``--relay`` through the dispatcher (the A/B of the two paths);
* ``kills``       -- a random worker SIGKILLed N times (its own connections die with it:
  they are counted apart, as ``ws_killed``/``killed_lost``, and the short connections it
  held show as resets, which the dispatcher counts as ``lost``);
* ``naive``       -- the baseline: N times, stop the server (SIGTERM, graceful) and start
  it again on the same port, as a plain restart would.

Per phase it reports failed connections (refused, reset, unanswered), WebSocket
connections dropped, messages lost or duplicated; the target is zero everywhere but the
killed workers' own connections, and a migration p99 under 1 ms. Prints a table and the
command line, and writes benchmarks/results/live.json. A benchmark, not a test (the CI
test is tests/server/test_live_load.py, with smaller counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "server"))   # the load generator, shared with its test

from loadgen import Load, Scenario, ServeProcess, free_port  # noqa: E402


def table(results: dict[str, dict[str, Any]]) -> str:
    cols = ("phase", "count", "secs", "short ok", "refused", "reset", "unansw.", "ws msgs",
            "lost", "dup", "disord", "ws drop", "killed ws", "killed lost", "moves", "FAILURES")
    rows = [cols]
    for name, r in results.items():
        rows.append((name, str(r["count"]), f"{r['seconds']:.1f}", str(r["short_ok"]), str(r["refused"]),
                     str(r["reset"]), str(r["unanswered"]), str(r["ws_messages"]), str(r["lost"]),
                     str(r["duplicated"]), str(r["disordered"]), str(r["ws_dropped"]),
                     str(r["ws_killed"]), str(r["killed_lost"]), str(r["moves"]),
                     str(r["failures"] if name != "kills" else r["explained_failures"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(widths[i]) if i else c.ljust(widths[i])
                               for i, c in enumerate(row)) for row in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reloads", type=int, default=50)
    ap.add_argument("--upgrades", type=int, default=10)
    ap.add_argument("--migrations", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--naive", type=int, default=10)
    ap.add_argument("--ws", type=int, default=20)
    ap.add_argument("--short-rate", type=float, default=200.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "live.json"))
    ap.add_argument("--src", default=str(ROOT / "src"),
                    help="the sockshare source tree the server runs (e.g. an exported commit, "
                         "for an A/B against this one)")
    ap.add_argument("--relay", action="store_true",
                    help="serve with --no-direct-migration: every migration relayed by the "
                         "dispatcher (two hops), to compare with the default direct one")
    args = ap.parse_args()
    command = shlex.join(["python", *sys.argv])

    tmp = Path(tempfile.mkdtemp(prefix="ss-live-"))
    port = free_port()
    server = ServeProcess(port, tmp, args.workers, pythonpath=str(Path(args.src).resolve()),
                          extra=("--no-direct-migration",) if args.relay else ())
    server.start()
    load = Load(("127.0.0.1", port), short_clients=4, short_rate=args.short_rate, ws_clients=args.ws)
    load.start()
    scen = Scenario(server.control, load, log=lambda m: print(m, file=sys.stderr))
    t0 = time.monotonic()
    try:
        time.sleep(1.0)   # warm-up: every WebSocket open
        scen.reloads(args.reloads)
        scen.upgrades(args.upgrades)
        scen.migrations(args.migrations)
        kills = scen.kills(args.kills)
        # what a kill may break: the killed workers' own connections. Short connections
        # they held show as resets/EOF; the dispatcher counts them (with the WebSockets)
        # in "lost".
        lost = kills["dispatcher_lost"] or 0
        short_casualties = kills["reset"] + kills["unanswered"]
        kills["explained_failures"] = max(0, kills["failures"] - short_casualties) + max(
            0, short_casualties - max(0, lost - kills["ws_killed"]))
        scen.naive_restarts(args.naive, server.stop, server.start)
    finally:
        final = load.stop()
        server.stop()
    results = scen.results
    mig = results["migrations"].get("latency_ms", {})
    out = {
        "command": command,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "duration_s": round(time.monotonic() - t0, 1),
        "load": {"ws_clients": args.ws, "ws_period_s": 0.05, "short_rate_per_s": args.short_rate,
                 "workers": args.workers, "migration": "relayed" if args.relay else "direct"},
        "phases": results,
        "migration_latency_ms": mig,
        "totals": {"short_ok": final.short_ok, "ws_messages": final.ws_messages,
                   "moves_seen": final.moves},
        "targets": {
            "zero_failures_outside_kills": all(
                r["failures"] == 0 for k, r in results.items() if k not in ("kills", "naive_restarts")),
            "kills_only_killed_connections": results["kills"]["explained_failures"] == 0,
            "migration_p99_under_1ms": bool(mig) and mig["p99"] < 1.0,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    print()
    if mig:
        print(f"migration latency (migrate() on the old worker -> resume() on the new one): "
              f"p50 {mig['p50']:.3f} ms, p99 {mig['p99']:.3f} ms, max {mig['max']:.3f} ms "
              f"over {mig['samples']} migrations")
    print(f"targets: {out['targets']}")
    print(f"command: {command}")
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
