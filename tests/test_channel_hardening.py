"""Hostile and careless peers on the channel cost only themselves.

* A peer that connects to a listener and hangs up, or says nothing, before its HELLO
  does not stop the listener (it used to: ``accept(timeout)`` then raised
  ``BlockingIOError`` and the server's accept task died); with asyncio, the other
  peers' handshakes go on beside a silent one.
* A process of another uid (``nobody``) is closed unread, before any handshake.
* Deeply nested JSON from a peer (a CONTROL frame, handoff metadata) is a
  ``RemoteProtocolError`` that breaks the channel, not a ``RecursionError``.
* Connecting to another user's 0600 socket is a ``ChannelPermission`` (a
  ``PermissionError`` too).
* ``Ticket.wait()`` works on an ``AsyncChannel`` ticket from another thread and says what
  to do in the loop's own; an asyncio side whose peer reads nothing stops reading and
  keeps its queue bounded.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import threading
import time
from pathlib import Path

import pytest

import sockshare
from sockshare.protocol import FrameType, encode_frame
from tests.conftest import Procs, fd_count

NOBODY = pwd.getpwnam("nobody").pw_uid if os.getuid() == 0 else None


def _hangup(address: str, *, after: float = 0.0, abstract: bool = False) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b"\0" + address[1:].encode() if abstract else address)
    time.sleep(after)
    s.close()


def test_a_peer_that_hangs_up_before_hello_costs_only_itself(sock_dir: Path) -> None:
    path = str(sock_dir / "l.sock")
    before = fd_count()
    with sockshare.Channel.listen(path) as lst:
        for _ in range(3):
            _hangup(path)
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(sockshare.Channel.connect(path)))
        t.start()
        ch = lst.accept(timeout=10)  # past three hang-ups (each used to end accept)
        t.join(10)
        assert ch.peer.pid == os.getpid()
        with pytest.raises(sockshare.ChannelTimeout):
            lst.accept(timeout=0.2)
        ch.close()
        peer = result[0]
        assert isinstance(peer, sockshare.Channel)
        peer.close()
        _hangup(path)  # a hang-up with the timeout running out: a timeout, not BlockingIOError
        with pytest.raises(sockshare.ChannelTimeout):
            lst.accept(timeout=0.05)
    assert fd_count() == before


def test_async_listener_handshakes_do_not_wait_for_a_silent_peer(sock_dir: Path) -> None:
    path = str(sock_dir / "a.sock")

    async def main() -> float:
        lst = sockshare.AsyncChannelListener.listen(path)
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(10)]
        for s in silent:  # each holds its handshake for 5 s
            s.connect(path)
        for _ in range(5):
            _hangup(path)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        connecting = asyncio.ensure_future(sockshare.AsyncChannel.connect(path))
        ch = await asyncio.wait_for(lst.accept(), 15)
        took = time.monotonic() - t0
        peer = await connecting
        await ch.aclose()
        await peer.aclose()
        for s in silent:
            s.close()
        lst.close()
        return took

    before = fd_count()
    took = asyncio.run(main())
    # before, the real peer waited behind each silent one in turn (5 s each)
    assert took < 2.5
    assert fd_count() == before


@pytest.mark.skipif(NOBODY is None, reason="needs root to act as user nobody (CI runs as root)")
def test_another_user_is_closed_unread_and_the_listener_serves_on(procs: Procs) -> None:
    name = f"@sockshare-test-{os.getpid()}"
    code = (
        "import os,socket,sys,time\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        f"s=socket.socket(socket.AF_UNIX); s.connect(b'\\0{name[1:]}')\n"
        "s.settimeout(5)\n"
        "print(repr(s.recv(200)), flush=True)\n"
    )

    async def main() -> None:
        lst = sockshare.AsyncChannelListener.listen(name)
        accepting = asyncio.ensure_future(lst.accept())
        for _ in range(3):
            p = procs.python(code)
            out = await asyncio.to_thread(p.communicate, timeout=20)
            assert b"REFUSED" in out[0] or b"uid" in out[0], out
        assert not accepting.done()
        peer = await sockshare.AsyncChannel.connect(name)
        ch = await asyncio.wait_for(accepting, 10)
        await ch.aclose()
        await peer.aclose()
        lst.close()

    asyncio.run(main())


@pytest.mark.skipif(NOBODY is None, reason="needs root to act as user nobody (CI runs as root)")
def test_connecting_to_another_users_socket_is_a_channel_permission(sock_dir: Path, procs: Procs) -> None:
    path = str(sock_dir / "private.sock")
    os.chmod(sock_dir, 0o755)
    with sockshare.Channel.listen(path):
        code = (
            "import os, sys, sockshare\n"
            f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
            "try:\n"
            f"    sockshare.Channel.connect({path!r}, timeout=2)\n"
            "except sockshare.ChannelPermission as exc:\n"
            "    assert isinstance(exc, PermissionError)\n"
            "    print('permission:', exc)\n"
        )
        p = procs.python(code)
        out, _ = p.communicate(timeout=20)
        assert out.startswith(b"permission: this process (uid"), out


def test_deeply_nested_json_from_the_peer_is_a_protocol_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    a, b = sockshare.Channel.pair()
    b._sock.sendall(encode_frame(FrameType.CONTROL, b'{"x":' + deep + b"}"))
    with pytest.raises(sockshare.ChannelBroken) as info:
        a.receive_control(timeout=5)
    assert isinstance(info.value.__cause__, sockshare.RemoteProtocolError)
    assert "nests too deeply" in str(info.value.__cause__)
    a.close()
    b.close()

    a, b = sockshare.Channel.pair()
    x, y = socket.socketpair()
    b.send(x, meta=b'{"x":' + deep[:4000] + deep[-4000:] + b"}", ack=False)
    h = a.receive(timeout=5)
    with pytest.raises(sockshare.RemoteProtocolError, match="nests too deeply"):
        _ = h.meta
    h.socket.close()
    y.close()
    a.close()
    b.close()


def test_an_async_ticket_waits_from_another_thread_and_explains_itself_in_the_loop() -> None:
    a, b = sockshare.Channel.pair()

    async def main() -> None:
        ch = sockshare.AsyncChannel.wrap(a)
        x, y = socket.socketpair()
        [t] = ch.send_nowait([(x, {"n": 1}, b"")])
        with pytest.raises(sockshare.LocalProtocolError, match="await"):
            t.wait(1)
        waited = asyncio.ensure_future(asyncio.to_thread(t.wait, 10))
        await asyncio.sleep(0.05)
        h = await asyncio.to_thread(b.receive, 5)
        h.accept()
        assert await waited is True
        assert t.state == "accepted"
        t.result()
        [t2] = ch.send_nowait([(y, {"n": 2}, b"")])
        h2 = await asyncio.to_thread(b.receive, 5)
        h2.reject("full")
        with pytest.raises(sockshare.HandoffRejected) as info:
            await asyncio.to_thread(t2.result, 10)
        assert info.value.reason == "full"
        assert info.value.socket is y
        y.close()
        h.socket.close()
        await ch.aclose()

    asyncio.run(main())
    b.close()


def test_an_async_side_whose_peer_reads_nothing_stops_reading_and_stays_bounded() -> None:
    from sockshare._aio import HARD_OUT_LIMIT
    from sockshare._channel import OUT_LIMIT

    a, b = sockshare.Channel.pair()

    async def main() -> None:
        ch = sockshare.AsyncChannel.wrap(a)
        big = {"pad": "x" * 8000}
        n = 0
        while ch._wq_bytes <= OUT_LIMIT:
            ch.send_control(big)  # b never reads
            n += 1
            assert n < 10_000
        # b sends, a must not take it in while its own queue is over the bound
        b.send_control({"hello": 1})
        await asyncio.sleep(0.2)
        assert ch.received_controls() == []
        assert ch.usable
        # b reads: a's queue drains, a reads again
        for _ in range(n):
            await asyncio.to_thread(b.receive_control, 5)
        await asyncio.sleep(0.2)
        assert ch._wq_bytes == 0
        assert ch.received_controls() == [{"hello": 1}]
        # a peer that never reads at all: past the hard bound, and send_timeout without
        # taking a byte, the channel breaks; memory never grows without bound
        a.send_timeout = 0.3
        while ch._wq_bytes <= HARD_OUT_LIMIT:
            ch.send_control(big)
        assert ch.usable  # not stuck for long enough yet
        await asyncio.sleep(0.4)
        ch.send_control(big)
        assert not ch.usable
        with pytest.raises(sockshare.ChannelBroken):
            ch.send_control(big)
        await ch.aclose()

    asyncio.run(main())
    b.close()


RECEIVER_AT_LIMIT = r"""
import os, resource, socket, sys, sockshare
ch = sockshare.Channel.from_socket(socket.socket(fileno=int(sys.argv[1])))
base = len(os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (base + 12, hard))  # room for about 10 more
print("ready", flush=True)
held = []
while True:
    try:
        held.append(ch.receive(timeout=2))
    except sockshare.ChannelTimeout:
        break
