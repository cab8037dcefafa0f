"""The handoff Channel between sibling Windows processes: runs INSIDE Windows CPython.

On Windows a channel is loopback TCP (``tcp://127.0.0.1:PORT``); each HANDOFF carries a
WSAPROTOCOL_INFO blob made with ``sock.share(peer_pid)`` for the pid the receiver gave in
its HELLO, and the receiver takes it with ``socket.fromshare``. Here a *listener* peer
and a *sender* peer (both ``winpeer.py`` children) talk over a channel, and this process
is the client of the connections they hand over, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

if sys.platform != "win32":
    pytest.skip("Windows-only: run through scripts/wine_python.py pytest", allow_module_level=True)

from winpeer import IO_TIMEOUT, PeerClient, recv_exact, sees_eof

import sockshare

pytestmark = pytest.mark.timeout(30)

Spawn = Callable[..., PeerClient]


@dataclasses.dataclass
class Pair:
    """A channel from ``sender`` (handle ``sch``) to ``receiver`` (handle ``rch``), and
    a server socket (handle ``srv``, ``port``) in the sender for clients to connect to."""

    sender: PeerClient
    receiver: PeerClient
    sch: int
    rch: int
    srv: int
    port: int
    clients: list[socket.socket]

    def client(self, greeting: bytes) -> tuple[socket.socket, int]:
        """Connect a client, send ``greeting``; return it and the sender's handle."""
        c = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
        self.clients.append(c)
        h = self.sender.call("accept", h=self.srv)["h"]
        c.sendall(greeting)
        return c, h


@pytest.fixture
def pair(spawn: Spawn) -> Iterator[Pair]:
    receiver, sender = spawn("receiver"), spawn("sender")
    lst = receiver.call("ch_listen")
    assert lst["address"].startswith("tcp://127.0.0.1:")
    sender.send_line(f'{{"op": "ch_connect", "address": "{lst["address"]}"}}')
    rch = receiver.call("ch_accept", h=lst["h"])
    sch = sender.answer()
    # each side learnt the other's pid from HELLO: the pid share() duplicates for
    assert sch["peer_pid"] == receiver.pid
    assert rch["peer_pid"] == sender.pid
    srv = sender.call("listen")
    p = Pair(sender, receiver, sch["h"], rch["h"], srv["h"], srv["port"], [])
    try:
        yield p
    finally:
        for c in p.clients:
            c.close()


def test_handoff_with_meta_and_preread_data_acked(pair: Pair) -> None:
    client, h = pair.client(b"GET /chat HTTP/1.1\r\n\r\nrest of the request")
    pre = pair.sender.call("recv", h=h, n=22)  # the dispatcher read the head only
    assert pre == "GET /chat HTTP/1.1\r\n\r\n"
    ticket = pair.sender.call("ch_send", ch=pair.sch, h=h, meta={"route": "chat", "n": 1}, data=pre)
    assert ticket["state"] == "pending"
    got = pair.receiver.call("ch_receive", ch=pair.rch)
    assert got["meta"] == {"route": "chat", "n": 1}
    assert got["data"] == pre
    assert got["acked"] is True
    assert got["peer"] == client.getsockname()[1]  # the same connection
    # bytes the dispatcher did not read are still in the socket
    assert pair.receiver.call("recv", h=got["h"], n=19) == "rest of the request"
    pair.receiver.call("ho_accept", hid=got["hid"])
    answered = pair.sender.call("ticket_wait", t=ticket["t"])
    assert answered == {"state": "accepted", "reason": "", "h": None}
    # the receiver alone serves the connection now, both ways
    pair.receiver.call("send", h=got["h"], data="HTTP/1.1 200 OK\r\n\r\n")
    assert recv_exact(client, 19) == b"HTTP/1.1 200 OK\r\n\r\n"
    client.sendall(b"more")
    assert pair.receiver.call("recv", h=got["h"], n=4) == "more"
    pair.receiver.call("close", h=got["h"])
    assert sees_eof(client, IO_TIMEOUT)  # the sender kept no copy
    counters = pair.sender.call("ch_counters", ch=pair.sch)
    assert counters["sent"] == 1
    assert counters["accepted"] == 1


