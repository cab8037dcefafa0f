"""A load generator for the demo app that counts every failure: short HTTP and long-lived
WebSocket clients, on 127.0.0.1 only, bounded in time and count.

A test and benchmark tool, not part of the library: ``benchmarks/live.py`` and
``tests/server/test_live_load.py`` import it (as ``loadgen``) to show that reloads,
upgrades, migrations and worker crashes refuse, reset or lose nothing but what a
SIGKILLed worker had in hand::

    load = Load(("127.0.0.1", 8000), short_clients=4, ws_clients=20)
    load.start()                      # its own event loop, in a thread
    ...                               # reload, upgrade, kill -9 ... (load.killed.add(pid) first)
    load.move(100)                    # 100 WebSocket clients send {"cmd": "move"}
    report = load.stop()              # counters, see Counters

Short connections: ``GET /whoami`` with ``Connection: close``, one after another from each
of ``short_clients`` tasks, paced to ``short_rate`` per second in all. An outcome is
``ok`` (200 and a JSON body), ``refused`` (ECONNREFUSED), ``reset`` (ECONNRESET, or the
connection closed before a whole answer) or ``unanswered`` (no answer in ``timeout``).

WebSocket connections: ``ws_clients`` connections to ``/ws``, each sending a numbered
text message every ``ws_period`` seconds and checking each echo: it must be the oldest
message not yet echoed (else ``duplicated`` if it was echoed before, or ``disordered``),
and its counter ``n`` must be the previous one plus one (``n_errors``) -- across every
migration (``{"event": "moved"}`` notices are counted, with their latency). A connection
that ends while messages wait for their echo loses them: ``lost`` -- unless the worker it
was last served by was SIGKILLed (``killed``), when they count as ``killed_lost`` and the
connection as ``ws_killed``; otherwise the end is a failure (``ws_dropped``). Ended
connections are replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

__all__ = ["Counters", "Load", "Scenario", "ServeProcess", "free_port"]


@dataclass
class Counters:
    short_ok: int = 0
    refused: int = 0
    reset: int = 0
    unanswered: int = 0
    ws_opened: int = 0
    ws_messages: int = 0
    lost: int = 0
    duplicated: int = 0
    disordered: int = 0
    n_errors: int = 0
    ws_dropped: int = 0
    ws_killed: int = 0
    killed_lost: int = 0
    ws_refused: int = 0
    moves: int = 0
    move_failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def failures(self) -> int:
        """Everything that should be zero (SIGKILLed workers' own connections excepted)."""
        return (self.refused + self.reset + self.unanswered + self.lost + self.duplicated
                + self.disordered + self.n_errors + self.ws_dropped + self.ws_refused)

    def minus(self, other: Counters) -> Counters:
        out = Counters()
        for k, v in asdict(self).items():
            if isinstance(v, int):
                setattr(out, k, v - getattr(other, k))
        out.latencies_ms = self.latencies_ms[len(other.latencies_ms):]
        return out

    def copy(self) -> Counters:
        out = Counters(**{k: v for k, v in asdict(self).items() if k != "latencies_ms"})
        out.latencies_ms = list(self.latencies_ms)
        return out


class _WsClient:
    def __init__(self, load: Load, k: int) -> None:
        self.load = load
        self.k = k
        self.seq = 0
        self.waiting: deque[str] = deque()
        self.echoed: set[str] = set()
        self.last_n = 0
        self.pid = 0
        self.writer: asyncio.StreamWriter | None = None
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.move_now = False
        self._wakeup: asyncio.Event | None = None

    def ask_move(self) -> None:
        """(In the load's loop.) Send {"cmd": "move"} now."""
        self.move_now = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        c = self.load.counters
        host, port = self.load.addr
        try:
            # (not wait_for: on 3.11 it can drop a connection that completes just as the
            # timeout fires, and the socket leaks)
            async with asyncio.timeout(self.load.timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            c.ws_refused += 1
            return
        self.writer = writer
        try:
            writer.write(self.ws.send(Request(host=f"{host}:{port}", target="/ws")))
            if not await self._handshake(reader):
                c.ws_refused += 1
                return
            c.ws_opened += 1
            receiver = asyncio.create_task(self._receive(reader))
            try:
                self._wakeup = asyncio.Event()
                next_message = 0.0
                while not self.load.stopping.is_set() and not receiver.done():
                    if self.move_now:
                        self.move_now = False
                        await self._send(json.dumps({"cmd": "move"}))
                    now = time.monotonic()
                    if now >= next_message:
                        next_message = now + self.load.ws_period
                        self.seq += 1
                        text = f"c{self.k}-{self.seq}"
                        self.waiting.append(text)
                        await self._send(text)
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), max(0.0, next_message - time.monotonic()))
                # the end: every message sent gets its echo, or is lost
                deadline = time.monotonic() + self.load.timeout
                while self.waiting and not receiver.done() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiver
            self._ended(receiver.cancelled() or self.load.stopping.is_set())
        except (OSError, TimeoutError):
            self._ended(False)
        finally:
            writer.close()

    async def _send(self, text: str) -> None:
        assert self.writer is not None
        self.writer.write(self.ws.send(TextMessage(data=text)))
        await self.writer.drain()

    async def _handshake(self, reader: asyncio.StreamReader) -> bool:
        async with asyncio.timeout(self.load.timeout):
            while True:
                data = await reader.read(65536)
                self.ws.receive_data(data or None)
                for ev in self.ws.events():
                    if isinstance(ev, AcceptConnection):
                        return True
                    if isinstance(ev, RejectConnection):
                        return False
                if not data:
                    return False

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        parts: list[str] = []
        while True:
            data = await reader.read(65536)
            self.ws.receive_data(data or None)
            for ev in self.ws.events():
                if isinstance(ev, TextMessage):
                    parts.append(ev.data)
                    if ev.message_finished:
                        self._message(json.loads("".join(parts)))
                        parts.clear()
                elif isinstance(ev, Ping) and self.writer is not None:
                    self.writer.write(self.ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    return
            if not data:
                return

    def _message(self, msg: dict[str, Any]) -> None:
        c = self.load.counters
        if msg.get("event") in ("moved", "move_failed"):
            with self.load._moved:
                self.load._moved.notify_all()
        if msg.get("event") == "moved":
            c.moves += 1
            self.pid = int(msg.get("worker_pid") or 0)
            if msg.get("latency_ms") is not None:
                c.latencies_ms.append(float(msg["latency_ms"]))
            if msg.get("n") != self.last_n:
                c.n_errors += 1
            return
        if msg.get("event") == "move_failed":
            c.move_failed += 1
            return
        echo = str(msg.get("echo"))
        self.pid = int(msg.get("worker_pid") or 0)
        c.ws_messages += 1
        if self.waiting and echo == self.waiting[0]:
            self.waiting.popleft()
            self.echoed.add(echo)
        elif echo in self.echoed:
            c.duplicated += 1
        else:
            c.disordered += 1
            with contextlib.suppress(ValueError):
                self.waiting.remove(echo)
        if msg.get("n") != self.last_n + 1:
            c.n_errors += 1
        self.last_n = int(msg.get("n") or 0)

    def _ended(self, by_us: bool) -> None:
        c = self.load.counters
        if by_us and not self.waiting:
            return
        if self.pid in self.load.killed:
            c.ws_killed += 1
            c.killed_lost += len(self.waiting)
        else:
            if not by_us:
                c.ws_dropped += 1
            c.lost += len(self.waiting)
        self.waiting.clear()


class Load:
    """Steady load on the demo app; see the module docstring."""

    def __init__(self, addr: tuple[str, int], *, short_clients: int = 4, short_rate: float = 200.0,
                 ws_clients: int = 20, ws_period: float = 0.05, timeout: float = 10.0) -> None:
        if addr[0] not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the load generator only targets the loopback interface")
        self.addr = addr
        self.short_clients = short_clients
        self.short_rate = short_rate
        self.ws_count = ws_clients
        self.ws_period = ws_period
        self.timeout = timeout
        self.counters = Counters()
        #: pids of workers SIGKILLed on purpose: their connections' losses are excused
        self.killed: set[int] = set()
        self.stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._clients: list[_WsClient] = []
        self._lock = threading.Lock()
        self._moved = threading.Condition()

    # -- control from another thread -------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the load generator did not start")

    def snapshot(self) -> Counters:
        with self._lock:
            return self.counters.copy()

    def move(self, n: int, *, concurrency: int = 1, timeout: float = 120.0) -> int:
        """Have WebSocket clients ask to move, ``n`` times in all (spread over the
        clients, ``concurrency`` at a time: 1 measures the latency of one migration, not
        of a queue of them); returns how many moves the clients saw."""
        c = self.counters
        start, start_moves = c.moves + c.move_failed, c.moves
        deadline = time.monotonic() + timeout
        asked = 0
        rng = random.Random(n)
        with self._moved:
            while asked < n and time.monotonic() < deadline:
                clients = [x for x in list(self._clients) if not x.move_now and x.writer is not None]
                if clients and asked - (c.moves + c.move_failed - start) < max(1, concurrency):
                    client = rng.choice(clients)
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(client.ask_move)
                    asked += 1
                else:
                    self._moved.wait(0.5)
            while c.moves + c.move_failed - start < asked and time.monotonic() < deadline:
                self._moved.wait(0.5)
        return c.moves - start_moves

    def stop(self) -> Counters:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stopping.set)
        if self._thread is not None:
            self._thread.join(self.timeout + 30)
        return self.snapshot()

    # -- the load ----------------------------------------------------------------------

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        tasks = [asyncio.create_task(self._short(k)) for k in range(self.short_clients)]
        tasks += [asyncio.create_task(self._ws_slot(k)) for k in range(self.ws_count)]
        self._ready.set()
        await self.stopping.wait()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _ws_slot(self, k: int) -> None:
        gen = 0
        while not self.stopping.is_set():
            client = _WsClient(self, k * 1000 + gen)
            gen += 1
            self._clients.append(client)
            try:
                await client.run()
            finally:
                self._clients.remove(client)
            if not self.stopping.is_set():
                await asyncio.sleep(0.05)

    async def _short(self, k: int) -> None:
        c = self.counters
        interval = self.short_clients / self.short_rate if self.short_rate > 0 else 0.0
        host, port = self.addr
        request = f"GET /whoami HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        await asyncio.sleep(interval * k / max(1, self.short_clients))
        while not self.stopping.is_set():
            t0 = time.monotonic()
            outcome = "reset"
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    data = await reader.read()
                head, _, body = data.partition(b"\r\n\r\n")
                if head.startswith(b"HTTP/1.1 200") and b"worker_pid" in body:
                    outcome = "ok"
            except ConnectionRefusedError:
                outcome = "refused"
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
            except TimeoutError:
                outcome = "unanswered"
            except OSError:
                outcome = "reset"
            finally:
                if writer is not None:
                    writer.close()
            if outcome == "ok":
                c.short_ok += 1
            elif outcome == "refused":
                c.refused += 1
            elif outcome == "unanswered":
                c.unanswered += 1
            else:
                c.reset += 1
            delay = interval - (time.monotonic() - t0)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)


