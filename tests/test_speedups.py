"""The optional C module ``sockshare._speedups`` and the choice of path (``sockshare._fast``).

* which path is active, in a fresh process: compiled by default where the module is
  built, pure Python with ``SOCKSHARE_PURE_PYTHON=1``; in CI (``CI=true``) on Linux with a
  C compiler the module must be there (a missing build fails here instead of silently
  running the Python paths);
* each C function through real sockets: accept_many on a TCP listener (addresses,
  close-on-exec, the budget, the descriptor mark, EAGAIN), handoff_frame against the test
  vectors and the Python encoder, send_fds/recv_fds with descriptors counted before and
  after, accept_ids on good and bad payloads, close_fds; the channel's one-socket hot
  paths (send_single writes single_frame's bytes, or leaves the handoff to Python;
  recv_batch makes checked Handoffs and passes everything else on, descriptors open and
  in order); the dispatcher's read of its workers' answers (recv_answers settles the
  leading ACCEPTs of compiled handoffs and takes the close reports after them, and leaves
  everything else whole to Python; through AsyncChannel, both write orders settle alike
  on both paths, and a read of only ACCEPTs and close reports goes to on_settled); and a
  fallback process -- the module missing, or an older build of it -- logs its one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sockshare import _fast
from sockshare.protocol import encode_accept
from tests.conftest import fd_count

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

sp = _fast.speedups
needs_c = pytest.mark.skipif(sp is None, reason=f"no compiled module: {_fast.why_not}")


def _path_in_fresh_process(**env: str) -> str:
    e = {k: v for k, v in os.environ.items() if k != _fast.ENV_PURE}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", "from sockshare import _fast; print(_fast.active_path())"],
                         capture_output=True, text=True, timeout=60, env=e, check=True)
    return out.stdout.strip()


def test_the_environment_variable_forces_pure_python() -> None:
    assert _path_in_fresh_process(SOCKSHARE_PURE_PYTHON="1") == \
        "pure Python (SOCKSHARE_PURE_PYTHON=1)"
    if _fast.speedups is not None or os.environ.get(_fast.ENV_PURE, "") not in ("", "0"):
        assert _path_in_fresh_process(SOCKSHARE_PURE_PYTHON="0").startswith("compiled") == (
            _path_in_fresh_process().startswith("compiled"))


def test_compiled_path_is_active_where_it_is_built() -> None:
    """In CI on Linux/CPython with a compiler, the install builds the module: it must be
    the active path (never a silent fallback)."""
    can_build = _fast.expected() and shutil.which("cc") is not None
    if os.environ.get("CI") == "true" and can_build:
        assert _path_in_fresh_process() == "compiled (sockshare._speedups)"
    elif not can_build:
        assert _path_in_fresh_process().startswith("pure Python")
    elif sp is None:
        pytest.skip(f"the module is not built in this checkout: {_fast.why_not}")
    else:
        assert _path_in_fresh_process() == "compiled (sockshare._speedups)"


def test_a_missing_module_is_reported_once(tmp_path: Path) -> None:
    """Where the module should be and is not: one WARNING line, however often asked."""
    if not _fast.expected():
        pytest.skip("no compiled module on this platform: nothing to report")
    code = ("import logging, sys; sys.modules['sockshare._speedups'] = None\n"
            "logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')\n"
            "from sockshare import _fast\n"
            "_fast.report(); _fast.report()\n"
            "print(_fast.active_path())\n")
    e = {k: v for k, v in os.environ.items() if k != _fast.ENV_PURE}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=e, check=True)
    lines = [ln for ln in out.stderr.splitlines() if "pure-Python hot paths" in ln]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("sockshare WARNING")
    assert out.stdout.startswith("pure Python (sockshare._speedups did not import")
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**e, _fast.ENV_PURE: "1"}, check=True)
    assert "pure-Python hot paths" not in forced.stderr


def test_an_older_build_of_the_module_is_refused_and_reported() -> None:
    """A module built from an older source (a function of the interface missing) is not
    used: pure Python, with one WARNING line that names what is missing."""
    if not _fast.expected():
        pytest.skip("no compiled module on this platform: nothing to report")
    code = ("import logging, sys, types\n"
            "old = types.ModuleType('sockshare._speedups')\n"
            "old.send_fds = lambda *a: 0\n"
            "sys.modules['sockshare._speedups'] = old\n"
            "logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')\n"
            "from sockshare import _fast\n"
            "_fast.report(); _fast.report()\n"
            "print(_fast.active_path())\n")
    e = {k: v for k, v in os.environ.items() if k != _fast.ENV_PURE}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=e, check=True)
    lines = [ln for ln in out.stderr.splitlines() if "pure-Python hot paths" in ln]
    assert len(lines) == 1, out.stderr
    assert "older build" in lines[0]
    assert "recv_answers" in lines[0]
    assert out.stdout.startswith("pure Python (sockshare._speedups is an older build")


# -- the C functions, through real sockets --------------------------------------------


@contextlib.contextmanager
def _pending(n: int, family: socket.AddressFamily = socket.AF_INET,
             ) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A non-blocking listener on the loopback of ``family`` with ``n`` connections in its
    queue, not accepted; the listener and the clients closed afterwards. Skips where
    there is no IPv6 loopback."""
    lsock = socket.socket(family, socket.SOCK_STREAM)
    try:
        lsock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    except OSError:
        lsock.close()
        if family != socket.AF_INET6:
            raise
        pytest.skip("no IPv6 loopback")
    lsock.listen(16)
    lsock.setblocking(False)
    clients: list[socket.socket] = []
    try:
        clients += [socket.create_connection(lsock.getsockname()[:2]) for _ in range(n)]
        yield lsock, clients
    finally:
        for c in clients:
            c.close()
        lsock.close()


