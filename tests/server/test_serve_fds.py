"""Descriptors: no growth in the dispatcher after 20,000 connections, and no outage when
they run out (RLIMIT_NOFILE 128, bursts of 1,000 connections).

The dispatcher holds every accepted socket until the worker's ACCEPT arrives; a leak in
any path (batching, tickets, the accept loop) would show as growth of
``/proc/<dispatcher>/fd``. The count is taken after a warm-up (lazily opened
descriptors: the event loop's self-pipe, child watchers) and compared once the server
is idle again. Clients close with a reset so that 20,000 TIME_WAIT entries do not pile
up on the loopback ports.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from serve_helpers import Server, ask, read_line

pytestmark = pytest.mark.timeout(150)

TOTAL = 20_000
THREADS = 16
_RST = struct.pack("ii", 1, 0)


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def test_no_fd_growth_after_20000_connections(tmp_path: Path) -> None:
    with Server(tmp_path, "--log-level", "warning", workers=2) as srv:
        addr = srv.address()
        for _ in range(50):
            ask(addr)
        srv.wait_for(lambda st: all(w["connections"] == 0 and w["inflight"] == 0
                                    for w in st["workers"]), what="idle")
        before = _fds(srv.dispatcher)
        errors: list[BaseException] = []
        ok = [0] * THREADS

        def client(k: int) -> None:
            try:
                for _ in range(TOTAL // THREADS):
                    s = socket.socket()
                    s.settimeout(10)
                    s.connect(addr)
                    s.sendall(b"who\n")
                    if b"hid" in read_line(s):
                        ok[k] += 1
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
                    s.close()
            except BaseException as exc:  # reported below
                errors.append(exc)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(140)
        elapsed = time.monotonic() - t0
        assert not errors, errors[:3]
        assert sum(ok) == TOTAL
        st = srv.wait_for(lambda st: all(w["connections"] == 0 and w["inflight"] == 0
                                         for w in st["workers"]), what="idle again")
        assert st["counters"]["handoffs"] >= TOTAL + 50
        assert st["counters"]["refused"] == 0
        deadline = time.monotonic() + 5
        after = _fds(srv.dispatcher)
        while len(after) != len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
            after = _fds(srv.dispatcher)
        grown = {fd: t for fd, t in after.items() if fd not in before}
        assert len(after) <= len(before), f"new descriptors: {grown}"
        print(f"{TOTAL} connections in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s); "
              f"dispatcher fds {len(before)} -> {len(after)}")


# --- file-descriptor exhaustion -------------------------------------------------------

NOFILE = 128
BURST = 1000
BURSTS = 2


def _burst(addr: tuple[str, int], n: int, cmd: bytes, timeout: float = 60.0) -> Counter[str]:
    """``n`` connections at once (non-blocking, one thread); each sends ``cmd`` once
    connected and reads until the server closes. The outcome of each: ``served`` (its
    answer came), ``refused`` (ECONNREFUSED at connect), ``reset`` (an RST after the
    connection was established), ``eof`` (closed without an answer), ``timeout``."""
    sel = selectors.DefaultSelector()
    out: Counter[str] = Counter()
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        err = c.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            out["refused" if err == errno.ECONNREFUSED else errno.errorcode[err]] += 1
            c.close()
            continue
        sel.register(c, selectors.EVENT_WRITE, [b"", False])

    def done(s: socket.socket, what: str) -> None:
        out[what] += 1
        sel.unregister(s)
        s.close()

    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ev in sel.select(0.5):
            s, st = key.fileobj, key.data
            assert isinstance(s, socket.socket)
            if not st[1]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    done(s, "refused" if err == errno.ECONNREFUSED else errno.errorcode[err])
                    continue
                try:
                    s.send(cmd)
                except OSError as exc:
                    done(s, "reset" if isinstance(exc, ConnectionResetError) else repr(exc))
                    continue
                st[1] = True
                sel.modify(s, selectors.EVENT_READ, st)
                continue
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                done(s, "reset")
                continue
            if chunk:
                st[0] += chunk
            else:
                done(s, "served" if b'"hid"' in st[0] else "eof")
    for key in list(sel.get_map().values()):
        assert isinstance(key.fileobj, socket.socket)
        done(key.fileobj, "timeout")
    sel.close()
    return out


class _Watch(threading.Thread):
    """Samples the server's status every 0.1 s: how long no worker was ready (or the
    dispatcher could not even answer its control socket)."""

    def __init__(self, srv: Server) -> None:
        super().__init__(daemon=True)
        self.srv = srv
        self.stop = threading.Event()
        self.without_worker = 0.0
        self.unanswered = 0

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.1):
            try:
                ready = sum(w["state"] == "ready" for w in self.srv.status()["workers"])
            except Exception:
                ready = 0
                self.unanswered += 1
            now = time.monotonic()
            if not ready:
                self.without_worker += now - last
            last = now


def test_fd_exhaustion_keeps_the_pool(tmp_path: Path) -> None:
    """Under RLIMIT_NOFILE 128, bursts of 1,000 connections that each keep a worker
    busy 0.5 s (so that both workers would hold hundreds at once): the dispatcher stops
    accepting before it runs out (connections wait in the kernel's accept queue), a
    worker near its limit refuses handoffs instead of dying (they go to the other one, or
    wait), so the same workers serve every connection: none reset after accept, nothing
    counted lost, the counters exact, and no descriptor left behind."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < BURST + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, BURST + 256), hard))
    with Server(tmp_path, "--log-level", "warning", "--queue", str(BURST), workers=2,
                nofile=NOFILE) as srv:
        addr = srv.address()
        ask(addr)
        st = srv.wait_for(lambda st: all(w["connections"] == 0 and w["inflight"] == 0
                                         for w in st["workers"]), what="idle")
        pids = {w["id"]: w["pid"] for w in st["workers"]}
        before = _fds(srv.dispatcher)
        watch = _Watch(srv)
        watch.start()
        totals: Counter[str] = Counter()
        leaked: set[int] = set()
        asks = 0
        try:
            totals += _burst(addr, BURST, b"sleep 0.5\n")
            # now each worker keeps 30 more descriptors than it announced it would
            asks = 0
            while len(leaked) < 2 and asks < 50:
                leaked.add(ask(addr, "leak 30")["id"])
                asks += 1
            assert len(leaked) == 2
            totals += _burst(addr, BURST, b"sleep 0.5\n")
        finally:
            watch.stop.set()
            watch.join(5)
        st = srv.wait_for(lambda st: all(w["connections"] == 0 and w["inflight"] == 0
                                         for w in st["workers"]), timeout=30, what="idle again")
        c = st["counters"]
        print(f"RLIMIT_NOFILE {NOFILE}, {BURSTS} bursts of {BURST}: {dict(totals)}; worker "
              f"restarts {sum(w['restarts'] for w in st['workers'])}, "
              f"{watch.without_worker:.1f} s without a ready worker, "
              f"{watch.unanswered} status request(s) unanswered; counters: handoffs "
              f"{c['handoffs']}, lost {c['lost']}, refused {c['refused']}, rejects {c['rejects']}, "
              f"accepting paused {c.get('fd_pauses')} time(s), handoffs refused by a worker out "
              f"of descriptors {c.get('fd_rejects')}")
        log = srv.log()
        assert "truncated" not in log
        assert "Traceback" not in log
        assert totals == Counter(served=BURSTS * BURST), totals
        assert {w["id"]: w["pid"] for w in st["workers"]} == pids
        assert all(w["restarts"] == 0 for w in st["workers"])
        assert watch.without_worker == 0.0
        assert c["handoffs"] == BURSTS * BURST + 1 + asks
        assert c["lost"] == 0
        assert c["refused"] == 0
        assert c["fd_rejects"] > 0   # (the second burst: the workers refused, not died)
        deadline = time.monotonic() + 5
        after = _fds(srv.dispatcher)
        while len(after) > len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
            after = _fds(srv.dispatcher)
        assert len(after) <= len(before), {fd: t for fd, t in after.items() if fd not in before}
        assert ask(addr)["pid"] in pids.values()