class Scenario:
    """The phases of the live benchmark, against a server's control socket, under ``load``:
    reloads, upgrades, migrations, worker SIGKILLs (and, given a way to stop and start
    the server, naive restarts as the baseline). Each phase's result is the load's
    counters over it plus what the dispatcher counted."""

    def __init__(self, control: str, load: Load, *, log: Callable[[str], None] = print,
                 settle: float = 0.5) -> None:
        self.control = control
        self.load = load
        self.log = log
        self.settle = settle
        self.results: dict[str, dict[str, Any]] = {}
        self.rng = random.Random(7)

    def status(self) -> dict[str, Any]:
        from sockshare.server._control import request

        resp = request(self.control, {"cmd": "status"}, timeout=10.0)
        st: dict[str, Any] = resp["status"]
        return st

    def command(self, req: dict[str, Any]) -> dict[str, Any]:
        from sockshare.server._control import request

        return request(self.control, req, timeout=120.0)

    def _phase(self, name: str, count: int, body: Callable[[], None]) -> dict[str, Any]:
        before, st0, t0 = self.load.snapshot(), self.status(), time.monotonic()
        body()
        time.sleep(self.settle)
        elapsed = time.monotonic() - t0
        after, st1 = self.load.snapshot(), self.status()
        d = after.minus(before)
        same = st0.get("dispatcher", st0["pid"]) == st1.get("dispatcher", st1["pid"])
        out: dict[str, Any] = {"count": count, "seconds": round(elapsed, 2), **{
            k: v for k, v in asdict(d).items() if k != "latencies_ms"}}
        out["failures"] = d.failures()
        out["dispatcher_lost"] = (st1["counters"]["lost"] - st0["counters"]["lost"]) if same else None
        if d.latencies_ms:
            lat = sorted(d.latencies_ms)
            out["latency_ms"] = {"p50": round(statistics.median(lat), 3),
                                 "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
                                 "max": round(lat[-1], 3), "samples": len(lat)}
        self.results[name] = out
        self.log(f"{name}: {count} in {elapsed:.1f} s; failures {out['failures']}; {out}")
        return out

    def reloads(self, n: int) -> dict[str, Any]:
        def body() -> None:
            for _ in range(n):
                resp = self.command({"cmd": "reload", "wait": True})
                if not resp.get("ok"):
                    raise RuntimeError(f"reload failed: {resp}")
        return self._phase("reloads", n, body)

    def upgrades(self, n: int) -> dict[str, Any]:
        def body() -> None:
            for _ in range(n):
                old = self.status()["pid"]
                resp = self.command({"cmd": "upgrade", "wait": True})
                if not resp.get("ok"):
                    raise RuntimeError(f"upgrade failed: {resp}")
                deadline = time.monotonic() + 60
                while _alive(old) and time.monotonic() < deadline:
                    time.sleep(0.02)
        return self._phase("upgrades", n, body)

    def migrations(self, n: int) -> dict[str, Any]:
        def body() -> None:
            done = self.load.move(n)
            if done < n:
                raise RuntimeError(f"only {done} of {n} migrations were seen")
        return self._phase("migrations", n, body)

    def kills(self, n: int) -> dict[str, Any]:
        def body() -> None:
            for _ in range(n):
                st = self.status()
                ready = [w for w in st["workers"] if w["state"] == "ready" and w["pid"]]
                victim = self.rng.choice(ready)
                self.load.killed.add(victim["pid"])
                os.kill(victim["pid"], signal.SIGKILL)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    st = self.status()
                    if (all(w["state"] == "ready" for w in st["workers"])
                            and victim["pid"] not in {w["pid"] for w in st["workers"]}):
                        break
                    time.sleep(0.02)
                time.sleep(0.3)
        return self._phase("kills", n, body)

    def naive_restarts(self, n: int, stop: Callable[[], None], start: Callable[[], None]) -> dict[str, Any]:
        """The baseline: the server stopped (SIGTERM, graceful) and started again."""
        def body() -> None:
            for _ in range(n):
                stop()
                start()
                time.sleep(0.3)
        before, t0 = self.load.snapshot(), time.monotonic()
        body()
        time.sleep(self.settle)
        d = self.load.snapshot().minus(before)
        out: dict[str, Any] = {"count": n, "seconds": round(time.monotonic() - t0, 2), **{
            k: v for k, v in asdict(d).items() if k != "latencies_ms"}}
        out["failures"] = d.failures()
        self.results["naive_restarts"] = out
        self.log(f"naive_restarts: {n}; failures {out['failures']}; {out}")
        return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (for a server that restarts on it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``sockshare serve`` (the demo app) on a fixed port of 127.0.0.1, followed across
    upgrades through its control socket; :meth:`stop` ends every dispatcher it saw."""

    def __init__(self, port: int, tmp: Any, workers: int = 2, *, pythonpath: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        import pathlib

        self.port = port
        self.tmp = pathlib.Path(tmp)
        self.control = str(self.tmp / "ctl" / "live.ctl")
        self.log_path = self.tmp / "server.log"
        self.workers = workers
        self.pythonpath = pythonpath
        self.extra = extra
        self.pids: set[int] = set()
        self.proc: Any = None

    def start(self) -> None:
        import subprocess
        import sys

        from sockshare.server._control import request

        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        argv = [sys.executable, "-m", "sockshare.cli", "serve", "--bind", f"127.0.0.1:{self.port}",
                "--workers", str(self.workers), "--control", self.control, "--grace", "5",
                "--log-level", "warning", *self.extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        self.pids.add(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                st = request(self.control, {"cmd": "status"})["status"]
                if st["pid"] == self.proc.pid and all(w["state"] == "ready" for w in st["workers"]):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"the server did not start (see {self.log_path})")

    def stop(self) -> None:
        from sockshare.server._control import request

        with contextlib.suppress(Exception):
            self.pids.add(int(request(self.control, {"cmd": "status"})["status"]["pid"]))
        for pid in sorted(self.pids):
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for pid in sorted(self.pids):
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(5)
        self.pids.clear()
