"""A ``--worker-cmd`` worker written against :class:`sockshare.Channel` only, as a
worker in another language would be (docs/server.md, "Workers in any language").

The Wine tests run it in Windows CPython (``python.exe Z:\\...\\win_foreign_worker.py``,
the channel's address appended as the last argument). For each handoff it accepts, reads
what the client sent (the pre-read data first, then one read of at most a second:
nothing more for a TLS ClientHello), answers one JSON line (its worker id and pid, the
handoff's metadata, how many bytes it got) and closes; then it reports the connection
``closed`` so that least-conn and ``--max-conns`` count right. It never says it can
resume: a reload or stop terminates it.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from sockshare import Channel, ChannelEnded, ChannelTimeout


def serve(address: str) -> None:
    wid = os.environ.get("SOCKSHARE_WORKER_ID", "0")
    with Channel.connect(address, name=f"worker:{wid}") as ch:
        while True:
            try:
                h = ch.receive(timeout=1.0)
            except ChannelTimeout:
                continue
            except ChannelEnded:
                return
            h.accept()
            ch.flush()
            got = len(h.data)
            sock: socket.socket = h.socket
            sock.settimeout(1.0)
            try:
                if not h.data:
                    got += len(sock.recv(65536))
                answer = {"id": int(wid), "pid": os.getpid(), "foreign": True,
                          "pool": os.environ.get("SOCKSHARE_POOL", ""), "meta": h.meta,
                          "got": got}
                sock.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass
            finally:
                sock.close()
            ch.send_control({"ev": "closed", "n": 1})


if __name__ == "__main__":
    serve(sys.argv[-1])
