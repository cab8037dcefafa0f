"""Worker crashes: nothing a worker had not accepted is lost; workers come back.

The criterion for ``kill -9`` under load (docs/server.md, "When a worker dies"): every
client connection either gets its complete answer, or it was already accepted by the
killed worker and open in it when it died. The dispatcher counts the latter in ``lost``
(connections accepted and not yet reported closed), so: failures <= lost, nothing
refused, nothing retried out.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import Server, ask, connect, read_line

pytestmark = pytest.mark.timeout(90)


def test_handoffs_not_accepted_by_a_dead_worker_are_redispatched(tmp_path: Path) -> None:
    """Stop worker 1, hand it connections, kill it: they come back and are served."""
    with Server(tmp_path, "--policy", "round-robin", workers=2) as srv:
        addr = srv.address()
        pid1 = srv.workers()[1]["pid"]
        os.kill(pid1, signal.SIGSTOP)
        socks = []
        try:
            for _ in range(8):
                s = connect(addr)
                s.sendall(b"who\n")
                socks.append(s)
            srv.wait_for(lambda st: st["workers"][0]["inflight"] == 4,
                         what="4 handoffs stuck on the stopped worker")
            os.kill(pid1, signal.SIGKILL)
            answers = [json.loads(read_line(s)) for s in socks]
        finally:
            for s in socks:
                s.close()
        assert len(answers) == 8
        assert sorted(a["id"] for a in answers).count(2) >= 4
        st = srv.wait_for(lambda st: st["workers"][0]["state"] == "ready"
                          and st["workers"][0]["generation"] == 2, what="worker 1 restarted")
        c = st["counters"]
        assert c["returned"] == 4
        assert c["redispatches"] == 4
        assert c["lost"] == 0
        assert c["refused"] == 0
        assert st["workers"][0]["restarts"] == 1
        assert st["workers"][0]["pid"] != pid1
        assert "re-dispatching" in srv.log()
        assert ask(addr)["id"] in (1, 2)


def test_kill_9_under_load_loses_only_accepted_connections(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "least-conn", workers=2) as srv:
        addr = srv.address()
        victim = srv.workers()[1]["pid"]
        total, threads_n = 600, 24
        results: list[str] = []
        lock = threading.Lock()
        done = threading.Event()
        counter = iter(range(total))

        def client() -> None:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                try:
                    with connect(addr, timeout=15) as s:
                        s.sendall(b"sleep 0.01\n")
                        line = read_line(s)
                    outcome = "ok" if line.endswith(b"\n") and b"hid" in line else "failed"
                except (ConnectionResetError, BrokenPipeError):
                    outcome = "failed"
                except TimeoutError:
                    outcome = "timeout"
                with lock:
                    results.append(outcome)
                    if len(results) >= total // 3:
                        done.set()

        threads = [threading.Thread(target=client) for _ in range(threads_n)]
        for t in threads:
            t.start()
        assert done.wait(60)
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        st = srv.wait_for(lambda st: st["workers"][0]["state"] == "ready"
                          and st["workers"][0]["generation"] == 2, what="restart")
        c = st["counters"]
        failures = results.count("failed")
        assert len(results) == total
        assert results.count("timeout") == 0, "a connection must never hang"
        assert failures <= c["lost"], (failures, c)
        assert c["refused"] == 0, c
        assert c["handoffs"] >= total - failures


def test_handler_exception_does_not_kill_the_worker(tmp_path: Path) -> None:
    with Server(tmp_path, workers=1) as srv:
        addr = srv.address()
        pid = srv.workers()[1]["pid"]
        with connect(addr) as s:
            s.sendall(b"raise\n")
            assert read_line(s) == b""
        assert ask(addr)["pid"] == pid
        assert "handler failed" in srv.log()
        srv.wait_for(lambda st: st["workers"][0]["connections"] == 0, what="close reported")


def test_crashing_worker_restarts_with_exponential_backoff(tmp_path: Path) -> None:
    with Server(tmp_path, workers=1) as srv:
        addr = srv.address()
        pids = set()
        for n in range(1, 4):
            with connect(addr) as s:
                s.sendall(b"exit\n")
                assert read_line(s) == b""
            st = srv.wait_for(lambda st, n=n: st["workers"][0]["restarts"] == n
                              and st["workers"][0]["state"] == "ready", what=f"restart {n}")
            pids.add(st["workers"][0]["pid"])
        assert len(pids) == 3
        log = srv.log()
        delays = [line.rsplit("restarting in ", 1)[1] for line in log.splitlines()
                  if "restarting in" in line]
        assert delays == ["0.10 s", "0.20 s", "0.40 s"], delays
        assert "exited with status 7" in log
        assert ask(addr)["gen"] == 4


def test_app_that_cannot_be_loaded(tmp_path: Path) -> None:
    with Server(tmp_path, "--queue-timeout", "1", app="serve_apps:no_such_app", workers=1,
                ready=0) as srv:
        addr = srv.address()
        with connect(addr) as s:
            s.sendall(b"who\n")
            s.settimeout(10)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        st = srv.wait_for(lambda st: st["workers"][0]["restarts"] >= 1, what="restarts")
        assert st["counters"]["handoffs"] == 0
        log = srv.log()
        assert "cannot be loaded" in log
        assert "no_such_app" in log
        assert "exited with status 3" in log


def _one_foreign_pool(tmp_path: Path, worker_cmd: str, head: str = "") -> Server:
    """A server with one pool whose worker is ``worker_cmd``, expected never to be ready;
    returned once its first start failed and was retried."""
    cfg = tmp_path / "pool.toml"
    cfg.write_text(f'{head}\n[[listen]]\nbind = "127.0.0.1:0"\n[pools.p]\nworker_cmd = "{worker_cmd}"\n')
    return Server(tmp_path, "--config", str(cfg), app=None, workers=None, bind=[], ready=0)


def test_worker_that_never_connects_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "mute.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with _one_foreign_pool(tmp_path, f"{sys.executable} {script}", "connect_timeout = 0.5") as srv:
        srv.wait_for(lambda st: st["workers"][0]["restarts"] >= 1, what="a restart", timeout=10)
        assert "did not connect to the dispatcher" in srv.log()


def test_a_worker_stopped_alone_drains_and_is_replaced(tmp_path: Path) -> None:
    """SIGTERM to one worker (a rolling restart): it finishes its requests, rejects new
    handoffs, exits 0 and is started again; clients see nothing of it."""
    with Server(tmp_path, "--policy", "round-robin", workers=2) as srv:
        addr = srv.address()
        pid1 = srv.workers()[1]["pid"]
        slow = connect(addr)
        slow.sendall(b"sleep 0.8\n")
        srv.wait_for(lambda st: st["workers"][0]["connections"] == 1, what="slow request on 1")
        os.kill(pid1, signal.SIGTERM)
        srv.wait_for(lambda st: st["workers"][0]["state"] != "ready", what="worker 1 draining")
        answers = [ask(addr)["id"] for _ in range(6)]
        assert set(answers) == {2}
        assert json.loads(read_line(slow))["id"] == 1
        slow.close()
        st = srv.wait_for(lambda st: st["workers"][0]["generation"] == 2
                          and st["workers"][0]["state"] == "ready", what="worker 1 replaced")
        assert st["counters"]["lost"] == 0
        assert st["counters"]["refused"] == 0
        assert f"worker 1 (pid {pid1}) exited with status 0" in srv.log()


@pytest.mark.parametrize("cmd", ["/nonexistent/sockshare-worker", "bad\\u0000byte"])
def test_worker_command_that_cannot_start(tmp_path: Path, cmd: str) -> None:
    """A worker command the OS refuses (no such file; a NUL byte from the config): the
    error is logged, the start retried with backoff, the dispatcher keeps running and
    answers its control socket, and stops cleanly."""
    with _one_foreign_pool(tmp_path, cmd) as srv:
        srv.wait_for(lambda st: st["workers"][0]["restarts"] >= 1, what="a retry", timeout=10)
        st = srv.status()
        assert st["workers"][0]["state"] != "ready"
        log = srv.log()
        assert "worker 1: cannot start" in log
        assert "internal error" not in log


# A worker whose channel outlives it: a child it forked holds the channel (and never
# reads it); the worker answers nothing and exits once a handoff is in flight.
FORKING_WORKER = """
import os, select, sys, time
from sockshare import Channel
ch = Channel.connect(sys.argv[-1], name="forking")
if os.fork() == 0:
    time.sleep(15)
    os._exit(0)