def test_several_handoffs_in_a_row(pair: Pair) -> None:
    clients = []
    for i in range(3):
        client, h = pair.client(f"client {i}".encode())
        pre = pair.sender.call("recv", h=h, n=8)
        t = pair.sender.call("ch_send", ch=pair.sch, h=h, meta={"i": i}, data=pre)
        clients.append((client, t))
    received = [pair.receiver.call("ch_receive", ch=pair.rch) for _ in clients]
    # Answers to a batch are coalesced while handoffs wait unread: accept them all, then
    # one ACCEPT frame answers every ticket.
    for got in received:
        pair.receiver.call("ho_accept", hid=got["hid"])
    for i, ((client, t), got) in enumerate(zip(clients, received, strict=True)):
        assert got["meta"] == {"i": i}
        assert got["data"] == f"client {i}"
        assert got["peer"] == client.getsockname()[1]
        assert pair.sender.call("ticket_wait", t=t["t"])["state"] == "accepted"
        pair.receiver.call("send", h=got["h"], data=f"bye {i}")
        assert recv_exact(client, 5) == f"bye {i}".encode()


def test_reject_gives_the_socket_back_usable(pair: Pair) -> None:
    client, h = pair.client(b"hello")
    pre = pair.sender.call("recv", h=h, n=5)
    t = pair.sender.call("ch_send", ch=pair.sch, h=h, meta={"route": "busy"}, data=pre)
    got = pair.receiver.call("ch_receive", ch=pair.rch)
    pair.receiver.call("ho_reject", hid=got["hid"], reason="overloaded")
    answered = pair.sender.call("ticket_wait", t=t["t"])
    assert answered["state"] == "rejected"
    assert answered["reason"] == "overloaded"
    back = answered["h"]
    assert back is not None
    # the sender's socket is intact, both ways; the receiver's copy is gone
    pair.sender.call("send", h=back, data="served by the sender")
    assert recv_exact(client, 20) == b"served by the sender"
    client.sendall(b"ping")
    assert pair.sender.call("recv", h=back, n=4) == "ping"
    pair.sender.call("close", h=back)
    assert sees_eof(client, IO_TIMEOUT)


def test_receiver_killed_before_answering_returns_the_ticket(pair: Pair) -> None:
    client, h = pair.client(b"hello")
    t = pair.sender.call("ch_send", ch=pair.sch, h=h, meta=None, data="")
    got = pair.receiver.call("ch_receive", ch=pair.rch)  # it holds the socket, says nothing
    assert got["meta"] == {}
    pair.receiver.kill()
    answered = pair.sender.call("ticket_wait", t=t["t"])
    assert answered["state"] == "returned"
    assert "broke" in answered["reason"]
    back = answered["h"]
    assert back is not None
    assert pair.sender.call("recv", h=back, n=5) == "hello"  # nobody read it: still there
    pair.sender.call("send", h=back, data="still here")
    assert recv_exact(client, 10) == b"still here"
    pair.sender.call("close", h=back)
    assert sees_eof(client, IO_TIMEOUT)
    err = pair.sender.refused("ch_send", "ChannelBroken", ch=pair.sch, h=pair.srv)
    assert err.msg


def test_fire_and_forget(pair: Pair) -> None:
    client, h = pair.client(b"x")
    t = pair.sender.call("ch_send", ch=pair.sch, h=h, data="x", ack=False)
    assert t["state"] == "sent"
    got = pair.receiver.call("ch_receive", ch=pair.rch)
    assert got["acked"] is False
    pair.receiver.call("send", h=got["h"], data="y")
    assert recv_exact(client, 1) == b"y"
    pair.receiver.call("close", h=got["h"])
    assert sees_eof(client, IO_TIMEOUT)


def test_unix_addresses_are_refused_on_windows() -> None:
    with pytest.raises(sockshare.ChannelError, match=r"tcp://127\.0\.0\.1:PORT"):
        sockshare.Channel.listen("@abstract-name")
    with pytest.raises(sockshare.ChannelError, match=r"tcp://127\.0\.0\.1:PORT"):
        sockshare.Channel.connect("/tmp/some.sock")


def test_listener_port_cannot_be_hijacked() -> None:
    """No SO_REUSEADDR on Windows: there it would let another socket bind the same port."""
    with sockshare.Channel.listen("tcp://127.0.0.1:0") as lst:
        port = int(lst.address.rsplit(":", 1)[1])
        thief = socket.socket()
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            with pytest.raises(OSError):
                thief.bind(("127.0.0.1", port))
        finally:
            thief.close()


