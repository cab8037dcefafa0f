"""Web apps for the keep-alive handover tests: each answer says which worker process
served it, so a client sees its connection move while it never reconnects."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from flask import Flask


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``GET /`` -> ``"<worker pid> <client port>"`` (``/sleep?s=S``: after S seconds;
    ``/big?n=N``: N bytes); ``/ws``: an echo WebSocket."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()   # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"{os.getpid()} {message.get('text')}"})
    if scope["path"] == "/sleep":   # ``/sleep?s=S``: a request in progress for S seconds
        await asyncio.sleep(float(scope["query_string"].decode().partition("=")[2] or "1"))
    if scope["path"] == "/big":   # ``/big?n=N``: N bytes of body, in one message
        size = int(scope["query_string"].decode().partition("=")[2] or "1")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(size).encode())]})
        await send({"type": "http.response.body", "body": b"x" * size})
        return
    body = f"{os.getpid()} {scope['client'][1]}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


flask_app = Flask(__name__)


@flask_app.route("/")
def index() -> str:
    from flask import request

    return f"{os.getpid()} {request.environ.get('REMOTE_PORT')}"


# -- a Starlette WebSocket that opts in to migration (docs/web.md) --------------------------

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route, WebSocketRoute  # noqa: E402
from starlette.websockets import WebSocket  # noqa: E402
from ws_endpoints import count as counter  # noqa: E402
from ws_endpoints import echo as plain_echo  # noqa: E402

starlette_app = Starlette(routes=[WebSocketRoute("/count", counter)])


async def pid_page(request: Request) -> PlainTextResponse:
    client = request.client
    return PlainTextResponse(f"{os.getpid()} {client.port if client else 0}")


async def extension(request: Request) -> PlainTextResponse:
    """``scope["extensions"]["sockshare"]``, as JSON."""
    import json

    return PlainTextResponse(json.dumps(request.scope.get("extensions", {}).get("sockshare")))


async def where(ws: WebSocket) -> None:
    """An opted-in WebSocket that says, first thing in each worker, what its handoff's
    metadata says of its last move (``scope["extensions"]["sockshare"]["migration"]``,
    JSON; ``null`` where it was opened), then moves whenever the server asks."""
    import json

    ext: dict[str, Any] = ws.scope.get("extensions") or {}
    await ws.accept()
    await ws.send_text(json.dumps({"pid": os.getpid(),
                                   "migration": (ext.get("sockshare") or {}).get("migration")}))
    moving = (ext.get("sockshare.migration") or {}).get("requested") or asyncio.Event()
    await moving.wait()
    await ext["sockshare.migration"]["migrate"](None)


async def flood(ws: WebSocket) -> None:
    """Sends ``?n=N`` bytes (which a client that does not read leaves in the worker), then
    moves at once; refused, it says why (``refused: <reason>``) and waits for the end."""
    from sockshare.server import MigrationRefused

    await ws.accept()
    await ws.send_bytes(b"x" * int(ws.query_params.get("n", "1")))
    try:
        await ws.scope["extensions"]["sockshare.migration"]["migrate"](None)
    except MigrationRefused as exc:
        await ws.send_text(f"refused: {exc}")
        await ws.receive()


async def impatient(ws: WebSocket) -> None:
    """An opted-in WebSocket that says ``here <pid> <ms>`` first thing in each worker
    (``<ms>``: how long its last move took, -1 where it was opened) and echoes ``<pid>
    <text>``; on ``move`` it gives its move ``?t=S`` seconds (``asyncio.wait_for``) and,
    past them, goes on as if nothing had happened."""
    import time

    from starlette.websockets import WebSocketDisconnect

    ext: dict[str, Any] = ws.scope.get("extensions") or {}
    started = ((ext.get("sockshare") or {}).get("migration") or {}).get("started")
    took = round((time.monotonic() - started) * 1000) if isinstance(started, float) else -1
    await ws.accept()
    await ws.send_text(f"here {os.getpid()} {took}")
    try:
        while True:
            text = await ws.receive_text()
            if text != "move":
                await ws.send_text(f"{os.getpid()} {text}")
                continue
            try:
                await asyncio.wait_for(ext["sockshare.migration"]["migrate"](None),
                                       float(ws.query_params.get("t", "0.5")))
            except TimeoutError:
                continue
            return
    except WebSocketDisconnect:
        return


#: keep-alive HTTP (``/``), an opted-in WebSocket (``/count``), a plain one (``/echo``),
#: the handoff's metadata (``/ext``, and ``/where`` for a WebSocket), one whose client
#: is slow (``/flood``), one that gives up waiting for its move (``/impatient``)
combined_app = Starlette(routes=[Route("/", pid_page), WebSocketRoute("/count", counter),
                                 WebSocketRoute("/echo", plain_echo), Route("/ext", extension),
                                 WebSocketRoute("/where", where), WebSocketRoute("/flood", flood),
                                 WebSocketRoute("/impatient", impatient)])
