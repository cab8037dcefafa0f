"""The token API between real processes: export in one, import in a sibling.

Every test here starts its own processes (``tests/helpers/peer.py``, driven over pipes
by :mod:`_fdcount`): an *exporter* and an *importer*, siblings, children of the test
process, which relays the token between them (or lets it travel by env var, file, or a
direct link). A real client in the test process talks to the moved socket over
127.0.0.1, ::1 or a UNIX path, before and after the move, in both directions.

Descriptor accounting: each peer's ``/proc/<pid>/fd`` count is taken as a baseline once
its export agent runs (the agent keeps 5 fds: listener, wake pair, epoll, reserve) and checked
again after every import, refusal, release and expiry, with a bounded wait for the
agent thread. Nothing here mocks the OS.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sockshare
from sockshare.backends import _pidfd
from sockshare.backends._agent import agent
from sockshare.protocol import FrameType, decode_token, encode_frame, encode_token
from sockshare.protocol._messages import Claim, encode_claim, encode_done
from sockshare.protocol._token import ADDR_ABSTRACT, KIND_WINDOWS, TokenInfo
from tests._fdcount import (
    Commands,
    PeerConnection,
    PeerError,
    PeerProcess,
    fd_count,
    fd_table,
    reap,
    settle,
    settled_fd_count,
    socket_inodes,
    wait_fd_count,
)

IO = 10.0
FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_v6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")
STREAM_FAMILIES = ["inet", pytest.param("inet6", marks=needs_v6), "unix"]
DGRAM_FAMILIES = ["inet", pytest.param("inet6", marks=needs_v6), "unix"]


# --- fixtures ------------------------------------------------------------------


#: What a running export agent holds: its listener, its wake-up socketpair, its epoll,
#: and the descriptor it keeps in reserve for EMFILE.
AGENT_FDS = 5


def _start_agent(peer: Commands) -> None:
    """Export and release once, so the agent's own fds are part of the baseline.

    The agent thread opens its epoll fd once it runs, after ``export`` returned: wait
    for all of its descriptors to exist.
    """
    peer.call("pid")  # it has started up (no module file open any more)
    n0 = fd_count(peer.pid)
    h = peer.call("socket", family="unix", type="dgram")["h"]
    token = peer.call("export", h=h, pid=1)
    assert peer.call("release", token=token) is True
    peer.call("close", h=h)
    wait_fd_count(peer.pid, n0 + AGENT_FDS, what="a new export agent")


@pytest.fixture
def exporter() -> Iterator[PeerProcess]:
    p = PeerProcess()
    try:
        _start_agent(p)
        p.baseline = fd_count(p.pid)
        yield p
    finally:
        p.close()


@pytest.fixture
def importer() -> Iterator[PeerProcess]:
    p = PeerProcess()
    try:
        p.call("pid")
        p.baseline = fd_count(p.pid)
        yield p
    finally:
        p.close()


@pytest.fixture
def sockdir(sock_dir: Path) -> str:
    """conftest's short private directory for UNIX socket paths, as a str."""
    return str(sock_dir)


@pytest.fixture
def self_agent() -> int:
    """Start this process's export agent; return the fd baseline of this process.

    One full round trip, then a bounded wait: the agent thread creates its epoll fd
    once it runs (after ``export_socket`` returned), and closes its duplicate and the
    importer's connection when DONE arrives (after ``import_socket`` returned).
    """
    sockshare.close_agent_connections()  # earlier tests may have left pooled ones
    time.sleep(0.1)  # the agent closes its ends of them
    thread = agent()._thread
    n0 = fd_count() + (0 if thread is not None and thread.is_alive() else AGENT_FDS)
    a, b = socket.socketpair()
    with a, b:
        sockshare.import_socket(sockshare.export_socket(a, os.getpid()), timeout=IO).close()
    sockshare.close_agent_connections()  # pooling is tested in tests/test_token_pool.py
    assert agent().pending() == 0
    wait_fd_count("self", n0, what="this process (exporter)")
    return n0


# --- helpers -------------------------------------------------------------------


def _bind(family: str, sockdir: str, name: str) -> Any:
    if family == "inet":
        return ["127.0.0.1", 0]
    if family == "inet6":
        return ["::1", 0]
    return os.path.join(sockdir, name)


def _addr(family: str, sockname: Any) -> Any:
    return sockname if family == "unix" else (sockname[0], sockname[1])