@needs_c
def test_accept_many_accepts_until_eagain_with_addresses_and_cloexec() -> None:
    assert sp is not None
    with _pending(5) as (lsock, clients):
        before = fd_count()
        items, status = sp.accept_many(lsock.fileno(), 3, 1 << 30)   # the budget
        assert status == 0
        assert len(items) == 3
        more, status = sp.accept_many(lsock.fileno(), 64, 1 << 30)   # then EAGAIN
        assert status == 0
        assert len(more) == 2
        assert fd_count() == before + 5
        ports = sorted(c.getsockname()[1] for c in clients)
        assert sorted(addr[1] for _fd, addr in items + more) == ports
        for fd, addr in items + more:
            assert addr[0] == "127.0.0.1"
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 6, fd)
            assert s.getpeername() == addr
            s.close()
        assert fd_count() == before
        none, status = sp.accept_many(lsock.fileno(), 64, 1 << 30)
        assert (none, status) == ([], 0)


@needs_c
def test_accept_many_stops_at_the_descriptor_mark_and_reports_errors() -> None:
    assert sp is not None
    with _pending(3, socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as (lsock, _):
        items, status = sp.accept_many(lsock.fileno(), 64, 0)   # every fd is >= 0: stop at one
        assert status == -1
        assert len(items) == 1
        fd, addr = items[0]
        if lsock.family == socket.AF_INET6:
            assert addr[0] == "::1"
            assert len(addr) == 4
        sp.close_fds([fd])
        with pytest.raises(OSError):
            os.fstat(fd)
        # not a listening socket: the errno comes back as the status, nothing accepted
        other = socket.socket()
        try:
            items, status = sp.accept_many(other.fileno(), 4, 1 << 30)
            assert items == []
            assert status > 0
        finally:
            other.close()
        sp.close_fds([f for f, _a in sp.accept_many(lsock.fileno(), 64, 1 << 30)[0]])


@needs_c
def test_handoff_frame_matches_the_vectors_and_the_python_encoder() -> None:
    assert sp is not None
    # (tests/test_vectors.py runs the vectors through the channel, on this path)
    # the protocol document's example, whatever the vector file's layout
    example = sp.handoff_frame(1, [(1, b"\x01\x01\x00\x06", b'{"route":"chat"}', b"GET / HTTP/1.1\r\n")])
    assert example.hex() == ("535301200101000000000036" "0001" "0000000000000001" "01010006"
                             "0000001000000010") + b'{"route":"chat"}GET / HTTP/1.1\r\n'.hex()
    from sockshare.protocol import FrameType, HandoffEntry, SocketKind, encode_frame, encode_handoff
    entries = [HandoffEntry(i + 7, SocketKind(socket.AF_INET, socket.SOCK_STREAM, 6), b"{}" * i,
                            bytes(range(i)), b"") for i in range(1, 40)]
    want = encode_frame(FrameType.HANDOFF, encode_handoff(entries, wsa=False), flags=1, nfds=len(entries))
    got = sp.handoff_frame(1, [(e.id, e.kind.pack(), e.meta, e.data) for e in entries])
    assert got == want
    with pytest.raises(ValueError):
        sp.handoff_frame(0, [])
    with pytest.raises(ValueError):
        sp.handoff_frame(0, [(1, b"\x01\x01\x00\x06", b"", b"")] * 254)
    with pytest.raises(TypeError):
        sp.handoff_frame(0, [(1, b"\x01\x01", b"", b"")])
    with pytest.raises(OverflowError):
        sp.handoff_frame(0, [(-1, b"\x01\x01\x00\x06", b"", b"")])


@needs_c
def test_send_fds_and_recv_fds_move_descriptors_close_on_exec() -> None:
    assert sp is not None
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        before = fd_count()
        r, w = os.pipe()
        assert sp.send_fds(a.fileno(), b"x" * 5, [r, w]) == 5
        os.close(r)
        os.close(w)
        data, fds, flags = sp.recv_fds(b.fileno(), 100, 0)
        assert data == b"xxxxx"
        assert len(fds) == 2
        assert not flags & socket.MSG_CTRUNC
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(fds[1], b"through")
        assert os.read(fds[0], 20) == b"through"
        sp.close_fds(fds)
        assert fd_count() == before
        # no descriptors: plain bytes; an empty read at EOF
        assert sp.send_fds(a.fileno(), memoryview(b"abc"), []) == 3
        assert sp.recv_fds(b.fileno(), 10, 0)[:2] == (b"abc", [])
        with pytest.raises(BlockingIOError):
            sp.recv_fds(b.fileno(), 10, socket.MSG_DONTWAIT)
        with pytest.raises(ValueError):
            sp.send_fds(a.fileno(), b"", [0])   # descriptors need a data byte
        with pytest.raises(ValueError):
            sp.send_fds(a.fileno(), b"x", list(range(254)))
        with pytest.raises(OSError):
            sp.send_fds(a.fileno(), b"x", [1 << 20])   # EBADF: not an open descriptor
        full = False
        for _ in range(10_000):   # a full socket: EAGAIN, not a block
            try:
                sp.send_fds(a.fileno(), b"y" * 65536, [])
            except BlockingIOError:
                full = True
                break
        assert full
        assert fd_count() == before
    finally:
        a.close()
        b.close()


@needs_c
def test_recv_fds_at_the_descriptor_limit_reports_a_cut() -> None:
    """At RLIMIT_NOFILE the kernel drops what does not fit and says MSG_CTRUNC: recv_fds
    returns the flag and the descriptors that did arrive (the caller's to close)."""
    assert sp is not None
    import resource

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        r, w = os.pipe()
        socket.send_fds(a, [b"z"], [r, w, r])
        os.close(r)
        os.close(w)
        before = fd_count()
        lowest = os.dup(0)   # descriptors are allocated lowest first: only this one is free
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + 1, hard))
        try:
            data, fds, flags = sp.recv_fds(b.fileno(), 10, 0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert data == b"z"
        assert flags & socket.MSG_CTRUNC
        assert fds == [lowest]   # the first one arrived; the kernel closed the others
        sp.close_fds(fds)
        assert fd_count() == before
    finally:
        a.close()
        b.close()


@needs_c
def test_accept_ids_decodes_and_refuses_bad_payloads() -> None:
    assert sp is not None
    ids = [1, 2 ** 64 - 1, 0, 42]
    assert sp.accept_ids(encode_accept(ids)) == ids
    assert sp.accept_ids(memoryview(encode_accept([]))) == []
    for bad in (b"", b"\x00", encode_accept([1])[:-1], encode_accept([1]) + b"\x00"):
        with pytest.raises(ValueError, match="ACCEPT payload has"):
            sp.accept_ids(bad)
    from sockshare._errors import RemoteProtocolError
    from sockshare._state import _accept_ids
    with pytest.raises(RemoteProtocolError, match="ACCEPT payload has 3 bytes, expected 2"):
        _accept_ids(b"\x00\x00\x00")


@needs_c
def test_close_fds_ignores_closed_ones_and_checks_types() -> None:
    assert sp is not None
    before = fd_count()
    r, w = os.pipe()
    sp.close_fds([r, w, r, -1])
    assert fd_count() == before
    with pytest.raises(TypeError):
        sp.close_fds(["3"])   # type: ignore[list-item]


def test_both_paths_give_the_same_frames_on_a_channel() -> None:
    """A channel round trip in a fresh process per path: same bytes, same handoffs."""
    code = ("import socket, os\n"
            "from sockshare._state import ChannelState\n"
            "st = ChannelState()\n"
            "a, b = socket.socketpair()\n"
            "frames = st.handoff_frames([(a, {'k': 1}, b'pre'), (b, b'{}', b'')], True)\n"
            "print(frames[0][0].hex()[24:], len(frames[0][1]))\n")
    outs = []
    for pure in ("0", "1"):
        e = {**os.environ, _fast.ENV_PURE: pure}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=e, check=True)
        outs.append(out.stdout.split())
    # ids come from one counter per process: equal in both fresh processes
    assert outs[0] == outs[1]



