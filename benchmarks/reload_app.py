"""The Starlette app of benchmarks/web_reload.py: HTTP and two kinds of WebSockets.

* ``GET /``: ``hello`` (what benchmarks/asgi.py's readiness check asks for);
* ``GET /pid``: the pid of the worker that answered, so a client sees its keep-alive
  connection move between workers;
* ``/count``: a WebSocket that opts in to the ``sockshare.migration`` ASGI extension
  (docs/web.md): it answers each message with ``"<n> <pid> <text>"``, ``n`` counting the
  messages of the connection, and when the server asks it to move it hands ``n`` over as
  its state, so the count goes on in the new worker. Under servers that do not offer the
  extension it is a plain counting echo;
* ``/echo``: a plain WebSocket echo (``"<pid> <text>"``) that ignores the extension.

The two WebSocket endpoints are the web tests' (tests/server/ws_endpoints.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "server"))

from ws_endpoints import count, echo


async def hello(_: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def pid(_: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


app = Starlette(routes=[Route("/", hello), Route("/pid", pid),
                        WebSocketRoute("/count", count), WebSocketRoute("/echo", echo)])
