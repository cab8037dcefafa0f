"""SCM_RIGHTS done right: send and receive descriptors over a UNIX socket.

The stdlib's ``socket.send_fds``/``recv_fds`` hide two traps (docs/protocol.md,
"Pitfalls": *Truncated descriptors*, *Close-on-exec*): truncation by the kernel is
silent (only ``MSG_CTRUNC`` says so) and received descriptors are inheritable because
the ``flags`` argument is ignored. This module calls ``sendmsg``/``recvmsg`` itself:

* every receive passes ``MSG_CMSG_CLOEXEC`` where the OS has it (Linux, FreeBSD), and
  sets close-on-exec by hand right after the receive elsewhere;
* a truncated control message closes every descriptor that did arrive and raises
  :class:`~sockshare.RemoteProtocolError`: a stream cannot be resynchronised after it;
* at least one data byte always travels with descriptors;
* ``EINTR`` is retried by Python itself (PEP 475).

It also reads the peer's credentials (``SO_PEERCRED`` on Linux, ``LOCAL_PEERCRED`` /
``getpeereid`` elsewhere) for authentication.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

from sockshare import _fast
from sockshare._errors import BackendUnavailable, RemoteProtocolError

__all__ = [
    "FdsTruncated",
    "CMSG_SPACE_MAX",
    "MSG_DONTWAIT",
    "RECV_FLAGS",
    "close_fds",
    "fds_from_ancillary",
    "fds_from_ancillary_cut",
    "send_frame",
    "wait_ready",
    "peer_credentials",
    "recv_with_fds",
    "cut_of",
    "recv_with_fds_cut",
    "send_nowait_with_fds",
    "send_with_fds",
]

_INT_SIZE = array.array("i").itemsize
#: Per-call non-blocking flag: lets threads share one blocking socket without racing on
#: its O_NONBLOCK flag or its Python timeout. 0 where the OS has none (Windows).
MSG_DONTWAIT: int = int(getattr(socket, "MSG_DONTWAIT", 0))
_CLOEXEC_FLAG: int = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))
#: Flags for a non-blocking, close-on-exec recvmsg.
RECV_FLAGS = _CLOEXEC_FLAG | int(getattr(socket, "MSG_DONTWAIT", 0))
_TRUNC = int(getattr(socket, "MSG_TRUNC", 0))
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(getattr(socket, "SCM_RIGHTS", -1))
#: Room for the largest descriptor batch a frame may carry (253).
CMSG_SPACE_MAX = socket.CMSG_SPACE(253 * _INT_SIZE) if hasattr(socket, "CMSG_SPACE") else 0


class FdsTruncated(RemoteProtocolError):
    """The kernel dropped descriptors of a message (``MSG_CTRUNC``): the receiver is at
    its descriptor limit, or a sender passed more than 253. Every one that did arrive
    is closed."""

def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    """Close every descriptor in ``fds``, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...]) -> int:
    """Send ``data`` (non-empty) with ``fds`` attached to its first byte. Returns bytes sent.

    On a blocking socket the whole of ``data`` is sent; the descriptors go with the
    first sendmsg only, as the frame rules require.
    """
    if not data:
        raise ValueError("descriptors must travel with at least one data byte")
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
    else:
        sent = sock.send(data)
    if sent < len(data) and sock.gettimeout() != 0.0:
        sock.sendall(memoryview(data)[sent:])
        sent = len(data)
    return sent


def send_nowait_with_fds(sock: socket.socket, data: bytes | memoryview,
                         fds: list[int] | tuple[int, ...]) -> int:
    """One non-blocking ``sendmsg`` of ``data`` with ``fds`` (for a non-blocking socket:
    the asyncio channel). Returns the bytes sent; BlockingIOError when full. Compiled
    (sockshare._speedups) where it is built."""
    sp = _fast.speedups
    if sp is not None:
        return sp.send_fds(sock.fileno(), data, fds)
    if not data:
        raise ValueError("descriptors must travel with at least one data byte")
    if fds:
        return sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())])
    return sock.send(data)