def _client(family: str, addr: Any, stype: int = socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(FAMILIES[family], stype)
    try:
        s.settimeout(IO)
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _check_token_text(token: str) -> None:
    assert token.startswith("ss1."), token
    assert token.isascii()
    assert all(33 <= ord(c) <= 126 for c in token), "printable ASCII, no whitespace"
    assert len(token) < 512, f"{len(token)} characters"


def _check_same_socket(imported: dict[str, Any], original: dict[str, Any]) -> None:
    """The imported socket is the very socket exported, with the right identity."""
    assert imported["inode"] == original["inode"]
    for k in ("family", "type", "proto", "so_domain", "so_type", "so_protocol"):
        assert imported[k] == original[k], k
    assert imported["so_domain"] == imported["family"]
    assert imported["so_type"] == imported["type"]
    assert imported["cloexec"] is True
    assert imported["inheritable"] is False


def _check_blocking(info: dict[str, Any]) -> None:
    assert info["timeout"] is None
    assert info["nonblock"] is False


def _refused(peer: PeerProcess, token: str, cls: type[sockshare.SockshareError]) -> PeerError:
    err = peer.fails("import", token=token)
    assert err.name == cls.__name__, err
    assert "SockshareError" in err.mro
    return err


# --- every socket kind, between siblings -------------------------------------------


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_listening_socket_moves_to_a_sibling(
    exporter: PeerProcess, importer: PeerProcess, sockdir: str, family: str
) -> None:
    lst = exporter.call("socket", family=family, type="stream",
                        bind=_bind(family, sockdir, "lst"), listen=True)
    addr = _addr(family, lst["sockname"])
    early = _client(family, addr)  # waits in the backlog while the listener moves
    early.sendall(b"early-1")

    token = exporter.call("export", h=lst["h"], pid=importer.pid, close=True)
    _check_token_text(token)
    assert decode_token(token).target_pid == importer.pid
    assert exporter.call("pending") == 1
    settle(exporter, 1)  # the agent's duplicate is the only copy left

    got = importer.call("import", token=token)
    _check_same_socket(got, lst)
    _check_blocking(got)
    assert exporter.call("pending") == 0
    settle(exporter)  # duplicate closed once imported

    c1 = importer.call("accept", h=got["h"])
    assert bytes.fromhex(importer.call("recv", h=c1["h"], n=7)) == b"early-1"
    early.sendall(b"early-2")
    assert bytes.fromhex(importer.call("recv", h=c1["h"], n=7)) == b"early-2"
    importer.call("send", h=c1["h"], data=b"reply-1".hex())
    assert _recv_exact(early, 7) == b"reply-1"

    late = _client(family, addr)  # a connection made after the move
    late.sendall(b"late")
    c2 = importer.call("accept", h=got["h"])
    assert bytes.fromhex(importer.call("recv", h=c2["h"], n=4)) == b"late"
    importer.call("send", h=c2["h"], data=b"bye".hex())
    assert _recv_exact(late, 3) == b"bye"

    for h in (c1["h"], c2["h"], got["h"]):
        importer.call("close", h=h)
    assert early.recv(1) == b""
    assert late.recv(1) == b""
    early.close()
    late.close()
    settle(importer)
    if family != "unix":  # nobody holds the listener any more: the port is free
        with pytest.raises(ConnectionRefusedError):
            _client(family, addr).close()


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_connected_stream_socket_moves_whole(
    exporter: PeerProcess, importer: PeerProcess, sockdir: str, family: str
) -> None:
    with socket.socket(FAMILIES[family], socket.SOCK_STREAM) as lst:
        lst.settimeout(IO)
        lst.bind(tuple(_bind(family, sockdir, "srv")) if family != "unix"
                 else _bind(family, sockdir, "srv"))
        lst.listen(4)
        conn = exporter.call("socket", family=family, type="stream",
                             connect=_addr(family, lst.getsockname()))
        srv, _ = lst.accept()
    with srv:
        srv.settimeout(IO)
        # bytes in flight both ways when the socket moves
        exporter.call("send", h=conn["h"], data=b"from-exporter;".hex())
        srv.sendall(b"before-move;")
        assert _recv_exact(srv, 14) == b"from-exporter;"

        token = exporter.call("export", h=conn["h"], pid=importer.pid, close=True)
        _check_token_text(token)
        got = importer.call("import", token=token)
        _check_same_socket(got, conn)
        _check_blocking(got)
        settle(exporter)

        srv.sendall(b"after-move;")
        expected = b"before-move;after-move;"
        assert bytes.fromhex(importer.call("recv", h=got["h"], n=len(expected))) == expected
        importer.call("send", h=got["h"], data=b"from-importer;".hex())
        assert _recv_exact(srv, 14) == b"from-importer;"

        # The importer holds the only copy: closing it ends the connection.
        importer.call("close", h=got["h"])
        assert srv.recv(1) == b""
    settle(importer)
    assert exporter.call("pending") == 0


@pytest.mark.parametrize("family", DGRAM_FAMILIES)
def test_datagram_socket_moves(
    exporter: PeerProcess, importer: PeerProcess, sockdir: str, family: str
) -> None:
    dg = exporter.call("socket", family=family, type="dgram", bind=_bind(family, sockdir, "dg"))
    srv_addr = _addr(family, dg["sockname"])
    with socket.socket(FAMILIES[family], socket.SOCK_DGRAM) as cl:
        cl.settimeout(IO)
        b = _bind(family, sockdir, "cl")
        cl.bind(b if family == "unix" else tuple(b))
        cl.sendto(b"d-before", srv_addr)  # queued on the socket while it moves

        token = exporter.call("export", h=dg["h"], pid=importer.pid, close=True)
        _check_token_text(token)
        got = importer.call("import", token=token)
        _check_same_socket(got, dg)
        _check_blocking(got)
        settle(exporter)

        cl.sendto(b"d-after", srv_addr)
        data1, frm1 = importer.call("recvfrom", h=got["h"])
        data2, frm2 = importer.call("recvfrom", h=got["h"])
        assert [bytes.fromhex(data1), bytes.fromhex(data2)] == [b"d-before", b"d-after"]
        assert _addr(family, frm1) == _addr(family, frm2) == _addr(family, cl.getsockname())
        importer.call("sendto", h=got["h"], data=b"reply".hex(), addr=frm1)
        data, frm = cl.recvfrom(100)
        assert data == b"reply"
        assert _addr(family, frm) == srv_addr
        importer.call("close", h=got["h"])
    settle(importer)


def test_connected_udp_socket_and_explicit_protocols(
    exporter: PeerProcess, importer: PeerProcess
) -> None:
    """proto travels as given (IPPROTO_UDP/TCP, not 0), and a connected UDP socket works."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cl:
        cl.settimeout(IO)
        cl.bind(("127.0.0.1", 0))
        udp = exporter.call("socket", family="inet", type="dgram", proto=socket.IPPROTO_UDP,
                            bind=["127.0.0.1", 0], connect=list(cl.getsockname()))
        assert udp["proto"] == socket.IPPROTO_UDP
        token = exporter.call("export", h=udp["h"], pid=importer.pid, close=True)
        got = importer.call("import", token=token)
        _check_same_socket(got, udp)
        assert got["proto"] == socket.IPPROTO_UDP
        importer.call("sendto", h=got["h"], data=b"hi".hex())
        assert cl.recvfrom(10) == (b"hi", tuple(udp["sockname"]))
        cl.sendto(b"yo", tuple(udp["sockname"]))
        assert bytes.fromhex(importer.call("recvfrom", h=got["h"])[0]) == b"yo"
        importer.call("close", h=got["h"])

    tcp = exporter.call("socket", family="inet", type="stream", proto=socket.IPPROTO_TCP,
                        bind=["127.0.0.1", 0], listen=True)
    token = exporter.call("export", h=tcp["h"], pid=importer.pid, close=True)
    got = importer.call("import", token=token)
    _check_same_socket(got, tcp)
    assert got["proto"] == socket.IPPROTO_TCP
    importer.call("close", h=got["h"])
    settle(exporter)
    settle(importer)


def test_export_by_descriptor_number(exporter: PeerProcess, importer: PeerProcess) -> None:
    """export_socket(int) works too and leaves the exporter's own fd alone."""
    lst = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                        listen=True)
    token = exporter.call("export", h=lst["h"], pid=importer.pid, as_fd=True)
    settle(exporter, 2)  # its own socket + the agent's duplicate
    got = importer.call("import", token=token)
    # From a bare fd the kind is read from the kernel: proto is IPPROTO_TCP, not 0.
    assert got["proto"] == lst["so_protocol"] == socket.IPPROTO_TCP
    _check_same_socket(got, {**lst, "proto": lst["so_protocol"]})
    settle(exporter, 1)
    assert exporter.call("info", h=lst["h"])["inode"] == lst["inode"]
    importer.call("close", h=got["h"])
    exporter.call("close", h=lst["h"])
    settle(exporter)
    settle(importer)


