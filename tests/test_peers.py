"""Interop: the C and PHP example peers (examples/c, examples/php) against the Python
channel, with real TCP clients on 127.0.0.1 and channel sockets in a private tmp dir.

* Python sender -> C/PHP worker: the client sees the worker's reply with the exact
  pre-read bytes and its echo; tickets are accepted; ``{"reject": true}`` comes back
  rejected with the socket still usable by Python; a batch of three (one rejected)
  gets one REJECT and one ACCEPT; the worker holds no extra descriptor at the end.
* C/PHP sender -> Python receiver: data and meta arrive, ``accept()`` (or
  ``reject()``) and the client talks with Python (or with the sender again).
* Bad input: hostile bytes and descriptors into a Python receiver raise
  ChannelBroken caused by RemoteProtocolError, and no descriptor leaks; every invalid
  frame of tests/vectors/frames.json into a C/PHP worker makes it report the vector's
  reason, send an ERROR frame and exit without leaking; a C worker at its fd limit
  sees MSG_CTRUNC.
* The C and PHP codecs pass the shared vectors (examples/*/vectors); the close report a
  C/PHP worker sends under ``sockshare serve`` is, byte for byte, the ``closed-foreign``
  CONTROL vector of tests/vectors/controls.json.

Tests need ``cc``+``make`` (marker ``cc``) or ``php`` with ext/sockets (marker ``php``);
without them they skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

import sockshare
from sockshare import ChannelBroken, RemoteProtocolError, SockshareError
from sockshare.backends._scm import send_with_fds
from sockshare.protocol import (
    FLAG_ACK,
    ErrorCode,
    FrameDecoder,
    FrameType,
    HandoffEntry,
    Hello,
    SocketKind,
    decode_error,
    decode_hello,
    encode_frame,
    encode_handoff,
    encode_hello,
)
from sockshare.server import _messages

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="the C and PHP peers are Linux programs"),
]

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "examples" / "c"
PHP_DIR = ROOT / "examples" / "php"
VECTORS = ROOT / "tests" / "vectors" / "frames.json"
CONTROL_VECTORS = ROOT / "tests" / "vectors" / "controls.json"
IN_CI = os.environ.get("CI") == "true"
TIMEOUT = 10.0

LANGS = [pytest.param("c", marks=pytest.mark.cc, id="c"),
         pytest.param("php", marks=pytest.mark.php, id="php")]
LABEL = {"c": "C", "php": "PHP"}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _unavailable(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{message} (CI=true: interop tests may not be skipped)", pytrace=False)
    pytest.skip(message)


# --- building and starting the peers ------------------------------------------------------


@pytest.fixture(scope="module")
def c_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/c built with make (cc -O2 -Wall -Wextra -Werror) into a tmp dir."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    make = shutil.which("make")
    if cc is None or make is None:
        _unavailable("install a C compiler and make (apt-get install gcc make)")
    out = tmp_path_factory.mktemp("sockshare-c")
    proc = subprocess.run([make, "-s", "-C", str(C_DIR), f"O={out}", f"CC={cc}"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"building examples/c failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def php_bin() -> str:
    php = shutil.which("php")
    if php is None:
        _unavailable("install php-cli (apt-get install php-cli)")
    mods = subprocess.run([php, "-m"], capture_output=True, text=True, timeout=30,
                          check=False).stdout.split()
    missing = [m for m in ("sockets", "posix", "json") if m not in mods]
    if missing:
        _unavailable(f"php-cli lacks the {', '.join(missing)} extension(s) "
                     "(Debian's php-cli has them built in)")
    return php


class Peer:
    """A peer program we started; stdout read line by line with deadlines."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._buf = b""
        self.stderr = ""

    def readline(self, timeout: float = TIMEOUT) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                raise AssertionError(f"{self.argv[0]} printed nothing in {timeout} s: "
                                     f"{self._diagnose()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"{self.argv[0]} ended early: {self._diagnose()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, list[str]]:
        """Wait for the exit; return the status and the stdout lines not read yet."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.argv[0]} did not exit: {self._diagnose()}") from None
        self.stderr = err.decode(errors="replace")
        lines = (self._buf + out).decode(errors="replace").splitlines()
        self._buf = b""
        return self.proc.returncode, lines

    def _diagnose(self) -> str:
        self.kill()
        return f"exit status {self.proc.returncode}, stderr: {self.stderr!r}"

    def kill(self) -> None:
        """End it (our own child, by pid) and collect what it wrote to stderr."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
            _, err = self.proc.communicate(timeout=5)
            self.stderr += (err or b"").decode(errors="replace")
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str]], Peer]]:
    started: list[Peer] = []

    def start(argv: list[str]) -> Peer:
        peer = Peer(argv)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.kill()