def test_this_process_runs_the_path_its_environment_asks_for() -> None:
    """The test run itself: CI runs the channel and server tests twice, compiled and with
    SOCKSHARE_PURE_PYTHON=1 (.ci/run); each run must be on the path it claims."""
    if os.environ.get(_fast.ENV_PURE, "") not in ("", "0"):
        assert _fast.speedups is None
        assert _fast.active_path().startswith("pure Python (SOCKSHARE_PURE_PYTHON=")
    elif os.environ.get("CI") == "true" and _fast.expected() and shutil.which("cc") is not None:
        assert _fast.speedups is not None, _fast.why_not


@needs_c
def test_dispatch_burst_accepts_places_registers_and_frames() -> None:
    """The dispatcher's compiled burst, on a real listener: the metadata is the JSON the
    Python path writes, placement is LeastConnections', each connection is registered in
    its worker's dict and travels in that worker's one HANDOFF frame; settle_accepts then
    closes the accepted ones. Descriptors counted before and after."""
    assert sp is not None
    from sockshare.protocol import FrameDecoder, FrameType, decode_handoff
    from sockshare.server._policy import ConnInfo, LeastConnections, WorkerView

    raws: list[dict[int, tuple[int, bytes, float, bytes]]] = [{}, {}]
    with _pending(5) as (lsock, clients):
        before = fd_count()
        prefix, mid, end = b'{"handoff_id":"77.', b'","listener":"web","client":["', \
            b'],"route":"default","pool":"default"}'
        # worker 1 has 2 connections already, worker 2 none and room for 2 only
        workers = [(1, 2, 64, raws[0]), (2, 0, 2, raws[1])]
        frames, n, status, last_fd, last, seq, hid = sp.dispatch_burst(
            lsock.fileno(), 4, 1 << 30, 10, 1 << 62, -1, prefix, mid, end,
            b"\x01\x01\x00\x00", 1, 123.5, workers)
        assert (n, status, last_fd, seq, hid) == (4, 0, -1, 14, (1 << 62) + 4)
        assert fd_count() == before + 4
        # the same choices as the Python policy, connection by connection
        @dataclass
        class View:
            id: int
            connections: int
            pid: int | None = None
            pool: str = "default"
            max_conns: int | None = None

        views, room, policy, picks = [View(1, 2), View(2, 0)], {1: 64, 2: 2}, LeastConnections(), []
        for _ in range(4):
            offered: list[WorkerView] = [v for v in views if room[v.id] > 0]
            choice = policy(offered, ConnInfo([], "web", "default", ""))
            assert choice is not None
            pick = views[[v.id for v in views].index(choice.id)]
            pick.connections += 1
            room[pick.id] -= 1
            picks.append(pick.id)
        assert last == policy._last
        assert [len(r) for r in raws] == [picks.count(1), picks.count(2)]
        ports = {c.getsockname()[1] for c in clients}
        seen = []
        for k, frame, fds, count in frames:
            dec = FrameDecoder(max_payload=1 << 20)
            dec.feed(frame, fds)
            f = dec.next_frame()
            assert f is not None
            assert f.type == FrameType.HANDOFF
            assert f.flags == 1
            entries = decode_handoff(f.payload)
            assert len(entries) == count == len(fds) == len(raws[k])
            for e, fd in zip(entries, fds, strict=True):
                assert raws[k][e.id][0] == fd
                assert raws[k][e.id][1] == e.meta
                assert raws[k][e.id][2] == 123.5
                meta = json.loads(e.meta)
                assert meta["listener"] == "web"
                assert meta["pool"] == "default"
                assert meta["client"][0] == "127.0.0.1"
                assert meta["client"][1] in ports
                peer = socket.socket(fileno=os.dup(fd))
                try:
                    assert peer.getpeername()[1] == meta["client"][1]
                finally:
                    peer.close()
                seen.append(meta["handoff_id"])
        assert sorted(seen) == [f"77.{i}" for i in range(10, 14)]
        # an ACCEPT for some of worker 1's and an id that is not compiled
        ids = list(raws[0])
        done, rest = sp.settle_accepts(encode_accept([*ids, 5]), raws[0])
        assert (done, rest, raws[0]) == (len(ids), [5], {})
        with pytest.raises(ValueError, match="ACCEPT payload has"):
            sp.settle_accepts(b"\x00\x01", raws[1])
        sp.close_fds([fd for fd, _m, _t, _d in raws[1].values()])
        raws[1].clear()
        # the fifth connection is still queued: a burst with no room takes none...
        frames, n, *_rest = sp.dispatch_burst(lsock.fileno(), 0, 1 << 30, 14, 1, -1, prefix, mid,
                                              end, b"\x01\x01\x00\x00", 1, 0.0, workers)
        assert (frames, n) == ([], 0)
        # ...and one that reaches the descriptor mark stops there (status -1)
        frames, n, status, last_fd, *_rest = sp.dispatch_burst(
            lsock.fileno(), 4, 0, 14, 1, -1, prefix, mid, end, b"\x01\x01\x00\x00", 1, 0.0, workers)
        assert (n, status) == (1, -1)
        assert last_fd == frames[0][2][0]
        sp.close_fds([fd for r in raws for fd, _m, _t, _d in r.values()])
        assert fd_count() == before
        with pytest.raises(TypeError):
            sp.dispatch_burst(lsock.fileno(), 1, 1 << 30, 1, 1, -1, prefix, mid, end,
                              b"\x01\x01\x00\x00", 1, 0.0, [(1, 0, 1)])  # type: ignore[list-item]


