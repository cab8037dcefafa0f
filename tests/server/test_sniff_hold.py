"""A listener held because its sniffing room is taken only by connections waiting for
their first bytes (compiled sniffing path) is not held for good: those go to the Python
sniffer, and when it sniffs them at once (no task), the burst goes on."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import Server
from test_sniff_compiled import _ask

from sockshare import _fast

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(_fast.speedups is None, reason="no compiled module")]


def test_waiting_connections_do_not_hold_the_listener_for_good(tmp_path: Path) -> None:
    """--sniff-max 1 and a client silent for 0.3 ms: accepted in C before its head (its
    place taken), its head there when the retry's burst finds no room. Before the fix the
    listener was held for good (the head read at once, no sniffing task to lift the hold)
    and the next client was never accepted."""
    with Server(tmp_path, "--sniff", "--sniff-max", "1", app="serve_apps:stream_app",
                workers=1) as srv:
        addr = srv.address()
        srv.status()
        for i in range(8):
            # accepted before its head (silent for 0.3 ms), the head there by the retry
            head = f"GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
            got = _ask(addr, [head + b"end\n"], delay=0.0003)
            assert got["pre"] == len(head)
        c = srv.status()["counters"]
        assert (c["accepted"], c["refused"]) == (8, 0), c
