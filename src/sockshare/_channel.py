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

The channel is symmetric: either end may send handoffs. This module holds the I/O-free
state (:class:`_ChannelState`) and the blocking adapter; :mod:`sockshare._aio` is the
asyncio adapter over the same state.

Transports: a UNIX stream socket (a path, or ``@name`` in the Linux abstract
namespace), descriptors by SCM_RIGHTS; on Windows, loopback TCP (``tcp://127.0.0.1:PORT``)
with sockets moved as WSAPROTOCOL_INFO blobs for the receiver's pid learnt in HELLO.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import json
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
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from sockshare._errors import (
    ChannelBroken,
    ChannelClosed,
    ChannelEnded,
    ChannelError,
    ChannelPermission,
    ChannelTimeout,
    HandoffRejected,
    HandoffReturned,
    LocalProtocolError,
    MessageTooLarge,
    PeerRefused,
    RemoteProtocolError,
    SockshareError,
)
from sockshare.backends._fds import checked_socket
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
from sockshare.protocol import (
    FLAG_ACK,
    FLAG_WSA,
    HEADER,
    MAGIC,
    MAX_DATA,
    MAX_META,
    MAX_PAYLOAD,
    VERSION,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    HandoffEntry,
    Hello,
    Reject,
    SocketKind,
    decode_accept,
    decode_control,
    decode_error,
    decode_handoff,
    decode_hello,
    decode_reject,
    encode_accept,
    encode_control,
    encode_error,
    encode_frame,
    encode_handoff,
    encode_hello,
    encode_reject,
    error_to_exception,
)
from sockshare.protocol._messages import _UNPACKED

__all__ = ["Channel", "ChannelListener", "Handoff", "PeerInfo", "Ticket"]

log = logging.getLogger("sockshare.channel")

IS_WINDOWS = sys.platform == "win32"
FEATURE_SCM = 0x1
FEATURE_WSA = 0x2
FEATURE_ACK = 0x4
#: Sockets per HANDOFF frame in a batched send (well under SCM_MAX_FD = 253).
BATCH = 64
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
#: The REJECT reason for a handoff whose descriptor the kernel could not give this
#: process (it is at its fd limit): the sender still owns the connection.
NO_FDS = "receiver out of file descriptors"

_ids = itertools.count(1)
_HANDOFF = int(FrameType.HANDOFF)
# frame header + entry count + one entry header: the single-handoff hot path
_SINGLE = struct.Struct(">2sBBBBHIHQ4sII")
_SINGLE_TAIL = struct.Struct(">IHQ4sII")
# the first 8 header bytes of a one-socket HANDOFF frame: magic, version, type, flags,
# nfds = 1, reserved = 0
_PREFIX_UNACKED = struct.pack(">2sBBBBH", MAGIC, VERSION, int(FrameType.HANDOFF), 0, 1, 0)
_PREFIX_ACKED = struct.pack(">2sBBBBH", MAGIC, VERSION, int(FrameType.HANDOFF), FLAG_ACK, 1, 0)
_FD = struct.Struct("i")
_ENTRY = struct.Struct(">Q4sII")
_U16 = struct.Struct(">H")
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(getattr(socket, "SCM_RIGHTS", 1))
# received fds are close-on-exec by the kernel only where MSG_CMSG_CLOEXEC exists
_FAST_CLOEXEC = bool(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_BLOCKING_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
# recvmsg reports MSG_CMSG_CLOEXEC back in its flags: only truncation matters
_TRUNCATED = int(getattr(socket, "MSG_CTRUNC", 0)) | int(getattr(socket, "MSG_TRUNC", 0))


TicketState = Literal["pending", "sent", "accepted", "rejected", "returned", "abandoned"]


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who is at the other end, from its HELLO (pid/uid checked against the kernel's)."""

    pid: int
    uid: int
    name: str
    features: int
    max_payload: int


@dataclass(eq=False, slots=True)
class Ticket:
    """The sender's view of one handoff.

    ``state`` is ``"pending"`` until the receiver answers, ``"sent"`` for
    fire-and-forget handoffs, then ``"accepted"``, ``"rejected"`` (the receiver said no:
    ``reason``) or ``"returned"`` (the channel ended before an answer, so the receiver
    never owned it). While pending, and after a reject or a return, ``socket`` is the
    sender's own socket, intact; after an accept it is closed and ``None``.
    ``"abandoned"``: this side closed the channel and the receiver, still alive, did not
    answer within ``close_timeout``; the sender's copy was closed so that the connection
    is never served twice (the receiver may still serve it).
    """

    id: int
    socket: socket.socket | None
    meta: Any = None
    data: bytes = b""
    state: TicketState = "pending"
    reason: str = ""
    #: the channel that sent it: a blocking Channel, or an AsyncChannel
    _channel: Any = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state != "pending"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the receiver answers; True if accepted (or sent, for a
        fire-and-forget handoff). Reads the channel while it waits.

        Raises :class:`~sockshare.ChannelTimeout` if no answer came within ``timeout``.
        A ticket of an :class:`~sockshare.AsyncChannel` is waited for with
        ``await channel.wait([ticket])`` in its event loop; from another thread,
        ``wait()`` works too."""
        if self.state == "pending" and self._channel is not None:
            self._channel._wait_ticket(self, timeout)
        return self.state in ("accepted", "sent")

    def result(self, timeout: float | None = None) -> None:
        """Wait like :meth:`wait`, then return if the receiver took the connection.

        Raises :class:`~sockshare.HandoffRejected` (``reason``) if it said no, and
        :class:`~sockshare.HandoffReturned` if the channel ended before it answered. The
        socket is then in the exception's (and this ticket's) ``socket``, still the
        sender's to serve or hand elsewhere -- except for a ticket this side *abandoned*
        (it closed the channel and the live receiver did not answer in time): its copy
        was closed, ``socket`` is None, and the receiver may be serving it."""
        self.wait(timeout)
        if self.state == "rejected":
            raise HandoffRejected(f"handoff {self.id} was rejected: {self.reason or 'no reason given'}",
                                  self.reason, self.socket)
        if self.state in ("returned", "abandoned"):
            raise HandoffReturned(f"handoff {self.id} came back: {self.reason}", self.reason, self.socket)


@dataclass(eq=False, slots=True)
class Handoff:
    """The receiver's view of one handoff: a socket that is now yours.

    ``data`` are the bytes the sender had already read from the connection: consume them
    before reading from ``socket``. ``meta`` is the sender's JSON metadata (decoded on
    first access). Answer with :meth:`accept` or :meth:`reject` when the sender asked for
    an acknowledgement (``acked``); until then the sender keeps its own copy.
    """

    id: int
    socket: socket.socket
    data: bytes
    raw_meta: bytes
    acked: bool
    _answer: Any = field(default=None, repr=False)  # (id, reason or None) -> None
    answered: bool = False
    _meta: Any = field(default=None, repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        """The sender's metadata, decoded on first access.

        Raises :class:`~sockshare.RemoteProtocolError` if the sender put something that
        is not a JSON object there."""
        if self._meta is None:
            try:
                meta = json.loads(self.raw_meta) if self.raw_meta else {}
            except ValueError as exc:
                raise RemoteProtocolError(
                    f"handoff {self.id} carries metadata that is not JSON: {exc}") from None
            except RecursionError:
                raise RemoteProtocolError(
                    f"handoff {self.id} carries metadata that nests too deeply") from None
            if not isinstance(meta, dict):
                raise RemoteProtocolError(f"handoff {self.id} carries metadata that is not a JSON object")
            self._meta = meta
        return self._meta  # type: ignore[no-any-return]

    def accept(self) -> None:
        """Tell the sender we own the connection now; it closes its copy.

        Accept *before* using the socket. If this raises
        :class:`~sockshare.ChannelBroken`, the channel ended before the answer could go
        and the sender has the connection back: close your copy and do not serve it."""
        if self.answered:
            return
        self.answered = True
        if self.acked and self._answer is not None:
            self._answer(self.id, None)

    def reject(self, reason: str = "") -> None:
        """Give the connection back: our copy is closed, the sender's stays open."""
        if self.answered:
            raise LocalProtocolError(f"handoff {self.id} was already answered")
        self.answered = True
        self.socket.close()
        if self.acked and self._answer is not None:
            self._answer(self.id, reason)


class _ChannelState:
    """Everything a channel knows, and how frames change it. No blocking I/O here.

    Incoming bytes and descriptors go to :meth:`receive_data`; it returns nothing, and
    updates ``incoming`` (handoffs for us), the tickets, and ``returned`` (tickets given
    back). Building frames to send is :meth:`handoff_frames`.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD, wsa: bool = False) -> None:
        self.wsa = wsa
        self.decoder = FrameDecoder(max_payload=max_payload, allow_fds=not wsa)
        self.max_payload = max_payload
        self.peer: PeerInfo | None = None
        self.incoming: deque[Handoff] = deque()
        self.tickets: dict[int, Ticket] = {}
        self.returned: deque[Ticket] = deque()
        self.controls: deque[dict[str, Any]] = deque()
        self.broken: BaseException | None = None
        self.closed = False
        self.peer_said_bye = False
        self.socket_blocking: bool | None = True
        self.counters = {"sent": 0, "accepted": 0, "rejected": 0, "returned": 0}
        self.received = 0  # an attribute, not in the dict: the hot path counts it
        self.pending_accepts: list[int] = []
        #: acked handoffs received and not answered yet (queued or with the application)
        self.outstanding: dict[int, Handoff] = {}
        #: tickets accepted by the peer, when a supervisor asked to track them
        self.accepted_log: list[Ticket] | None = None

    # -- answers -------------------------------------------------------------------

    def answer(self, hid: int, reason: str | None, *, coalesce: bool) -> bytes | None:
        """Record an answer to handoff ``hid``; return frame bytes to send now, if any.

        With ``coalesce`` (the asyncio adapter, which flushes at the end of the current
        loop iteration) ACCEPTs collect into one frame of up to 64 ids; otherwise each
        goes at once, so a blocking receiver busy with a connection never holds its
        sender's ticket. REJECTs always go at once.
        """
        if self.closed:
            raise ChannelClosed("this channel was closed by this side")
        if self.broken is not None:
            raise ChannelBroken(
                f"the channel ended before handoff {hid} was answered; the sender has it "
                f"back: close this copy ({self.broken})") from self.broken
        self.outstanding.pop(hid, None)
        if reason is not None:
            out = self.take_accepts() or b""
            return out + encode_frame(FrameType.REJECT, encode_reject(Reject(hid, reason)))
        self.pending_accepts.append(hid)
        if not coalesce or len(self.pending_accepts) >= BATCH:
            return self.take_accepts()
        return None

    def take_accepts(self) -> bytes | None:
        """The coalesced ACCEPT frame for every answer not sent yet, or None."""
        if not self.pending_accepts:
            return None
        ids, self.pending_accepts = self.pending_accepts, []
        return encode_frame(FrameType.ACCEPT, encode_accept(ids))

    # -- outgoing ----------------------------------------------------------------

    def single_frame(
        self, sock: socket.socket, meta: Any, data: bytes, ack: bool,
    ) -> tuple[bytes, int, Ticket]:
        """The hot path: one socket, one frame, packed in a single struct call.

        Produces exactly what :meth:`handoff_frames` would for one item (the test
        vectors check both)."""
        if type(meta) is dict and _c_encode is not None:  # _encode_meta, inlined
            try:
                raw = "".join(_c_encode(meta, 0)).encode()
            except (TypeError, ValueError, RecursionError) as exc:
                raise LocalProtocolError(f"handoff metadata must be JSON-compatible: {exc}") from None
            if len(raw) > MAX_META:
                raise MessageTooLarge(f"metadata of {len(raw)} bytes; the limit is {MAX_META}")
        else:
            raw = _encode_meta(meta)
        if type(data) is not bytes:
            data = bytes(data)
        ldata = len(data)
        if ldata > MAX_DATA:
            raise MessageTooLarge(f"pre-read data of {ldata} bytes; the limit is {MAX_DATA}")
        length = 22 + len(raw) + ldata
        if self.peer is not None and length > self.peer.max_payload:
            raise MessageTooLarge(
                f"a handoff of {length} bytes is over the peer's limit of {self.peer.max_payload}")
        hid = next(_ids)
        head = _SINGLE.pack(MAGIC, VERSION, _HANDOFF, FLAG_ACK if ack else 0, 1, 0, length, 1, hid,
                            SocketKind.code_of(sock), len(raw), ldata)
        ticket = Ticket(hid, sock, meta, data, "pending" if ack else "sent")
        return b"".join((head, raw, data)), sock.fileno(), ticket

    def handoff_frames(
        self, items: list[tuple[socket.socket, Any, bytes]], ack: bool,
    ) -> list[tuple[bytes, list[int], list[Ticket]]]:
        """Encode HANDOFF frames for ``items`` (sock, meta, data); register tickets."""
        if len(items) == 1 and not self.wsa:
            frame, fd, ticket = self.single_frame(*items[0], ack)
            return [(frame, [fd], [ticket])]
        if not self.wsa:
            return self._fd_frames(items, ack)
        out: list[tuple[bytes, list[int], list[Ticket]]] = []
        flags = (FLAG_ACK if ack else 0) | (FLAG_WSA if self.wsa else 0)
        peer_max = self.peer.max_payload if self.peer else MAX_PAYLOAD
        entries: list[HandoffEntry] = []
        tickets: list[Ticket] = []
        size = 2
        state: TicketState = "pending" if ack else "sent"
        for sock, meta, pre in items:
            raw = _encode_meta(meta)
            data = pre if type(pre) is bytes else bytes(pre)
            if len(data) > MAX_DATA:
                raise MessageTooLarge(f"pre-read data of {len(data)} bytes; the limit is {MAX_DATA}")
            blob = b""
            if self.wsa:
                assert self.peer is not None
                if sys.platform == "win32":
                    blob = sock.share(self.peer.pid)
            entry = HandoffEntry(next(_ids), SocketKind.of(sock), raw, data, blob)
            esize = 20 + len(raw) + len(data) + (2 + len(blob) if self.wsa else 0)
            if entries and (len(entries) >= BATCH or size + esize > peer_max):
                out.append(self._frame(entries, tickets, flags))
                entries, tickets, size = [], [], 2
            entries.append(entry)
            tickets.append(Ticket(entry.id, sock, meta, data, state))
            size += esize
        if entries:
            out.append(self._frame(entries, tickets, flags))
        return out

    def _fd_frames(
        self, items: list[tuple[socket.socket, Any, bytes]], ack: bool,
    ) -> list[tuple[bytes, list[int], list[Ticket]]]:
        """The batched hot path: entries packed straight into the payload (the same
        bytes as :func:`~sockshare.protocol.encode_handoff`; the test vectors check)."""
        out: list[tuple[bytes, list[int], list[Ticket]]] = []
        flags = FLAG_ACK if ack else 0
        peer_max = self.peer.max_payload if self.peer else MAX_PAYLOAD
        state: TicketState = "pending" if ack else "sent"
        parts: list[bytes] = [b""]
        fds: list[int] = []
        tickets: list[Ticket] = []
        size = 2
        pack, code_of = _ENTRY.pack, SocketKind.code_of
        for sock, meta, pre in items:
            raw = meta if type(meta) is bytes and len(meta) <= MAX_META else _encode_meta(meta)
            data = pre if type(pre) is bytes else bytes(pre)
            ldata = len(data)
            if ldata > MAX_DATA:
                raise MessageTooLarge(f"pre-read data of {ldata} bytes; the limit is {MAX_DATA}")
            esize = 20 + len(raw) + ldata
            if esize + 2 > peer_max:
                raise MessageTooLarge(
                    f"a handoff of {esize + 2} bytes is over the peer's limit of {peer_max}")
            if tickets and (len(tickets) >= BATCH or size + esize > peer_max):
                out.append(self._close_frame(parts, fds, tickets, flags, size))
                parts, fds, tickets, size = [b""], [], [], 2
            hid = next(_ids)
            parts.append(pack(hid, code_of(sock), len(raw), ldata))
            parts.append(raw)
            parts.append(data)
            fds.append(sock.fileno())
            tickets.append(Ticket(hid, sock, meta, data, state))
            size += esize
        if tickets:
            out.append(self._close_frame(parts, fds, tickets, flags, size))
        return out

    @staticmethod
    def _close_frame(parts: list[bytes], fds: list[int], tickets: list[Ticket], flags: int,
                     size: int) -> tuple[bytes, list[int], list[Ticket]]:
        parts[0] = HEADER.pack(MAGIC, VERSION, _HANDOFF, flags, len(fds), 0, size) + _U16.pack(len(fds))
        return b"".join(parts), fds, tickets

    def _frame(
        self, entries: list[HandoffEntry], tickets: list[Ticket], flags: int,
    ) -> tuple[bytes, list[int], list[Ticket]]:
        payload = encode_handoff(entries, wsa=self.wsa)
        fds = [] if self.wsa else [t.socket.fileno() for t in tickets if t.socket is not None]
        frame = encode_frame(FrameType.HANDOFF, payload, flags=flags, nfds=len(fds),
                             max_payload=self.peer.max_payload if self.peer else MAX_PAYLOAD)
        return frame, fds, tickets

    # -- incoming ----------------------------------------------------------------

    def receive_data(self, data: bytes, fds: list[int], answer: Any, cut: bool = False) -> None:
        """Feed what one receive returned; ``answer`` goes into each Handoff.

        ``cut``: the kernel truncated this read's descriptors (this process is at its
        fd limit): the handoffs whose descriptor never arrived are answered REJECT
        (``NO_FDS``: the sender still has them) instead of breaking the channel."""
        decoder = self.decoder
        if cut:
            decoder.feed(data, fds, cut=True)
            while (frame := decoder.next_frame()) is not None:
                self._on_frame(frame, answer)
            return
        if fds and not decoder.buffered and not decoder.holds_fds:
            # Hot path: exactly one whole HANDOFF frame with its descriptors, the common
            # case since the kernel ends a read after each message that carries fds.
            if len(fds) == 1 and len(data) >= _SINGLE.size and self._single(data, fds[0], answer):
                return
            if len(data) >= 12:
                magic, version, ftype, flags, nfds, reserved, length = HEADER.unpack_from(data)
                if (ftype == _HANDOFF and magic == MAGIC and version == VERSION and not reserved
                        and nfds == len(fds) and len(data) == 12 + length
                        and length <= decoder.max_payload and decoder.allow_fds):
                    self._on_handoff(Frame(FrameType.HANDOFF, data[12:], flags, tuple(fds)), answer)
                    return
        if not data and not fds:
            self.decoder.end_of_stream()
            raise ConnectionResetError("the peer closed the channel")
        self.decoder.feed(data, fds)
        while (frame := self.decoder.next_frame()) is not None:
            self._on_frame(frame, answer)

    def _single(self, data: bytes, fd: int, answer: Any) -> bool:
        """Decode a one-socket HANDOFF frame that fills ``data`` exactly; False (nothing
        consumed) if it is not one. ``data`` has at least ``_SINGLE.size`` bytes.

        The fixed first 8 header bytes are compared as one string; the rest is one
        struct call. Anything unusual goes to the general decoder, which says why."""
        head = data[:8]
        if head == _PREFIX_UNACKED:
            acked = False
        elif head == _PREFIX_ACKED:
            acked = True
        else:
            return False
        length, count, hid, rawkind, mlen, dlen = _SINGLE_TAIL.unpack_from(data, 8)
        if (count != 1 or len(data) != 12 + length or length != 22 + mlen + dlen
                or mlen > MAX_META or dlen > MAX_DATA or length > self.max_payload
                or self.wsa):  # (WSA frames carry blobs, not descriptors)
            return False
        try:
            kind = _UNPACKED.get(rawkind) or SocketKind.unpack(rawkind)
            sock = checked_socket(fd, kind, self.socket_blocking, "handoff ", hid)
        except BaseException:
            close_fds([fd])
            raise
        end = 34 + mlen
        h = Handoff(hid, sock, data[end:], data[34:end], acked, answer)
        self.incoming.append(h)
        if acked:
            self.outstanding[hid] = h
        self.received += 1
        return True

    def _on_frame(self, frame: Frame, answer: Any) -> None:
        t = frame.type
        if t == FrameType.HANDOFF:
            self._on_handoff(frame, answer)
        elif frame.fds:
            close_fds(frame.fds)
            raise RemoteProtocolError(f"{t.name} frame carried {len(frame.fds)} descriptors")
        elif t == FrameType.ACCEPT:
            log = self.accepted_log
            for hid in decode_accept(frame.payload):
                ticket = self._ticket(hid)
                ticket.state = "accepted"
                self.counters["accepted"] += 1
                if ticket.socket is not None:
                    ticket.socket.close()
                    ticket.socket = None
                if log is not None:
                    log.append(ticket)
        elif t == FrameType.REJECT:
            rej = decode_reject(frame.payload)
            ticket = self._ticket(rej.id)
            ticket.state, ticket.reason = "rejected", rej.reason
            self.counters["rejected"] += 1
            self.returned.append(ticket)
        elif t == FrameType.CONTROL:
            self.controls.append(decode_control(frame.payload))
        elif t == FrameType.BYE:
            # The peer sends nothing more but still reads our answers until it closes.
            self.peer_said_bye = True
        elif t == FrameType.ERROR:
            raise error_to_exception(decode_error(frame.payload))
        else:
            raise RemoteProtocolError(f"unexpected {t.name} frame on a channel")

    def _ticket(self, hid: int) -> Ticket:
        ticket = self.tickets.pop(hid, None)
        if ticket is None:
            raise RemoteProtocolError(f"the peer answered handoff {hid}, which is not pending")
        return ticket

    def _on_handoff(self, frame: Frame, answer: Any) -> None:
        fds = list(frame.fds)
        try:
            wsa = bool(frame.flags & FLAG_WSA)
            if wsa != self.wsa:
                raise RemoteProtocolError("HANDOFF frame of the wrong transport kind")
            entries = decode_handoff(frame.payload, wsa=wsa)
            if not wsa and len(entries) != len(fds):
                raise RemoteProtocolError(
                    f"HANDOFF frame lists {len(entries)} sockets but carries {len(fds)} fds")
            acked = bool(frame.flags & FLAG_ACK)
            made: list[Handoff] = []
            missing: list[int] = []
            blocking = self.socket_blocking
            try:
                for i, e in enumerate(entries):
                    if not wsa and fds[i] < 0:  # the kernel cut it: we are out of fds
                        missing.append(e.id)
                        continue
                    if wsa:
                        sock = self._import_blob(e)
                    else:
                        sock = checked_socket(fds[i], e.kind, blocking, "handoff ", e.id)
                        fds[i] = -1  # owned by sock now
                    made.append(Handoff(e.id, sock, e.data, e.meta, acked, answer))
            except BaseException:
                for h in made:
                    h.socket.close()
                raise
        except BaseException:
            close_fds([fd for fd in fds if fd >= 0])
            raise
        self.received += len(made)
        self.incoming.extend(made)
        if acked:
            for h in made:
                self.outstanding[h.id] = h
        if missing:
            if acked:
                log.warning("out of file descriptors: %d handoff(s) given back to the sender",
                            len(missing))
                for hid in missing:
                    answer(hid, NO_FDS)
            else:
                log.error("out of file descriptors: %d fire-and-forget handoff(s) lost (the "
                          "kernel closed them; their sender had already closed its copies)",
                          len(missing))

    def _import_blob(self, e: HandoffEntry) -> socket.socket:
        """Import a WSAPROTOCOL_INFO blob (Windows) in the documented blocking mode."""
        if sys.platform != "win32":
            raise RemoteProtocolError("WSAPROTOCOL_INFO blobs can only be imported on Windows")
        sock = socket.fromshare(e.blob)
        if self.socket_blocking is not None:
            sock.setblocking(self.socket_blocking)
        return sock

    def fail(self, exc: BaseException) -> None:
        """The channel broke: give every pending ticket back, close stray descriptors.

        Acknowledged handoffs we received and did not answer are the sender's again:
        queued ones are closed here, and answering one the application holds raises
        ChannelBroken (it must not be served). Fire-and-forget handoffs stay ours."""
        if self.broken is None:
            self.broken = exc
        close_fds(self.decoder.take_fds())
        if self.outstanding:
            keep = [h for h in self.incoming if not h.acked]  # fire-and-forget: ours
            for h in self.incoming:
                if h.acked:
                    h.socket.close()
            self.incoming.clear()
            self.incoming.extend(keep)
            self.outstanding.clear()
        tickets, self.tickets = self.tickets, {}  # (a sender thread may be adding one)
        for ticket in tickets.values():
            ticket.state = "returned"
            ticket.reason = f"the channel broke before the receiver answered: {exc}"
            self.counters["returned"] += 1
            self.returned.append(ticket)

    def closing_frames(self) -> list[bytes]:
        """Answers owed before BYE: REJECT what is still queued (closing our copies),
        ACCEPT what the application holds unanswered."""
        out: list[bytes] = []
        while self.incoming:
            h = self.incoming.popleft()
            h.socket.close()
            if h.acked and not h.answered:
                h.answered = True
                self.outstanding.pop(h.id, None)
                out.append(encode_frame(FrameType.REJECT, encode_reject(
                    Reject(h.id, "the receiver closed the channel before taking it"))))
        for h in self.outstanding.values():
            h.answered = True
            self.pending_accepts.append(h.id)
        self.outstanding.clear()
        accepts = self.take_accepts()
        if accepts is not None:
            out.append(accepts)
        return out

    def abandon_pending(self) -> None:
        """This side is closing and the live peer did not answer: close our copies."""
        tickets, self.tickets = self.tickets, {}
        for ticket in tickets.values():
            ticket.state = "abandoned"
            ticket.reason = "the receiver did not answer before this side closed the channel"
            if ticket.socket is not None:
                ticket.socket.close()
                ticket.socket = None

    def check_usable(self) -> None:
        if self.closed:
            raise ChannelClosed("this channel was closed by this side")
        if self.broken is not None:
            raise ChannelBroken(f"the channel is broken: {self.broken}") from self.broken


def _not_json(obj: object) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# The C encoder built once (json.dumps builds one per call: half its cost on small dicts).
# Without a markers dict it does not detect cycles: RecursionError is caught below.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode: Any = None
if _c_make_encoder is not None:
    _c_encode = _c_make_encoder(None, _not_json, json.encoder.encode_basestring_ascii, None,
                                ":", ",", False, False, True)

    def _json_encode(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))
else:  # pragma: no cover - PyPy and friends
    _json_encode = json.JSONEncoder(separators=(",", ":")).encode  # type: ignore[assignment]


def _encode_meta(meta: Any) -> bytes:
    if meta is None:
        return b""
    if isinstance(meta, bytes | bytearray):
        raw = bytes(meta)  # pre-encoded by the caller: a JSON object, unchecked
    elif not isinstance(meta, dict):
        raise LocalProtocolError(
            f"handoff metadata must be a dict (a JSON object), not {type(meta).__name__}")
    else:
        try:
            raw = _json_encode(meta).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise LocalProtocolError(f"handoff metadata must be JSON-compatible: {exc}") from None
    if len(raw) > MAX_META:
        raise MessageTooLarge(f"metadata of {len(raw)} bytes; the limit is {MAX_META}")
    return raw


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


def _hello_for(max_payload: int, name: str, wsa: bool) -> bytes:
    features = FEATURE_ACK | (FEATURE_WSA if wsa else FEATURE_SCM)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    hello = Hello(os.getpid(), uid, 3, features, max_payload, name)
    return encode_frame(FrameType.HELLO, encode_hello(hello))


# --- the blocking channel ----------------------------------------------------------------


class Channel:
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
        self._wsa = sock.family != getattr(socket, "AF_UNIX", -1)
        if self._wsa and not IS_WINDOWS:
            raise ChannelError(
                "descriptors cannot travel over TCP on POSIX: use a UNIX socket address")
        self._state = _ChannelState(max_payload=max_payload, wsa=self._wsa)
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
        self._leftovers_read = False
        self._sends_unread = 0
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
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ChannelError(f"nobody listens for handoffs at {os.fspath(address)!r}") from exc
            except PermissionError as exc:
                raise ChannelPermission(
                    f"this process (uid {os.getuid() if hasattr(os, 'getuid') else '?'}) may not "
                    f"connect to {os.fspath(address)!r}: {exc.strerror}; the listener's owner "
                    "decides who may (its file mode, allow_uids)") from exc
            ch = cls(sock, max_payload=max_payload, name=name)
            ch._handshake(timeout, policy=None)
        except BaseException:
            sock.close()
            raise
        return ch

    @classmethod
    def pair(cls, *, max_payload: int = MAX_PAYLOAD) -> tuple[Channel, Channel]:
        """Two connected ends in this process (hand one to a child with pass_fds)."""
        a, b = socket.socketpair()
        ca, cb = cls(a, max_payload=max_payload), cls(b, max_payload=max_payload)
        for c in (ca, cb):
            c._sock.sendall(_hello_for(max_payload, "", c._wsa))
        for c in (ca, cb):
            c._handshake(HANDSHAKE_TIMEOUT, policy=None, send_hello=False)
        return ca, cb

    @classmethod
    def from_socket(cls, sock: socket.socket, *, max_payload: int = MAX_PAYLOAD,
                    name: str = "") -> Channel:
        """Wrap a connected socket (e.g. one end of a socketpair inherited by a child)."""
        ch = cls(sock, max_payload=max_payload, name=name)
        ch._handshake(HANDSHAKE_TIMEOUT, policy=None)
        return ch

    def _handshake(self, timeout: float, policy: _Policy | None, send_hello: bool = True) -> None:
        """Exchange HELLOs. With a ``policy`` (the listening side) the peer's HELLO is
        checked first and answered with our HELLO or an ERROR; otherwise we speak first."""
        sock = self._sock
        sock.settimeout(timeout)
        if send_hello and policy is None:
            try:
                sock.sendall(_hello_for(self._state.max_payload, self.name, self._wsa))
            except (BrokenPipeError, ConnectionResetError):
                # A listener that refuses us by our uid answers and hangs up before it
                # reads a byte: its ERROR frame is still ours to read, so read it.
                pass
        deadline = time.monotonic() + timeout
        decoder = FrameDecoder(max_payload=4096, allow_fds=False)
        frame: Frame | None = None
        got = 0
        try:
            while frame is None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                # Read no byte past the peer's first frame: the next one may carry fds,
                # which the kernel discards on a plain recv() (docs/protocol.md).
                want = HEADER.size - got if got < HEADER.size else (
                    HEADER.size + int.from_bytes(decoder._buf[8:12], "big") - got)
                try:
                    data = sock.recv(want)
                except TimeoutError:
                    raise PeerRefused(f"the peer sent no HELLO within {timeout} s") from None
                except ConnectionResetError:
                    data = b""
                if not data:
                    raise PeerRefused("the peer closed the connection during the handshake")
                got += len(data)
                decoder.feed(data)
                frame = decoder.next_frame()
        except RemoteProtocolError as exc:
            raise PeerRefused(f"the peer does not speak the sockshare channel protocol: {exc}") from exc
        if frame.type == FrameType.ERROR:
            raise PeerRefused(str(error_to_exception(decode_error(frame.payload))))
        if frame.type != FrameType.HELLO:
            raise PeerRefused(f"expected HELLO, the peer sent {frame.type.name}")
        hello = decode_hello(frame.payload)
        if hello.version != 1:
            self._refuse(f"protocol version {hello.version} is not supported (this side speaks 1)")
        if sock.family == getattr(socket, "AF_UNIX", -1):
            kpid, kuid, _ = peer_credentials(sock)
            # socketpair ends report their creator's pid: only a third pid is a lie
            if kpid and kpid != os.getpid() and kpid != hello.pid:
                self._refuse(f"HELLO says pid {hello.pid} but the kernel says pid {kpid}")
            if kuid != hello.uid:
                self._refuse(f"HELLO says uid {hello.uid} but the kernel says uid {kuid}")
        if policy is not None:
            why = policy.refusal(hello.pid, hello.uid)
            if why:
                self._refuse(why)
        self._state.peer = PeerInfo(hello.pid, hello.uid, hello.name, hello.features,
                                    min(hello.max_payload, MAX_PAYLOAD))
        if policy is not None:
            sock.sendall(_hello_for(self._state.max_payload, self.name, self._wsa))
        # leftover bytes after HELLO (the peer may already be sending) go to the channel
        rest = decoder.take_fds()
        close_fds(rest)
        if decoder.buffered:
            leftover = bytes(decoder._buf)
            self._state.decoder.feed(leftover)
        sock.settimeout(None)

    def _refuse(self, why: str) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(encode_frame(FrameType.ERROR, encode_error(ErrorCode.REFUSED, why)))
        raise PeerRefused(why)

    # -- properties ----------------------------------------------------------------

    @property
    def peer(self) -> PeerInfo:
        """The peer's pid, uid, name and features, from the handshake."""
        assert self._state.peer is not None
        return self._state.peer

    @property
    def counters(self) -> dict[str, int]:
        """Handoffs sent, received, accepted, rejected, returned on this channel."""
        st = self._state
        return {**st.counters, "received": st.received}

    @property
    def closed(self) -> bool:
        return self._state.closed

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
        st = self._state
        mine = {t.id for t in tickets}
        for t in tickets:
            st.tickets.pop(t.id, None)
        if st.returned and any(t.id in mine for t in st.returned):
            kept = [t for t in st.returned if t.id not in mine]
            st.counters["returned"] -= len(st.returned) - len(kept)
            st.returned.clear()
            st.returned.extend(kept)
        for t in tickets:
            t.state, t.reason = "returned", f"not sent: the channel broke ({exc})"
        raise ChannelBroken(f"the peer is gone: {exc}") from exc

    def _send_timed_out(self, tickets: list[Ticket]) -> None:
        """Nothing of a handoff frame went: unregister its tickets. On Windows the frame
        already holds handles duplicated into the peer (``socket.share``), which a peer
        that goes on would keep: the channel is broken instead, so the peer closes them."""
        for t in tickets:
            self._state.tickets.pop(t.id, None)
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
        frame, fd, ticket = st.single_frame(sock, meta, data, ack)
        if ack:
            ticket._channel = self
            st.tickets[ticket.id] = ticket
        sent = 0
        if self._wlock.acquire(blocking=False):  # the common case: one sendmsg
            failed: OSError | None = None
            try:
                if not self._out:  # (never into the middle of a queued frame)
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
        if not sent:
            try:
                ok = self._send_handoff(frame, [fd])
            except OSError as exc:
                self._send_failed([ticket], exc)
            if not ok:
                self._send_timed_out([ticket])
                raise ChannelTimeout(
                    f"the peer read no handoff for {self.send_timeout} s; nothing was sent "
                    "and the socket is still yours")
        st.counters["sent"] += 1
        if not ack:
            sock.close()
            ticket.socket = None
        return ticket

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
        frames = st.handoff_frames(batch, ack)
        out: list[Ticket] = []
        for frame, fds, tickets in frames:
            if ack:
                for t in tickets:
                    t._channel = self
                    st.tickets[t.id] = t
            try:
                ok = self._send_handoff(frame, fds)
            except OSError as exc:
                self._send_failed(tickets, exc)
            if not ok:
                self._send_timed_out(tickets)
                raise ChannelTimeout(
                    f"the peer read no handoff for {self.send_timeout} s; {len(out)} of "
                    f"{len(batch)} handoffs went (see .sent), the other sockets are still yours",
                    out)
            st.counters["sent"] += len(tickets)
            if not ack:
                for t in tickets:
                    if t.socket is not None:
                        t.socket.close()
                        t.socket = None
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

    def receive_many(self, max_count: int = BATCH, timeout: float | None = None) -> list[Handoff]:
        """Wait for at least one handoff; return up to ``max_count`` that are ready."""
        out = [self.receive(timeout)]
        incoming = self._state.incoming
        while incoming and len(out) < max_count:
            out.append(incoming.popleft())
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
        ``send_timeout`` (then :class:`~sockshare.ChannelTimeout`, nothing sent)."""
        self._state.check_usable()
        frame = encode_frame(FrameType.CONTROL, encode_control(obj))
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
        incoming = st.incoming
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rlock:
            while not incoming:
                if st.peer_said_bye and not st.closed:
                    raise ChannelEnded("the peer ended the channel (BYE)")
                if st.closed or st.broken is not None:
                    st.check_usable()
                if st.pending_accepts:
                    self.flush()
                if not self._pump(deadline):
                    raise ChannelTimeout(f"no handoff arrived within {timeout} s")
            return incoming.popleft()

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
        out = list(st.returned)
        st.returned.clear()
        return out

    def receive_control(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rlock:
            while not self._state.controls:
                self._state.check_usable()
                if not self._pump(deadline):
                    raise ChannelTimeout(f"no control message within {timeout} s")
            return self._state.controls.popleft()

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

    def _read_once(self, deadline: float | None) -> bool:
        """Read once (until ``deadline``) and process. False on timeout."""
        cut = False
        try:
            if self._wsa:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not wait_ready(self._sock, write=False, timeout=remaining)[0]:
                    return False
                data, fds = self._sock.recv(RECV_BUF), list[int]()
            else:
                try:  # with a deadline, try first and poll only if nothing is there yet;
                    # without one, a plain blocking read (one syscall, the kernel waits)
                    data, anc, flags, _ = self._sock.recvmsg(
                        RECV_BUF, CMSG_SPACE_MAX, RECV_FLAGS if deadline is not None else _BLOCKING_FLAGS)
                except BlockingIOError:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    # readable now (True): the caller loops and reads; False: timed out
                    return wait_ready(self._sock, write=False, timeout=remaining)[0]
                if len(anc) == 1 and not flags & _TRUNCATED and len(data) >= _SINGLE.size and _FAST_CLOEXEC:
                    # hot path: one descriptor with (usually) one whole single-socket frame
                    _level, ctype, cdata = anc[0]
                    if ctype == _SCM_RIGHTS and len(cdata) == 4 and self._state.decoder.idle:
                        fd = _FD.unpack(cdata)[0]
                        try:
                            if self._state._single(data, fd, self._answer):
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
        try:
            self._state.receive_data(data, fds, self._answer, cut)
        except (OSError, SockshareError, ValueError) as exc:
            self._break(exc)
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
        if self._wsa or self._leftovers_read:
            return
        self._leftovers_read = True
        for _ in range(64):
            try:
                data, fds = recv_with_fds(self._sock, RECV_BUF, MSG_DONTWAIT)
            except (OSError, SockshareError):
                return
            if not data and not fds:
                return
            try:
                self._state.receive_data(data, fds, self._answer)
            except (OSError, SockshareError, ValueError):
                return

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
        """
        st = self._state
        if st.closed:
            return
        if st.broken is None:
            # Another thread may be blocked in receive(): then it reads the answers, and
            # this one only writes and watches the tickets.
            reading = self._rlock.acquire(timeout=self.close_timeout)
            try:
                for frame in st.closing_frames():
                    self._queue(frame)
                self._queue(encode_frame(FrameType.BYE))
                if self._out:
                    self._room_for_queue()
                now = time.monotonic()
                flush_by = None if self.send_timeout is None else now + self.send_timeout
                answers_by = now + self.close_timeout
                while st.broken is None:
                    now = time.monotonic()
                    if self._out and (flush_by is None or now < flush_by):
                        until: float | None = flush_by
                    elif st.tickets and now < answers_by:
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
        st.abandon_pending()
        st.fail(ChannelClosed("closed by this side"))
        st.closed = True
        while st.incoming:  # fire-and-forget handoffs nobody took
            st.incoming.popleft().socket.close()
        with contextlib.suppress(OSError):  # wakes a thread blocked reading it
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class _Policy:
    uids: frozenset[int] | None
    pids: frozenset[int] | None

    def refusal(self, pid: int, uid: int) -> str:
        if self.pids is not None and pid not in self.pids:
            return f"pid {pid} is not in this listener's allow-list"
        if self.uids is not None and uid not in self.uids:
            return f"uid {uid} may not hand off to this listener (allowed: {sorted(self.uids)})"
        return ""


