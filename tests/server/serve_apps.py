"""Apps and a policy the server tests run in real worker processes.

Workers import this module as ``serve_apps`` (the tests put ``tests/server`` on
``PYTHONPATH``). The line protocol of :func:`app`: the client sends one command line,
the worker answers one JSON line describing itself (worker id, pid, generation,
handoff id, pre-read length, sniffed meta) and then:

``who``        closes;
``hold``       keeps the connection open until the client closes it;
``sleep S``    waits S seconds before answering, then closes;
``leak N``     opens N descriptors (/dev/null) that the worker keeps for good (once);
``block S``    blocks the worker's whole event loop for S seconds (a hung worker), then
               answers and closes;
``exit``       kills the worker process (``os._exit(7)``) without answering;
``raise``      raises inside the handler (the worker must survive);
anything else (an HTTP request line, say) is treated as ``who``.

:func:`stream_app` answers what the stream held up to the client's line ``end\n`` (the
bytes the dispatcher pre-read, then the rest, in order), with the metadata as sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from typing import Any

_leaked: list[int] = []


async def app(conn: Any) -> None:
    pre = conn.reader._buffer  # what the dispatcher pre-read sits at the front
    pre_len = len(pre)
    line = await asyncio.wait_for(conn.reader.readline(), 10.0)
    cmd = line.decode("latin-1").strip()
    answer = {
        "id": conn.worker.id, "pid": os.getpid(), "gen": conn.worker.generation,
        "pool": conn.worker.pool, "hid": conn.handoff_id, "pre": pre_len,
        "meta": conn.meta, "client": list(conn.client_address) if isinstance(
            conn.client_address, tuple) else conn.client_address,
    }
    if cmd == "exit":
        os._exit(7)
    if cmd == "raise":
        raise RuntimeError("the test asked this handler to fail")
    if cmd.startswith("sleep "):
        await asyncio.sleep(float(cmd.split()[1]))
    if cmd.startswith("leak ") and not _leaked:   # N more descriptors, kept for good
        _leaked.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(int(cmd.split()[1])))
    if cmd.startswith("block "):
        time.sleep(float(cmd.split()[1]))  # on purpose: nothing else runs in this worker
    conn.writer.write(json.dumps(answer).encode() + b"\n")
    await conn.writer.drain()
    if cmd == "hold":
        while await conn.reader.read(4096):
            pass
    await conn.close()


async def stream_app(conn: Any) -> None:
    """The client's stream up to and including ``end\n`` (pre-read bytes first), the
    pre-read length, and the handoff's metadata as it came (the JSON bytes, decoded)."""
    pre_len = len(conn.reader._buffer)
    seen = await asyncio.wait_for(conn.reader.readuntil(b"end\n"), 10.0)
    conn.writer.write(json.dumps({
        "stream": seen.decode("latin-1"), "pre": pre_len, "meta": conn.meta,
        "raw_meta": conn._raw_meta.decode() if conn._raw_meta else None,
    }).encode() + b"\n")
    await conn.writer.drain()
    await conn.close()


def pick_last(workers: Sequence[Any], conn: Any) -> Any:
    """A user policy: always the highest worker id."""
    return workers[-1]


def broken_policy(workers: Sequence[Any], conn: Any) -> Any:
    raise ValueError("this policy is broken on purpose")
