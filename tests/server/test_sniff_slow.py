"""``sockshare serve --sniff`` against slow and hostile clients, with real processes.

* Slow clients (a byte at a time) cost the dispatcher little: the bytes of an incomplete
  head are consumed as they come and looked at only in part, a trickling connection is
  looked at a few times a second, a TLS ClientHello is waited for until its record is
  complete (SO_RCVLOWAT). Measured as the dispatcher's CPU time per byte the slow
  clients sent, while normal clients are served meanwhile.
* ``--sniff-max``: past that many connections being sniffed, new ones wait in the
  kernel's accept queue (not accepted, not refused) until one is done.
* A storm of sniff failures logs a bounded number of lines.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import Server, connect, read_line

pytestmark = pytest.mark.timeout(120)

CLK_TCK = os.sysconf("SC_CLK_TCK")
HEAD = (b"GET /slow HTTP/1.1\r\nHost: slow.example\r\n"
        + b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"a" * 40) for i in range(120)) + b"\r\n")
#: sent at once; the rest of the head trickles
PREFIX = 4096
NORMAL = b"GET /n HTTP/1.1\r\nHost: normal.example\r\n\r\n"


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _http(addr: tuple[str, int], request: bytes = NORMAL) -> dict[str, object]:
    with connect(addr) as s:
        s.sendall(request)
        line = read_line(s)
    assert line, "no answer"
    out: dict[str, object] = json.loads(line)
    return out


def test_slow_clients_cost_the_dispatcher_little(tmp_path: Path) -> None:
    """100 clients each send the first 4 KB of a 5.5 KB HTTP head, then a byte every 4 ms
    for 3 s, then the rest (within the sniff timeout, 5 s): the dispatcher's CPU per slow
    byte stays small (the old driver peeked and parsed the whole head at every byte), normal
    clients are served meanwhile, and every slow client is served too."""
    n, interval, seconds = 100, 0.004, 3.0
    with Server(tmp_path, "--sniff", "--log-level", "warning", workers=2) as srv:
        addr = srv.address()
        assert _http(addr)["meta"]["host"] == "normal.example"  # type: ignore[index]
        slow = [connect(addr) for _ in range(n)]
        for s in slow:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(HEAD[:PREFIX])
        served = []
        stop = threading.Event()

        def normal_clients() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                served.append((_http(addr)["meta"]["host"], time.monotonic() - t0))  # type: ignore[index]
                time.sleep(0.02)

        t = threading.Thread(target=normal_clients)
        cpu0 = _cpu(srv.dispatcher)
        t.start()
        sent = 0
        try:
            tick = time.monotonic()
            end = tick + seconds
            while tick < end:
                for s in slow:
                    s.send(HEAD[PREFIX + sent // n:PREFIX + sent // n + 1])
                    sent += 1
                tick += interval
                time.sleep(max(0.0, tick - time.monotonic()))
        finally:
            stop.set()
            t.join(30)
        cpu = _cpu(srv.dispatcher) - cpu0
        for s in slow:   # the rest of each head at once: all of them are served
            s.sendall(HEAD[PREFIX + sent // n:])
        answers = [json.loads(read_line(s)) for s in slow]
        for s in slow:
            s.close()
        per_byte_us = cpu / sent * 1e6
        lat = sorted(d for _h, d in served)
        print(f"{sent} slow bytes from {n} clients: dispatcher CPU {cpu:.2f} s "
              f"({per_byte_us:.1f} us a byte); {len(lat)} normal requests meanwhile, "
              f"p50 {lat[len(lat) // 2] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
        assert sent > n * 150
        assert {a["meta"]["host"] for a in answers} == {"slow.example"}
        assert {a["pre"] for a in answers} == {len(HEAD)}
        assert len(served) >= 20
        assert {h for h, _d in served} == {"normal.example"}
        # (the normal clients' own requests are in the CPU time too; the old code: > 40)
        assert per_byte_us < 15, per_byte_us
        st = srv.status()
        assert st["counters"]["sniff_failures"] == 0
        assert st["counters"]["refused"] == 0


def test_sniff_max_leaves_new_connections_in_the_accept_queue(tmp_path: Path) -> None:
    """--sniff-max 4: four clients that say nothing occupy the sniffer; a fifth is not
    accepted until one of them is done (the sniff timeout, 1.5 s: a silent client goes
    to the default pool), then it is served; nothing is refused."""
    with Server(tmp_path, "--sniff", "--sniff-max", "4", "--sniff-timeout", "1.5",
                workers=1) as srv:
        addr = srv.address()
        assert _http(addr)["meta"]["protocol"] == "http"  # type: ignore[index]
        accepted = srv.status()["listeners"][0]["accepted"]
        silent = [connect(addr) for _ in range(4)]
        time.sleep(0.3)
        assert srv.status()["listeners"][0]["accepted"] == accepted + 4
        t0 = time.monotonic()
        with connect(addr) as fifth:
            fifth.sendall(NORMAL)
            time.sleep(0.5)
            assert srv.status()["listeners"][0]["accepted"] == accepted + 4, \
                "the fifth connection must wait in the accept queue"
            answer = json.loads(read_line(fifth))
        waited = time.monotonic() - t0
        assert answer["meta"]["host"] == "normal.example"
        assert 0.9 < waited < 5.0, waited
        for s in silent:   # the silent ones went to the default pool
            s.sendall(b"who\n")
            assert json.loads(read_line(s))["meta"]["silent"] is True
            s.close()
        st = srv.status()
        assert st["counters"]["refused"] == 0
        assert st["listeners"][0]["accepted"] == accepted + 5


def test_sniff_failures_log_a_bounded_number_of_lines(tmp_path: Path) -> None:
    """200 clients that send garbage: each one refused and counted, and the log says
    so in at most 10 lines a second plus a summary (the old code: one more line each)."""
    with Server(tmp_path, "--sniff", "--proxy-protocol", "required", workers=1) as srv:
        addr = srv.address()
        before = srv.log().count("\n")
        for _ in range(200):
            with connect(addr) as s:
                s.sendall(b"NOT A PROXY HEADER\r\n")
                try:
                    s.recv(100)
                except ConnectionResetError:
                    pass
        st = srv.wait_for(lambda st: st["counters"]["sniff_failures"] == 200, what="failures")
        assert st["counters"]["refused_by_reason"] == {"sniff_failed": 200}
        time.sleep(1.2)
        srv.status()   # (the summary line is written by the next look after a second)
        lines = srv.log().splitlines()[before:]
        about = [ln for ln in lines if "sniff" in ln or "refused" in ln]
        assert 1 <= len(about) <= 25, about
        assert not any("sniffing" in ln and "failed" in ln for ln in about)
