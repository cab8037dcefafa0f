"""Web apps for the keep-alive handover tests: each answer says which worker process
served it, so a client sees its connection move while it never reconnects."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``GET /`` -> ``"<worker pid> <client port>"``; ``/ws``: an echo WebSocket."""
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