def wait_ready(sock: socket.socket, *, write: bool, timeout: float | None,
               read_too: bool = False) -> tuple[bool, bool]:
    """Wait until ``sock`` is readable (or writable, and readable too if ``read_too``).

    Returns ``(ready_for_what_was_asked, readable)``; both False on timeout.
    """
    if hasattr(select, "poll"):
        p = select.poll()
        mask = (select.POLLOUT | (select.POLLIN if read_too else 0)) if write else select.POLLIN
        p.register(sock.fileno(), mask)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        events = p.poll(ms)
        if not events:
            return False, False
        ev = events[0][1]
        readable = bool(ev & (select.POLLIN | select.POLLHUP | select.POLLERR))
        if write:
            return bool(ev & (select.POLLOUT | select.POLLHUP | select.POLLERR)), readable
        return True, readable
    rl = [sock] if (not write or read_too) else []
    r, w, _ = select.select(rl, [sock] if write else [], [], timeout)
    return (bool(w) if write else bool(r)), bool(r)


def send_frame(
    sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = (),
    timeout: float | None = None, on_readable: Callable[[], bool] | None = None,
) -> None:
    """Send all of ``data`` (fds with its first byte) within ``timeout`` seconds.

    Uses ``MSG_DONTWAIT`` per call, so it works on a socket that other threads read in
    blocking mode. While the socket is full, ``on_readable()`` is called whenever data
    arrives, so a peer that is itself blocked writing to us (acks) is drained and two
    senders never deadlock; it returns False if it could not read (then we only wait for
    room). Raises ``TimeoutError`` when the peer does not read in time.
    """
    if not MSG_DONTWAIT:  # Windows: no per-call flag (and no descriptors to attach)
        _send_frame_nonblocking(sock, data, timeout, on_readable)
        return
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []

    def send_once(view: memoryview) -> int:
        nonlocal anc
        sent = sock.sendmsg([view], anc, MSG_DONTWAIT)
        anc = []  # descriptors travel once, with the first byte
        return sent

    _send_loop(sock, memoryview(data), send_once, timeout, on_readable)


def _send_frame_nonblocking(
    sock: socket.socket, data: bytes, timeout: float | None,
    on_readable: Callable[[], bool] | None,
) -> None:
    """send_frame() where MSG_DONTWAIT does not exist (Windows): the socket is made
    non-blocking for the duration of the send, then its previous timeout restored.

    A channel's reader only calls ``recv`` after ``select`` reported data, so switching
    the mode under it is harmless; without this, a peer that stops reading would block
    the sender for ever instead of breaking the channel after ``timeout``.
    """
    previous = sock.gettimeout()
    sock.setblocking(False)
    try:
        _send_loop(sock, memoryview(data), sock.send, timeout, on_readable)
    finally:
        if sock.fileno() >= 0:
            sock.settimeout(previous)


