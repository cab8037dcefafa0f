"""Drive a real ``sockshare serve`` process from the tests.

:class:`Server` starts ``python -m sockshare.server._cli serve ...`` as a child process
with its own control socket in a tmp directory (``nofile=N``: under RLIMIT_NOFILE N),
waits (bounded) until every worker has
connected, reads the live status over the control socket, and on :meth:`Server.close`
stops it with SIGTERM (SIGKILL after a deadline) -- only the dispatcher we started, and
worker pids it reported that still run our worker command line.

:func:`ask` is one client connection of the line protocol of ``serve_apps.app``.
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
from typing import Any, Self

from sockshare.server._control import ControlError, request

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def env_with_apps() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env.pop("SOCKSHARE_CHANNEL", None)
    return env


#: ``python -c _LIMIT_FDS N argv...``: RLIMIT_NOFILE = N (soft and hard: the dispatcher
#: and its workers cannot raise it back), then exec argv in the same process
_LIMIT_FDS = ("import os, resource, sys; n = int(sys.argv[1]); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")


class Server:
    def __init__(self, tmp: Path, *args: str, workers: int | None = 2,
                 app: str | None = "serve_apps:app", bind: list[str] | None = None,
                 ready: int | None = None, cwd: Path | None = None,
                 nofile: int | None = None, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.control = str(tmp / "ctl" / "server.ctl")
        self.log_path = tmp / "server.log"
        argv = [sys.executable, "-m", "sockshare.server._cli", "serve"]
        if app is not None:
            argv.append(app)
        for b in bind if bind is not None else ["127.0.0.1:0"]:
            argv += ["--bind", b]
        if workers is not None:
            argv += ["--workers", str(workers)]
        argv += ["--control", self.control, "--grace", "5", *args]
        self._log = open(self.log_path, "wb")
        if nofile is not None:
            argv = [sys.executable, "-c", _LIMIT_FDS, str(nofile), *argv]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**env_with_apps(), **(env or {})},
                                     cwd=str(cwd or ROOT))
        #: the pid ``sockshare serve`` started: the master, the same through upgrades
        self.pid = self.proc.pid
        #: the (first) dispatcher, the master's child: what accepts and hands over
        self.dispatcher = 0
        self._worker_pids: set[int] = set()
        try:
            self.wait_ready(ready if ready is not None else (workers or 1))
        except BaseException:
            self.close()
            raise

    # -- observing -----------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        resp = request(self.control, {"cmd": "status"}, timeout=5.0)
        assert resp["ok"], resp
        st: dict[str, Any] = resp["status"]
        self._worker_pids.update(w["pid"] for w in st["workers"] if w["pid"])
        if not self.dispatcher:
            self.dispatcher = int(st.get("dispatcher") or st["pid"])
        return st

    def wait_ready(self, n: int, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.control):
                try:
                    last = self.status()
                except (OSError, ControlError, AssertionError, ValueError):
                    # (ControlError: the socket file exists from the dispatcher's bind(),
                    # a moment before its listen() -- "connection refused" in between,
                    # seen once in CI on a loaded machine)
                    last = None
                if last is not None and sum(w["state"] == "ready" for w in last["workers"]) >= n:
                    return dict(last)
            time.sleep(0.05)
        raise AssertionError(f"{n} worker(s) not ready within {timeout} s: {last}\n{self.log()}")

    def wait_for(self, pred: Any, timeout: float = 10.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st = self.status()
        while not pred(st):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or pred}: {json.dumps(st)}")
            time.sleep(0.02)
            st = self.status()
        return st

    def address(self, name: str | None = None) -> Any:
        st = self.status()
        for lst in st["listeners"]:
            if name is None or lst["name"] == name:
                a = lst["address"]
                if a.startswith("unix:"):
                    return a[5:]
                host, _, port = a.rpartition(":")
                return (host.strip("[]"), int(port))
        raise KeyError(name)

    def workers(self) -> dict[int, dict[str, Any]]:
        return {w["id"]: w for w in self.status()["workers"]}

    # -- stopping ------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"the server did not stop within {timeout} s:\n{self.log()}") from None

    def close(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop(timeout=15.0)
        for pid in self._worker_pids:  # workers outlive a killed dispatcher only briefly
            if _is_our_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_our_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"sockshare" in cmd or b"worker" in cmd


def connect(addr: Any, *, src: str | None = None, timeout: float = 10.0) -> socket.socket:
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if src is not None:
            s.bind((src, 0))
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def read_to_close(s: socket.socket, *, until_timeout: bool = False) -> bytes:
    """What ``s`` receives until the peer closes (EOF) or resets the connection; with
    ``until_timeout``, also until the socket's timeout passes without data."""
    ends: tuple[type[OSError], ...] = (ConnectionResetError, TimeoutError) if until_timeout \
        else (ConnectionResetError,)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ends:
            break
        if not chunk:
            break
        out += chunk
    return out


def exit_output(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """The whole output of ``proc``, which exits by itself within ``timeout`` seconds
    (else it is killed and :class:`subprocess.TimeoutExpired` raised)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    return out.decode(errors="replace")


def silent(s: socket.socket, for_: float = 0.3) -> bool:
    """True if nothing (no answer, no close) arrives on ``s`` for ``for_`` seconds."""
    s.settimeout(for_)
    try:
        s.recv(100)
    except TimeoutError:
        return True
    return False


def ask(addr: Any, cmd: str = "who", *, src: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """One connection: send ``cmd``, return the worker's JSON answer."""
    with connect(addr, src=src, timeout=timeout) as s:
        s.sendall(cmd.encode() + b"\n")
        line = read_line(s)
    assert line, f"no answer to {cmd!r}"
    out: dict[str, Any] = json.loads(line)
    return out


def hold(addr: Any, *, timeout: float = 10.0) -> tuple[socket.socket, dict[str, Any]]:
    """Open a long-lived connection; returns it with the worker's answer."""
    s = connect(addr, timeout=timeout)
    s.sendall(b"hold\n")
    line = read_line(s)
    assert line, "no answer to hold"
    return s, json.loads(line)


def reset_close(s: socket.socket) -> None:
    """Close with RST (no TIME_WAIT on our side)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
