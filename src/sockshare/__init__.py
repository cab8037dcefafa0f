"""sockshare: move live sockets between processes, on Linux, macOS and Windows.

Three layers, from the bottom:

* :mod:`sockshare.protocol` -- sans-I/O: the token format, the frame codec and the
  message payloads, documented byte by byte in ``docs/protocol.md``;
* :mod:`sockshare.backends` -- the OS mechanisms: SCM_RIGHTS, pidfd_getfd,
  WSADuplicateSocket, inheritance and systemd socket activation;
* the public API re-exported here: tokens (:func:`export_socket`,
  :func:`import_socket`, :func:`release`), the handoff :class:`Channel` (blocking)
  and :class:`AsyncChannel` (asyncio), and every error class under
  :class:`SockshareError`.

The server runtime (``sockshare serve``) lives in :mod:`sockshare.server`, the IPC
carriers in :mod:`sockshare.carriers`.
"""

from typing import TYPE_CHECKING, Any

from sockshare._channel import Channel, ChannelListener, Handoff, PeerInfo, Ticket
from sockshare._errors import (
    BackendUnavailable,
    CarrierClosed,
    CarrierError,
    CarrierFull,
    CarrierInUse,
    CarrierNotFound,
    CarrierPermission,
    CarrierTimeout,
    ChannelBroken,
    ChannelClosed,
    ChannelEnded,
    ChannelError,
    ChannelPermission,
    ChannelTimeout,
    ExporterBusy,
    ExporterGone,
    ExporterTimeout,
    ExportFailed,
    HandoffError,
    HandoffRejected,
    HandoffReturned,
    ImportFailed,
    InvalidToken,
    LocalProtocolError,
    MessageTooLarge,
    PeerRefused,
    ProtocolError,
    RemoteProtocolError,
    SockshareError,
    TokenConsumed,
    TokenError,
    TokenExpired,
    WrongProcess,
)
from sockshare._tokens import (
    DEFAULT_TTL,
    close_agent_connections,
    export_socket,
    import_socket,
    release,
)
from sockshare._version import __version__

if TYPE_CHECKING:
    from sockshare._aio import AsyncChannel, AsyncChannelListener


def __getattr__(name: str) -> Any:
    # asyncio costs ~0.5 s to import in the embeddable Windows CPython: load the asyncio
    # channel only when it is asked for.
    if name in ("AsyncChannel", "AsyncChannelListener"):
        from sockshare import _aio

        return getattr(_aio, name)
    raise AttributeError(f"module 'sockshare' has no attribute {name!r}")

__all__ = [
    "DEFAULT_TTL",
    "AsyncChannel",
    "AsyncChannelListener",
    "Channel",
    "ChannelListener",
    "Handoff",
    "PeerInfo",
    "Ticket",
    "BackendUnavailable",
    "CarrierClosed",
    "CarrierError",
    "CarrierFull",
    "CarrierInUse",
    "CarrierNotFound",
    "CarrierPermission",
    "CarrierTimeout",
    "ChannelBroken",
    "ChannelClosed",
    "ChannelEnded",
    "ChannelError",
    "ChannelPermission",
    "ChannelTimeout",
    "ExportFailed",
    "ImportFailed",
    "ExporterBusy",
    "ExporterGone",
    "ExporterTimeout",
    "HandoffError",
    "HandoffRejected",
    "HandoffReturned",
    "InvalidToken",
    "LocalProtocolError",
    "MessageTooLarge",
    "PeerRefused",
    "ProtocolError",
    "RemoteProtocolError",
    "SockshareError",
    "TokenConsumed",
    "TokenError",
    "TokenExpired",
    "WrongProcess",
    "__version__",
    "close_agent_connections",
    "export_socket",
    "import_socket",
    "release",
]