# --- the channel's one-socket hot paths: send_single and recv_batch ---------------------

_JSON_CASES: list[object] = [
    None, {}, {"a": 1}, {"route": "chat", "client": ["127.0.0.1", 54321], "id": "abcdefgh1"},
    {"esc": "q\"b\\s/\b\f\n\r\t\x00\x1f\x7f", "uni": "é€\U0001f600", "n": [True, False, None, -5, 2**63 - 1]},
    {"nested": {"a": [{"b": ()}, [1, [2, [3]]]]}, "": ""},
    b'{"pre":"encoded"}',
]
# what the C encoder leaves to Python (which encodes it, or says why it cannot)
_JSON_DECLINED: list[object] = [
    {"f": 1.5}, {1: "int key"}, {"big": 2**70}, {"t": {1, 2}},
    {"deep": json.loads("[" * 40 + "]" * 40)}, bytearray(b"{}"), ["not a dict"],
]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected UNIX socket pair, closed after the test; the descriptors the test
    process holds must be as many at the end as at the start."""
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def _recv_one(b: socket.socket) -> tuple[bytes, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(b, 1 << 17, 4)
    return msg, fds


@needs_c
@pytest.mark.parametrize("meta", _JSON_CASES)
def test_send_single_writes_the_python_frame(meta: object, pair: tuple[socket.socket, socket.socket]) -> None:
    """The frame send_single writes is byte for byte the one single_frame packs (the
    metadata encoded as json.dumps with compact separators)."""
    from sockshare._state import ChannelState
    assert sp is not None
    a, b = pair
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as moved:
        frame, _fd, ticket = ChannelState().single_frame(moved, meta, b"pre-read", True)
        assert sp.send_single(a.fileno(), moved, 1, ticket.id, meta, b"pre-read", 1 << 20, False) == 1
        got, fds = _recv_one(b)
        assert got == frame
        assert len(fds) == 1
        os.close(fds[0])


@needs_c
@pytest.mark.parametrize("meta", _JSON_DECLINED)
def test_send_single_leaves_what_it_does_not_encode_to_python(
        meta: object, pair: tuple[socket.socket, socket.socket]) -> None:
    assert sp is not None
    a, b = pair
    b.setblocking(False)
    assert sp.send_single(a.fileno(), a, 0, 1, meta, b"", 1 << 20, False) == -1
    # too large for the peer, or for the limits: also Python's to say
    assert sp.send_single(a.fileno(), a, 0, 1, {"a": "x" * 100}, b"", 100, False) == -1
    assert sp.send_single(a.fileno(), a, 0, 1, None, b"x" * (64 * 1024 + 1), 1 << 20, False) == -1
    assert sp.send_single(a.fileno(), a, 0, 1, {"m": "x" * (16 * 1024)}, b"", 1 << 20, False) == -1
    with pytest.raises(BlockingIOError):
        b.recv(1)  # nothing was sent


@needs_c
def test_send_single_reports_a_full_socket_and_the_rest_of_a_started_frame(
        pair: tuple[socket.socket, socket.socket]) -> None:
    assert sp is not None
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    before = fd_count()
    last: int | bytes = 1
    for hid in range(10_000):
        last = sp.send_single(a.fileno(), b, 0, hid, None, b"d" * 30_000, 1 << 20, False)
        if last != 1:
            break
    if isinstance(last, bytes):  # a started frame's rest
        assert 0 < len(last) < 34 + 30_000
    else:
        assert last == 0  # nothing of it went
    b.setblocking(False)  # the receiver's copies: read and closed
    with contextlib.suppress(BlockingIOError):
        while True:
            _m, fds, _f, _a = socket.recv_fds(b, 1 << 16, 8)
            sp.close_fds(fds)
    assert fd_count() == before


@needs_c
def test_send_single_closes_a_fire_and_forget_socket_once_it_went(
        pair: tuple[socket.socket, socket.socket]) -> None:
    assert sp is not None
    a, b = pair
    before = fd_count()
    moved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert sp.send_single(a.fileno(), moved, 0, 7, None, b"", 1 << 20, True) == 1
    assert moved.fileno() == -1  # closed as socket.close() closes it
    assert moved._closed  # type: ignore[attr-defined]
    _msg, fds = _recv_one(b)
    assert fd_count() == before + 1  # only the receiver's copy is left
    os.close(fds[0])
    # a socket that makefile() still uses keeps its descriptor, as with close()
    kept = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    f = kept.makefile("rb")
    assert sp.send_single(a.fileno(), kept, 0, 8, None, b"", 1 << 20, True) == 1
    assert kept.fileno() >= 0
    f.close()
    assert kept.fileno() == -1
    _msg, fds = _recv_one(b)
    os.close(fds[0])
    assert fd_count() == before


def _batch(b: socket.socket, *, single: bool = True, blocking: int = 1,
           max_msgs: int = 32) -> tuple[list[Any], int, list[tuple[bytes, list[int], int]]]:
    from sockshare._state import Handoff
    assert sp is not None
    answers: list[object] = []
    return sp.recv_batch(b.fileno(), 64 * 1024, socket.MSG_DONTWAIT, max_msgs, single, socket.socket,
                         blocking, 1 << 20, Handoff, answers.append)


@needs_c
def test_recv_batch_makes_checked_handoffs_and_passes_the_rest_on_in_order(
        pair: tuple[socket.socket, socket.socket]) -> None:
    from sockshare._state import ChannelState, Handoff
    a, b = pair
    st = ChannelState()
    before = fd_count()
    moved = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    frames = [st.single_frame(s, {"i": i}, b"d%d" % i, i == 1)[0] for i, s in enumerate(moved)]
    for frame, s in zip(frames, moved, strict=True):
        socket.send_fds(a, [frame], [s.fileno()])
    a.send(b"SS-not-a-frame")  # then bytes the Python decoder must see, in order
    socket.send_fds(a, [frames[0]], [moved[0].fileno()])  # (the kernel joins them)
    socket.send_fds(a, [frames[2]], [moved[2].fileno()])  # (after them: passed on too)
    for s in moved:
        s.close()
    handoffs, acked, rest = _batch(b, blocking=0)
    assert [type(h) for h in handoffs] == [Handoff] * 3
    assert [h.raw_meta for h in handoffs] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    assert [h.data for h in handoffs] == [b"d0", b"d1", b"d2"]
    assert [h.acked for h in handoffs] == [False, True, False]
    assert acked == 1
    for h in handoffs:
        assert (h.socket.family, h.socket.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert h.socket.gettimeout() == 0.0  # blocking=0: non-blocking, as asked
        assert not os.get_inheritable(h.socket.fileno())
        h.socket.close()
    assert [m[0] for m in rest] == [b"SS-not-a-frame" + frames[0], frames[2]]
    assert [len(m[1]) for m in rest] == [1, 1]
    for m in rest:
        os.close(m[1][0])
    assert fd_count() == before
    with pytest.raises(BlockingIOError):
        _batch(b)


@needs_c
def test_recv_batch_leaves_a_lying_descriptor_to_the_python_path(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A descriptor that is not what its frame claims (here a pipe, and a UDP socket
    claimed as TCP) is passed on open, with its frame, for checked_socket to refuse."""
    from sockshare._state import ChannelState
    a, b = pair
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with udp, tcp:
        before = fd_count()
        frame = ChannelState().single_frame(tcp, None, b"", False)[0]
        socket.send_fds(a, [frame], [r])
        socket.send_fds(a, [frame], [udp.fileno()])
        handoffs, _acked, rest = _batch(b)
        assert handoffs == []
        assert [m[0] for m in rest] == [frame, frame]
        got = [m[1][0] for m in rest]
        assert stat.S_ISFIFO(os.fstat(got[0]).st_mode)
        with socket.socket(fileno=os.dup(got[1])) as check:
            assert check.type == socket.SOCK_DGRAM
        sp.close_fds(got)  # type: ignore[union-attr]
        assert fd_count() == before
        # not idle (single=False): nothing is decoded in C
        socket.send_fds(a, [frame], [tcp.fileno()])
        handoffs, _acked, rest = _batch(b, single=False)
        assert handoffs == []
        assert rest[0][0] == frame
        os.close(rest[0][1][0])
    os.close(r)
    os.close(w)


