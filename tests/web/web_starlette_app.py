"""A Starlette app the web tests serve with ``sockshare serve`` and with uvicorn.

Routes: ``/items/{item_id}`` (JSON with a path parameter and a cookie), ``/stream`` (a
chunked streaming response), ``/upload`` (POST: the body's length and sha256, read as a
stream), ``/state`` (what the lifespan put in the state), ``/scope`` (the client address
and ``scope["extensions"]``), ``/slow?s=S`` (answers after S seconds), ``/boom`` (raises),
``/ws`` (a WebSocket that echoes text and bytes). ``failing`` is the same kind of app
whose lifespan startup raises.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

#: what ``failing``'s lifespan startup raises (the tests look for it in the log)
STARTUP_ERROR = "the database at db.invalid is unreachable (test)"


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    yield {"greeting": "hello from the lifespan", "started_in": os.getpid()}


async def item(request: Request) -> Response:
    resp = JSONResponse({"item_id": request.path_params["item_id"],
                         "q": request.query_params.get("q")})
    resp.set_cookie("seen", str(request.path_params["item_id"]), httponly=True)
    return resp


async def _chunks() -> AsyncIterator[bytes]:
    for i in range(5):
        yield f"chunk {i}\n".encode()
        await asyncio.sleep(0)


async def stream(request: Request) -> Response:
    return StreamingResponse(_chunks(), media_type="text/plain")


async def upload(request: Request) -> Response:
    digest = hashlib.sha256()
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        digest.update(chunk)
    return JSONResponse({"length": n, "sha256": digest.hexdigest()})


async def state(request: Request) -> Response:
    return JSONResponse({"greeting": request.state.greeting,
                         "same_process": request.state.started_in == os.getpid()})


async def scope(request: Request) -> Response:
    ext = request.scope.get("extensions") or {}
    return JSONResponse({"client": list(request.scope["client"]), "pid": os.getpid(),
                         "sockshare": ext.get("sockshare")})


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return JSONResponse({"slept": True})


async def boom(request: Request) -> Response:
    raise RuntimeError("boom from the starlette test app")


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await ws.send_text("echo: " + msg["text"])
            elif msg.get("bytes") is not None:
                await ws.send_bytes(b"echo: " + msg["bytes"])
    except WebSocketDisconnect:
        return


routes = [
    Route("/items/{item_id:int}", item),
    Route("/stream", stream),
    Route("/upload", upload, methods=["POST"]),
    Route("/state", state),
    Route("/scope", scope),
    Route("/slow", slow),
    Route("/boom", boom),
    WebSocketRoute("/ws", echo),
]

app = Starlette(routes=routes, lifespan=lifespan)


@asynccontextmanager
async def _failing_lifespan(app: Starlette) -> AsyncIterator[None]:
    raise RuntimeError(STARTUP_ERROR)
    yield  # pragma: no cover


failing = Starlette(routes=routes, lifespan=_failing_lifespan)
