"""The compiled sniffing path: the HTTP Host read in C, and ``defer_accept``.

* ``sockshare._speedups.http_head`` is a subset of :func:`parse_http_head` (which stays
  the reference): wherever C gives a result it is Python's, on a corpus, on every prefix
  of it and on seeded mutations of it; wherever it does not, Python's sniffer does the job.
* ``dispatch_sniffed`` on a real listener: a queued HTTP head is read (exactly its bytes,
  the body stays in the socket) and travels as pre-read data, the metadata is the JSON
  the Python path writes, key for key and in order; nothing queued, TLS and garbage come
  back untouched for the Python sniffer. Descriptors counted before and after.
* A compiled handoff that comes back (the channel ends) keeps its pre-read head.
* ``sockshare serve --sniff``, compiled and pure Python, with and without
  ``--defer-accept``: every client's stream reaches the worker byte for byte (the
  pre-read head, then the rest), TLS is only peeked, a head that arrives in two parts
  takes the Python sniffer, a client silent for 2 or 30 ms after connecting (accepted
  before its bytes: tried again in C, then given to the Python sniffer) is served alike;
  the metadata has the same keys in the same order on both paths; nothing is refused and
  the dispatcher's descriptors come back to their baseline.
* ``--defer-accept``: a silent client is not accepted until the deferral is over (while
  others are served), then goes to the default pool after the sniff timeout.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Server, connect, read_line
from test_sniff import openssl_hello
from tests._fdcount import fd_count

from sockshare import AsyncChannel, Channel, _fast
from sockshare.protocol import FrameDecoder, FrameType, decode_handoff
from sockshare.server._config import ConfigError, from_args, parse_document
from sockshare.server._sniff import NEED_DATA, SniffError, SniffRules, parse_http_head, sniff_now

pytestmark = pytest.mark.timeout(120)

sp = _fast.speedups
needs_c = pytest.mark.skipif(sp is None, reason=f"no compiled module: {_fast.why_not}")
LINUX = sys.platform.startswith("linux")

CORPUS = [
    b"GET / HTTP/1.1\r\nHost: Example.COM.:8080\r\nAccept: */*\r\n\r\nbody",
    b"POST /a\"b\\c?x=1 HTTP/1.0\nhost:\t x \t\nX-y: \x80\xff v\n\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
    b"GET http://h.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET HTTPS://h.example/ HTTP/1.1\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: .\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a..\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n",
    b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"get /x?y=1 HTTP/1.9\r\nHOST: a-b_c~d%20!$&'()*+,;=\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: " + b"a" * 256 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: " + b"a" * 255 + b".\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\r\n\r\n",
    b"GET / HTTP/1.1\r\nX:\r\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: \x01\r\n\r\n",
    b"GET /  HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n",
]


def _python(buf: bytes, max_size: int) -> Any:
    try:
        head = parse_http_head(buf[:max_size], max_size=max_size)
    except SniffError as exc:
        return f"error: {exc}"
    if head is NEED_DATA:
        return "need data"
    assert head.complete
    return (head.method, head.target, head.version, head.host, head.length)


def _check(buf: bytes, max_size: int) -> bool:
    assert sp is not None
    got = sp.http_head(buf, max_size)
    if got is None:
        return False
    assert got == _python(buf, max_size), (buf, max_size)
    return True


@needs_c
def test_http_head_in_c_is_a_subset_of_the_python_parser() -> None:
    taken = 0
    for buf in CORPUS:
        for max_size in (16, 40, 300, 8192):
            for cut in range(len(buf) + 1):
                taken += _check(buf[:cut], max_size)
    # the plain requests are taken (not all left to Python)
    for buf in (CORPUS[0], CORPUS[1], CORPUS[16], CORPUS[-1], b"GET / HTTP/1.0\r\n\r\n"):
        assert _check(buf, 8192), buf
    rng = random.Random(16)
    alphabet = b"GETPOSHTP/1.0 \r\n\t:Hhost[]x.:\"\\\x00\x7f\x80aZ9-"
    for _ in range(20000):
        s = bytearray(rng.choice(CORPUS))
        for _ in range(rng.randint(0, 4)):
            i = rng.randint(0, len(s))
            op = rng.random()
            if op < 0.4:
                s[i:i + 1] = bytes([rng.choice(alphabet)])
            elif op < 0.7:
                s.insert(i, rng.choice(alphabet))
            else:
                del s[i:i + rng.randint(1, 3)]
        taken += _check(bytes(s), rng.choice((30, 64, 8192)))
    assert taken > 1000


@needs_c
def test_dispatch_sniffed_reads_queued_heads_and_leaves_the_rest_untouched() -> None:
    """On a real listener: HTTP heads queued at accept are read in C (exactly the head;
    a body stays in the socket), sent as pre-read data with the Python path's metadata;
    a silent client, a TLS record and garbage come back untouched (err 0)."""
    assert sp is not None
    head1 = b"GET /x HTTP/1.1\r\nHost: Api.Example.TEST:8080\r\nAccept: */*\r\n\r\n"
    head2 = b'POST /a"b\\c HTTP/1.0\r\ncontent-length: 4\r\n\r\n'
    hello = openssl_hello("api.example.test", ["h2"])
    payloads = [head1 + b"rest", b"", hello, b"\x00\x01garbage\r\n\r\n", head2 + b"body"]
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    clients: list[socket.socket] = []
    raws: list[dict[int, tuple[int, bytes, float, bytes]]] = [{}, {}]
    try:
        before = fd_count()
        for p in payloads:   # (one at a time: accepted in this order)
            c = socket.create_connection(lsock.getsockname())
            if p:
                c.sendall(p)
            clients.append(c)
            time.sleep(0.05)
        time.sleep(0.2)
        prefix, mid, end = (b'{"handoff_id":"77.', b'","listener":"web","client":["',
                            b',"route":"default","pool":"default"}')
        workers = [(1, 0, 64, raws[0]), (2, 0, 64, raws[1])]
        frames, n, status, last_fd, _last, seq, hid, left = sp.dispatch_sniffed(
            lsock.fileno(), 8, 1 << 30, 10, 1 << 62, -1, prefix, mid, end,
            b"\x01\x01\x00\x00", 1, 5.0, workers, 8192, 14336, 1 << 20, [])
        assert (n, status, last_fd, seq) == (2, 0, -1, 12)
        assert len(left) == 3
        # nothing queued yet: -1 (to be tried again); TLS and garbage: 0 (Python's)
        assert sorted(err for _fd, _a, err in left) == [-1, 0, 0]
        assert fd_count() == before + 2 * len(payloads)   # the clients, and accepted
        # the ones left: untouched, everything still in the socket
        by_port = {c.getsockname()[1]: (c, p) for c, p in zip(clients, payloads, strict=True)}
        for fd, addr, _err in left:
            _c, p = by_port[addr[1]]
            peer = socket.socket(fileno=os.dup(fd))
            try:
                peer.setblocking(False)
                try:
                    queued = peer.recv(1 << 16, socket.MSG_PEEK)
                except BlockingIOError:
                    queued = b""
            finally:
                peer.close()
            assert queued == p
        # the ones taken: the frame entries, the registration, the rest in the socket
        seen = []
        for k, frame, fds, count in frames:
            dec = FrameDecoder(max_payload=1 << 20)
            dec.feed(frame, fds)
            f = dec.next_frame()
            assert f is not None
            assert f.type == FrameType.HANDOFF
            entries = decode_handoff(f.payload)
            assert len(entries) == count == len(fds)
            for e, fd in zip(entries, fds, strict=True):
                assert raws[k][e.id] == (fd, e.meta, 5.0, e.data)
                meta = json.loads(e.meta)
                client, payload = by_port[meta["client"][1]]
                head = head1 if payload.startswith(head1) else head2
                assert e.data == head
                # the metadata the Python path writes for the same bytes, in its order
                a, b = socket.socketpair()
                try:
                    b.setblocking(False)
                    a.sendall(payload)
                    result = sniff_now(b, SniffRules(http=True, tls=True))
                finally:
                    a.close()
                    b.close()
                assert result is not None
                assert result.data == head
                want = {"handoff_id": meta["handoff_id"], "listener": "web",
                        "client": ["127.0.0.1", client.getsockname()[1]], **result.meta,
                        "route": "default", "pool": "default"}
                assert list(meta.items()) == list(want.items())
                assert e.meta == json.dumps(want, separators=(",", ":")).encode()
                peer = socket.socket(fileno=os.dup(fd))
                try:
                    peer.setblocking(False)
                    assert peer.recv(100) == payload[len(head):]   # the body, not read
                finally:
                    peer.close()
                seen.append(meta["handoff_id"])
        assert sorted(seen) == ["77.10", "77.11"]
        # the silent one, given back as pending once its head came: taken first, in C;
        # the others given back with no room left come back as they were (-1)
        silent = next((fd, a) for fd, a, err in left if err == -1)
        others = [(fd, a) for fd, a, err in left if err == 0]
        by_port[silent[1][1]][0].sendall(head1)
        time.sleep(0.1)
        frames, n, status, _last_fd, _l, seq, _hid, left2 = sp.dispatch_sniffed(
            lsock.fileno(), 8, 1 << 30, 12, hid, -1, prefix, mid, end,
            b"\x01\x01\x00\x00", 1, 6.0, [(1, 0, 1, raws[0])], 8192, 14336, 1 << 20,
            [silent, *others])
        assert (n, status, seq) == (1, 0, 13)
        assert [(fd, a, -1) for fd, a in others] == left2   # (no room: untouched, back)
        assert len(frames) == 1
        assert frames[0][2] == [silent[0]]
        taken = next(k for k, v in raws[0].items() if v[0] == silent[0])
        assert raws[0][taken][3] == head1
        devnull = os.open(os.devnull, os.O_RDONLY)
        with pytest.raises(TypeError, match="pending"):   # (it closes what it was given)
            sp.dispatch_sniffed(lsock.fileno(), 8, 1 << 30, 12, 1 << 62, -1, prefix, mid, end,
                                b"\x01\x01\x00\x00", 1, 6.0, [(1, 0, 1, {})], 8192, 14336,
                                1 << 20, [(devnull, "nope")])
        sp.close_fds([fd for r in raws for fd, _m, _t, _d in r.values()])
        sp.close_fds([fd for fd, _a, _e in left2])
        for c in clients:
            c.close()
        clients.clear()
        assert fd_count() == before
    finally:
        for c in clients:
            c.close()
        lsock.close()


def test_a_returned_compiled_handoff_keeps_its_pre_read_head() -> None:
    """A compiled handoff in flight when the channel ends becomes a returned Ticket with
    its socket and its pre-read data (re-dispatched with them, never without)."""
    import asyncio

    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"

    async def main() -> None:
        before = fd_count()
        ca, cb = Channel.pair()
        a = AsyncChannel.wrap(ca)
        x, y = socket.socketpair()
        try:
            a.raw_pending[(1 << 62) + 1] = (os.dup(y.fileno()), b'{"handoff_id":"1.1"}', 0.0, head)
            a._state.register_compiled(1)
            cb.close()
            for _ in range(200):
                if a._state.returned:
                    break
                await asyncio.sleep(0.01)
            back = a.returned()
            assert len(back) == 1
            t = back[0]
            assert (t.data, t.meta, t.compiled) == (head, b'{"handoff_id":"1.1"}', True)
            assert t.socket is not None
            t.socket.close()
        finally:
            await a.aclose()
            x.close()
            y.close()
        assert fd_count() == before

    asyncio.run(main())


# -- sockshare serve --sniff, real processes --------------------------------------------

PATHS = [pytest.param({}, id="compiled"), pytest.param({"SOCKSHARE_PURE_PYTHON": "1"}, id="pure")]
DEFER = [pytest.param((), id="accept"), pytest.param(("--defer-accept", "1"), id="defer")]
ORDER = ["handoff_id", "listener", "client", "protocol", "method", "path", "version", "host",
         "route", "pool"]


def _ask(addr: Any, pieces: list[bytes], pause: float = 0.0, delay: float = 0.0,
         ) -> dict[str, Any]:
    with connect(addr, timeout=20) as s:
        time.sleep(delay)   # (connected, silent: accepted before its bytes, unless deferred)
        for i, p in enumerate(pieces):
            if i and pause:
                time.sleep(pause)
            s.sendall(p)
        line = read_line(s)
    assert line, "no answer"
    out: dict[str, Any] = json.loads(line)
    return out


@pytest.mark.parametrize("defer", DEFER)
@pytest.mark.parametrize("env", PATHS)
def test_served_streams_are_whole_and_in_order(tmp_path: Path, env: dict[str, str],
                                               defer: tuple[str, ...]) -> None:
    if defer and not LINUX:
        pytest.skip("TCP_DEFER_ACCEPT is Linux's")
    with Server(tmp_path, "--sniff", "--accept-window", "auto", *defer, app="serve_apps:stream_app",
                env=env) as srv:
        addr = srv.address()
        srv.status()
        time.sleep(0.3)
        baseline = fd_count(srv.dispatcher)
        results: list[tuple[bytes, bytes, dict[str, Any]]] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            head = (f"GET /c{i}?q=\"x\\y HTTP/1.1\r\nHost: Site{i % 3}.Example:8080\r\n"
                    f"X-N: {i}\r\n\r\n").encode()
            rest = b"after the head\r\nend\n"
            try:
                if i % 10 == 9:    # the head in two parts: the Python sniffer's job
                    got = _ask(addr, [head[:20], head[20:] + rest], pause=0.15)
                elif i % 10 in (3, 6):   # silent a little: tried again in C / to Python
                    got = _ask(addr, [head + rest], delay=0.002 if i % 10 == 3 else 0.03)
                else:
                    got = _ask(addr, [head + rest])
            except Exception as exc:  # (collected, asserted below)
                with lock:
                    errors.append(f"{i}: {type(exc).__name__}: {exc}")
                return
            with lock:
                results.append((head, rest, got))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len(results) == 60
        for head, rest, got in results:
            assert got["stream"] == (head + rest).decode("latin-1")
            assert got["pre"] == len(head)
            meta = got["meta"]
            assert list(meta)[:len(ORDER)] == ORDER, meta
            assert (meta["protocol"], meta["method"], meta["version"]) == ("http", "GET", "HTTP/1.1")
            assert meta["path"] == head.split(b" ")[1].decode()
            assert meta["host"] == head.split(b"Host: ")[1].split(b":")[0].decode().lower()
            assert (meta["route"], meta["pool"], meta["listener"]) == ("default", "default", "main")
        # TLS: peeked, never read -- the worker gets the ClientHello itself
        hello = openssl_hello("tls.example", ["h2"])
        got = _ask(addr, [hello + b"end\n"])
        assert got["pre"] == 0
        assert got["stream"] == (hello + b"end\n").decode("latin-1")
        assert (got["meta"]["protocol"], got["meta"]["sni"]) == ("tls", "tls.example")
        st = srv.wait_for(lambda st: all(w["connections"] == 0 for w in st["workers"]),
                          timeout=15, what="every worker's count back to 0")
        c = st["counters"]
        assert (c["refused"], c["lost"], c["sniff_failures"]) == (0, 0, 0), c
        assert c["accepted"] == 61, c
        time.sleep(0.3)
        assert fd_count(srv.dispatcher) <= baseline + 2, (baseline, fd_count(srv.dispatcher))


@pytest.mark.skipif(not LINUX, reason="TCP_DEFER_ACCEPT is Linux's")
def test_defer_accept_holds_a_silent_client_in_the_kernel(tmp_path: Path) -> None:
    """--defer-accept 1: a client that says nothing is not accepted for about a second
    (others are served meanwhile), then it is, and after the sniff timeout it goes to the
    default pool as silent; nothing is refused."""
    with Server(tmp_path, "--sniff", "--defer-accept", "1", "--sniff-timeout", "0.5",
                app="serve_apps:stream_app", workers=1) as srv:
        addr = srv.address()
        accepted = srv.status()["counters"]["accepted"]
        with connect(addr) as quiet:
            t0 = time.monotonic()
            time.sleep(0.4)
            assert srv.status()["counters"]["accepted"] == accepted, "accepted before its bytes"
            got = _ask(addr, [b"GET / HTTP/1.1\r\nHost: a\r\n\r\nend\n"])
            assert got["meta"]["host"] == "a"
            st = srv.wait_for(lambda st: st["counters"]["accepted"] == accepted + 2, timeout=10,
                              what="the silent client accepted")
            waited = time.monotonic() - t0
            assert 0.8 < waited < 8.0, waited
            time.sleep(0.8)   # (the sniff timeout passes: silent, to the default pool)
            quiet.sendall(b"end\n")
            answer = json.loads(read_line(quiet))
        assert answer["meta"]["silent"] is True
        assert answer["meta"]["pool"] == "default"
        st = srv.status()
        assert st["counters"]["refused"] == 0


def test_defer_accept_setting() -> None:
    doc: dict[str, Any] = {"pools": {"web": {"app": "m:f"}},
                           "listen": [{"bind": "127.0.0.1:0", "sniff": True}]}
    assert parse_document(doc).listeners[0].defer_accept == 0
    doc["listen"][0]["defer_accept"] = 2
    cfg = parse_document(doc)
    cfg.validate()
    assert cfg.listeners[0].defer_accept == 2
    for bad in (-1, 3601):
        doc["listen"][0]["defer_accept"] = bad
        with pytest.raises(ConfigError, match="defer_accept"):
            parse_document(doc).validate()
    doc["listen"][0]["defer_accept"] = 1.5
    with pytest.raises(ConfigError, match="defer_accept"):
        parse_document(doc)
    doc["listen"][0].update(bind="unix:/tmp/sockshare-test-defer.sock", defer_accept=1)
    with pytest.raises(ConfigError, match="defer_accept is for TCP"):
        parse_document(doc).validate()
    import argparse

    from sockshare.server._cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "m:f", "--sniff", "--defer-accept", "3"])
    assert [lc.defer_accept for lc in from_args(args).listeners] == [3]