@needs_c
def test_recv_batch_reads_the_end_of_the_stream_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    handoffs, _acked, rest = _batch(b)
    assert handoffs == []
    assert [(m[0], m[1]) for m in rest] == [(b"", [])]


# --- the dispatcher's read of its workers' answers: recv_answers ------------------------


def _frame(ftype: int, payload: bytes) -> bytes:
    from sockshare.protocol import FrameType, encode_frame

    return encode_frame(FrameType(ftype), payload)


_ACCEPT, _CONTROL, _BYE = 0x21, 0x30, 0x03


def _raw_of(n: int, first: int = 100) -> dict[int, tuple[int, bytes, float, bytes]]:
    """``n`` compiled handoffs in flight: ids from ``first``, each a real descriptor."""
    return {first + i: (os.open(os.devnull, os.O_RDONLY), b"{}", 0.0, b"") for i in range(n)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@needs_c
def test_recv_answers_settles_leading_accepts_and_takes_the_reports_after_them(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The leading ACCEPTs of compiled handoffs are settled (removed, descriptors closed),
    the CONTROL frames after them come back -- a report of closed connections already
    read as json.loads reads it, anything else as its payload -- and what does not fit
    (a control before an ACCEPT, an id not compiled, one twice, another frame type, a
    partial frame) is left whole to the Python decoder, from the first frame not taken.
    Descriptors counted before and after."""
    assert sp is not None
    a, b = pair
    b.setblocking(False)
    before = fd_count()
    raw = _raw_of(6)
    fds = {hid: v[0] for hid, v in raw.items()}
    closed = b'{"ev":"closed","n":7,"active":2}'
    other = b'{"ev":"hello","peer":null,"x":[1]}'
    a.send(_frame(_ACCEPT, encode_accept([100, 101])) + _frame(_ACCEPT, encode_accept([102]))
           + _frame(_CONTROL, closed) + _frame(_CONTROL, b'{"ev":"closed","n":0}')
           + _frame(_CONTROL, other))
    n, closed_sum, controls, rest, got_fds, _flags = sp.recv_answers(b.fileno(), 1 << 16, raw,
                                                                     1 << 20)
    assert (n, closed_sum, rest, got_fds) == (3, -1, b"", [])
    assert controls == [json.loads(closed), {"ev": "closed", "n": 0}, other]
    assert sorted(raw) == [103, 104, 105]
    assert [_is_open(fds[h]) for h in sorted(fds)] == [False] * 3 + [True] * 3
    # what the Python decoder must see, whole, from the first frame not taken
    cases = [
        _frame(_CONTROL, closed) + _frame(_ACCEPT, encode_accept([103])),   # report first
        _frame(_ACCEPT, encode_accept([103, 999])),                          # 999 not compiled
        _frame(_ACCEPT, encode_accept([103, 103])),                          # twice
        _frame(_ACCEPT, b"\x00\x02\x00"),                                   # malformed
        _frame(_BYE, b""),
    ]
    for data in cases:
        a.send(data)
        assert sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20) == (0, -1, [], data, [], _flags)
        assert sorted(raw) == [103, 104, 105]
    # an ACCEPT taken, then reports followed by something else: the reports go with it
    tail = _frame(_CONTROL, closed) + _frame(_BYE, b"")
    a.send(_frame(_ACCEPT, encode_accept([103])) + tail)
    assert sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20) == (1, -1, [], tail, [], _flags)
    # only reports of closed connections after the ACCEPTs: their sum too
    a.send(_frame(_ACCEPT, encode_accept([104])) + _frame(_CONTROL, closed)
           + _frame(_CONTROL, b'{"ev":"closed","n":5}'))
    assert sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20) == (
        1, 12, [json.loads(closed), {"ev": "closed", "n": 5}], b"", [], _flags)
    # reports written otherwise than the workers' encoder writes them: as payloads
    odd = [b'{"ev":"closed","n":01}', b'{"ev": "closed","n":1}', b'{"ev":"closed","n":-1}',
           b'{"ev":"closed","n":1,"active":2,"x":3}', b'{"ev":"closed","n":1234567890123456}']
    a.send(_frame(_ACCEPT, encode_accept([105])) + b"".join(_frame(_CONTROL, p) for p in odd))
    assert sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20) == (1, -1, odd, b"", [], _flags)
    raw.update(_raw_of(1, first=106))
    # a partial frame: all of it to Python (its decoder keeps it for the next read)
    part = _frame(_ACCEPT, encode_accept([106]))
    a.send(part[:-3])
    assert sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20)[:4] == (0, -1, [], part[:-3])
    a.send(part[-3:])
    b.recv(1 << 16)
    # nothing there; then the end of the stream
    with pytest.raises(BlockingIOError):
        sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20)
    a.shutdown(socket.SHUT_WR)
    assert sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20)[:5] == (0, -1, [], b"", [])
    with pytest.raises(TypeError):
        sp.recv_answers(b.fileno(), 1 << 16, [], 1 << 20)  # type: ignore[arg-type]
    sp.close_fds([fd for fd, _m, _t, _d in raw.values()])
    assert fd_count() == before


@needs_c
def test_recv_answers_leaves_descriptors_to_the_python_path(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A message that brings descriptors (a worker migrating a connection out) is not
    read in C: it comes back whole, with its descriptors open, nothing settled."""
    assert sp is not None
    a, b = pair
    b.setblocking(False)
    before = fd_count()
    raw = _raw_of(1)
    data = _frame(_ACCEPT, encode_accept([100]))
    socket.send_fds(a, [data], [a.fileno()])
    n, closed, controls, rest, fds, _flags = sp.recv_answers(b.fileno(), 1 << 16, raw, 1 << 20)
    assert (n, closed, controls, rest, len(fds)) == (0, -1, [], data, 1)
    assert list(raw) == [100]
    sp.close_fds([*fds, raw[100][0]])
    assert fd_count() == before


def test_a_worker_channel_settles_answers_and_reports_alike_on_both_paths() -> None:
    """Through AsyncChannel, on the path this process runs: compiled handoffs in flight
    (as the dispatcher's burst leaves them), the peer's ACCEPTs and reports in one write,
    in the workers' order (ACCEPTs first) and the other (reports first); each way the
    handoffs are settled, their descriptors closed and the reports taken in order."""
    import asyncio

    from sockshare import AsyncChannel, Channel
    from sockshare.protocol import encode_control

    async def main() -> None:
        ca, cb = Channel.pair()
        a = AsyncChannel.wrap(ca)
        a.track_accepts()
        before = fd_count()
        try:
            for order in ("accepts first", "reports first"):
                raw = a.raw_pending
                raw.update(_raw_of(3, first=(1 << 62) + (10 if order == "reports first" else 0)))
                a._state.register_compiled(3)
                ids = list(raw)
                fds = [v[0] for v in raw.values()]
                answers = _frame(_ACCEPT, encode_accept(ids))
                reports = (_frame(_CONTROL, encode_control({"ev": "closed", "n": 2, "active": 1}))
                           + _frame(_CONTROL, encode_control({"ev": "fds", "full": False})))
                cb._sock.sendall(answers + reports if order == "accepts first"
                                 else reports + answers)
                for _ in range(200):
                    if not raw and len(a._state.controls) == 2:
                        break
                    await asyncio.sleep(0.01)
                assert raw == {}, order
                assert not any(_is_open(fd) for fd in fds), order
                # the compiled path counts them; the Python path makes tickets of them
                assert a.take_raw_accepted() + len(a.accepted()) == 3, order
                assert a.received_controls() == [{"ev": "closed", "n": 2, "active": 1},
                                                 {"ev": "fds", "full": False}], order
            assert a.usable
            assert fd_count() == before
        finally:
            await a.aclose()
            cb.close()

    asyncio.run(main())


@needs_c
def test_a_read_of_only_accepts_and_close_reports_goes_to_on_settled() -> None:
    """The dispatcher's shortcut: a read that brought only ACCEPTs of compiled handoffs
    and reports of closed connections calls ``on_settled(accepted, closed)`` and not
    ``on_activity``; any other report in the read goes the general way, in order."""
    import asyncio

    from sockshare import AsyncChannel, Channel
    from sockshare.protocol import encode_control

    async def main() -> None:
        ca, cb = Channel.pair()
        a = AsyncChannel.wrap(ca)
        settled: list[tuple[int, int]] = []
        activity: list[int] = []
        a.on_settled = lambda n, closed: settled.append((n, closed))
        a.on_activity = lambda: activity.append(1)
        before = fd_count()
        try:
            for reports, want in (
                    ([{"ev": "closed", "n": 2, "active": 1}, {"ev": "closed", "n": 3}], (3, 5)),
                    ([{"ev": "closed", "n": 1}, {"ev": "hello", "resume": False}], None)):
                raw = a.raw_pending
                raw.update(_raw_of(3, first=1 << 62))
                fds = [v[0] for v in raw.values()]
                cb._sock.sendall(_frame(_ACCEPT, encode_accept(list(raw))) + b"".join(
                    _frame(_CONTROL, encode_control(r)) for r in reports))
                for _ in range(200):
                    if settled or activity:
                        break
                    await asyncio.sleep(0.01)
                assert raw == {}
                assert not any(_is_open(fd) for fd in fds)
                if want is not None:
                    assert (settled, activity) == ([want], [])
                    assert a.received_controls() == []
                else:
                    assert (settled, activity) == ([], [1])
                    assert a.take_raw_accepted() == 3
                    assert a.received_controls() == reports
                settled.clear()
                activity.clear()
            assert a.usable
            assert fd_count() == before
        finally:
            await a.aclose()
            cb.close()

    asyncio.run(main())


@needs_c
def test_new_slots_makes_what_the_dataclass_init_makes() -> None:
    """Tickets and Handoffs made in C (new_slots) have every field the dataclass
    __init__ sets, in its order; anything else is refused."""
    import dataclasses

    from sockshare._state import Handoff, Ticket
    assert sp is not None
    values: list[object] = [7, None, {"m": 1}, b"d", "sent", "", None, False]
    made = sp.new_slots(Ticket, *values)
    assert type(made) is Ticket
    ref = Ticket(7, None, {"m": 1}, b"d", "sent")
    assert [getattr(made, f.name) for f in dataclasses.fields(Ticket)] == \
        [getattr(ref, f.name) for f in dataclasses.fields(Ticket)] == values
    h = sp.new_slots(Handoff, 3, None, b"x", b"{}", True, print, False, None)
    assert (h.id, h.acked, h.answered, h.meta) == (3, True, False, {})
    with pytest.raises(TypeError):
        sp.new_slots(Ticket, 1, 2)  # not one value per slot
    with pytest.raises((TypeError, AttributeError)):
        sp.new_slots(dict, 1)  # not a slots class


def test_sending_what_is_not_a_socket_leaves_no_ticket_on_either_path() -> None:
    """The compiled send leaves a non-socket to the Python path, which refuses it as it
    always did: nothing sent, no ticket left pending."""
    from sockshare import Channel
    a, b = Channel.pair()
    with a, b:
        for bad in (object(), 5):
            with pytest.raises(TypeError):
                a.send(bad, ack=True)  # type: ignore[arg-type]
        assert a._state.tickets == {}
        assert a.counters["sent"] == 0