def _send_loop(
    sock: socket.socket, view: memoryview, send_once: Callable[[memoryview], int],
    timeout: float | None, on_readable: Callable[[], bool] | None,
) -> None:
    """Call ``send_once`` until ``view`` is sent; while the socket is full, wait for room
    (and drain the peer through ``on_readable``) until ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    read_too = on_readable is not None
    while view:
        try:
            sent = send_once(view)
        except BlockingIOError:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"the peer did not read for {timeout} s") from None
            writable, readable = wait_ready(sock, write=True, timeout=remaining, read_too=read_too)
            if readable and on_readable is not None and not on_readable():
                read_too = False
            if not writable and not readable:
                raise TimeoutError(f"the peer did not read for {timeout} s") from None
            continue
        view = view[sent:]


def recv_with_fds(
    sock: socket.socket, bufsize: int = 65536, flags: int = 0
) -> tuple[bytes, list[int]]:
    """Receive up to ``bufsize`` bytes and any descriptors, all close-on-exec.

    Raises :class:`RemoteProtocolError` (after closing what arrived) if the kernel
    truncated the descriptors or the data of a datagram/seqpacket message.
    """
    data, ancdata, flags, _addr = sock.recvmsg(bufsize, CMSG_SPACE_MAX, _CLOEXEC_FLAG | flags)
    return data, fds_from_ancillary(sock, ancdata, flags)


def fds_from_ancillary(
    sock: socket.socket, ancdata: list[tuple[int, int, bytes]], flags: int
) -> list[int]:
    """The descriptors in what ``recvmsg`` returned, close-on-exec, with truncation
    checked (see :func:`recv_with_fds`). For callers that call ``recvmsg`` themselves."""
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
            usable = len(cdata) - (len(cdata) % _INT_SIZE)
            fds.extend(array.array("i", cdata[:usable]))
    if not _CLOEXEC_FLAG:
        for fd in fds:
            os.set_inheritable(fd, False)
    if not flags:
        return fds
    if flags & _CTRUNC:
        close_fds(fds)
        raise FdsTruncated(
            f"the kernel truncated the descriptors of a message ({len(fds)} arrived): "
            "the receiver is at its fd limit (ulimit -n) or the sender exceeded 253"
        )
    if flags & _TRUNC and sock.type != socket.SOCK_STREAM:
        close_fds(fds)
        raise RemoteProtocolError("a message was larger than the receive buffer")
    return fds


def fds_from_ancillary_cut(
    sock: socket.socket, ancdata: list[tuple[int, int, bytes]], flags: int
) -> tuple[list[int], bool]:
    """Like :func:`fds_from_ancillary`, but a read whose descriptors the kernel cut
    (``MSG_CTRUNC``: this process is at its fd limit) is not an error: returns the
    descriptors that did arrive -- the first ones of the message, in order -- and True.
    The caller must treat the rest as lost (the kernel closed them)."""
    if flags & _CTRUNC:
        return fds_from_ancillary(sock, ancdata, flags & ~_CTRUNC), True
    return fds_from_ancillary(sock, ancdata, flags), False


def cut_of(sock: socket.socket, fds: list[int], rflags: int) -> bool:
    """For a compiled receive (``recv_fds``, ``recv_answers``) of ``sock``: whether the
    kernel cut the message's descriptors (``MSG_CTRUNC``); a message larger than the
    buffer on a socket that is not a stream closes ``fds`` and raises."""
    if not rflags & (_CTRUNC | _TRUNC):
        return False
    if rflags & _TRUNC and sock.type != socket.SOCK_STREAM:
        close_fds(fds)
        raise RemoteProtocolError("a message was larger than the receive buffer")
    return bool(rflags & _CTRUNC)


def recv_with_fds_cut(
    sock: socket.socket, bufsize: int = 65536, flags: int = 0
) -> tuple[bytes, list[int], bool]:
    """:func:`recv_with_fds` that reports a cut instead of raising (see
    :func:`fds_from_ancillary_cut`). Compiled (sockshare._speedups) where it is built."""
    sp = _fast.speedups
    if sp is not None:
        data, fds, rflags = sp.recv_fds(sock.fileno(), bufsize, flags)
        return data, fds, cut_of(sock, fds, rflags)
    data, ancdata, rflags, _addr = sock.recvmsg(bufsize, CMSG_SPACE_MAX, _CLOEXEC_FLAG | flags)
    fds, cut = fds_from_ancillary_cut(sock, ancdata, rflags)
    return data, fds, cut


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """Return ``(pid, uid, gid)`` of the process at the other end of a UNIX socket.

    The pid is the one that *connected* (or called socketpair); pid is 0 where the OS
    does not report it (getpeereid on older BSDs).
    """
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return pid, uid, gid
    if sys.platform == "darwin":
        # LOCAL_PEERCRED (0x001) gives struct xucred; LOCAL_PEERPID (0x002) the pid.
        sol_local = 0
        pid = struct.unpack("i", sock.getsockopt(sol_local, 0x002, 4))[0]
        xucred = sock.getsockopt(sol_local, 0x001, 76)
        _version, uid, _ngroups = struct.unpack_from("IIh", xucred)
        return pid, uid, -1
    raise BackendUnavailable(f"no way to read peer credentials of a UNIX socket on {sys.platform}")
