"""A worker reads nothing of a handed-off connection before its ACCEPT is written.

A real worker process (``python -m sockshare.server.worker``, the demo app) connects to
a channel that this test holds as a stand-in dispatcher. The test sends it ``migrate``
commands and reads none of the answers, until the worker's channel socket is full and
its answers wait in its write queue; then it hands over a TCP connection whose client
has already sent a request. The worker takes the handoff, but its ACCEPT waits behind
the queued answers.

The rule (docs/protocol.md, section 5.3): until that ACCEPT is written, the worker
reads nothing from the connection. Were the worker killed at that moment, the
dispatcher, which never saw an ACCEPT, takes the connection back and gives it to
another worker; had the first one read the request, the second would wait for a
request that never comes, and so would the client. So:

* killed: the ticket comes back unanswered, and every byte of the request is still
  in the socket's receive queue;
* not killed: once the test reads the channel again, the ACCEPT arrives and the
  worker answers the client.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from tests.conftest import fd_count

from sockshare import Channel, SockshareError, Ticket

pytestmark = pytest.mark.timeout(90)

SRC = Path(__file__).resolve().parent.parent.parent / "src"
REQUEST = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
#: migrate commands whose answers are left unread: each answer (``migrate_ack``) is one
#: write into the worker's channel socket, and each write takes ~700 bytes of its send
#: buffer (~208 KiB): a few hundred fill it. Their frames are 40 bytes or more each
#: (~700 KiB in all, under the 1 MiB past which the worker stops reading its channel).
COMMANDS = 15000


def _inq(sock: socket.socket | Channel) -> int:
    """Bytes waiting in the receive queue of ``sock`` (FIONREAD)."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", buf)[0]
    return value


def _holds(pid: int, sock: socket.socket) -> bool:
    """Whether process ``pid`` has a descriptor of the same socket as ``sock``."""
    want = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                return True
        except OSError:
            continue
    return False


def _settled(ch: Channel, timeout: float = 20.0) -> int:
    """The channel's unread byte count once it stops growing (the worker blocked)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = _inq(ch)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 0.5:
            return n
        time.sleep(0.05)
    raise AssertionError(f"the worker's answers kept coming for {timeout} s")


#: the worker's command line on another event loop: uvloop has no synchronous transport,
#: so the runtime takes its general path (the transport made after the ACCEPT left)
_ON_UVLOOP = ("import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
              "from sockshare.server._runtime import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kill", [True, False], ids=["killed", "served"])
def test_no_read_before_the_accept_is_written(sock_dir: Path, kill: bool, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    fds0 = fd_count()
    address = str(sock_dir / "ch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p))
    listener = Channel.listen(address)
    start = ["-m", "sockshare.server.worker"] if loop == "asyncio" else ["-c", _ON_UVLOOP]
    proc = subprocess.Popen([sys.executable, *start, "--app", "sockshare.server._demo:handle",
                             "--channel", address, "--id", "1", "--log-level", "warning"],
                            env=env, stderr=subprocess.PIPE)
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname(), timeout=20)
    ch: Channel | None = None
    srv: socket.socket | None = None
    try:
        ch = listener.accept(timeout=30)
        hello = ch.receive_control(timeout=30)
        assert hello["ev"] == "hello", hello
        # fill the worker's channel socket: its answers to these wait in its write queue
        for i in range(COMMANDS):
            ch.send_control({"cmd": "migrate", "n": 0, "req": i})
        backlog = _settled(ch)
        # less than the answers: the rest waits in the worker's queue
        assert 0 < backlog < COMMANDS * 40, backlog
        srv, _ = lsock.accept()
        client.sendall(REQUEST)
        deadline = time.monotonic() + 10
        while _inq(srv) < len(REQUEST) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _inq(srv) == len(REQUEST)
        ticket = ch.send(srv, meta={"handoff_id": "t.1"})   # (no read of the channel)
        deadline = time.monotonic() + 20
        while not _holds(proc.pid, srv) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _holds(proc.pid, srv), "the worker never took the handoff"
        time.sleep(0.5)   # many turns of its loop: a transport would have read by now
        # fewer bytes than the answers ahead of the ACCEPT: it did not leave
        assert _inq(ch) < COMMANDS * 40, (backlog, _inq(ch))
        if _inq(srv) != len(REQUEST):
            # The worker read the request: allowed once its ACCEPT is written, so it must
            # have been. On a loaded machine the case this test is about may not happen:
            # the answers to the commands read with the handoff wait for the end of the
            # worker's loop turn, after the handoff's ACCEPT, which then leaves at once
            # if the earlier answers had not filled the socket yet (one CI run). What
            # must hold either way: the ACCEPT reached the dispatcher.
            deadline = time.monotonic() + 20
            while ticket.state == "pending" and time.monotonic() < deadline:
                ch.poll(0.1)
            assert ticket.state == "accepted", \
                f"the worker read the request before its ACCEPT left ({ticket.state})"
            print("the worker's channel was not full when the handoff came: its ACCEPT "
                  "left at once (the queued case did not happen in this run)")
        elif kill:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(20)
            deadline = time.monotonic() + 20
            back: list[Ticket] = []
            while not back and time.monotonic() < deadline:
                try:
                    ch.poll(0.1)
                except SockshareError:
                    pass   # the channel ended: the ticket is returned
                back = ch.returned()
            assert back == [ticket], ticket.state
            assert ticket.state != "accepted"
            assert ticket.socket is not None
            # what another worker would be given: the whole request, unread
            assert _inq(ticket.socket) == len(REQUEST)
            ticket.socket.close()
            client.settimeout(5)
            with pytest.raises(ConnectionResetError):   # closed with its request unread
                client.recv(100)
        else:
            # read the answers: the ACCEPT arrives, then the worker serves the client
            deadline = time.monotonic() + 20
            while ticket.state != "accepted" and time.monotonic() < deadline:
                ch.poll(0.1)
                ch.returned()
            assert ticket.state == "accepted"
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            assert b"t.1" in data, data[-300:]   # (whoami names the handoff)
    finally:
        client.close()
        if srv is not None:   # (the channel's, once sent: closing it again does nothing)
            srv.close()
        lsock.close()
        if ch is not None:
            ch.close()
        listener.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(20)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert fd_count() == fds0, err
