"""Places where the code did not keep docs/protocol.md's promises (found in an audit).

* §5.2: "After the handshake a sender MUST NOT send a frame with a payload over the
  peer's HELLO ``max payload``". A CONTROL frame was checked against 1 MiB only: a
  control over a smaller peer limit went out and the peer, which refuses a frame over
  its limit (§1), broke the channel. It is now refused before anything is sent
  (:class:`~sockshare.MessageTooLarge`), and the channel stays up.
* §3.1 and §6: a HELLO name is at most 255 bytes. The C peer refused a longer one; the
  Python (and PHP) codec took it. Every implementation now refuses it (the vector
  ``hello-name-too-long``), and a Python listener does not let such a peer in.
* §3.5: handoff metadata is "a JSON object". A float NaN or infinity in a sender's
  ``meta`` went out as ``NaN``/``Infinity``, which is not JSON: the C and PHP peers'
  readers refuse it. It is now a :class:`~sockshare.LocalProtocolError` before anything
  is sent, as any other value JSON cannot hold.
* §5.3 "Accept before use means written, not queued": the blocking
  ``Handoff.accept()`` returned once its ACCEPT was *queued*; when the channel socket was
  full it was not written, and a receiver that then served the socket and died left its
  sender with a "returned" handoff that it gave to someone else. It now returns once the
  ACCEPT is written (reading the peer meanwhile); a peer that reads nothing for
  ``send_timeout`` breaks the channel (:class:`~sockshare.ChannelBroken`: the sender
  has the connection back, the receiver closes its copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import sockshare
from sockshare.protocol import FrameType, Hello, encode_frame
from sockshare.protocol._messages import _HELLO
from tests._fdcount import fd_count, wait_fd_count
from tests.conftest import Procs

SMALL = 4096


def _pair(small_side_max: int) -> tuple[sockshare.Channel, sockshare.Channel]:
    """A channel over a socketpair whose second end accepts payloads up to
    ``small_side_max`` bytes (its HELLO says so)."""
    a, b = socket.socketpair()
    out: list[sockshare.Channel] = []
    t = threading.Thread(target=lambda: out.append(
        sockshare.Channel.from_socket(b, max_payload=small_side_max)))
    t.start()
    big = sockshare.Channel.from_socket(a)
    t.join(10)
    return big, out[0]


def test_a_control_over_the_peers_limit_is_refused_before_it_is_sent() -> None:
    big, small = _pair(SMALL)
    try:
        assert big.peer.max_payload == SMALL
        with pytest.raises(sockshare.MessageTooLarge):
            big.send_control({"pad": "x" * (2 * SMALL)})
        big.send_control({"ok": 1})  # the channel is still good, on both sides
        assert small.receive_control(timeout=5) == {"ok": 1}  # (not the big one first)
    finally:
        big.close()
        small.close()


def test_an_async_control_over_the_peers_limit_is_refused_before_it_is_sent() -> None:
    big_sync, small = _pair(SMALL)

    async def main() -> None:
        big = sockshare.AsyncChannel.wrap(big_sync)
        try:
            with pytest.raises(sockshare.MessageTooLarge):
                big.send_control({"pad": "x" * (2 * SMALL)})
            big.send_control({"ok": 1})
            await big.drain()
            assert await asyncio.to_thread(small.receive_control, 5) == {"ok": 1}
            assert big.usable
        finally:
            await big.aclose()

    try:
        asyncio.run(main())
    finally:
        small.close()


def test_a_listener_refuses_a_hello_whose_name_is_over_255_bytes(sock_dir: Path) -> None:
    path = str(sock_dir / "l.sock")
    with sockshare.Channel.listen(path) as lst, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(path)
        h = Hello(os.getpid(), os.getuid(), 3, 5, 1 << 20)
        payload = _HELLO.pack(1, h.role, h.features, h.pid, h.uid, h.max_payload) + b"n" * 256
        raw.sendall(encode_frame(FrameType.HELLO, payload))
        try:
            ch = lst.accept(timeout=0.5)
        except sockshare.ChannelTimeout:
            pass  # refused: no channel comes out of it
        else:
            ch.close()
            pytest.fail("a peer whose HELLO name is 256 bytes was let in")
        raw.settimeout(5)
        while raw.recv(4096):  # and its connection is closed
            pass


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("many", [False, True], ids=["send", "send_many"])
def test_metadata_that_is_not_json_is_refused_before_anything_is_sent(value: float,
                                                                       many: bool) -> None:
    a, b = sockshare.Channel.pair()
    x, y = socket.socketpair()
    try:
        bad = {"v": value}
        send = ((lambda: a.send_many([(x, bad, b""), (x, {}, b"")])) if many
                else (lambda: a.send(x, meta=bad)))
        with pytest.raises(sockshare.LocalProtocolError):
            send()
        with pytest.raises(sockshare.ChannelTimeout):
            b.receive(timeout=0.2)  # nothing went
        assert x.fileno() >= 0  # still the caller's
        ticket = a.send(x, meta={"v": 1.5})  # a finite float is JSON
        h = b.receive(timeout=5)
        assert h.meta == {"v": 1.5}
        h.accept()
        assert ticket.wait(5)
        h.socket.close()
    finally:
        a.close()
        b.close()
        x.close()
        y.close()


RECEIVER_WITH_A_FULL_QUEUE = r"""
import socket, sys, time, sockshare
ch = sockshare.Channel.from_socket(socket.socket(fileno=int(sys.argv[1])))
h = ch.receive(timeout=10)
for _ in range(12):   # 720 KB of controls the sender does not read yet: the socket fills
    ch.send_control({"pad": "x" * 60000})
