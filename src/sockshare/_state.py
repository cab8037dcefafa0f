"""The channel's protocol state, without I/O: bytes and descriptors in, events and bytes out.

:class:`ChannelState` is everything one end of a handoff channel knows (the peer, the
tickets of its own handoffs, the handoffs it received, the answers it owes, the
counters) and every protocol decision: the handshake and its policy check (given the
kernel's peer credentials as plain values), ticket registration, ACCEPT/REJECT, BYE and
the end of the stream, the close sequence. It never reads or writes the channel socket,
never sleeps and never looks at the clock. The adapters move bytes and descriptors:

* :class:`sockshare.Channel` (``_channel.py``), blocking, with its own write queue;
* :class:`sockshare.AsyncChannel` (``_aio.py``), on an asyncio loop.

Both feed what they read to :meth:`ChannelState.receive_data` (or, for one whole
one-socket HANDOFF frame, :meth:`ChannelState.receive_single`), write the bytes its
methods return, and read its queues through its ``take_*`` methods; neither writes its
fields.

Descriptors: a received descriptor becomes a socket object through the ``adopt`` hook
(by default :func:`sockshare.backends._fds.checked_socket`, which checks the kind the
peer claims), stray ones are closed through ``discard``, and a socket this side no
longer owns (its handoff was accepted, or sent fire-and-forget) through ``release``;
on Windows, ``share`` and ``import_blob`` turn sockets into WSAPROTOCOL_INFO blobs and
back. The state itself makes no system call.
``tests/test_channel_state.py`` drives the state with bytes and plain integers for
descriptors, hooks in place of the OS.

The model is h11's ``Connection`` and websockets' ``protocol.py``: one protocol object,
thin adapters per I/O style. The hot paths (one-socket HANDOFF out and in) are inlined
here: they are measured (``benchmarks/channel.py``).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sockshare import _fast
from sockshare._errors import (
    ChannelBroken,
    ChannelClosed,
    ChannelEnded,
    HandoffRejected,
    HandoffReturned,
    LocalProtocolError,
    MessageTooLarge,
    PeerRefused,
    RemoteProtocolError,
)
from sockshare.backends._fds import checked_socket, share_socket, shared_socket
from sockshare.backends._scm import close_fds
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
from sockshare.protocol._frames import _TYPE_BY_VALUE
from sockshare.protocol._messages import _UNPACKED

__all__ = ["ChannelState", "Handoff", "PeerInfo", "Policy", "StateView", "Ticket"]

log = logging.getLogger("sockshare.channel")

FEATURE_SCM = 0x1
FEATURE_WSA = 0x2
FEATURE_ACK = 0x4
#: Sockets per HANDOFF frame in a batched send (well under SCM_MAX_FD = 253).
BATCH = 64
#: The REJECT reason for a handoff whose descriptor the kernel could not give this
#: process (it is at its fd limit): the sender still owns the connection.
NO_FDS = "receiver out of file descriptors"
#: The largest first frame (HELLO or ERROR) accepted during the handshake.
HANDSHAKE_MAX = 4096

_ids = itertools.count(1)
_HANDOFF = int(FrameType.HANDOFF)
# frame header + entry count + one entry header: the single-handoff hot path
_SINGLE = struct.Struct(">2sBBBBHIHQ4sII")
_SINGLE_TAIL = struct.Struct(">IHQ4sII")
#: bytes a one-socket HANDOFF frame has at least (see ChannelState.receive_single)
SINGLE_MIN = _SINGLE.size
# the first 8 header bytes of a one-socket HANDOFF frame: magic, version, type, flags,
# nfds = 1, reserved = 0
_PREFIX_UNACKED = struct.pack(">2sBBBBH", MAGIC, VERSION, int(FrameType.HANDOFF), 0, 1, 0)
_PREFIX_ACKED = struct.pack(">2sBBBBH", MAGIC, VERSION, int(FrameType.HANDOFF), FLAG_ACK, 1, 0)
_ENTRY = struct.Struct(">Q4sII")
_U16 = struct.Struct(">H")
_BYE = encode_frame(FrameType.BYE)
_NO_LIMIT = 1 << 62

#: ``adopt(fd, kind, blocking, what, ident)``: a received descriptor as a socket object
Adopt = Callable[[int, SocketKind, "bool | None", str, object], socket.socket]

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
    #: sent by the compiled dispatcher path (:meth:`ChannelState.register_compiled`):
    #: ``meta`` is the encoded JSON; made into a Ticket only when it comes back
    compiled: bool = False

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


class StateView:
    """What both adapters (:class:`sockshare.Channel`, :class:`sockshare.AsyncChannel`)
    tell of their :class:`ChannelState`, read-only."""

    _state: ChannelState

    @property
    def peer(self) -> PeerInfo:
        """The peer's pid, uid, name and features, from the handshake."""
        assert self._state.peer is not None
        return self._state.peer

    @property
    def counters(self) -> dict[str, int]:
        """Handoffs sent, received, accepted, rejected, returned on this channel."""
        return self._state.all_counters()

    @property
    def closed(self) -> bool:
        return self._state.closed


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may connect to a listener: pids and uids (None: anyone)."""

    uids: frozenset[int] | None
    pids: frozenset[int] | None

    def refusal(self, pid: int, uid: int) -> str:
        if self.pids is not None and pid not in self.pids:
            return f"pid {pid} is not in this listener's allow-list"
        return self.uid_refusal(uid)

    def uid_refusal(self, uid: int) -> str:
        """Why a peer of ``uid`` is refused ("" if it is not): a listener asks before it
        reads a byte, with the kernel's uid."""
        if self.uids is not None and uid not in self.uids:
            return f"uid {uid} may not hand off to this listener (allowed: {sorted(self.uids)})"
        return ""


