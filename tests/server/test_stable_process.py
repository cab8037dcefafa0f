"""The process ``sockshare serve`` started stays the server, through any number of
upgrades (issue #15): a parent that knows only that pid, as a container runtime does,
signals it and waits for it.

* 10 upgrades (SIGUSR2) and 5 reloads (SIGHUP) to that pid under a stream of short
  connections, then SIGTERM: no connection failed, exit status 0, no process of the
  server left (the whole tree, children of children, recorded all along), and no
  runtime file left (control socket, channels, the master's notify socket). The default
  control path (named after the started pid) answers all along.
* SIGKILL of that process (the master): every dispatcher generation reads EOF on the
  master's pipe and stops gracefully, so within ``grace`` + a few seconds nothing of the
  server runs -- also when it is killed in the middle of an upgrade.
* SIGKILL of the current dispatcher: the master exits with 128 + 9, as the dispatcher's
  own death was seen before, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, ShortLoad, pid_alive, wait_gone, wait_until
from serve_helpers import ROOT, env_with_apps

from sockshare._errors import SockshareError
from sockshare.server._control import request

pytestmark = pytest.mark.timeout(300)

APP = "live_apps:handle"
GRACE = 2.0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _tree(pid: int) -> set[int]:
    """``pid`` and its descendants, children of children."""
    seen: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += _children(p)
    return seen


class Started:
    """``sockshare serve`` started as a container runtime starts it: a pid, a default
    control path in a private runtime directory, and its descendants watched."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.env = env or env_with_apps()
        self.env["XDG_RUNTIME_DIR"] = str(tmp / "xdg")
        (tmp / "xdg").mkdir(mode=0o700)
        self.rundir = tmp / "xdg" / "sockshare"
        self.log_path = tmp / "server.log"
        argv = [sys.executable, "-m", "sockshare.cli", "serve", APP, "--bind", "127.0.0.1:0",
                "--workers", "2", "--grace", str(GRACE), *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=str(ROOT))
        self.pid = self.proc.pid
        self.control = str(self.rundir / f"{self.pid}.ctl")
        self.seen: set[int] = {self.pid}
        self.wait(lambda st: len(st["workers"]) == 2
                  and all(w["state"] == "ready" for w in st["workers"]), "ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def watch(self) -> set[int]:
        tree = _tree(self.pid)
        self.seen |= tree
        return tree

    def status(self) -> dict[str, Any]:
        self.watch()
        st: dict[str, Any] = request(self.control, {"cmd": "status"}, timeout=5.0)["status"]
        assert st["pid"] == st["master"] == self.pid, st
        return st

    def wait(self, pred: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}\n{self.log()}"
            with contextlib.suppress(OSError, ValueError, SockshareError):
                last = self.status()
                if pred(last):
                    return dict(last)
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {last}\n{self.log()}")

    def close(self) -> None:
        """(After a failure: stop whatever is left, only pids of this server's tree.)"""
        self.watch()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        for pid in self.seen:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def runtime_files(self) -> set[str]:
        try:
            return set(os.listdir(self.rundir))
        except FileNotFoundError:
            return set()


def _address(st: dict[str, Any]) -> tuple[str, int]:
    host, _, port = st["listeners"][0]["address"].rpartition(":")
    return host, int(port)


def test_upgrades_and_reloads_under_load_then_sigterm_to_the_started_pid(tmp_path: Path) -> None:
    srv = Started(tmp_path, "--upgrade-probation", "0.3")
    try:
        st = srv.status()
        assert srv.runtime_files() == {f"{srv.pid}.ctl", f"{srv.pid}.notify",
                                       f"{st['dispatcher']}.chan",
                                       *(f"{w['pid']}.peer" for w in st["workers"])}
        addr = _address(st)
        long = LineClient(addr)
        assert long.ask("echo 1")["n"] == 1
        load = ShortLoad(addr, threads=1)
        dispatchers = [st["dispatcher"]]
        reloads = 0
        try:
            for i in range(10):
                old = dispatchers[-1]
                os.kill(srv.pid, signal.SIGUSR2)
                st = srv.wait(lambda st, old=old: st["dispatcher"] != old and not pid_alive(old)
                              and len(st["workers"]) == 2
                              and all(w["state"] == "ready" for w in st["workers"]),
                              f"upgrade {i + 1}", timeout=60)
                assert st["predecessor"] == old
                dispatchers.append(st["dispatcher"])
                if i % 2:
                    before = st["counters"]["reloads"]
                    os.kill(srv.pid, signal.SIGHUP)
                    srv.wait(lambda st, before=before: st["counters"]["reloads"] == before + 1
                             and len(st["workers"]) == 2
                             and all(w["state"] == "ready" for w in st["workers"]),
                             f"reload after upgrade {i + 1}", timeout=60)
                    reloads += 1
                srv.watch()
        finally:
            load.finish()
        assert load.failures == []
        assert load.ok > 100, load.ok
        assert reloads == 5
        assert len(set(dispatchers)) == 11
        answer = long.ask("echo 2")
        while "moved" in answer:
            answer = long.read()
        assert answer["n"] == 2   # one connection, moved through every generation
        long.close()
        log = srv.log()
        assert log.count("master: dispatcher pid") >= 10
        assert "Traceback" not in log

        seen = srv.watch()
        assert len(srv.seen) > 11 + 2 * 16   # the master, 11 dispatchers, their workers
        os.kill(srv.pid, signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.log()
        left = [p for p in srv.seen | seen if pid_alive(p)]
        assert left == [], left
        assert srv.runtime_files() == set()
        assert "master: exiting with status 0" in srv.log()
    finally:
        srv.close()


@pytest.mark.parametrize("when", ["serving", "during an upgrade"])
def test_sigkill_of_the_master_stops_everything(tmp_path: Path, when: str) -> None:
    env = env_with_apps()
    slow = tmp_path / "slow"
    env["LIVE_APPS_SLOW_IMPORT"] = str(slow)
    srv = Started(tmp_path, env=env)
    try:
        st = srv.status()
        long = LineClient(_address(st))
        assert long.ask("echo 1")["n"] == 1
        if when == "during an upgrade":
            slow.write_text("x")   # the new dispatcher's workers take 5 s to import the app
            os.kill(srv.pid, signal.SIGUSR2)
            successor = srv.wait(lambda st: st["successor"], "the new dispatcher")["successor"]
            wait_until(lambda: len(_children(successor)) == 2, timeout=20,
                       what="the new dispatcher's workers")
        tree = srv.watch()
        assert len(tree) == (7 if when == "during an upgrade" else 4), tree
        t0 = time.monotonic()
        srv.proc.kill()
        assert srv.proc.wait(10) == -signal.SIGKILL
        for pid in sorted(tree):
            assert wait_gone(pid, GRACE + 15), f"pid {pid} still runs\n{srv.log()}"
        took = time.monotonic() - t0
        assert took < GRACE + 15
        log = srv.log()
        assert f"the master process (pid {srv.pid}) is gone" in log
        assert long.read_eof(5) == b""   # drained by its worker, closed
        long.close()
        # the dispatchers removed their sockets; only the dead master's notify socket is
        # left, for the next server in this directory to remove
        assert srv.runtime_files() == {f"{srv.pid}.notify"}
        print(f"SIGKILL of the master ({when}): everything gone in {took:.2f} s")
    finally:
        srv.close()


def test_sigkill_of_the_dispatcher_ends_the_master(tmp_path: Path) -> None:
    srv = Started(tmp_path)
    try:
        st = srv.status()
        tree = srv.watch()
        os.kill(st["dispatcher"], signal.SIGKILL)
        assert srv.proc.wait(GRACE + 15) == 128 + signal.SIGKILL, srv.log()
        for pid in sorted(tree):
            assert wait_gone(pid, 10), pid
        assert f"the dispatcher (pid {st['dispatcher']}) exited with signal SIGKILL" in srv.log()
        assert srv.runtime_files() <= {f"{st['dispatcher']}.chan", f"{srv.pid}.ctl"}
    finally:
        srv.close()


def test_sigterm_during_an_upgrade_stops_both_generations(tmp_path: Path) -> None:
    """SIGTERM while a new dispatcher is starting beside the old one: both stop, with
    everything they run; exit status 0."""
    env = env_with_apps()
    slow = tmp_path / "slow"
    env["LIVE_APPS_SLOW_IMPORT"] = str(slow)
    srv = Started(tmp_path, env=env)
    try:
        slow.write_text("x")
        os.kill(srv.pid, signal.SIGUSR2)
        successor = srv.wait(lambda st: st["successor"], "the new dispatcher")["successor"]
        wait_until(lambda: len(_children(successor)) == 2, timeout=20,
                   what="the new dispatcher's workers")
        tree = srv.watch()
        assert successor in tree
        os.kill(srv.pid, signal.SIGTERM)
        assert srv.proc.wait(GRACE + 20) == 0, srv.log()
        left = [p for p in tree if pid_alive(p)]
        assert left == [], left
        assert srv.runtime_files() == set()
    finally:
        srv.close()
