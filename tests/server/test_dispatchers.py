"""``sockshare serve --dispatchers N``: feeder processes beside the dispatcher.

Real processes: the dispatcher (the lead) starts N-1 feeders that accept on the same
listening sockets and hand connections straight to every worker (``_feeders``,
``_feeder``, ``_feedin``). What is shown here:

* the feeders hand connections over (the lead keeps the books and accepts only while no
  feeder does), and least-connections holds over the whole pool (held connections within
  1.1; a few thousand short ones within what one dispatcher gives on this shared box);
  the lead's count of each worker's connections is exact (back to 0), its descriptors
  back to the baseline;
* a worker killed under load: nothing fails but what it had accepted (``lost``);
* a feeder killed under load: the lead accepts meanwhile and restarts it, nothing is
  refused (the kernel's shared accept queue holds what arrives in between);
* reloads and an upgrade under load: no failure; the new generation brings its own
  feeders and the old ones exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, LiveServer, ShortLoad, fd_count, pid_alive, wait_gone, wait_until
from serve_helpers import ask, connect, read_line

from sockshare.server._cli import render_status

pytestmark = pytest.mark.timeout(180)

APP = "live_apps:handle"


def _dispatchers(srv: LiveServer) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = srv.status()["dispatchers"]
    return out


def _feeders_up(srv: LiveServer, n: int) -> list[dict[str, Any]]:
    """Wait until ``n`` feeders accept with a channel to every ready worker."""
    def up() -> list[dict[str, Any]] | None:
        st = srv.status()
        ready = sum(w["state"] == "ready" for w in st["workers"])
        fs = [d for d in st["dispatchers"] if d["role"] == "feeder" and d["up"]
              and d["accepting"] and d["workers"] == ready]
        return fs if len(fs) >= n else None

    out: list[dict[str, Any]] = wait_until(up, timeout=20, what=f"{n} feeder(s) up")
    return out


def _idle(srv: LiveServer) -> dict[str, Any]:
    """Every connection closed: the lead's count of each worker is back to 0."""
    return srv.wait_for(lambda st: all(w["connections"] == 0 for w in st["workers"]),
                        timeout=15, what="every worker's count back to 0")


def test_three_dispatchers_share_the_work_and_balance_holds(tmp_path: Path) -> None:
    """Two feeders accept and hand over; the lead keeps the books and does not accept
    while they do."""
    with LiveServer(tmp_path, "--dispatchers", "3", app=APP, workers=3) as srv:
        addr = srv.address()
        _feeders_up(srv, 2)
        lead = srv.current()
        time.sleep(0.3)
        baseline = fd_count(lead)
        load = ShortLoad(addr, threads=6, limit=3000)
        load.stop.wait(120)
        load.finish()
        assert load.failures == []
        assert load.ok >= 3000
        st = _idle(srv)
        ds = st["dispatchers"]
        assert [d["role"] for d in ds] == ["lead", "feeder", "feeder"]
        time.sleep(0.6)   # (the feeders' next reports)
        ds = _dispatchers(srv)
        assert all(d["handoffs"] > 300 for d in ds[1:]), ds
        assert not ds[0]["accepting"], ds
        shown = render_status(srv.status())
        assert "dispatchers: lead pid" in shown
        assert f"feeder 2 pid {ds[2]['pid']} (accepting) handoffs" in shown
        handoffs = [w["handoffs"] for w in st["workers"]]
        assert sum(handoffs) >= 3000
        # short connections: least-conn evens the *load*, so a worker slowed by the
        # neighbours (2 shared cores) gets fewer; one dispatcher measured 1.03-1.39 here,
        # three 1.36-1.48 in 3 of 16 runs at load average 10+ (with and without the accept
        # window). Placement itself is held to 1.1 with held connections in
        # test_least_conn_over_the_whole_pool; this bound catches a feeder that ignores
        # the others' counts (it would give one worker several times the others' share)
        assert max(handoffs) / min(handoffs) <= 1.6, handoffs
        assert st["counters"]["refused"] == 0
        assert fd_count(lead) <= baseline + 2, (baseline, fd_count(lead))
        print(f"--dispatchers 3: {load.ok} connections, per worker {handoffs}, "
              f"per dispatcher {[(d['role'], d['handoffs'], d['cpu']) for d in ds]}")


