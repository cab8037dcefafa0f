"""Every exception sockshare raises, under one root.

Errors say whose fault a failure is and what to do about it::

    SockshareError
    ├── TokenError                      a token could not be imported
    │   ├── InvalidToken (ValueError)   garbled, truncated, wrong version, forged secret
    │   ├── WrongProcess                presented by a process it was not made for
    │   ├── TokenConsumed               already imported (tokens are single use)
    │   ├── TokenExpired                its time ran out, or the exporter released it
    │   ├── ExporterGone                the exporting process exited (or its agent did)
    │   │   └── ExporterTimeout (TimeoutError) alive, but its agent did not answer in time
    │   └── ExporterBusy                its agent refused for now: out of fds, too many conns
    ├── ExportFailed (OSError)          export_socket failed in the OS (EMFILE, ESRCH...)
    ├── ProtocolError                   the wire rules were broken
    │   ├── LocalProtocolError          ... by us: a bug or a misuse of the API
    │   └── RemoteProtocolError         ... by the peer: garbage, forged or truncated frames
    ├── MessageTooLarge (ValueError)    over a documented limit, refused before sending
    ├── ChannelError                    a handoff channel cannot be used
    │   ├── ChannelClosed               you closed it
    │   ├── ChannelBroken               it broke from outside (peer died); cause chained
    │   ├── ChannelEnded                the peer said goodbye: no more handoffs will come
    │   ├── ChannelPermission (PermissionError) the OS refused access to the address
    │   ├── ChannelTimeout (TimeoutError) nothing arrived, or the peer did not read, in time
    │   └── PeerRefused                 the handshake refused the peer (uid/pid policy)
    ├── HandoffError                    one handoff did not complete; the socket is yours again
    │   ├── HandoffRejected             the receiver rejected it (``reason``)
    │   └── HandoffReturned             the channel ended before the receiver answered
    ├── CarrierError                    an IPC carrier failed (sockshare.carriers)
    │   ├── CarrierNotFound             no such queue/pipe/segment/peer address
    │   ├── CarrierPermission           the OS refused access
    │   ├── CarrierTimeout (TimeoutError) nothing arrived or left in time
    │   ├── CarrierFull                 the queue or ring is full
    │   ├── CarrierInUse                the address/name is held by another reader
    │   └── CarrierClosed               the carrier or its peer is gone
    └── BackendUnavailable              this OS mechanism does not work here (and why)

The server runtime (:mod:`sockshare.server`) adds its own, still under
``SockshareError``: ``ConfigError`` (a bad configuration), ``ControlError`` (the control
socket), ``SniffError`` (a client that cannot be routed), and ``MigrationError`` with
``MigrationUnsupported``, ``StateError``, ``MigrationRefused`` and ``MigrationAborted``
(moving a live connection; see ``docs/server.md``).

Every class is importable from the package top level. ``ValueError``, ``OSError`` and
``TimeoutError`` mixins keep stdlib-style ``except`` clauses working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
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
]


class SockshareError(Exception):
    """Root of every exception sockshare raises on purpose."""


# --- tokens -----------------------------------------------------------------


class TokenError(SockshareError):
    """A token could not be imported. Nothing was left open by the attempt."""


class InvalidToken(TokenError, ValueError):
    """The token is garbled, truncated, of an unknown version, or its secret is wrong."""


class WrongProcess(TokenError):
    """The token was made for another process id; only that process may import it."""


class TokenConsumed(TokenError):
    """The token was already imported once; tokens are single use."""


class TokenExpired(TokenError):
    """The token's lifetime ran out, or the exporter released it, before import."""


class ExporterGone(TokenError):
    """The process that exported the socket exited before the import."""


class ExporterTimeout(ExporterGone, TimeoutError):
    """The exporting process is alive, but its export agent did not complete the import
    before the deadline (the process is stopped, overloaded or out of descriptors)."""


class ExporterBusy(TokenError):
    """The exporter's agent answered that it cannot serve the import now (it is out of
    file descriptors, or has too many importer connections). The token is not consumed."""


class ImportFailed(TokenError, OSError):
    """This process could not take the socket in (``errno`` set): it is out of file
    descriptors (EMFILE, ENFILE), so the kernel could not give it the granted socket or
    a connection to the exporter's agent. The token is not consumed: free descriptors
    and import again."""


class ExportFailed(SockshareError, OSError):
    """``export_socket`` failed in the operating system (``errno`` set): the process is
    out of file descriptors (EMFILE), the descriptor is not a socket, the target pid
    does not exist..."""


# --- wire protocol ------------------------------------------------------------


class ProtocolError(SockshareError):
    """The handoff wire protocol was violated. Abstract: see the two subclasses."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection cannot continue."""


class MessageTooLarge(SockshareError, ValueError):
    """A message, metadata, pre-read data or fd count is over a documented limit."""


# --- channel ------------------------------------------------------------------


class ChannelError(SockshareError):
    """A handoff channel cannot be used."""


class ChannelClosed(ChannelError):
    """This side closed the channel (or its listener) and then used it."""


class ChannelBroken(ChannelError):
    """The channel broke from outside: the peer died or hung up. Cause in ``__cause__``."""


class ChannelEnded(ChannelError):
    """The peer ended the channel cleanly (BYE) and nothing it sent is left to take.

    Iterating over a channel stops quietly here; :meth:`~sockshare.Channel.receive`
    raises it. Not an error of the peer: it said goodbye."""


class ChannelPermission(ChannelError, PermissionError):
    """The operating system refused this process access to a channel's address (another
    user's socket file, mode 0600)."""


class ChannelTimeout(ChannelError, TimeoutError):
    """A channel call ran out of time: nothing arrived, or the peer did not read.

    The channel is still usable. A send that timed out sent nothing: the socket is
    still the caller's (for :meth:`~sockshare.Channel.send_many`, ``sent`` lists the
    tickets of the handoffs that did go before the timeout)."""

    def __init__(self, message: str, sent: list[Any] | None = None) -> None:
        super().__init__(message)
        self.sent: list[Any] = sent or []


class PeerRefused(ChannelError):
    """The handshake refused the peer: version, uid or pid policy."""


class HandoffError(SockshareError):
    """One handoff did not complete; the sender still owns the socket (``socket``)."""

    def __init__(self, message: str, reason: str = "", socket: Any = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.socket = socket


class HandoffRejected(HandoffError):
    """The receiver rejected the handoff (``reason``); the sender still owns the socket."""


class HandoffReturned(HandoffError):
    """The channel ended before the receiver answered: the receiver never owned the
    connection, and the sender has it back (or, when this side closed the channel and
    the receiver did not answer in time, its copy was closed: ``socket`` is None)."""


# --- carriers -----------------------------------------------------------------


class CarrierError(SockshareError):
    """An IPC carrier (pipe, queue, shared memory, socket) failed."""


class CarrierNotFound(CarrierError):
    """The named queue, pipe, segment or address does not exist (or nobody listens)."""


class CarrierPermission(CarrierError):
    """The operating system refused access to the carrier."""


class CarrierTimeout(CarrierError, TimeoutError):
    """Nothing could be received or sent before the timeout."""


class CarrierFull(CarrierError):
    """The queue or ring buffer is full and the send did not wait."""


class CarrierInUse(CarrierError):
    """The path or name is held by another reader, or by something that is not a carrier."""


class CarrierClosed(CarrierError):
    """The carrier was closed by this side, or its peer went away."""


class BackendUnavailable(SockshareError):
    """An OS mechanism (SCM_RIGHTS, pidfd_getfd, WSADuplicateSocket...) is not usable here."""