# --- blocking mode -------------------------------------------------------------------


def test_import_sets_blocking_mode_explicitly(exporter: PeerProcess, importer: PeerProcess) -> None:
    """blocking=True clears O_NONBLOCK even when the exporter's socket had it set; the
    flag lives on the open file description, so the exporter's copy changes too."""
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True, blocking=False)
    assert s["nonblock"] is True
    assert s["timeout"] == 0.0
    got = importer.call("import", token=exporter.call("export", h=s["h"], pid=importer.pid))
    _check_blocking(got)
    assert exporter.call("info", h=s["h"])["nonblock"] is False  # shared flag

    got2 = importer.call("import", blocking=False,
                         token=exporter.call("export", h=s["h"], pid=importer.pid))
    assert got2["timeout"] == 0.0
    assert got2["nonblock"] is True
    assert exporter.call("info", h=s["h"])["nonblock"] is True  # shared flag
    assert importer.call("info", h=got["h"])["nonblock"] is True  # same description

    for h in (got["h"], got2["h"]):
        importer.call("close", h=h)
    exporter.call("close", h=s["h"])
    settle(exporter)
    settle(importer)


# --- the ways a token travels ---------------------------------------------------------


def test_token_through_file(exporter: PeerProcess, importer: PeerProcess, sockdir: str) -> None:
    path = os.path.join(sockdir, "token.txt")
    s = exporter.call("socket", family="unix", type="stream",
                      bind=os.path.join(sockdir, "l"), listen=True)
    exporter.call("export", h=s["h"], pid=importer.pid, close=True, file=path)
    with open(path, encoding="ascii") as f:
        _check_token_text(f.read().strip())
    got = importer.call("import", file=path)
    _check_same_socket(got, s)
    importer.call("close", h=got["h"])
    settle(exporter)
    settle(importer)


def test_token_through_env_var_across_exec(exporter: PeerProcess, importer: PeerProcess) -> None:
    """The importer re-executes itself (same pid) with the token in its environment; a
    socket it had imported before the exec is gone after it (close-on-exec)."""
    first = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                          listen=True)
    old = importer.call("import",
                        token=exporter.call("export", h=first["h"], pid=importer.pid, close=True))
    assert old["inode"] in socket_inodes(importer.pid)

    lst = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                        listen=True)
    token = exporter.call("export", h=lst["h"], pid=importer.pid, close=True)
    importer.send("exec", env={"SOCKSHARE_TOKEN": token}, var="SOCKSHARE_TOKEN")
    got = importer.reply()  # the first line of the re-executed image
    _check_same_socket(got, lst)
    _check_blocking(got)
    inodes = socket_inodes(importer.pid)
    assert old["inode"] not in inodes, "an imported socket survived exec"
    assert lst["inode"] in inodes
    settle(exporter)

    with _client("inet", tuple(lst["sockname"])) as c:
        conn = importer.call("accept", h=got["h"])
        c.sendall(b"ping")
        assert bytes.fromhex(importer.call("recv", h=conn["h"], n=4)) == b"ping"
        importer.call("close", h=conn["h"])
    importer.call("close", h=got["h"])
    settle(importer)


