"""The asyncio form of the handoff channel.

Same protocol, same state (:class:`sockshare._state.ChannelState`, which makes every
protocol decision), different I/O: the channel socket is non-blocking and watched with
``loop.add_reader``; frames that cannot be written at once wait in a queue drained by
``loop.add_writer``. Descriptors go with the first ``sendmsg`` of their frame, as the
frame rules require. The handshake runs on the loop too (``loop.sock_recv``), for
:meth:`AsyncChannel.connect` and for each peer of an :class:`AsyncChannelListener`.

::

    ch = await AsyncChannel.connect("/run/app/handoff.sock")
    ticket = await ch.send(conn, meta={"route": "chat"}, data=pre_read)  # waits for the ack
    async for h in ch:            # on the other side
        ...
        h.accept()

Do not share the underlying socket with the blocking :class:`~sockshare.Channel` once
wrapped: :meth:`AsyncChannel.wrap` takes over a handshaken channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sockshare import _fast
from sockshare._channel import (
    HANDSHAKE_TIMEOUT,
    OUT_LIMIT,
    RECV_BUF,
    Channel,
    ChannelListener,
    _parse_address,
    connect_error,
    credentials_of,
    new_state,
    read_leftovers,
)
from sockshare._errors import (
    ChannelBroken,
    ChannelClosed,
    ChannelEnded,
    ChannelError,
    ChannelTimeout,
    LocalProtocolError,
    PeerRefused,
    SockshareError,
)
from sockshare._state import ChannelState, Handoff, Policy, StateView, Ticket
from sockshare.backends._scm import cut_of, recv_with_fds_cut, send_nowait_with_fds
from sockshare.protocol import MAX_PAYLOAD

__all__ = ["AsyncChannel", "AsyncChannelListener"]

log = logging.getLogger("sockshare.channel")

#: Past this many bytes queued and not written, with the peer reading nothing of them for
#: the channel's ``send_timeout``, the channel is broken: that peer is stuck, and memory
#: stays bounded. (Past ``OUT_LIMIT`` this side already stops reading, so it takes no
#: new work; a burst of this side's own handoffs that the peer is reading is no reason.)
HARD_OUT_LIMIT = 16 * OUT_LIMIT
#: recvmsg flags that say the kernel cut a message (its descriptors, or its bytes)
_CUT_FLAGS = int(getattr(socket, "MSG_CTRUNC", 0)) | int(getattr(socket, "MSG_TRUNC", 0))
#: Frames without descriptors queued together are written in one call, this much at most.
_MERGE = 64 * 1024


async def handshake(sock: socket.socket, st: ChannelState, timeout: float,
                    policy: Policy | None) -> None:
    """Exchange HELLOs on the loop over the non-blocking ``sock`` (the decisions are the
    state's; see :meth:`sockshare.Channel._handshake` for the blocking twin). Raises
    :class:`~sockshare.PeerRefused` for a peer that refuses us, is refused, or says
    nothing within ``timeout``."""
    loop = asyncio.get_running_loop()
    if policy is None:
        try:
            await loop.sock_sendall(sock, st.hello())
        except (BrokenPipeError, ConnectionResetError):
            pass  # a listener that refused us before reading: its ERROR is still to read

    async def read_hello() -> None:
        while True:
            try:
                data = await loop.sock_recv(sock, st.handshake_want())
            except ConnectionResetError:
                data = b""
            if st.handshake_data(data):
                return

    try:
        await asyncio.wait_for(read_hello(), timeout)
    except TimeoutError:
        raise PeerRefused(f"the peer sent no HELLO within {timeout} s") from None
    to_send, why = st.handshake_done(credentials_of(sock), policy)
    if why:
        with contextlib.suppress(OSError):
            await asyncio.wait_for(loop.sock_sendall(sock, to_send), timeout)
        raise PeerRefused(why)
    if to_send:
        await asyncio.wait_for(loop.sock_sendall(sock, to_send), timeout)


class _Timeouts:
    """The timeouts of an AsyncChannel made on the loop (a wrapped Channel keeps its own)."""

    def __init__(self) -> None:
        self.send_timeout: float | None = 30.0
        self.close_timeout: float = 5.0


class AsyncChannel(StateView):
    """One end of a handoff channel, for asyncio. Make one with :meth:`connect`,
    :meth:`AsyncChannelListener.accept` or :meth:`wrap`."""

    def __init__(self, sock: socket.socket, state: ChannelState,
                 timeouts: Channel | _Timeouts | None = None) -> None:
        self._state = state
        self._sock = sock
        self._wsa = state.wsa
        self._timeouts = timeouts if timeouts is not None else _Timeouts()
        self._loop = _selector_loop()
        self._sock.setblocking(False)
        # received sockets come non-blocking, as asyncio wants them (one ioctl, not two)
        state.set_socket_blocking(False)
        state.track_answers()
        self._leftovers_read = False
        self._wq: deque[tuple[memoryview, list[int], list[Ticket]]] = deque()
        self._wq_bytes = 0
        self._last_write = self._loop.time()  # the peer last took bytes (or nothing waited)
        self._writing = False
        #: woken by every read: receive(), receive_control(), wait_activity(), aclose()
        self._waiters: list[asyncio.Future[None]] = []
        #: ticket id -> the futures of the tasks waiting for that ticket's answer, woken
        #: when that answer arrives (the state lists answered tickets) or the channel ends:
        #: a read wakes the waiters of the tickets it answered, not every sender
        self._ticket_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._end_waiters: list[asyncio.Future[None]] = []
        self._reading = True
        self._flush_scheduled = False
        #: called right after the peer's frames were processed, before waiters wake: a
        #: supervisor (the server dispatcher) settles answers and relays handoffs without
        #: waiting for its task's next turn of the loop
        self.on_activity: Callable[[], None] | None = None
        #: the compiled read's shortcut (sockshare._speedups.recv_answers): when a read
        #: brought only ACCEPTs of compiled handoffs (:attr:`raw_pending`) and reports of
        #: closed connections, called with how many handoffs were accepted and the sum
        #: of the reports' counts, instead of :attr:`on_activity` (nothing else changed)
        self.on_settled: Callable[[int, int], None] | None = None
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    @classmethod
    async def connect(cls, address: str | os.PathLike[str], *,
                      timeout: float = HANDSHAKE_TIMEOUT, name: str = "") -> AsyncChannel:
        """Connect to a listening channel and complete the handshake, on the loop."""
        loop = _selector_loop()
        family, addr = _parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            st = new_state(sock, max_payload=MAX_PAYLOAD, name=name, blocking=False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            except OSError as exc:
                mapped = connect_error(exc, address)
                if mapped is None:
                    raise
                raise mapped from exc
            await handshake(sock, st, timeout, None)
        except BaseException:
            sock.close()
            raise
        return cls(sock, st)

    @classmethod
    def wrap(cls, ch: Channel) -> AsyncChannel:
        """Take over a handshaken blocking channel (e.g. from :meth:`Channel.pair`): its
        socket and protocol state move here, and ``ch`` is not to be used any more
        (except for its ``send_timeout`` and ``close_timeout``, which stay in force)."""
        sock, state = ch._detach()
        return cls(sock, state, ch)

    @property
    def send_timeout(self) -> float | None:
        """Seconds the peer may read nothing of a queue past ``HARD_OUT_LIMIT`` before
        the channel is broken."""
        return self._timeouts.send_timeout

    @send_timeout.setter
    def send_timeout(self, value: float | None) -> None:
        self._timeouts.send_timeout = value

    @property
    def close_timeout(self) -> float:
        """Seconds :meth:`aclose` waits for the peer's answers to pending handoffs."""
        return self._timeouts.close_timeout

    @close_timeout.setter
    def close_timeout(self, value: float) -> None:
        self._timeouts.close_timeout = value

    @property
    def usable(self) -> bool:
        """False once this side closed the channel or it broke."""
        return self._state.usable

    # -- reading -------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._wq_bytes > OUT_LIMIT:
            # the peer does not read what we queued: take in nothing new (its handoffs
            # would add answers) until it does; _flush() watches the socket again
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
            return
        st = self._state
        sp = _fast.speedups
        data: bytes | None
        try:
            cut = False
            if self._wsa:
                data, fds = self._sock.recv(RECV_BUF), list[int]()
            elif st.raw and sp is not None and st.decoder.idle:
                # the dispatcher's compiled path: its workers' ACCEPTs settled in C (their
                # descriptors closed, no object per answer), the reports after them cut out
                settled, closed, controls, data, fds, rflags = sp.recv_answers(
                    self._sock.fileno(), RECV_BUF, st.raw, st.decoder.max_payload)
                if rflags & _CUT_FLAGS:
                    cut = cut_of(self._sock, fds, rflags)
                on_settled = self.on_settled
                if closed >= 0 and on_settled is not None and (settled or controls):
                    # all of it was ACCEPTs of compiled handoffs and reports of closed
                    # connections: the supervisor is told the two numbers, nothing else
                    st.counters["accepted"] += settled
                    on_settled(settled, closed)
                    if self._waiters:
                        self._wake()
                    return
                if settled or controls:
                    st.settled_answers(settled, controls)
                    if not data:
                        data = None   # (all of it taken: not the peer's end)
            else:
                data, fds, cut = recv_with_fds_cut(self._sock, RECV_BUF)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, SockshareError) as exc:
            self._break(exc)
            return
        if data is not None:
            try:
                st.receive_data(data, fds, self._answer, cut)
            except (OSError, SockshareError, ValueError) as exc:
                self._break(exc)
        if self.on_activity is not None:
            self.on_activity()
        if st.answered_log:   # (None when not tracked, [] when nothing was answered)
            self._wake_answered()
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        _resolve_all(waiters)

    def _wake_answered(self) -> None:
        """Wake the waiters of the tickets the peer answered since the last read: one
        dict lookup per answer, whatever the number of handoffs pending."""
        answered = self._state.take_answered()
        tw = self._ticket_waiters
        if answered and tw:
            for t in answered:
                futs = tw.pop(t.id, None)
                if futs is not None:
                    _resolve_all(futs)

    def _wake_all_tickets(self) -> None:
        """The channel ended: every ticket waiter, once."""
        self._state.take_answered()
        tw, self._ticket_waiters = self._ticket_waiters, {}
        for futs in tw.values():
            _resolve_all(futs)

    async def _wait_event(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        await fut

    def _answer_future(self, ticket: Ticket) -> asyncio.Future[None]:
        """A future resolved when ``ticket`` is answered or the channel ends (the caller
        looks at the ticket then). Awaited right in :meth:`send` and :meth:`wait`: no
        coroutine of its own (with thousands of senders waiting, every object each one
        keeps alive is work for the garbage collector)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        tw = self._ticket_waiters
        futs = tw.get(ticket.id)
        if futs is None:
            tw[ticket.id] = [fut]
        else:
            futs.append(fut)  # another task waits for the same ticket
        return fut

    def _forget_waiter(self, ticket: Ticket, fut: asyncio.Future[None]) -> None:
        """A waiter left without its answer (cancelled: a timeout): forget its future,
        not the ticket's other waiters."""
        tw = self._ticket_waiters
        futs = tw.get(ticket.id)
        if futs is not None:
            with contextlib.suppress(ValueError):
                futs.remove(fut)
            if not futs:
                del tw[ticket.id]

    def _unwatch(self) -> None:
        """Stop watching the channel socket (it breaks, or this side closes it)."""
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False

    def _break(self, exc: BaseException) -> None:
        self._unwatch()
        st = self._state
        if st.broken is None:
            if not isinstance(exc, ConnectionResetError):
                log.warning("handoff channel to pid %s broke: %s",
                            st.peer.pid if st.peer else "?", exc)
            if not self._leftovers_read:
                self._leftovers_read = True
                # what the peer sent before the break first (an ACCEPT must count)
                read_leftovers(self._sock, st, self._answer)
            st.fail(exc)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._wq.clear()
        self._wq_bytes = 0
        self._wake_all_tickets()
        self._wake()
        self._wake_end()

    def _wake_end(self) -> None:
        waiters, self._end_waiters = self._end_waiters, []
        _resolve_all(waiters)

    async def wait_closed(self) -> None:
        """Wait until the channel is broken or closed, and only that: a supervisor that
        handles the peer's frames in :attr:`on_activity` keeps one task here instead of
        one woken by every read."""
        while self._state.broken is None and not self._state.closed:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._end_waiters.append(fut)
            await fut

    def track_accepts(self) -> None:
        """From now on, record tickets the peer accepts, for :meth:`accepted`."""
        self._state.track_accepts()

    def accepted(self) -> list[Ticket]:
        """Tickets accepted since the last call (after :meth:`track_accepts`): a
        supervisor settles what changed instead of scanning everything pending."""
        return self._state.take_accepted()

    async def wait_activity(self) -> bool:
        """Wait until the peer's next frames were processed (or the channel ended).

        For a supervisor watching many handoffs at once (the server dispatcher): after
        it returns, look at ticket states, :meth:`returned` and the controls. True while
        the channel is usable; False (at once) once it is broken or closed.
        """
        if self._state.usable:
            await self._wait_event()
        return self._state.usable

    async def receive(self) -> Handoff:
        """Wait for the next handoff; :class:`~sockshare.ChannelEnded` once the peer said
        goodbye and every handoff it sent was taken."""
        st = self._state
        while (h := st.take_handoff()) is None:
            await self._wait_event()
        return h

    def __aiter__(self) -> AsyncIterator[Handoff]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Handoff]:
        while True:
            try:
                yield await self.receive()
            except ChannelEnded:
                return

    async def receive_control(self) -> dict[str, Any]:
        st = self._state
        while (obj := st.take_control()) is None:
            await self._wait_event()
        return obj

    def returned(self) -> list[Ticket]:
        """Tickets given back since the last call (rejected, or returned by a break)."""
        return self._state.take_returned()

    def received_controls(self) -> list[dict[str, Any]]:
        """Control messages that arrived and were not taken yet, without waiting (the
        companion of :meth:`received` for a supervisor using :attr:`on_activity`)."""
        return self._state.take_controls()

    def received(self) -> list[Handoff]:
        """Handoffs that arrived and were not taken yet, without waiting: for a supervisor
        that watches with :meth:`wait_activity` (the server dispatcher, which relays the
        connections its workers migrate)."""
        return self._state.take_received()

    # -- writing -------------------------------------------------------------------

    def _answer(self, hid: int, reason: str | None) -> None:
        frame = self._state.answer(hid, reason, coalesce=True)  # raises if ended
        if frame is not None:
            self._write_frame(frame)
        elif not self._flush_scheduled:
            # coalesced ACCEPTs go out at the end of this loop iteration at the latest
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_answers)

    def _flush_answers(self) -> None:
        self._flush_scheduled = False
        if not self._state.usable:
            return
        frame = self._state.take_accepts()
        if frame is not None:
            self._write_frame(frame)
        elif self._wq and not self._writing:
            self._flush()

    def _write_frame(self, frame: bytes, fds: list[int] | None = None,
                     tickets: list[Ticket] | None = None) -> None:
        self._wq.append((memoryview(frame), fds or [], tickets or []))
        self._wq_bytes += len(frame)
        self._flush()

    def _flush(self) -> None:
        wq = self._wq
        try:
            while wq:
                buf, fds, tickets = wq[0]
                if not fds and len(wq) > 1 and not wq[1][1] and len(buf) + len(wq[1][0]) <= _MERGE:
                    # answers and controls queued in this turn of the loop: one write (of
                    # at most _MERGE bytes: a long queue is not joined again on every try)
                    parts: list[memoryview] = []
                    merged: list[Ticket] = []
                    total = 0
                    while wq and not wq[0][1] and (not parts or total + len(wq[0][0]) <= _MERGE):
                        part, _fds, ts = wq.popleft()
                        parts.append(part)
                        merged.extend(ts)
                        total += len(part)
                    wq.appendleft((memoryview(b"".join(parts)), [], merged))
                    continue
                sent = send_nowait_with_fds(self._sock, buf, fds) if fds else self._sock.send(buf)
                self._wq_bytes -= sent
                if sent:
                    self._last_write = self._loop.time()
                if sent < len(buf):
                    wq[0] = (buf[sent:], [], tickets)
                    break
                wq.popleft()
                if tickets:
                    self._state.sent(tickets)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._break(exc)
            return
        if not wq:
            self._last_write = self._loop.time()
        elif self._wq_bytes > HARD_OUT_LIMIT:
            stuck = self._loop.time() - self._last_write
            limit = self._timeouts.send_timeout
            if limit is not None and stuck > limit:
                self._break(ChannelBroken(
                    f"the peer has read none of the {self._wq_bytes} bytes queued for it "
                    f"for {stuck:.0f} s: it is stuck"))
                return
        if (not self._reading and self._wq_bytes <= OUT_LIMIT and self._state.broken is None
                and not self._state.closed):
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True
        want = bool(wq)
        if want and not self._writing:
            self._loop.add_writer(self._sock.fileno(), self._flush)
            self._writing = True
        elif not want and self._writing:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False

    @property
    def raw_pending(self) -> dict[int, tuple[int, bytes, float, bytes]]:
        """The compiled dispatcher path's handoffs in flight on this channel (see
        :attr:`ChannelState.raw`); sockshare._speedups.dispatch_burst fills it."""
        return self._state.raw

    def send_compiled(self, frame: bytes, fds: list[int], n: int) -> None:
        """Queue a HANDOFF frame of ``n`` handoffs that the compiled path encoded and put
        in :attr:`raw_pending` (the channel answers them like any other)."""
        self._state.register_compiled(n)
        sp = _fast.speedups
        if not self._wq and sp is not None:
            # nothing queued before it: one sendmsg now, the queue only for what is left
            try:
                sent = sp.send_fds(self._sock.fileno(), frame, fds)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._break(exc)
                return
            self._last_write = self._loop.time()
            if sent == len(frame):
                return
            if sent:
                self._wq.append((memoryview(frame)[sent:], [], []))
                self._wq_bytes += len(frame) - sent
                self._flush()
                return
        self._write_frame(frame, fds)

    def take_raw_accepted(self) -> int:
        """How many compiled handoffs the peer accepted since the last call."""
        return self._state.take_raw_accepted()

    def send_nowait(self, items: Iterable[tuple[socket.socket, Any, bytes]], *,
                    ack: bool = True) -> list[Ticket]:
        """Queue handoffs without waiting for answers; see :meth:`wait`."""
        self._state.check_usable()
        out: list[Ticket] = []
        for frame, fds, tickets in self._state.handoff_frames(list(items), ack, self):
            self._write_frame(frame, fds, tickets)
            out.extend(tickets)
        return out

    def _wait_ticket(self, ticket: Ticket, timeout: float | None) -> None:
        """``Ticket.wait()`` from another thread than the loop's (in the loop's own thread
        it would block the loop that must read the answer)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise LocalProtocolError(
                f"ticket {ticket.id} belongs to an AsyncChannel: 'await channel.wait([ticket])' "
                "in its event loop (a blocking wait there would stop the loop that reads the answer)")
        fut = asyncio.run_coroutine_threadsafe(self.wait([ticket]), self._loop)
        try:
            fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise ChannelTimeout(f"handoff {ticket.id} not answered within {timeout} s") from None

    async def wait(self, tickets: Iterable[Ticket]) -> None:
        """Wait until every ticket is answered (or returned by a broken channel).

        Each ticket of this channel is woken by its own answer (or the channel's end),
        so K tasks waiting on K tickets cost O(1) a answer, not O(K) a read."""
        st = self._state
        for t in tickets:
            while t.state == "pending" and st.usable:
                if t._channel is not self:  # another channel's: look after every read
                    await self._wait_event()
                    continue
                fut = self._answer_future(t)
                try:
                    await fut
                except BaseException:
                    self._forget_waiter(t, fut)
                    raise

    async def send(self, sock: socket.socket, *, meta: Any = None, data: bytes = b"",
                   ack: bool = True) -> Ticket:
        """Hand ``sock`` over; with ``ack`` wait for the answer. Never raises for a reject:
        look at ``ticket.state`` (the socket is in ``ticket.socket`` unless accepted)."""
        st = self._state
        st.check_usable()
        if self._wsa:
            [(frame, fds, tickets)] = st.handoff_frames([(sock, meta, data)], ack, self)
            ticket = tickets[0]
        else:
            frame, fd, ticket = st.single_frame(sock, meta, data, ack, self)
            fds, tickets = [fd], [ticket]
        self._write_frame(frame, fds, tickets)
        # (the wait of wait(), inlined: one coroutine a sender, not three)
        while ticket.state == "pending" and st.usable:
            fut = self._answer_future(ticket)
            try:
                await fut
            except BaseException:
                self._forget_waiter(ticket, fut)
                raise
        return ticket

    async def send_many(self, items: Iterable[tuple[socket.socket, Any, bytes]], *,
                        ack: bool = True) -> list[Ticket]:
        tickets = self.send_nowait(items, ack=ack)
        if ack:
            await self.wait(tickets)
        return tickets

    def send_control(self, obj: dict[str, Any], *, soon: bool = False) -> None:
        """Send a small JSON control message. With ``soon`` it goes out at the end of
        this turn of the loop, in one write with the answers and other controls queued
        by then (or earlier, with the next frame written). Raises
        :class:`~sockshare.MessageTooLarge` (nothing sent, the channel stays up) for a
        message over the peer's limit (``peer.max_payload``)."""
        frame = self._state.control_frame(obj)
        if not soon:
            self._write_frame(frame)
            return
        self._wq.append((memoryview(frame), [], []))
        self._wq_bytes += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_answers)

    def queue_answers(self) -> None:
        """Queue the coalesced answers (ACCEPTs) now, unwritten, so that what is queued
        after them (controls sent with ``soon``) follows them in the same write."""
        st = self._state
        if st.usable:
            frame = st.take_accepts()
            if frame is not None:
                self._wq.append((memoryview(frame), [], []))
                self._wq_bytes += len(frame)

    def flush(self) -> None:
        """Send coalesced answers (ACCEPTs), and controls sent with ``soon``, now rather
        than at the end of this loop iteration: a receiver that is about to act on a
        connection makes sure the sender will learn that it took it, even if the receiver
        dies the next instant."""
        self._flush_answers()

    @property
    def buffered(self) -> bool:
        """True while frames wait in this side's write queue (see :meth:`drain`)."""
        return bool(self._wq)

    async def drain(self) -> None:
        """Wait until everything queued was written."""
        while self._wq and self._state.broken is None:
            await asyncio.sleep(0.001)

    async def aclose(self) -> None:
        """End the channel cleanly (see :meth:`sockshare.Channel.close`): answer what we
        received, say BYE, wait up to ``close_timeout`` for answers to our handoffs."""
        st = self._state
        if st.closed:
            return
        if st.broken is None:
            try:
                for frame in st.start_close():
                    self._write_frame(frame)
                deadline = self._loop.time() + self.close_timeout
                while ((self._wq or st.awaiting_answers) and st.broken is None
                       and self._loop.time() < deadline):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wait_event(), max(0.0, deadline - self._loop.time()))
            except SockshareError:
                pass
        self._unwatch()
        st.finish_close()
        with contextlib.suppress(OSError):  # wakes a thread blocked reading it
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._wake_all_tickets()
        self._wake()
        self._wake_end()

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncChannelListener:
    """asyncio form of :class:`~sockshare.ChannelListener`.

    Connections are accepted in the event loop and each handshake runs on the loop as a
    task of its own, so a peer that stays silent, hangs up or is refused costs only
    itself: the others' handshakes go on beside it. A peer of a uid the policy refuses
    is closed before any byte is read; at most ``MAX_HANDSHAKES`` run at once (more wait
    in the kernel's backlog).
    """

    MAX_HANDSHAKES = 16

    def __init__(self, listener: ChannelListener) -> None:
        self._listener = listener
        self.address = listener.address
        self._ready: deque[tuple[socket.socket, ChannelState]] = deque()
        #: accept() calls waiting, oldest first: each peer ready wakes one of them
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False

    @classmethod
    def listen(cls, address: str | os.PathLike[str], *, max_payload: int = MAX_PAYLOAD,
               **kw: Any) -> AsyncChannelListener:
        return cls(Channel.listen(address, max_payload=max_payload, **kw))

    async def accept(self) -> AsyncChannel:
        """Wait for the next peer that passed its handshake."""
        loop = _selector_loop()
        if self._loop is None:
            self._loop = loop
            self._listener._sock.setblocking(False)
        while not self._ready:
            if self._listener._closed:
                raise ChannelClosed("this listener was closed")
            self._watch()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                fut.cancel()  # (if it was not woken yet)
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
                if self._ready and not fut.cancelled():
                    self._wake_one()  # woken for a peer it will not take: pass it on
                raise
        sock, state = self._ready.popleft()
        self._watch()
        return AsyncChannel(sock, state)

    def _watch(self) -> None:
        if (not self._watching and self._loop is not None and not self._listener._closed
                and len(self._ready) < self.MAX_HANDSHAKES):
            self._loop.add_reader(self._listener.fileno(), self._on_connect)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._watching = False

    def _on_connect(self) -> None:
        assert self._loop is not None
        while len(self._running) < self.MAX_HANDSHAKES:
            try:
                conn = self._listener._accept_raw(0.0)
            except ChannelError:
                self._unwatch()
                self._wake()
                return
            except OSError as exc:
                log.warning("channel listener on %s: %s", self.address, exc)
                return
            if conn is None:
                break
            if not self._listener._precheck(conn):
                continue
            task = self._loop.create_task(self._handshake(conn))
            self._running.add(task)
            task.add_done_callback(self._handshake_done)
        if len(self._running) >= self.MAX_HANDSHAKES:
            self._unwatch()  # the backlog holds the rest until a handshake ends

    async def _handshake(self, conn: socket.socket) -> None:
        """One peer's handshake; on any failure the connection is closed and the
        refusal logged (rate-limited)."""
        lst = self._listener
        try:
            conn.setblocking(False)
            state = new_state(conn, max_payload=lst._max_payload, name=lst._name, blocking=False)
            await handshake(conn, state, HANDSHAKE_TIMEOUT, lst._policy)
        except (SockshareError, OSError, ValueError, RecursionError) as exc:
            lst._log("refused", "refused a channel peer on %s: %s", self.address, exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        if lst._closed:
            _close_unaccepted(conn, state)
        else:
            self._ready.append((conn, state))
            self._wake_one()

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("channel listener on %s: %s", self.address, task.exception())
        if not self._listener._closed and len(self._ready) < self.MAX_HANDSHAKES:
            self._watch()  # (peers nobody takes wait in the kernel's backlog, not here)

    def _wake_one(self) -> None:
        """A peer is ready: wake the oldest accept() still waiting (one, not all)."""
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _wake(self) -> None:
        """The listener closed: wake every accept()."""
        waiters, self._waiters = self._waiters, deque()
        for w in waiters:
            _resolve(w)

    def close(self) -> None:
        self._unwatch()
        self._listener.close()
        while self._ready:
            _close_unaccepted(*self._ready.popleft())
        for task in list(self._running):
            task.cancel()
        self._wake()

    async def __aenter__(self) -> AsyncChannelListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _close_unaccepted(sock: socket.socket, state: ChannelState) -> None:
    """Close a handshaken channel nobody accepted: BYE if the socket takes it now."""
    with contextlib.suppress(OSError):
        sock.send(b"".join(state.start_close()))
    state.finish_close()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _selector_loop() -> asyncio.AbstractEventLoop:
    """The running loop, if it can watch sockets with add_reader (not a Windows Proactor)."""
    loop = asyncio.get_running_loop()
    if sys.platform == "win32" and isinstance(loop, asyncio.ProactorEventLoop):
        raise ChannelError(
            "on Windows an AsyncChannel needs an asyncio.SelectorEventLoop: the default "
            "ProactorEventLoop has no add_reader, and a socket bound to its completion port "
            "cannot be shared; use asyncio.run(main(), loop_factory=asyncio.SelectorEventLoop)"
        )
    return loop


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        _resolve(fut)
