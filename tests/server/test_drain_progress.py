"""Drains that go by progress, descriptors as a resource, waiting CLI commands, fast
rebalancing (issue #19).

* A reload with ``--grace 1`` while 1,500 idle migratable connections move, and ten busy
  ones finish their request one by one over 4 s before they move: none is lost to the
  clock (``--grace`` bounds the time *without* progress), every client is still
  answered, by the new generation.
* ``migrate()`` in a worker out of descriptors (EMFILE from ``os.dup``) raises
  ``MigrationRefused``, counted by the dispatcher; the connection goes on where it was.
* ``sockshare reload`` returns only once the old workers are gone, printing progress
  lines (stdout is a pipe here: plain lines).
* 600 connections piled on one worker even out within a few seconds, and a connection
  that stays keeps being answered meanwhile (20-60 ms at worst here).
* A web app's drain goes by progress too: requests in progress that finish one by one
  over 4 s with ``--grace 1`` all complete, and their keep-alive connections move.

Real dispatcher, real workers, real sockets on 127.0.0.1 (``live_apps``).
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, LiveServer, pid_alive, room_for, wait_until
from serve_helpers import ROOT, env_with_apps

pytestmark = pytest.mark.timeout(240)

APP = "live_apps:handle"




def _follow(c: LineClient, cmd: str) -> dict[str, Any]:
    """Ask ``cmd``, skipping the "moved" notices of migrations that happened."""
    answer = c.ask(cmd)
    while "moved" in answer:
        answer = c.read()
    return answer


def _old_pids(st: dict[str, Any]) -> set[int]:
    return {w["pid"] for w in st["workers"] if w["pid"]}


def test_reload_with_short_grace_loses_none_of_1500_moving_connections(tmp_path: Path) -> None:
    n = 1500
    room_for(n)
    with LiveServer(tmp_path, "--grace", "1", "--no-rebalance", app=APP, workers=2) as srv:
        addr = srv.address()
        clients = [LineClient(addr, timeout=30) for _ in range(n)]
        try:
            for c in clients:
                assert c.ask("echo 1")["n"] == 1
            st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == n,
                              what=f"{n} connections counted")
            old = _old_pids(st)
            # ten of them busy, finishing one by one every 0.4 s up to 4 s: the drain
            # makes progress all along, so none is cut at 1 s (the old clock)
            busy = clients[:10]
            for k, c in enumerate(busy, 1):
                c.send(f"stall {0.4 * k:.1f}\n")
            started = time.monotonic()
            assert srv.command({"cmd": "reload", "wait": True})["ok"]
            wait_until(lambda: not any(pid_alive(p) for p in old), timeout=120,
                       what="the old workers to exit")
            took = time.monotonic() - started
            # (the dispatcher learns of an exit a loop turn after the kernel: a process
            # already reaped may still be listed for a moment)
            st = srv.wait_for(lambda st: not _old_pids(st) & old, what="the old workers unlisted")
            new = _old_pids(st)
            assert not new & old
            for k, c in enumerate(busy, 1):
                assert c.read()["stalled"] == round(0.4 * k, 1)
            for i, c in enumerate(clients):
                answer = _follow(c, "echo 2")
                assert answer["n"] == 2, (i, answer)
                assert answer["pid"] in new, (i, answer)
            counters = st["counters"]
            assert counters["lost"] == 0
            assert counters["drain_closed"] == 0
            assert counters["drain_kills"] == 0
            assert counters["migrations"] >= n
            print(f"{n} connections moved by a reload with --grace 1 in {took:.1f} s")
        finally:
            for c in clients:
                c.close()


def test_migrate_out_of_descriptors_is_refused_and_counted(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        try:
            pid = c.ask("echo 1")["pid"]
            answer = c.ask("tightmove")
            assert answer["pid"] == pid
            assert "cannot duplicate the connection's descriptor" in answer["refused"]
            again = c.ask("echo 2")
            assert (again["pid"], again["n"]) == (pid, 2)   # still served, where it was
            srv.wait_for(lambda st: st["counters"]["migrations_refused"] == 1,
                         what="the refusal counted")
            moved = c.ask("move")   # the limit is back: it moves now
            assert moved["moved"]
            assert moved["from"] == pid
        finally:
            c.close()
        log = srv.log()
        assert "RLIMIT_NOFILE soft" in log   # the dispatcher and the workers said it


def test_cli_reload_returns_once_the_old_workers_are_gone(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2) as srv:
        addr = srv.address()
        clients = [LineClient(addr) for _ in range(40)]
        try:
            for c in clients:
                c.ask("echo 1")
            old = _old_pids(srv.status())
            clients[0].send("stall 1.5\n")   # busy: its old worker lingers until it answers
            time.sleep(0.1)
            out = subprocess.run([sys.executable, "-m", "sockshare.cli", "reload", "--control",
                                  srv.control], check=False, capture_output=True, text=True,
                                 timeout=60, env=env_with_apps(), cwd=str(ROOT))
            assert out.returncode == 0, out.stderr
            assert not any(pid_alive(p) for p in old), out.stdout   # gone when it returned
            assert "generation 2 serving" in out.stdout
            assert "left on the old workers" in out.stdout
            assert "old workers gone: 40 connection(s) moved, 0 closed" in out.stdout
            assert clients[0].read()["stalled"] == 1.5
            for c in clients:
                assert _follow(c, "echo 2")["n"] == 2
        finally:
            for c in clients:
                c.close()


def test_rebalancing_evens_out_600_connections_in_seconds(tmp_path: Path) -> None:
    n = 600
    room_for(n)
    with LiveServer(tmp_path, "--policy", "serve_apps:pick_last", app=APP, workers=2) as srv:
        addr = srv.address()
        probe = LineClient(addr)   # stays where it is: its answers must not lag
        assert probe.ask("nomove")["migratable"] is False
        clients = [LineClient(addr, timeout=30) for _ in range(n)]
        lags: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                probe.ask("who")
                lags.append(time.monotonic() - t0)
                time.sleep(0.005)

        pinger = threading.Thread(target=ping)
        try:
            for c in clients:
                c.send("echo 1\n")
            for c in clients:
                assert c.read()["n"] == 1
            opened = time.monotonic()
            pinger.start()
            st = srv.wait_for(lambda st: all(w["connections"] >= n // 2 - 20
                                             for w in st["workers"]),
                              timeout=8, what="the load to even out")
            took = time.monotonic() - opened
            time.sleep(0.2)
            stop.set()
            pinger.join(10)
            assert lags
            assert max(lags) < 1.0, max(lags)   # (2 shared cores: generous)
            srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == n + 1,
                         what="every move settled")
            for c in clients:
                assert _follow(c, "echo 2")["n"] == 2
            print(f"{n} connections evened out {took:.1f} s after they were open: "
                  f"{[w['connections'] for w in st['workers']]}; a connection that stayed "
                  f"answered in {max(lags) * 1000:.1f} ms at worst ({len(lags)} pings)")
        finally:
            stop.set()
            for c in clients:
                c.close()
            probe.close()


def test_web_drain_goes_on_while_requests_finish_one_by_one(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="pip install 'sockshare[asgi]' (or the test extra)")
    with LiveServer(tmp_path, "--grace", "1", app="web_apps:asgi", workers=2) as srv:
        host, port = srv.address()
        conns = [http.client.HTTPConnection(host, port, timeout=30) for _ in range(8)]
        results: dict[int, tuple[int, int]] = {}
        failures: list[str] = []

        def run(i: int, c: http.client.HTTPConnection) -> None:
            try:
                c.request("GET", f"/sleep?s={0.5 * (i + 1)}")
                r = c.getresponse()
                first = int(r.read().decode().split()[0])
                c.request("GET", "/")   # the same connection, moved meanwhile
                r = c.getresponse()
                results[i] = (first, int(r.read().decode().split()[0]))
            except Exception as exc:
                failures.append(f"connection {i}: {exc!r}")

        try:
            for c in conns:   # connected (and served once) before the reload
                c.request("GET", "/")
                c.getresponse().read()
            old = _old_pids(srv.status())
            threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(conns)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            assert srv.command({"cmd": "reload", "wait": True})["ok"]
            for t in threads:
                t.join(30)
            assert failures == []
            assert len(results) == len(conns)
            assert all(first in old for first, _then in results.values()), results
            # (the first ones may finish before the new workers are ready; the later ones
            # finish while their worker drains, and move)
            assert sum(then not in old for _first, then in results.values()) >= 4, results
            wait_until(lambda: not any(pid_alive(p) for p in old), timeout=30,
                       what="the old workers to exit")
            assert srv.status()["counters"]["drain_kills"] == 0
        finally:
            for c in conns:
                c.close()
