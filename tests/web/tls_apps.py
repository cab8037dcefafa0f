"""ASGI apps for tests/web/test_tls.py: one per pool, each answering with its pool.

``pool_a`` and ``pool_b`` answer an HTTP request with JSON: the pool the app was built
for, the pool and SNI the dispatcher wrote in the handoff's metadata, ``scope["scheme"]``,
``scope["client"]`` and the worker's pid (so a test sees which process served it). A WebSocket gets the same
JSON once accepted, then each text message back with the pool's name in front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from web_raw_apps import lifespan

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


def _about(pool: str, scope: Scope) -> bytes:
    meta = scope.get("extensions", {}).get("sockshare", {})
    return json.dumps({"app": pool, "pool": meta.get("pool"), "sni": meta.get("sni"),
                       "scheme": scope.get("scheme"), "pid": os.getpid(),
                       "path": scope.get("path"),
                       "client": scope.get("client")}).encode()


def make(pool: str) -> ASGIApp:
    async def app(scope: Scope, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] == "http":
            while (await receive()).get("more_body"):
                pass
            body = _about(pool, scope)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "websocket":
            if (await receive())["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": _about(pool, scope).decode()})
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": f"{pool}:{msg.get('text')}"})

    return app


pool_a = make("a")
pool_b = make("b")
