"""Benchmark: thousands of idle WebSockets through a reload, an upgrade and a migration.

Run:  python benchmarks/scale.py [--sizes 1000,5000] [--rate 500] [--plot FILE.png]
                                 [--src DIR] [--only sockshare|uvicorn]
                                 [--ops reload,upgrade,migrate] [--rounds K]
                                 [--base-src DIR --runs K] [--perf DIR | --py-spy DIR]

``--base-src DIR`` makes it an A/B of two sockshare trees (the tree before a change and
``--src``): for each N, ``--runs`` runs of each, interleaved and the order swapped every
other run, then a table of the medians side by side, per operation and its place in the
sequence (a first and a second reload of the same connections differ).

For each N of ``--sizes``, one server after the other, on 127.0.0.1, with the same app,
the ASGI demo ``sockshare.server._demo_asgi:app`` (its WebSocket echoes each text message
with a counter ``n`` that goes on across migrations, and opts in to migration):

* ``sockshare`` -- ``sockshare serve sockshare.server._demo_asgi:app --workers 2
  --no-rebalance`` (rebalancing off, so that the migration below is not undone);
* ``uvicorn``   -- ``uvicorn sockshare.server._demo_asgi:app --workers 2``.

N WebSockets are opened (``/ws``) from client processes (one per 5,000 connections, at
most 4; each a single asyncio loop, uvloop when installed, of minimal WebSocket
protocols, no task per connection), each sending message 1 and waiting for its echo:
the **open rate** is N over the time that takes. The **RSS per connection** is the
growth of the server's whole process tree (``VmRSS`` of the main process and every
descendant) from before the clients connected to after, over N.

Then, for sockshare, under light traffic (``--rate`` messages a second in all, each
connection in turn, every echo checked), one after the other, each waited for:

* ``reload``  -- ``{"cmd": "reload", "wait": true}``: new workers; every connection
  moves to them (timed until the old workers exited);
* ``upgrade`` -- ``{"cmd": "upgrade", "wait": true}``: a new dispatcher and workers;
  every connection moves to them (timed until the old dispatcher and workers exited);
* ``migrate`` -- ``{"cmd": "migrate", "from": W, "count": N/2, "wait": true}``: half of
  them (all of one worker's) to the other worker.

After each, every connection sends a message and must be answered by a worker of the
current generation. Reported per operation: its time, the moves the clients saw and the
migration latency (p50 / p99, from ``migrate()`` on the old worker to the app resuming on
the new one, as the new worker reports it in its ``moved`` notice: in a move of
thousands, mostly the wait for its turn, as a worker relays 128 at once), the CPU time
per moved connection of the server's processes and of the clients (each process's user +
system time, looked at every 20 ms; in the JSON also per kind of process,
``cpu_us_per_move_by_process``: the master, the old and new dispatcher, the old and new
workers -- ``workers (both)`` in a migration -- and the clients; and their minor page
faults per move, ``minor_faults_per_move_by_process``), the CPU time of the
whole machine and its load average (it is shared: the wall time varies with other
people's load, the CPU time per move much less; it includes the new processes' start),
the slowest echo during the
operation, and the failures: connections **dropped** (closed by the server), messages
**lost** (no echo), **duplicated**, **disordered** (an echo that is not the
oldest one awaited, or a counter ``n`` that does not follow), connections not answered
afterwards or answered by an old worker (**stale**). The target: all zero.

Prints a Markdown table and the command line, writes benchmarks/results/scale.json and,
with ``--plot``, a PNG of the time of each operation against N. A benchmark, not a test
(the CI tests are tests/server/test_scale.py). The client processes and the servers
raise their soft RLIMIT_NOFILE to the hard limit: N/2 + a few hundred at least (each
worker holds half); below N + a few hundred, the migration's moves that do not fit in
its target are refused (counted in the JSON, ``refused``; they stay where they are).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.asgi import _env, _git_describe, descendants, free_port  # noqa: E402

APP = "sockshare.server._demo_asgi:app"
WORKERS = 2
PER_CLIENT = 5000
OPEN_CONCURRENCY = 200
READY_TIMEOUT = 60.0
SERVERS = ("sockshare", "uvicorn")
OPS = ("reload", "upgrade", "migrate")
COLORS = {"reload": "#2b6cb0", "upgrade": "#38a169", "migrate": "#d69e2e"}


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the client processes ---------------------------------------------------------------


@dataclass
class _Counts:
    dropped: int = 0
    lost: int = 0
    duplicated: int = 0
    disordered: int = 0
    moves: int = 0
    #: (CLOCK_MONOTONIC, system-wide) when the first move started (its "moved" notice's
    #: arrival less its latency) and when the last notice arrived
    first_move_at: float | None = None
    last_move_at: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    rtts_ms: list[float] = field(default_factory=list)


#: the client's handshake key (any 16 bytes, base64), and the masking key of every frame
#: it sends: RFC 6455 wants a mask, any value of it; zero leaves the payload as it is
_WS_KEY = "c29ja3NoYXJlLWJlbmNoIQ=="
_MASK = b"\0\0\0\0"


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented frame from the client (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _MASK + payload


class _Ws(asyncio.Protocol):
    """One WebSocket client: numbered messages ``s1, s2, ...``, each echo checked.

    A minimal RFC 6455 client (handshake, unmasked frames from the server, pings
    answered, a close closes): a general-purpose one (wsproto) cost the client processes
    as much CPU as a worker during a move of thousands, on the same two cores as the
    server -- the benchmark measured its own client."""

    def __init__(self, client: _Client, host: str, port: int) -> None:
        self.client = client
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.is_open = False
        self.fragments: list[bytes] = []
        self.seq = 0
        self.waiting: deque[tuple[int, float]] = deque()   # (seq, sent at)
        self.last_echoed = 0
        self.last_n = 0
        self.pid = 0
        self.closing = False
        self.closed = False
        self.answered: asyncio.Event | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio.Transport: no isinstance)
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.write((f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {_WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  ).encode())

    def send_next(self) -> None:
        if self.transport is None or self.closed:
            return
        self.seq += 1
        self.waiting.append((self.seq, time.monotonic()))
        self.transport.write(_client_frame(0x1, f"s{self.seq}".encode()))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.is_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = buf.startswith(b"HTTP/1.1 101")
            del buf[:end + 4]
            if not self.opened.done():
                self.opened.set_result(ok)
            if not ok:
                return
            self.is_open = True
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, at = b1 & 0x7F, pos + 2
            if n == 126:
                if size < at + 2:
                    break
                n, at = int.from_bytes(buf[at:at + 2], "big"), at + 2
            elif n == 127:
                if size < at + 8:
                    break
                n, at = int.from_bytes(buf[at:at + 8], "big"), at + 8
            if b1 & 0x80:   # (a server never masks)
                at += 4
            if size < at + n:
                break
            payload = bytes(buf[at:at + n])
            pos = at + n
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (0x0, 0x1, 0x2):
            self.fragments.append(payload)
            if fin:
                text, self.fragments = b"".join(self.fragments), []
                self._message(json.loads(text))
        elif opcode == 0x9 and self.transport is not None:   # ping: pong
            self.transport.write(_client_frame(0xA, payload))
        elif opcode == 0x8 and self.transport is not None:   # close: closed
            self.transport.close()

    def _message(self, msg: dict[str, Any]) -> None:
        c = self.client.counts
        if msg.get("event") == "moved":
            c.moves += 1
            self.pid = int(msg.get("worker_pid") or 0)
            now = time.monotonic()
            c.last_move_at = now
            if msg.get("latency_ms") is not None:
                c.latencies_ms.append(float(msg["latency_ms"]))
                began = now - float(msg["latency_ms"]) / 1000
                if c.first_move_at is None or began < c.first_move_at:
                    c.first_move_at = began
            if msg.get("n") != self.last_n:
                c.disordered += 1
            return
        if "echo" not in msg:
            return
        seq = int(str(msg["echo"])[1:])
        self.pid = int(msg.get("worker_pid") or 0)
        if seq <= self.last_echoed:
            c.duplicated += 1
            return
        if not self.waiting or self.waiting[0][0] != seq:
            c.disordered += 1
            while self.waiting and self.waiting[0][0] <= seq:
                self.waiting.popleft()
        else:
            c.rtts_ms.append((time.monotonic() - self.waiting.popleft()[1]) * 1000)
        self.last_echoed = seq
        if msg.get("n") != self.last_n + 1:
            c.disordered += 1
        self.last_n = int(msg.get("n") or 0)
        if not self.waiting and self.answered is not None:
            self.answered.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(False)
        if not self.closing:
            self.client.counts.dropped += 1
            self.client.counts.lost += len(self.waiting)
            self.waiting.clear()
        if self.answered is not None:
            self.answered.set()


class _Client:
    """A client process: commands on stdin, one JSON answer a line on stdout."""

    def __init__(self) -> None:
        self.conns: list[_Ws] = []
        self.counts = _Counts()
        self.traffic: asyncio.Task[None] | None = None

    async def open(self, host: str, port: int, n: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(OPEN_CONCURRENCY)
        failed = 0

        async def one() -> None:
            nonlocal failed
            async with sem:
                try:
                    async with asyncio.timeout(30):
                        _t, proto = await loop.create_connection(lambda: _Ws(self, host, port),
                                                                 host, port)
                        if not await proto.opened:
                            failed += 1
                            return
                        proto.answered = asyncio.Event()
                        proto.send_next()
                        await proto.answered.wait()
                        proto.answered = None
                        if proto.closed:
                            failed += 1
                            return
                except (OSError, TimeoutError):
                    failed += 1
                    return
                self.conns.append(proto)

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        return {"opened": len(self.conns), "failed": failed, "secs": time.monotonic() - t0}

    async def _traffic(self, rate: float) -> None:
        """``rate`` messages a second, to each open connection in turn."""
        i = 0
        tick = 0.01
        live: list[_Ws] = []
        while True:
            if not live or live[i % len(live)].closed:   # (not a list of 5,000 every tick)
                live = [c for c in self.conns if not c.closed]
            if not live:
                return
            for _ in range(max(1, round(rate * tick))):
                c = live[i % len(live)]
                i += 1
                if not c.waiting:   # one at a time per connection
                    c.send_next()
            await asyncio.sleep(tick)

    def start_traffic(self, rate: float) -> dict[str, Any]:
        self.counts.rtts_ms.clear()
        self.counts.latencies_ms.clear()
        if rate > 0:
            self.traffic = asyncio.get_running_loop().create_task(self._traffic(rate))
        return {"ok": True}

    async def settle(self, timeout: float) -> dict[str, Any]:
        """Stop the traffic, wait for every echo awaited (those missing are lost)."""
        if self.traffic is not None:
            self.traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.traffic
            self.traffic = None
        deadline = time.monotonic() + timeout
        while any(c.waiting for c in self.conns if not c.closed) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in self.conns:
            if not c.closed and c.waiting:
                self.counts.lost += len(c.waiting)
                c.waiting.clear()
        return self.report()

    async def round(self, timeout: float) -> dict[str, Any]:
        """Every open connection sends one message; which pids answered, how many not."""
        live = [c for c in self.conns if not c.closed]
        for c in live:
            c.answered = asyncio.Event()
            c.send_next()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for c in live:
                    assert c.answered is not None
                    await c.answered.wait()
        pids: dict[int, int] = {}
        unanswered = 0
        for c in live:
            c.answered = None
            if c.waiting or c.closed:
                unanswered += 1
                self.counts.lost += len(c.waiting)
                c.waiting.clear()
            else:
                pids[c.pid] = pids.get(c.pid, 0) + 1
        return {"answered_by": pids, "unanswered": unanswered,
                "closed": sum(c.closed for c in self.conns)}

    def report(self) -> dict[str, Any]:
        c = self.counts
        out = {"dropped": c.dropped, "lost": c.lost, "duplicated": c.duplicated,
               "disordered": c.disordered, "moves": c.moves, "latencies_ms": c.latencies_ms,
               "rtts_ms": c.rtts_ms, "first_move_at": c.first_move_at,
               "last_move_at": c.last_move_at}
        self.counts = _Counts()
        return out

    def close(self) -> None:
        for c in self.conns:
            c.closing = True
            if c.transport is not None:
                with contextlib.suppress(OSError):   # RST: no TIME_WAIT left behind
                    sock = c.transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(__import__("socket").SOL_SOCKET,
                                        __import__("socket").SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                c.transport.close()


async def _client_main() -> None:
    _raise_nofile()
    client = _Client()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        req = json.loads(line)
        op = req["op"]
        if op == "open":
            out = await client.open(req["host"], req["port"], req["n"])
        elif op == "traffic":
            out = client.start_traffic(req["rate"])
        elif op == "settle":
            out = await client.settle(req["timeout"])
        elif op == "round":
            out = await client.round(req["timeout"])
        else:
            client.close()
            await asyncio.sleep(0.2)
            out = {"ok": True}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        if op == "close":
            break


class Clients:
    """The client processes, driven together."""

    def __init__(self, n: int) -> None:
        k = max(1, min(4, -(-n // PER_CLIENT)))
        self.shares = [n // k + (i < n % k) for i in range(k)]
        self.procs = [subprocess.Popen([sys.executable, __file__, "--client"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=_env(ROOT / "src"), text=True)
                      for _ in self.shares]

    def ask(self, reqs: list[dict[str, Any]], timeout: float = 300.0) -> list[dict[str, Any]]:
        for p, req in zip(self.procs, reqs, strict=True):
            stdin: IO[str] | None = p.stdin
            assert stdin is not None
            stdin.write(json.dumps(req) + "\n")
            stdin.flush()
        out = []
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a client process died")
            out.append(json.loads(line))
        return out

    def all(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return self.ask([req] * len(self.procs))

    def open(self, port: int) -> tuple[int, int, float]:
        t0 = time.monotonic()
        outs = self.ask([{"op": "open", "host": "127.0.0.1", "port": port, "n": k}
                         for k in self.shares])
        return (sum(o["opened"] for o in outs), sum(o["failed"] for o in outs),
                time.monotonic() - t0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.all({"op": "close"})
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# --- the servers ----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    total = 0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    control: str = ""

    def status(self) -> dict[str, Any]:
        from sockshare.server._control import request

        resp = request(self.control, {"cmd": "status"}, timeout=10.0)
        st: dict[str, Any] = resp["status"]
        return st

    def command(self, req: dict[str, Any]) -> dict[str, Any]:
        from sockshare.server._control import request

        out: dict[str, Any] = request(self.control, req, timeout=600.0)
        return out

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if len(descendants(self.proc.pid)) >= WORKERS and _answers(self.port):
                if not self.control:
                    return
                with contextlib.suppress(Exception):
                    if sum(w["state"] == "ready" for w in self.status()["workers"]) >= WORKERS:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start:\n"
                           + self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in pids[1:]:   # (its own descendants, if any outlived it)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _answers(port: int) -> bool:
    import http.client

    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/whoami")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except OSError:
        return False


def start(name: str, src: Path, tmp: Path) -> Server:
    port = free_port()
    log = tmp / f"{name}.log"
    if name == "sockshare":
        control = str(tmp / "ctl" / "scale.ctl")
        argv = [sys.executable, "-m", "sockshare.server._cli", "serve", APP,
                "--workers", str(WORKERS), "--bind", f"127.0.0.1:{port}", "--control", control,
                "--no-rebalance", "--log-level", LOG_LEVEL, "--grace", "5"]
    else:
        control = ""
        argv = [sys.executable, "-m", "uvicorn", APP, "--workers", str(WORKERS),
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                "--log-level", LOG_LEVEL, "--backlog", "4096"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=_env(src), cwd=str(tmp), start_new_session=True)
    srv = Server(name, port, proc, log, control)
    srv.wait_ready()
    return srv


# --- one size -------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def _sum(outs: list[dict[str, Any]], key: str) -> int:
    return sum(int(o[key]) for o in outs)


def _worker_pids(srv: Server) -> set[int]:
    return {int(w["pid"]) for w in srv.status()["workers"] if w["pid"] and w["state"] == "ready"}


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """User + system time of ``pid`` so far, in clock ticks, and its minor page faults
    so far ((0, 0) once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), int(fields[7])
    except (OSError, IndexError, ValueError):
        return 0, 0


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]   # (all but idle and iowait)


