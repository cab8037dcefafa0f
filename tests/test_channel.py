"""The handoff channel between real processes: pre-read bytes, metadata, acks, rejects,
receivers that die, the handshake policy, asyncio, batching, and hostile peers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sockshare
from sockshare.backends._scm import send_with_fds
from sockshare.protocol import ErrorCode, FrameType, Hello, encode_error, encode_frame, encode_hello
from tests.conftest import Procs, fd_count

RECEIVER = r"""
import os, sys, sockshare
path, mode = sys.argv[1], sys.argv[2]
with sockshare.Channel.listen(path) as lst:
    print("listening", flush=True)
    ch = lst.accept(timeout=10)
    for h in ch:
        if mode == "die":
            os.kill(os.getpid(), 9)
        if h.meta.get("reject"):
            h.reject("receiver is full")
            continue
        s = h.socket
        s.sendall(b"R%d got %r route=%s\n" % (os.getpid(), h.data, h.meta["route"].encode()))
        s.settimeout(5)
        line = s.makefile("rb").readline()
        s.sendall(b"echo:" + line)
        h.accept()
        s.close()
"""

SENDER = r"""
import socket, sys, sockshare
path, meta = sys.argv[1], sys.argv[2]
import json
lst = socket.create_server(("127.0.0.1", 0))
print(lst.getsockname()[1], flush=True)
ch = sockshare.Channel.connect(path)
conn, _ = lst.accept()
conn.settimeout(5)
first = b""
while not first.endswith(b"\n"):
    first += conn.recv(1)
t = ch.send(conn, meta=json.loads(meta), data=first)
t.wait(10)
print(t.state, t.reason, flush=True)
if t.socket is not None:
    t.socket.sendall(b"back at the sender (pid %d)\n" % __import__("os").getpid())
    t.socket.close()
