"""Thousands of idle migratable connections through reloads and migrations (issue #19).

* 1,800 idle connections to ``live_apps`` on 2 workers whose server runs under
  ``RLIMIT_NOFILE`` 1,024 (a worker holds at most 934 connections there; 3,000 do not
  fit in 2 workers: the rest are refused, ``queue_full``), through a reload and then a
  ``sockshare migrate`` of all of one worker's connections to the other, which has room
  for 34 of them: nothing is lost, the moves that do not fit are refused and counted,
  every channel survives. Before the fix, the reload lost 1,572 of the 1,800: the old
  workers' ``os.dup`` failed with EMFILE past the first 114 moves of each, and the
  refused handlers were interrupted again at once, in a loop that never yielded.
* 5,000 idle connections moved by a reload with ``--grace 0.5``, far shorter than the
  whole move: none is lost to the clock.
* 8,000 WebSockets of the ASGI demo (numbered messages, every echo checked) moved by a
  reload with ``--grace 0.5``: none dropped, no message lost, duplicated or disordered.
  Before the migration window (``MIGRATION_WINDOW``) every one of them was lost: the
  old workers started all their moves at once, the dispatcher's queue to the new
  workers went past the channel's OUT_LIMIT, it stopped reading their ACCEPTs, nothing
  completed for --grace and the old workers cut every move in flight.
  (benchmarks/scale.py goes to 20,000.)

Real dispatcher, real workers, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, LiveServer, pid_alive, room_for, wait_until
from loadgen import Load

pytestmark = pytest.mark.timeout(180)

APP = "live_apps:handle"




def _follow(c: LineClient) -> dict[str, Any]:
    """The next answer, skipping the "moved" notices of migrations that happened."""
    answer = c.read()
    while "moved" in answer:
        answer = c.read()
    return answer


def _echo_all(clients: list[LineClient], k: int) -> list[dict[str, Any]]:
    """Every client sends ``echo k`` (all first, then all answers are read)."""
    for c in clients:
        c.send(f"echo {k}\n")
    return [_follow(c) for c in clients]


def _pids(st: dict[str, Any]) -> set[int]:
    return {w["pid"] for w in st["workers"] if w["pid"]}


def _open(addr: Any, n: int) -> list[LineClient]:
    clients: list[LineClient] = []
    try:
        for _ in range(n):
            clients.append(LineClient(addr, timeout=60))
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def test_1800_connections_under_1024_descriptors_reload_and_migrate(tmp_path: Path) -> None:
    n = 1800   # 900 a worker: each has room for ~940 under 1,024 descriptors
    room_for(n)
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2, nofile=1024) as srv:
        clients = _open(srv.address(), n)
        try:
            t0 = time.monotonic()
            answers = _echo_all(clients, 1)
            assert all(a["n"] == 1 for a in answers)
            st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == n,
                              what=f"{n} connections counted")
            print(f"opened {n} in {time.monotonic() - t0:.1f} s:",
                  {w["id"]: w["connections"] for w in st["workers"]})
            old = _pids(st)
            t0 = time.monotonic()
            assert srv.command({"cmd": "reload", "wait": True})["ok"]
            wait_until(lambda: not any(pid_alive(p) for p in old), timeout=60,
                       what="the old workers to exit")
            # (the dispatcher learns of an exit a loop turn after the kernel: a process
            # already reaped may still be listed for a moment)
            st = srv.wait_for(lambda st: not _pids(st) & old and len(st["workers"]) == 2,
                              what="the old workers unlisted")
            new = _pids(st)
            assert not new & old
            print(f"reload: {time.monotonic() - t0:.1f} s",
                  {w["id"]: w["connections"] for w in st["workers"]})
            answers = _echo_all(clients, 2)
            assert all(a["n"] == 2 and a["pid"] in new for a in answers)
            assert st["counters"]["migrations_refused"] == 0   # (tried again meanwhile)
            # every connection of the fuller worker to the other, which has no room for
            # all (a reload balances within 1.1, not exactly: 933 / 867 in one CI run,
            # which left the fuller one no room at all)
            assert max(w["connections"] for w in st["workers"]) <= 1.1 * min(
                w["connections"] for w in st["workers"])
            target, source = sorted(st["workers"], key=lambda w: (w["connections"], w["id"]))
            t0 = time.monotonic()
            resp = srv.command({"cmd": "migrate", "from": source["id"], "count": None,
                                "wait": True}, timeout=120)
            assert resp["ok"], resp
            st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == n,
                              what="every move settled")
            by_id = {w["id"]: w for w in st["workers"]}
            took = time.monotonic() - t0
            print(f"migrate: {took:.1f} s", resp,
                  {i: w["connections"] for i, w in by_id.items()},
                  {k: v for k, v in st["counters"].items() if v})
            answers = _echo_all(clients, 3)
            assert all(a["n"] == 3 and a["pid"] in new for a in answers)
            counters = st["counters"]
            assert counters["lost"] == 0
            assert counters["migrations_closed"] == 0
            assert counters["drain_closed"] == 0
            assert counters["drain_kills"] == 0
            assert counters["hung_kills"] == 0
            assert counters["refused"] == 0
            moved = resp["migrated"]
            assert moved > 0
            # (every one the source had)
            assert moved + resp["refused"] == resp["flagged"] == source["connections"]
            assert resp["refused"] > 0   # the target had no room for all
            assert counters["migrations_refused"] == resp["refused"]
            assert took < 8   # (it returns once each one moved or was refused)
            assert by_id[target["id"]]["connections"] <= 944
            for w in st["workers"]:
                assert w["restarts"] == 0, w
                assert w["lost"] == 0, w
                assert w["pid"] in new
            assert "MSG_CTRUNC" not in srv.log()
        finally:
            for c in clients:
                c.close()


def test_5000_connections_reload_with_grace_shorter_than_the_move(tmp_path: Path) -> None:
    n = 5000
    room_for(n)
    with LiveServer(tmp_path, "--no-rebalance", "--grace", "0.5", app=APP, workers=2) as srv:
        clients = _open(srv.address(), n)
        try:
            answers = _echo_all(clients, 1)
            assert all(a["n"] == 1 for a in answers)
            st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == n,
                              what=f"{n} connections counted")
            old = _pids(st)
            t0 = time.monotonic()
            assert srv.command({"cmd": "reload", "wait": True})["ok"]
            wait_until(lambda: not any(pid_alive(p) for p in old), timeout=60,
                       what="the old workers to exit")
            took = time.monotonic() - t0
            # (the dispatcher learns of an exit a loop turn after the kernel: a process
            # already reaped may still be listed for a moment)
            st = srv.wait_for(lambda st: not _pids(st) & old and len(st["workers"]) == 2,
                              what="the old workers unlisted")
            print(f"unlisted {time.monotonic() - t0 - took:.3f} s after the last exit")
            new = _pids(st)
            assert not new & old
            answers = _echo_all(clients, 2)
            assert all(a["n"] == 2 and a["pid"] in new for a in answers)
            counters = st["counters"]
            print(f"{n} connections moved by a reload with --grace 0.5 in {took:.1f} s:",
                  {k: v for k, v in counters.items() if v})
            for key in ("lost", "drain_closed", "drain_kills", "migrations_closed",
                        "migrations_refused", "hung_kills"):
                assert counters[key] == 0, (key, counters)
            assert counters["migrations"] == n
        finally:
            for c in clients:
                c.close()


def _websockets_through_a_reload(srv: LiveServer, n: int) -> tuple[Any, dict[str, Any], float]:
    """``n`` WebSockets of the ASGI demo (numbered messages, every echo checked) opened,
    then a reload: the clients' final snapshot, the server's counters, the reload's
    seconds. Checks what every such test checks: nothing failed, all opened, each moved
    once, nothing lost, no 1012 close, no drain kill."""
    load = Load(srv.address(), short_clients=0, ws_clients=n, ws_period=5.0, timeout=30.0)
    load.start()
    try:
        st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == n,
                          timeout=60, what=f"{n} WebSockets open")
        print("opened:", {w["id"]: w["connections"] for w in st["workers"]})
        wait_until(lambda: load.snapshot().ws_messages >= n, timeout=30,
                   what="an echo on each")
        old = _pids(st)
        t0 = time.monotonic()
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        wait_until(lambda: not any(pid_alive(p) for p in old), timeout=60,
                   what="the old workers to exit")
        took = time.monotonic() - t0
        wait_until(lambda: load.snapshot().moves >= n, timeout=30, what="every move seen")
        time.sleep(5.5)   # (one more message each, on the new workers)
    finally:
        final = load.stop()
    counters: dict[str, Any] = srv.status()["counters"]
    print(f"{n} WebSockets moved by a reload in {took:.1f} s: {final.ws_messages} echoes, "
          f"{final.moves} moves", {k: v for k, v in counters.items() if v})
    assert final.failures() == 0, final
    assert final.ws_opened == n
    assert final.moves == n
    assert counters["lost"] == 0
    assert counters["web_ws_closed_1012"] == 0
    assert counters["drain_kills"] == 0
    return final, counters, took


def test_8000_websockets_reload_with_short_grace(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")
    pytest.importorskip("wsproto")
    n = 8000
    room_for(n)
    with LiveServer(tmp_path, "--no-rebalance", "--grace", "0.5", "--log-level", "warning",
                    app="sockshare.server._demo_asgi:app", workers=2) as srv:
        _websockets_through_a_reload(srv, n)


def test_1800_websockets_under_1024_descriptors_reload(tmp_path: Path) -> None:
    """Two workers of the ASGI demo near their descriptor limit (900 WebSockets each
    under RLIMIT_NOFILE 1,024: a move holds two descriptors on its way, and each has
    fewer than 100 to spare), through a reload with a short --grace: every WebSocket
    moves, a few at a time as descriptors come free. Before, the first moves took the
    spare descriptors, every other move of the drain failed at once (EMFILE on its
    ``dup``, a raw OSError to the app), nothing asked them again, and the drain's end
    closed them all (in benchmarks/scale.py a reload after a migration dropped 19,746
    of 20,000)."""
    pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")
    pytest.importorskip("wsproto")
    n = 1800
    room_for(n)
    with LiveServer(tmp_path, "--no-rebalance", "--grace", "1", "--log-level", "warning",
                    app="sockshare.server._demo_asgi:app", workers=2, nofile=1024) as srv:
        _websockets_through_a_reload(srv, n)
        # (both workers were near the limit: 900 each of the ~940 that fit)
        assert srv.status()["counters"]["migrations"] >= n
