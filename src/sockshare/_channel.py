"""The handoff channel: many live connections per second between two processes.

A token moves one socket over any IPC; a :class:`Channel` is the hot path a server uses
to hand over thousands of connections a second between two processes that stay
connected. Each handoff carries the socket, JSON metadata and the bytes the sender
already read from it, and (by default) is *acknowledged*: the sender keeps its copy
until the receiver accepts; a reject, or a receiver that dies before answering, gives
the socket back to the sender as a :class:`Ticket` in state ``"rejected"`` or
``"returned"`` that it can act on (re-dispatch).

The wire exchange (docs/protocol.md, "Channel")::

    both sides      HELLO (version, pid, uid, features, max payload)
    sender          HANDOFF [flags: ACK] (n entries, n fds)    -->
    receiver        ACCEPT (ids...) | REJECT (id, reason)       <--
    either side     BYE, then close

The channel is symmetric: either end may send handoffs. The protocol itself -- the
handshake, tickets, answers, BYE, the close sequence -- is the I/O-free
:class:`sockshare._state.ChannelState`; this module is its blocking adapter
(:class:`Channel`, which only moves bytes and descriptors), the listener
(:class:`ChannelListener`) and address parsing. :mod:`sockshare._aio` is the asyncio
adapter over the same state.

Transports: a UNIX stream socket (a path, or ``@name`` in the Linux abstract
namespace), descriptors by SCM_RIGHTS; on Windows, loopback TCP (``tcp://127.0.0.1:PORT``)
with sockets moved as WSAPROTOCOL_INFO blobs for the receiver's pid learnt in HELLO.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from sockshare import _fast
from sockshare._errors import (
    ChannelBroken,
    ChannelClosed,
    ChannelEnded,
    ChannelError,
    ChannelPermission,
    ChannelTimeout,
    LocalProtocolError,
    PeerRefused,
    RemoteProtocolError,
    SockshareError,
)
from sockshare._state import (
    BATCH,
    NO_FDS,
    SINGLE_MIN,
    ChannelState,
    Handoff,
    PeerInfo,
    Policy,
    StateView,
    Ticket,
    error_frame,
)
from sockshare.backends._fds import FAST_WRAP, socket_type
from sockshare.backends._scm import (
    CMSG_SPACE_MAX,
    MSG_DONTWAIT,
    RECV_FLAGS,
    close_fds,
    fds_from_ancillary_cut,
    peer_credentials,
    recv_with_fds,
    wait_ready,
)
from sockshare.protocol import FLAG_ACK, MAX_PAYLOAD

__all__ = ["NO_FDS", "Channel", "ChannelListener", "Handoff", "PeerInfo", "Ticket"]

log = logging.getLogger("sockshare.channel")

IS_WINDOWS = sys.platform == "win32"
#: Bytes asked for per read. Kept under glibc's mmap threshold: a 256 KiB request costs
#: an mmap/munmap pair per read (measured: 21 us instead of 2.4 us); at 64 KiB a plain
#: recvmsg (CPython shrinks the bytes in place) is 0.1 us cheaper than recvmsg_into
#: and a copy.
RECV_BUF = 64 * 1024
HANDSHAKE_TIMEOUT = 5.0
#: Bytes of frames one side may hold unwritten while its peer does not read: answers,
#: controls, BYE, the tail of a handoff frame. Answers and controls never wait for the
#: peer (they are queued); past this bound the side stops *reading* the peer's frames,
#: so it takes in no new handoffs to answer, until the peer reads again.
OUT_LIMIT = 1024 * 1024
#: A sender that only sends takes in its peer's answers every this many acked sends.
TAKE_IN_EVERY = 16
_AF_UNIX = getattr(socket, "AF_UNIX", -1)
_FD = struct.Struct("i")
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(getattr(socket, "SCM_RIGHTS", 1))
# received fds are close-on-exec by the kernel only where MSG_CMSG_CLOEXEC exists
_FAST_CLOEXEC = bool(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_BLOCKING_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
# recvmsg reports MSG_CMSG_CLOEXEC back in its flags: only truncation matters
_TRUNCATED = int(getattr(socket, "MSG_CTRUNC", 0)) | int(getattr(socket, "MSG_TRUNC", 0))
_CTRUNC_FLAG = int(getattr(socket, "MSG_CTRUNC", 0))
_TRUNC_DATA = int(getattr(socket, "MSG_TRUNC", 0))
#: messages one compiled read takes in (sockshare._speedups.recv_batch: at most 32)
_BATCH_MSGS = 32
#: the received sockets' mode, as recv_batch takes it
_BLOCKING_CODE = {None: -1, False: 0, True: 1}
#: the class the compiled receive makes sockets of, when checked_socket would do it in
#: its fast form (else None: the Python path makes them)
_SOCKET_CLASS = socket.socket if FAST_WRAP else None
_sock_type = socket_type


def read_leftovers(sock: socket.socket, state: ChannelState, answer: Any) -> None:
    """Process what the peer sent before the channel broke (a failed *write* breaks it
    too): an ACCEPT already in our receive buffer must count, or the handoff it answers
    would be "returned" -- and handed to someone else -- while the peer had taken it.
    Bounded; stops at the end of the data or at any error. Never waits. On a WSA (TCP)
    channel too: a worker killed right after its ACCEPT left resets the connection, and
    the dispatcher's next HANDOFF to it fails before its read callback ran."""
    if state.wsa:   # no recvmsg on Windows, no descriptors on TCP; no MSG_DONTWAIT either
        with contextlib.suppress(OSError):
            sock.setblocking(False)
    for _ in range(64):
        try:
            if state.wsa:
                data, fds = sock.recv(RECV_BUF), list[int]()
            else:
                data, fds = recv_with_fds(sock, RECV_BUF, MSG_DONTWAIT)
        except (OSError, SockshareError):
            return
        if not data and not fds:
            return
        try:
            state.receive_data(data, fds, answer)
        except (OSError, SockshareError, ValueError):
            return