def error_frame(why: str) -> bytes:
    """The ERROR frame that refuses a peer."""
    return encode_frame(FrameType.ERROR, encode_error(ErrorCode.REFUSED, why))


class ChannelState:
    """Everything a channel knows, and how frames change it. No I/O here.

    The handshake: send :meth:`hello` (unless this side answers a listener's peer),
    read at most :meth:`handshake_want` bytes at a time into :meth:`handshake_data`
    until it returns True, then :meth:`handshake_done` with the kernel's credentials of
    the peer, which says what to write and whether the peer is refused.

    Then incoming bytes and descriptors go to :meth:`receive_data`; it updates
    ``incoming`` (handoffs for us), the tickets, ``returned`` (tickets given back) and
    the controls, which the adapter takes with :meth:`take_handoff`,
    :meth:`take_returned`, :meth:`take_control`. Frames to send come from
    :meth:`handoff_frames`/:meth:`single_frame` (which register the tickets),
    :meth:`answer`, :meth:`control_frame` and :meth:`start_close`.
    """

    def __init__(
        self, *, max_payload: int = MAX_PAYLOAD, wsa: bool = False, blocking: bool | None = True,
        name: str = "", pid: int = 0, uid: int = 0, adopt: Adopt = checked_socket,
        discard: Callable[[list[int] | tuple[int, ...]], None] = close_fds,
        release: Callable[[socket.socket], None] = socket.socket.close,
        share: Callable[[socket.socket, int], bytes] = share_socket,
        import_blob: Callable[[bytes, bool | None], socket.socket] = shared_socket,
    ) -> None:
        self.wsa = wsa
        self.decoder = FrameDecoder(max_payload=max_payload, allow_fds=not wsa)
        self.max_payload = max_payload
        self.name = name
        self.pid = pid
        self.uid = uid
        self.peer: PeerInfo | None = None
        #: the largest payload the peer takes (no limit before its HELLO)
        self.peer_limit = _NO_LIMIT
        self.incoming: deque[Handoff] = deque()
        self.tickets: dict[int, Ticket] = {}
        self.returned: deque[Ticket] = deque()
        self.controls: deque[dict[str, Any]] = deque()
        self.broken: BaseException | None = None
        self.closed = False
        self.peer_said_bye = False
        #: the mode received sockets are put in (None: as they come)
        self.socket_blocking: bool | None = blocking
        self.counters = {"sent": 0, "accepted": 0, "rejected": 0, "returned": 0}
        self.received = 0  # an attribute, not in the dict: the hot path counts it
        self.pending_accepts: list[int] = []
        #: acknowledged handoffs sent by the compiled dispatcher path and not answered:
        #: id -> (descriptor, meta JSON, time.monotonic() when sent, pre-read data: the
        #: HTTP head a compiled sniff read, else b""). No Ticket and no
        #: socket object for them: an ACCEPT closes the descriptor (in C), a REJECT or the
        #: end of the channel makes a Ticket of it (:meth:`_compiled_ticket`)
        self.raw: dict[int, tuple[int, bytes, float, bytes]] = {}
        #: how many of those the peer accepted since the adapter last asked
        self.raw_accepted = 0
        #: acked handoffs received and not answered yet (queued or with the application)
        self.outstanding: dict[int, Handoff] = {}
        #: tickets accepted by the peer, when a supervisor asked to track them
        self.accepted_log: list[Ticket] | None = None
        #: tickets the peer answered (ACCEPT or REJECT), when an adapter asked to be told
        #: (:meth:`track_answers`): it wakes the waiters of those tickets and no others
        self.answered_log: list[Ticket] | None = None
        self._adopt = adopt
        #: a socket this side no longer owns is closed the default way (socket.close):
        #: the compiled send may close a fire-and-forget one in C
        self.releases_default = release is socket.socket.close
        #: received descriptors become sockets the default way (checked_socket): the
        #: compiled receive may do it in C
        self.adopts_checked = adopt is checked_socket
        self._discard = discard
        self._release = release
        self._share = share
        self._import_blob = import_blob
        self._hs: FrameDecoder | None = FrameDecoder(max_payload=HANDSHAKE_MAX, allow_fds=False)
        self._hs_got = 0
        self._hs_frame: Frame | None = None

    def set_socket_blocking(self, blocking: bool | None) -> None:
        """The mode received sockets are put in from now on (asyncio wants them
        non-blocking: one ioctl, not two)."""
        self.socket_blocking = blocking

    # -- handshake -----------------------------------------------------------------

    def hello(self) -> bytes:
        """This side's HELLO frame."""
        features = FEATURE_ACK | (FEATURE_WSA if self.wsa else FEATURE_SCM)
        hello = Hello(self.pid, self.uid, 3, features, self.max_payload, self.name)
        return encode_frame(FrameType.HELLO, encode_hello(hello))

    def handshake_want(self) -> int:
        """How many bytes to read next: never a byte past the peer's first frame (the
        next one may carry descriptors, which a plain recv() discards)."""
        assert self._hs is not None
        got = self._hs_got
        if got < HEADER.size:
            return HEADER.size - got
        return HEADER.size + int.from_bytes(self._hs.peek(8, 12), "big") - got

    def handshake_data(self, data: bytes) -> bool:
        """Feed what the handshake read returned; True once the peer's first frame is
        whole. Empty ``data`` is the peer closing: :class:`~sockshare.PeerRefused`, as
        is a peer that does not speak this protocol."""
        if not data:
            raise PeerRefused("the peer closed the connection during the handshake")
        assert self._hs is not None
        self._hs_got += len(data)
        try:
            self._hs.feed(data)
            self._hs_frame = self._hs.next_frame()
        except RemoteProtocolError as exc:
            raise PeerRefused(f"the peer does not speak the sockshare channel protocol: {exc}") from exc
        return self._hs_frame is not None

    def handshake_done(self, credentials: tuple[int, int] | None,
                       policy: Policy | None) -> tuple[bytes, str]:
        """Check the peer's HELLO: against ``credentials`` (the kernel's pid and uid of
        the peer, None where there are none: TCP), and, on the listening side, against
        ``policy``. Returns ``(to_send, refusal)``: the bytes to write now (our HELLO
        for the listening side, an ERROR frame for a refused peer) and why the peer is
        refused ("" if it is not: then ``peer`` is set).

        Raises :class:`~sockshare.PeerRefused` if the peer refused us (ERROR) or sent
        something other than HELLO."""
        frame, hs = self._hs_frame, self._hs
        assert frame is not None
        assert hs is not None
        if frame.type == FrameType.ERROR:
            raise PeerRefused(str(error_to_exception(decode_error(frame.payload))))
        if frame.type != FrameType.HELLO:
            raise PeerRefused(f"expected HELLO, the peer sent {frame.type.name}")
        hello = decode_hello(frame.payload)
        why = ""
        if hello.version != 1:
            why = f"protocol version {hello.version} is not supported (this side speaks 1)"
        elif credentials is not None:
            kpid, kuid = credentials
            # socketpair ends report their creator's pid: only a third pid is a lie
            if kpid and kpid not in (self.pid, hello.pid):
                why = f"HELLO says pid {hello.pid} but the kernel says pid {kpid}"
            elif kuid != hello.uid:
                why = f"HELLO says uid {hello.uid} but the kernel says uid {kuid}"
        if not why and policy is not None:
            why = policy.refusal(hello.pid, hello.uid)
        if why:
            return error_frame(why), why
        self.peer = PeerInfo(hello.pid, hello.uid, hello.name, hello.features,
                             min(hello.max_payload, MAX_PAYLOAD))
        self.peer_limit = self.peer.max_payload
        # leftover bytes after HELLO (the peer may already be sending) go to the channel
        self._discard(hs.take_fds())
        if hs.buffered:
            self.decoder.feed(hs.peek(0, hs.buffered))
        self._hs = self._hs_frame = None
        return (self.hello() if policy is not None else b""), ""

    # -- state ---------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.broken is None and not self.closed

    def check_usable(self) -> None:
        if self.closed:
            raise ChannelClosed("this channel was closed by this side")
        if self.broken is not None:
            raise ChannelBroken(f"the channel is broken: {self.broken}") from self.broken

    def all_counters(self) -> dict[str, int]:
        return {**self.counters, "received": self.received}

    def take_handoff(self) -> Handoff | None:
        """The next handoff received, or None if the adapter must wait for more.
        Raises :class:`~sockshare.ChannelEnded` once the peer said goodbye and every
        handoff it sent was taken; ChannelClosed/ChannelBroken once the channel is."""
        if self.incoming:
            return self.incoming.popleft()
        if self.peer_said_bye and not self.closed:
            raise ChannelEnded("the peer ended the channel (BYE)")
        if self.closed or self.broken is not None:
            self.check_usable()
        return None

    def take_control(self) -> dict[str, Any] | None:
        """The next control message, or None (the adapter waits); raises once the
        channel is closed or broken."""
        if self.controls:
            return self.controls.popleft()
        self.check_usable()
        return None

    def take_returned(self) -> list[Ticket]:
        """Tickets given back since the last call (rejected, or returned by a break)."""
        if not self.returned:
            return []
        out = list(self.returned)
        self.returned.clear()
        return out

    def take_received(self, limit: int | None = None) -> list[Handoff]:
        """Handoffs received and not taken yet (up to ``limit``), without waiting."""
        incoming = self.incoming
        if not incoming:
            return []
        if limit is None or limit >= len(incoming):
            out = list(incoming)
            incoming.clear()
            return out
        return [incoming.popleft() for _ in range(max(0, limit))]

    def take_controls(self) -> list[dict[str, Any]]:
        controls = self.controls
        if not controls:
            return []
        out = list(controls)
        controls.clear()
        return out

    def track_accepts(self) -> None:
        if self.accepted_log is None:
            self.accepted_log = []

    def take_accepted(self) -> list[Ticket]:
        log = self.accepted_log
        if not log:
            return []
        self.accepted_log = []
        return log

    def track_answers(self) -> None:
        """From now on, record every ticket the peer answers (accepted or rejected), for
        :meth:`take_answered`: an adapter wakes the waiters of exactly those tickets."""
        if self.answered_log is None:
            self.answered_log = []

    def take_answered(self) -> list[Ticket]:
        """Tickets the peer answered since the last call (after :meth:`track_answers`).
        Tickets given back by a break or abandoned by a close are not listed: the channel
        ended, and every waiter is woken for that."""
        log = self.answered_log
        if not log:
            return []
        self.answered_log = []
        return log

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

    def control_frame(self, obj: dict[str, Any]) -> bytes:
        """A CONTROL frame for ``obj`` (raises if the channel is not usable, and
        :class:`~sockshare.MessageTooLarge` if it is over the peer's HELLO ``max
        payload``: the peer would refuse it and end the channel)."""
        self.check_usable()
        limit = self.peer.max_payload if self.peer is not None else MAX_PAYLOAD
        return encode_frame(FrameType.CONTROL, encode_control(obj), max_payload=limit)

    # -- outgoing ----------------------------------------------------------------

    def single_frame(
        self, sock: socket.socket, meta: Any, data: bytes, ack: bool, owner: Any = None,
    ) -> tuple[bytes, int, Ticket]:
        """The hot path: one socket, one frame, packed in a single struct call; an acked
        handoff's ticket is registered (``owner``: the adapter, for ``Ticket.wait``).
        Once the frame went, :meth:`sent_one`; if it could not, :meth:`withdraw` or
        :meth:`unsend`.

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
        ticket = self.single_ticket(sock, meta, data, ack, owner, hid)
        return b"".join((head, raw, data)), sock.fileno(), ticket

    def single_ticket(  # noqa: PLR0917 - the hot path: positional
        self, sock: socket.socket, meta: Any, data: bytes, ack: bool, owner: Any = None, hid: int = 0,
    ) -> Ticket:
        """The ticket of a one-socket handoff (registered if acked), with a new id
        unless ``hid`` is given. The compiled send packs and checks the frame itself
        (``sockshare._speedups.send_single``); if it cannot, :meth:`withdraw` this
        ticket and take :meth:`single_frame`."""
        if not hid:
            hid = next(_ids)
        state: TicketState = "pending" if ack else "sent"
        channel = owner if ack else None
        sp = _fast.speedups
        if sp is not None:  # what the dataclass __init__ does, without its Python frame
            ticket: Ticket = sp.new_slots(Ticket, hid, sock, meta, data, state, "", channel, False)
        else:
            ticket = Ticket(hid, sock, meta, data, state, "", channel)
        if ack:
            self.tickets[hid] = ticket
        return ticket

    @staticmethod
    def frame_of(ticket: Ticket, ack: bool) -> tuple[bytes, int]:
        """The frame and descriptor of a one-socket handoff whose ticket
        :meth:`single_ticket` made (the bytes the compiled send wrote)."""
        sock = ticket.socket
        assert sock is not None
        frame = single_bytes(ticket.id, ack, SocketKind.code_of(sock), _encode_meta(ticket.meta), ticket.data)
        return frame, sock.fileno()

    def sent_one(self, ticket: Ticket) -> None:
        """The frame of ``ticket`` (from :meth:`single_frame`) was written."""
        self.counters["sent"] += 1
        if ticket.state == "sent" and ticket.socket is not None:  # (None: the compiled send closed it)
            self._release(ticket.socket)
            ticket.socket = None

    def sent(self, tickets: list[Ticket]) -> None:
        """A frame of :meth:`handoff_frames` was written: count it, and close the
        sender's copies of fire-and-forget handoffs."""
        self.counters["sent"] += len(tickets)
        for t in tickets:
            if t.state == "sent" and t.socket is not None:
                self._release(t.socket)
                t.socket = None

    def withdraw(self, tickets: list[Ticket]) -> None:
        """Nothing of these tickets' frame went: they are unregistered, their sockets
        still the caller's."""
        for t in tickets:
            self.tickets.pop(t.id, None)

    def unsend(self, tickets: list[Ticket], exc: BaseException) -> None:
        """Sending these tickets met a broken channel (after :meth:`fail`): their
        sockets are the caller's through the send's exception, never also through
        :meth:`take_returned`."""
        mine = {t.id for t in tickets}
        for t in tickets:
            self.tickets.pop(t.id, None)
        if self.returned and any(t.id in mine for t in self.returned):
            kept = [t for t in self.returned if t.id not in mine]
            self.counters["returned"] -= len(self.returned) - len(kept)
            self.returned.clear()
            self.returned.extend(kept)
        for t in tickets:
            t.state, t.reason = "returned", f"not sent: the channel broke ({exc})"

    def handoff_frames(
        self, items: list[tuple[socket.socket, Any, bytes]], ack: bool, owner: Any = None,
    ) -> list[tuple[bytes, list[int], list[Ticket]]]:
        """Encode HANDOFF frames for ``items`` (sock, meta, data); register the tickets
        of acked ones (``owner``: the adapter). Each frame written is reported with
        :meth:`sent`; those that are not, with :meth:`withdraw` or :meth:`unsend`."""
        if len(items) == 1 and not self.wsa:
            frame, fd, ticket = self.single_frame(*items[0], ack, owner)
            return [(frame, [fd], [ticket])]
        frames = self._fd_frames(items, ack) if not self.wsa else self._wsa_frames(items, ack)
        if ack:
            tickets = self.tickets
            for _frame, _fds, ts in frames:
                for t in ts:
                    t._channel = owner
                    tickets[t.id] = t
        return frames

    def _wsa_frames(
        self, items: list[tuple[socket.socket, Any, bytes]], ack: bool,
    ) -> list[tuple[bytes, list[int], list[Ticket]]]:
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
                blob = self._share(sock, self.peer.pid)
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
        bytes as :func:`~sockshare.protocol.encode_handoff`; the test vectors check),
        by sockshare._speedups where it is built (``handoff_frame``), else by
        :func:`_pack_handoff`."""
        out: list[tuple[bytes, list[int], list[Ticket]]] = []
        flags = FLAG_ACK if ack else 0
        peer_max = self.peer.max_payload if self.peer else MAX_PAYLOAD
        state: TicketState = "pending" if ack else "sent"
        sp = _fast.speedups
        frame = _pack_handoff if sp is None else sp.handoff_frame
        entries: list[tuple[int, bytes, bytes, bytes]] = []
        fds: list[int] = []
        tickets: list[Ticket] = []
        size = 2
        code_of = SocketKind.code_of
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
                out.append((frame(flags, entries), fds, tickets))
                entries, fds, tickets, size = [], [], [], 2
            hid = next(_ids)
            entries.append((hid, code_of(sock), raw, data))
            fds.append(sock.fileno())
            tickets.append(Ticket(hid, sock, meta, data, state))
            size += esize
        if tickets:
            out.append((frame(flags, entries), fds, tickets))
        return out

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
            if len(fds) == 1 and len(data) >= _SINGLE.size and self.receive_single(data, fds[0], answer):
                return
            if len(data) >= 12:
                magic, version, ftype, flags, nfds, reserved, length = HEADER.unpack_from(data)
                if (ftype == _HANDOFF and magic == MAGIC and version == VERSION and not reserved
                        and nfds == len(fds) and len(data) == 12 + length
                        and length <= decoder.max_payload and decoder.allow_fds):
                    self._on_handoff(Frame(FrameType.HANDOFF, data[12:], flags, tuple(fds)), answer)
                    return
        if not fds and len(data) >= 12 and decoder.idle:
            # Answers and controls (no descriptors), whole frames back to back, nothing
            # buffered: each is taken from ``data`` in place. The first frame that is not
            # plain (bad header, a partial frame, descriptors announced) and everything
            # after it go to the decoder, which buffers it or says what is wrong.
            pos, size, limit = 0, len(data), decoder.max_payload
            while size - pos >= 12:
                magic, version, ftype, flags, nfds, reserved, length = HEADER.unpack_from(data, pos)
                end = pos + 12 + length
                kind = _TYPE_BY_VALUE.get(ftype)
                if (end > size or kind is None or magic != MAGIC or version != VERSION
                        or reserved or nfds or length > limit):
                    break
                self._on_frame(Frame(kind, data[pos + 12:end], flags, ()), answer)
                pos = end
            if pos == size:
                return
            data = data[pos:]
        if not data and not fds:
            self.decoder.end_of_stream()
            raise ConnectionResetError("the peer closed the channel")
        self.decoder.feed(data, fds)
        while (frame := self.decoder.next_frame()) is not None:
            self._on_frame(frame, answer)

    def receive_single(self, data: bytes, fd: int, answer: Any) -> bool:
        """Decode a one-socket HANDOFF frame that fills ``data`` exactly, received with
        the one descriptor ``fd``, when nothing else is buffered; False (nothing
        consumed: feed :meth:`receive_data`) if it is not one. ``data`` has at least
        ``SINGLE_MIN`` bytes.

        The fixed first 8 header bytes are compared as one string; the rest is one
        struct call. Anything unusual goes to the general decoder, which says why."""
        head = data[:8]
        if not self.decoder.idle:
            return False
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
            sock = self._adopt(fd, kind, self.socket_blocking, "handoff ", hid)
        except BaseException:
            self._discard([fd])
            raise
        end = 34 + mlen
        h = Handoff(hid, sock, data[end:], data[34:end], acked, answer)
        self.incoming.append(h)
        if acked:
            self.outstanding[hid] = h
        self.received += 1
        return True

    def received_singles(self, handoffs: list[Handoff], acked: int) -> None:
        """Handoffs the compiled receive made of whole one-socket HANDOFF frames
        (``sockshare._speedups.recv_batch``: :meth:`receive_single` in C), ``acked`` of
        them acknowledged ones."""
        self.incoming.extend(handoffs)
        self.received += len(handoffs)
        if acked:
            out = self.outstanding
            for h in handoffs:
                if h.acked:
                    out[h.id] = h

    def settled_answers(self, n: int, controls: list[Any]) -> None:
        """What a compiled read settled (``sockshare._speedups.recv_answers``): ``n``
        compiled handoffs accepted (removed from :attr:`raw`, descriptors closed), as
        ACCEPT frames do in :meth:`_on_frame`, and the CONTROL frames that followed them,
        in order: each a payload, or the object C already read (a report of closed
        connections, exactly as json.loads reads it)."""
        if n:
            self.raw_accepted += n
            self.counters["accepted"] += n
        for payload in controls:
            self.controls.append(payload if type(payload) is dict else decode_control(payload))

    def _on_frame(self, frame: Frame, answer: Any) -> None:
        t = frame.type
        if t == FrameType.HANDOFF:
            self._on_handoff(frame, answer)
        elif frame.fds:
            self._discard(frame.fds)
            raise RemoteProtocolError(f"{t.name} frame carried {len(frame.fds)} descriptors")
        elif t == FrameType.ACCEPT:
            log, answered = self.accepted_log, self.answered_log
            if self.raw and _fast.speedups is not None:
                try:
                    n, ids = _fast.speedups.settle_accepts(frame.payload, self.raw)
                except ValueError as exc:
                    raise RemoteProtocolError(str(exc)) from None
                self.raw_accepted += n
                self.counters["accepted"] += n
            else:
                ids = _accept_ids(frame.payload)
            for hid in ids:
                ticket = self._ticket(hid)
                ticket.state = "accepted"
                self.counters["accepted"] += 1
                if ticket.socket is not None:
                    self._release(ticket.socket)
                    ticket.socket = None
                if log is not None:
                    log.append(ticket)
                if answered is not None:
                    answered.append(ticket)
        elif t == FrameType.REJECT:
            rej = decode_reject(frame.payload)
            ticket = self._ticket(rej.id)
            ticket.state, ticket.reason = "rejected", rej.reason
            self.counters["rejected"] += 1
            self.returned.append(ticket)
            if self.answered_log is not None:
                self.answered_log.append(ticket)
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
            if hid in self.raw:
                return self._compiled_ticket(hid)
            raise RemoteProtocolError(f"the peer answered handoff {hid}, which is not pending")
        return ticket

    def register_compiled(self, n: int) -> None:
        """``n`` handoffs were put in :attr:`raw` by the compiled dispatcher path
        (sockshare._speedups.dispatch_burst) and their frame queued: count them sent."""
        self.check_usable()
        self.counters["sent"] += n

    def take_raw_accepted(self) -> int:
        """How many compiled handoffs the peer accepted since the last call."""
        n, self.raw_accepted = self.raw_accepted, 0
        return n

    def _compiled_ticket(self, hid: int) -> Ticket:
        """A compiled handoff comes back (REJECT, or the channel ended): from now on an
        ordinary Ticket, with a socket object of its descriptor."""
        fd, meta, _sent, data = self.raw.pop(hid)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            close_fds([fd])
            sock = None
        return Ticket(hid, sock, meta, data, "pending", "", None, True)

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
            blocking, adopt = self.socket_blocking, self._adopt
            try:
                for i, e in enumerate(entries):
                    if not wsa and fds[i] < 0:  # the kernel cut it: we are out of fds
                        missing.append(e.id)
                        continue
                    if wsa:
                        sock = self._import_blob(e.blob, self.socket_blocking)
                    else:
                        sock = adopt(fds[i], e.kind, blocking, "handoff ", e.id)
                        fds[i] = -1  # owned by sock now
                    made.append(Handoff(e.id, sock, e.data, e.meta, acked, answer))
            except BaseException:
                for h in made:
                    self._release(h.socket)
                raise
        except BaseException:
            self._discard([fd for fd in fds if fd >= 0])
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

    def fail(self, exc: BaseException) -> None:
        """The channel broke: give every pending ticket back, close stray descriptors.

        Acknowledged handoffs we received and did not answer are the sender's again:
        queued ones are closed here, and answering one the application holds raises
        ChannelBroken (it must not be served). Fire-and-forget handoffs stay ours."""
        if self.broken is None:
            self.broken = exc
        self._discard(self.decoder.take_fds())
        if self.outstanding:
            keep = [h for h in self.incoming if not h.acked]  # fire-and-forget: ours
            for h in self.incoming:
                if h.acked:
                    self._release(h.socket)
            self.incoming.clear()
            self.incoming.extend(keep)
            self.outstanding.clear()
        tickets, self.tickets = self.tickets, {}  # (a sender thread may be adding one)
        if self.raw:
            for hid in list(self.raw):
                tickets[hid] = self._compiled_ticket(hid)
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
            self._release(h.socket)
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
        if self.raw:   # (emptied in place: the dispatcher's slot counts this dict)
            close_fds([fd for fd, _meta, _sent, _data in self.raw.values()])
            self.raw.clear()
        for ticket in tickets.values():
            ticket.state = "abandoned"
            ticket.reason = "the receiver did not answer before this side closed the channel"
            if ticket.socket is not None:
                self._release(ticket.socket)
                ticket.socket = None

    def start_close(self) -> list[bytes]:
        """This side closes: the frames to write, answers owed then BYE. The adapter
        then writes them and waits (up to its ``close_timeout``) while
        :attr:`awaiting_answers`, then calls :meth:`finish_close`."""
        return [*self.closing_frames(), _BYE]

    @property
    def awaiting_answers(self) -> bool:
        """True while handoffs of this side wait for the peer's answer."""
        return bool(self.tickets) or bool(self.raw)

    def finish_close(self) -> None:
        """The end: tickets still pending are abandoned (our copies closed: never two
        owners), the rest given back, fire-and-forget handoffs nobody took closed."""
        self.abandon_pending()
        self.fail(ChannelClosed("closed by this side"))
        self.closed = True
        while self.incoming:
            self._release(self.incoming.popleft().socket)


