"""Flow on the blocking channel: a side that is busy elsewhere never stalls the other.

The scenario that used to deadlock (around the 250th handoff): a sender that never waits
on its tickets and never reads the channel, and a receiver that answers every handoff.
The receiver's ACCEPT frames filled the socket buffer its sender did not read, so the
receiver blocked in ``h.accept()`` while its sender waited on a client that only the
receiver could answer. Now answers wait in the receiver's queue, and every call on the
sender takes in what has arrived.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

import sockshare
from tests.conftest import Procs

N = 10_000

SENDER = r"""
import json, os, socket, sys, sockshare
path = sys.argv[1]
fds_before = len(os.listdir("/proc/self/fd"))
lst = socket.create_server(("127.0.0.1", 0), backlog=64)
print(lst.getsockname()[1], flush=True)
ch = sockshare.Channel.connect(path)
handed = 0
while True:
    conn, _ = lst.accept()
    conn.settimeout(10)
    first = b""
    while not first.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            break
        first += chunk
    if first == b"done\n":
        conn.close()
        break
    # Never ticket.wait(), never receive(): only send, and look at what came back.
    ch.send(conn, meta={"reject": first.startswith(b"reject")}, data=first)
    handed += 1
    for t in ch.returned():
        t.socket.sendall(b"back at the sender: " + t.reason.encode() + b"\n")
        t.socket.close()
ch.close()
for t in ch.returned():
    if t.socket is not None:
        t.socket.sendall(b"back at the sender: " + t.reason.encode() + b"\n")
        t.socket.close()
lst.close()
print(json.dumps({"handed": handed, "counters": ch.counters,
                  "fds_before": fds_before, "fds_after": len(os.listdir("/proc/self/fd"))}),
      flush=True)
"""

RECEIVER = r"""
import json, os, sys, sockshare
path = sys.argv[1]
fds_before = len(os.listdir("/proc/self/fd"))
lst = sockshare.Channel.listen(path)
print("listening", flush=True)
ch = lst.accept(timeout=10)
lst.close()
served = rejected = 0
for h in ch:
    if h.meta["reject"]:
        h.reject("full")
        rejected += 1
        continue
    h.accept()
    h.socket.sendall(b"served: " + h.data)
    h.socket.close()
    served += 1
ch.close()
print(json.dumps({"served": served, "rejected": rejected,
                  "fds_before": fds_before, "fds_after": len(os.listdir("/proc/self/fd"))}),
      flush=True)
"""


def _line(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        out += chunk
    return out


def test_a_sender_that_never_reads_does_not_stall_its_receiver(procs: Procs, sock_dir: Path) -> None:
    path = str(sock_dir / "flow.sock")
    rx = procs.python(RECEIVER, path)
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == b"listening"
    tx = procs.python(SENDER, path)
    assert tx.stdout is not None
    port = int(tx.stdout.readline())
    rejected: list[socket.socket] = []
    start = time.monotonic()
    try:
        for i in range(N):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 10 == 9:
                c.sendall(b"reject %d\n" % i)
                rejected.append(c)  # answered by the sender, whenever it looks
                continue
            c.sendall(b"hello %d\n" % i)
            # Before the fix this read timed out around i = 250.
            assert _line(c) == b"served: hello %d\n" % i, f"handoff {i} was not served"
            c.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"done\n")
        for c in rejected:
            assert _line(c) == b"back at the sender: full\n"
            c.close()
    finally:
        for c in rejected:
            c.close()
    took = time.monotonic() - start
    tx_out = sockshare_json(tx.stdout.readline())
    rx_out = sockshare_json(rx.stdout.readline())
    assert tx.wait(20) == 0
    assert rx.wait(20) == 0
    assert tx_out["handed"] == N
    assert tx_out["counters"]["accepted"] == N - N // 10
    assert tx_out["counters"]["rejected"] == N // 10
    assert tx_out["counters"]["returned"] == 0
    assert rx_out == {"served": N - N // 10, "rejected": N // 10,
                      "fds_before": rx_out["fds_before"], "fds_after": rx_out["fds_before"]}
    assert tx_out["fds_after"] == tx_out["fds_before"]
    assert took < 120


def sockshare_json(line: bytes) -> dict[str, Any]:
    import json
    out = json.loads(line)
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("n", [2_000])
def test_a_sender_holds_no_accepted_copies(n: int) -> None:
    """Every call on the sender takes in the answers that arrived: accepted copies are
    closed without the sender ever waiting on a ticket."""
    a, b = sockshare.Channel.pair()
    base = len(__import__("os").listdir("/proc/self/fd"))
    peak = 0
    try:
        for _ in range(n):
            x, y = socket.socketpair()
            y.close()
            a.send(x)
            h = b.receive(timeout=5)
            h.accept()
            h.socket.close()
            peak = max(peak, len(__import__("os").listdir("/proc/self/fd")) - base)
        assert peak < 64, f"the sender held {peak} descriptors at once"
    finally:
        a.close()
        b.close()


def test_ticket_result_raises_with_the_socket_back() -> None:
    """``ticket.result()``: None once accepted; HandoffRejected (reason) or
    HandoffReturned when the connection is still the sender's, socket in hand."""
    a, b = sockshare.Channel.pair()
    pairs = [socket.socketpair() for _ in range(3)]
    t1, t2, t3 = (a.send(x) for x, _y in pairs)
    h1, h2, _h3 = (b.receive(timeout=5) for _ in range(3))
    h1.accept()
    h2.reject("full")
    assert t1.result(5) is None  # type: ignore[func-returns-value]  # the None is what is checked
    with pytest.raises(sockshare.HandoffRejected) as rej:
        t2.result(5)
    assert rej.value.reason == "full"
    assert rej.value.socket is pairs[1][0]
    b._sock.shutdown(socket.SHUT_RDWR)  # the receiver goes away without answering h3
    with pytest.raises(sockshare.HandoffReturned) as ret:
        t3.result(5)
    assert ret.value.socket is pairs[2][0]
    assert isinstance(ret.value, sockshare.HandoffError)
    for s in (h1.socket, _h3.socket, *(s for p in pairs for s in p)):
        s.close()
    a.close()
    b.close()
