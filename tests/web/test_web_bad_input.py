"""Bad input against ``sockshare serve`` running web apps: each gets its answer (400,
431, 500, 503), the worker goes on serving, keeps its pid (no crash) and its descriptor
count comes back down (no leak)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serve_helpers import Server, reset_close
from web_helpers import base_url, fds, raw_http, sockshare, status_of, wait_fds_at_most, wait_until
from web_raw_apps import RAISED

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def starlette(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with sockshare(tmp_path_factory.mktemp("starlette"), "web_starlette_app:app",
                   workers=1) as server:
        yield server


def only_worker(server: Server) -> int:
    pids = [int(w["pid"]) for w in server.status()["workers"]]
    assert len(pids) == 1, pids
    return pids[0]


@contextmanager
def unharmed(server: Server, warm_up: str = "/items/1") -> Iterator[int]:
    """Around the bad input: the one worker serves ``warm_up`` before and after, keeps
    its pid and ends with no more descriptors than it had before."""
    pid = only_worker(server)
    url = base_url(server)
    with httpx.Client(base_url=url, timeout=10.0) as c:
        c.get(warm_up)
    server.wait_for(lambda st: st["workers"][0]["connections"] == 0, 5, "the warm-up to close")
    before = fds(pid)
    yield pid
    with httpx.Client(base_url=url, timeout=10.0) as c:
        r = c.get(warm_up)
    assert r.status_code < 500 or warm_up == "/", r
    wait_fds_at_most(pid, before)
    assert only_worker(server) == pid
    assert [w["restarts"] for w in server.status()["workers"]] == [0]


@pytest.mark.parametrize("head", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\r\n\r\n",
])
def test_malformed_request_400(starlette: Server, head: bytes) -> None:
    with unharmed(starlette):
        out = raw_http(starlette.address(), head)
        assert status_of(out) == 400, out


def test_oversized_headers_431(starlette: Server) -> None:
    head = (b"GET /items/1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024)
            + b"\r\n\r\n")
    with unharmed(starlette):
        out = raw_http(starlette.address(), head)
        assert status_of(out) == 431, out[:300]
        # spread over many small writes too
        with socket.create_connection(starlette.address(), 10) as s:
            s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(200):
                    s.sendall(b"X-H%d: " % i + b"b" * 400 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except ConnectionResetError:
                pass
        assert got.startswith(b"HTTP/1.1 431 "), got[:300]


def test_h11_big_head_431_and_garbage_400(tmp_path: Path) -> None:
    """The same answers with ``--http h11``."""
    with sockshare(tmp_path, "web_starlette_app:app", "--http", "h11", workers=1) as server, \
            unharmed(server):
        big = b"GET /items/1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
        assert status_of(raw_http(server.address(), big)) == 431
        assert status_of(raw_http(server.address(), b"GARBAGE\r\n\r\n")) == 400


@pytest.mark.parametrize("split", [1, 2, 3])
def test_blank_line_split_across_reads_is_not_a_big_head(starlette: Server, split: int) -> None:
    """The blank line that ends a head arrives in two reads (TCP may cut anywhere): the
    body after it is not counted as head (a 100 KB upload got 431)."""
    body = b"z" * (100 * 1024)
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with unharmed(starlette), socket.create_connection(starlette.address(), 10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cut = len(head) - 4 + split
        s.sendall(head[:cut])
        wait_until(lambda: starlette.status()["workers"][0]["connections"] == 1, 5,
                   "the connection to reach the worker")
        time.sleep(0.1)   # the worker reads the first part on its own
        s.sendall(head[cut:])
        time.sleep(0.1)
        s.sendall(body)
        got = b""
        while b"}" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        assert status_of(got) == 200, got[:300]
        assert b'"length":102400' in got


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_next_request_before_the_response_ends(tmp_path: Path, http: str) -> None:
    """The client has read a whole response (content-length) and sends its next request,
    a 100 KB upload, before the app finished the response: the body is not counted as
    a request head (it got 431)."""
    body = b"z" * (100 * 1024)
    with sockshare(tmp_path, "web_raw_apps:lagging", "--http", http, workers=1) as server, \
            unharmed(server, warm_up="/"), socket.create_connection(server.address(), 10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"\r\n\r\n0"):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.1)   # the head alone first
        s.sendall(body)
        got = b""
        while not got.endswith(b"102400") and b"\r\n\r\n" not in got.partition(b"\r\n\r\n")[2]:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
            if got.startswith(b"HTTP/1.1 431"):
                break
        assert status_of(got) == 200, got[:300]
        assert got.endswith(b"\r\n\r\n102400")


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_pipelined_upload_after_a_request(tmp_path: Path, http: str) -> None:
    """A GET and the head of a 200 KB upload in one write, the rest of the body later:
    both are answered (the body is not counted as a head)."""
    body = b"p" * (200 * 1024)
    with sockshare(tmp_path, "web_raw_apps:lagging", "--http", http, workers=1) as server, \
            unharmed(server, warm_up="/"), socket.create_connection(server.address(), 10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body[:10_000])
        time.sleep(0.1)
        s.sendall(body[10_000:])
        got = b""
        while not got.endswith(b"\r\n\r\n204800"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        assert got.count(b"HTTP/1.1 200 OK") == 2, got[:600]


@pytest.mark.parametrize("rst", [False, True])
def test_client_disconnects_mid_upload(starlette: Server, rst: bool) -> None:
    with unharmed(starlette):
        s = socket.create_connection(starlette.address(), 10)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5242880\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n")
        s.sendall(b"u" * (1024 * 1024))
        if rst:
            reset_close(s)
        else:
            s.close()
    with httpx.Client(base_url=base_url(starlette), timeout=10.0) as c:
        r = c.post("/upload", content=b"x" * 1000)
    assert r.json()["length"] == 1000


def test_app_raises_500_and_traceback_logged(tmp_path: Path) -> None:
    with sockshare(tmp_path, "web_raw_apps:raising", workers=1) as server, \
            unharmed(server, warm_up="/"):
        with httpx.Client(base_url=base_url(server), timeout=10.0) as c:
            r = c.get("/x")
        assert r.status_code == 500
        wait_until(lambda: RAISED in server.log(), 5, "the traceback in the log")
        log = server.log()
        assert "Traceback (most recent call last)" in log
        assert f"RuntimeError: {RAISED}" in log


def test_app_returns_without_response_500(tmp_path: Path) -> None:
    with sockshare(tmp_path, "web_raw_apps:silent", workers=1) as server, \
            unharmed(server, warm_up="/"):
        with httpx.Client(base_url=base_url(server), timeout=10.0) as c:
            statuses = [c.get(f"/{i}").status_code for i in range(3)]
        assert statuses == [500, 500, 500]
        wait_until(lambda: "returned without starting response" in server.log(), 5,
                   "uvicorn's message in the log")


def test_limit_concurrency_one_then_503(tmp_path: Path) -> None:
    """``--limit-concurrency 1``: one slow request is served, a second one at the same
    time gets 503 (uvicorn's own ``--limit-concurrency 1`` answers 503 to both: it counts
    the connection asking)."""
    with sockshare(tmp_path, "web_starlette_app:app", "--limit-concurrency", "1",
                   workers=1) as server, unharmed(server, warm_up="/slow?s=0"):
        url = base_url(server)
        statuses: list[int] = []

        def slow() -> None:
            with httpx.Client(base_url=url, timeout=10.0) as c:
                statuses.append(c.get("/slow", params={"s": "1.5"}).status_code)

        first = threading.Thread(target=slow)
        first.start()
        # the first request is in the app (its connection counts, as in uvicorn: two
        # connections opened at the same instant could both be refused)
        server.wait_for(lambda st: st["workers"][0]["connections"] == 1, 5, "the first request")
        time.sleep(0.3)
        second = threading.Thread(target=slow)
        second.start()
        second.join(15)
        first.join(15)
        assert statuses == [503, 200]