# --- refusals ------------------------------------------------------------------------


def test_wrong_process_is_refused(
    exporter: PeerProcess, importer: PeerProcess, self_agent: int
) -> None:
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    base, before = fd_count(), fd_table()
    # another process (this one) presents the token
    with pytest.raises(sockshare.WrongProcess):
        sockshare.import_socket(token, timeout=IO)
    # ... and one that rewrote the token's target pid: the agent checks SO_PEERCRED
    forged = encode_token(dataclasses.replace(decode_token(token), target_pid=os.getpid()))
    with pytest.raises(sockshare.WrongProcess):
        sockshare.import_socket(forged, timeout=IO)
    sockshare.close_agent_connections()  # the refusal left a pooled connection
    # ... and a third sibling, both ways
    other = PeerProcess()
    try:
        other.call("pid")
        other.baseline = fd_count(other.pid)
        _refused(other, token, sockshare.WrongProcess)
        forged = encode_token(dataclasses.replace(decode_token(token), target_pid=other.pid))
        _refused(other, forged, sockshare.WrongProcess)
        settle(other)
    finally:
        other.close()
    wait_fd_count("self", base, before=before, what="this test process")
    assert exporter.call("pending") == 1
    settle(exporter, 1)  # refusals do not consume the token
    got = importer.call("import", token=token)
    _check_same_socket(got, s)
    settle(exporter)
    importer.call("close", h=got["h"])
    settle(importer)


def test_token_is_single_use(exporter: PeerProcess, importer: PeerProcess) -> None:
    s = exporter.call("socket", family="unix", type="dgram")
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    got = importer.call("import", token=token)
    settle(exporter)
    _refused(importer, token, sockshare.TokenConsumed)
    importer.call("close", h=got["h"])
    settle(importer)
    settle(exporter)
    assert exporter.call("release", token=token) is False


def test_token_expires(exporter: PeerProcess, importer: PeerProcess) -> None:
    s = exporter.call("socket", family="inet", type="dgram", bind=["127.0.0.1", 0])
    token = exporter.call("export", h=s["h"], pid=importer.pid, ttl=0.3, close=True)
    assert exporter.call("pending") == 1
    settle(exporter, 1)
    # nobody imports: the agent's sweep closes the duplicate on its own
    deadline = time.monotonic() + 5
    while exporter.call("pending") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exporter.call("pending") == 0
    settle(exporter)
    _refused(importer, token, sockshare.TokenExpired)
    settle(importer)
    assert exporter.call("release", token=token) is False
    # a claim that races the sweep (expired, not yet swept) is refused the same way
    s = exporter.call("socket", family="inet", type="dgram", bind=["127.0.0.1", 0])
    token = exporter.call("export", h=s["h"], pid=importer.pid, ttl=0.05, close=True)
    time.sleep(0.1)
    _refused(importer, token, sockshare.TokenExpired)
    settle(exporter)
    settle(importer)


def test_release(exporter: PeerProcess, importer: PeerProcess) -> None:
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    settle(exporter, 1)
    assert importer.call("release", token=token) is False  # not the exporter
    assert exporter.call("pending") == 1
    assert exporter.call("release", token=token) is True
    assert exporter.call("pending") == 0
    settle(exporter)  # closed by release itself, right away
    assert exporter.call("release", token=token) is False
    err = _refused(importer, token, sockshare.TokenExpired)
    assert "released" in err.msg
    err = exporter.fails("release", token="ss1.garbage")
    assert err.name == "InvalidToken"
    settle(exporter)
    settle(importer)


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_exporter_gone(importer: PeerProcess, how: str) -> None:
    exp = PeerProcess()
    try:
        s = exp.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0], listen=True)
        token = exp.call("export", h=s["h"], pid=importer.pid, close=True)
        if how == "sigkill":
            exp.kill()
        else:
            exp.call("exit")
            exp.proc.wait(timeout=IO)
        _refused(importer, token, sockshare.ExporterGone)
    finally:
        exp.close()
    settle(importer)


def test_invalid_tokens(exporter: PeerProcess, importer: PeerProcess) -> None:
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    info = decode_token(token)
    mid = len(token) // 2
    flipped = token[:mid] + ("A" if token[mid] != "A" else "B") + token[mid + 1:]
    bad = {
        "garbled": flipped,
        "truncated": token[:-3],
        "truncated hard": token[:10],
        "prefix only": "ss1.",
        "wrong version": "ss2." + token[4:],
        "future version": "ss10." + token[4:],
        "not a token": "hello world",
        "empty": "",
        "not base64": "ss1.!!!!",
        "forged secret": encode_token(dataclasses.replace(info, secret=os.urandom(16))),
        "forged id": encode_token(dataclasses.replace(info, token_id=info.token_id ^ 1)),
        "unknown kind": encode_token(dataclasses.replace(info, kind=KIND_WINDOWS)),
    }
    for name, text in bad.items():
        err = _refused(importer, text, sockshare.InvalidToken)
        assert err.msg, name
        settle(importer)
        assert exporter.call("pending") == 1, name
    settle(exporter, 1)
    got = importer.call("import", token=token)  # none of that consumed the real token
    _check_same_socket(got, s)
    importer.call("close", h=got["h"])
    settle(exporter)
    settle(importer)


