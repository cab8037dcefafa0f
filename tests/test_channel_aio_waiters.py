"""Waiting on an AsyncChannel costs O(1) a wake-up, whatever the number of waiters (#19).

* K tasks each in ``await ch.send()`` (acked): a read of the channel wakes the tasks
  whose tickets it answered, not all K (it used to: O(K) callbacks a read, so
  O(K²) for the lot). Counted in loop callbacks, which is what a wake-up costs;
  every ticket gets its own answer (accepted or rejected), no descriptor is left over.
* A channel that breaks, or that this side closes, still wakes every waiter once.
* ``AsyncChannelListener.accept()``: a peer ready wakes one waiting accept(), and one
  woken but cancelled before it ran passes the peer on to the next.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from contextvars import Context
from pathlib import Path
from typing import TypeVarTuple

import pytest

import sockshare
from tests.conftest import fd_count

K = 5_000
_Ts = TypeVarTuple("_Ts")


class CountingLoop(asyncio.SelectorEventLoop):
    """A selector loop that counts the callbacks scheduled with call_soon (every
    future resolved and every task woken goes through it)."""

    calls = 0

    def call_soon(self, callback: Callable[[*_Ts], object], *args: *_Ts,
                  context: Context | None = None) -> asyncio.Handle:
        self.calls += 1
        return super().call_soon(callback, *args, context=context)


def _pair() -> tuple[sockshare.AsyncChannel, sockshare.AsyncChannel]:
    a, b = sockshare.Channel.pair()
    return sockshare.AsyncChannel.wrap(a), sockshare.AsyncChannel.wrap(b)


def test_k_concurrent_acked_sends_wake_each_sender_once() -> None:
    base = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    before = fd_count()

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, CountingLoop)
        a, b = _pair()
        socks = [socket.socket(fileno=socket.dup(base.fileno())) for _ in range(K)]

        async def receiver() -> None:
            n = 0
            async for h in b:
                if h.meta["i"] % 3 == 0:
                    h.reject(f"no {h.meta['i']}")
                else:
                    h.accept()
                    h.socket.close()
                n += 1
                if n == K:
                    return

        t0 = time.monotonic()
        calls0 = loop.calls
        receiving = asyncio.ensure_future(receiver())
        tickets = await asyncio.wait_for(asyncio.gather(
            *(a.send(s, meta={"i": i}) for i, s in enumerate(socks))), 120)
        await asyncio.wait_for(receiving, 30)
        calls, took = loop.calls - calls0, time.monotonic() - t0
        for i, (s, t) in enumerate(zip(socks, tickets, strict=True)):
            if i % 3 == 0:
                assert t.state == "rejected", t
                assert t.reason == f"no {i}"
                assert t.socket is s
                assert s.fileno() >= 0
                s.close()
            else:
                assert t.state == "accepted", t
                assert t.socket is None
                assert s.fileno() == -1  # the sender's copy was closed
        assert {t.id for t in a.returned()} == {t.id for t in tickets[::3]}
        assert not a._ticket_waiters
        await a.aclose()
        await b.aclose()
        return calls, took

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        calls, took = runner.run(main())
    base.close()
    assert fd_count() == before - 1
    # per handoff: a task started, its sender woken once, gather told, the receiver's
    # own wake-ups (shared), a few flushes; broadcasting every read to every waiting
    # sender took hundreds of thousands here
    assert calls < 8 * K, calls
    assert took < 60, took


def test_a_break_and_a_close_wake_every_sender_once() -> None:
    before = fd_count()

    async def main() -> None:
        for how in ("break", "close"):
            a, b = _pair()
            pairs = [socket.socketpair() for _ in range(50)]
            sending = [asyncio.ensure_future(a.send(left)) for left, _right in pairs]
            while len(b._state.incoming) < 50 or a._wq:  # all arrived, none answered
                await asyncio.sleep(0.01)
            assert len(a._ticket_waiters) == 50
            if how == "break":
                b._sock.shutdown(socket.SHUT_RDWR)  # gone without a word: a breaks
            else:
                a.close_timeout = 0.05
                await a.aclose()
            tickets = await asyncio.wait_for(asyncio.gather(*sending), 10)
            assert not a._ticket_waiters
            states = {t.state for t in tickets}
            assert states == ({"returned"} if how == "break" else {"abandoned"}), states
            for (left, right), t in zip(pairs, tickets, strict=True):
                assert (t.socket is left) == (how == "break")
                left.close()
                right.close()
            await a.aclose()
            await b.aclose()

    asyncio.run(main())
    assert fd_count() == before


def test_a_peer_wakes_one_accept_and_a_cancelled_one_passes_it_on(sock_dir: Path) -> None:
    path = str(sock_dir / "a.sock")
    before = fd_count()

    async def main() -> None:
        lst = sockshare.AsyncChannelListener.listen(path)
        first = asyncio.ensure_future(lst.accept())
        second = asyncio.ensure_future(lst.accept())
        await asyncio.sleep(0.01)
        assert len(lst._waiters) == 2
        connecting = asyncio.ensure_future(sockshare.AsyncChannel.connect(path))
        while not lst._ready:  # the peer is ready and ``first`` woken, not yet run
            await asyncio.sleep(0)
        assert not first.done()
        assert len(lst._waiters) == 1
        first.cancel()
        ch = await asyncio.wait_for(second, 10)
        assert first.cancelled()
        peer = await connecting
        # several peers at once: each accept() gets its own
        waiting = [asyncio.ensure_future(lst.accept()) for _ in range(5)]
        peers = [await sockshare.AsyncChannel.connect(path) for _ in range(5)]
        chans = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert len({id(c) for c in chans}) == 5
        assert not lst._ready
        for c in [ch, peer, *chans, *peers]:
            await c.aclose()
        # close wakes every accept() still waiting
        left = [asyncio.ensure_future(lst.accept()) for _ in range(3)]
        await asyncio.sleep(0.01)
        lst.close()
        for task in left:
            try:
                await asyncio.wait_for(task, 5)
            except sockshare.ChannelClosed:
                pass
            else:
                raise AssertionError("accept() on a closed listener returned")

    asyncio.run(main())
    assert fd_count() == before


def test_a_waiter_that_times_out_leaves_the_others_waiting() -> None:
    before = fd_count()

    async def main() -> None:
        a, b = _pair()
        left, right = socket.socketpair()
        ticket = a.send_nowait([(left, None, b"")])[0]
        patient = asyncio.ensure_future(a.wait([ticket]))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.wait([ticket]), 0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.send(right), 0.05)  # its own ticket, given up on
        assert len(a._ticket_waiters) == 1  # the patient one only
        assert not patient.done()
        h = await asyncio.wait_for(b.receive(), 5)
        h.accept()
        h.socket.close()
        await asyncio.wait_for(patient, 5)
        assert ticket.state == "accepted"
        assert not a._ticket_waiters
        h2 = await asyncio.wait_for(b.receive(), 5)
        h2.reject("later")
        await asyncio.wait_for(a.wait(a.returned()), 5)
        await a.aclose()
        await b.aclose()
        right.close()

    asyncio.run(main())
    assert fd_count() == before
