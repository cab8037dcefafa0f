"""The demo as an ordinary ASGI app: the same page, ``/whoami`` and WebSocket as the
built-in demo (:mod:`sockshare.server._demo`), written against ASGI and the
``sockshare.migration`` extension (docs/web.md) instead of sockshare's handler API::

    pip install 'sockshare[asgi]'
    sockshare serve sockshare.server._demo_asgi:app --workers 2

Every answer names the worker process that produced it. The page's "Move me" button
sends ``{"cmd": "move"}`` on the WebSocket; the app answers by moving itself to another
worker with its counter as the state (``migrate(state)``), and the new worker, started
with ``scope["extensions"]["sockshare.resume"]``, says ``{"event": "moved", ...}`` and
goes on counting. A reload or an upgrade moves it the same way (the server sets the
extension's ``requested`` event). Under a server without the extension the button
answers ``{"event": "move_failed"}`` and everything else works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from sockshare.server._demo import render_page

__all__ = ["app"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class _Worker:
    id: object
    pid: int
    generation: object


@dataclass
class _Page:
    """What :func:`render_page` reads of a connection."""

    meta: dict[str, Any]
    worker: _Worker
    handoff_id: Any = field(default=None)


_this_worker: _Worker | None = None


def _worker() -> _Worker:
    """This process (read once a process: a WebSocket that moves in asks again)."""
    global _this_worker
    w = _this_worker
    if w is None or w.pid != os.getpid():
        w = _this_worker = _Worker(int(os.environ.get("SOCKSHARE_WORKER_ID", "0") or 0),
                                   os.getpid(),
                                   int(os.environ.get("SOCKSHARE_GENERATION", "0") or 0))
    return w


def _meta(scope: Scope) -> dict[str, Any]:
    meta = (scope.get("extensions") or {}).get("sockshare")
    return dict(meta) if isinstance(meta, dict) else {}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI 3 entry point."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await _http(scope, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)


async def _http(scope: Scope, send: Send) -> None:
    meta = _meta(scope)
    path = scope.get("path", "/")
    if scope.get("method") not in ("GET", "HEAD"):
        status, ctype, body = 405, b"text/plain", b"method not allowed\n"
    elif path == "/":
        page = _Page(meta, _worker(), meta.get("handoff_id"))
        status, ctype, body = 200, b"text/html; charset=utf-8", render_page(page).encode()
    elif path == "/whoami":
        w = _worker()
        status, ctype = 200, b"application/json"
        body = json.dumps({"worker_pid": w.pid, "worker_id": w.id,
                           "handoff_id": meta.get("handoff_id")}).encode()
    else:
        status, ctype, body = 404, b"text/plain", b"not found\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})


async def _websocket(scope: Scope, receive: Receive, send: Send) -> None:
    ext = scope.get("extensions") or {}
    resumed = ext.get("sockshare.resume")
    offer = ext.get("sockshare.migration")
    state = resumed.get("state") if isinstance(resumed, dict) else None
    n = int(state.get("n", 0)) if isinstance(state, dict) else 0
    moves = int(state.get("moves", 0)) if isinstance(state, dict) else 0
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    w = _worker()

    async def say(obj: dict[str, Any]) -> None:
        await send({"type": "websocket.send", "text": json.dumps(obj)})

    if resumed is not None:
        mig = _meta(scope).get("migration") or {}
        started = mig.get("started")
        why = state.get("reason") if isinstance(state, dict) else None
        await say({"event": "moved", "from_pid": resumed.get("from"), "worker_pid": w.pid,
                   "worker_id": w.id, "n": n, "moves": moves, "reason": why or mig.get("reason"),
                   "latency_ms": (round((time.monotonic() - started) * 1000, 3)
                                  if isinstance(started, float) else None)})
    requested: asyncio.Event = offer["requested"] if isinstance(offer, dict) else asyncio.Event()

    async def move(why: str) -> bool:
        """True once another worker has the connection."""
        if not isinstance(offer, dict):
            await say({"event": "move_failed", "reason": "this server cannot move WebSockets",
                       "worker_pid": w.pid, "n": n})
            return False
        try:
            await offer["migrate"]({"n": n, "moves": moves + 1, "reason": why})
        except Exception as exc:   # MigrationRefused: still ours, nothing lost
            requested.clear()
            await say({"event": "move_failed", "reason": str(exc), "worker_pid": w.pid, "n": n})
            return False
        return True

    wait: asyncio.Future[Any] | None = None   # (one for many messages: not one a message)
    try:
        while True:
            get = asyncio.ensure_future(receive())
            if wait is None:
                wait = asyncio.ensure_future(requested.wait())
            done, _ = await asyncio.wait({get, wait}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                wait = None
                if await move(str((offer or {}).get("reason") or "server")):
                    return
                continue
            message = get.result()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                continue
            with contextlib.suppress(ValueError):
                if json.loads(text) == {"cmd": "move"}:
                    wait.cancel()
                    wait = None
                    if await move("button"):
                        return
                    continue
            n += 1
            await say({"echo": text, "worker_pid": w.pid, "worker_id": w.id, "n": n})
    finally:
        if wait is not None:
            wait.cancel()