def _own_ids() -> tuple[int, int]:
    """This process's pid and uid, as HELLO states them."""
    return os.getpid(), (os.getuid() if hasattr(os, "getuid") else 0)


#: the smallest ``max_payload`` a channel takes: room for a HELLO and a handoff or two
MIN_PAYLOAD = 1024


def check_max_payload(max_payload: int) -> None:
    """``max_payload`` (this side's limit, sent in its HELLO): an int from
    :data:`MIN_PAYLOAD` to ``MAX_PAYLOAD`` (docs/protocol.md: the upper bound of a frame),
    else :class:`~sockshare.LocalProtocolError`."""
    if type(max_payload) is not int or not MIN_PAYLOAD <= max_payload <= MAX_PAYLOAD:
        raise LocalProtocolError(f"max_payload must be an int from {MIN_PAYLOAD} to "
                                 f"{MAX_PAYLOAD}, not {max_payload!r}")


def new_state(sock: socket.socket, *, max_payload: int, name: str,
              blocking: bool | None) -> ChannelState:
    """The protocol state for a channel over ``sock`` (its transport decides SCM_RIGHTS
    or WSA blobs)."""
    check_max_payload(max_payload)
    wsa = sock.family != _AF_UNIX
    if wsa and not IS_WINDOWS:
        raise ChannelError("descriptors cannot travel over TCP on POSIX: use a UNIX socket address")
    pid, uid = _own_ids()
    return ChannelState(max_payload=max_payload, wsa=wsa, blocking=blocking, name=name,
                        pid=pid, uid=uid)


def credentials_of(sock: socket.socket) -> tuple[int, int] | None:
    """The kernel's pid and uid of the peer of a UNIX socket (None on TCP)."""
    if sock.family != _AF_UNIX:
        return None
    pid, uid, _gid = peer_credentials(sock)
    return pid, uid


