"""Tokens between sibling Windows processes: runs INSIDE Windows CPython (Wine or real).

Each test starts peers (``winpeer.py``) with this interpreter: an exporter that accepts a
connection from *this* process on 127.0.0.1, an importer whose pid the token is made
for, and sometimes a third process. The connection is checked from this process, the
client, in both directions.

How leaks are seen without handle counting: once the exporter closes its own socket,
the client reads EOF only when *no* process holds a handle to the connection any more.
So "the importer closed the duplicate it took on a refusal" is "the client sees EOF
while the importer still runs", and "a token never imported leaves the duplicate in the
target" is "no EOF until the target exits".
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

if sys.platform != "win32":
    pytest.skip("Windows-only: run through scripts/wine_python.py pytest", allow_module_level=True)

from winpeer import IO_TIMEOUT, PeerClient, popen, recv_exact, sees_eof

import sockshare
from sockshare.protocol._token import ADDR_ABSTRACT, KIND_POSIX, TokenInfo, decode_token, encode_token

pytestmark = pytest.mark.timeout(30)

Spawn = Callable[..., PeerClient]


@dataclasses.dataclass
class Connected:
    """A live connection: ``client`` here, its other end as handle ``h`` in ``exporter``."""

    client: socket.socket
    exporter: PeerClient
    h: int
    port: int


@pytest.fixture
def connected(spawn: Spawn) -> Iterator[Connected]:
    exporter = spawn("exporter")
    lst = exporter.call("listen")
    client = socket.create_connection(("127.0.0.1", lst["port"]), timeout=IO_TIMEOUT)
    try:
        conn = exporter.call("accept", h=lst["h"])
        exporter.call("close", h=lst["h"])
        # in use before the move: both directions
        client.sendall(b"hello exporter")
        assert exporter.call("recv", h=conn["h"], n=14) == "hello exporter"
        exporter.call("send", h=conn["h"], data="hello client")
        assert recv_exact(client, 12) == b"hello client"
        yield Connected(client, exporter, conn["h"], lst["port"])
    finally:
        client.close()


def test_import_sockshare_and_doctor() -> None:
    code = "import sockshare, sys; print(sockshare.__version__, sys.platform)"
    runs = [  # started together, waited for with a limit each
        popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in (["-c", code], ["-m", "sockshare.cli", "doctor", "--json"],
                     ["-m", "sockshare.cli", "doctor"])
    ]
    outs = []
    for proc in runs:
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        assert proc.returncode == 0, out + err
        outs.append(out)
    assert outs[0].split() == [sockshare.__version__, "win32"]
    checks = json.loads(outs[1])
    assert checks["tokens"]["ok"], checks["tokens"]
    assert checks["wsaduplicatesocket"]["ok"], checks["wsaduplicatesocket"]
    assert not checks["scm_rights"]["ok"]
    assert "on win32" in outs[2]


def test_export_import_between_siblings(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    c = connected
    c.client.sendall(b"queued before the move")  # unread bytes travel with the socket
    start = time.perf_counter()
    token = c.exporter.call("export", h=c.h, pid=importer.pid, close=True)
    got = importer.call("import", token=token)
    took = time.perf_counter() - start
    print(f"export -> pipe -> import round trip: {took * 1000:.1f} ms (import alone {got['ms']:.1f} ms)")
    assert decode_token(token).is_windows
    assert token.isascii()
    assert token.startswith("ss1.")
    # the same connection: same local port, its peer is our client
    assert got["local"] == c.port
    assert got["peer"] == c.client.getsockname()[1]
    assert got["timeout"] is None  # blocking, as documented
    assert got["inheritable"] is False
    assert c.exporter.call("pending") == 0  # the exporter keeps nothing after the import

    assert importer.call("recv", h=got["h"], n=22) == "queued before the move"
    importer.call("send", h=got["h"], data="served by the importer")
    assert recv_exact(c.client, 22) == b"served by the importer"
    payload = os.urandom(200_000)
    c.client.sendall(payload)
    assert importer.call("recv", h=got["h"], n=len(payload)) == payload.decode("latin-1")
    # an orderly close, seen at both ends: nobody else holds the connection
    importer.call("close", h=got["h"])
    assert sees_eof(c.client, IO_TIMEOUT)


def test_nonblocking_import(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    got = importer.call("import", token=token, blocking=False)
    assert got["timeout"] == 0.0


def test_wrong_process_is_refused_and_consumes_nothing(connected: Connected, spawn: Spawn) -> None:
    importer, third = spawn("importer"), spawn("third")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    err = third.refused("import", "WrongProcess", token=token)
    assert str(importer.pid) in err.msg
    assert str(third.pid) in err.msg
    assert connected.exporter.call("pending") == 1
    # the real target still can: the third process took nothing
    got = importer.call("import", token=token)
    connected.client.sendall(b"ping")
    assert importer.call("recv", h=got["h"], n=4) == "ping"


def test_second_import_is_consumed(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid, close=True)
    got = importer.call("import", token=token)
    err = importer.refused("import", "TokenConsumed", token=token)
    assert "single use" in err.msg
    # the refusal did not touch the socket imported first
    connected.client.sendall(b"still one")
    assert importer.call("recv", h=got["h"], n=9) == "still one"


def test_agent_refuses_a_replayed_claim(connected: Connected, spawn: Spawn) -> None:
    """The agent's own single-use check, under the importer's local one."""
    from sockshare._tokens import _connect_agent, _exchange

    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    importer.call("import", token=token)
    info = decode_token(token)
    deadline = time.monotonic() + IO_TIMEOUT
    ch = _connect_agent(info, deadline, IO_TIMEOUT)
    try:
        # a refusal comes back, the connection stays good
        sock, refusal = _exchange(ch, info, deadline, IO_TIMEOUT)
        assert sock is None
        assert isinstance(refusal, sockshare.TokenConsumed)
    finally:
        ch.close()


def test_expired_token_is_refused_and_the_duplicate_closed(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid, ttl=0.3)
    time.sleep(0.6)
    err = importer.refused("import", "TokenExpired", token=token)
    assert "expired" in err.msg
    assert connected.exporter.call("pending") == 0
    # the connection is still the exporter's, and the importer holds no copy of it
    connected.client.sendall(b"abc")
    assert connected.exporter.call("recv", h=connected.h, n=3) == "abc"
    connected.exporter.call("close", h=connected.h)
    assert sees_eof(connected.client, IO_TIMEOUT)
    assert importer.proc.poll() is None


def test_release_then_import_is_expired(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    assert connected.exporter.call("release", token=token) is True
    assert connected.exporter.call("release", token=token) is False
    assert connected.exporter.call("pending") == 0
    err = importer.refused("import", "TokenExpired", token=token)
    assert "released" in err.msg
    assert importer.refused("import", "TokenConsumed", token=token)  # still single use locally
    connected.exporter.call("close", h=connected.h)
    assert sees_eof(connected.client, IO_TIMEOUT)


def test_token_never_imported_keeps_the_duplicate_in_the_target(connected: Connected, spawn: Spawn) -> None:
    """Windows semantics: share() already put a handle in the target; only it can close it."""
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    assert connected.exporter.call("release", token=token) is True
    connected.exporter.call("close", h=connected.h)
    assert not sees_eof(connected.client, 0.5)  # the target still holds the duplicate
    importer.finish()
    assert sees_eof(connected.client, IO_TIMEOUT)  # ...until it exits


def test_garbled_tokens_are_invalid(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    mid = len(token) // 2
    bad = {
        "garbled": token[:mid] + ("A" if token[mid] != "A" else "B") + token[mid + 1:],
        "truncated": token[:-5],
        "not a token": "hello",
        "wrong version": "ss2." + token[4:],
    }
    for name, text in bad.items():
        err = importer.refused("import", "InvalidToken", token=text)
        assert err.msg, name
    assert connected.exporter.call("pending") == 1  # none of that touched the real token
    got = importer.call("import", token=token)
    connected.client.sendall(b"ok")
    assert importer.call("recv", h=got["h"], n=2) == "ok"


def test_forged_secret_is_refused_and_the_duplicate_closed(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    forged = encode_token(dataclasses.replace(decode_token(token), secret=b"\0" * 16))
    err = importer.refused("import", "InvalidToken", token=forged)
    assert "forged" in err.msg
    assert connected.exporter.call("pending") == 1
    connected.exporter.call("close", h=connected.h)
    # the forged attempt took the duplicate (fromshare first) and closed it on refusal
    assert sees_eof(connected.client, IO_TIMEOUT)


def test_exporter_gone(connected: Connected, spawn: Spawn) -> None:
    importer = spawn("importer")
    token = connected.exporter.call("export", h=connected.h, pid=importer.pid)
    assert connected.exporter.finish() == 0
    err = importer.refused("import", "ExporterGone", token=token)
    assert str(decode_token(token).exporter_pid) in err.msg
    assert "exited" in err.msg
    assert sees_eof(connected.client, IO_TIMEOUT)  # the importer closed what it took


def test_posix_token_is_invalid_on_windows() -> None:
    info = TokenInfo(KIND_POSIX, 4242, os.getpid(), 7, b"s" * 16, int(time.time() * 1000) + 30_000,
                     exporter_uid=1000, address=b"sockshare/4242/abcd", address_kind=ADDR_ABSTRACT)
    for target in (os.getpid(), 4243):  # for us, or for another pid: the kind is wrong first
        text = encode_token(dataclasses.replace(info, target_pid=target))
        with pytest.raises(sockshare.InvalidToken, match=r"POSIX.*cannot be imported on Windows"):
            sockshare.import_socket(text, timeout=1.0)
    assert sockshare.release(encode_token(info)) is False


def test_export_argument_errors() -> None:
    with socket.socket() as s:
        with pytest.raises(ValueError):
            sockshare.export_socket(s, os.getpid(), ttl=0)
        with pytest.raises(ValueError):
            sockshare.export_socket(s, 0)
    s = socket.socket()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        sockshare.export_socket(s, os.getpid())