select.select([ch._sock], [], [], 30)
os._exit(1)
"""


def test_handoff_abandoned_with_an_exited_workers_channel_is_not_left_pending(
        tmp_path: Path) -> None:
    """The worker exits with a handoff unanswered while its forked child keeps the
    channel open: one second later the dispatcher closes the channel, which abandons the
    handoff after close_timeout (its copy closed: the child could still receive the
    descriptor). The handoff is dropped from the slot and counted lost; left pending, it
    made --timeout kill every later process of that slot. (The Python path, as on
    Windows: its handoffs have tickets; the compiled path's are dropped from the slot
    when the channel closes them.)"""
    script = tmp_path / "forking_worker.py"
    script.write_text(FORKING_WORKER)
    with Server(tmp_path, "--timeout", "2", "--worker-cmd", f"{sys.executable} {script}",
                app=None, workers=1, env={"SOCKSHARE_PURE_PYTHON": "1"}) as srv:
        addr = srv.address()
        with connect(addr) as client:
            client.sendall(b"hello\n")
            st = srv.wait_for(lambda st: st["workers"][0]["generation"] == 2
                              and st["workers"][0]["state"] == "ready", timeout=30,
                              what="worker 1 restarted")
            assert st["counters"]["lost"] == 1, (st["counters"], srv.log())
            assert st["workers"][0]["inflight"] == 0, st
            client.settimeout(10)
            try:   # closed by the dispatcher with the abandoned handoff
                assert client.recv(100) == b""
            except ConnectionResetError:
                pass
        time.sleep(4.0)   # twice --timeout: the new worker is not killed for it
        st = srv.status()
        assert st["counters"]["hung_kills"] == 0, st
        assert st["workers"][0]["generation"] == 2, st
        assert "never answered were closed with its channel" in srv.log()


def test_hung_worker_is_killed_and_its_handoffs_go_elsewhere(tmp_path: Path) -> None:
    """--timeout: a worker whose event loop is blocked leaves the next handoff
    unanswered; after the timeout it is killed and restarted, that connection is served
    by the other worker, and the blocked client's connection dies with the hung one."""
    with Server(tmp_path, "--policy", "round-robin", "--timeout", "1", workers=2) as srv:
        addr = srv.address()
        blocked = connect(addr)
        blocked.sendall(b"block 30\n")
        st = srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 1,
                          what="the blocking request accepted")
        hung = next(w for w in st["workers"] if w["connections"] == 1)
        t0 = time.monotonic()
        # round-robin: the hung worker gets one of these two; it cannot answer
        answers = [ask(addr) for _ in range(2)]
        took = time.monotonic() - t0
        assert {a["id"] for a in answers} == {3 - hung["id"]}, answers
        assert 0.9 < took < 10, took
        st = srv.wait_for(lambda st: st["workers"][hung["id"] - 1]["generation"] == 2
                          and st["workers"][hung["id"] - 1]["state"] == "ready",
                          what="the hung worker replaced")
        assert st["counters"]["hung_kills"] == 1
        assert st["counters"]["redispatches"] >= 1
        assert st["counters"]["refused"] == 0
        try:   # it died with the hung worker
            assert read_line(blocked) == b""
        except ConnectionResetError:
            pass
        blocked.close()
        assert "left 1 handoff(s) unanswered" in srv.log()
