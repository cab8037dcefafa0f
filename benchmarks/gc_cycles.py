"""Do closed WebSockets leave cyclic garbage? (The check behind the workers' frozen holds.)

Run:  python benchmarks/gc_cycles.py [--n 2000]

A worker freezes what a large hold of moved-in connections kept (``sockshare.server._gc``)
and gives it back to the collector once a quarter of it went away, going by
``gc.get_freeze_count()``: that works if a connection that closes frees its objects by
reference counting (the count goes down), not as cycles that only a collection frees
(it does not). This opens N WebSockets to the ASGI demo app under uvicorn's sans-I/O
WebSocket protocol (the one sockshare's workers move), in one process on 127.0.0.1,
freezes everything, closes them, and prints how far the frozen count fell per
connection and how many unreachable objects a collection then finds (0: no cycles).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket

_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def run(n: int) -> tuple[int, int, int]:
    import uvicorn

    from sockshare.server._demo_asgi import app

    config = uvicorn.Config(app, ws="websockets-sansio", log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    writers = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_UPGRADE)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writers.append(writer)
    await asyncio.sleep(0.5)
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        for writer in writers:
            writer.close()
        writers.clear()
        await asyncio.sleep(2.0)   # every close seen by the server, its task ended
        after = gc.get_freeze_count()
        gc.unfreeze()
        unreachable = gc.collect()
    finally:
        gc.enable()
        server.should_exit = True
        await serving
    return frozen, after, unreachable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="WebSockets (default 2000)")
    args = ap.parse_args()
    try:
        import uvloop
        frozen, after, unreachable = uvloop.run(run(args.n))
    except ImportError:
        frozen, after, unreachable = asyncio.run(run(args.n))
    print(f"frozen objects {frozen} -> {after} after closing {args.n} WebSockets "
          f"({(frozen - after) / args.n:.0f} a connection freed by reference counting); "
          f"unreachable at the collection after: {unreachable} "
          f"({unreachable / args.n:.1f} a connection)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
