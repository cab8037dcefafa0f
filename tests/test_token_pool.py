"""Importers keep one connection per export agent and reuse it: imports stay correct,
descriptors stay bounded, a connection the agent dropped is replaced transparently, and a
forked child never shares its parent's connection."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

import sockshare
from sockshare import _tokens
from sockshare.backends import _agent
from sockshare.backends._agent import agent
from tests._fdcount import wait_fd_count
from tests.conftest import fd_count


@pytest.fixture
def warm() -> Iterator[int]:
    """This process's agent running and its pool empty; yields the fd baseline."""
    a, b = socket.socketpair()
    with a, b:
        sockshare.import_socket(sockshare.export_socket(a, os.getpid())).close()
    sockshare.close_agent_connections()
    time.sleep(0.05)
    base = fd_count()
    yield base
    sockshare.close_agent_connections()


def _round_trip() -> None:
    a, b = socket.socketpair()
    with a, b:
        s = sockshare.import_socket(sockshare.export_socket(a, os.getpid()))
        s.sendall(b"x")
        assert b.recv(1) == b"x"
        s.close()


def test_many_imports_reuse_one_connection(warm: int) -> None:
    _round_trip()
    # one pooled connection here, and the agent's end of it (same process)
    wait_fd_count("self", warm + 2, what="after the first import")
    for _ in range(1000):
        _round_trip()
    assert agent().pending() == 0
    wait_fd_count("self", warm + 2, what="after 1,000 more imports")
    assert sockshare.close_agent_connections() == 1
    wait_fd_count("self", warm, what="after closing the pool")


def test_refusals_keep_the_connection_usable(warm: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, os.getpid())
        sockshare.import_socket(token).close()
        for _ in range(3):
            with pytest.raises(sockshare.TokenConsumed):
                sockshare.import_socket(token)
        _round_trip()
    assert sum(len(c) for c in _tokens._pool.values()) == 1


def test_a_connection_the_agent_dropped_is_replaced(warm: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_agent, "IDLE_DEADLINE", 0.2)
    _round_trip()
    (pooled,) = (c for cs in _tokens._pool.values() for c in cs)
    time.sleep(0.8)  # the agent's sweep closes the idle connection
    _round_trip()  # the stale one fails on first use; a fresh one serves the import
    (fresh,) = (c for cs in _tokens._pool.values() for c in cs)
    assert pooled.fileno() == -1
    assert fresh is not pooled


def test_a_forked_child_does_not_use_the_parents_connection(warm: int) -> None:
    _round_trip()
    (pooled,) = (c for cs in _tokens._pool.values() for c in cs)
    fd = pooled.fileno()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its copy of the pooled connection is closed, the pool empty
        try:
            os.fstat(fd)
            ok = False
        except OSError:
            ok = not _tokens._pool
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    _round_trip()  # the parent's connection still works
    assert pooled.fileno() == fd
