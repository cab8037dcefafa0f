"""``sniff_now``: the sniffer's no-wait attempt, which the dispatcher tries before it starts
a task per connection (the HTTP head or the ClientHello is usually queued already).

It must give exactly what :func:`sniff` gives for the same bytes (pool, metadata, pre-read
data, what stays in the socket), and give up -- consuming nothing -- in every other case,
so that :func:`sniff` then does the whole job and says what is wrong.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from test_sniff import openssl_hello

from sockshare.server._sniff import SniffResult, SniffRules, sniff, sniff_now

RULES = SniffRules(hosts={"api.example.test": "api", "*.static.test": "static"},
                   snis={"api.example.test": "tls-api"}, default="web")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _async_result(payload: bytes, rules: SniffRules) -> tuple[SniffResult, bytes]:
    a, b = socket.socketpair()
    b.setblocking(False)
    try:
        a.sendall(payload)
        result = asyncio.run(sniff(b, rules, 2.0))
        return result, _rest(b)
    finally:
        a.close()
        b.close()


def _rest(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("payload", [
    b"GET /x HTTP/1.1\r\nHost: api.example.test\r\nAccept: */*\r\n\r\n",
    b"POST /up HTTP/1.1\r\nhost: Img.Static.Test:8080\r\ncontent-length: 4\r\n\r\nbody",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET http://api.example.test/abs HTTP/1.1\r\nHost: other\r\n\r\n",
])
def test_a_queued_http_head_gives_what_sniff_gives(
        pair: tuple[socket.socket, socket.socket], payload: bytes) -> None:
    a, b = pair
    a.sendall(payload)
    got = sniff_now(b, RULES)
    want, want_rest = _async_result(payload, RULES)
    assert got == want
    assert _rest(b) == want_rest   # the body (if any) is still in the socket


def test_a_queued_client_hello_is_routed_and_left_in_the_socket(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    hello = openssl_hello("api.example.test", ["h2"])
    a.sendall(hello)
    got = sniff_now(b, RULES)
    assert got == _async_result(hello, RULES)[0]
    assert got is not None
    assert (got.pool, got.data) == ("tls-api", b"")
    assert _rest(b) == hello   # peeked, never consumed: the worker does the handshake


@pytest.mark.parametrize(("payload", "rules"), [
    (b"", RULES),                                           # nothing yet
    (b"GET / HTTP/1.1\r\nHost: api.example.test\r\n", RULES),   # head incomplete
    (b"GET / HT", RULES),                                   # request line incomplete
    (b"\x00\x01garbage\r\n\r\n", RULES),                    # neither HTTP nor TLS
    (b"GET / HTTP/2.5\r\nHost: x\r\n\r\n", RULES),          # bad: sniff() says why
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n",
     SniffRules(proxy="optional")),                         # PROXY: the full sniffer
])
def test_anything_else_is_left_to_sniff_untouched(
        pair: tuple[socket.socket, socket.socket], payload: bytes, rules: SniffRules) -> None:
    a, b = pair
    if payload:
        a.sendall(payload)
    assert sniff_now(b, rules) is None
    assert _rest(b) == payload