def test_least_conn_over_the_whole_pool(tmp_path: Path) -> None:
    """Held connections, one after the other, some through each dispatcher: each worker
    ends with its share (within 1.1: each dispatcher sees the other's connections), and
    the lead's counts are what the clients see. Then a burst of 300 connected at once,
    then asked one by one."""
    with LiveServer(tmp_path, "--dispatchers", "2", app=APP, workers=3) as srv:
        addr = srv.address()
        _feeders_up(srv, 1)
        time.sleep(0.3)
        clients: list[LineClient] = []
        try:
            seen: dict[int, int] = {}
            for _ in range(300):
                clients.append(LineClient(addr))
                wid = clients[-1].ask("who")["id"]
                seen[wid] = seen.get(wid, 0) + 1
            st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 300,
                              timeout=10, what="300 counted")
            counts = {w["id"]: w["connections"] for w in st["workers"]}
            assert counts == seen
            assert max(seen.values()) / min(seen.values()) <= 1.1, (seen, _dispatchers(srv))
            time.sleep(0.6)
            ds = _dispatchers(srv)
            assert ds[1]["handoffs"] > 0, ds
            print(f"300 held connections: per worker {seen}, per dispatcher "
                  f"{[(d['role'], d['handoffs']) for d in ds]}")
        finally:
            for c in clients:
                c.close()
        _idle(srv)
        # (the feeder places with the lead's table of counts, published every 5 ms while
        # they change: on a loaded machine the closes above can reach it after the burst
        # began, and a worker it still counts as busy gets fewer -- 107/86/107 in one CI
        # run. The burst starts from the table that says all are idle.)
        # A burst is placed by both dispatchers at once, each from its own counts and
        # the other's as last published (every 5 ms while they change): on a saturated
        # 2-core machine that table can lag the burst itself (99 / 90 / 111 in one CI
        # run). So a second burst is allowed, after a longer quiet, and one of the two
        # must hold 1.1.
        bursts: list[dict[int, int]] = []
        for quiet in (0.3, 1.0):
            time.sleep(quiet)
            burst = [LineClient(addr) for _ in range(300)]
            try:
                got: dict[int, int] = {}
                for c in burst:
                    wid = c.ask("who")["id"]
                    got[wid] = got.get(wid, 0) + 1
                bursts.append(got)
                print(f"a burst of 300: per worker {got}")
            finally:
                for c in burst:
                    c.close()
            _idle(srv)
            if max(got.values()) / min(got.values()) <= 1.1:
                break
        else:
            raise AssertionError(f"no burst balanced within 1.1: {bursts}")


def test_default_is_one_dispatcher(tmp_path: Path) -> None:
    with LiveServer(tmp_path, app=APP, workers=2) as srv:
        st = srv.status()
        assert "dispatchers" not in st
        assert "feeder" not in srv.log()


def test_a_worker_killed_under_load(tmp_path: Path) -> None:
    """Only what the killed worker had accepted fails; its unanswered handoffs (the
    lead's and the feeder's) go to the others."""
    with LiveServer(tmp_path, "--dispatchers", "2", app=APP, workers=3) as srv:
        addr = srv.address()
        _feeders_up(srv, 1)
        load = ShortLoad(addr, threads=6)
        try:
            wait_until(lambda: load.ok > 300, timeout=30, what="load")
            victim = srv.workers()[2]["pid"]
            os.kill(victim, signal.SIGKILL)
            before = load.ok
            wait_until(lambda: load.ok > before + 600, timeout=60, what="load after the kill")
        finally:
            load.finish()
        st = srv.wait_for(lambda st: sum(w["state"] == "ready" for w in st["workers"]) == 3,
                          timeout=20, what="the worker restarted")
        _idle(srv)
        time.sleep(0.5)   # (the feeder's "gone" report settles what the worker never said)
        st = srv.status()
        lost = st["counters"]["lost"]
        assert len(load.failures) <= lost, (load.failures, lost)
        assert st["counters"]["refused"] == 0
        print(f"worker killed: {len(load.failures)} failure(s), {lost} lost with it, "
              f"{st['counters']['redispatches']} re-dispatched by the lead; dispatchers "
              f"{_dispatchers(srv)}")


