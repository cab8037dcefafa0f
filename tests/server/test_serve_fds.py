"""No descriptor growth in the dispatcher after 20,000 connections.

The dispatcher holds every accepted socket until the worker's ACCEPT arrives; a leak in
any path (batching, tickets, the accept loop) would show as growth of
``/proc/<dispatcher>/fd``. The count is taken after a warm-up (lazily opened
descriptors: the event loop's self-pipe, child watchers) and compared once the server
is idle again. Clients close with a reset so that 20,000 TIME_WAIT entries do not pile
up on the loopback ports.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import Server, ask

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
        before = _fds(srv.pid)
        errors: list[BaseException] = []
        ok = [0] * THREADS

        def client(k: int) -> None:
            try:
                for _ in range(TOTAL // THREADS):
                    s = socket.socket()
                    s.settimeout(10)
                    s.connect(addr)
                    s.sendall(b"who\n")
                    buf = b""
                    while not buf.endswith(b"\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    if b"hid" in buf:
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
        after = _fds(srv.pid)
        while len(after) != len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
            after = _fds(srv.pid)
        grown = {fd: t for fd, t in after.items() if fd not in before}
        assert len(after) <= len(before), f"new descriptors: {grown}"
        print(f"{TOTAL} connections in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s); "
              f"dispatcher fds {len(before)} -> {len(after)}")
