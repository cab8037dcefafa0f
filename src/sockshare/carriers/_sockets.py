"""Socket carriers: ``unix://`` and ``tcp://`` streams, ``unixgram://`` and ``udp://`` datagrams.

In every socket carrier the reader owns the address: it binds (and for UNIX sockets
creates the socket file, owner-only, and removes it on close); writers connect to it.
A writer that finds nobody there gets :class:`~sockshare.CarrierNotFound` at once.

Streams (``unix``, ``tcp``) frame each message with a 4-byte big-endian length. The
reader accepts any number of writers, each on its own connection, so messages from
different writers never mix; a frame cut short (a writer died or timed out mid-send)
is thrown away whole. A writer whose send timed out halfway drops its connection (the
stream cannot be resynchronised) and reconnects on the next send.

``unixgram`` maps one message to one datagram: the kernel keeps boundaries and order
and applies back-pressure (a full reader queue makes ``send`` wait), so it is reliable.

``udp`` is the only facility that may drop or duplicate. Each datagram carries a
writer session id and a sequence number; the reader acknowledges every one and
discards duplicates, and ``send`` returns only once the reader has acknowledged
(retransmitting with exponential backoff until the timeout). That makes delivery
exactly-once and in order per writer while the reader lives, at the price of one round
trip per message. A :class:`~sockshare.CarrierTimeout` from ``send`` means "not
confirmed": the reader may or may not have the message.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import selectors
import socket
import stat
import struct
import sys
import time
import urllib.parse
from typing import Any

from sockshare._errors import (
    CarrierClosed,
    CarrierError,
    CarrierInUse,
    CarrierNotFound,
    CarrierPermission,
    CarrierTimeout,
)
from sockshare.carriers._base import Carrier, Deadline, FileCarrier, full_or_timeout, os_error, wait_fd

__all__ = ["TcpCarrier", "UdpCarrier", "UnixCarrier", "UnixgramCarrier"]

_LEN = struct.Struct("!I")
_CHUNK = 256 * 1024
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def _af_unix() -> socket.AddressFamily:
    if sys.platform == "win32":  # CPython for Windows has no AF_UNIX
        raise CarrierError("UNIX-domain sockets are not available in this Python")
    return socket.AF_UNIX


def _no_create_choice(carrier: Carrier, create: bool | None) -> None:
    if create is not None and create != (carrier.mode == "r"):
        raise ValueError(
            f"{carrier.scheme}://: the reader always binds the address and writers always "
            "connect; create= cannot change that"
        )


def _error(exc: OSError, what: str, refused: type[CarrierError] = CarrierNotFound) -> CarrierError:
    if isinstance(exc, TimeoutError):
        return CarrierTimeout(f"{what}: timed out")
    return os_error(exc.errno or 0, what, refused=refused)


# --- addresses -------------------------------------------------------------------------


def _unix_path(parts: urllib.parse.SplitResult) -> str:
    if parts.netloc:
        raise ValueError(f"{parts.scheme}:// takes a path (unix:///tmp/x.sock), not a host {parts.netloc!r}")
    path = urllib.parse.unquote(parts.path)
    if not path:
        raise ValueError(f"{parts.scheme}:// needs a socket path")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise ValueError(f"UNIX socket path longer than {_UNIX_PATH_MAX} bytes: {path!r}")
    return path


def _inet_address(
    parts: urllib.parse.SplitResult, kind: socket.SocketKind
) -> tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]:
    if parts.path not in ("", "/"):
        raise ValueError(f"{parts.scheme}:// takes host:port only, not a path {parts.path!r}")
    host, port = parts.hostname, parts.port  # .port raises ValueError if malformed
    if not host or port is None:
        raise ValueError(f"{parts.scheme}:// needs host:port, e.g. {parts.scheme}://127.0.0.1:9000")
    try:
        infos = socket.getaddrinfo(host, port, 0, kind)
    except socket.gaierror as exc:
        raise CarrierNotFound(f"{parts.scheme}://{parts.netloc}: {exc.strerror}") from exc
    family, _, _, _, addr = infos[0]
    return family, addr  # type: ignore[return-value]


def _inet_url(scheme: str, addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host = addr[0]
    return f"{scheme}://[{host}]:{addr[1]}" if ":" in host else f"{scheme}://{host}:{addr[1]}"


def _clear_stale_unix(path: str, kind: socket.SocketKind) -> None:
    """Remove a socket file nobody listens on; refuse one in use or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise CarrierInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(_af_unix(), kind)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:  # a leftover of a reader that died: ours to replace
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except PermissionError as exc:
        raise CarrierPermission(f"{path}: {exc.strerror}") from exc
    except OSError:
        pass  # wrong socket type, backlog full...: someone is there
    finally:
        probe.close()
    raise CarrierInUse(f"{path} is in use by another reader")