h.accept()            # returned normally: the socket is ours to serve, says the API
h.socket.sendall(b"served\n")
print("served", flush=True)
time.sleep(60)        # and then this process dies (SIGKILL)
"""


def test_accept_returns_only_once_the_accept_is_written(procs: Procs) -> None:
    a, b = socket.socketpair()
    rx = procs.python(RECEIVER_WITH_A_FULL_QUEUE, str(b.fileno()), pass_fds=[b.fileno()])
    b.close()
    ch = sockshare.Channel.from_socket(a)
    x, y = socket.socketpair()
    try:
        ticket = ch.send(x)
        def read_controls() -> None:
            # the sender reads its channel, as a dispatcher's loop does, but only after
            # a second: the receiver's ACCEPT, queued behind 720 KB of controls, can be
            # written only once they are read -- and the receiver must not serve before
            time.sleep(1.0)
            with contextlib.suppress(sockshare.SockshareError):
                for _ in range(12):
                    ch.receive_control(timeout=20)

        reader = threading.Thread(target=read_controls, daemon=True)
        reader.start()
        assert rx.stdout is not None
        assert rx.stdout.readline() == b"served\n"
        assert y.recv(16) == b"served\n"  # the receiver served the connection
        rx.kill()
        rx.wait(10)
        reader.join(20)
        ticket.wait(10)
        # it was served: the sender must know it is no longer its own
        assert ticket.state == "accepted", (ticket.state, ticket.reason)
    finally:
        if ticket.socket is not None:
            ticket.socket.close()
        ch.close()
        y.close()


def test_an_accept_the_peer_never_reads_breaks_the_channel_and_the_sender_keeps_it() -> None:
    """The other side of "written": a sender that reads nothing for ``send_timeout``
    while the receiver's ACCEPT waits behind its controls. ``accept()`` raises
    :class:`~sockshare.ChannelBroken` (do not serve), the ACCEPT never goes, and the
    sender has the connection back, open; no descriptor is left behind."""
    before = fd_count()
    a, b = sockshare.Channel.pair()
    x, y = socket.socketpair()
    try:
        b.send_timeout = 0.5
        ticket = a.send(x)
        h = b.receive(timeout=5)
        for _ in range(12):   # 720 KB the sender does not read: the socket fills
            b.send_control({"pad": "x" * 60000})
        started = time.monotonic()
        with pytest.raises(sockshare.ChannelBroken, match="ACCEPT could not be written"):
            h.accept()
        assert 0.4 <= time.monotonic() - started < 5
        h.socket.close()   # (what the exception says to do)
        ticket.wait(5)
        assert ticket.state == "returned", (ticket.state, ticket.reason)
        assert ticket.socket is not None
        ticket.socket.sendall(b"still open")   # the sender's copy serves on
        assert y.recv(16) == b"still open"
        ticket.socket.close()
    finally:
        a.close()
        b.close()
        x.close()
        y.close()
    wait_fd_count("self", before, what="after the broken accept")


@pytest.mark.parametrize("bad", [{"v": float("nan")}, {"v": float("inf")}, {"v": object()},
                                 ["not", "a", "dict"]], ids=["nan", "inf", "object", "list"])
def test_a_control_json_cannot_hold_is_refused_before_anything_is_sent(bad: object) -> None:
    """docs/protocol.md §3.7: a CONTROL payload is a JSON object. What JSON cannot hold
    (NaN and Infinity included, which Python's reader takes and no other does) is a
    :class:`~sockshare.LocalProtocolError`, as for handoff metadata; nothing is sent and
    the channel stays up."""
    a, b = sockshare.Channel.pair()
    try:
        with pytest.raises(sockshare.LocalProtocolError):
            a.send_control(bad)  # type: ignore[arg-type]
        a.send_control({"ok": 1.5})
        assert b.receive_control(timeout=5) == {"ok": 1.5}   # (the first to arrive)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("size", [0, 100, (1 << 20) + 1, 1 << 32, 2.5],
                         ids=["zero", "tiny", "over-1MiB", "over-u32", "float"])
def test_a_max_payload_out_of_range_is_refused_where_it_is_given(tmp_path: Path,
                                                                size: object) -> None:
    """A channel's ``max_payload`` goes in its HELLO (a u32) and may not exceed the
    protocol's 1 MiB: out of range, ``pair``, ``from_socket`` and ``listen`` refuse it
    with a :class:`~sockshare.LocalProtocolError` (it was a ``struct.error`` in the
    handshake, or a limit the peer would not honour), and nothing is left open."""
    before = fd_count()
    with pytest.raises(sockshare.LocalProtocolError, match="max_payload"):
        sockshare.Channel.pair(max_payload=size)  # type: ignore[arg-type]
    with pytest.raises(sockshare.LocalProtocolError, match="max_payload"):
        sockshare.Channel.listen(str(tmp_path / "c.sock"), max_payload=size)  # type: ignore[arg-type]
    assert not (tmp_path / "c.sock").exists()
    wait_fd_count("self", before, what="after the refused max_payload")