def test_error_classes() -> None:
    for cls in (sockshare.InvalidToken, sockshare.WrongProcess, sockshare.TokenConsumed,
                sockshare.TokenExpired, sockshare.ExporterGone):
        assert issubclass(cls, sockshare.TokenError)
        assert issubclass(cls, sockshare.SockshareError)
    assert issubclass(sockshare.InvalidToken, ValueError)
    with pytest.raises(sockshare.InvalidToken):
        sockshare.release("nope")
    with socket.socket() as s, pytest.raises(ValueError):
        sockshare.export_socket(s, os.getpid(), ttl=0)


def test_bad_exports_leave_nothing_open(self_agent: int) -> None:
    base = fd_count()
    with socket.socket() as s:
        with pytest.raises(ValueError):
            sockshare.export_socket(s, os.getpid(), ttl=-1)
        with pytest.raises(ValueError):
            sockshare.export_socket(s, 0)
        with pytest.raises(ValueError):
            sockshare.export_socket(s.fileno(), os.getpid(), ttl=0)
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError):
        sockshare.export_socket(closed, os.getpid())
    with open(os.devnull, "rb") as f, pytest.raises(OSError):
        sockshare.export_socket(f.fileno(), os.getpid())  # not a socket
    assert agent().pending() == 0
    wait_fd_count("self", base, what="this test process")


# --- the agent against a misbehaving importer (in this process) -------------------------


def _agent_conn(token: str) -> socket.socket:
    info = decode_token(token)
    assert info.address_kind == ADDR_ABSTRACT
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(IO)
    c.connect(b"\0" + info.address)
    return c


def _drain(c: socket.socket) -> tuple[bytes, list[int]]:
    data, fds = b"", list[int]()
    while True:
        chunk, anc, _flags, _ = c.recvmsg(4096, socket.CMSG_SPACE(16))
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.extend(int.from_bytes(cdata[i:i + 4], "little")
                           for i in range(0, len(cdata) - len(cdata) % 4, 4))
        if not chunk:
            return data, fds
        data += chunk


@pytest.mark.parametrize(
    "misdeed", ["claim+fd", "done+fd", "garbage+fd", "claim-twice", "hangup-after-grant"]
)
def test_agent_closes_what_a_bad_importer_leaves(self_agent: int, misdeed: str) -> None:
    """Descriptors a client attaches to frames that carry none, and the duplicate of a
    grant never confirmed, are closed by the agent (this process is the exporter)."""
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, os.getpid())
    info = decode_token(token)
    base, before = fd_count(), fd_table()  # includes the agent's duplicate
    claim = encode_frame(FrameType.CLAIM,
                         encode_claim(Claim(info.token_id, info.secret, os.getpid())))
    with _agent_conn(token) as c, open(os.devnull, "rb") as junk:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, junk.fileno().to_bytes(4, "little"))]
        if misdeed == "claim+fd":
            c.sendmsg([encode_frame(FrameType.CLAIM, claim[12:], nfds=1)], anc)
        elif misdeed == "done+fd":
            c.sendall(claim)
            c.sendmsg([encode_frame(FrameType.DONE, encode_done(info.token_id), nfds=1)], anc)
        elif misdeed == "garbage+fd":
            c.sendmsg([b"\xff" * 16], anc)
        elif misdeed == "claim-twice":
            c.sendall(claim + claim)
        else:
            c.sendall(claim)
        c.shutdown(socket.SHUT_WR)
        _data, fds = _drain(c)
        for fd in fds:  # a GRANT we provoked
            os.close(fd)
    sockshare.release(token)  # whatever is left of it
    assert agent().pending() == 0
    wait_fd_count("self", base - 1, before=before, what="this process (exporter)")


# --- no fd left behind, ever -----------------------------------------------------------


@pytest.mark.slow
def test_ten_thousand_cycles_leave_no_fd_behind() -> None:
    """10,000 exports/imports between siblings that pass tokens over a direct link."""
    x, y = socket.socketpair()
    exp = imp = None
    try:
        exp = PeerProcess(link=x)
        imp = PeerProcess(link=y)
        x.close()
        y.close()
        with socket.create_server(("127.0.0.1", 0)) as lst:
            conn = exp.call("socket", family="inet", type="stream",
                            connect=list(lst.getsockname()))
            srv, _ = lst.accept()
        with srv:
            srv.settimeout(IO)
            # warm-up: the agent's fds and the importer's lazy imports
            imp.send("loop_import", n=10)
            exp.call("loop_export", h=conn["h"], pid=imp.pid, n=10)
            imp.reply()
            # (settled: the agent closes its end of the importer's pooled connection
            # on its own thread, after the importer's reply)
            exp_base, imp_base = settled_fd_count(exp.pid), fd_count(imp.pid)
            exp_before, imp_before = fd_table(exp.pid), fd_table(imp.pid)

            n = 10_000
            imp.send("loop_import", n=n)
            elapsed = exp.call("loop_export", h=conn["h"], pid=imp.pid, n=n, wait=120)
            assert imp.reply(timeout=30) == [[int(socket.AF_INET), int(socket.SOCK_STREAM)]]
            wait_fd_count(exp.pid, exp_base, before=exp_before, what="exporter")
            wait_fd_count(imp.pid, imp_base, before=imp_before, what="importer")
            assert exp.call("pending") == 0
            assert elapsed < 60
            # the connection is still whole after 10,000 round trips of its descriptor
            exp.call("send", h=conn["h"], data=b"still here".hex())
            assert _recv_exact(srv, 10) == b"still here"
    finally:
        for p in (exp, imp):
            if p is not None:
                p.close()
        x.close()
        y.close()


# --- fork -----------------------------------------------------------------------------


