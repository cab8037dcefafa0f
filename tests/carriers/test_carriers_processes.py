"""Carriers between real processes: 10,000 messages in order, a live TCP connection handed
over by token, permissions enforced by the kernel, and a reader process that dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest

import sockshare
from sockshare import CarrierClosed, CarrierPermission, carriers
from tests.carriers.child import make_message
from tests.carriers.conftest import SCHEMES, Addresses, Child, needs

COUNT = 10_000


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ten_thousand_messages_in_order_from_another_process(
    addrs: Addresses, children: list[Child], scheme: str
) -> None:
    needs(scheme)
    with carriers.open(addrs.url(scheme), "r", timeout=20) as rx:
        child = Child("send", rx.url, str(COUNT))
        children.append(child)
        for i in range(COUNT):
            got = rx.recv()
            expected = make_message(i, rx.max_message)
            if got != expected:
                pytest.fail(
                    f"message {i}: got {got[:12]!r}... ({len(got)} bytes), expected {expected[:12]!r}"
                )
        assert child.wait() == 0, child.stderr()
        with pytest.raises(sockshare.CarrierTimeout):
            rx.recv(timeout=0.05)  # nothing extra, no duplicates


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.usefixtures("token_agent")
def test_token_hands_a_live_tcp_connection_to_another_process(
    addrs: Addresses, children: list[Child], scheme: str
) -> None:
    needs(scheme)
    if not hasattr(sockshare, "export_socket"):
        pytest.skip("sockshare.export_socket is not there yet")
    child = Child("token", addrs.url(scheme))
    children.append(child)
    ready = child.line()
    assert ready.startswith("ready "), ready
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=20)
        with client:
            conn, _ = listener.accept()
            with conn:
                token = sockshare.export_socket(conn, child.pid)
            assert token.isascii()
            assert len(token) < 512
            with carriers.open(ready.removeprefix("ready "), "w", timeout=20) as tx:
                tx.send(token.encode("ascii"))
            client.sendall(b"ping")
            assert client.recv(64) == b"pong:ping"  # answered by the child, on our connection
    assert child.line() == "ok"
    assert child.wait() == 0, child.stderr()


PERMISSION_SCHEMES = ["unix", "unixgram", "fifo", "mq", "sysvmq", "shm"]


@pytest.mark.parametrize("scheme", PERMISSION_SCHEMES)
def test_another_user_is_refused(addrs: Addresses, scheme: str) -> None:
    """The resource is 0600: a forked child that drops to nobody gets CarrierPermission."""
    needs(scheme)
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    with carriers.open(addrs.url(scheme), "r") as rx:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report the exception class name, then _exit
            code = 1
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    carriers.open(rx.url, "w", timeout=1).close()
                    result = "opened"
                except Exception as exc:
                    result = type(exc).__name__
                os.write(w, result.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                result = f.read().decode()
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert result == CarrierPermission.__name__


def _send_until_it_fails(tx: carriers.Carrier, message: bytes) -> None:
    for _ in range(200):
        tx.send(message, timeout=2)
    raise AssertionError("the writer never noticed")


LIVENESS_SCHEMES = ["unix", "unixgram", "tcp", "udp", "fifo", "shm"]


@pytest.mark.parametrize("scheme", LIVENESS_SCHEMES)
def test_reader_process_killed(addrs: Addresses, children: list[Child], scheme: str) -> None:
    """A reader killed without closing: the writer gets CarrierClosed, never a hang.

    (A killed reader cannot remove what it made: the test removes the leftovers; a new
    reader would replace the shm ring by itself. Queues outlive their reader by design:
    mq and sysvmq writers learn of the death through the owner record, tested in
    test_carriers_crash.py.)
    """
    needs(scheme)
    child = Child("reader", addrs.url(scheme))
    children.append(child)
    url = child.line().removeprefix("ready ")
    try:
        with carriers.open(url, "w", timeout=5) as tx:
            tx.send(b"before")
            os.kill(child.pid, signal.SIGKILL)  # our own child
            child.wait()
            t0 = time.monotonic()
            with pytest.raises(CarrierClosed):  # ring full / port unreachable / EPIPE...
                _send_until_it_fails(tx, b"x" * min(4096, tx.max_message))
            assert time.monotonic() - t0 < 3.0
            assert tx.closed
        if scheme == "shm":  # a writer is refused the dead owner's ring at once, with a reason
            with pytest.raises(CarrierClosed, match="left over"):
                carriers.open(url, "w")
    finally:
        if scheme == "shm":
            with contextlib.suppress(FileNotFoundError):
                os.unlink("/dev/shm/" + url.removeprefix("shm://"))
        elif scheme in ("unix", "unixgram", "fifo"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(url.split("://", 1)[1])


@pytest.mark.parametrize("scheme", PERMISSION_SCHEMES)
def test_a_forked_child_closing_its_copy_removes_nothing(addrs: Addresses, scheme: str) -> None:
    """Only the process that created a resource removes it (fork() copies the object)."""
    needs(scheme)
    with carriers.open(addrs.url(scheme), "r") as rx:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if not rx.owner else 3
                rx.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert rx.owner
        with carriers.open(rx.url, "w", timeout=2) as tx:
            tx.send(b"still here")
        assert rx.recv(timeout=2) == b"still here"