def _pack_handoff(flags: int, entries: list[tuple[int, bytes, bytes, bytes]]) -> bytes:
    """A HANDOFF frame of entries (id, kind code, meta, data): the pure-Python twin of
    ``sockshare._speedups.handoff_frame``."""
    pack = _ENTRY.pack
    parts = [b""]
    size = 2
    for hid, code, raw, data in entries:
        parts += (pack(hid, code, len(raw), len(data)), raw, data)
        size += 20 + len(raw) + len(data)
    parts[0] = HEADER.pack(MAGIC, VERSION, _HANDOFF, flags, len(entries), 0, size) + _U16.pack(len(entries))
    return b"".join(parts)


def single_bytes(hid: int, ack: bool, code: bytes, raw: bytes, data: bytes) -> bytes:
    """A one-socket HANDOFF frame (what :meth:`ChannelState.single_frame` packs)."""
    head = _SINGLE.pack(MAGIC, VERSION, _HANDOFF, FLAG_ACK if ack else 0, 1, 0, 22 + len(raw) + len(data),
                        1, hid, code, len(raw), len(data))
    return b"".join((head, raw, data))


def _accept_ids(payload: bytes) -> list[int]:
    """The ids of an ACCEPT payload (compiled where sockshare._speedups is built)."""
    sp = _fast.speedups
    if sp is None:
        return decode_accept(payload)
    try:
        return sp.accept_ids(payload)
    except ValueError as exc:
        raise RemoteProtocolError(str(exc)) from None


def _not_json(obj: object) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# The C encoder built once (json.dumps builds one per call: half its cost on small dicts).
# Without a markers dict it does not detect cycles: RecursionError is caught below.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode: Any = None
if _c_make_encoder is not None:
    # (allow_nan False: NaN and Infinity are not JSON, and other peers' readers refuse them)
    _c_encode = _c_make_encoder(None, _not_json, json.encoder.encode_basestring_ascii, None,
                                ":", ",", False, False, False)

    def _json_encode(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))
else:  # pragma: no cover - PyPy and friends
    _json_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # type: ignore[assignment]


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

