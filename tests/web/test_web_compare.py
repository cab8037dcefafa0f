"""The same app, served by ``sockshare serve`` and by the server people use it with
(uvicorn for ASGI, gunicorn for WSGI), answers the same: status, the headers that matter
(content-type, content-length or chunked, set-cookie) and the body, over a keep-alive
connection; WebSockets echo the same. Under sockshare, ``scope["client"]`` is the real
client and ``scope["extensions"]["sockshare"]`` is the handoff's metadata."""

from __future__ import annotations

import hashlib
import http.client
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import Server
from web_helpers import RefServer, base_url, headers_of, sockshare, worker_pids
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.timeout(90)

#: one response, as compared: status, the headers that matter, the body
Answer = tuple[int, dict[str, str | None], bytes]

_rng = random.Random(13)
BIG = _rng.randbytes(5 * 1024 * 1024)
FILE = _rng.randbytes(300 * 1024)


@contextmanager
def served(tmp: Path, app: str, ref_kind: str, ref_app: str | None = None,
           *args: str) -> Iterator[tuple[Server, str, str]]:
    """``app`` under sockshare (2 workers) and under the reference server, both ready:
    (the sockshare Server, its base URL, the reference's base URL)."""
    with RefServer(tmp / "ref", ref_kind, ref_app or app) as ref, \
            sockshare(tmp / "ss", app, *args, workers=2) as server:
        ref.wait_ready()
        yield server, base_url(server), ref.url


def answer(r: httpx.Response) -> Answer:
    return r.status_code, headers_of(r.headers), r.content


def exchange(url: str, steps: Callable[[httpx.Client], list[Answer]]) -> list[Answer]:
    with httpx.Client(base_url=url, timeout=20.0) as client:
        return steps(client)