ch.close()
"""


def _start_pair(
    procs: Procs, sock_dir: Path, mode: str, meta: dict[str, object]
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], socket.socket]:
    path = str(sock_dir / "handoff.sock")
    rx = procs.python(RECEIVER, path, mode)
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == b"listening"
    tx = procs.python(SENDER, path, json.dumps(meta))
    assert tx.stdout is not None
    port = int(tx.stdout.readline())
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    return rx, tx, client


def test_sibling_handoff_carries_pre_read_bytes_and_meta(procs: Procs, sock_dir: Path) -> None:
    rx, tx, client = _start_pair(procs, sock_dir, "serve", {"route": "chat"})
    with client:
        client.sendall(b"GET /chat HTTP/1.1\n")
        f = client.makefile("rb")
        first = f.readline()
        assert first == b"R%d got b'GET /chat HTTP/1.1\\n' route=chat\n" % rx.pid
        client.sendall(b"ping\n")
        assert f.readline() == b"echo:ping\n"
    assert tx.stdout is not None
    assert tx.stdout.readline().split() == [b"accepted"]
    assert tx.wait(10) == 0


def test_reject_gives_the_socket_back_to_the_sender(procs: Procs, sock_dir: Path) -> None:
    _rx, tx, client = _start_pair(procs, sock_dir, "serve", {"route": "x", "reject": True})
    with client:
        client.sendall(b"hello\n")
        assert client.makefile("rb").readline() == b"back at the sender (pid %d)\n" % tx.pid
    assert tx.stdout is not None
    assert tx.stdout.readline().split(maxsplit=1) == [b"rejected", b"receiver is full\n"]


def test_receiver_dying_before_answering_returns_the_socket(procs: Procs, sock_dir: Path) -> None:
    rx, tx, client = _start_pair(procs, sock_dir, "die", {"route": "x"})
    with client:
        client.sendall(b"hello\n")
        client.settimeout(10)
        assert client.makefile("rb").readline() == b"back at the sender (pid %d)\n" % tx.pid
    assert rx.wait(10) == -signal.SIGKILL
    assert tx.stdout is not None
    assert tx.stdout.readline().startswith(b"returned the channel broke")


# --- in-process checks of the API contract ------------------------------------------------


def test_fire_and_forget_and_batches_leave_no_fds() -> None:
    a, b = sockshare.Channel.pair()
    before = fd_count()
    pairs = [socket.socketpair() for _ in range(600)]
    tickets = a.send_many([(x, {"i": i}, b"d%d" % i) for i, (x, _y) in enumerate(pairs)], ack=False)
    assert {t.state for t in tickets} == {"sent"}
    assert all(t.socket is None for t in tickets)
    got = [b.receive(timeout=5) for _ in range(600)]
    assert [h.meta["i"] for h in got] == list(range(600))
    assert [h.data for h in got] == [b"d%d" % i for i in range(600)]
    for h, (_x, y) in zip(got, pairs, strict=True):
        h.socket.sendall(b"!")
        assert y.recv(1) == b"!"
        h.socket.close()
        y.close()
    a.close()
    b.close()
    assert fd_count() == before - 2


def test_acked_batch_accept_closes_sender_copies() -> None:
    a, b = sockshare.Channel.pair()
    pairs = [socket.socketpair() for _ in range(100)]
    tickets = a.send_many([(x, None, b"") for x, _y in pairs])
    assert all(t.socket is not None for t in tickets)
    for _ in range(100):
        h = b.receive(timeout=5)
        h.accept()
        h.socket.close()
    assert all(t.wait(5) for t in tickets)
    assert all(t.socket is None for t in tickets)
    for x, y in pairs:
        assert x.fileno() == -1
        assert y.recv(1) == b""  # every copy is closed: the peer sees EOF
        y.close()
    assert a.counters["accepted"] == 100
    a.close()
    b.close()


def test_limits_are_refused_before_sending() -> None:
    a, b = sockshare.Channel.pair()
    x, y = socket.socketpair()
    with pytest.raises(sockshare.MessageTooLarge, match="metadata"):
        a.send(x, meta={"k": "v" * 20000})
    with pytest.raises(sockshare.MessageTooLarge, match="pre-read data"):
        a.send(x, data=b"x" * 70000)
    with pytest.raises(sockshare.LocalProtocolError, match="JSON"):
        a.send(x, meta={"k": object()})
    assert x.fileno() >= 0  # a refused send leaves the socket with the caller
    a.close()
    b.close()
    x.close()
    y.close()


def test_closed_is_not_broken() -> None:
    a, b = sockshare.Channel.pair()
    a.close()
    with pytest.raises(sockshare.ChannelClosed):
        a.receive(timeout=1)
    # the peer said goodbye: the end of the channel, not a breakage
    with pytest.raises(sockshare.ChannelEnded):
        b.receive(timeout=5)
    b.close()


def test_iteration_ends_on_bye() -> None:
    a, b = sockshare.Channel.pair()
    x, y = socket.socketpair()
    a.send(x, ack=False)
    a.close()
    handoffs = list(b)
    assert len(handoffs) == 1
    handoffs[0].socket.close()
    y.close()
    b.close()


def _accept_nothing(lst: sockshare.ChannelListener) -> None:
    with pytest.raises(TimeoutError):
        lst.accept(timeout=2)  # the refused peer is not returned


def test_policy_refuses_other_uids_and_pids(sock_dir: Path) -> None:
    path = str(sock_dir / "p.sock")
    for kwargs, match in (({"allow_uids": [os.getuid() + 4242]}, "uid"),
                          ({"allow_pids": [1]}, "allow-list")):
        lst = sockshare.Channel.listen(path, **kwargs)  # type: ignore[arg-type]
        th = threading.Thread(target=_accept_nothing, args=(lst,))
        th.start()
        try:
            with pytest.raises(sockshare.PeerRefused, match=match):
                sockshare.Channel.connect(path)
        finally:
            th.join()
            lst.close()


def test_refusal_read_even_when_the_listener_hung_up_before_our_hello() -> None:
    """A listener that refuses by uid answers and closes before reading our HELLO: the
    connecting side's write fails (EPIPE), and it must still report the refusal it was
    sent, not a broken pipe."""
    before = fd_count()
    mine, theirs = socket.socketpair()
    theirs.sendall(encode_frame(FrameType.ERROR, encode_error(
        ErrorCode.REFUSED, "uid 0 may not hand off to this listener")))
    theirs.close()
    with pytest.raises(sockshare.PeerRefused, match="may not hand off"):
        sockshare.Channel.from_socket(mine)
    mine.close()
    assert fd_count() == before


def test_listener_refuses_to_steal_a_live_address(sock_dir: Path) -> None:
    path = str(sock_dir / "live.sock")
    with sockshare.Channel.listen(path), pytest.raises(sockshare.ChannelError, match="already listens"):
        sockshare.Channel.listen(path)
    Path(path).write_text("not a socket")
    with pytest.raises(sockshare.ChannelError, match="not a socket"):
        sockshare.Channel.listen(path)


def test_connect_to_nobody_is_a_clear_error(sock_dir: Path) -> None:
    with pytest.raises(sockshare.ChannelError, match="nobody listens"):
        sockshare.Channel.connect(str(sock_dir / "nobody.sock"))


def test_asyncio_forms(sock_dir: Path) -> None:
    path = str(sock_dir / "a.sock")

    async def main() -> None:
        lst = sockshare.AsyncChannelListener.listen(path)
        seen: list[bytes] = []

        async def serve() -> None:
            ch = await lst.accept()
            async for h in ch:
                seen.append(h.data)
                if h.meta and h.meta.get("no"):
                    h.reject("nope")
                else:
                    h.accept()
                    h.socket.close()
            await ch.aclose()

        server = asyncio.create_task(serve())
        ch = await sockshare.AsyncChannel.connect(path)
        x, y = socket.socketpair()
        t = await ch.send(x, data=b"one")
        assert t.state == "accepted"
        assert t.socket is None
        x2, y2 = socket.socketpair()
        t2 = await ch.send(x2, meta={"no": 1}, data=b"two")
        assert (t2.state, t2.reason, t2.socket) == ("rejected", "nope", x2)
        assert ch.returned() == [t2]
        many = [socket.socketpair() for _ in range(300)]
        ts = await ch.send_many([(m, None, b"") for m, _ in many])
        assert {t.state for t in ts} == {"accepted"}
        await ch.aclose()
        await asyncio.wait_for(server, 5)
        lst.close()
        assert seen[:2] == [b"one", b"two"]
        assert len(seen) == 302
        for s in (y, x2, y2, *(p for pair in many for p in pair)):
            s.close()

    before = fd_count()
    asyncio.run(main())
    assert fd_count() == before


# --- hostile peers: raw bytes against a real channel end ---------------------------------


def _raw_peer() -> tuple[sockshare.Channel, socket.socket]:
    a, b = socket.socketpair()
    hello = Hello(os.getpid(), os.getuid(), 3, 5, 1 << 20, "raw")
    b.sendall(encode_frame(FrameType.HELLO, encode_hello(hello)))
    ch = sockshare.Channel.from_socket(a)
    b.recv(4096)  # the channel's HELLO
    return ch, b


def _entry(n: int = 1) -> bytes:
    one = struct.pack(">QBBHII", 7, 3, 1, 0, 0, 0)
    return struct.pack(">H", n) + one * n


CASES = {
    "garbage": (b"GET / HTTP/1.1\r\n\r\n", 0),
    "bad version": (b"SS\x09\x20\x00\x00\x00\x00\x00\x00\x00\x00", 0),
    "unknown type": (b"SS\x01\x7f\x00\x00\x00\x00\x00\x00\x00\x00", 0),
    "oversized length": (b"SS\x01\x20\x00\x00\x00\x00\x7f\xff\xff\xff", 0),
    "too many fds declared": (encode_frame(FrameType.HANDOFF, _entry(), nfds=3), 1),
    "fds where none are expected": (encode_frame(FrameType.ACCEPT, struct.pack(">HQ", 1, 7)), 2),
    "entries without fds": (encode_frame(FrameType.HANDOFF, _entry(2), nfds=1), 1),
    "answer for an unknown handoff": (encode_frame(FrameType.ACCEPT, struct.pack(">HQ", 1, 99)), 0),
    "truncated entry": (encode_frame(FrameType.HANDOFF, _entry()[:-3], nfds=1), 1),
    "bad json control": (encode_frame(FrameType.CONTROL, b"{nope"), 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_frames_break_the_channel_and_close_every_fd(case: str) -> None:
    payload, nfds = CASES[case]
    ch, raw = _raw_peer()
    before = fd_count()
    spare = [socket.socketpair() for _ in range(nfds)]
    send_with_fds(raw, payload, [s.fileno() for s, _ in spare])
    for s, _ in spare:
        s.close()
    with pytest.raises(sockshare.ChannelBroken) as exc:
        ch.receive(timeout=5)
    assert isinstance(exc.value.__cause__, sockshare.SockshareError)
    # every descriptor that arrived was closed: the far ends see EOF
    for _, far in spare:
        far.settimeout(5)
        assert far.recv(1) == b""
        far.close()
    assert fd_count() == before
    ch.close()
    raw.close()


@pytest.mark.parametrize(("claim", "make"), [
    ((3, 1), lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),   # type lie
    ((1, 1), lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)),  # family lie
    ((3, 1), os.pipe),                                                       # not a socket
], ids=["type", "family", "pipe"])
def test_a_descriptor_that_is_not_what_its_entry_claims(claim: tuple[int, int], make: Any) -> None:
    """The kernel is asked what arrived (family, type; a socket at all): a lie breaks
    the channel with a precise error, and the descriptor is closed."""
    ch, raw = _raw_peer()
    before = fd_count()
    a, b = make()
    fa = a if isinstance(a, int) else a.fileno()
    entry = struct.pack(">H", 1) + struct.pack(">QBBHII", 7, *claim, 0, 0, 0)
    send_with_fds(raw, encode_frame(FrameType.HANDOFF, entry, nfds=1), [fa])
    for x in (a, b):
        os.close(x) if isinstance(x, int) else x.close()
    with pytest.raises(sockshare.ChannelBroken) as exc:
        ch.receive(timeout=5)
    cause = exc.value.__cause__
    assert isinstance(cause, sockshare.RemoteProtocolError)
    assert "not a socket" in str(cause) or "socket type it claims" in str(cause)
    assert fd_count() == before
    ch.close()
    raw.close()


def test_peer_disconnecting_mid_frame() -> None:
    ch, raw = _raw_peer()
    x, y = socket.socketpair()
    frame = encode_frame(FrameType.HANDOFF, _entry(), nfds=1)
    send_with_fds(raw, frame[:15], [x.fileno()])
    x.close()
    raw.close()
    with pytest.raises(sockshare.ChannelBroken) as exc:
        ch.receive(timeout=5)
    assert "middle of a frame" in str(exc.value)
    y.settimeout(5)
    assert y.recv(1) == b""
    y.close()
    ch.close()


def test_receive_timeout_is_a_timeout() -> None:
    a, b = sockshare.Channel.pair()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        b.receive(timeout=0.2)
    assert time.monotonic() - t0 < 2
    a.close()
    b.close()


# --- closing never leaves a connection with two owners -----------------------------------


def test_sender_close_waits_for_answers_in_flight() -> None:
    a, b = sockshare.Channel.pair()
    x, y = socket.socketpair()
    ticket = a.send(x)
    h = b.receive(timeout=5)

    def answer_late() -> None:
        time.sleep(0.3)  # the sender is already in close() and has said BYE
        h.accept()

    th = threading.Thread(target=answer_late)
    th.start()
    a.close()
    th.join()
    assert ticket.state == "accepted"  # not "returned": the receiver owns it
    assert ticket.socket is None
    h.socket.sendall(b"!")
    assert y.recv(1) == b"!"
    for s in (h.socket, y):
        s.close()
    b.close()


def test_receiver_close_rejects_queued_and_accepts_held() -> None:
    a, b = sockshare.Channel.pair()
    pairs = [socket.socketpair() for _ in range(3)]
    tickets = [a.send(x) for x, _ in pairs]
    held = b.receive(timeout=5)  # the application took one and did not answer
    for _ in range(20):  # read the other two into the queue (one read per fd message)
        if len(b._state.incoming) == 2:
            break
        b.poll(0.2)
    b.close()
    for t in tickets:
        t.wait(5)
    assert [t.state for t in tickets] == ["accepted", "rejected", "rejected"]
    assert tickets[1].reason == "the receiver closed the channel before taking it"
    for t, (_, far) in zip(tickets[1:], pairs[1:], strict=True):
        assert t.socket is not None  # back with the sender, usable
        t.socket.sendall(b"?")
        assert far.recv(1) == b"?"
        t.socket.close()
    held.socket.close()
    for _, far in pairs:
        far.close()
    a.close()


def test_answering_after_a_break_refuses_to_serve() -> None:
    ch, raw = _raw_peer()
    x, y = socket.socketpair()
    entry = struct.pack(">H", 1) + struct.pack(">Q4sII", 7, bytes([3, 1, 0, 0]), 0, 0)
    send_with_fds(raw, encode_frame(FrameType.HANDOFF, entry, flags=1, nfds=1), [x.fileno()])
    x.close()
    h = ch.receive(timeout=5)
    raw.sendall(b"garbage that breaks the channel")
    with pytest.raises(sockshare.ChannelBroken):
        ch.receive(timeout=5)
    with pytest.raises(sockshare.ChannelBroken, match="sender has it back"):
        h.accept()
    h.socket.close()
    y.close()
    raw.close()
    ch.close()


def test_close_abandons_what_a_live_peer_never_answers() -> None:
    a, b = sockshare.Channel.pair()
    a.close_timeout = 0.3
    x, y = socket.socketpair()
    ticket = a.send(x)
    held = b.receive(timeout=5)  # never answered, and b stays open
    t0 = time.monotonic()
    a.close()
    assert time.monotonic() - t0 < 3
    assert ticket.state == "abandoned"
    assert ticket.socket is None
    assert x.fileno() == -1  # our copy is closed: one owner
    held.socket.sendall(b"k")
    assert y.recv(1) == b"k"
    for s in (held.socket, y):
        s.close()
    b.close()


def test_single_handoffs_take_the_one_read_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of one-socket handoffs is decoded without the general frame decoder
    (the fast path once went unused because recvmsg reports MSG_CMSG_CLOEXEC back in its
    flags); the sockets still arrive whole, with their bytes, metadata, blocking mode and
    a checked type."""
    from sockshare._state import ChannelState as _ChannelState

    general = 0
    original = _ChannelState.receive_data

    def counting(self: _ChannelState, data: bytes, fds: list[int], answer: object) -> None:
        nonlocal general
        general += 1
        original(self, data, fds, answer)

    monkeypatch.setattr(_ChannelState, "receive_data", counting)
    a, b = sockshare.Channel.pair()
    with a, b:
        pairs = [socket.socketpair() for _ in range(20)]
        for i, (left, _right) in enumerate(pairs):
            left.setblocking(False)  # the receiver's copy must come back blocking
            a.send(left, meta={"i": i}, data=b"pre-%d" % i, ack=i % 2 == 0)
        for i, (_left, right) in enumerate(pairs):
            h = b.receive(timeout=5)
            assert (h.meta, h.data, h.acked) == ({"i": i}, b"pre-%d" % i, i % 2 == 0)
            assert h.socket.gettimeout() is None
            assert os.get_blocking(h.socket.fileno())
            h.accept()
            right.sendall(b"x%d" % i)
            assert h.socket.recv(16) == b"x%d" % i
            h.socket.close()
            right.close()
        assert general == 0


