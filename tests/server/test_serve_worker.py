"""The worker runtime's :class:`Connection`, over a real channel pair in one process,
and the default app (the demo) served end to end."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Server, connect

from sockshare import AsyncChannel, Channel
from sockshare.server._handler import Connection, WorkerInfo, open_connection
from sockshare.server._runtime import load_app

pytestmark = pytest.mark.timeout(60)

INFO = WorkerInfo(id=7, pid=1234, generation=2, pool="p")


async def _handoff(meta: dict[str, Any], data: bytes) -> tuple[Connection, socket.socket, AsyncChannel,
                                                     AsyncChannel]:
    a, b = Channel.pair()
    sender, receiver = AsyncChannel.wrap(a), AsyncChannel.wrap(b)
    client, server_side = socket.socketpair()
    tickets = sender.send_nowait([(server_side, meta, data)])
    h = await asyncio.wait_for(receiver.receive(), 5)
    conn = await open_connection(h, INFO)
    h.accept()
    await asyncio.wait_for(sender.wait(tickets), 5)
    assert tickets[0].state == "accepted"
    return conn, client, sender, receiver


def test_pre_read_bytes_come_first() -> None:
    async def main() -> None:
        conn, client, sender, receiver = await _handoff(
            {"handoff_id": "9.1", "client": ["10.0.0.1", 4000], "pool": "p"}, b"GET / HTTP/1.1\r\n")
        client.sendall(b"Host: x\r\n\r\n")
        got = b""
        while len(got) < 27:
            got += await asyncio.wait_for(conn.reader.read(100), 5)
        assert got == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert conn.handoff_id == "9.1"
        assert conn.client_address == ("10.0.0.1", 4000)
        assert conn.worker is INFO
        conn.writer.write(b"answer")
        await conn.writer.drain()
        await conn.close()
        await conn.close()   # idempotent
        assert conn.closed
        client.settimeout(5)
        assert client.recv(100) == b"answer"
        assert client.recv(100) == b""
        client.close()
        await sender.aclose()
        await receiver.aclose()

    asyncio.run(main())


def test_client_address_without_meta() -> None:
    async def main() -> None:
        conn, client, sender, receiver = await _handoff({}, b"")
        assert conn.client_address in ("", None, b"")   # socketpair peers have no name
        assert conn.handoff_id == ""
        await conn.close()
        client.close()
        await sender.aclose()
        await receiver.aclose()

    asyncio.run(main())


def test_load_app_accepts_sync_callables_returning_awaitables() -> None:
    app = load_app("serve_apps:app")
    assert asyncio.iscoroutinefunction(app)
    with pytest.raises(ImportError):
        load_app("no_colon_here")
    with pytest.raises(AttributeError):
        load_app("serve_apps:missing")


def test_default_app_is_the_demo(tmp_path: Path) -> None:
    with Server(tmp_path, app=None, workers=2) as srv:
        addr = srv.address()
        pids = {w["pid"] for w in srv.status()["workers"]}
        with connect(addr) as s:
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        who = json.loads(body)
        assert who["worker_pid"] in pids
        assert who["handoff_id"].startswith(f"{srv.dispatcher}.")