def client_seen(url: str, path: str) -> tuple[list[Any], Any, tuple[str, int]]:
    """GET ``path`` (a route that reports its client) on a connection whose local address
    we know: (the client the app saw, the whole JSON answer, our address)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        local = conn.sock.getsockname()
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200
        body = json.loads(r.read())
    finally:
        conn.close()
    return body["client"], body, (local[0], local[1])


# -- Starlette -------------------------------------------------------------------------


def _starlette_steps(c: httpx.Client) -> list[Answer]:
    out = [answer(c.get("/items/42", params={"q": "abc"})),
           answer(c.get("/items/not-a-number")),
           answer(c.get("/stream")),
           answer(c.post("/upload", content=BIG)),
           answer(c.get("/state")),
           answer(c.get("/items/7"))]
    ports = {c.get("/scope").json()["client"][1] for _ in range(3)}
    assert len(ports) == 1, f"the requests did not share one keep-alive connection: {ports}"
    # last: after an app raised, uvicorn closes the connection (no "connection: close"
    # in the 500), so a request sent on it right after could meet a reset
    out.append(answer(c.get("/boom")))
    return out


def _ws_echo(url: str) -> list[str | bytes]:
    got: list[str | bytes] = []
    with ws_connect(url.replace("http://", "ws://") + "/ws", open_timeout=10,
                    close_timeout=5) as ws:
        for msg in ("hello", b"\x00\x01binary", "x" * 100_000):
            ws.send(msg)
            got.append(ws.recv(timeout=10))
    return got


def test_starlette_same_as_uvicorn(tmp_path: Path) -> None:
    with served(tmp_path, "web_starlette_app:app", "uvicorn") as (server, ss, ref):
        mine, theirs = exchange(ss, _starlette_steps), exchange(ref, _starlette_steps)
        assert mine == theirs
        by_path = dict(zip(["item", "404", "stream", "upload", "state", "item7", "boom"], mine,
                           strict=True))
        assert by_path["item"][0] == 200
        assert json.loads(by_path["item"][2]) == {"item_id": 42, "q": "abc"}
        assert by_path["item"][1]["set-cookie"] is not None
        assert by_path["stream"][1]["transfer-encoding"] == "chunked"
        assert by_path["stream"][1]["content-length"] is None
        assert by_path["stream"][2] == b"".join(f"chunk {i}\n".encode() for i in range(5))
        assert json.loads(by_path["upload"][2]) == {"length": len(BIG),
                                                    "sha256": hashlib.sha256(BIG).hexdigest()}
        assert json.loads(by_path["state"][2]) == {"greeting": "hello from the lifespan",
                                                   "same_process": True}
        assert by_path["boom"][0] == 500
        assert _ws_echo(ss) == _ws_echo(ref) == ["echo: hello", b"echo: \x00\x01binary",
                                                  "echo: " + "x" * 100_000]
        assert "boom from the starlette test app" in server.log()


def test_starlette_scope_client_and_sockshare_extension(tmp_path: Path) -> None:
    with served(tmp_path, "web_starlette_app:app", "uvicorn") as (server, ss, ref):
        pids = set(worker_pids(server))
        for url in (ss, ref):
            client, _body, local = client_seen(url, "/scope")
            assert tuple(client) == local
        client, body, local = client_seen(ss, "/scope")
        assert body["pid"] in pids
        meta = body["sockshare"]
        assert meta["pool"] == "default"
        assert meta["listener"] == "main"
        assert meta["client"] == list(local)
        assert isinstance(meta["handoff_id"], str)
        assert meta["handoff_id"]
        _client, ref_body, _local = client_seen(ref, "/scope")
        assert ref_body["sockshare"] is None


def test_fastapi_same_as_uvicorn(tmp_path: Path) -> None:
    def steps(c: httpx.Client) -> list[Answer]:
        return [answer(c.get("/users/5", params={"verbose": "true"})),
                answer(c.get("/users/x")),
                answer(c.post("/echo", json={"a": [1, 2, 3]})),
                answer(c.get("/openapi.json"))]

    with served(tmp_path, "web_fastapi_app:app", "uvicorn") as (_server, ss, ref):
        mine, theirs = exchange(ss, steps), exchange(ref, steps)
        assert mine == theirs
        assert [a[0] for a in mine] == [200, 422, 200, 200]


# -- Flask (WSGI) ----------------------------------------------------------------------


def _flask_steps(c: httpx.Client) -> list[Answer]:
    return [answer(c.get("/json/world", params={"x": "1"})),
            answer(c.post("/form", data={"field": "value é"},
                          files={"file": ("data.bin", FILE, "application/octet-stream")})),
            answer(c.get("/error")),
            answer(c.get("/teapot")),
            answer(c.get("/missing")),
            answer(c.get("/json/again"))]


def test_flask_same_as_gunicorn(tmp_path: Path) -> None:
    with served(tmp_path, "web_flask_app:app", "gunicorn") as (server, ss, ref):
        mine, theirs = exchange(ss, _flask_steps), exchange(ref, _flask_steps)
        assert mine == theirs
        assert [a[0] for a in mine] == [200, 200, 500, 418, 404, 200]
        assert mine[0][1]["set-cookie"] is not None
        assert json.loads(mine[1][2]) == {"field": "value é", "filename": "data.bin",
                                          "length": len(FILE),
                                          "sha256": hashlib.sha256(FILE).hexdigest()}
        assert "flask test app error route" in server.log()
        for url in (ss, ref):
            client, _body, local = client_seen(url, "/scope")
            assert tuple(client) == local


# -- Django, as WSGI and as ASGI -------------------------------------------------------


def _django_steps(c: httpx.Client) -> list[Answer]:
    return [answer(c.get("/hello/bob/")),
            answer(c.post("/upload/", content=BIG[:1024 * 1024],
                          headers={"content-type": "application/octet-stream"})),
            answer(c.post("/upload/", data={"field": "f"},
                          files={"file": ("up.bin", FILE, "application/octet-stream")})),
            answer(c.get("/upload/")),
            answer(c.get("/missing/"))]


@pytest.mark.parametrize(("attr", "ref_kind"), [("wsgi", "gunicorn"), ("asgi", "uvicorn")])
def test_django_same_as_reference(tmp_path: Path, attr: str, ref_kind: str) -> None:
    with served(tmp_path, f"web_django_app:{attr}", ref_kind) as (_server, ss, ref):
        mine, theirs = exchange(ss, _django_steps), exchange(ref, _django_steps)
        assert mine == theirs
        assert [a[0] for a in mine] == [200, 200, 200, 405, 404]
        assert json.loads(mine[0][2]) == {"hello": "bob", "method": "GET"}
        assert json.loads(mine[1][2]) == {"length": 1024 * 1024,
                                          "sha256": hashlib.sha256(BIG[:1024 * 1024]).hexdigest()}
        assert json.loads(mine[2][2])["file"] == {"name": "up.bin", "length": len(FILE),
                                                  "sha256": hashlib.sha256(FILE).hexdigest()}


def _answers(sock: Any, n: int) -> list[str]:
    """Read until ``n`` answers of ``web_raw_apps:ext_echo`` came (each body one line)."""
    import re

    data = b""
    found: list[str] = []
    while len(found) < n:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {found}"
        data += chunk
        found = re.findall(r"\r\n\r\n(/\S* \d+ \w+ \S+)\n", data.decode())
    return found


@pytest.mark.parametrize("accept", ["dispatcher", "worker"])
def test_every_request_gets_the_sockshare_extension_whatever_its_reads(tmp_path: Path,
                                                                     accept: str) -> None:
    """``scope["extensions"]["sockshare"]`` reaches the app for a request whose head comes
    whole in one read (the fast path), with its body in the same read, pipelined behind
    others in one write, or split over several writes, on one keep-alive connection."""
    import socket
    import time

    with sockshare(tmp_path, "web_raw_apps:ext_echo", "--interface", "asgi", "--accept", accept,
                   workers=1) as server:
        how = "worker" if accept == "worker" else "handoff"
        with socket.create_connection(server.address(), timeout=10) as s:
            s.sendall(b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n")
            assert _answers(s, 1) == [f"/one 0 ext {how}"]
            s.sendall(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n0123456789")
            assert _answers(s, 1) == [f"/body 10 ext {how}"]
            s.sendall(b"".join(f"GET /p{i} HTTP/1.1\r\nhost: x\r\n\r\n".encode() for i in range(3)))
            assert _answers(s, 3) == [f"/p{i} 0 ext {how}" for i in range(3)]
            s.sendall(b"GET /split HTTP/1.1\r\nho")
            time.sleep(0.2)
            s.sendall(b"st: x\r\n\r\n")
            assert _answers(s, 1) == [f"/split 0 ext {how}"]
            s.sendall(b"POST /later HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n")
            time.sleep(0.2)
            s.sendall(b"abcde")
            assert _answers(s, 1) == [f"/later 5 ext {how}"]
