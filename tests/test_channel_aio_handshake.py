"""The asyncio channel's handshake runs on the event loop, not in worker threads.

* ``AsyncChannel.connect`` and ``AsyncChannelListener.accept`` start no thread (they
  used to run the blocking handshake with ``asyncio.to_thread`` and a thread pool);
* the loop stays free meanwhile: a peer that says nothing holds only its own
  handshake, and a task beside it keeps running;
* refusals read on the loop still say why (the listener's policy, here a pid
  allow-list), and every descriptor is closed after them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import sockshare
from tests.conftest import fd_count


def test_connect_and_accept_start_no_thread(sock_dir: Path) -> None:
    path = str(sock_dir / "a.sock")

    async def main() -> None:
        lst = sockshare.AsyncChannelListener.listen(path)
        threads = set(threading.enumerate())
        accepting = asyncio.ensure_future(lst.accept())
        peer = await asyncio.wait_for(sockshare.AsyncChannel.connect(path, name="p"), 10)
        ch = await asyncio.wait_for(accepting, 10)
        assert set(threading.enumerate()) == threads
        assert ch.peer.name == "p"
        assert peer.peer.pid == os.getpid()
        left, right = socket.socketpair()
        tickets = peer.send_nowait([(left, {"n": 1}, b"x")])
        h = await asyncio.wait_for(ch.receive(), 5)
        assert (h.meta, h.data) == ({"n": 1}, b"x")
        h.accept()
        await asyncio.wait_for(peer.wait(tickets), 5)
        assert tickets[0].state == "accepted"
        h.socket.close()
        right.close()
        await ch.aclose()
        await peer.aclose()
        lst.close()

    before = fd_count()
    asyncio.run(main())
    assert fd_count() == before


def test_a_silent_peer_leaves_the_loop_free(sock_dir: Path) -> None:
    path = str(sock_dir / "s.sock")

    async def main() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        t0 = time.monotonic()
        with pytest.raises(sockshare.PeerRefused, match=r"no HELLO within 0\.3 s"):
            await sockshare.AsyncChannel.connect(path, timeout=0.3)
        assert time.monotonic() - t0 < 3
        assert ticks >= 10  # the loop ran on while the handshake waited
        ticker.cancel()
        listener.close()

    before = fd_count()
    asyncio.run(main())
    assert fd_count() == before


def test_a_refusal_is_read_on_the_loop(sock_dir: Path) -> None:
    path = str(sock_dir / "r.sock")

    async def main() -> None:
        lst = sockshare.AsyncChannelListener(sockshare.Channel.listen(path, allow_pids=[1]))
        accepting = asyncio.ensure_future(lst.accept())
        with pytest.raises(sockshare.PeerRefused, match="allow-list"):
            await asyncio.wait_for(sockshare.AsyncChannel.connect(path), 10)
        await asyncio.sleep(0.05)
        assert not accepting.done()
        accepting.cancel()
        lst.close()

    before = fd_count()
    asyncio.run(main())
    assert fd_count() == before