class CpuMeter(threading.Thread):
    """The CPU time the server's processes (old, new and exiting ones alike) and the
    client processes use during an operation: each process is looked at every 20 ms, and
    counts from its first look to its last. The machine is shared (other people's tests
    run on the same two cores): the wall time of an operation varies with their load,
    its CPU time much less; ``machine_s`` is the CPU time of everything on the machine."""

    def __init__(self, server_pid: int, client_pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.client_pids = server_pid, client_pids
        self.first: dict[int, tuple[int, int]] = {}
        self.last: dict[int, tuple[int, int]] = {}
        self.done = threading.Event()
        self.machine0 = self.machine1 = 0
        self.used: dict[int, float] = {}   # (CPU seconds of each pid, once stopped)
        self.faults: dict[int, int] = {}   # (its minor page faults meanwhile)

    def run(self) -> None:
        self.machine0 = _machine_busy_ticks()
        while True:
            for pid in [self.server_pid, *descendants(self.server_pid), *self.client_pids]:
                t = _cpu_ticks(pid)
                if t[0]:
                    self.first.setdefault(pid, t)
                    self.last[pid] = t
            if self.done.wait(0.02):
                break
        self.machine1 = _machine_busy_ticks()

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        hz = os.sysconf("SC_CLK_TCK")
        self.used = {pid: (self.last[pid][0] - self.first[pid][0]) / hz for pid in self.last}
        self.faults = {pid: self.last[pid][1] - self.first[pid][1] for pid in self.last}
        clients = sum(self.used.get(p, 0.0) for p in self.client_pids)
        return {"server_cpu_s": round(sum(self.used.values()) - clients, 2),
                "client_cpu_s": round(clients, 2),
                "machine_cpu_s": round((self.machine1 - self.machine0) / hz, 2),
                "loadavg": round(os.getloadavg()[0], 2)}

    def by_role(self, before: dict[str, Any], after: dict[str, Any],
                faults: bool = False) -> dict[str, float]:
        """The CPU seconds of each kind of process: the master, the old and the new
        dispatcher, the old and the new workers, the clients (from the status before and
        after the operation; ``other``: what neither names); ``faults``: their minor
        page faults instead."""
        roles: dict[int, str] = dict.fromkeys(self.client_pids, "clients")
        old = {int(w["pid"]) for w in before["workers"] if w["pid"]}
        new = {int(w["pid"]) for w in after["workers"] if w["pid"]}
        for pid in old | new:
            roles[pid] = ("workers (old)" if pid not in new else "workers (new)"
                          if pid not in old else "workers (both)")
        for st, tag in ((before, "old"), (after, "new")):
            if st.get("dispatcher"):
                roles.setdefault(int(st["dispatcher"]), f"dispatcher ({tag})")
        roles.setdefault(self.server_pid, "master")
        out: dict[str, float] = {}
        for pid, secs in self.used.items():
            role = roles.get(pid, "other")
            out[role] = round(out.get(role, 0.0) + (self.faults[pid] if faults else secs), 3)
        return out


#: ``--perf DIR``: a system-wide ``perf record`` over each operation, one file per operation
PERF_DIR: Path | None = None
#: the servers' --log-level (``--log-level``; their logs are in the temporary directory
#: that the last line names: with ``info``, sockshare's log times each step of an operation)
LOG_LEVEL = "warning"
#: ``--py-spy DIR``: ``py-spy record --subprocesses`` of the server over each operation
PYSPY_DIR: Path | None = None


def _perf_start(op: str, n: int, server_pid: int) -> subprocess.Popen[bytes] | None:
    """Start ``perf record -a -g`` (on-CPU samples of every process, the kernel's
    included) into ``PERF_DIR/<op>-<n>-<k>.data``, or py-spy (the server's processes,
    Python stacks, ``PYSPY_DIR/<op>-<n>-<k>.txt`` in collapsed form); None without
    ``--perf`` / ``--py-spy``."""
    out_dir = PERF_DIR or PYSPY_DIR
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    k = len(list(out_dir.glob(f"{op}-{n}-*")))
    if PERF_DIR is not None:
        cmd = ["perf", "record", "-a", "-g", "-F", "499", "-o", str(out_dir / f"{op}-{n}-{k}.data")]
    else:
        cmd = ["py-spy", "record", "--subprocesses", "--rate", "250", "--nonblocking", "--format", "raw",
               "--pid", str(server_pid), "--output", str(out_dir / f"{op}-{n}-{k}.txt")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)   # the profiler attaches before the operation starts
    return proc


def _perf_stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_op(op: str, srv: Server, clients: Clients, n: int, rate: float) -> dict[str, Any]:
    clients.all({"op": "traffic", "rate": rate / len(clients.procs)})
    time.sleep(0.3)
    before = srv.status()
    if op == "reload":
        req: dict[str, Any] = {"cmd": "reload", "wait": True}
    elif op == "upgrade":
        req = {"cmd": "upgrade", "wait": True}
    else:
        source = max(before["workers"], key=lambda w: w["connections"])
        req = {"cmd": "migrate", "from": source["id"], "count": n // 2, "wait": True}
    # done: for a reload or an upgrade, once the old workers (and dispatcher) are gone
    old = {int(w["pid"]) for w in before["workers"] if w["pid"]} if op != "migrate" else set()
    if op == "upgrade":
        old.add(int(before.get("dispatcher") or before["pid"]))
    perf = _perf_start(op, n, srv.proc.pid)
    try:   # (a profiler left running, `perf record -a` above all, outlives this script)
        meter = CpuMeter(srv.proc.pid, [p.pid for p in clients.procs])
        meter.start()
        t0 = time.monotonic()
        resp = srv.command(req)
        deadline = time.monotonic() + 120
        while any(_alive(p) for p in old) and time.monotonic() < deadline:
            time.sleep(0.01)
        took = time.monotonic() - t0
        cpu = meter.stop()
    finally:
        _perf_stop(perf)
    time.sleep(0.3)
    outs = clients.all({"op": "settle", "timeout": 30.0})
    current = _worker_pids(srv)
    rounds = clients.all({"op": "round", "timeout": 60.0})
    stale = sum(k for r in rounds for pid, k in r["answered_by"].items() if int(pid) not in current)
    lat = [x for o in outs for x in o["latencies_ms"]]
    rtts = [x for o in outs for x in o["rtts_ms"]]
    after = srv.status()
    roles = meter.by_role(before, after)
    row = {"op": op, "ok": bool(resp.get("ok")), "secs": round(took, 2),
           "moves": _sum(outs, "moves"),
           "latency_p50_ms": _pct(lat, 0.5), "latency_p99_ms": _pct(lat, 0.99),
           "echo_max_ms": round(max(rtts), 1) if rtts else None, "echoes": len(rtts),
           "dropped": _sum(outs, "dropped"), "lost": _sum(outs, "lost"),
           "duplicated": _sum(outs, "duplicated"), "disordered": _sum(outs, "disordered"),
           "unanswered": sum(r["unanswered"] for r in rounds), "stale": stale,
           "server_lost": after["counters"]["lost"] - before["counters"]["lost"],
           "connections": {w["id"]: w["connections"] for w in after["workers"]
                           if w["state"] == "ready"},
           **cpu}
    # the time before the first move (an upgrade: the new dispatcher starting, its
    # probation) and the moves themselves, first started to last arrived
    firsts = [o["first_move_at"] for o in outs if o.get("first_move_at") is not None]
    lasts = [o["last_move_at"] for o in outs if o.get("last_move_at") is not None]
    if firsts and lasts:
        row["before_moves_secs"] = round(max(0.0, min(firsts) - t0), 2)
        row["moving_secs"] = round(max(lasts) - min(firsts), 2)
        row["moves_per_s"] = round(row["moves"] / row["moving_secs"]) if row["moving_secs"] else None
    moved = row["moves"] or 1
    row["cpu_us_per_move_by_process"] = {k: round(v / moved * 1e6) for k, v in sorted(roles.items())}
    # (a page faulted in costs several µs on a VM that gives freed memory back to its host)
    row["minor_faults_per_move_by_process"] = {
        k: round(v / moved, 2) for k, v in sorted(meter.by_role(before, after, faults=True).items())}
    row["server_cpu_us_per_move"] = round(cpu["server_cpu_s"] / moved * 1e6)
    row["client_cpu_us_per_move"] = round(cpu["client_cpu_s"] / moved * 1e6)
    if op == "migrate":
        row["migrated"] = resp.get("migrated")
        row["refused"] = resp.get("refused")
    return row


def run_size(name: str, n: int, src: Path, tmp: Path, rate: float,
             ops: tuple[str, ...] = OPS, rounds: int = 1, label: str | None = None) -> dict[str, Any]:
    """``name``'s server (``sockshare`` or ``uvicorn``) with N WebSockets, the operations
    ``rounds`` times over; ``label``: how the row names it (``sockshare (base)`` in an
    A/B)."""
    srv = start(name, src, tmp)
    clients = Clients(n)
    try:
        time.sleep(0.5)
        base = rss_kib(srv.proc.pid)
        opened, failed, secs = clients.open(srv.port)
        time.sleep(1.0)
        rss = rss_kib(srv.proc.pid)
        row: dict[str, Any] = {
            "server": label or name, "n": n, "opened": opened, "open_failed": failed,
            "open_secs": round(secs, 2), "open_rate": round(opened / secs) if secs else None,
            "rss_base_mib": round(base / 1024, 1), "rss_mib": round(rss / 1024, 1),
            "rss_per_conn_kib": round((rss - base) / max(1, opened), 2), "ops": []}
        print(f"{label or name} N={n}: opened {opened} ({failed} failed) in {secs:.1f} s, "
              f"{row['rss_per_conn_kib']} KiB/connection", file=sys.stderr)
        if name == "sockshare":
            for _ in range(rounds):
                for op in ops:
                    r = run_op(op, srv, clients, n, rate)
                    print(f"  {op}: {json.dumps(r)}", file=sys.stderr)
                    row["ops"].append(r)
        return row
    finally:
        clients.close()
        srv.stop()


# --- output ---------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| server | N | open/s | RSS/conn KiB | RSS MiB (idle -> N) |",
           "|---|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['server']} | {r['n']:,} | {r['open_rate'] or 0:,} | "
                   f"{r['rss_per_conn_kib']} | {r['rss_base_mib']} -> {r['rss_mib']} |")
    out += ["", "| N | operation | time s (before the first move + moving) | moves "
            "| CPU µs/move server (clients) | machine CPU s "
            "(load) | migration p50 / p99 ms | slowest echo ms "
            "| dropped | lost | dup | disord. | unanswered | stale |",
            "|---:|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for o in r["ops"]:
            out.append(f"| {r['n']:,} | {o['op']} | {o['secs']} ({o.get('before_moves_secs')} + "
                       f"{o.get('moving_secs')}) | {o['moves']:,} | "
                       f"{o.get('server_cpu_us_per_move')} ({o.get('client_cpu_us_per_move')}) | "
                       f"{o.get('machine_cpu_s')} ({o.get('loadavg')}) | "
                       f"{o['latency_p50_ms']} / {o['latency_p99_ms']} | {o['echo_max_ms']} | "
                       f"{o['dropped']} | {o['lost']} | {o['duplicated']} | {o['disordered']} | "
                       f"{o['unanswered']} | {o['stale']} |")
    return "\n".join(out)


def compare(rows: list[dict[str, Any]]) -> str:
    """An A/B's medians: per N and operation (its place in the sequence: a first and a
    second reload differ), the time and the server's CPU a move of each tree, with the
    old and new workers' share, and each run's time."""
    groups: dict[tuple[int, int, str], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        for k, o in enumerate(r["ops"]):
            groups.setdefault((r["n"], k, o["op"]), {}).setdefault(r["server"], []).append(o)
    out = ["| N | operation (#) | tree | time s, median (runs) | moving s, median | server CPU "
           "µs/move, median (old / new workers / dispatcher) | clients µs/move |",
           "|---:|---|---|---|---:|---|---:|"]

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 2) if xs else float("nan")

    for n in sorted({r["n"] for r in rows}):   # (opening the N WebSockets: open/s)
        for tree in ("sockshare (base)", "sockshare"):
            got = [r for r in rows if r["n"] == n and r["server"] == tree and r.get("open_rate")]
            if got:
                out.append(f"| {n:,} | open | {'before' if 'base' in tree else 'after'} | "
                           f"{med([r['open_secs'] for r in got])} "
                           f"({' / '.join(str(r['open_secs']) for r in got)}) | | "
                           f"{med([r['open_rate'] for r in got]):,.0f} opened/s, "
                           f"{med([r['rss_per_conn_kib'] for r in got])} KiB/conn | |")

    for (n, k, op), by_tree in sorted(groups.items()):
        for tree in ("sockshare (base)", "sockshare"):
            got = by_tree.get(tree, [])
            if not got:
                continue
            roles = [o["cpu_us_per_move_by_process"] for o in got]
            old = med([x.get("workers (old)", 0) for x in roles])
            new = med([x.get("workers (new)", x.get("workers (both)", 0)) for x in roles])
            disp = med([sum(v for k, v in x.items() if k.startswith("dispatcher")) for x in roles])
            out.append(f"| {n:,} | {op} ({k + 1}) | {'before' if 'base' in tree else 'after'} | "
                       f"{med([o['secs'] for o in got])} ({' / '.join(str(o['secs']) for o in got)}) | "
                       f"{med([o['moving_secs'] for o in got if o.get('moving_secs') is not None])} | "
                       f"{med([o['server_cpu_us_per_move'] for o in got])} ({old} / {new} / {disp}) | "
                       f"{med([o['client_cpu_us_per_move'] for o in got])} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4.2))
    ours = [r for r in rows if r["server"] == "sockshare"]
    for op in OPS:
        pts = [(r["n"], o["secs"]) for r in ours for o in r["ops"] if o["op"] == op]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=op, color=COLORS[op])
        cpu = [(r["n"], o["server_cpu_us_per_move"]) for r in ours for o in r["ops"]
               if o["op"] == op and o.get("server_cpu_us_per_move")]
        if cpu:
            ax3.plot([p[0] for p in cpu], [p[1] for p in cpu], "o-", label=op, color=COLORS[op])
    ax.set_xlabel("idle WebSockets (N)")
    ax.set_ylabel("seconds (waited for)")
    ax.set_title("sockshare: time to move every connection")
    ax.legend()
    ax.grid(alpha=0.3)
    ax3.set_xlabel("idle WebSockets (N)")
    ax3.set_ylabel("µs of CPU per moved connection")
    ax3.set_title("server CPU per move (all its processes)")
    ax3.set_ylim(bottom=0)
    ax3.legend()
    ax3.grid(alpha=0.3)
    for name, color in (("sockshare", "#2b6cb0"), ("uvicorn", "#718096")):
        pts = [(r["n"], r["rss_per_conn_kib"]) for r in rows if r["server"] == name]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, color=color)
    ax2.set_xlabel("idle WebSockets (N)")
    ax2.set_ylabel("KiB of RSS per connection")
    ax2.set_title("server memory per connection (2 workers)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{APP}, 2 workers, 127.0.0.1 ({label})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    if "--client" in sys.argv[1:]:
        # uvloop where installed (as the workers): the client processes share the two
        # cores with the server, and asyncio's own loop cost them twice its CPU a move
        try:
            import uvloop
        except ImportError:
            asyncio.run(_client_main())
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(_client_main())
        return 0
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--sizes", default="1000,5000",
                    help="comma-separated numbers of WebSockets (default 1000,5000)")
    ap.add_argument("--rate", type=float, default=500.0,
                    help="messages a second in all during each operation (default 500)")
    ap.add_argument("--only", choices=SERVERS, action="append",
                    help="run only this server (repeatable)")
    ap.add_argument("--src", default=str(ROOT / "src"),
                    help="the sockshare source tree the servers run (an A/B: another commit)")
    ap.add_argument("--ops", default=",".join(OPS),
                    help=f"comma-separated operations, in order (default {','.join(OPS)})")
    ap.add_argument("--rounds", type=int, default=1,
                    help="the operations this many times on the same connections (default 1)")
    ap.add_argument("--base-src", default=None, metavar="DIR",
                    help="an A/B: sockshare from this source tree (the tree before a change) "
                         "and from --src, interleaved, --runs times each; prints the medians "
                         "side by side (uvicorn is not run)")
    ap.add_argument("--runs", type=int, default=1,
                    help="with --base-src: runs of each tree (default 1; 3 or more for medians)")
    ap.add_argument("--plot", default=None, metavar="FILE.png")
    ap.add_argument("--log-level", default="warning", choices=["warning", "info", "debug"],
                    help="the servers' log level (default warning; info times each step of "
                         "a reload or upgrade in the sockshare server's log)")
    ap.add_argument("--perf", default=None, metavar="DIR",
                    help="record each operation with a system-wide `perf record -a -g` "
                         "into DIR (Linux perf; for `perf report --sort comm,dso,sym`)")
    ap.add_argument("--py-spy", default=None, metavar="DIR", dest="pyspy",
                    help="record the server's processes with `py-spy record --subprocesses` "
                         "over each operation into DIR (collapsed stacks)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    if not sizes or any(not 2 <= s <= 100_000 for s in sizes):
        ap.error("--sizes: 2..100000 each")
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    if not ops or any(o not in OPS for o in ops):
        ap.error(f"--ops: some of {','.join(OPS)}")
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    global PERF_DIR, PYSPY_DIR, LOG_LEVEL
    LOG_LEVEL = args.log_level
    if args.perf and args.pyspy:
        ap.error("--perf or --py-spy, not both")
    PERF_DIR = Path(args.perf).resolve() if args.perf else None
    PYSPY_DIR = Path(args.pyspy).resolve() if args.pyspy else None
    src = Path(args.src).resolve()
    if not (src / "sockshare" / "server" / "_demo_asgi.py").exists():
        ap.error(f"--src {src}: not a sockshare source tree with the ASGI demo")
    base_src = Path(args.base_src).resolve() if args.base_src else None
    if base_src is not None and not (base_src / "sockshare" / "server" / "_demo_asgi.py").exists():
        ap.error(f"--base-src {base_src}: not a sockshare source tree with the ASGI demo")
    if args.runs < 1:
        ap.error("--runs: at least 1")
    limit = _raise_nofile()
    if limit < max(sizes) // WORKERS + 512:
        ap.error(f"RLIMIT_NOFILE hard limit {limit}: too low for {max(sizes)} connections "
                 f"(raise it: ulimit -Hn)")
    if limit < max(sizes) + 512:
        print(f"RLIMIT_NOFILE {limit}: a worker cannot hold all {max(sizes)} connections; "
              f"the migration's moves that do not fit are refused (they stay where they are)",
              file=sys.stderr)
    sys.path.insert(0, str(src))
    command = shlex.join(["python", *sys.argv])
    tmp = Path(tempfile.mkdtemp(prefix="ss-scale-"))
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for n in sizes:
        if base_src is not None:
            # interleaved, the order swapped every other run (the machine's load drifts)
            for k in range(args.runs):
                trees = [("sockshare (base)", base_src), ("sockshare", src)]
                for label, tree in trees if k % 2 == 0 else trees[::-1]:
                    d = tmp / label.replace(" ", "_").strip("()") / str(n) / str(k)
                    d.mkdir(parents=True)
                    rows.append(run_size("sockshare", n, tree, d, args.rate, ops, args.rounds,
                                         label=label))
            continue
        for name in args.only or SERVERS:
            (tmp / name / str(n)).mkdir(parents=True)
            rows.append(run_size(name, n, src, tmp / name / str(n), args.rate, ops, args.rounds))
    label = _git_describe(src) or str(src)
    out = {"command": command, "src": label,
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "platform": platform.platform()},
           "duration_s": round(time.monotonic() - t0, 1), "rate": args.rate, "rows": rows}
    failures = sum(o[k] for r in rows for o in r["ops"]
                   for k in ("dropped", "lost", "duplicated", "disordered", "unanswered", "stale"))
    failures += sum(r["n"] - r["opened"] for r in rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(rows))
    print()
    if base_src is not None:
        print(compare(rows))
        print()
    lat = [o["latency_p99_ms"] for r in rows for o in r["ops"] if o["latency_p99_ms"] is not None]
    if lat:
        print(f"migration latency p99, median over operations: {statistics.median(lat):.3f} ms")
    print(f"failures (not opened, dropped, lost, duplicated, disordered, unanswered, stale): "
          f"{failures}")
    print(f"command: {command}  (src {label}; logs in {tmp})")
    print(f"wrote {os.path.relpath(args.out)}")
    if args.plot:
        plot(rows, Path(args.plot), label)
        print(f"wrote {args.plot}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
