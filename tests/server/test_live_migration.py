"""Live migration between workers: ``await conn.migrate(state)`` and ``resume(conn, state)``.

Real dispatcher, real workers, real sockets on 127.0.0.1, the ``live_apps`` line protocol.
A migrated connection keeps its socket (the client never reconnects), every byte the
source had read but not consumed, and its state (the message counter ``n`` goes on);
bad states and failing resume handlers close the connection cleanly and leave the
workers running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_helpers import LineClient, LiveServer, is_clean_eof, wait_until
from serve_helpers import ROOT, env_with_apps

pytestmark = pytest.mark.timeout(120)

APP = "live_apps:handle"


def test_migration_carries_state_and_unread_bytes(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        first = c.ask("echo a")
        assert first["n"] == 1
        # "echo b" and "echo c" arrive with "move": read by the source, not consumed
        c.send("move\necho b\necho c\n")
        moved = c.read()
        assert moved["moved"] is True
        assert moved["from"] == first["pid"]
        assert moved["pid"] != first["pid"]
        assert moved["n"] == 1
        assert moved["count"] == 1
        b, cc = c.read(), c.read()
        assert (b["echo"], b["n"], b["pid"]) == ("b", 2, moved["pid"])
        assert (cc["echo"], cc["n"], cc["pid"]) == ("c", 3, moved["pid"])
        # (a direct migration reaches the dispatcher's counts in the workers' next reports)
        st = srv.wait_for(lambda st: st["counters"]["migrations"] == 1
                          and sum(w["migrated_out"] for w in st["workers"]) == 1, what="counted")
        assert st["counters"]["migrations_direct"] == 1
        assert st["counters"]["lost"] == 0
        by_pid = {w["pid"]: w for w in st["workers"]}
        assert by_pid[first["pid"]]["migrated_out"] == 1
        assert by_pid[moved["pid"]]["migrated_in"] == 1
        # exactly one worker counts the connection
        assert by_pid[first["pid"]]["connections"] == 0
        assert by_pid[moved["pid"]]["connections"] == 1
        c.close()


def test_two_hundred_migrations_keep_every_message_in_order(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=3) as srv:
        c = LineClient(srv.address())
        try:
            pids = [c.ask("echo 0")["pid"]]
            latencies = []
            for i in range(1, 201):
                c.send(f"move\necho {i}\n")
                moved = c.read()
                assert moved["moved"], moved
                assert moved["from"] == pids[-1], moved
                echo = c.read()
                assert (echo["echo"], echo["n"], echo["pid"]) == (str(i), i + 1, moved["pid"])
                pids.append(moved["pid"])
                latencies.append(moved["latency_us"])
            assert len(set(pids)) == 3
            # (direct migrations reach the dispatcher's counts in the workers' next
            # reports: the source's moved_out and the target's moved_in come apart)
            st = srv.wait_for(lambda st: st["counters"]["migrations"] == 200
                              and st["migration_latency"]["samples"] == 200
                              and sum(w["connections"] for w in st["workers"]) == 1,
                              what="200 counted, one connection open")
            assert st["counters"]["migrations_refused"] == 0
            latencies.sort()
            print(f"migration latency (migrate() -> resume): p50 {latencies[100]:.0f} us, "
                  f"p99 {latencies[197]:.0f} us")
        finally:
            c.close()


@pytest.mark.parametrize(("cmd", "error"), [
    ("big", "over the limit of 12288 bytes"),
    ("badstate", "must be JSON-compatible"),
])
def test_bad_state_closes_cleanly_and_the_worker_survives(tmp_path: Path, cmd: str, error: str) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=1) as srv:
        c = LineClient(srv.address())
        pid = c.ask("echo a")["pid"]
        c.send(cmd + "\n")
        assert is_clean_eof(c), "closed with a FIN, nothing half-sent"
        c.close()
        log = wait_until(lambda: error in srv.log() and srv.log(), what="the error in the log")
        assert "StateError" in log
        c2 = LineClient(srv.address())
        assert c2.ask("echo b")["pid"] == pid
        c2.close()
        st = srv.wait_for(lambda st: st["workers"][0]["connections"] == 0, what="close reported")
        assert st["counters"]["migrations"] == 0
        assert st["workers"][0]["restarts"] == 0


def test_resume_handler_that_raises(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        before = {w["id"]: w["pid"] for w in srv.status()["workers"]}
        c.ask("echo a")
        c.send("boom\n")
        assert is_clean_eof(c)
        c.close()
        wait_until(lambda: "resume handler failed" in srv.log(), what="the failure logged")
        assert "resume was told to fail" in srv.log()
        # (the target's moved_in report may come after the source's moved_out: wait for both)
        st = srv.wait_for(lambda st: all(w["connections"] == 0 for w in st["workers"])
                          and st["counters"]["migrations"] == 1,
                          what="no connection left, the migration counted")
        assert {w["id"]: w["pid"] for w in st["workers"]} == before
        assert st["counters"]["lost"] == 0


def test_without_a_resume_handler_nothing_migrates(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", "--resume", "-", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        wid = c.ask("echo a")["id"]
        assert all(not w["resume"] for w in srv.status()["workers"])
        resp = srv.command({"cmd": "migrate", "from": wid, "count": 1})
        assert not resp["ok"]
        assert "no resume handler" in resp["error"]
        c.send("move\n")   # the handler tries anyway: MigrationUnsupported ends it
        assert is_clean_eof(c)
        wait_until(lambda: "MigrationUnsupported" in srv.log(), what="the error logged")
        c.close()


def test_refused_when_no_other_worker_and_the_connection_goes_on(tmp_path: Path) -> None:
    with LiveServer(tmp_path, app=APP, workers=1) as srv:
        c = LineClient(srv.address())
        pid = c.ask("echo a")["pid"]
        refused = c.ask("move")
        assert "no other worker" in refused["refused"]
        assert c.ask("echo b") == {"n": 2, "pid": pid, "id": 1, "echo": "b"}
        assert srv.status()["counters"]["migrations_refused"] == 1
        c.close()


def test_sockshare_migrate_command(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", "--policy", "serve_apps:pick_last", app=APP,
                    workers=2) as srv:
        clients = [LineClient(srv.address()) for _ in range(6)]
        for c in clients:
            assert c.ask("echo a")["id"] == 2
        out = subprocess.run(
            [sys.executable, "-m", "sockshare.cli", "migrate", "--from", "2", "--count", "4",
             "--control", srv.control], check=False, capture_output=True, text=True, timeout=60,
            env=env_with_apps(), cwd=str(ROOT))
        assert out.returncode == 0, out.stderr
        assert "4 connection(s) asked to move, 4 migrated" in out.stdout
        st = srv.status()
        assert [w["connections"] for w in st["workers"]] == [4, 2]
        assert st["counters"]["migration_requests"] == 1
        moved = 0
        for c in clients:
            first = c.ask("echo b")
            if "moved" in first:
                assert first["reason"] == "request"
                moved += 1
                first = c.read()
            assert first["n"] == 2
        assert moved == 4
        bad = subprocess.run(
            [sys.executable, "-m", "sockshare.cli", "migrate", "--from", "9", "--control", srv.control],
            check=False, capture_output=True, text=True, timeout=60, env=env_with_apps(), cwd=str(ROOT))
        assert bad.returncode == 1
        assert "worker 9 is not a ready worker" in bad.stderr
        for c in clients:
            c.close()


def test_rebalancing_moves_connections_off_the_busy_worker(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--policy", "serve_apps:pick_last", app=APP, workers=2) as srv:
        clients = [LineClient(srv.address()) for _ in range(12)]
        for c in clients:
            assert c.ask("echo a")["id"] == 2   # the policy piles them up on worker 2
        st = srv.wait_for(lambda st: st["workers"][0]["connections"] >= 5, timeout=15,
                          what="the rebalancer to move connections to worker 1")
        assert st["counters"]["rebalances"] >= 1
        assert abs(st["workers"][0]["connections"] - st["workers"][1]["connections"]) <= 2
        for c in clients:
            answer = c.ask("echo b")
            if "moved" in answer:
                assert answer["reason"] == "rebalance"
                answer = c.read()
            assert answer["n"] == 2
            c.close()


def test_not_migratable_connections_are_drained_on_reload(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=1) as srv:
        mover, stayer = LineClient(srv.address()), LineClient(srv.address())
        old = mover.ask("echo a")["pid"]
        assert stayer.ask("nomove") == {"migratable": False, "pid": old}
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        moved = mover.read()
        assert moved["moved"]
        assert moved["from"] == old
        assert moved["reason"] == "reload"
        assert mover.ask("echo b")["n"] == 2
        # the other one is still served by the old worker, which drains
        assert stayer.ask("echo c") == {"n": 1, "pid": old, "id": 1, "echo": "c"}
        st = srv.status()
        assert [w["state"] for w in st["workers"]] == ["retiring", "ready"]
        stayer.close()
        srv.wait_for(lambda st: len(st["workers"]) == 1, what="the old worker to exit")
        mover.close()


def test_status_and_metrics_count_migrations_reloads(tmp_path: Path) -> None:
    import urllib.request

    with LiveServer(tmp_path, "--no-rebalance", "--metrics", "127.0.0.1:0", app=APP,
                    workers=2) as srv:
        c = LineClient(srv.address())
        c.ask("echo a")
        assert c.ask("move")["moved"]
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        assert c.read()["reason"] == "reload"
        # (a direct move is counted from the workers' reports, which come within ms)
        st = srv.wait_for(lambda st: st["counters"]["migrations"] == 2
                          and st["migration_latency"]["samples"] == 2,
                          what="both moves counted")
        assert st["generation"] == 2
        assert st["counters"]["reloads"] == 1
        host, port = st["metrics"].split(":")
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'sockshare_migrations_total{result="ok"} 2' in text
        # the handler's own move went straight to the other worker, and the reload's to
        # the new one (unless a peer channel was still opening: then relayed)
        direct = st["counters"]["migrations_direct"]
        assert direct <= 2
        assert f"sockshare_migrations_direct_total {direct}" in text
        assert 'sockshare_reloads_total{result="ok"} 1' in text
        assert "sockshare_generation 2" in text
        assert "sockshare_migration_duration_seconds_count 2" in text
        assert "sockshare_migrations_in_total{" in text
        # one series per worker id, even while a retiring process shares the id
        lines = [ln for ln in text.splitlines() if ln.startswith("sockshare_handoffs_accepted_total{")]
        assert len(lines) == len({ln.split(" ")[0] for ln in lines}) == 2
        out = subprocess.run([sys.executable, "-m", "sockshare.cli", "status", "--control", srv.control],
                             check=False, capture_output=True, text=True, timeout=60,
                             env=env_with_apps(), cwd=str(ROOT))
        assert f"migrations 2 (direct {direct}," in out.stdout
        assert "reloads 1" in out.stdout
        assert "MIG IN" in out.stdout
        c.close()


def test_migration_to_a_hung_worker_comes_back(tmp_path: Path) -> None:
    """The only possible target is hung (its event loop blocked): the migration waits
    for its answer until --timeout, the hung worker is killed, and the connection is
    the source's again (MigrationRefused), served on as if nothing had happened."""
    with LiveServer(tmp_path, "--no-rebalance", "--timeout", "1", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        first = c.ask("echo a")
        blocker = LineClient(srv.address())
        assert blocker.ask("who")["pid"] != first["pid"]
        blocker.send("block 60\n")
        time.sleep(0.3)  # the other worker reads it and blocks
        refused = c.ask("move")
        assert "refused" in refused, refused
        assert refused["pid"] == first["pid"]
        assert c.ask("echo b") == {"n": 2, "pid": first["pid"], "id": first["id"], "echo": "b"}
        st = srv.status()
        assert st["counters"]["hung_kills"] == 1
        assert st["counters"]["migrations"] == 0
        assert st["counters"]["migrations_refused"] == 1
        c.close()
        blocker.close()


def test_relayed_when_direct_migration_is_off(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", "--no-direct-migration", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        first = c.ask("echo a")
        moved = c.ask("move")
        assert moved["moved"]
        assert moved["pid"] != first["pid"]
        assert c.ask("echo b")["n"] == 2
        st = srv.wait_for(lambda st: st["counters"]["migrations"] == 1, what="counted")
        assert st["counters"]["migrations_direct"] == 0
        c.close()


def test_direct_migrations_follow_restarts_and_reloads(tmp_path: Path) -> None:
    """The dispatcher keeps every worker's list of peers current: after a worker is
    SIGKILLed and restarted, and after a reload, handler migrations still go straight to
    the (new) other worker, and exactly one worker counts each connection."""
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        first = c.ask("echo a")
        st = srv.status()
        victim = next(w["pid"] for w in st["workers"] if w["pid"] != first["pid"])
        victim_peer = os.path.join(os.path.dirname(st["channel"]), f"{victim}.peer")
        assert os.path.exists(victim_peer)
        os.kill(victim, signal.SIGKILL)
        st = srv.wait_for(lambda st: all(w["state"] == "ready" and w["pid"] not in (None, victim)
                                         for w in st["workers"]) and len(st["workers"]) == 2,
                          what="the killed worker restarted")
        assert not os.path.exists(victim_peer)   # the dispatcher removed what it left
        n = 1

        def direct_move() -> int:
            """Move until one goes direct (right after a restart or a reload the peers'
            channels may still be opening: those moves are relayed, which is fine); the
            pid of the worker it went to."""
            nonlocal n
            for _ in range(20):
                before = srv.status()["counters"]
                here = c.ask("who")["pid"]
                moved = c.ask("move")
                assert moved["moved"], moved
                assert moved["pid"] != here, moved
                n += 1
                assert c.ask("echo x")["n"] == n     # nothing lost, nothing twice
                # counted once, one way or the other (the workers report within ms)
                st = srv.wait_for(lambda st, b=before: st["counters"]["migrations"]
                                  == b["migrations"] + 1, what="counted")
                if st["counters"]["migrations_direct"] == before["migrations_direct"] + 1:
                    return int(moved["pid"])
                time.sleep(0.1)
            raise AssertionError("no migration went direct")

        fresh = next(w["pid"] for w in st["workers"] if w["pid"] != first["pid"])
        pids = {direct_move() for _ in range(2)}
        assert fresh in pids     # the restarted worker takes direct migrations
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        assert c.read()["reason"] == "reload"      # the reload moved it
        n += 1
        assert c.ask("echo y")["n"] == n
        st = srv.wait_for(lambda st: len(st["workers"]) == 2 and all(
            w["state"] == "ready" and not w["retiring"] for w in st["workers"]), what="reloaded")
        new_pids = {w["pid"] for w in st["workers"]}
        went = direct_move()
        assert went in new_pids
        st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 1
                          and {w["pid"] for w in st["workers"]} == new_pids, what="counted")
        assert {w["pid"]: w["connections"] for w in st["workers"]} == {
            p: int(p == went) for p in new_pids}
        c.close()
        srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 0, what="closed")


