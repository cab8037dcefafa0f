"""A migratable line-protocol app for the live-migration tests (``live_apps:handle``).

Workers import it as ``live_apps`` (the tests put ``tests/server`` on ``PYTHONPATH``); it
defines ``resume`` beside ``handle``, so connections can move between workers.

The client sends lines; the connection's state is a message counter ``n`` and the pids
it was served by. Every answer is one JSON line:

``echo X``     ``{"n": k, "pid": ..., "id": ..., "echo": "X"}`` (k counts echoes, and keeps
               counting across migrations);
``move``       migrates; the resumed handler first says
               ``{"moved": true, "from": old pid, "pid": new pid, "n": k, "latency_us": ...}``
               (``latency_us``: from ``migrate()`` being called to ``resume`` starting);
``big``        migrates with a 20 KiB state (StateError: the handler lets it propagate);
``badstate``   migrates with a state that is not JSON (a set);
``boom``       migrates with ``{"raise": true}``: ``resume`` raises on the target;
``nomove``     marks the connection not migratable (answers ``{"migratable": false}``);
``stall S``    answers after S seconds without reading (a busy handler);
``block S``    blocks the worker's whole event loop for S seconds (a hung worker);
``who``        ``{"pid": ..., "id": ..., "n": k}`` without counting;
``impatient T`` migrates within T seconds (``asyncio.wait_for``) or goes on as if it had
               not asked: the answer, when it comes, says where the connection lives;
``tightmove``  migrates with the worker's soft RLIMIT_NOFILE lowered to its lowest free
               descriptor (``os.dup`` fails with EMFILE), then puts the limit back:
               ``{"refused": reason, "pid": ...}`` and the connection goes on here.

When the file named by ``$LIVE_APPS_SLOW_IMPORT`` exists, importing this module takes 5
seconds (the upgrade tests use it to catch a new dispatcher before it is ready).

A migration the dispatcher asks for (rebalance, reload, upgrade, ``sockshare migrate``)
interrupts the wait for the next line: the handler migrates between two lines, so no
line is ever half-read or lost. When a migration is refused, the handler goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from typing import Any

from sockshare.server._handler import (
    Connection,
    MigrationAborted,
    MigrationRefused,
    MigrationRequested,
)

_slow = os.environ.get("LIVE_APPS_SLOW_IMPORT")
if _slow and os.path.exists(_slow):
    time.sleep(5.0)


async def _say(conn: Connection, obj: dict[str, Any]) -> None:
    conn.writer.write(json.dumps(obj).encode() + b"\n")
    await conn.writer.drain()


async def next_line(conn: Connection, state: dict[str, Any]) -> bytes:
    """The client's next line; ``b""`` once the connection is over here: EOF, or a
    migration the dispatcher asked for moved it (with ``state``) or was aborted. While
    waiting, a refused migration is let go (the connection stays). Also used by
    ``haproxy_apps``."""
    while True:
        try:
            line: bytes = await conn.interruptible(conn.reader.readline())
            return line
        except MigrationRequested:
            try:
                await conn.migrate(state)
                return b""
            except MigrationRefused:
                continue
            except MigrationAborted:
                return b""


async def _serve(conn: Connection, state: dict[str, Any]) -> None:
    while True:
        line = await next_line(conn, state)
        if not line:
            return
        cmd, _, arg = line.decode().strip().partition(" ")
        if cmd == "echo":
            state["n"] += 1
            await _say(conn, {"n": state["n"], "pid": os.getpid(), "id": conn.worker.id, "echo": arg})
        elif cmd == "who":
            await _say(conn, {"pid": os.getpid(), "id": conn.worker.id, "n": state["n"]})
        elif cmd == "move":
            try:
                await conn.migrate(state)
                return
            except MigrationRefused as exc:
                await _say(conn, {"refused": str(exc), "pid": os.getpid()})
        elif cmd == "impatient":
            try:
                await asyncio.wait_for(conn.migrate(state), float(arg or "0.5"))
                return
            except TimeoutError:
                continue
            except MigrationRefused as exc:
                await _say(conn, {"refused": str(exc), "pid": os.getpid()})
        elif cmd == "tightmove":
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest = os.dup(0)
            os.close(lowest)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
            try:
                await conn.migrate(state)
                return
            except MigrationRefused as exc:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                await _say(conn, {"refused": str(exc), "pid": os.getpid()})
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        elif cmd == "big":
            await conn.migrate({**state, "blob": "x" * 20_000})
        elif cmd == "badstate":
            await conn.migrate({**state, "bad": {1, 2}})
        elif cmd == "boom":
            await conn.migrate({**state, "raise": True})
            return
        elif cmd == "nomove":
            conn.migratable = False
            await _say(conn, {"migratable": False, "pid": os.getpid()})
        elif cmd == "block":
            time.sleep(float(arg or "1"))  # on purpose: nothing else runs in this worker
            await _say(conn, {"blocked": float(arg or "1"), "pid": os.getpid()})
        elif cmd == "stall":
            await asyncio.sleep(float(arg or "1"))
            await _say(conn, {"stalled": float(arg or "1"), "pid": os.getpid()})
        else:
            await _say(conn, {"error": f"unknown command {cmd!r}"})


async def handle(conn: Connection) -> None:
    await _serve(conn, {"n": 0, "pids": [os.getpid()]})


async def resume(conn: Connection, state: Any) -> None:
    now = time.monotonic()
    if state.get("raise"):
        raise RuntimeError("resume was told to fail")
    started = conn.meta["migration"]["started"]
    came_from = conn.meta["migration"]["from_pid"]
    state["pids"].append(os.getpid())
    await _say(conn, {"moved": True, "from": came_from, "pid": os.getpid(), "id": conn.worker.id,
                      "n": state["n"], "latency_us": round((now - started) * 1e6, 1),
                      "reason": conn.meta["migration"]["reason"], "count": conn.meta["migration"]["count"]})
    await _serve(conn, state)


async def plain(conn: Connection) -> None:
    """An app without a resume handler (``live_apps:plain``): it cannot migrate."""
    line = await conn.reader.readline()
    await _say(conn, {"pid": os.getpid(), "echo": line.decode().strip()})
    while await conn.reader.read(4096):
        pass
