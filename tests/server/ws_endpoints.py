"""Two Starlette WebSocket endpoints shared by the web tests' apps (tests/server/web_apps.py)
and the reload benchmark's app (benchmarks/reload_app.py):

* :func:`count` opts in to the ``sockshare.migration`` ASGI extension (docs/web.md): it
  answers each message with ``"<n> <pid> <text>"``, ``n`` counting the messages of the
  connection, and when the server asks it to move it hands ``n`` over as its state, so
  the count goes on in the new worker. Under servers that do not offer the extension it
  is a plain counting echo;
* :func:`echo` knows nothing of migration: ``"<pid> <text>"`` for each message.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect


async def count(ws: WebSocket) -> None:
    """The opted-in endpoint: its count is the state that moves with the connection."""
    ext: dict[str, Any] = ws.scope.get("extensions") or {}
    n: int = (ext.get("sockshare.resume") or {}).get("state", 0)
    await ws.accept()
    moving: asyncio.Event = (ext.get("sockshare.migration") or {}).get("requested") \
        or asyncio.Event()
    while True:
        get = asyncio.ensure_future(ws.receive_text())
        wait = asyncio.ensure_future(moving.wait())
        done, _ = await asyncio.wait({get, wait}, return_when=asyncio.FIRST_COMPLETED)
        wait.cancel()
        if get not in done:
            get.cancel()
            await ext["sockshare.migration"]["migrate"](n)
            return
        try:
            text = get.result()
        except WebSocketDisconnect:
            return
        n += 1
        await ws.send_text(f"{n} {os.getpid()} {text}")


async def echo(ws: WebSocket) -> None:
    """The plain endpoint: knows nothing of migration."""
    await ws.accept()
    try:
        while True:
            text = await ws.receive_text()
            await ws.send_text(f"{os.getpid()} {text}")
    except WebSocketDisconnect:
        return