def test_a_peer_socket_takes_only_migrating_connections(tmp_path: Path) -> None:
    """A worker's peer socket (``<pid>.peer`` beside the dispatcher's channel, same uid
    only) is a handoff channel like any other: a plain connection is rejected with a
    reason and stays the sender's; one that carries a resume state is resumed."""
    import socket as _socket

    import sockshare

    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=1) as srv:
        st = srv.status()
        pid = st["workers"][0]["pid"]
        path = os.path.join(os.path.dirname(st["channel"]), f"{pid}.peer")
        assert os.path.exists(path)
        assert os.stat(path).st_mode & 0o077 == 0
        server = _socket.create_server(("127.0.0.1", 0))
        client = _socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        try:
            with sockshare.Channel.connect(path, name="test") as ch:
                t = ch.send(conn, meta={"client": ["127.0.0.1", 1]}, data=b"")
                assert t.wait(10) is False
                assert t.state == "rejected"
                assert "migrates" in t.reason
                assert t.socket is not None     # still ours, intact
                meta = {"client": ["127.0.0.1", 1], "resume": {"n": 41, "pids": [1]},
                        "migration": {"from": 99, "from_pid": 1, "count": 1,
                                      "started": time.monotonic(), "reason": "test"}}
                t2 = ch.send(t.socket, meta=meta, data=b"echo z\n")
                assert t2.wait(10) is True
            conn.close()
            c = LineClient.wrap(client)
            moved = c.read()
            assert (moved["moved"], moved["pid"], moved["n"]) == (True, pid, 41)
            assert c.read() == {"n": 42, "pid": pid, "id": 1, "echo": "z"}
        finally:
            client.close()
            server.close()


def test_workers_with_peer_channels_stop_at_once(tmp_path: Path) -> None:
    """Closing the peer listener and channels does not hold a stopping worker up (it
    once waited 5 s for its own accept loop)."""
    with LiveServer(tmp_path, "--no-rebalance", app=APP, workers=2) as srv:
        c = LineClient(srv.address())
        c.ask("echo a")
        assert c.ask("move")["moved"]
        srv.wait_for(lambda st: st["counters"]["migrations"] == 1, what="counted")
        c.close()
        srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 0, what="closed")
        t0 = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - t0 < 3.0
