"""The app behind HAProxy in ``test_haproxy`` (``haproxy_apps:handle``): who am I, who are you.

Workers import it as ``haproxy_apps`` (the tests put ``tests/server`` on ``PYTHONPATH``).
A line protocol; every answer is one JSON line::

    {"host": $HAPROXY_TEST_HOST, "pid": worker pid, "n": lines so far,
     "proxy": conn.meta["proxy"] (the PROXY header: {"src": [ip, port], ...}),
     "client": conn.meta["client"] (the peer: HAProxy), "moves": migrations so far}

``who`` answers and closes; any other line answers and waits for the next one (a
long-lived connection). ``resume`` sits beside ``handle``, so a connection moves to
another worker (or to a new dispatcher's workers on upgrade) between two lines, with its
count (the wait for a line is ``live_apps.next_line``); a connection that HAProxy's TCP
check opens (a PROXY header, then nothing) just ends.
"""

from __future__ import annotations

import json
import os
from typing import Any

from live_apps import next_line

from sockshare.server._handler import Connection


async def _serve(conn: Connection, state: dict[str, Any]) -> None:
    while True:
        try:
            line = await next_line(conn, state)
        except ConnectionError:
            return   # HAProxy closes its TCP checks with a reset
        if not line:
            return
        state["n"] += 1
        answer = {"host": os.environ.get("HAPROXY_TEST_HOST", "?"), "pid": os.getpid(),
                  "n": state["n"], "proxy": conn.meta.get("proxy"),
                  "client": conn.meta.get("client"), "moves": state["moves"]}
        conn.writer.write(json.dumps(answer).encode() + b"\n")
        await conn.writer.drain()
        if line.strip() == b"who":
            await conn.close()
            return


async def handle(conn: Connection) -> None:
    await _serve(conn, {"n": 0, "moves": 0})


async def resume(conn: Connection, state: Any) -> None:
    state["moves"] += 1
    await _serve(conn, state)
