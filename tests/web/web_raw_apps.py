"""Plain ASGI and WSGI callables for the bad-input and interface tests.

``raising`` raises before answering, ``silent`` returns without a response, ``lagging``
answers the request body's length and ends the response 0.3 s after its last byte, ``wsgi_app``
and ``asgi_app`` answer ``ok`` (the interface tests' plain callables), ``handler`` is a
sockshare handler (one argument). Each ASGI app here ignores the lifespan protocol
politely (startup and shutdown complete).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: what ``raising`` raises (the tests look for it in the log)
RAISED = "raising app: the test asked for this error"


async def lifespan(receive: Receive, send: Send) -> None:
    """The lifespan protocol, politely: startup and shutdown complete (also tls_apps')."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def ext_echo(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    size = 0
    while True:
        msg = await receive()
        size += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    meta = (scope.get("extensions") or {}).get("sockshare")
    body = (f"{scope['path']} {size} {'ext' if isinstance(meta, dict) else 'none'} "
            f"{meta.get('accepted', 'handoff') if isinstance(meta, dict) else '-'}\n").encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def raising(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    raise RuntimeError(RAISED)


async def silent(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)


async def lagging(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    n = 0
    more = True
    while more:
        msg = await receive()
        n += len(msg.get("body", b""))
        more = bool(msg.get("more_body", False))
    text = str(n).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text, "more_body": True})
    await asyncio.sleep(0.3)   # the client has the whole response; the server is not done
    await send({"type": "http.response.body", "body": b""})


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok asgi"})


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok wsgi"]


async def handler(conn: Any) -> None:
    await conn.reader.readline()
    conn.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nok handler")
    await conn.writer.drain()
    await conn.close()
