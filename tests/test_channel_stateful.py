"""Random interleavings of every channel call, on both ends of a real channel.

A hypothesis state machine drives two :class:`sockshare.Channel` ends over a real
UNIX socket pair, from one thread: whichever end is not being called is a peer that
"stops calling for a while", for as long as hypothesis likes. It sends (one, many,
acknowledged or not), receives, accepts, rejects, waits on tickets, collects returned
tickets, closes cleanly, or lets a side die (every descriptor it held closed at once,
no goodbye, as the kernel does for a killed process).

What it checks, after every call and at the end:

* no call blocks beyond its timeout (``receive``/``wait`` get 50 ms, sends and closes
  their ``send_timeout``/``close_timeout``), whatever the other end is doing;
* every connection handed over ends up in exactly one place -- served by the receiver,
  back with the sender, or closed with a state or an error that says so -- which is
  checked against the kernel: each connection's socket inode is open in exactly as many
  descriptors of this process (0 or 1) as the API says;
* ``/proc/self/fd`` is back to its baseline when both ends are gone.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import sockshare

CALL_TIMEOUT = 0.05
SEND_TIMEOUT = 0.05
CLOSE_TIMEOUT = 0.2
SLACK = 0.5  # scheduling noise on a busy 2-core machine


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _open_inodes() -> dict[int, int]:
    """How many of this process's descriptors refer to each socket inode."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ino = int(target[8:-1])
            out[ino] = out.get(ino, 0) + 1
    return out


@dataclass
class Conn:
    """One connection handed over: ``x`` travels, ``y`` stays with the test."""

    n: int
    x: socket.socket
    y: socket.socket
    ino: int
    sender: int
    ticket: sockshare.Ticket | None = None
    handoff: sockshare.Handoff | None = None
    served: bool = False  # the receiver accepted it and the API said it may serve it
    died: str = ""  # a side that died held a copy

    def holders(self) -> list[socket.socket]:
        """The open socket objects of this connection that the API handed to someone."""
        out: dict[int, socket.socket] = {}
        for sock in (self.x, self.ticket.socket if self.ticket else None,
                     self.handoff.socket if self.handoff else None):
            if sock is not None and sock.fileno() >= 0:
                out[id(sock)] = sock
        return list(out.values())


@dataclass
class Side:
    ch: sockshare.Channel
    alive: bool = True
    closed: bool = False
    held: list[sockshare.Handoff] = field(default_factory=list)  # received, unanswered


class ChannelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.baseline = len(os.listdir("/proc/self/fd"))
        a, b = sockshare.Channel.pair()
        for ch in (a, b):
            ch.send_timeout = SEND_TIMEOUT
            ch.close_timeout = CLOSE_TIMEOUT
            # small buffers: a few unread frames fill them, so the queues, the waits for
            # room and the timeouts all take part
            ch._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum: about 4.5 KiB
            ch._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        self.sides = [Side(a), Side(b)]
        self.conns: list[Conn] = []
        self.steps = 0

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def _timed(limit: float, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            took = time.monotonic() - t0
            assert took < limit + SLACK, f"{fn.__name__} blocked {took:.2f} s (limit {limit})"

    def _calling(self, i: int) -> bool:
        s = self.sides[i]
        return s.alive and not s.closed

    def _new_conn(self, sender: int) -> Conn:
        x, y = socket.socketpair()
        c = Conn(len(self.conns), x, y, _inode(x), sender)
        self.conns.append(c)
        return c

    # -- rules ---------------------------------------------------------------------

    @precondition(lambda self: len(self.conns) < 120)
    @rule(i=st.integers(0, 1), ack=st.booleans())
    def send(self, i: int, ack: bool) -> None:
        if not self._calling(i):
            return
        c = self._new_conn(i)
        try:
            c.ticket = self._timed(SEND_TIMEOUT, self.sides[i].ch.send, c.x, meta={"n": c.n}, ack=ack)
        except (sockshare.ChannelTimeout, sockshare.ChannelBroken) as exc:
            event(f"send: {type(exc).__name__}")
            assert c.x.fileno() >= 0  # nothing went: still ours
            return
        if self.sides[i].ch._out:
            event("send: frames queued behind")

    @precondition(lambda self: len(self.conns) < 120)
    @rule(i=st.integers(0, 1), k=st.integers(2, 16), ack=st.booleans())
    def send_many(self, i: int, k: int, ack: bool) -> None:
        if not self._calling(i):
            return
        cs = [self._new_conn(i) for _ in range(k)]
        try:
            ts = self._timed(SEND_TIMEOUT * k, self.sides[i].ch.send_many,
                             [(c.x, {"n": c.n}, b"") for c in cs], ack=ack)
        except sockshare.ChannelTimeout as exc:
            event("send_many: ChannelTimeout")
            ts = exc.sent
        except sockshare.ChannelBroken:
            ts = []
        for c, t in zip(cs, ts, strict=False):
            c.ticket = t
        for c in cs[len(ts):]:
            assert c.x.fileno() >= 0

    @precondition(lambda self: len(self.conns) < 120)
    @rule(i=st.integers(0, 1), ack=st.booleans())
    def burst(self, i: int, ack: bool) -> None:
        """A side busy sending while the other does not call: fills the socket."""
        for _ in range(20):
            n = len(self.conns)
            self.send(i, ack)
            if self.conns[n:] and self.conns[n].ticket is None:
                break  # full (timed out) or broken: the point is made

    @rule(i=st.integers(0, 1), accept=st.booleans())
    def take_everything(self, i: int, accept: bool) -> None:
        """Receive all that is there, then answer it all (ACCEPTs pile up at a peer that
        does not read)."""
        for _ in range(60):
            before = len(self.sides[i].held)
            self.receive(i)
            if len(self.sides[i].held) == before:
                break
        if accept:
            self.accept_all(i)

    @rule(i=st.integers(0, 1))
    def receive(self, i: int) -> None:
        s = self.sides[i]
        if not self._calling(i):
            return
        try:
            h = self._timed(CALL_TIMEOUT, s.ch.receive, timeout=CALL_TIMEOUT)
        except (sockshare.ChannelTimeout, sockshare.ChannelEnded, sockshare.ChannelBroken):
            return
        c = self.conns[h.meta["n"]]
        assert c.sender != i
        assert c.handoff is None
        assert _inode(h.socket) == c.ino  # the very connection that was sent
        c.handoff = h
        if h.acked:
            s.held.append(h)
        else:
            c.served = True

    @rule(i=st.integers(0, 1), data=st.data())
    def answer(self, i: int, data: st.DataObject) -> None:
        s = self.sides[i]
        if not self._calling(i) or not s.held:
            return
        h = s.held.pop(data.draw(st.integers(0, len(s.held) - 1)))
        c = self.conns[h.meta["n"]]
        if data.draw(st.booleans()):
            try:
                self._timed(CALL_TIMEOUT, h.accept)
                if self.sides[i].ch._out:
                    event("accept: answer queued (the peer does not read)")
            except sockshare.ChannelBroken:
                h.socket.close()  # the channel ended first: not ours to serve
                return
            c.served = True
        else:
            try:
                self._timed(CALL_TIMEOUT, h.reject, "no room")
            except sockshare.ChannelBroken:
                pass
            assert h.socket.fileno() == -1

    @rule(i=st.integers(0, 1))
    def accept_all(self, i: int) -> None:
        s = self.sides[i]
        if not self._calling(i) or not s.held:
            return
        held, s.held = s.held, []
        try:
            self._timed(CALL_TIMEOUT, s.ch.accept_all, held)
        except sockshare.ChannelBroken:
            for h in held:
                h.socket.close()
            return
        if s.ch._out:
            event("accept_all: answers queued (the peer does not read)")
        for h in held:
            self.conns[h.meta["n"]].served = True

    @rule(i=st.integers(0, 1), data=st.data())
    def wait(self, i: int, data: st.DataObject) -> None:
        pending = [c for c in self.conns if c.sender == i and c.ticket is not None
                   and c.ticket.state == "pending"]
        if not self._calling(i) or not pending:
            return
        t = data.draw(st.sampled_from(pending)).ticket
        assert t is not None
        try:
            self._timed(CALL_TIMEOUT, t.wait, CALL_TIMEOUT)
        except sockshare.ChannelTimeout:
            assert t.state == "pending"

    @rule(i=st.integers(0, 1))
    def returned(self, i: int) -> None:
        if not self._calling(i):
            return
        for t in self._timed(CALL_TIMEOUT, self.sides[i].ch.returned):
            assert t.state in ("rejected", "returned")
            assert t.socket is not None
            assert t.socket.fileno() >= 0

    @precondition(lambda self: self.steps >= 25)  # late: the rest has had its turn
    @rule(i=st.integers(0, 1))
    def close(self, i: int) -> None:
        s = self.sides[i]
        if not self._calling(i):
            return
        broken_by_live_peer = s.ch._state.broken is not None and self.sides[1 - i].alive
        self._timed(CLOSE_TIMEOUT + SEND_TIMEOUT, s.ch.close)
        s.closed = True
        for h in s.held:
            if broken_by_live_peer:
                # the peer, alive, broke the channel (it gave up waiting for us to read):
                # what we held unanswered is its again (``ChannelState.fail``), not ours
                h.socket.close()
            else:  # close() accepted them (or their sender is dead): the application's now
                self.conns[h.meta["n"]].served = True
        s.held.clear()

    @precondition(lambda self: self.steps >= 25 and all(s.alive for s in self.sides))
    @rule(i=st.integers(0, 1))
    def die(self, i: int) -> None:
        """Side ``i`` is killed: the kernel closes every descriptor it held."""
        s = self.sides[i]
        state = s.ch._state
        for c in self.conns:
            mine = [c.x] if c.sender == i else [c.handoff.socket] if c.handoff else []
            for sock in mine:
                if sock.fileno() >= 0:
                    sock.close()
                    c.died = f"side {i} died holding it"
        for h in list(state.incoming):
            h.socket.close()
            self.conns[h.meta["n"]].died = f"side {i} died with it queued"
        for fd in state.decoder.take_fds():
            os.close(fd)
        s.ch._sock.close()
        s.alive = False
        s.held.clear()

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def never_two_owners(self) -> None:
        self.steps += 1
        counts = _open_inodes()
        for c in self.conns:
            assert counts.get(c.ino, 0) <= 2, f"connection {c.n} is open {counts[c.ino]} times"
            t = c.ticket
            if c.served and c.handoff is not None and c.handoff.socket.fileno() >= 0:
                # the receiver serves it: the sender must not have it back
                assert t is None or t.state not in ("rejected", "returned"), (c, t)

    def teardown(self) -> None:
        try:
            for s in self.sides:
                if self._calling(self.sides.index(s)):
                    self._timed(CLOSE_TIMEOUT + SEND_TIMEOUT, s.ch.close)
                    for h in s.held:
                        self.conns[h.meta["n"]].served = True
                    s.held.clear()
                    s.closed = True
            counts = _open_inodes()
            for c in self.conns:
                holders = c.holders()
                n = counts.get(c.ino, 0)
                # no copy left anywhere the API did not hand to someone (no leak) ...
                assert n == len(holders), f"connection {c.n}: {n} descriptors, {len(holders)} holders"
                # ... and never two owners
                assert n <= 1, f"connection {c.n} has {n} owners: {c}"
                if n == 0:  # closed: something must say why
                    t = c.ticket
                    said = (c.died or (t is not None and t.state == "abandoned")
                            or (t is not None and t.state == "sent" and c.handoff is None))
                    assert said, f"connection {c.n} was closed and nothing says why: {c}"
        finally:
            for c in self.conns:
                for sock in (c.x, c.y, c.ticket.socket if c.ticket else None,
                             c.handoff.socket if c.handoff else None):
                    if sock is not None:
                        sock.close()
            for s in self.sides:
                if s.alive and not s.closed:
                    s.ch.close()
        assert len(os.listdir("/proc/self/fd")) == self.baseline


ChannelMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SOCKSHARE_STATEFUL_EXAMPLES", "60")),
    stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_channel_state_machine = ChannelMachine.TestCase
