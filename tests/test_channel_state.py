"""The channel's protocol state (:class:`sockshare._state.ChannelState`) driven with bytes.

No channel socket and no descriptor work: two states talk by handing each other the
bytes their methods return, received descriptors are plain integers, and the state's
descriptor hooks (``adopt``, ``discard``, ``release``) record what it asks instead of
acting. The sockets *handed over* in send tests are socketpair ends the state only
describes (their kind and number go into the frame); no byte moves through them.

Covered: the handshake and its checks (kernel credentials, policy, a refusal, a peer
that does not speak the protocol), send / accept / reject, tickets returned by a break,
BYE and the end of the stream, the close sequence, protocol errors, limits, and a
receiver out of descriptors.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from sockshare import (
    ChannelBroken,
    ChannelClosed,
    ChannelEnded,
    MessageTooLarge,
    PeerRefused,
    RemoteProtocolError,
)
from sockshare._state import BATCH, NO_FDS, ChannelState, Handoff, Policy
from sockshare.protocol import (
    MAX_DATA,
    FrameDecoder,
    FrameType,
    SocketKind,
    decode_accept,
    decode_reject,
    encode_accept,
    encode_control,
    encode_frame,
)

PID_A, PID_B, UID = 1000, 2000, 4242


class Adopted:
    """What the recording ``adopt`` hook makes of a received descriptor."""

    def __init__(self, fd: int, kind: SocketKind, blocking: bool | None) -> None:
        self.fd, self.kind, self.blocking = fd, kind, blocking
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Side:
    """One ChannelState with recording hooks, and the answers its handoffs send."""

    def __init__(self, pid: int, *, max_payload: int = 1 << 20, name: str = "") -> None:
        self.discarded: list[int] = []
        self.released: list[Any] = []
        self.out: list[bytes] = []
        self.st = ChannelState(max_payload=max_payload, pid=pid, uid=UID, name=name,
                               adopt=self.adopt, discard=self.discarded.extend,
                               release=self.released.append)

    @staticmethod
    def adopt(fd: int, kind: SocketKind, blocking: bool | None, what: str,
              ident: object) -> Any:
        if fd >= 900:  # the tests' stand-in for "the kernel says it is not a socket"
            raise RemoteProtocolError(f"descriptor of {what}{ident} is not a socket")
        return Adopted(fd, kind, blocking)

    def answer(self, hid: int, reason: str | None) -> None:
        frame = self.st.answer(hid, reason, coalesce=False)
        if frame is not None:
            self.out.append(frame)

    def feed(self, data: bytes, fds: list[int] | None = None) -> None:
        self.st.receive_data(data, fds or [], self.answer)

    def take_out(self) -> bytes:
        out, self.out = b"".join(self.out), []
        return out


def _handshake(a: ChannelState, b: ChannelState, chunk: int = 0) -> None:
    """``a`` connects and speaks first; ``b`` listens (with an accept-all policy)."""
    hello = a.hello()
    done = False
    while not done:
        want = min(b.handshake_want(), chunk or 1 << 20)
        part, hello = hello[:want], hello[want:]
        done = b.handshake_data(part)
    assert hello == b""  # b asked for exactly the frame, not a byte more
    to_a, why = b.handshake_done((a.pid, a.uid), Policy(None, None))
    assert why == ""
    done = False
    while not done:
        want = a.handshake_want()
        part, to_a = to_a[:want], to_a[want:]
        done = a.handshake_data(part)
    assert to_a == b""
    assert a.handshake_done((b.pid, b.uid), None) == (b"", "")


@pytest.fixture
def pair() -> tuple[Side, Side]:
    a, b = Side(PID_A, name="a"), Side(PID_B, name="b")
    _handshake(a.st, b.st)
    return a, b


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    for _ in range(4):
        made.extend(socket.socketpair())
    yield made
    for s in made:
        s.close()


# --- handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_handshake_sets_both_peers(chunk: int) -> None:
    a, b = Side(PID_A, name="alpha"), Side(PID_B, name="beta", max_payload=5000)
    _handshake(a.st, b.st, chunk)
    assert a.st.peer is not None
    assert b.st.peer is not None
    assert (a.st.peer.pid, a.st.peer.name, a.st.peer.max_payload) == (PID_B, "beta", 5000)
    assert (b.st.peer.pid, b.st.peer.uid, b.st.peer.name) == (PID_A, UID, "alpha")


def test_handshake_never_asks_past_the_first_frame() -> None:
    b = Side(PID_B).st
    hello = Side(PID_A).st.hello()
    assert b.handshake_want() == 12  # the header first
    b.handshake_data(hello[:12])
    assert b.handshake_want() == len(hello) - 12  # then exactly the payload


@pytest.mark.parametrize(("creds", "policy", "reason"), [
    ((PID_A, UID + 1), None, "kernel says uid"),
    ((3333, UID), None, "kernel says pid"),
    ((PID_A, UID), Policy(frozenset({UID + 1}), None), f"uid {UID} may not"),
    ((PID_A, UID), Policy(None, frozenset({7})), f"pid {PID_A} is not in"),
])
def test_handshake_refusals_answer_error_and_the_peer_learns_why(
        creds: tuple[int, int], policy: Policy | None, reason: str) -> None:
    a, b = Side(PID_A).st, Side(PID_B).st
    assert b.handshake_data(a.hello())
    to_send, why = b.handshake_done(creds, policy)
    assert reason in why
    assert b.peer is None
    # the connecting side reads the ERROR where it expects HELLO
    assert a.handshake_data(to_send)
    with pytest.raises(PeerRefused, match=reason):
        a.handshake_done(None, None)


def test_handshake_kernel_pid_of_this_process_is_not_a_lie() -> None:
    """socketpair ends report their creator's pid: this process's own pid passes."""
    a, b = Side(PID_A).st, Side(PID_B).st
    b.handshake_data(a.hello())
    assert b.handshake_done((PID_B, UID), None) == (b"", "")


def test_handshake_peer_that_does_not_speak_the_protocol() -> None:
    st = Side(PID_B).st
    with pytest.raises(PeerRefused, match="does not speak"):
        st.handshake_data(b"GET / HTTP/1.1\r\n")
    st = Side(PID_B).st
    with pytest.raises(PeerRefused, match="closed the connection"):
        st.handshake_data(b"")
    st = Side(PID_B).st
    assert st.handshake_data(encode_frame(FrameType.BYE))
    with pytest.raises(PeerRefused, match="expected HELLO"):
        st.handshake_done(None, None)


# --- send, accept, reject ----------------------------------------------------------------


def test_send_accept(pair: tuple[Side, Side], socks: list[socket.socket]) -> None:
    a, b = pair
    frame, fd, ticket = a.st.single_frame(socks[0], {"route": "x"}, b"pre", True, "owner")
    assert fd == socks[0].fileno()
    assert a.st.tickets == {ticket.id: ticket}
    assert ticket._channel == "owner"
    a.st.sent_one(ticket)
    assert a.released == []  # acked: the sender keeps its copy until the answer
    b.feed(frame, [500])
    h = b.st.take_handoff()
    assert isinstance(h, Handoff)
    assert (h.id, h.data, h.meta, h.acked) == (ticket.id, b"pre", {"route": "x"}, True)
    assert isinstance(h.socket, Adopted)
    assert (h.socket.fd, h.socket.kind, h.socket.blocking) == (500, SocketKind.of(socks[0]), True)
    assert b.st.take_handoff() is None
    h.accept()
    accept = b.take_out()
    assert decode_accept(accept[12:]) == [ticket.id]
    a.feed(accept)
    assert ticket.state == "accepted"
    assert ticket.socket is None
    assert a.released == [socks[0]]
    assert a.st.tickets == {}
    assert a.st.all_counters() == {"sent": 1, "accepted": 1, "rejected": 0, "returned": 0,
                                   "received": 0}
    assert b.st.all_counters()["received"] == 1


def test_send_reject_gives_the_ticket_back(pair: tuple[Side, Side],
                                           socks: list[socket.socket]) -> None:
    a, b = pair
    frames = a.st.handoff_frames([(s, None, b"") for s in socks[:3]], True, "owner")
    assert len(frames) == 1
    frame, _fds, tickets = frames[0]
    a.st.sent(tickets)
    b.feed(frame, [501, 502, 503])
    got = b.st.take_received()
    assert [h.socket.fd for h in got] == [501, 502, 503]  # type: ignore[attr-defined]
    got[1].reject("busy")
    assert got[1].socket.closed  # type: ignore[attr-defined]  # (reject closes our copy)
    reject = b.take_out()
    assert decode_reject(reject[12:]).reason == "busy"
    a.feed(reject)
    (back,) = a.st.take_returned()
    assert back is tickets[1]
    assert (back.state, back.reason, back.socket) == ("rejected", "busy", socks[1])
    assert a.st.take_returned() == []
    assert socks[1] not in a.released


def test_fire_and_forget_releases_on_send(pair: tuple[Side, Side],
                                          socks: list[socket.socket]) -> None:
    a, b = pair
    frame, _fd, ticket = a.st.single_frame(socks[0], None, b"", False)
    assert a.st.tickets == {}
    a.st.sent_one(ticket)
    assert (ticket.state, ticket.socket, a.released) == ("sent", None, [socks[0]])
    b.feed(frame, [510])
    h = b.st.take_handoff()
    assert h is not None
    assert not h.acked
    h.accept()
    assert b.out == []  # nothing to answer


def test_accepts_coalesce_up_to_a_batch(pair: tuple[Side, Side]) -> None:
    _a, b = pair
    st = b.st
    out = [st.answer(i, None, coalesce=True) for i in range(1, BATCH + 2)]
    assert out[:BATCH - 1] == [None] * (BATCH - 1)
    full = out[BATCH - 1]
    assert full is not None
    assert decode_accept(full[12:]) == list(range(1, BATCH + 1))
    rest = st.take_accepts()
    assert rest is not None
    assert decode_accept(rest[12:]) == [BATCH + 1]
    assert st.take_accepts() is None


# --- a break, BYE, the end of the stream, closing ----------------------------------------


def test_a_break_returns_pending_tickets_and_closes_unanswered(
        pair: tuple[Side, Side], socks: list[socket.socket]) -> None:
    a, b = pair
    frame, _fd, ticket = a.st.single_frame(socks[0], None, b"", True)
    b.feed(frame, [520])
    h = b.st.incoming[0]
    exc = ConnectionResetError("gone")
    a.st.fail(exc)
    (back,) = a.st.take_returned()
    assert (back, back.state, back.socket) == (ticket, "returned", socks[0])
    assert a.st.counters["returned"] == 1
    with pytest.raises(ChannelBroken):
        a.st.check_usable()
    b.st.fail(exc)  # the receiver's queued acked handoff is the sender's again
    assert b.released == [h.socket]
    with pytest.raises(ChannelBroken):
        b.st.take_handoff()
    with pytest.raises(ChannelBroken, match="sender has it back"):
        h.accept()


def test_unsend_keeps_the_socket_out_of_returned(pair: tuple[Side, Side],
                                                 socks: list[socket.socket]) -> None:
    a, _b = pair
    _frame, _fd, ticket = a.st.single_frame(socks[0], None, b"", True)
    exc = BrokenPipeError("gone")
    a.st.fail(exc)
    a.st.unsend([ticket], exc)
    assert a.st.take_returned() == []
    assert a.st.counters["returned"] == 0
    assert ticket.state == "returned"


def test_bye_ends_iteration_after_the_queued_handoffs(pair: tuple[Side, Side],
                                                      socks: list[socket.socket]) -> None:
    a, b = pair
    frame, _fd, _ticket = a.st.single_frame(socks[0], None, b"", False)
    b.feed(frame + encode_frame(FrameType.BYE), [530])
    assert b.st.peer_said_bye
    assert b.st.take_handoff() is not None  # what came before BYE is still taken
    with pytest.raises(ChannelEnded):
        b.st.take_handoff()
    with pytest.raises(ConnectionResetError):  # then the end of the stream
        b.feed(b"")


def test_end_of_stream_in_the_middle_of_a_frame_is_an_error(pair: tuple[Side, Side]) -> None:
    _a, b = pair
    b.feed(encode_frame(FrameType.BYE)[:5])
    with pytest.raises(RemoteProtocolError):
        b.feed(b"")


def test_close_sequence(pair: tuple[Side, Side], socks: list[socket.socket]) -> None:
    a, b = pair
    frames = a.st.handoff_frames([(s, None, b"") for s in socks[:2]], True)
    a.st.sent(frames[0][2])
    b.feed(frames[0][0], [540, 541])
    held = b.st.take_handoff()  # the application holds one, unanswered; one is queued
    assert held is not None
    out = b.st.start_close()
    dec = FrameDecoder()
    dec.feed(b"".join(out))
    kinds = []
    while (f := dec.next_frame()) is not None:
        kinds.append((f.type, f.payload))
    assert [k for k, _ in kinds] == [FrameType.REJECT, FrameType.ACCEPT, FrameType.BYE]
    assert decode_reject(kinds[0][1]).id == frames[0][2][1].id  # the queued one goes back
    assert decode_accept(kinds[1][1]) == [held.id]  # the held one is the application's
    b.st.finish_close()
    with pytest.raises(ChannelClosed):
        b.st.check_usable()
    a.feed(b"".join(out))
    assert [t.state for t in frames[0][2]] == ["accepted", "rejected"]
    assert not a.st.awaiting_answers
    with pytest.raises(ChannelEnded):
        a.st.take_handoff()


def test_closing_with_unanswered_tickets_abandons_them(pair: tuple[Side, Side],
                                                       socks: list[socket.socket]) -> None:
    a, _b = pair
    _frame, _fd, ticket = a.st.single_frame(socks[0], None, b"", True)
    a.st.start_close()
    assert a.st.awaiting_answers
    a.st.finish_close()
    assert (ticket.state, ticket.socket) == ("abandoned", None)
    assert a.released == [socks[0]]
    assert a.st.take_returned() == []


# --- protocol errors and limits ----------------------------------------------------------


def test_an_answer_for_no_pending_handoff_is_a_protocol_error(pair: tuple[Side, Side]) -> None:
    a, _b = pair
    with pytest.raises(RemoteProtocolError, match="not pending"):
        a.feed(encode_frame(FrameType.ACCEPT, encode_accept([77])))


def test_descriptors_on_a_control_frame_are_discarded(pair: tuple[Side, Side]) -> None:
    a, _b = pair
    with pytest.raises(RemoteProtocolError, match="descriptors"):
        a.feed(encode_frame(FrameType.CONTROL, encode_control({"x": 1}), nfds=2), [600, 601])
    a.st.fail(RemoteProtocolError("x"))
    assert sorted(a.discarded) == [600, 601]


def test_a_descriptor_that_is_not_a_socket_is_discarded(pair: tuple[Side, Side],
                                                        socks: list[socket.socket]) -> None:
    a, b = pair
    frame, _fd, _ticket = a.st.single_frame(socks[0], None, b"", True)
    with pytest.raises(RemoteProtocolError, match="not a socket"):
        b.feed(frame, [900])
    assert b.discarded == [900]
    assert not b.st.incoming


def test_controls(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.feed(a.st.control_frame({"cmd": "drain"}) + a.st.control_frame({"n": 2}))
    assert b.st.take_control() == {"cmd": "drain"}
    assert b.st.take_controls() == [{"n": 2}]
    assert b.st.take_control() is None


def test_limits(socks: list[socket.socket]) -> None:
    a, b = Side(PID_A), Side(PID_B, max_payload=200)
    _handshake(a.st, b.st)
    with pytest.raises(MessageTooLarge, match="pre-read data"):
        a.st.single_frame(socks[0], None, b"x" * (MAX_DATA + 1), True)
    with pytest.raises(MessageTooLarge, match="peer's limit of 200"):
        a.st.single_frame(socks[0], None, b"x" * 300, True)
    with pytest.raises(MessageTooLarge, match="peer's limit of 200"):
        a.st.handoff_frames([(socks[0], None, b"x" * 300), (socks[1], None, b"")], True)
    assert a.st.tickets == {}  # nothing registered for what could not be built
    # frames over this side's own limit are refused when they arrive
    big = Side(PID_A)
    _handshake(big.st, Side(PID_B).st)
    frame, _fd, _t = big.st.single_frame(socks[0], None, b"x" * 300, False)
    with pytest.raises(RemoteProtocolError):
        b.feed(frame, [700])
    b.st.fail(RemoteProtocolError("x"))
    assert b.discarded == [700]


def test_a_receiver_out_of_descriptors_rejects_the_missing_ones(
        pair: tuple[Side, Side], socks: list[socket.socket]) -> None:
    a, b = pair
    frames = a.st.handoff_frames([(s, None, b"") for s in socks[:3]], True)
    frame, _fds, tickets = frames[0]
    b.st.receive_data(frame, [800], b.answer, cut=True)  # the kernel gave only the first
    assert [h.id for h in b.st.take_received()] == [tickets[0].id]
    a.feed(b.take_out())
    assert [(t.state, t.reason) for t in a.st.take_returned()] == [("rejected", NO_FDS)] * 2
