"""The ASGI app of benchmarks/asgi.py: ``GET`` anything, get ``hello`` (text/plain).

A plain ASGI 3 function with no framework, so the benchmark measures the servers
(sockshare serve, uvicorn, gunicorn with uvicorn's worker, granian), not a router. It
answers the lifespan protocol so every server runs it the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

BODY = b"hello"
HEADERS = [(b"content-type", b"text/plain; charset=utf-8"),
           (b"content-length", str(len(BODY)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
RESPONSE = {"type": "http.response.body", "body": BODY}


async def app(scope: Scope, receive: Callable[[], Awaitable[Message]],
              send: Callable[[Message], Awaitable[None]]) -> None:
    if scope["type"] == "http":
        await send(dict(START))
        await send(dict(RESPONSE))
        return
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