ch.accept_all(held)
print("took", len(held), flush=True)
for h in held:
    h.socket.sendall(b"served\n")
    h.socket.close()
h = ch.receive(timeout=10)   # room again: the next one is taken
h.accept()
h.socket.sendall(b"served\n")
h.socket.close()
for _ in ch:
    pass
ch.close()
print("fds", len(os.listdir("/proc/self/fd")) - base, flush=True)
"""


def test_a_receiver_out_of_descriptors_gives_the_rest_back(procs: Procs) -> None:
    """A batch arrives at a receiver at its fd limit: the kernel hands over what fits
    and cuts the rest (MSG_CTRUNC). The receiver takes those and REJECTs the others, so
    the sender still has them; the channel stays up and the next handoff is taken. It
    used to break the channel and lose the whole batch."""
    a, b = socket.socketpair()
    rx = procs.python(RECEIVER_AT_LIMIT, str(b.fileno()), pass_fds=[b.fileno()])
    b.close()
    ch = sockshare.Channel.from_socket(a)
    assert rx.stdout is not None
    assert rx.stdout.readline() == b"ready\n"
    before = fd_count()
    pairs = [socket.socketpair() for _ in range(40)]
    tickets = ch.send_many([(x, {"i": i}, b"") for i, (x, _y) in enumerate(pairs)])
    for t in tickets:
        t.wait(10)
    took = int(rx.stdout.readline().split()[1])
    rejected = [t for t in tickets if t.state == "rejected"]
    assert 0 < took < 40
    assert len(rejected) == 40 - took
    assert {t.reason for t in rejected} == {sockshare._channel.NO_FDS}
    for t, (_x, y) in zip(tickets, pairs, strict=True):
        if t.state == "accepted":
            assert y.recv(16) == b"served\n"
        else:  # still the sender's, whole
            assert t.socket is not None
            t.socket.sendall(b"back\n")
            assert y.recv(16) == b"back\n"
            t.socket.close()
        y.close()
    x, y = socket.socketpair()
    assert ch.send(x).wait(10)
    assert y.recv(16) == b"served\n"
    y.close()
    ch.close()
    assert rx.stdout.readline() == b"fds -1\n"  # all it received closed, and its channel
    assert rx.wait(10) == 0
    assert fd_count() == before - 1  # the channel socket