class ChannelListener:
    """A listening channel address. :meth:`accept` returns handshaken :class:`Channel` s."""

    def __init__(
        self, address: str | os.PathLike[str], *, allow_uids: Iterable[int] | None,
        allow_pids: Iterable[int] | None, backlog: int, mode: int, max_payload: int,
        name: str,
    ) -> None:
        family, addr = _parse_address(address)
        self.address = os.fspath(address)
        self._path = addr if family == getattr(socket, "AF_UNIX", -1) and isinstance(addr, str) else None
        own_uid = os.getuid() if hasattr(os, "getuid") else 0
        uids = frozenset(allow_uids) if allow_uids is not None else frozenset({own_uid})
        self._policy = _Policy(uids, frozenset(allow_pids) if allow_pids is not None else None)
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
        if conn.family != getattr(socket, "AF_UNIX", -1) or self._policy.uids is None:
            return True
        try:
            _pid, uid, _gid = peer_credentials(conn)
        except (OSError, SockshareError):
            return True  # the handshake checks again
        if uid in self._policy.uids:
            return True
        why = f"uid {uid} may not hand off to this listener (allowed: {sorted(self._policy.uids)})"
        with contextlib.suppress(OSError):
            conn.send(encode_frame(FrameType.ERROR, encode_error(ErrorCode.REFUSED, why)),
                      MSG_DONTWAIT)
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