@pytest.fixture
def program(request: pytest.FixtureRequest) -> Callable[[str, str], list[str]]:
    """``program(lang, "worker"|"sender"|"vectors")`` -> argv, building/checking as needed."""

    def argv(lang: str, name: str) -> list[str]:
        if lang == "c":
            return [str(request.getfixturevalue("c_build") / name)]
        return [request.getfixturevalue("php_bin"), str(PHP_DIR / f"{name}.php")]

    return argv


# --- helpers ---------------------------------------------------------------------------------


def recv_line(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def recv_all(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything until the peer closes."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def recv_exact(sock: socket.socket, n: int, timeout: float = TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return out


class Clients:
    """Real TCP connections on 127.0.0.1: (client side, server side after its first line)."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.srv = stack.enter_context(socket.create_server(("127.0.0.1", 0)))

    def connect(self, first_line: bytes) -> tuple[socket.socket, socket.socket, bytes]:
        client = self.stack.enter_context(socket.create_connection(self.srv.getsockname(), 5))
        client.sendall(first_line)
        self.srv.settimeout(TIMEOUT)
        conn, _ = self.srv.accept()
        pre = recv_line(conn)  # what the sender "already read" from the connection
        assert pre == first_line
        return client, conn, pre


def parse_fields(line: str) -> dict[str, str]:
    """``"ready pid=1 fds=4"`` -> {"pid": "1", "fds": "4"}."""
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


# --- Python sender -> C / PHP worker ---------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_python_sender_to_worker(lang: str, program: Callable[[str, str], list[str]],
                                 spawn: Callable[[list[str]], Peer], sock_dir: Path) -> None:
    argv = program(lang, "worker")
    label = LABEL[lang]
    before = fd_count()
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(sockshare.Channel.listen(sock_dir / "ch"))
        worker = spawn([*argv, str(sock_dir / "ch")])
        ch = stack.enter_context(lst.accept(timeout=TIMEOUT))
        ready = parse_fields(worker.readline())
        assert (ch.peer.pid, ch.peer.name) == (worker.pid, f"{lang}-worker")
        assert ch.peer.features == 0x5  # SCM_RIGHTS | acks
        assert int(ready["pid"]) == worker.pid
        assert int(ready["peer"]) == os.getpid()
        clients = Clients(stack)

        def expected(pre: bytes, route: str, echo: bytes) -> bytes:
            return (f"{label} worker {worker.pid} got {len(pre)} pre-read bytes: ".encode()
                    + pre + f"; meta route={route}\n".encode() + echo)

        # accepted: the worker owns the connection, serves it from the pre-read bytes on
        client, conn, pre = clients.connect("GET /chat HTTP/1.1 ü\n".encode())
        ticket = ch.send(conn, meta={"route": "/chat"}, data=pre)
        assert ticket.wait(TIMEOUT)
        assert ticket.state == "accepted"
        assert ticket.socket is None  # Python closed its copy on ACCEPT
        client.sendall(b"echo me\n")
        assert recv_all(client) == expected(pre, "/chat", b"echo me\n")

        # rejected: Python keeps a working connection
        client, conn, pre = clients.connect(b"GET /full\n")
        ticket = ch.send(conn, meta={"reject": True, "route": "/full"}, data=pre)
        assert not ticket.wait(TIMEOUT)
        assert (ticket.state, ticket.reason) == ("rejected", "the metadata asked for a reject")
        assert ticket.socket is not None
        ticket.socket.sendall(b"python kept it\n")
        assert recv_line(client) == b"python kept it\n"
        client.sendall(b"still python?\n")
        assert recv_line(ticket.socket) == b"still python?\n"
        ticket.socket.close()

        # a batch in one frame: one REJECT, then one ACCEPT for the other two
        trio = [clients.connect(b"GET /b%d\n" % i) for i in range(3)]
        tickets = ch.send_many([(conn, {"route": f"/b{i}", "reject": i == 1}, pre)
                                for i, (_, conn, pre) in enumerate(trio)])
        assert [t.wait(TIMEOUT) for t in tickets] == [True, False, True]
        assert tickets[1].socket is not None
        tickets[1].socket.close()
        for i in (0, 2):
            client, _, pre = trio[i]
            client.sendall(b"e%d\n" % i)
            assert recv_all(client) == expected(pre, f"/b{i}", b"e%d\n" % i)
        assert ch.counters["accepted"] == 3
        assert ch.counters["rejected"] == 2

        ch.close()  # BYE
        status, lines = worker.finish()
        assert status == 0, worker.stderr
        assert lines[-1] == f"bye fds={ready['fds']}", "the worker leaked descriptors"
        assert "rejected" in " ".join(lines)
        assert lines.count(f"served {tickets[0].id}") == 1
    assert fd_count() == before


# --- C / PHP sender -> Python receiver -------------------------------------------------------


@pytest.mark.parametrize("answer", ["accept", "reject"])
@pytest.mark.parametrize("lang", LANGS)
def test_sender_to_python_receiver(lang: str, answer: str,
                                   program: Callable[[str, str], list[str]],
                                   spawn: Callable[[list[str]], Peer], sock_dir: Path) -> None:
    argv = program(lang, "sender")
    before = fd_count()
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(sockshare.Channel.listen(sock_dir / "ch"))
        sender = spawn([*argv, str(sock_dir / "ch")])
        port = int(sender.readline().split()[1])
        client = stack.enter_context(socket.create_connection(("127.0.0.1", port), 5))
        client.sendall(b"GET /from-peer HTTP/1.1\n")
        ch = stack.enter_context(lst.accept(timeout=TIMEOUT))
        assert (ch.peer.pid, ch.peer.name) == (sender.pid, f"{lang}-sender")
        h = ch.receive(timeout=TIMEOUT)
        stack.callback(h.socket.close)
        assert h.data == b"GET /from-peer HTTP/1.1\n"
        assert h.meta == {"from": lang}
        assert h.acked
        assert h.socket.type == socket.SOCK_STREAM
        assert h.socket.getpeername() == client.getsockname()
        if answer == "accept":
            h.accept()
            status, lines = sender.finish()
            assert status == 0, sender.stderr
            assert lines[0] == f"accepted {h.id}"
            # the sender closed its copy and is gone: the client talks with Python
            h.socket.sendall(b"python got it\n")
            assert recv_line(client) == b"python got it\n"
            client.sendall(b"ping\n")
            assert recv_line(h.socket) == b"ping\n"
        else:
            h.reject("busy now")
            assert recv_line(client) == f"{LABEL[lang]} sender kept it: busy now\n".encode()
            status, lines = sender.finish()
            assert status == 0, sender.stderr
            assert lines[0] == "rejected busy now"
        assert lines[-1].startswith("done fds=")
        with pytest.raises(sockshare.ChannelEnded, match="BYE"):
            ch.receive(timeout=TIMEOUT)
    assert fd_count() == before


# --- bad input into a Python receiver --------------------------------------------------------


def _entry_frame(kind: SocketKind, *, count_fds: int = 1, meta: bytes = b'{"a":1}',
                 data: bytes = b"hi", hid: int = 7) -> bytes:
    payload = encode_handoff([HandoffEntry(hid, kind, meta, data)])
    return encode_frame(FrameType.HANDOFF, payload, flags=FLAG_ACK, nfds=count_fds)


TCP = SocketKind(int(socket.AF_INET), int(socket.SOCK_STREAM), 6)
UDP_CLAIM = SocketKind(int(socket.AF_INET), int(socket.SOCK_DGRAM), 0)

# name -> (bytes, what travels as fds: "sock" / "pipe", shut down the write side after)
HOSTILE: dict[str, tuple[bytes, list[str], bool]] = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [], False),
    "bad-version": (b"SS\x02\x03" + bytes(8), [], False),
    "oversized": (struct.pack(">2sBBBBHI", b"SS", 1, 0x20, 1, 1, 0, 2 << 20), ["sock"], False),
    "truncated": (_entry_frame(TCP)[:20], ["sock"], True),
    "missing-fd": (_entry_frame(TCP), [], False),
    "two-fds-one-entry": (_entry_frame(TCP, count_fds=2), ["sock", "sock"], False),
    "fd-on-accept": (encode_frame(FrameType.ACCEPT, struct.pack(">HQ", 1, 1), nfds=1),
                     ["sock"], False),
    "stray-fd-on-control": (encode_frame(FrameType.CONTROL, b"{}"), ["sock"], False),
    "pipe-not-socket": (_entry_frame(TCP), ["pipe"], False),
    "pipe-in-a-batch": (encode_frame(FrameType.HANDOFF, encode_handoff(
        [HandoffEntry(7, TCP, b"", b""), HandoffEntry(8, TCP, b"", b"")]), nfds=2),
        ["sock", "pipe"], False),
    "wrong-socket-type": (_entry_frame(UDP_CLAIM), ["sock"], False),
    "trailing-bytes": (encode_frame(FrameType.HANDOFF, encode_handoff(
        [HandoffEntry(7, TCP, b"", b"")]) + b"\x00", nfds=1), ["sock"], False),
    "hello-again": (encode_frame(FrameType.HELLO, bytes(18)), [], False),
}


def _raw_peer(path: Path) -> socket.socket:
    """A hand-driven channel peer: connected, its HELLO already sent."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(path))
    raw.sendall(encode_frame(FrameType.HELLO, encode_hello(
        Hello(os.getpid(), os.getuid(), 1, 0x5, 1 << 20, "raw"))))
    return raw


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    head = recv_exact(sock, 12)
    (length,) = struct.unpack(">I", head[8:])
    return head[3], recv_exact(sock, length)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_python_receiver_refuses_bad_input(case: str, sock_dir: Path) -> None:
    data, fd_kinds, shut = HOSTILE[case]
    before = fd_count()
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(sockshare.Channel.listen(sock_dir / "ch"))
        raw = stack.enter_context(_raw_peer(sock_dir / "ch"))
        ch = stack.enter_context(lst.accept(timeout=TIMEOUT))
        assert _read_frame(raw)[0] == FrameType.HELLO
        fds = []
        for kind in fd_kinds:
            if kind == "pipe":
                r, w = os.pipe()
                stack.callback(os.close, r)
                stack.callback(os.close, w)
                fds.append(r)
            else:
                fds.append(stack.enter_context(socket.socket()).fileno())
        send_with_fds(raw, data, fds)
        if shut:
            raw.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelBroken) as info:
            ch.receive(timeout=TIMEOUT)
        assert isinstance(info.value, SockshareError)
        assert isinstance(info.value.__cause__, RemoteProtocolError), repr(info.value.__cause__)
    assert fd_count() == before, "a descriptor of the hostile peer was left open"


def test_python_receiver_takes_a_handoff_sent_right_after_hello(sock_dir: Path) -> None:
    """A peer may send HELLO and a HANDOFF without waiting: the listener's handshake
    must not swallow the HANDOFF's descriptor (regression: it read past the HELLO)."""
    before = fd_count()
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(sockshare.Channel.listen(sock_dir / "ch"))
        raw = stack.enter_context(_raw_peer(sock_dir / "ch"))
        a, b = socket.socketpair()
        stack.enter_context(a)
        stack.enter_context(b)
        send_with_fds(raw, _entry_frame(SocketKind.of(a)), [a.fileno()])
        ch = stack.enter_context(lst.accept(timeout=TIMEOUT))
        h = ch.receive(timeout=TIMEOUT)
        stack.callback(h.socket.close)
        assert (h.id, h.data, h.meta) == (7, b"hi", {"a": 1})
        h.socket.sendall(b"x")
        assert b.recv(1) == b"x"
    assert fd_count() == before


# --- bad input into a C / PHP worker ---------------------------------------------------------


def _raw_dispatcher(stack: contextlib.ExitStack, path: Path, spawn: Callable[[list[str]], Peer],
                    argv: list[str], name: str) -> tuple[Peer, socket.socket, dict[str, str]]:
    """A worker (``argv`` + the socket path) connected to a raw listener at ``path``
    that answers its HELLO (as ``name``): the worker, the connection, and the fields of
    the worker's "ready" line."""
    srv = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    srv.bind(str(path))
    srv.listen()
    worker = spawn([*argv, str(path)])
    srv.settimeout(TIMEOUT)
    conn, _ = srv.accept()
    stack.enter_context(conn)
    ftype, payload = _read_frame(conn)
    assert ftype == FrameType.HELLO
    assert decode_hello(payload).pid == worker.pid
    conn.sendall(encode_frame(FrameType.HELLO, encode_hello(
        Hello(os.getpid(), os.getuid(), 1, 0x5, 1 << 20, name))))
    return worker, conn, parse_fields(worker.readline())

_DOC = json.loads(VECTORS.read_text(encoding="utf-8"))
# every invalid vector a worker can meet after the handshake (HELLO vectors are about
# the handshake; a receiver's limit is the default one)
WORKER_VECTORS = [v for v in _DOC["vectors"] if not v["valid"]
                  and not v["hex"].startswith("53530101") and v["max_payload"] == 1 << 20]


def _worker_reason(v: dict[str, Any]) -> str:
    """A worker never sent a handoff: any ACCEPT/REJECT is an unexpected frame to it."""
    raw = bytes.fromhex(v["hex"])
    if v["layer"] != "frame" and raw[3] in (FrameType.ACCEPT, FrameType.REJECT):
        return "unexpected-frame"
    return str(v["reason"])


@pytest.mark.parametrize("v", WORKER_VECTORS, ids=lambda v: v["name"])
@pytest.mark.parametrize("lang", LANGS)
def test_worker_refuses_bad_input(lang: str, v: dict[str, Any],
                                  program: Callable[[str, str], list[str]],
                                  spawn: Callable[[list[str]], Peer], sock_dir: Path) -> None:
    argv = program(lang, "worker")
    with contextlib.ExitStack() as stack:
        worker, conn, ready = _raw_dispatcher(stack, sock_dir / "raw", spawn, argv, "raw-listener")
        fds = [stack.enter_context(socket.socket()).fileno() for _ in range(v["fds"])]
        send_with_fds(conn, bytes.fromhex(v["hex"]), fds)
        if v["eof"]:
            conn.shutdown(socket.SHUT_WR)
        status, lines = worker.finish()
        reason = _worker_reason(v)
        assert status == 1, f"exit {status}; stdout {lines}; stderr {worker.stderr!r}"
        assert reason in worker.stderr
        assert lines[-1] == f"bye fds={ready['fds']}", "the worker leaked descriptors"
        # and it told us why, in an ERROR frame
        dec = FrameDecoder(allow_fds=False)
        dec.feed(recv_all(conn))
        frame = dec.next_frame()
        assert frame is not None
        assert frame.type == FrameType.ERROR
        err = decode_error(frame.payload)
        assert err.code == ErrorCode.PROTOCOL
        assert reason in err.text


@pytest.mark.cc
def test_c_worker_at_its_fd_limit_sees_ctrunc(program: Callable[[str, str], list[str]],
                                              spawn: Callable[[list[str]], Peer],
                                              sock_dir: Path) -> None:
    """RLIMIT_NOFILE leaves room for one received fd: a 3-socket HANDOFF arrives
    truncated (MSG_CTRUNC); the worker closes the one that came and gives up, and the
    Python sender gets its three sockets back."""
    argv = program("c", "worker")
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(sockshare.Channel.listen(sock_dir / "ch"))
        # fds 0-2 and the channel socket are open: a limit of 5 admits exactly one more
        worker = spawn(["sh", "-c", 'ulimit -n 5 && exec "$0" "$@"', *argv, str(sock_dir / "ch")])
        ch = stack.enter_context(lst.accept(timeout=TIMEOUT))
        ready = parse_fields(worker.readline())
        assert ready["fds"] == "4"
        clients = Clients(stack)
        trio = [clients.connect(b"GET /%d\n" % i) for i in range(3)]
        tickets = ch.send_many([(conn, {"route": "/x"}, pre) for _, conn, pre in trio])
        status, lines = worker.finish()
        assert status == 1, worker.stderr
        assert "fds-truncated" in worker.stderr
        assert lines[-1] == "bye fds=4"
        with pytest.raises(ChannelBroken):
            ch.receive(timeout=TIMEOUT)
        assert [t.state for t in tickets] == ["returned"] * 3
        for t, (client, _, _) in zip(tickets, trio, strict=True):
            assert t.socket is not None
            t.socket.sendall(b"back to python\n")
            assert recv_line(client) == b"back to python\n"
            t.socket.close()


# --- the shared vectors, checked by the C and PHP codecs ------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_peer_codec_passes_the_vectors(lang: str, program: Callable[[str, str], list[str]]) -> None:
    proc = subprocess.run([*program(lang, "vectors"), str(VECTORS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(_DOC['vectors'])} vectors, 0 failures" in proc.stdout


@pytest.mark.parametrize("lang", LANGS)
def test_worker_close_report_is_the_shared_vector(lang: str,
                                                  program: Callable[[str, str], list[str]],
                                                  spawn: Callable[[list[str]], Peer],
                                                  sock_dir: Path) -> None:
    """Under ``sockshare serve`` (SOCKSHARE_WORKER_ID set) a C/PHP worker reports the
    connections of a HANDOFF frame it served in one CONTROL frame: exactly the bytes of
    the ``closed-foreign`` vector (``{"ev":"closed","n":2}``), which the dispatcher's
    codec decodes to ``Closed(2)``."""
    vectors = json.loads(CONTROL_VECTORS.read_text(encoding="utf-8"))["vectors"]
    vector = next(v for v in vectors if v["name"] == "closed-foreign")
    argv = program(lang, "worker")
    with contextlib.ExitStack() as stack:
        worker, conn, ready = _raw_dispatcher(stack, sock_dir / "raw", spawn,
                                              ["env", "SOCKSHARE_WORKER_ID=1", *argv], "raw-dispatcher")
        pairs = [socket.socketpair() for _ in range(2)]
        for a, b in pairs:
            stack.enter_context(a)
            stack.enter_context(b)
            a.sendall(b"hi\n")   # the line the worker echoes before it closes
        kind = SocketKind(socket.AF_UNIX, socket.SOCK_STREAM, 0)
        entries = [HandoffEntry(i + 1, kind, b'{"route":"/v"}', b"GET /v\n") for i in range(2)]
        send_with_fds(conn, encode_frame(FrameType.HANDOFF, encode_handoff(entries),
                                         flags=FLAG_ACK, nfds=2), [b.fileno() for _a, b in pairs])
        for _a, b in pairs:
            b.close()   # (the worker has its own copies)
        frames: list[tuple[int, bytes]] = []
        while not frames or frames[-1][0] != FrameType.CONTROL:
            frames.append(_read_frame(conn))
        assert {t for t, _p in frames[:-1]} == {FrameType.ACCEPT}
        payload = frames[-1][1]
        assert (encode_frame(FrameType.CONTROL, payload).hex(), payload.decode()) == (
            vector["hex"], vector["payload"])
        assert _messages.decode(payload) == _messages.Closed(2)
        conn.sendall(encode_frame(FrameType.BYE))
        status, lines = worker.finish()
        assert status == 0, worker.stderr
        assert lines[-1] == f"bye fds={ready['fds']}", "the worker leaked descriptors"
