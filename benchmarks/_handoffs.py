"""What the handoff benchmarks (benchmarks/channel.py, benchmarks/aio_send.py) share:
which sockshare tree they import (``--src``), the meta and data each handoff carries,
and the sockets they hand over.

Imports no sockshare itself: the benchmarks put :func:`src_dir` on ``sys.path`` first.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

META = {"route": "chat", "client": ["127.0.0.1", 54321], "id": "abcdefgh1"}
DATA = b"G" * 100


def src_dir() -> str:
    """The ``src`` directory to import sockshare from: ``--src`` or this tree's."""
    for i, arg in enumerate(sys.argv):
        if arg == "--src" and i + 1 < len(sys.argv):
            return str(Path(sys.argv[i + 1]).resolve())
        if arg.startswith("--src="):
            return str(Path(arg[6:]).resolve())
    return str(Path(__file__).resolve().parent.parent / "src")


def make_socks(n: int) -> list[socket.socket]:
    """``n`` socket objects to hand over: duplicates of one unconnected UNIX socket."""
    base = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, os.dup(base.fileno()))
           for _ in range(n)]
    base.close()
    return out