def test_async_channel_in_this_process() -> None:
    """AsyncChannel on Windows needs a selector loop; handoff to ourselves, both ways."""

    async def main() -> None:
        lst = sockshare.AsyncChannelListener.listen("tcp://127.0.0.1:0")
        try:
            accepting = asyncio.ensure_future(lst.accept())
            a = await sockshare.AsyncChannel.connect(lst.address)
            b = await asyncio.wait_for(accepting, IO_TIMEOUT)
            assert a.peer.pid == os.getpid()
            with socket.create_server(("127.0.0.1", 0)) as srv:
                client = socket.create_connection(srv.getsockname(), timeout=IO_TIMEOUT)
                conn, _ = srv.accept()
                with client:
                    client.sendall(b"hi")
                    assert conn.recv(2) == b"hi"
                    sending = asyncio.ensure_future(a.send(conn, meta={"k": "v"}, data=b"hi"))
                    h = await asyncio.wait_for(b.receive(), IO_TIMEOUT)
                    assert (h.meta, h.data) == ({"k": "v"}, b"hi")
                    h.accept()
                    ticket = await asyncio.wait_for(sending, IO_TIMEOUT)
                    assert ticket.state == "accepted"
                    with h.socket as s:
                        s.settimeout(IO_TIMEOUT)
                        s.sendall(b"from the receiver")
                        assert recv_exact(client, 17) == b"from the receiver"
            await a.aclose()
            await b.aclose()
        finally:
            lst.close()

    asyncio.run(main(), loop_factory=asyncio.SelectorEventLoop)


def test_an_accept_before_a_failed_write_counts(spawn: Spawn) -> None:
    """The dispatcher's case: its worker ACCEPTs a handoff and is killed; the
    dispatcher's next write to it fails (the connection was reset) before its read
    callback ran. The ACCEPT, already in its receive buffer, still counts when the
    channel breaks: the ticket is accepted, not returned (which would hand the
    connection, perhaps with its request already read, to another worker)."""
    import time

    receiver = spawn("receiver")
    lst = receiver.call("ch_listen")

    async def main() -> None:
        receiver.send_line(f'{{"op": "ch_accept", "h": {lst["h"]}}}')
        a = await sockshare.AsyncChannel.connect(lst["address"])
        rch = receiver.answer()
        with socket.create_server(("127.0.0.1", 0)) as srv:
            client = socket.create_connection(srv.getsockname(), timeout=IO_TIMEOUT)
            conn, _ = srv.accept()
            with client:
                # from here on no await: the loop does not run, so `a` reads nothing
                # until its write fails
                [ticket] = a.send_nowait([(conn, None, b"")])
                got = receiver.call("ch_receive", ch=rch["h"])
                receiver.call("ho_accept", hid=got["hid"])   # the ACCEPT is written
                receiver.kill()
                deadline = time.monotonic() + IO_TIMEOUT
                while a.usable and time.monotonic() < deadline:
                    a.send_control({"cmd": "ping"})   # fails once the reset came back
                    time.sleep(0.05)
                assert not a.usable
                assert ticket.state == "accepted", (ticket.state, ticket.reason)
                assert ticket.socket is None   # our copy closed: the worker's it was
        await a.aclose()

    asyncio.run(main(), loop_factory=asyncio.SelectorEventLoop)


def test_async_channel_on_a_proactor_loop_says_what_to_do() -> None:
    async def main() -> None:
        ch_lst = sockshare.Channel.listen("tcp://127.0.0.1:0")
        try:
            with pytest.raises(sockshare.ChannelError, match="SelectorEventLoop"):
                await sockshare.AsyncChannel.connect(ch_lst.address)
        finally:
            ch_lst.close()

    asyncio.run(main(), loop_factory=asyncio.ProactorEventLoop)


def test_send_to_a_peer_that_never_reads_times_out() -> None:
    """send_timeout holds on Windows too: past OUT_LIMIT of frames the peer did not read,
    a control waits send_timeout and then raises ChannelTimeout (nothing sent, the
    channel still usable): never a hang."""
    import threading
    import time

    with sockshare.Channel.listen("tcp://127.0.0.1:0") as lst:
        accepted: list[sockshare.Channel] = []
        t = threading.Thread(target=lambda: accepted.append(lst.accept(timeout=IO_TIMEOUT)))
        t.start()
        sender = sockshare.Channel.connect(lst.address, timeout=IO_TIMEOUT)
        t.join(IO_TIMEOUT)
        [stuck] = accepted  # never reads from here on
        sender.send_timeout = 0.5
        blob = {"pad": "x" * (512 * 1024)}

        def flood() -> None:
            for _ in range(200):  # at most 100 MB: far more than any socket buffer
                sender.send_control(blob)

        start = time.monotonic()
        try:
            with pytest.raises(sockshare.ChannelTimeout, match="has not read"):
                flood()
            assert time.monotonic() - start < 8.0
            with pytest.raises(sockshare.ChannelTimeout):
                sender.send_control({"after": "timeout"})
            assert sender._state.broken is None
        finally:
            sender.close()
            stuck.close()
