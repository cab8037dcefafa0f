"""Nothing drops: the live benchmark's scenario at CI size (benchmarks/live.py runs it at
full size: 50 reloads, 10 upgrades, 1,000 migrations, 10 SIGKILLs).

Under a steady load of short HTTP connections and long-lived WebSockets that check every
echo (``tests/server/loadgen.py``), against ``sockshare serve`` running the demo app:
reloads, upgrades and migrations refuse, reset, drop, lose or duplicate nothing; SIGKILLs
lose only the killed workers' own connections (the short ones the dispatcher counts as
``lost``, the WebSockets whose last worker was killed); and, to show the measurement can
see failures at all, one naive restart (stop, start) fails plenty.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from loadgen import Load, Scenario, ServeProcess, free_port

pytestmark = pytest.mark.timeout(240)


def test_nothing_drops_under_load(tmp_path: Path) -> None:
    port = free_port()
    server = ServeProcess(port, tmp_path, 2)
    server.start()
    load = Load(("127.0.0.1", port), short_clients=3, short_rate=100.0, ws_clients=10)
    load.start()
    log: list[str] = []
    scen = Scenario(server.control, load, log=log.append)
    try:
        reloads = scen.reloads(5)
        upgrades = scen.upgrades(2)
        migrations = scen.migrations(100)
        kills = scen.kills(2)
        naive = scen.naive_restarts(1, server.stop, server.start)
    finally:
        load.stop()
        server.stop()
    print("\n".join(log))
    for phase in (reloads, upgrades, migrations):
        assert phase["failures"] == 0, phase
        assert phase["ws_messages"] > 0, phase
        assert phase["short_ok"] > 0, phase
    assert migrations["moves"] >= 100
    assert migrations["latency_ms"]["samples"] >= 100
    # kills: only what the killed workers had in hand
    assert kills["ws_killed"] >= 1, kills
    assert kills["lost"] == kills["duplicated"] == kills["disordered"] == kills["n_errors"] == 0, kills
    assert kills["ws_dropped"] == kills["refused"] == 0, kills
    assert kills["reset"] + kills["unanswered"] <= kills["dispatcher_lost"] - kills["ws_killed"], kills
    # the baseline the issue compares against
    assert naive["failures"] > 0, naive
