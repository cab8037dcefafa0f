"""``sockshare status|reload|upgrade|migrate`` without ``--control`` (issue 11).

Real servers started with the default control path, in a runtime directory of the
test's own (``XDG_RUNTIME_DIR``): with two live ones, every command refuses to guess and
lists each server (pid, command line, listeners, its ``--control``); once one is killed
with SIGKILL, its control socket is removed on the next command and the other server is
used. A socket file whose pid now belongs to another process is removed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ROOT, env_with_apps

from sockshare.server._control import request

pytestmark = pytest.mark.timeout(90)


class _Servers:
    def __init__(self, tmp: Path) -> None:
        self.env = env_with_apps()
        self.env["XDG_RUNTIME_DIR"] = str(tmp / "xdg")
        (tmp / "xdg").mkdir(mode=0o700)
        self.rundir = tmp / "xdg" / "sockshare"
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: set[int] = set()

    def start(self, name: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "sockshare.server._cli", "serve", "serve_apps:app",
                "--bind", "127.0.0.1:0", "--workers", "1", "--grace", "2"]
        with open(self.tmp / f"{name}.log", "wb") as log:   # the child keeps its copy
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=str(ROOT))
        self.procs.append(proc)
        self.status(proc.pid)
        return proc

    def control(self, pid: int) -> Path:
        return self.rundir / f"{pid}.ctl"

    def status(self, pid: int, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                resp = request(str(self.control(pid)), {"cmd": "status"}, timeout=2.0)
                st: dict[str, Any] = resp["status"]
                self.workers.update(w["pid"] for w in st["workers"] if w["pid"])
                if any(w["state"] == "ready" for w in st["workers"]):
                    return st
            time.sleep(0.05)
        raise AssertionError(f"server {pid} not ready")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sockshare.cli", *args], check=False,
                              capture_output=True, text=True, timeout=60, env=self.env,
                              cwd=str(ROOT))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in self.workers:   # only workers our servers reported
            with contextlib.suppress(OSError):
                if b"sockshare" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def _ctl_files(rundir: Path) -> set[str]:
    return {p.name for p in rundir.glob("*.ctl")}


def test_several_servers_are_listed_and_a_dead_ones_socket_is_removed(tmp_path: Path) -> None:
    s = _Servers(tmp_path)
    try:
        a, b = s.start("a"), s.start("b")
        st_a, st_b = s.status(a.pid), s.status(b.pid)
        assert _ctl_files(s.rundir) == {f"{a.pid}.ctl", f"{b.pid}.ctl"}

        for cmd in (["status"], ["reload"], ["upgrade"], ["migrate", "--from", "1"]):
            out = s.cli(*cmd)
            assert out.returncode == 1, (cmd, out.stdout, out.stderr)
            err = out.stderr
            assert "2 sockshare servers are running; pick one with --control PATH" in err, err
            for proc, st in ((a, st_a), (b, st_b)):
                assert f"pid {proc.pid}: " in err
                assert "serve_apps:app" in err   # the command line
                assert st["listeners"][0]["address"] in err
                assert f"--control {s.control(proc.pid)}" in err
        assert s.status(a.pid)["generation"] == 1   # nothing was reloaded or upgraded
        assert s.status(b.pid)["generation"] == 1

        a_workers = [w["pid"] for w in st_a["workers"]]
        a.kill()   # SIGKILL: the control socket stays behind
        a.wait(10)
        for pid in a_workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert s.control(a.pid).exists()
        # a socket file named after a live pid that is no server (a reused pid)
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            fake = s.rundir / f"{sleeper.pid}.ctl"
            with socket.socket(socket.AF_UNIX) as lone:
                lone.bind(str(fake))
            out = s.cli("status", "--json")
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["pid"] == b.pid
            assert not s.control(a.pid).exists()
            assert not fake.exists()
            assert _ctl_files(s.rundir) == {f"{b.pid}.ctl"}
        finally:
            sleeper.kill()
            sleeper.wait(5)
        out = s.cli("reload")
        assert out.returncode == 0, out.stderr
        assert "generation 2 serving" in out.stdout
    finally:
        s.close()
    assert _ctl_files(s.rundir) == set()   # b removed its own on exit


def test_no_server_says_where_it_looked(tmp_path: Path) -> None:
    s = _Servers(tmp_path)
    out = s.cli("status")
    assert out.returncode == 1
    assert "no running sockshare server found in" in out.stderr
    assert str(s.rundir) in out.stderr
    assert "--control PATH" in out.stderr