def _bind_unix_owner_only(sock: socket.socket, path: str, listen: bool) -> tuple[int, int]:
    """Bind ``sock`` to ``path`` so that only this user can ever connect to it.

    The socket is bound under a temporary name, restricted to mode 0600, and only then
    linked to ``path`` (``link`` fails if ``path`` exists, so two readers cannot both
    claim it). Returns the (device, inode) of the socket file, to remove only our own.
    """
    tmp = os.path.join(os.path.dirname(path) or ".", f".ss{secrets.token_hex(4)}")
    if len(os.fsencode(tmp)) > _UNIX_PATH_MAX:
        raise ValueError(f"the directory of {path!r} is too long for a UNIX socket path")
    try:
        sock.bind(tmp)
    except OSError as exc:
        raise _error(exc, f"bind {path}") from exc
    try:
        os.chmod(tmp, 0o600)
        if listen:
            sock.listen(128)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CarrierInUse(f"{path} is in use by another reader") from None
        except OSError as exc:
            raise _error(exc, f"bind {path}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    st = os.stat(path)
    return st.st_dev, st.st_ino


# --- streams ---------------------------------------------------------------------------


class _StreamCarrier(Carrier):
    """Length-prefixed frames over SOCK_STREAM; the reader multiplexes its writers."""

    #: 1 MiB: far above a token, small enough that a reader never buffers much.
    max_message = 1 << 20

    _listener: socket.socket | None = None
    _selector: selectors.BaseSelector | None = None
    _buffers: dict[socket.socket, bytearray] | None = None
    _ready: collections.deque[bytes] | None = None
    _sock: socket.socket | None = None

    def _new_socket(self) -> socket.socket:
        raise NotImplementedError

    def _bind(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _connect_to(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _reader_setup(self) -> None:
        self._listener = self._new_socket()
        self._bind(self._listener)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._buffers = {}
        self._ready = collections.deque()

    def _connect(self, deadline: Deadline) -> socket.socket:
        sock = self._new_socket()
        try:
            sock.settimeout(deadline.remaining())
            try:
                self._connect_to(sock)
            except OSError as exc:
                raise _error(exc, f"connect {self.url}") from exc
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _peer_gone(self, sock: socket.socket) -> bool:
        """The reader never sends: anything readable on a writer's socket is EOF or reset."""
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _send(self, data: bytes, deadline: Deadline) -> None:
        sock = self._sock
        assert sock is not None
        if self._peer_gone(sock):
            raise self._give_up("the reader closed the connection")
        view = memoryview(_LEN.pack(len(data)) + data)
        sent = 0
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._give_up(f"the connection failed: {exc}") from exc
            if not wait_fd(sock.fileno(), write=True, timeout=deadline.remaining()):
                error = full_or_timeout(deadline, f"send to {self.url}")
                if sent:  # half a message is out: the stream cannot carry another one
                    self._give_up(
                        "a send ran out of time partway through a message (the reader "
                        "discards the fragment); open a new writer"
                    )
                raise error

    def _read_connection(self, conn: socket.socket) -> None:
        assert self._buffers is not None
        assert self._ready is not None
        try:
            chunk = conn.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # writer finished (or died): an incomplete frame is discarded
            self._forget(conn)
            return
        buf = self._buffers[conn]
        buf += chunk
        while len(buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(buf)
            if size > self.max_message:  # not one of ours: drop this writer
                self._forget(conn)
                return
            end = _LEN.size + size
            if len(buf) < end:
                break
            self._ready.append(bytes(buf[_LEN.size : end]))
            del buf[:end]

    def _forget(self, conn: socket.socket) -> None:
        assert self._selector is not None
        assert self._buffers is not None
        self._selector.unregister(conn)
        del self._buffers[conn]
        conn.close()

    def _accept(self) -> None:
        assert self._listener is not None
        assert self._selector is not None
        assert self._buffers is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED, EMFILE: keep serving the others
                return
            conn.setblocking(False)
            self._selector.register(conn, selectors.EVENT_READ)
            self._buffers[conn] = bytearray()

    def _recv(self, deadline: Deadline) -> bytes:
        assert self._selector is not None
        assert self._ready is not None
        while not self._ready:
            events = self._selector.select(deadline.remaining())
            for key, _ in events:
                if key.fileobj is self._listener:
                    self._accept()
                else:
                    self._read_connection(key.fileobj)  # type: ignore[arg-type]
            if not self._ready and deadline.expired():
                raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s")
        return self._ready.popleft()

    def _release(self) -> None:
        if self._buffers:
            for conn in list(self._buffers):
                conn.close()
            self._buffers.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _UnixFile(FileCarrier):
    """A carrier on a UNIX socket file that the reader binds."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not hasattr(socket, "AF_UNIX"):
            return "this Python has no AF_UNIX sockets"
        return None


class UnixCarrier(_UnixFile, _StreamCarrier):
    """``unix:///path/to.sock``: a UNIX stream socket with length-prefixed messages.

    The reader creates the socket file (mode 0600: only this user can connect) and
    removes it on close; a leftover file from a reader that died is replaced.
    """

    scheme = "unix"

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        _no_create_choice(self, create)
        self._path = _unix_path(parts)
        if self.mode == "r":
            _clear_stale_unix(self._path, socket.SOCK_STREAM)
            self._owner = True
            self._reader_setup()
        else:
            self._sock = self._connect(deadline)

    def _new_socket(self) -> socket.socket:
        return socket.socket(_af_unix(), socket.SOCK_STREAM)

    def _bind(self, sock: socket.socket) -> None:
        self._ident = _bind_unix_owner_only(sock, self._path, listen=True)

    def _connect_to(self, sock: socket.socket) -> None:
        sock.connect(self._path)

    def _release(self) -> None:
        super()._release()
        self._remove_file()


class TcpCarrier(_StreamCarrier):
    """``tcp://host:port``: TCP with length-prefixed messages (port 0 in a reader URL picks
    a free port; :attr:`url` then shows it). Any local user can connect: prefer a
    UNIX-domain carrier when that matters.
    """

    scheme = "tcp"
    _family = socket.AF_INET
    _address: tuple[str, int] | tuple[str, int, int, int] = ("", 0)

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        _no_create_choice(self, create)
        self._family, self._address = _inet_address(parts, socket.SOCK_STREAM)
        if self.mode == "r":
            self._owner = True
            self._reader_setup()
            assert self._listener is not None
            self.url = _inet_url(self.scheme, self._listener.getsockname())
        else:
            self._sock = self._connect(deadline)

    def _new_socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _bind(self, sock: socket.socket) -> None:
        if os.name != "nt":  # on Windows SO_REUSEADDR would allow stealing the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(self._address)
        except OSError as exc:
            raise _error(exc, f"bind {self.url}") from exc
        sock.listen(128)

    def _connect_to(self, sock: socket.socket) -> None:
        sock.connect(self._address)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _loopback_reason(socket.SOCK_STREAM)


def _loopback_reason(kind: socket.SocketKind) -> str | None:
    try:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", 0))
    except OSError as exc:
        return f"cannot bind 127.0.0.1: {exc}"
    return None


# --- datagrams -------------------------------------------------------------------------


class UnixgramCarrier(_UnixFile):
    """``unixgram:///path/to.sock``: one message per UNIX datagram.

    Reliable and ordered; when the reader's queue is full (``net.unix.max_dgram_qlen``
    datagrams) ``send`` waits. The reader creates the socket file (0600) and removes it.
    """

    scheme = "unixgram"
    #: 64 KiB, well inside the default socket send buffer (212 992 bytes on Linux).
    max_message = 1 << 16

    _sock: socket.socket | None = None

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        _no_create_choice(self, create)
        self._path = _unix_path(parts)
        self._sock = socket.socket(_af_unix(), socket.SOCK_DGRAM)
        if self.mode == "r":
            _clear_stale_unix(self._path, socket.SOCK_DGRAM)
            self._owner = True
            self._ident = _bind_unix_owner_only(self._sock, self._path, listen=False)
        else:
            if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 4 * self.max_message:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * self.max_message)
            self._connect()
        self._sock.setblocking(False)

    def _connect(self) -> None:
        assert self._sock is not None
        try:
            self._sock.connect(self._path)
        except OSError as exc:
            raise _error(exc, f"connect {self.url}") from exc

    def _send(self, data: bytes, deadline: Deadline) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                sock.send(data)
                return
            except BlockingIOError:
                pass
            except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError) as exc:
                raise self._give_up("the reader is gone") from exc
            except OSError as exc:
                raise _error(exc, f"send to {self.url}", refused=CarrierClosed) from exc
            if not wait_fd(sock.fileno(), write=True, timeout=deadline.remaining()):
                raise full_or_timeout(deadline, f"send to {self.url}")

    def _recv(self, deadline: Deadline) -> bytes:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(self.max_message + 1)
            except BlockingIOError:
                if not wait_fd(self._sock.fileno(), write=False, timeout=deadline.remaining()):
                    raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s") from None
                continue
            if len(data) <= self.max_message:
                return data
            # an oversized datagram is not one of ours: skip it

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._remove_file()


_UDP = struct.Struct("!BQQQ")  # kind, writer session id, sequence number, window base
_DATA, _ACK, _HELLO = 1, 2, 3
_UDP_FIRST_RTO = 0.02
_UDP_MAX_RTO = 1.0
_UDP_WINDOW = 64  # unacknowledged messages a writer may have in flight
_UDP_WINDOW_BYTES = 128 * 1024  # ... and their payload bytes (fits a default receive buffer)
_UDP_SESSIONS = 4096  # writers a reader remembers for duplicate detection
_UDP_PROBE = 0.05  # how long opening a writer listens for "port unreachable"
_UDP_LINGER = 1.0  # how long close() waits for outstanding acknowledgements


class _Inflight:
    """A sent, not yet acknowledged datagram and when to resend it."""

    __slots__ = ("due", "packet", "rto")

    def __init__(self, packet: bytes, due: float) -> None:
        self.packet = packet
        self.rto = _UDP_FIRST_RTO
        self.due = due


class _Session:
    """What a reader knows of one writer: the next sequence number to deliver, and
    datagrams that arrived ahead of it."""

    __slots__ = ("expected", "pending")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.pending: dict[int, bytes] = {}


class UdpCarrier(Carrier):
    """``udp://host:port``: one message per datagram, with acknowledgements.

    A small sliding-window protocol makes UDP as dependable as the other carriers: each
    datagram carries the writer's random session id and a sequence number; the reader
    acknowledges every datagram, drops duplicates and delivers in order per writer. A
    writer keeps up to 64 messages (128 KiB) unacknowledged and resends them with
    exponential backoff (20 ms up to 1 s) whenever it next sends, waits for room, or
    closes; ``send`` waits only when that window is full (:class:`~sockshare.CarrierFull`
    with ``timeout=0``). ``close`` waits up to 1 s for outstanding acknowledgements.

    Opening a writer sends a hello and listens 50 ms for ICMP "port unreachable", so a
    missing reader is reported at once, like a refused TCP connect. Any local user can
    send to the port.
    """

    scheme = "udp"
    #: The largest IPv4 UDP payload (65 507) less the 25-byte carrier header.
    max_message = 65507 - _UDP.size

    _sock: socket.socket | None = None
    # reader
    _sessions: collections.OrderedDict[tuple[tuple[Any, ...], int], _Session] | None = None
    _ready: collections.deque[bytes] | None = None
    # writer
    _inflight: dict[int, _Inflight] | None = None
    _inflight_bytes = 0
    _session = 0
    _next_seq = 1

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        _no_create_choice(self, create)
        family, address = _inet_address(parts, socket.SOCK_DGRAM)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        if self.mode == "r":
            self._owner = True
            try:
                self._sock.bind(address)
            except OSError as exc:
                raise _error(exc, f"bind {self.url}") from exc
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            self.url = _inet_url(self.scheme, self._sock.getsockname())
            self._sessions = collections.OrderedDict()
            self._ready = collections.deque()
            self._sock.setblocking(False)
            return
        self._sock.connect(address)
        self._sock.setblocking(False)
        self._session = secrets.randbits(64)
        self._inflight = {}
        self._transmit(_UDP.pack(_HELLO, self._session, 0, 1))
        probe = deadline.remaining()
        if wait_fd(
            self._sock.fileno(), write=False, timeout=_UDP_PROBE if probe is None else min(probe, _UDP_PROBE)
        ):
            self._poll_acks()  # raises CarrierNotFound on "port unreachable"

    # -- writer -----------------------------------------------------------------------

    def _peer_error(self, exc: OSError) -> CarrierError:
        if isinstance(exc, ConnectionRefusedError):  # ICMP port unreachable
            if self._closed:  # still opening
                return CarrierNotFound(f"{self.url}: nobody listens there")
            if self._inflight:
                self._inflight.clear()  # nobody to resend to: do not linger on close
            return self._give_up("the reader is gone (port unreachable)")
        return _error(exc, f"send to {self.url}", refused=CarrierClosed)

    def _transmit(self, packet: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.send(packet)
        except BlockingIOError:
            pass  # send buffer full: as good as lost, resent later
        except OSError as exc:
            raise self._peer_error(exc) from exc

    def _poll_acks(self) -> None:
        assert self._sock is not None
        assert self._inflight is not None
        while True:
            try:
                reply = self._sock.recv(64)
            except BlockingIOError:
                return
            except OSError as exc:
                raise self._peer_error(exc) from exc
            if len(reply) == _UDP.size:
                kind, session, seq, _ = _UDP.unpack(reply)
                if kind == _ACK and session == self._session:
                    done = self._inflight.pop(seq, None)
                    if done is not None:
                        self._inflight_bytes -= len(done.packet) - _UDP.size

    def _resend_due(self) -> float | None:
        """Resend what is overdue; return when the next resend falls due (or None)."""
        assert self._inflight is not None
        now = time.monotonic()
        next_due: float | None = None
        for item in self._inflight.values():
            if item.due <= now:
                self._transmit(item.packet)
                item.rto = min(item.rto * 2, _UDP_MAX_RTO)
                item.due = now + item.rto
            if next_due is None or item.due < next_due:
                next_due = item.due
        return next_due

    def _service(self, deadline: Deadline, room_for: int | None) -> bool:
        """Process acknowledgements and resends until there is room for ``room_for``
        payload bytes (``None``: until nothing is in flight). False if the deadline came."""
        assert self._sock is not None
        assert self._inflight is not None
        while True:
            self._poll_acks()
            next_due = self._resend_due()
            inflight = self._inflight
            if room_for is None:
                if not inflight:
                    return True
            elif not inflight or (
                len(inflight) < _UDP_WINDOW and self._inflight_bytes + room_for <= _UDP_WINDOW_BYTES
            ):
                return True
            if deadline.expired():
                return False
            wait = deadline.remaining()
            if next_due is not None:
                until_due = max(0.0, next_due - time.monotonic())
                wait = until_due if wait is None else min(wait, until_due)
            wait_fd(self._sock.fileno(), write=False, timeout=wait)

    def _send(self, data: bytes, deadline: Deadline) -> None:
        assert self._inflight is not None
        if not self._service(deadline, len(data)):
            raise full_or_timeout(deadline, f"send to {self.url} (window of unacknowledged messages)")
        seq = self._next_seq
        self._next_seq += 1
        base = min(self._inflight, default=seq)
        packet = _UDP.pack(_DATA, self._session, seq, base) + data
        self._inflight[seq] = _Inflight(packet, time.monotonic() + _UDP_FIRST_RTO)
        self._inflight_bytes += len(data)
        self._transmit(packet)

    # -- reader -----------------------------------------------------------------------

    def _accept_packet(self, packet: bytes, addr: tuple[Any, ...]) -> None:
        """Acknowledge, deduplicate and order one datagram from a writer."""
        assert self._sock is not None
        assert self._sessions is not None
        assert self._ready is not None
        if len(packet) < _UDP.size:
            return
        kind, session_id, seq, base = _UDP.unpack_from(packet)
        if kind not in (_DATA, _HELLO) or len(packet) - _UDP.size > self.max_message:
            return  # not one of ours
        key = (addr, session_id)
        session = self._sessions.get(key)
        if session is None:
            session = _Session(expected=base)  # every seq below base was acknowledged
            self._sessions[key] = session
            if len(self._sessions) > _UDP_SESSIONS:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(key)
        if kind == _DATA:
            if seq >= session.expected + 4 * _UDP_WINDOW:
                return  # too far ahead to hold: no ack, it will come again
            if seq >= session.expected:
                session.pending.setdefault(seq, packet[_UDP.size :])
                while session.expected in session.pending:
                    self._ready.append(session.pending.pop(session.expected))
                    session.expected += 1
        with contextlib.suppress(OSError):
            self._sock.sendto(_UDP.pack(_ACK, session_id, seq, 0), addr)

    def _recv(self, deadline: Deadline) -> bytes:
        assert self._sock is not None
        assert self._ready is not None
        sock = self._sock
        while not self._ready:
            try:
                packet, addr = sock.recvfrom(65536)
            except BlockingIOError:
                if not wait_fd(sock.fileno(), write=False, timeout=deadline.remaining()):
                    raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s") from None
                continue
            except OSError:  # an ICMP error for an acknowledgement to a writer gone
                continue
            self._accept_packet(packet, addr)
            if not self._ready and deadline.expired():  # only duplicates or strays so far
                raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s")
        return self._ready.popleft()

    def _release(self) -> None:
        if self._sock is not None and self._inflight:
            with contextlib.suppress(CarrierError):  # best effort: the reader may be gone
                self._service(Deadline(_UDP_LINGER), None)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _loopback_reason(socket.SOCK_DGRAM)