def test_asyncio_receiver_gets_non_blocking_sockets_and_deferred_frames_keep_order() -> None:
    """An AsyncChannel hands over sockets ready for asyncio (non-blocking at the
    descriptor, timeout 0.0); controls deferred to the end of the loop turn and the
    coalesced ACCEPT leave together on flush(), in the order they were queued."""
    a, b = sockshare.Channel.pair()

    async def main() -> None:
        ab = sockshare.AsyncChannel.wrap(b)
        left, right = socket.socketpair()
        try:
            ticket = a.send(left, meta={"n": 1}, data=b"hi")
            h = await asyncio.wait_for(ab.receive(), 5)
            assert h.socket.gettimeout() == 0.0
            assert not os.get_blocking(h.socket.fileno())
            ab.send_control({"ev": "first"}, soon=True)
            h.accept()
            ab.send_control({"ev": "second"}, soon=True)
            ab.flush()
            assert not ab.buffered
            assert await asyncio.to_thread(ticket.wait, 5)
            assert a.receive_control(timeout=5) == {"ev": "first"}
            assert a.receive_control(timeout=5) == {"ev": "second"}
            right.sendall(b"ping")
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(h.socket, 4), 5) == b"ping"
            h.socket.close()
        finally:
            right.close()
            await ab.aclose()
            a.close()

    asyncio.run(main())
