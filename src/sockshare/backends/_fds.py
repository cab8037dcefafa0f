"""A received descriptor becomes a checked socket object: the one place that does it.

Whatever brought the descriptor -- a channel HANDOFF, an export agent's GRANT -- it came
from another process with a claim of what it is (family, type, protocol). The claim is
not trusted: :func:`checked_socket` asks the kernel (getsockname and ``SO_TYPE``, which
the socket constructor makes anyway, in C) and compares, then puts the socket in the
blocking mode its new owner wants.

On failure the descriptor is *not* closed: the caller owns it and closes it once
(closing twice could hit a number another thread reused in between).

Windows channels move WSAPROTOCOL_INFO blobs instead of descriptors: :func:`share_socket`
and :func:`shared_socket` make and import them.
"""

from __future__ import annotations

import _socket
import socket
import sys
from collections.abc import Callable

from sockshare._errors import RemoteProtocolError
from sockshare.protocol import SocketKind

__all__ = ["checked_socket", "share_socket", "shared_socket", "socket_family", "socket_type"]


def _wrap_portable(family: int, type: int, proto: int, fd: int) -> socket.socket:
    return socket.socket(family, type, proto, fd)


_new_socket = socket.socket.__new__
_init_socket = _socket.socket.__init__


def _wrap_fast(family: int, type: int, proto: int, fd: int) -> socket.socket:
    # What socket.socket(family, type, proto, fd) does, minus a Python-level __init__
    # frame: 0.2 us of the 0.85 us it costs (a fifth of the receive hot path's overhead).
    sock = _new_socket(socket.socket)
    _init_socket(sock, family, type, proto, fd)
    sock._io_refs = 0  # type: ignore[attr-defined]
    sock._closed = False  # type: ignore[attr-defined]
    return sock


# The fast form is used only where socket.socket has exactly the slots it sets
# (CPython 3.11-3.14); anything else gets the public constructor.
_wrap = (_wrap_fast if getattr(socket.socket, "__slots__", None) == ["__weakref__", "_io_refs", "_closed"]
         else _wrap_portable)
#: socket objects are made the fast way: sockshare._speedups.recv_batch may make them in C
FAST_WRAP = _wrap is _wrap_fast

# the C getters (socket.socket's own properties build an enum on every access)
socket_type: Callable[[socket.socket], int]
socket_family: Callable[[socket.socket], int]
if "type" in _socket.socket.__dict__ and "family" in _socket.socket.__dict__:
    socket_type = _socket.socket.__dict__["type"].__get__
    socket_family = _socket.socket.__dict__["family"].__get__
else:  # pragma: no cover - not CPython
    def socket_type(sock: socket.socket) -> int:
        return int(sock.type)

    def socket_family(sock: socket.socket) -> int:
        return int(sock.family)


def checked_socket(fd: int, kind: SocketKind, blocking: bool | None, what: str,
                   ident: object = "") -> socket.socket:
    """A socket object for the received descriptor ``fd``, which is claimed to be of
    ``kind``; ``blocking`` True/False sets its mode (None leaves it as it is).

    Raises :class:`~sockshare.RemoteProtocolError` naming ``what`` and ``ident``
    (``"handoff "``, ``7``: formatted only on failure, this is a hot path) if it is not a
    socket, not of the claimed kind, or unusable. On any failure ``fd`` is left open, for
    the caller to close.
    """
    try:   # family and type from the kernel (getsockname, SO_TYPE), then compared
        sock = _wrap(-1, -1, kind.proto, fd)
    except OSError as exc:  # e.g. ENOTSOCK: the peer sent a pipe or a file
        raise RemoteProtocolError(f"descriptor of {what}{ident} is not a socket: {exc}") from None
    try:
        if socket_type(sock) != kind.type or socket_family(sock) != kind.family:
            raise RemoteProtocolError(
                f"{what}{ident} is not of the socket type it claims: it says family/type "
                f"{kind.family}/{kind.type}, it is {socket_family(sock)}/{socket_type(sock)}")
        if blocking is not None:
            sock.setblocking(blocking)
    except OSError as exc:
        sock.detach()
        raise RemoteProtocolError(f"descriptor of {what}{ident} is unusable: {exc}") from None
    except BaseException:
        sock.detach()
        raise
    return sock


def share_socket(sock: socket.socket, pid: int) -> bytes:
    """The WSAPROTOCOL_INFO blob that lets process ``pid`` import ``sock`` (Windows;
    elsewhere there is none: descriptors travel by SCM_RIGHTS)."""
    if sys.platform == "win32":
        return sock.share(pid)
    return b""


def shared_socket(blob: bytes, blocking: bool | None) -> socket.socket:
    """A socket imported from a WSAPROTOCOL_INFO ``blob`` (Windows), in the mode given."""
    if sys.platform != "win32":
        raise RemoteProtocolError("WSAPROTOCOL_INFO blobs can only be imported on Windows")
    sock = socket.fromshare(blob)
    if blocking is not None:
        sock.setblocking(blocking)
    return sock
