"""The minimal HTTP worker that benchmarks/serve.py runs in every Python configuration.

One connection: read the request head (up to the blank line), write a fixed small
HTTP/1.1 response carrying ``X-Worker: <pid>`` (the load generator counts connections
per worker from it), close. The same coroutine, :func:`answer`, serves all three
Python configurations:

* ``sockshare serve serve_app:handle`` -- the app a sockshare worker runs (``conn`` is a
  :class:`sockshare.server.Connection`);
* ``python benchmarks/serve_app.py shared --fd FD`` -- pre-fork shared accept:
  ``asyncio.start_server`` on a listening socket inherited from the parent;
* ``python benchmarks/serve_app.py reuseport --port P`` -- binds 127.0.0.1:P itself with
  ``SO_REUSEPORT`` (port 0: pick one), next to its siblings.

The two stand-alone modes print ``ready <port>`` on stdout once they accept, and run
until SIGTERM/SIGINT. Not a test and not part of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any

BODY = b"ok\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nX-Worker: %d\r\n\r\n%s" % (len(BODY), os.getpid(), BODY))
BACKLOG = 1024  # sockshare's default listener backlog


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one request head and write the fixed response (the caller closes)."""
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    writer.write(RESPONSE)


async def handle(conn: Any) -> None:
    """The sockshare app: ``sockshare serve serve_app:handle``."""
    await answer(conn.reader, conn.writer)
    await conn.close()


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await answer(reader, writer)
    writer.close()   # what Connection.close() does
    with contextlib.suppress(OSError, RuntimeError):
        await writer.wait_closed()


async def _serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(_client, sock=sock, backlog=BACKLOG)
    sys.stdout.write(f"ready {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="benchmark worker (see the module docstring)")
    ap.add_argument("mode", choices=("shared", "reuseport"))
    ap.add_argument("--fd", type=int, help="shared: the inherited listening socket")
    ap.add_argument("--port", type=int, default=0, help="reuseport: the port (0: pick one)")
    args = ap.parse_args(argv)
    if args.mode == "shared":
        if args.fd is None:
            ap.error("shared needs --fd")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, args.fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(BACKLOG)
    sock.setblocking(False)
    asyncio.run(_serve(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
