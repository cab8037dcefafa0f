"""Capacity, the bounded queue, and refusal as documented in docs/server.md.

A refused connection is closed at once with a reset: the client reads no byte of an
answer -- ``recv`` raises ConnectionResetError (or returns EOF) -- and the dispatcher
counts it in ``refused{reason}`` and logs one line.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from serve_helpers import Server, connect, hold, read_line, silent

pytestmark = pytest.mark.timeout(60)


def refused(s: socket.socket, within: float = 3.0) -> bool:
    """True if the server closed ``s`` without sending a byte."""
    s.settimeout(within)
    try:
        data = s.recv(100)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


def refused_new(addr: object, payload: bytes = b"who\n") -> bool:
    """Open a connection and check it is refused (the reset may already hit connect)."""
    try:
        s = connect(addr)
    except ConnectionResetError:
        return True
    with s:
        try:
            s.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            return True
        return refused(s)


def test_queue_waits_then_refuses(tmp_path: Path) -> None:
    with Server(tmp_path, "--max-conns", "1", "--queue", "2", workers=1) as srv:
        addr = srv.address()
        a, _ = hold(addr)
        b = connect(addr)
        b.sendall(b"hold\n")
        c = connect(addr)
        c.sendall(b"hold\n")
        srv.wait_for(lambda st: st["pools"][0]["queue"] == 2, what="two queued connections")
        try:
            assert refused_new(addr), "past the queue a connection must be refused at once"
            assert refused_new(addr, b"")
            assert silent(b), "queued connections wait, unanswered"
            assert silent(c)
            st = srv.status()
            assert st["counters"]["refused_by_reason"] == {"queue_full": 2}
            assert st["pools"][0]["queue"] == 2
            assert st["workers"][0]["connections"] == 1
            a.close()                              # a slot frees: b is served, c still waits
            b.settimeout(5)
            assert b"hid" in read_line(b)
            assert silent(c)
            b.close()
            c.settimeout(5)
            assert b"hid" in read_line(c)
        finally:
            for s in (a, b, c):
                s.close()
        st = srv.wait_for(lambda st: st["workers"][0]["connections"] == 0, what="all closed")
        assert st["pools"][0]["queue"] == 0
        assert st["counters"]["handoffs"] == 3
        assert srv.log().count("(queue_full)") == 2


def test_queue_timeout_refuses(tmp_path: Path) -> None:
    with Server(tmp_path, "--max-conns", "1", "--queue", "4", "--queue-timeout", "0.5",
                workers=1) as srv:
        addr = srv.address()
        a, _ = hold(addr)
        b = connect(addr)
        b.sendall(b"who\n")
        t0 = time.monotonic()
        try:
            assert refused(b, within=5.0)
            assert 0.4 < time.monotonic() - t0 < 3.0
            assert srv.status()["counters"]["refused_by_reason"] == {"queue_timeout": 1}
        finally:
            a.close()
            b.close()


def test_queue_zero_refuses_when_full(tmp_path: Path) -> None:
    with Server(tmp_path, "--max-conns", "2", "--queue", "0", workers=2) as srv:
        addr = srv.address()
        held = [hold(addr)[0] for _ in range(4)]
        try:
            assert refused_new(addr)
            assert srv.status()["counters"]["refused_by_reason"] == {"queue_full": 1}
        finally:
            for s in held:
                s.close()