def connect_error(exc: OSError, address: str | os.PathLike[str]) -> SockshareError | None:
    """What a failed connect to a channel address means to the user (None: as is)."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return ChannelError(f"nobody listens for handoffs at {os.fspath(address)!r}")
    if isinstance(exc, PermissionError):
        return ChannelPermission(
            f"this process (uid {os.getuid() if hasattr(os, 'getuid') else '?'}) may not "
            f"connect to {os.fspath(address)!r}: {exc.strerror}; the listener's owner "
            "decides who may (its file mode, allow_uids)")
    return None


# --- addresses ----------------------------------------------------------------------


def _parse_address(address: str | os.PathLike[str]) -> tuple[int, Any]:
    a = os.fspath(address)
    if a.startswith("tcp://"):
        host, _, port = a[6:].rpartition(":")
        host = host.strip("[]")
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        return fam, (host, int(port))
    if a.startswith("unix://"):
        a = a[7:]
    if IS_WINDOWS:
        raise ChannelError("on Windows a channel address is tcp://127.0.0.1:PORT")
    if a.startswith("@"):
        return socket.AF_UNIX, b"\0" + a[1:].encode()
    return socket.AF_UNIX, a


# --- the blocking channel ----------------------------------------------------------------


class Channel(StateView):
    """One end of a handoff channel (blocking form). Thread-safe for one sender thread
    and one receiver thread at a time.

    Make one with :meth:`connect`, :meth:`ChannelListener.accept` (via
    :meth:`Channel.listen`) or :meth:`pair`.
    """

    def __init__(
        self, sock: socket.socket, *, max_payload: int = MAX_PAYLOAD, name: str = "",
        _peer_checked: bool = False,
    ) -> None:
        self._sock = sock
        self._state = new_state(sock, max_payload=max_payload, name=name, blocking=True)
        self._wsa = self._state.wsa
        self._rlock = threading.RLock()
        self._wlock = threading.Lock()
        #: frames written as the socket takes them (answers, controls, BYE, the tail of
        #: a handoff frame), their size, and the lock that guards both
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._qlock = threading.Lock()
        self._poller: Any = None
        if hasattr(select, "poll"):
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)
        self._batching = False
        self._detached = False
        self._leftovers_read = False
        self._sends_unread = 0
        self._stream: bool | None = None  # (a SOCK_STREAM channel: known on first read)
        self._batch_msgs = 1  # messages the next compiled read takes in (_read_once_compiled)
        self.name = name
        #: Seconds a handoff send (or a control past ``OUT_LIMIT``) may wait for a peer
        #: that reads nothing: then :class:`~sockshare.ChannelTimeout`, never a silent
        #: hang. The channel stays usable.
        self.send_timeout: float | None = 30.0
        #: Seconds :meth:`close` waits for the peer's answers to pending handoffs.
        self.close_timeout: float = 5.0

    # -- construction ----------------------------------------------------------------

    @classmethod
    def listen(
        cls, address: str | os.PathLike[str], *, allow_uids: Iterable[int] | None = None,
        allow_pids: Iterable[int] | None = None, backlog: int = 128, mode: int = 0o600,
        max_payload: int = MAX_PAYLOAD, name: str = "",
    ) -> ChannelListener:
        """Listen for channel peers at ``address`` (a path, ``@abstract`` or ``tcp://``).

        By default only processes of this uid may connect; ``allow_uids`` and
        ``allow_pids`` narrow or widen that (pids are checked with the kernel's
        credentials of the connecting socket, not taken on trust).
        """
        return ChannelListener(address, allow_uids=allow_uids, allow_pids=allow_pids,
                               backlog=backlog, mode=mode, max_payload=max_payload, name=name)

    @classmethod
    def connect(
        cls, address: str | os.PathLike[str], *, timeout: float = HANDSHAKE_TIMEOUT,
        max_payload: int = MAX_PAYLOAD, name: str = "",
    ) -> Channel:
        """Connect to a listening channel and complete the handshake."""
        family, addr = _parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(addr)
            except OSError as exc:
                mapped = connect_error(exc, address)
                if mapped is None:
                    raise
                raise mapped from exc
            ch = cls(sock, max_payload=max_payload, name=name)
            ch._handshake(timeout, policy=None)
        except BaseException:
            sock.close()
            raise
        return ch

    @classmethod
    def pair(cls, *, max_payload: int = MAX_PAYLOAD) -> tuple[Channel, Channel]:
        """Two connected ends in this process (hand one to a child with pass_fds)."""
        check_max_payload(max_payload)
        a, b = socket.socketpair()
        try:
            ca, cb = cls(a, max_payload=max_payload), cls(b, max_payload=max_payload)
            for c in (ca, cb):
                c._sock.sendall(c._state.hello())
            for c in (ca, cb):
                c._handshake(HANDSHAKE_TIMEOUT, policy=None, send_hello=False)
        except BaseException:
            a.close()
            b.close()
            raise
        return ca, cb

    @classmethod
    def from_socket(cls, sock: socket.socket, *, max_payload: int = MAX_PAYLOAD,
                    name: str = "") -> Channel:
        """Wrap a connected socket (e.g. one end of a socketpair inherited by a child)."""
        ch = cls(sock, max_payload=max_payload, name=name)
        ch._handshake(HANDSHAKE_TIMEOUT, policy=None)
        return ch

    def _handshake(self, timeout: float, policy: Policy | None, send_hello: bool = True) -> None:
        """Exchange HELLOs (the decisions are the state's). With a ``policy`` (the
        listening side) the peer's HELLO is checked first and answered with our HELLO or
        an ERROR; otherwise we speak first."""
        sock, st = self._sock, self._state
        sock.settimeout(timeout)
        if send_hello and policy is None:
            try:
                sock.sendall(st.hello())
            except (BrokenPipeError, ConnectionResetError):
                # A listener that refuses us by our uid answers and hangs up before it
                # reads a byte: its ERROR frame is still ours to read, so read it.
                pass
        deadline = time.monotonic() + timeout
        done = False
        while not done:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(st.handshake_want())
            except TimeoutError:
                raise PeerRefused(f"the peer sent no HELLO within {timeout} s") from None
            except ConnectionResetError:
                data = b""
            done = st.handshake_data(data)
        to_send, why = st.handshake_done(credentials_of(sock), policy)
        if why:
            with contextlib.suppress(OSError):
                sock.sendall(to_send)
            raise PeerRefused(why)
        if to_send:
            sock.sendall(to_send)
        sock.settimeout(None)

    def _detach(self) -> tuple[socket.socket, ChannelState]:
        """Hand the socket and the protocol state over to another adapter
        (:meth:`AsyncChannel.wrap`); this object is inert from now on."""
        if self._poller is not None:
            self._poller.unregister(self._sock.fileno())
            self._poller = None
        self._detached = True
        return self._sock, self._state

    # -- properties (peer, counters, closed: StateView) -------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- writing -------------------------------------------------------------------
    #
    # Two kinds of frames leave this side. Handoffs wait for room in the socket (the
    # peer not reading them is the peer not calling into its channel), reading the
    # peer's frames meanwhile, up to ``send_timeout``. Everything else -- answers,
    # controls, BYE -- never waits: it goes into ``_out`` and is written as the socket
    # takes it, now or on this side's next call into the channel (every call flushes,
    # and every blocking wait also waits for room while ``_out`` is not empty). Frames
    # leave in the order they were queued; ``_wlock`` is held by whoever writes.

    def _try_send(self, view: memoryview, anc: list[tuple[int, int, bytes]] | None = None) -> int:
        """One write that never blocks: bytes sent, 0 if the socket is full."""
        try:
            if MSG_DONTWAIT:
                if anc:
                    return self._sock.sendmsg([view], anc, MSG_DONTWAIT)
                return self._sock.send(view, MSG_DONTWAIT)
            # Windows: no per-call flag; a reader waits in select() before recv(), so
            # switching the mode under it for one call is harmless
            previous = self._sock.gettimeout()
            self._sock.setblocking(False)
            try:
                return self._sock.send(view)
            finally:
                self._sock.settimeout(previous)
        except (BlockingIOError, InterruptedError):
            return 0

    def _queue(self, frame: bytes) -> None:
        """Queue a frame that must not wait for the peer, and write what fits now."""
        if self._state.broken is not None:
            return  # nothing more leaves a broken channel; the caller checks
        with self._qlock:
            self._out.append(memoryview(frame))
            self._out_bytes += len(frame)
        self._flush()

    def _flush(self) -> bool:
        """Write queued frames while the socket takes them, never waiting. True once the
        queue is empty. A write error breaks the channel (see ``_state.broken``)."""
        while self._out:
            if not self._wlock.acquire(blocking=False):
                return False  # its holder flushes the queue after its own frame
            try:
                done = self._flush_locked()
            finally:
                self._wlock.release()
            if not done:
                return False
        return True

    def _flush_locked(self) -> bool:
        """``_flush`` with ``_wlock`` held: False while the socket is full."""
        out = self._out
        while out:
            if len(out) > 1:  # several answers and controls: one write
                with self._qlock:
                    joined = memoryview(b"".join(out))
                    out.clear()
                    out.append(joined)
            view = out[0]
            try:
                sent = self._try_send(view)
            except OSError as exc:
                self._break(exc)
                self._drop_queue()
                return True
            if not sent:
                return False
            with self._qlock:
                self._out_bytes -= sent
                if sent < len(view):
                    out[0] = view[sent:]
                    return False
                out.popleft()
        return True

    def _send_handoff(self, frame: bytes, fds: list[int]) -> bool:
        """Write one handoff frame, its descriptors with its first byte, after the frames
        already queued. Waits for room (reading the peer's frames meanwhile) up to
        ``send_timeout``: False if not one byte could go by then (nothing was sent). Once
        the frame has started it is finished (see :meth:`_finish_locked`). Raises
        OSError if the peer is gone."""
        deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
        view = memoryview(frame)
        anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else None
        read_too = True
        with self._wlock:
            while True:
                sent = self._try_send(view, anc) if self._flush_locked() else 0
                if self._state.broken is not None:
                    raise ConnectionError(f"the channel broke: {self._state.broken}")
                if sent:
                    break
                room = self._wait_room(deadline, read_too)
                if room is None:
                    return False
                read_too = room
            if sent < len(view):
                self._finish_locked(view[sent:])
        if self._out:
            self._flush()
        return True

    def _finish_locked(self, view: memoryview) -> None:
        """Write the rest of a handoff frame that has started (``_wlock`` held): a frame
        is never left half-written, since nothing else may follow it on the stream until
        it ends. A peer that stops reading in its middle for ``send_timeout`` breaks the
        channel (OSError), as one that is gone does."""
        deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
        while view:
            sent = self._try_send(view)
            if sent:
                view = view[sent:]
                continue
            if self._state.broken is not None:
                raise ConnectionError(f"the channel broke: {self._state.broken}")
            if self._wait_room(deadline, True) is None:
                raise TimeoutError(
                    f"the peer stopped reading in the middle of a handoff frame for "
                    f"{self.send_timeout} s")

    def _send_failed(self, tickets: list[Ticket], exc: OSError) -> NoReturn:
        """A handoff send met a broken channel: its sockets are the caller's, and only
        through this exception (never also through :meth:`returned`)."""
        self._break(exc)
        self._state.unsend(tickets, exc)
        raise ChannelBroken(f"the peer is gone: {exc}") from exc

    def _send_timed_out(self, tickets: list[Ticket]) -> None:
        """Nothing of a handoff frame went: unregister its tickets. On Windows the frame
        already holds handles duplicated into the peer (``socket.share``), which a peer
        that goes on would keep: the channel is broken instead, so the peer closes them."""
        self._state.withdraw(tickets)
        if self._wsa:
            self._break(ChannelTimeout(
                f"the peer read nothing for {self.send_timeout} s with handles already "
                "duplicated into it: channel closed so that it closes them"))

    def _wait_room(self, deadline: float | None, read_too: bool) -> bool | None:
        """Wait until the socket has room, reading the peer's frames if it sends any (a
        peer blocked writing to us must make progress too). None once ``deadline``
        passed; otherwise whether reading here is still possible."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        paused = self._out_bytes > OUT_LIMIT
        writable, readable = wait_ready(self._sock, write=True, timeout=remaining,
                                        read_too=read_too and not paused)
        if readable and not paused and not self._drain():
            return False  # another thread reads: only wait for room from now on
        if not writable and not readable:
            return None
        return read_too

    def _drain(self) -> bool:
        """Read what the peer sent, if no other thread is reading. False if one is."""
        if not self._rlock.acquire(blocking=False):
            return False
        try:
            if self._state.broken is None:
                self._read_once(time.monotonic())
            return True
        finally:
            self._rlock.release()

    def _readable_now(self) -> bool:
        if self._poller is not None:
            return bool(self._poller.poll(0))
        return bool(select.select([self._sock], [], [], 0)[0])

    def _take_in(self) -> None:
        """Write what is queued and process what the peer has sent, without waiting:
        every call into the channel does this, so a side that only sends still learns
        of answers at once, and its peer's queued answers can leave."""
        if self._out:
            self._flush()
        if not self._rlock.acquire(blocking=False):
            return  # another thread is reading
        try:
            for _ in range(64):  # bounded: a peer sending without pause cannot hold us
                st = self._state
                if st.broken is not None or self._out_bytes > OUT_LIMIT or not self._readable_now():
                    break
                self._read_once(time.monotonic())
        finally:
            self._rlock.release()

    # -- sending -------------------------------------------------------------------

    def send(self, sock: socket.socket, *, meta: Any = None, data: bytes = b"",
             ack: bool = True) -> Ticket:
        """Hand ``sock`` to the peer with ``meta`` (JSON-compatible) and pre-read ``data``.

        The channel takes ownership of ``sock``. With ``ack=True`` the sender's copy
        stays open until the receiver accepts (``ticket.wait()``, ``ticket.result()``,
        or just later calls: every call takes in the answers that arrived); a reject or a
        broken channel hands it back in ``ticket.socket``. With ``ack=False`` it is
        closed as soon as it is sent (fire-and-forget).

        Waits only while the peer does not read its handoffs: up to ``send_timeout``,
        then :class:`~sockshare.ChannelTimeout`, with nothing sent and ``sock`` still
        the caller's (the channel stays usable).
        """
        st = self._state
        if st.broken is not None or st.closed or self._wsa or self._out:
            return self.send_many([(sock, meta, data)], ack=ack)[0]
        if st.tickets:
            # take in the answers that arrived, every TAKE_IN_EVERY acked sends (each look
            # is a syscall): the copies the receiver took are closed as we go, at most
            # that many sends late
            self._sends_unread += 1
            if self._sends_unread >= TAKE_IN_EVERY:
                self._sends_unread = 0
                if self._readable_now():
                    self._take_in()
        sp = _fast.speedups
        if sp is not None:  # the frame is encoded, packed and written in C
            if type(data) is not bytes:
                data = bytes(data)
            ticket = st.single_ticket(sock, meta, data, ack, self)
            sent = self._send_single_now(ticket, sp, ack, b"", -1)
            if sent < 0:  # not in C: the Python path encodes it, or says what is wrong
                st.withdraw([ticket])
                sp = None
            frame, fd = b"", -1
        if sp is None:
            frame, fd, ticket = st.single_frame(sock, meta, data, ack, self)
            sent = self._send_single_now(ticket, None, ack, frame, fd)
        if not sent:
            if not frame:
                frame, fd = st.frame_of(ticket, ack)
            try:
                ok = self._send_handoff(frame, [fd])
            except OSError as exc:
                self._send_failed([ticket], exc)
            if not ok:
                self._send_timed_out([ticket])
                raise ChannelTimeout(
                    f"the peer read no handoff for {self.send_timeout} s; nothing was sent "
                    "and the socket is still yours")
        st.sent_one(ticket)
        return ticket

    def _send_single_now(self, ticket: Ticket, sp: _fast.Speedups | None, ack: bool, frame: bytes,
                         fd: int) -> int:
        """The common case of :meth:`send`: one non-blocking write of the whole frame,
        when no other thread writes and nothing is queued (never into the middle of a
        queued frame); a frame that started is finished. 1 if it went, 0 if not
        (nothing sent), -1 if the compiled path ``sp`` does not take this handoff."""
        if not self._wlock.acquire(blocking=False):
            return 0
        sent: int | bytes = 0
        failed: OSError | None = None
        try:
            if not self._out:
                if sp is not None:
                    st = self._state
                    # (a fire-and-forget socket that went is closed in C, as socket.close does)
                    close = not ack and st.releases_default and _SOCKET_CLASS is not None
                    sent = sp.send_single(self._sock.fileno(), ticket.socket, FLAG_ACK if ack else 0,
                                          ticket.id, ticket.meta, ticket.data, st.peer_limit, close)
                    if sent == 1 and close:
                        ticket.socket = None
                    elif type(sent) is bytes:  # never leave a handoff half-written
                        self._finish_locked(memoryview(sent))
                        sent = 1
                else:
                    sent = self._sock.sendmsg([frame], [(_SOL_SOCKET, _SCM_RIGHTS, _FD.pack(fd))],
                                              MSG_DONTWAIT)
                    if 0 < sent < len(frame):  # never leave a handoff half-written
                        self._finish_locked(memoryview(frame)[sent:])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            failed = exc
        finally:
            self._wlock.release()
        if failed is not None:
            self._send_failed([ticket], failed)
        if self._out:
            self._flush()
        return sent  # type: ignore[return-value]  # (bytes became 1 above)

    def send_many(self, items: Iterable[tuple[socket.socket, Any, bytes]], *,
                  ack: bool = True) -> list[Ticket]:
        """Hand over many sockets at once: up to 64 per frame, one sendmsg per frame.

        On :class:`~sockshare.ChannelTimeout`, the exception's ``sent`` lists the
        tickets of the frames that went; the other sockets are still the caller's."""
        st = self._state
        st.check_usable()
        batch = list(items)
        if st.tickets or self._out:
            self._take_in()
        frames = st.handoff_frames(batch, ack, self)
        out: list[Ticket] = []
        for i, (frame, fds, tickets) in enumerate(frames):
            try:
                ok = self._send_handoff(frame, fds)
            except OSError as exc:
                st.withdraw([t for _f, _fds, ts in frames[i + 1:] for t in ts])
                self._send_failed(tickets, exc)
            if not ok:
                self._send_timed_out([t for _f, _fds, ts in frames[i:] for t in ts])
                raise ChannelTimeout(
                    f"the peer read no handoff for {self.send_timeout} s; {len(out)} of "
                    f"{len(batch)} handoffs went (see .sent), the other sockets are still yours",
                    out)
            st.sent(tickets)
            out.extend(tickets)
        return out

    def _send_raw(self, frame: bytes) -> None:
        """Queue an answer or a control (never waits); ChannelBroken if the channel broke."""
        self._queue(frame)
        if self._state.broken is not None:
            raise ChannelBroken(f"the peer is gone: {self._state.broken}") from self._state.broken

    def _answer(self, hid: int, reason: str | None) -> None:
        frame = self._state.answer(hid, reason, coalesce=self._batching)
        if frame is not None:
            self._send_raw(frame)
            if reason is None:   # an ACCEPT: written before the caller uses the socket
                self._wait_written()

    def _wait_written(self) -> None:
        """Return once every queued frame is written (an ACCEPT among them: accept
        before use means *written*, docs/protocol.md §5.3), reading the peer meanwhile.
        A peer that reads nothing for ``send_timeout`` breaks the channel: the ACCEPT
        never goes, the sender takes the connection back, and
        :class:`~sockshare.ChannelBroken` tells the caller not to serve its copy."""
        if not self._out:
            return
        deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
        read_too = True
        while not self._flush():
            if self._state.broken is not None:
                break
            room = self._wait_room(deadline, read_too)
            if room is None:
                exc = TimeoutError(f"the peer read nothing for {self.send_timeout} s: the "
                                   "ACCEPT could not be written")
                self._break(exc)
                raise ChannelBroken(f"{exc}; the channel is closed and the connection is "
                                    "the sender's again: close this copy") from exc
            read_too = room
        if self._state.broken is not None:
            raise ChannelBroken(f"the peer is gone: {self._state.broken}") from self._state.broken

    def accept_all(self, handoffs: Iterable[Handoff]) -> None:
        """Accept many handoffs with one ACCEPT frame (per 64), e.g. a whole batch from
        :meth:`receive_many`."""
        acked: list[Handoff] = []
        for h in handoffs:
            if not h.answered:
                if h.acked:
                    acked.append(h)
                else:  # fire-and-forget: nothing to send
                    h.answered = True
        if not acked:
            return
        self._batching = True
        try:
            for h in acked:
                h.accept()
        finally:
            self._batching = False
        self.flush()
        self._wait_written()

    def receive_many(self, max_count: int = BATCH, timeout: float | None = None) -> list[Handoff]:
        """Wait for at least one handoff; return up to ``max_count`` that are ready."""
        out = [self.receive(timeout)]
        if self._state.incoming:
            out.extend(self._state.take_received(max_count - 1))
        return out

    def flush(self) -> None:
        """Queue answers that are still coalescing, and write what the socket takes."""
        frame = self._state.take_accepts()
        if frame is not None and self._state.broken is None:
            self._send_raw(frame)
        elif self._out:
            self._flush()

    def send_control(self, obj: dict[str, Any]) -> None:
        """Send a small JSON control message (used by the server runtime).

        Never waits for the peer while this side holds less than ``OUT_LIMIT`` bytes it
        could not write yet; past that, waits for the peer to read, up to
        ``send_timeout`` (then :class:`~sockshare.ChannelTimeout`, nothing sent).
        Raises :class:`~sockshare.MessageTooLarge` (nothing sent, the channel stays up)
        for a message over the peer's limit (``peer.max_payload``)."""
        frame = self._state.control_frame(obj)
        if self._out_bytes > OUT_LIMIT:
            deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
            while self._out_bytes > OUT_LIMIT:
                self._state.check_usable()
                if self._wait_room(deadline, True) is None:
                    raise ChannelTimeout(
                        f"the peer has not read {self._out_bytes} bytes of this side's frames "
                        f"for {self.send_timeout} s; the control was not sent")
                self._flush()
        self._send_raw(frame)

    # -- receiving -----------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Handoff:
        """Wait for the next handoff from the peer.

        Raises :class:`~sockshare.ChannelEnded` once the peer said goodbye and every
        handoff it sent was taken, :class:`~sockshare.ChannelTimeout` after
        ``timeout``, :class:`~sockshare.ChannelBroken` if the peer went away without
        saying goodbye."""
        st = self._state
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rlock:
            while not st.incoming:
                if st.peer_said_bye or st.closed or st.broken is not None:
                    st.take_handoff()  # raises: the peer ended, or the channel did
                if st.pending_accepts:
                    self.flush()
                if not self._pump(deadline):
                    raise ChannelTimeout(f"no handoff arrived within {timeout} s")
            h = st.take_handoff()
            assert h is not None
            return h

    def __iter__(self) -> Iterator[Handoff]:
        """Yield handoffs until the peer ends the channel with BYE (a peer that goes
        away without it raises :class:`~sockshare.ChannelBroken`)."""
        while True:
            try:
                yield self.receive()
            except ChannelEnded:
                return

    def poll(self, timeout: float | None = 0.0) -> None:
        """Process whatever arrived (acks, rejects, handoffs) within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rlock:
            self._state.check_usable()
            self.flush()
            self._pump(deadline)

    def returned(self) -> list[Ticket]:
        """Tickets given back since the last call (rejected, or returned by a break).
        Takes in what the peer has sent first, without waiting."""
        st = self._state
        if st.broken is None and not st.closed and (st.tickets or self._out):
            self._take_in()
        return st.take_returned()

    def receive_control(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        st = self._state
        with self._rlock:
            while (obj := st.take_control()) is None:
                if not self._pump(deadline):
                    raise ChannelTimeout(f"no control message within {timeout} s")
            return obj

    def _wait_ticket(self, ticket: Ticket, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while ticket.state == "pending":
            if self._state.broken is not None or self._state.closed:
                return
            # another thread may be reading (in receive()): it updates the ticket, so
            # wait for the lock in short turns and look at the ticket in between
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChannelTimeout(f"handoff {ticket.id} not answered within {timeout} s")
            if not self._rlock.acquire(timeout=0.01 if left is None else min(left, 0.01)):
                continue
            try:
                if ticket.state == "pending" and self._state.broken is None and not self._state.closed:
                    self._pump(deadline)
            finally:
                self._rlock.release()

    def _pump(self, deadline: float | None) -> bool:
        """Wait until the peer sent something (and process it) or ``deadline``, writing
        queued frames as the socket takes them meanwhile. False on timeout."""
        if self._out and not self._flush() and self._state.broken is None:
            # the peer has not read all we queued: wait for room as well as for data
            # (past OUT_LIMIT only for room: no new handoffs to answer until it reads)
            paused = self._out_bytes > OUT_LIMIT
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            writable, readable = wait_ready(self._sock, write=True, timeout=remaining,
                                            read_too=not paused)
            if writable and not self._flush() and not readable and self._out:
                time.sleep(0.001)  # another thread holds the write side and will flush
            if not readable or paused:
                return writable
        return self._read_once(deadline)

    def _read_once_compiled(self, sp: _fast.Speedups, deadline: float | None) -> bool:
        """:meth:`_read_once` with sockshare._speedups: one recvmmsg takes in up to
        ``_BATCH_MSGS`` messages (a stream channel that is receiving single handoffs;
        otherwise one, with all of ``RECV_BUF``), and the whole one-socket HANDOFF
        frames among them become Handoffs in C (:meth:`ChannelState.receive_single`,
        ``checked_socket`` included); the other messages go the Python way, in order."""
        st = self._state
        stream = self._stream
        if stream is None:
            stream = self._stream = _sock_type(self._sock) == socket.SOCK_STREAM
        try:  # (as in _read_once: try first with a deadline, else a blocking read)
            handoffs, acked, messages = sp.recv_batch(
                self._sock.fileno(), RECV_BUF, MSG_DONTWAIT if deadline is not None else 0,
                self._batch_msgs, st.decoder.idle and not st.wsa,
                _SOCKET_CLASS if st.adopts_checked else None, _BLOCKING_CODE[st.socket_blocking],
                st.max_payload, Handoff, self._answer)
        except BlockingIOError:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return wait_ready(self._sock, write=False, timeout=remaining)[0]
        except InterruptedError:
            return True
        except OSError as exc:
            self._break(exc)
            return True
        if handoffs:
            st.received_singles(handoffs, acked)
        # several messages a read while they are one-socket frames; one (all of RECV_BUF)
        # while they are not: a batch frame would be cut into the small buffers
        self._batch_msgs = _BATCH_MSGS if handoffs and stream else 1
        for data, fds, flags in messages:
            if st.broken is not None:  # (a message before broke the channel)
                close_fds(fds)
                continue
            cut = False
            if flags & _TRUNCATED:
                if flags & _TRUNC_DATA and not stream:
                    close_fds(fds)
                    self._break(RemoteProtocolError("a message was larger than the receive buffer"))
                    continue
                cut = bool(flags & _CTRUNC_FLAG)
            self._take_message(data, fds, cut)
        return True

    def _take_message(self, data: bytes, fds: list[int], cut: bool) -> None:
        """Process what one read returned (a peer's error breaks the channel)."""
        try:
            self._state.receive_data(data, fds, self._answer, cut)
        except (OSError, SockshareError, ValueError) as exc:
            self._break(exc)

    def _read_once(self, deadline: float | None) -> bool:
        """Read once (until ``deadline``) and process. False on timeout."""
        cut = False
        try:
            if self._wsa:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not wait_ready(self._sock, write=False, timeout=remaining)[0]:
                    return False
                data, fds = self._sock.recv(RECV_BUF), list[int]()
            elif _fast.speedups is not None:
                return self._read_once_compiled(_fast.speedups, deadline)
            else:
                try:  # with a deadline, try first and poll only if nothing is there yet;
                    # without one, a plain blocking read (one syscall, the kernel waits)
                    data, anc, flags, _ = self._sock.recvmsg(
                        RECV_BUF, CMSG_SPACE_MAX, RECV_FLAGS if deadline is not None else _BLOCKING_FLAGS)
                except BlockingIOError:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    # readable now (True): the caller loops and reads; False: timed out
                    return wait_ready(self._sock, write=False, timeout=remaining)[0]
                if len(anc) == 1 and not flags & _TRUNCATED and len(data) >= SINGLE_MIN and _FAST_CLOEXEC:
                    # hot path: one descriptor with (usually) one whole single-socket frame
                    _level, ctype, cdata = anc[0]
                    if ctype == _SCM_RIGHTS and len(cdata) == 4:
                        fd = _FD.unpack(cdata)[0]
                        try:
                            if self._state.receive_single(data, fd, self._answer):
                                return True
                        except (OSError, SockshareError, ValueError) as exc:
                            self._break(exc)
                            return True
                        fds = [fd]
                    else:
                        fds, cut = fds_from_ancillary_cut(self._sock, anc, flags)
                else:
                    fds, cut = fds_from_ancillary_cut(self._sock, anc, flags)
        except InterruptedError:
            return True
        except (OSError, SockshareError) as exc:
            self._break(exc)
            return True
        self._take_message(data, fds, cut)
        return True

    def _break(self, exc: BaseException) -> None:
        if self._state.broken is None:
            if not isinstance(exc, ConnectionResetError):
                log.warning("handoff channel to pid %s broke: %s",
                            self._state.peer.pid if self._state.peer else "?", exc)
            self._read_leftovers()
            self._state.fail(exc)
            self._drop_queue()
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _room_for_queue(self) -> None:
        """Closing with frames the peer has not read: let the kernel hold them instead.

        Answers must reach the sender even though it reads them after this side has
        gone: an ACCEPT lost with the channel would let it hand the connection
        elsewhere. On a UNIX socket what a peer has not read counts against the
        *writer's* send buffer, so a larger one (SO_SNDBUFFORCE where this process may,
        else up to the system's maximum) takes the queue in one write."""
        if self._wsa:
            return
        need = 2 * self._out_bytes + 65536
        with contextlib.suppress(OSError):
            if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= need:
                return
        for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            if opt is None:
                continue
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, opt, need)
            except OSError:
                continue
            break
        self._flush()

    def _drop_queue(self) -> None:
        with self._qlock:
            self._out.clear()
            self._out_bytes = 0

    def _read_leftovers(self) -> None:
        """Process what the peer sent before the channel broke (a failed *write* breaks it
        too): an ACCEPT already in our receive buffer must count, or the handoff it
        answers would be "returned" -- and handed to someone else -- while the peer had
        taken it. Bounded; stops at the end of the data or at any error."""
        if self._leftovers_read:
            return
        self._leftovers_read = True
        read_leftovers(self._sock, self._state, self._answer)

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """End the channel cleanly, answering everything first.

        As a receiver: handoffs still queued are rejected (the sender gets them back),
        handoffs the application took and did not answer are accepted (they are its
        own). Then BYE. As a sender: wait up to ``close_timeout`` for the peer's answers
        to pending handoffs; those the peer never received come back as ``"returned"``
        tickets (see :meth:`returned`), those a live peer did not answer in time are
        ``"abandoned"`` (our copy is closed: never two owners).

        Answers this side queued and could not write yet are written first, waiting up to
        ``send_timeout`` for the peer to read them: an ACCEPT that never arrives would
        let the sender hand the same connection elsewhere.

        On a channel that broke first, nothing can be answered: a handoff the
        application holds unanswered is the sender's again (as :meth:`Handoff.accept`
        raising :class:`~sockshare.ChannelBroken` says), so close its socket unless the
        sender is known to be dead.
        """
        st = self._state
        if st.closed or self._detached:
            return
        if st.broken is None:
            # Another thread may be blocked in receive(): then it reads the answers, and
            # this one only writes and watches the tickets.
            reading = self._rlock.acquire(timeout=self.close_timeout)
            try:
                for frame in st.start_close():
                    self._queue(frame)
                if self._out:
                    self._room_for_queue()
                now = time.monotonic()
                flush_by = None if self.send_timeout is None else now + self.send_timeout
                answers_by = now + self.close_timeout
                while st.broken is None:
                    now = time.monotonic()
                    if self._out and (flush_by is None or now < flush_by):
                        until: float | None = flush_by
                    elif st.awaiting_answers and now < answers_by:
                        until = answers_by
                    else:
                        break
                    if reading:
                        self._pump(until)
                    else:
                        self._flush()
                        time.sleep(0.005)
                if self._out and st.broken is None:
                    log.warning("closing the handoff channel to pid %s with %d bytes of answers "
                                "the peer did not read in %s s", st.peer.pid if st.peer else "?",
                                self._out_bytes, self.send_timeout)
            except (OSError, SockshareError) as exc:
                self._break(exc)
            finally:
                if reading:
                    self._rlock.release()
        st.finish_close()
        with contextlib.suppress(OSError):  # wakes a thread blocked reading it
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelListener:
    """A listening channel address. :meth:`accept` returns handshaken :class:`Channel` s."""

    def __init__(
        self, address: str | os.PathLike[str], *, allow_uids: Iterable[int] | None,
        allow_pids: Iterable[int] | None, backlog: int, mode: int, max_payload: int,
        name: str,
    ) -> None:
        check_max_payload(max_payload)
        family, addr = _parse_address(address)
        self.address = os.fspath(address)
        self._path = addr if family == getattr(socket, "AF_UNIX", -1) and isinstance(addr, str) else None
        own_uid = os.getuid() if hasattr(os, "getuid") else 0
        uids = frozenset(allow_uids) if allow_uids is not None else frozenset({own_uid})
        self._policy = Policy(uids, frozenset(allow_pids) if allow_pids is not None else None)
        self._max_payload = max_payload
        self._name = name
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self._path is not None:
                _remove_stale_socket(self._path)
            elif sys.platform == "win32":
                # SO_REUSEADDR on Windows lets another socket bind this very port and take
                # our peers (and the sockets they hand over): claim it exclusively instead.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            elif family != getattr(socket, "AF_UNIX", -1):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            if self._path is not None:
                os.chmod(self._path, mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._closed = False
        self._logged: dict[str, tuple[float, int]] = {}
        if family != getattr(socket, "AF_UNIX", -1):
            host, port = sock.getsockname()[:2]
            self.address = f"tcp://{host}:{port}"

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> Channel:
        """Wait for a peer that passes the handshake and the uid/pid policy.

        Peers that fail are refused with an ERROR frame and logged (rate-limited); accept
        goes on waiting for the next one until ``timeout``, then raises
        :class:`~sockshare.ChannelTimeout`. A peer of a uid the policy refuses is closed
        unread, before any handshake; a silent one costs at most the handshake timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ChannelTimeout(f"no channel peer connected within {timeout} s")
            conn = self._accept_raw(remaining)
            if conn is None:
                continue
            try:
                return self._handshake_conn(conn)
            except ChannelError:
                continue

    def _accept_raw(self, timeout: float | None) -> socket.socket | None:
        """One connection from the backlog, or None (nothing in ``timeout``, a peer that
        gave up, this process out of descriptors: logged, and the caller goes on)."""
        if self._closed:
            raise ChannelClosed("this listener was closed")
        try:
            self._sock.settimeout(timeout)
            conn, _ = self._sock.accept()
        except (TimeoutError, BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if self._closed:
                raise ChannelClosed("this listener was closed") from exc
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # the peer waits in the backlog; try again shortly, never spin
                self._log("accept", "cannot accept a channel peer on %s: %s", self.address, exc)
                time.sleep(0.05 if timeout is None else min(0.05, max(0.0, timeout)))
                return None
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                return None
            raise
        return conn

    def _precheck(self, conn: socket.socket) -> bool:
        """Before reading a byte: refuse a peer whose uid the policy refuses (the
        kernel's word, not the peer's), so that others pay nothing for it."""
        if conn.family != _AF_UNIX or self._policy.uids is None:
            return True
        try:
            _pid, uid, _gid = peer_credentials(conn)
        except (OSError, SockshareError):
            return True  # the handshake checks again
        why = self._policy.uid_refusal(uid)
        if not why:
            return True
        with contextlib.suppress(OSError):
            conn.send(error_frame(why), MSG_DONTWAIT)
        conn.close()
        self._log("refused", "refused a channel peer on %s: %s", self.address, why)
        return False

    def _handshake_conn(self, conn: socket.socket) -> Channel:
        """Handshake on an accepted connection; on any failure the connection is closed,
        the refusal logged, and :class:`~sockshare.PeerRefused` raised."""
        if not self._precheck(conn):
            raise PeerRefused("refused before the handshake")
        try:
            ch = Channel(conn, max_payload=self._max_payload, name=self._name)
            ch._handshake(HANDSHAKE_TIMEOUT, self._policy)
        except (SockshareError, OSError, ValueError, RecursionError) as exc:
            self._log("refused", "refused a channel peer on %s: %s", self.address, exc)
            conn.close()
            raise PeerRefused(str(exc)) from None
        except BaseException:
            conn.close()
            raise
        return ch

    def _log(self, kind: str, msg: str, *args: object) -> None:
        """A warning, at most one a second per kind, with the number left out."""
        now = time.monotonic()
        last, skipped = self._logged.get(kind, (0.0, 0))
        if now - last < 1.0:
            self._logged[kind] = (last, skipped + 1)
            return
        self._logged[kind] = (now, 0)
        if skipped:
            msg += f" ({skipped} more like it in the last second)"
        log.warning(msg, *args)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    def __enter__(self) -> ChannelListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead listener; refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ChannelError(f"{path!r} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise ChannelError(f"another process already listens at {path!r}")