def _agent_listener_inodes(pid: int) -> set[int]:
    """Inodes of the abstract UNIX sockets named after ``pid``'s export agent."""
    out = set()
    with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(f"@sockshare/{pid}/"):
                out.add(int(parts[6]))
    return out


def test_fork_after_export(exporter: PeerProcess, importer: PeerProcess, sockdir: str) -> None:
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    agent_inodes = _agent_listener_inodes(exporter.pid)
    assert len(agent_inodes) == 1
    assert s["inode"] in socket_inodes(exporter.pid)  # held by the agent only

    path = os.path.join(sockdir, "fork.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.settimeout(IO)
        lst.bind(path)
        lst.listen(1)
        child_pid = exporter.call("fork", path=path)
        conn, _ = lst.accept()
    child = PeerConnection(conn, child_pid)
    try:
        assert child.call("pid") == child_pid
        held = socket_inodes(child_pid)
        assert s["inode"] not in held, "the fork child holds the parent's exported duplicate"
        assert not held & agent_inodes, "the fork child holds the parent's agent listener"
        assert child.call("pending") == 0
        child.baseline = fd_count(child_pid)

        # the child exports its own socket; a sibling imports it from the child's agent
        cs = child.call("socket", family="unix", type="dgram")
        ctoken = child.call("export", h=cs["h"], pid=importer.pid, close=True)
        assert decode_token(ctoken).exporter_pid == child_pid
        got = importer.call("import", token=ctoken)
        _check_same_socket(got, cs)
        importer.call("close", h=got["h"])
        assert child.call("pending") == 0
        settle(child, AGENT_FDS)  # + its new agent's listener, wake pair, epoll

        # the child imports a token the parent made for it
        ps = exporter.call("socket", family="unix", type="dgram")
        got = child.call("import", token=exporter.call("export", h=ps["h"], pid=child_pid,
                                                      close=True))
        _check_same_socket(got, ps)
        child.call("close", h=got["h"])
        settle(child, AGENT_FDS)

        # the parent's token made before the fork still works, after the child is gone
        child.send("exit")
        child.reply()
    finally:
        child.close()
    assert exporter.call("waitpid", pid=child_pid) == 0
    got = importer.call("import", token=token)
    _check_same_socket(got, s)
    importer.call("close", h=got["h"])
    assert exporter.call("pending") == 0
    settle(exporter)
    settle(importer)
    reap(child_pid)


def _fork_peer(parent: PeerProcess, sockdir: str, name: str,
               uid: int | None = None) -> PeerConnection:
    """Fork ``parent``; return a handle on the child (which serves commands to us)."""
    path = os.path.join(sockdir, name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.settimeout(IO)
        lst.bind(path)
        lst.listen(1)
        pid = parent.call("fork", path=path, uid=uid)
        conn, _ = lst.accept()
    child = PeerConnection(conn, pid)
    assert child.call("pid") == pid
    return child


def _end_child(parent: PeerProcess, child: PeerConnection) -> None:
    try:
        child.send("exit")
        child.reply()
    finally:
        child.close()
    assert parent.call("waitpid", pid=child.pid) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_importer_uid_is_checked(exporter: PeerProcess, importer: PeerProcess,
                                 sockdir: str) -> None:
    """The agent hands sockets only to its own uid (or root), by SO_PEERCRED; the uid
    that counts is the one the exporter has when it exports, not when it started."""
    nobody = 65534
    imp_nobody = _fork_peer(importer, sockdir, "i.sock", uid=nobody)
    exp_nobody = _fork_peer(exporter, sockdir, "e.sock", uid=nobody)
    try:
        # root exporter -> importer running as nobody: refused, token not consumed
        s = exporter.call("socket", family="unix", type="dgram")
        token = exporter.call("export", h=s["h"], pid=imp_nobody.pid, close=True)
        err = imp_nobody.fails("import", token=token)
        assert err.name == "WrongProcess", err
        assert "uid" in err.msg
        assert exporter.call("release", token=token) is True
        settle(exporter)

        # exporter that dropped to nobody -> importer as nobody: same uid, accepted
        s = exp_nobody.call("socket", family="unix", type="dgram")
        token = exp_nobody.call("export", h=s["h"], pid=imp_nobody.pid, close=True)
        assert decode_token(token).exporter_uid == nobody
        got = imp_nobody.call("import", token=token)
        _check_same_socket(got, s)
        imp_nobody.call("close", h=got["h"])

        # ... and -> a root importer: root may import anything
        s = exp_nobody.call("socket", family="unix", type="dgram")
        got = importer.call("import", token=exp_nobody.call("export", h=s["h"],
                                                            pid=importer.pid, close=True))
        _check_same_socket(got, s)
        importer.call("close", h=got["h"])
        assert exp_nobody.call("pending") == 0
    finally:
        _end_child(importer, imp_nobody)
        _end_child(exporter, exp_nobody)
    settle(importer)
    settle(exporter)


def test_exporter_exec_drops_its_duplicates(exporter: PeerProcess,
                                            importer: PeerProcess) -> None:
    """After exec the agent is gone (ExporterGone) and so are its duplicates (CLOEXEC)."""
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    assert s["inode"] in socket_inodes(exporter.pid)
    exporter.send("exec", env={})
    assert exporter.reply() == exporter.pid  # the first line of the new image
    assert s["inode"] not in socket_inodes(exporter.pid)
    assert not _agent_listener_inodes(exporter.pid)
    err = _refused(importer, token, sockshare.ExporterGone)
    assert "exec" in err.msg
    settle(importer)


def _stop(pid: int) -> None:
    """SIGSTOP our child ``pid`` and wait (bounded) until all its threads are stopped:
    the signal is delivered asynchronously, and its agent thread could serve one more
    import."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + IO
    while time.monotonic() < deadline:
        states = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    states.add(f.read().rsplit(b")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states == {b"T"}:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def _agent_served(pid: int) -> None:
    """Wait (bounded) until ``pid``'s export agent has served every connection made to
    it: the only socket left with its address is its listener (/proc/net/unix lists a
    connection still in the accept queue, or accepted and not yet closed, under the
    listener's name too). ``pending()`` cannot tell: it says 1 while a CLAIM waits, 0
    while the agent serves it (the token is in flight), 1 again once it gave it back."""
    deadline = time.monotonic() + IO
    while time.monotonic() < deadline:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
            next(f)
            named = [line for line in f if f" @sockshare/{pid}/" in line]
        if len(named) == 1:
            return
        time.sleep(0.005)
    raise AssertionError(f"the export agent of pid {pid} still has connections: {named}")


def test_stopped_exporter_times_out_and_the_token_survives(
    exporter: PeerProcess, importer: PeerProcess,
) -> None:
    """An exporter that does not answer: ExporterGone after ``timeout``. When it runs
    again it finds the importer gone and gives the token back (the GRANT never arrived):
    a second import gets the connection, whole; then nothing is left open on either
    side. A token given back can still be released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
        lst.settimeout(IO)
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        conn = exporter.call("socket", family="inet", type="stream",
                             connect=list(lst.getsockname()))
        srv, _ = lst.accept()
    with srv:
        srv.settimeout(IO)
        token = exporter.call("export", h=conn["h"], pid=importer.pid, close=True)
        _stop(exporter.pid)
        try:
            t0 = time.monotonic()
            err = importer.fails("import", token=token, timeout=0.5)
            # alive but silent: an ExporterGone that says so, and a TimeoutError
            assert err.name == "ExporterTimeout", err
            assert {"ExporterGone", "TimeoutError"} <= set(err.mro)
            assert f"(pid {exporter.pid}) is alive" in err.msg
            assert time.monotonic() - t0 < 5
            settle(importer)
        finally:
            os.kill(exporter.pid, signal.SIGCONT)
        # The agent served the claim when it woke up, found the importer gone and kept
        # the socket for the next try (on its own thread: wait until it is done with
        # that connection; pending() alone says 1 before it starts, too)
        _agent_served(exporter.pid)
        assert exporter.call("pending") == 1
        got = importer.call("import", token=token, timeout=5)
        srv.sendall(b"still here;")
        assert bytes.fromhex(importer.call("recv", h=got["h"], n=11)) == b"still here;"
        importer.call("close", h=got["h"])
        assert srv.recv(1) == b""
        assert exporter.call("pending") == 0
        assert importer.fails("import", token=token).name == "TokenConsumed"

    # given back, then released: gone for good
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    token = exporter.call("export", h=s["h"], pid=importer.pid, close=True)
    _stop(exporter.pid)
    try:
        assert importer.fails("import", token=token, timeout=0.5).name == "ExporterTimeout"
    finally:
        os.kill(exporter.pid, signal.SIGCONT)
    _agent_served(exporter.pid)
    assert exporter.call("pending") == 1
    assert exporter.call("release", token=token) is True
    assert exporter.call("pending") == 0
    assert importer.fails("import", token=token).name == "TokenExpired"  # (released)
    settle(exporter)
    settle(importer)


def test_claim_to_a_gone_importer_never_takes_the_token(
    exporter: PeerProcess, importer: PeerProcess,
) -> None:
    """The CLAIMs a stopped exporter finds when it resumes come from importers that
    timed out and hung up: their GRANTs cannot be sent, and no token ever leaves the
    pending set -- ``pending()`` read all along never drops (a token in flight), and
    ``release()`` withdraws each token and says so (True)."""
    n = 64
    for _round in range(2):  # (a round without the fix sees a token in flight: 1 in 2)
        socks = [exporter.call("socket", family="unix", type="dgram") for _ in range(n)]
        tokens = [exporter.call("export", h=x["h"], pid=importer.pid, close=True)
                  for x in socks]
        _stop(exporter.pid)
        try:
            got = importer.call("import_many", tokens=tokens, threads=32, timeout=0.3)
            assert got == [["ExporterTimeout"]] * n
            # read by the exporter's main thread as soon as it resumes, while its agent
            # serves those CLAIMs
            exporter.send("watch_pending", seconds=0.2)
        finally:
            os.kill(exporter.pid, signal.SIGCONT)
        assert exporter.reply() == [n]
        _agent_served(exporter.pid)
        assert [exporter.call("release", token=t) for t in tokens] == [True] * n
        assert exporter.call("pending") == 0
    settle(exporter)
    settle(importer)


def test_concurrent_imports(exporter: PeerProcess, importer: PeerProcess) -> None:
    """32 tokens imported at once from 8 threads, plus a second importer process."""
    other = PeerProcess()
    try:
        other.call("pid")
        other.baseline = fd_count(other.pid)
        socks = [exporter.call("socket", family="unix", type="dgram") for _ in range(48)]
        mine = [exporter.call("export", h=x["h"], pid=importer.pid, close=True)
                for x in socks[:32]]
        theirs = [exporter.call("export", h=x["h"], pid=other.pid, close=True)
                  for x in socks[32:]]
        assert exporter.call("pending") == 48
        importer.send("import_many", tokens=mine + mine[:4])  # 4 duplicates: consumed
        other.send("import_many", tokens=theirs, threads=4)
        got_mine, got_theirs = importer.reply(), other.reply()
        inodes = {x["inode"] for x in socks}
        ok = [g for g in got_mine + got_theirs if len(g) == 3]
        assert len(ok) == 48
        assert {g[2] for g in ok} == inodes
        assert sorted(g[0] for g in got_mine if len(g) == 1) == ["TokenConsumed"] * 4
        assert exporter.call("pending") == 0
        settle(exporter)
        settle(importer)
        settle(other)
    finally:
        other.close()


# --- pidfd_getfd (sockshare.backends._pidfd) -------------------------------------------

PIDFD_OK, PIDFD_WHY = _pidfd.available()
needs_pidfd = pytest.mark.skipif(not PIDFD_OK, reason=f"pidfd_getfd: {PIDFD_WHY}")


@needs_pidfd
def test_pidfd_getfd_pulls_a_socket_from_a_sibling(
    exporter: PeerProcess, importer: PeerProcess
) -> None:
    s = exporter.call("socket", family="inet", type="stream", bind=["127.0.0.1", 0],
                      listen=True)
    got = importer.call("pidfd_getfd", pid=exporter.pid, fd=s["fd"])
    # same inode; close-on-exec set by the kernel; proto as the kernel reports it
    _check_same_socket(got, {**s, "proto": s["so_protocol"]})
    importer.call("close", h=got["h"])
    exporter.call("close", h=s["h"])
    settle(importer)
    settle(exporter)


@needs_pidfd
def test_pidfd_getfd_in_this_process(exporter: PeerProcess) -> None:
    s = exporter.call("socket", family="unix", type="dgram")
    base = fd_count()
    fd = _pidfd.getfd(exporter.pid, s["fd"])
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)
        assert os.fstat(fd).st_ino == s["inode"]
    finally:
        os.close(fd)
    with pytest.raises(OSError) as bad:
        _pidfd.getfd(exporter.pid, 999_999)
    assert bad.value.errno == errno.EBADF
    gone = PeerProcess()
    gone_pid = gone.pid
    gone.kill()
    gone.close()
    with pytest.raises(ProcessLookupError):
        _pidfd.getfd(gone_pid, 0)
    with pytest.raises(ValueError):
        _pidfd.getfd(0, 0)
    assert fd_count() == base


@needs_pidfd
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_pidfd_getfd_without_ptrace_rights(exporter: PeerProcess, importer: PeerProcess,
                                           sockdir: str) -> None:
    """A process without ptrace rights over the target gets BackendUnavailable (EPERM)."""
    s = exporter.call("socket", family="unix", type="dgram")
    nobody = _fork_peer(importer, sockdir, "n.sock", uid=65534)
    try:
        base = fd_count(nobody.pid)
        err = nobody.fails("pidfd_getfd", pid=exporter.pid, fd=s["fd"])
        assert err.name == "BackendUnavailable", err
        assert "SockshareError" in err.mro
        assert "EPERM" in err.msg
        assert "ptrace" in err.msg
        assert fd_count(nobody.pid) == base  # the pidfd was closed
    finally:
        _end_child(importer, nobody)
    exporter.call("close", h=s["h"])
    settle(importer)


def test_windows_token_is_refused_on_posix() -> None:
    blob = TokenInfo(KIND_WINDOWS, 1, os.getpid(), 7, b"s" * 16, 0, agent_port=1, blob=b"x")
    with pytest.raises(sockshare.InvalidToken):
        sockshare.import_socket(encode_token(blob), timeout=IO)


FORK_STORM = r"""
import os, socket, stat, subprocess, sys, threading
import sockshare

IMPORTER = '''
import sys, sockshare
for line in sys.stdin:
    sockshare.import_socket(line.strip(), timeout=10).close()
    print("ok", flush=True)
'''
imp = subprocess.Popen([sys.executable, "-c", IMPORTER], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
sock.listen()
inode = os.fstat(sock.fileno()).st_ino
stop = threading.Event()
cycles = 0

def churn():
    global cycles
    while not stop.is_set():
        token = sockshare.export_socket(sock, imp.pid)            # imported
        imp.stdin.write(token + "\n")
        imp.stdin.flush()
        assert imp.stdout.readline().strip() == "ok"
        sockshare.release(sockshare.export_socket(sock, imp.pid))  # released
        sockshare.export_socket(sock, imp.pid, ttl=0.001)           # expires
        cycles += 1

def copies():
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        n += stat.S_ISSOCK(st.st_mode) and st.st_ino == inode
    return n

thread = threading.Thread(target=churn)
thread.start()
bad = []
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(min(copies(), 100))  # the original only: 1
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 1:
        bad.append(os.waitstatus_to_exitcode(status))
stop.set()
thread.join()
imp.stdin.close()
imp.wait(10)
print(cycles, bad)
"""


def test_fork_during_exports_never_leaks_a_duplicate_into_the_child(tmp_path: Path) -> None:
    """os.fork() while another thread exports, imports, releases and lets tokens expire
    as fast as it can: every child holds the exported socket exactly once (its inherited
    original), never one of the agent's duplicates, whatever the agent was doing."""
    script = tmp_path / "storm.py"
    script.write_text(FORK_STORM)
    out = subprocess.run([sys.executable, str(script), "500"], capture_output=True, text=True, check=False,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    cycles, bad = out.stdout.split(" ", 1)
    assert int(cycles) > 20, out.stdout
    assert bad.strip() == "[]", f"children with a leaked duplicate (copies held): {bad}"