def test_a_feeder_killed_under_load_is_restarted(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--dispatchers", "2", app=APP, workers=2) as srv:
        addr = srv.address()
        (feeder,) = _feeders_up(srv, 1)
        lead = srv.current()
        time.sleep(0.3)
        baseline = fd_count(lead)
        load = ShortLoad(addr, threads=4)
        try:
            wait_until(lambda: load.ok > 300, timeout=30, what="load")
            os.kill(feeder["pid"], signal.SIGKILL)
            assert wait_gone(feeder["pid"], 10)
            before = load.ok
            wait_until(lambda: load.ok > before + 300, timeout=30, what="load while it is down")
            (fresh,) = _feeders_up(srv, 1)
            assert fresh["pid"] != feeder["pid"]
            before = load.ok
            wait_until(lambda: load.ok > before + 600, timeout=30, what="load after the restart")
        finally:
            load.finish()
        st = _idle(srv)
        assert st["counters"]["refused"] == 0
        # a connection inside the feeder at the instant of its SIGKILL dies with it (as
        # with a dispatcher killed): a handful at most
        assert len(load.failures) <= 4, load.failures
        time.sleep(0.6)
        ds = _dispatchers(srv)
        assert ds[1]["pid"] == fresh["pid"], ds
        assert ds[1]["handoffs"] > 0, ds
        assert ds[0]["handoffs"] > 0, ds   # the lead accepted while no feeder did
        assert not ds[0]["accepting"], ds
        assert "feeder 1 (pid" in srv.log()
        assert "restarting it" in srv.log()
        assert fd_count(lead) <= baseline + 2, (baseline, fd_count(lead))
        print(f"feeder killed: {len(load.failures)} failure(s) of {load.ok}")


def test_reload_under_load(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--dispatchers", "2", app=APP, workers=2) as srv:
        addr = srv.address()
        _feeders_up(srv, 1)
        load = ShortLoad(addr, threads=4)
        try:
            for _ in range(5):
                assert srv.command({"cmd": "reload", "wait": True})["ok"]
                time.sleep(0.2)
        finally:
            load.finish()
        # (a failure shows the dispatchers' refusal lines: who reset the connection, why)
        assert load.failures == [], (load.failures, [ln for ln in srv.log().splitlines()
                                                      if "refused" in ln][:10])
        assert load.ok > 100
        st = srv.wait_for(lambda st: len(st["workers"]) == 2, timeout=30, what="old workers gone")
        assert st["counters"]["refused"] == 0
        assert st["counters"]["reloads"] == 5
        # (the old workers drained and exited: nothing was lost with them)
        assert st["counters"]["lost"] == 0, [ln for ln in srv.log().splitlines() if "lost" in ln][:10]
        _idle(srv)
        time.sleep(0.6)
        ds = _dispatchers(srv)
        assert ds[1]["handoffs"] > 0, ds
        assert ds[1]["refused"] == 0, ds


def test_a_feeder_stops_handing_to_a_worker_that_drains(tmp_path: Path) -> None:
    """A worker that drains rejects new handoffs ("worker is shutting down"); the
    feeder hears of it from the lead only with the lead's next list (in a reload, a few
    milliseconds later). Meanwhile it must not bounce connections between the draining
    workers until ``--max-retries`` runs out (a reset: what CI saw as 4
    ConnectionResetError in test_reload_under_load): their first such REJECT takes
    them out of its rotation, without an attempt counted, and what no worker takes
    goes to the lead. Made deterministic here: the lead is stopped (SIGSTOP: no new
    list) while both workers drain (SIGTERM, each held open by a connection)."""
    with LiveServer(tmp_path, "--dispatchers", "2", app=APP, workers=2) as srv:
        addr = srv.address()
        _feeders_up(srv, 1)
        lead = srv.current()
        workers = [w["pid"] for w in srv.workers().values()]
        held: list[socket.socket] = []
        clients: list[socket.socket] = []
        try:
            seen: set[int] = set()
            while seen != set(workers) and len(held) < 20:
                held.append(connect(addr))
                held[-1].sendall(b"who\n")
                seen.add(json.loads(read_line(held[-1]))["pid"])
            assert seen == set(workers), (seen, workers)
            os.kill(lead, signal.SIGSTOP)
            try:
                for pid in workers:
                    os.kill(pid, signal.SIGTERM)
                wait_until(lambda: srv.log().count("SIGTERM, draining") >= 2, timeout=10,
                           what="both workers draining")
                for _ in range(4):
                    clients.append(connect(addr))
                    clients[-1].sendall(b"who\n")
                time.sleep(1.0)   # (the bounces took milliseconds)
                for c in clients:   # none reset, none answered: they wait in the lead
                    c.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        c.recv(1)
            finally:
                os.kill(lead, signal.SIGCONT)
            for s in held:
                s.close()
            for c in clients:   # served by the restarted workers
                c.settimeout(30)
                assert b'"pid"' in read_line(c)
        finally:
            for s in held + clients:
                s.close()
        feeder = srv.status()["dispatchers"][1]
        assert feeder["refused"] == 0, feeder
        assert feeder["to_lead"] >= 4, feeder
        assert srv.status()["counters"]["refused"] == 0
        assert "retries_exhausted" not in srv.log()


def test_upgrade_under_load(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--dispatchers", "2", app=APP, workers=2) as srv:
        addr = srv.address()
        (old_feeder,) = _feeders_up(srv, 1)
        old = srv.current()
        load = ShortLoad(addr, threads=4)
        try:
            wait_until(lambda: load.ok > 200, timeout=30, what="load")
            assert srv.command({"cmd": "upgrade", "wait": True}, timeout=90)["ok"]
            assert wait_gone(old, 30)
            assert wait_gone(old_feeder["pid"], 10)
            (new_feeder,) = _feeders_up(srv, 1)
            assert new_feeder["pid"] != old_feeder["pid"]
            before = load.ok
            wait_until(lambda: load.ok > before + 400, timeout=30, what="load after")
        finally:
            load.finish()
        assert load.failures == []
        st = _idle(srv)
        assert st["dispatcher"] != old
        assert st["counters"]["refused"] == 0
        time.sleep(0.6)
        ds = _dispatchers(srv)
        assert ds[1]["handoffs"] > 0, ds
        assert not pid_alive(old_feeder["pid"])


_CONFIG = """
dispatchers = 2
[[listen]]
bind = "127.0.0.1:0"
name = "web"
sniff = true

[pools.main]
app = "serve_apps:app"
workers = 2

[pools.beta]
app = "serve_apps:app"
workers = 1

[[routes]]
host = "*.ROUTE.test"
pool = "beta"
"""


def _http(addr: Any, host: str) -> dict[str, Any]:
    with connect(addr) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        reply: dict[str, Any] = json.loads(read_line(s))
        return reply


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_feeders_sniff_route_and_follow_a_reload_of_the_file(tmp_path: Path) -> None:
    """A feeder sniffs (HTTP Host) and routes like the lead; a reload with --config that
    changes the routes starts the feeders again with the new file; the metrics have a
    series per dispatcher."""
    cfg = tmp_path / "serve.toml"
    cfg.write_text(_CONFIG.replace("ROUTE", "beta"))
    port = _free_port()
    with LiveServer(tmp_path / "srv", "--config", str(cfg), "--metrics", f"127.0.0.1:{port}",
                    app=None, workers=None, bind=[], ready=3) as srv:
        addr = srv.address("web")
        (feeder,) = _feeders_up(srv, 1)
        answers = [_http(addr, "x.beta.test") for _ in range(20)]
        assert {a["pool"] for a in answers} == {"beta"}
        assert {a["meta"]["route"] for a in answers} == {"routes[0]"}
        assert any(a["hid"].startswith(f"{feeder['pid']}.") for a in answers), answers
        assert {_http(addr, "www.example")["pool"] for _ in range(6)} == {"main"}
        time.sleep(0.6)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'sockshare_dispatcher_handoffs_total{dispatcher="feeder1"}' in metrics
        assert 'sockshare_dispatcher_accepting{dispatcher="lead"} 0' in metrics
        # the same file, another route: the feeders start again with it
        cfg.write_text(_CONFIG.replace("ROUTE", "gamma"))
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        (fresh,) = wait_until(lambda: [f for f in _feeders_up(srv, 1) if f["pid"] != feeder["pid"]],
                              timeout=20, what="the feeder started again")
        answers = [_http(addr, "x.gamma.test") for _ in range(20)]
        assert {a["pool"] for a in answers} == {"beta"}, answers
        assert any(a["hid"].startswith(f"{fresh['pid']}.") for a in answers), answers
        assert "exited for the new configuration" in srv.log()
        assert srv.status()["counters"]["refused"] == 0


def test_a_hung_worker_is_killed_for_a_feeders_handoffs(tmp_path: Path) -> None:
    """--timeout: the lead hands nothing over while the feeder accepts, so it is the
    feeder that sees a worker leave its handoffs unanswered; the lead kills that worker
    and the feeder gives them to the other one."""
    with LiveServer(tmp_path, "--dispatchers", "2", "--policy", "round-robin", "--timeout", "1",
                    workers=2) as srv:
        addr = srv.address()
        _feeders_up(srv, 1)
        blocked = connect(addr)
        blocked.sendall(b"block 30\n")
        # (the worker blocks before its "fed" report leaves: the feeder's count says it)
        wait_until(lambda: _dispatchers(srv)[1]["handoffs"] == 1, what="the block accepted")
        t0 = time.monotonic()
        answers = [ask(addr) for _ in range(2)]   # round-robin: one waits for the hung one
        took = time.monotonic() - t0
        assert len({a["id"] for a in answers}) == 1, answers
        hung = 3 - answers[0]["id"]
        assert 0.9 < took < 10, took
        st = srv.wait_for(lambda st: st["workers"][hung - 1]["generation"] == 2
                          and st["workers"][hung - 1]["state"] == "ready",
                          what="the hung worker replaced")
        assert st["counters"]["hung_kills"] == 1
        assert st["counters"]["refused"] == 0
        assert "of feeder 1 unanswered" in srv.log()
        blocked.close()


def test_the_feeders_die_with_the_lead(tmp_path: Path) -> None:
    """SIGKILL the dispatcher: its feeders see EOF on their channel to it and exit."""
    with LiveServer(tmp_path, "--dispatchers", "3", app=APP, workers=1) as srv:
        feeders = [f["pid"] for f in _feeders_up(srv, 2)]
        os.kill(srv.current(), signal.SIGKILL)
        for pid in feeders:
            assert wait_gone(pid, 15), f"feeder {pid} outlived the dispatcher"


def test_an_asgi_app_through_a_feeder(tmp_path: Path) -> None:
    """A web app's worker (``_take_web``) counts a feeder's handoffs in and out too."""
    pytest.importorskip("uvicorn")
    with LiveServer(tmp_path, "--dispatchers", "2", "--interface", "asgi", app="web_apps:asgi",
                    workers=2) as srv:
        _feeders_up(srv, 1)
        host, port = srv.address()
        for _ in range(100):
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as r:
                assert r.status == 200
        _idle(srv)
        # a worker reports a fed connection and its close together: the count of open
        # connections is 0 before and after that report, so wait for the handoffs too
        st = srv.wait_for(lambda st: sum(w["handoffs"] for w in st["workers"]) >= 100,
                          timeout=10, what="100 handoffs counted")
        assert sum(w["handoffs"] for w in st["workers"]) == 100
        assert st["counters"]["refused"] == 0
        time.sleep(0.6)
        assert _dispatchers(srv)[1]["handoffs"] == 100


def test_a_full_pool_queues_at_the_lead(tmp_path: Path) -> None:
    """--max-conns over the whole pool: what a feeder cannot place goes to the lead,
    which queues it until a worker has room."""
    with LiveServer(tmp_path, "--dispatchers", "2", "--max-conns", "2", app=APP,
                    workers=2) as srv:
        addr = srv.address()
        _feeders_up(srv, 1)
        held = []
        for _ in range(4):
            held.append(LineClient(addr))
            held[-1].ask("who")
        st = srv.wait_for(lambda st: [w["connections"] for w in st["workers"]] == [2, 2],
                          what="both workers full")
        waiting = LineClient(addr)
        waiting.send("who\n")
        srv.wait_for(lambda st: st["pools"][0]["queue"] == 1, what="one queued at the lead")
        held.pop(0).close()
        assert waiting.read()["pid"] in {w["pid"] for w in st["workers"]}
        time.sleep(0.6)
        ds = _dispatchers(srv)
        assert ds[0]["from_feeders"] == 1, ds
        assert ds[1]["to_lead"] == 1, ds
        assert srv.status()["counters"]["refused"] == 0
        for c in [*held, waiting]:
            c.close()
        _idle(srv)
