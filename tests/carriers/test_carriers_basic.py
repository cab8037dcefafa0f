"""Each carrier on its own, in one process: sizes, limits, timeouts, full, closed, bad input.

Writers that may block on a large message run in a thread; everything else is the real
facility driven from the test. The hygiene fixture checks fds and leftovers after each.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sockshare import (
    CarrierClosed,
    CarrierFull,
    CarrierInUse,
    CarrierNotFound,
    CarrierTimeout,
    MessageTooLarge,
    carriers,
)
from tests.carriers.conftest import SCHEMES, Addresses, needs

SLACK = 0.5  # scheduling slack allowed past a timeout on a loaded 2-core machine


@contextmanager
def pair(
    addrs: Addresses, scheme: str, query: str = ""
) -> Iterator[tuple[carriers.Carrier, carriers.Carrier]]:
    needs(scheme)
    with (
        carriers.open(addrs.url(scheme) + query, "r", timeout=5) as rx,
        carriers.open(rx.url, "w", timeout=5) as tx,
    ):
        yield rx, tx


def in_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` in a thread; the returned join() re-raises what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> None:
        t.join(30)
        assert not t.is_alive(), "writer thread hung"
        if errors:
            raise errors[0]

    return join


def send_all(tx: carriers.Carrier, messages: list[bytes], timeout: float | None = None) -> None:
    for message in messages:
        tx.send(message, timeout=timeout)


def send_until_it_fails(
    tx: carriers.Carrier, message: bytes, timeout: float, pause: float = 0.0, sent: list[bytes] | None = None
) -> None:
    """Send ``message`` again and again (at most 1000 times, each appended to ``sent``)
    until a send raises."""
    for _ in range(1000):
        tx.send(message, timeout=timeout)
        if sent is not None:
            sent.append(message)
        if pause:
            time.sleep(pause)
    raise AssertionError("no send failed")


def drain(rx: carriers.Carrier, quiet: float = 0.3) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(100_000):
        try:
            got.append(rx.recv(timeout=quiet))
        except CarrierTimeout:
            return got
    raise AssertionError("drain did not end")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sizes_zero_one_and_maximum(addrs: Addresses, scheme: str) -> None:
    with pair(addrs, scheme) as (rx, tx):
        assert tx.max_message == rx.max_message == type(tx).max_message
        messages = [b"", b"\x00", os.urandom(tx.max_message), b"", b"z"]
        join = in_thread(lambda: send_all(tx, messages))
        got = [rx.recv(timeout=10) for _ in messages]
        join()
        assert [len(m) for m in got] == [len(m) for m in messages]
        assert got == messages


@pytest.mark.parametrize("scheme", SCHEMES)
def test_over_the_maximum_is_refused_before_sending(addrs: Addresses, scheme: str) -> None:
    with pair(addrs, scheme) as (rx, tx):
        with pytest.raises(MessageTooLarge, match="nothing was sent"):
            tx.send(b"x" * (tx.max_message + 1))
        with pytest.raises(ValueError):  # MessageTooLarge is a ValueError too
            tx.send(bytearray(tx.max_message + 1))
        with pytest.raises(CarrierTimeout):
            rx.recv(timeout=0.05)  # nothing arrived
        tx.send(b"after")
        assert rx.recv(timeout=5) == b"after"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_recv_timeout_is_bounded(addrs: Addresses, scheme: str) -> None:
    with pair(addrs, scheme) as (rx, _tx):
        t0 = time.monotonic()
        with pytest.raises(CarrierTimeout):
            rx.recv(timeout=0)
        assert time.monotonic() - t0 < SLACK
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # CarrierTimeout is a TimeoutError
            rx.recv(timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 0.3 + SLACK


@pytest.mark.parametrize("scheme", SCHEMES)
def test_default_timeout_from_open(addrs: Addresses, scheme: str) -> None:
    needs(scheme)
    with carriers.open(addrs.url(scheme), "r", timeout=0.2) as rx:
        t0 = time.monotonic()
        with pytest.raises(CarrierTimeout):
            rx.recv()
        assert 0.2 <= time.monotonic() - t0 < 0.2 + SLACK


# small geometries so that "full" comes quickly where the URL can set it
FULL_QUERY = {"mq": "?maxmsg=4", "shm": "?slots=4&msgsize=1024"}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_then_timeout_then_drained_in_order(addrs: Addresses, scheme: str) -> None:
    with pair(addrs, scheme, FULL_QUERY.get(scheme, "")) as (rx, tx):
        size = min(tx.max_message, 16 * 1024)
        sent: list[bytes] = []
        for i in range(20_000):
            message = i.to_bytes(4, "big") * (size // 4)
            try:
                tx.send(message, timeout=0)
            except CarrierFull:
                break
            sent.append(message)
        else:
            pytest.fail("never full")
        assert sent, "not even one message fitted"
        if tx.closed:  # a stream cut partway through a message closes its writer
            assert scheme in ("unix", "tcp")
            with pytest.raises(CarrierClosed, match="partway"):
                tx.send(b"late", timeout=0.3)
        else:
            t0 = time.monotonic()
            with pytest.raises(CarrierTimeout):
                tx.send(b"late", timeout=0.3)
            assert 0.3 <= time.monotonic() - t0 < 0.3 + SLACK
        got = drain(rx)
        assert [m[:4] for m in got] == [m[:4] for m in sent]
        assert got == sent
        with carriers.open(rx.url, "w", timeout=5) if tx.closed else tx as again:
            again.send(b"room again", timeout=5)
            assert rx.recv(timeout=5) == b"room again"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_closed_ends_and_wrong_direction(addrs: Addresses, scheme: str) -> None:
    with pair(addrs, scheme) as (rx, tx):
        with pytest.raises(io.UnsupportedOperation):
            rx.send(b"x")
        with pytest.raises(io.UnsupportedOperation):
            tx.recv(timeout=0)
        with pytest.raises(TypeError):
            tx.send("text")  # type: ignore[arg-type]
        tx.close()
        tx.close()  # twice is fine
        assert tx.closed
        with pytest.raises(CarrierClosed):
            tx.send(b"x")
    with pytest.raises(CarrierClosed):
        rx.recv(timeout=0)
    assert "closed" in repr(rx)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_writer_with_nobody_there(addrs: Addresses, scheme: str) -> None:
    needs(scheme)
    if scheme in ("tcp", "udp"):
        kind = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
        url = f"{scheme}://127.0.0.1:{addrs.free_port(kind)}"
    else:
        url = addrs.url(scheme)
    t0 = time.monotonic()
    with pytest.raises(CarrierNotFound):
        carriers.open(url, "w", timeout=5)
    assert time.monotonic() - t0 < 1.0
    # a reader that must attach does not create either
    if scheme in ("fifo", "mq", "sysvmq", "shm"):
        with pytest.raises(CarrierNotFound):
            carriers.open(url, "r", create=False)


def test_fifo_writer_waits_for_a_reader(addrs: Addresses) -> None:
    needs("fifo")
    url = addrs.url("fifo")
    path = url.removeprefix("fifo://")
    os.mkfifo(path, 0o600)  # a FIFO exists, but nobody reads it
    try:
        t0 = time.monotonic()
        with pytest.raises(CarrierTimeout, match="no reader"):
            carriers.open(url, "w", timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 0.3 + SLACK
        with carriers.open(url, "r") as rx:
            assert not rx.owner  # it did not create the FIFO, so it will not remove it
            with carriers.open(url, "w", timeout=1) as tx:
                tx.send(b"hi")
            assert rx.recv(timeout=1) == b"hi"
        assert os.path.exists(path)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_writer_learns_the_reader_is_gone(addrs: Addresses, scheme: str) -> None:
    with pair(addrs, scheme) as (rx, tx):
        tx.send(b"first")
        assert rx.recv(timeout=5) == b"first"
        rx.close()
        with pytest.raises(CarrierClosed):  # UDP hears "port unreachable" after a datagram
            send_until_it_fails(tx, b"into the void", timeout=1, pause=0.01)


@pytest.mark.parametrize("scheme", ["mq", "sysvmq", "shm"])
def test_writer_owner_closing(addrs: Addresses, scheme: str) -> None:
    """create=True makes the writer the owner; its close removes the queue or ring."""
    needs(scheme)
    with carriers.open(addrs.url(scheme), "w", create=True, timeout=5) as tx:
        assert tx.owner
        with carriers.open(tx.url, "r", create=False, timeout=5) as rx:
            assert not rx.owner
            tx.send(b"one")
            tx.send(b"two")
            tx.close()
            if scheme == "sysvmq":  # IPC_RMID is immediate: queued messages go with it
                with pytest.raises(CarrierClosed):
                    rx.recv(timeout=1)
            else:  # the reader drains what is queued, then hears of the close
                assert rx.recv(timeout=1) == b"one"
                assert rx.recv(timeout=1) == b"two"
                t0 = time.monotonic()
                with pytest.raises(CarrierClosed):
                    rx.recv(timeout=5)
                assert time.monotonic() - t0 < 1.0 + SLACK


@pytest.mark.parametrize("scheme", SCHEMES)
def test_several_writers_keep_their_own_order(addrs: Addresses, scheme: str) -> None:
    needs(scheme)
    per_writer, writers = 200, 3
    with carriers.open(addrs.url(scheme), "r", timeout=5) as rx:
        joins = []
        for w in range(writers):

            def write(w: int = w) -> None:
                with carriers.open(rx.url, "w", timeout=10) as tx:
                    for i in range(per_writer):
                        tx.send(b"%d:%d" % (w, i), timeout=10)

            joins.append(in_thread(write))
        got = [rx.recv(timeout=10) for _ in range(per_writer * writers)]
        for join in joins:
            join()
    for w in range(writers):
        mine = [m for m in got if m.startswith(b"%d:" % w)]
        assert mine == [b"%d:%d" % (w, i) for i in range(per_writer)]


def test_reader_url_names_the_port_it_bound() -> None:
    for scheme in ("tcp", "udp"):
        with carriers.open(f"{scheme}://127.0.0.1:0", "r") as rx:
            host, port = rx.url.removeprefix(f"{scheme}://").rsplit(":", 1)
            assert host == "127.0.0.1"
            assert int(port) > 0


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).close()
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    for scheme in ("tcp", "udp"):
        with carriers.open(f"{scheme}://[::1]:0", "r", timeout=5) as rx:
            assert rx.url.startswith(f"{scheme}://[::1]:")
            with carriers.open(rx.url, "w", timeout=5) as tx:
                tx.send(b"v6")
                assert rx.recv() == b"v6"


def test_unix_socket_file_is_owner_only_and_stale_file_replaced(addrs: Addresses) -> None:
    needs("unix")
    url = addrs.url("unix")
    path = url.removeprefix("unix://")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a leftover of a reader that died: nobody listens
    with carriers.open(url, "r") as rx:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(CarrierInUse, match="in use"):
            carriers.open(url, "r")
        with carriers.open(url, "w") as tx:
            tx.send(b"ok")
        assert rx.recv(timeout=1) == b"ok"
    assert not os.path.exists(path)


def test_created_resources_are_owner_only(addrs: Addresses) -> None:
    for scheme in ("fifo", "unixgram", "shm"):
        needs(scheme)
        with carriers.open(addrs.url(scheme), "r") as rx:
            if scheme == "shm":
                path = "/dev/shm/" + rx.url.removeprefix("shm://")
            else:
                path = rx.url.split("://", 1)[1]
            assert os.stat(path).st_mode & 0o777 == 0o600, scheme


def test_stream_writer_cut_mid_message_closes_itself(addrs: Addresses) -> None:
    """A send that times out partway through a frame closes the writer (no reconnect, so
    nothing can overtake what is still buffered); the reader discards the fragment."""
    with pair(addrs, "unix") as (rx, tx):
        big = b"B" * tx.max_message
        sent: list[bytes] = []
        with pytest.raises((CarrierFull, CarrierTimeout)):
            send_until_it_fails(tx, big, timeout=0.05, sent=sent)
        assert tx.closed
        with pytest.raises(CarrierClosed, match="partway"):
            tx.send(b"x")
        assert drain(rx) == sent
        with carriers.open(rx.url, "w") as fresh:
            fresh.send(b"fresh", timeout=5)
        assert rx.recv(timeout=5) == b"fresh"


def test_available_reports_every_carrier() -> None:
    status = carriers.available()
    assert list(status) == SCHEMES
    for scheme, entry in status.items():
        ok, detail = entry  # a 2-tuple, as `sockshare doctor` unpacks it
        assert isinstance(ok, bool)
        assert detail, scheme
        assert bool(entry) is ok


@pytest.mark.parametrize(
    "url",
    [
        "nosuch://x",
        "unix://host/path",
        "unix://",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:99999",
        "tcp://127.0.0.1:80/path",
        "mq:///a/b",
        "mq://",
        "sysvmq://0",
        "sysvmq://banana",
        "sysvmq://0x100000000",
        "shm://.hidden",
        "shm://ring?bogus=1",
        "mq://q?maxmsg=zero",
        "fifo://",
        "unix:///tmp/x#frag",
    ],
)
def test_bad_urls_are_value_errors(url: str) -> None:
    with pytest.raises(ValueError):
        carriers.open(url, "r")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        carriers.open("tcp://127.0.0.1:0", "rw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        carriers.open("tcp://127.0.0.1:0", "r", timeout=-1)
    with pytest.raises(ValueError, match="create"):
        carriers.open("tcp://127.0.0.1:0", "w", create=True)
    with carriers.open("udp://127.0.0.1:0") as rx, pytest.raises(ValueError, match="timeout"):
        rx.recv(timeout=float("nan"))
