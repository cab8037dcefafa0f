"""The frame codec: how every sockshare message looks on the wire, with no I/O.

Every message between two sockshare peers (an importer and an export agent, or the
two ends of a handoff channel) is a *frame*: a 12-byte header and a payload::

    offset size  field
    0      2     magic, the bytes 0x53 0x53 ("SS")
    2      1     protocol version (1)
    3      1     frame type (FrameType)
    4      1     flags (per type)
    5      1     nfds: how many file descriptors travel with this frame (0..253)
    6      2     reserved, must be zero
    8      4     payload length, unsigned big-endian, at most the receiver's limit
    12     ...   payload

File descriptors ride as SCM_RIGHTS ancillary data. The rule that makes them safe on a
byte stream: *a frame's descriptors are attached to the sendmsg() call whose data
begins with that frame's first header byte*, and one sendmsg() carries the
descriptors of at most one frame. The kernel delivers descriptors together with the
first byte they were sent with, so by the time a receiver has the whole 12-byte
header, the frame's descriptors have already arrived. The decoder below keeps arriving
descriptors in a FIFO and hands each frame the ``nfds`` at its head.

This module never touches a socket and never closes a descriptor: descriptors are plain
integers here. Whoever feeds the decoder owns what it returns, and must close what
:meth:`FrameDecoder.take_fds` gives back after an error.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import NoReturn

from sockshare._errors import LocalProtocolError, MessageTooLarge, RemoteProtocolError

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_FDS_PER_FRAME",
    "MAX_PAYLOAD",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "encode_frame",
]

MAGIC = b"SS"
VERSION = 1
HEADER = struct.Struct(">2sBBBBHI")
assert HEADER.size == 12
#: Linux refuses more than 253 descriptors in one message (SCM_MAX_FD).
MAX_FDS_PER_FRAME = 253
#: Default and upper bound for one frame's payload. Peers may agree on less.
MAX_PAYLOAD = 1 << 20


class FrameType(enum.IntEnum):
    """What a frame means. Values are part of the wire format."""

    HELLO = 0x01  # handshake: version, pid, uid, features
    ERROR = 0x02  # a refusal or a fatal error, with a code and a text
    BYE = 0x03  # orderly end of a channel
    CLAIM = 0x10  # importer -> export agent: token id and secret
    GRANT = 0x11  # export agent -> importer: the socket (1 fd, or a WSA blob)
    DONE = 0x12  # importer -> export agent: the socket arrived, close your copy
    HANDOFF = 0x20  # channel: one or more sockets with metadata and pre-read bytes
    ACCEPT = 0x21  # channel: the receiver took these handoff ids
    REJECT = 0x22  # channel: the receiver refused one handoff id; sender keeps it
    CONTROL = 0x30  # server control messages (JSON), see docs/protocol.md


_TYPE_BY_VALUE = {int(t): t for t in FrameType}


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``fds`` belong to whoever received the frame."""

    type: FrameType
    payload: bytes = b""
    flags: int = 0
    fds: tuple[int, ...] = field(default=())


def encode_frame(
    ftype: FrameType, payload: bytes = b"", *, flags: int = 0, nfds: int = 0,
    max_payload: int = MAX_PAYLOAD,
) -> bytes:
    """Return header + payload. The caller attaches ``nfds`` descriptors to its sendmsg."""
    if not 0 <= nfds <= MAX_FDS_PER_FRAME:
        raise MessageTooLarge(f"{nfds} descriptors in one frame; the limit is {MAX_FDS_PER_FRAME}")
    if len(payload) > max_payload:
        raise MessageTooLarge(
            f"frame payload of {len(payload)} bytes is over the limit of {max_payload}"
        )
    if not 0 <= flags <= 0xFF:
        raise LocalProtocolError(f"flags {flags!r} do not fit in one byte")
    return HEADER.pack(MAGIC, VERSION, int(ftype), flags, nfds, 0, len(payload)) + payload


class FrameDecoder:
    """Turn received bytes and descriptors into frames.

    Call :meth:`feed` with whatever one ``recvmsg`` returned (bytes and descriptors,
    possibly none of either), then :meth:`next_frame` until it returns ``None``.
    On a :class:`RemoteProtocolError` the stream cannot be resynchronised: stop reading
    and close everything :meth:`take_fds` returns.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD, allow_fds: bool = True) -> None:
        self.max_payload = max_payload
        self.allow_fds = allow_fds
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        # header of the frame being assembled: (type, flags, length, fds already taken)
        self._pending: tuple[FrameType, int, int, tuple[int, ...]] | None = None
        self._failed: RemoteProtocolError | None = None
        #: the kernel cut the descriptors of the last read (MSG_CTRUNC: we are at our fd
        #: limit): the frame they belong to gets -1 for each one that never arrived
        self._cut = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf)

    def peek(self, start: int, end: int) -> bytes:
        """Buffered bytes ``[start:end]``, left in the buffer (the channel handshake
        reads a frame's length before the frame is whole, and hands on what follows)."""
        return bytes(self._buf[start:end])

    @property
    def idle(self) -> bool:
        """True when nothing is buffered and no descriptor waits: the next read starts
        a fresh frame (the receivers' single-frame fast path relies on it)."""
        return not self._buf and not self._fds and self._pending is None and self._failed is None

    @property
    def holds_fds(self) -> bool:
        """True while received descriptors wait for their frame (or an error)."""
        return bool(self._fds) or self._pending is not None or self._failed is not None

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = (), *, cut: bool = False) -> None:
        """Add what one receive call returned. Ownership of ``fds`` passes to the decoder.

        ``cut``: the kernel truncated this read's descriptors (``MSG_CTRUNC``, the
        receiver at its fd limit). The frame they came with is still returned, its
        missing descriptors as ``-1`` (the first ones arrive, in order): the receiver
        answers those entries instead of losing the stream."""
        self._fds.extend(fds)
        if cut:
            self._cut = True
        if self._failed is not None:
            raise self._failed
        if fds and not self.allow_fds:
            self._fail("the peer sent file descriptors on a connection that carries none")
        if len(self._fds) > 2 * MAX_FDS_PER_FRAME:
            self._fail(f"{len(self._fds)} descriptors arrived that no frame claims")
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more bytes are needed."""
        if self._failed is not None:
            raise self._failed
        if self._pending is None:
            if len(self._buf) < HEADER.size:
                self._check_stray_fds()
                return None
            self._pending = self._parse_header()
        ftype, flags, length, fds = self._pending
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        self._pending = None
        return Frame(ftype, payload, flags, fds)

    def end_of_stream(self) -> None:
        """The peer closed its end. Raise if it left a partial frame or unclaimed fds."""
        if self._failed is not None:
            raise self._failed
        if self._buf or self._pending is not None:
            self._fail(
                f"the peer closed the connection in the middle of a frame "
                f"({len(self._buf)} bytes of it received)"
            )
        if self._fds:
            self._fail(f"the peer closed the connection leaving {len(self._fds)} stray fds")

    def take_fds(self) -> list[int]:
        """Give back every descriptor the decoder still holds, for the caller to close."""
        out = list(self._fds)
        self._fds.clear()
        if self._pending is not None:
            out.extend(fd for fd in self._pending[3] if fd >= 0)
            self._pending = None
        return out

    # -- internals -------------------------------------------------------------

    def _fail(self, message: str) -> NoReturn:
        self._failed = RemoteProtocolError(message)
        raise self._failed

    def _check_stray_fds(self) -> None:
        # Descriptors arrive with the first byte of their frame, so when no frame is in
        # progress and no byte waits, every descriptor should have been claimed.
        if self._fds and not self._buf:
            self._fail(f"{len(self._fds)} file descriptors arrived with no frame to carry them")

    def _parse_header(self) -> tuple[FrameType, int, int, tuple[int, ...]]:
        magic, version, ftype, flags, nfds, reserved, length = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            self._fail(f"bad magic {bytes(magic)!r}: the peer does not speak sockshare")
        if version != VERSION:
            self._fail(f"frame of protocol version {version}; this side speaks {VERSION}")
        frame_type = _TYPE_BY_VALUE.get(ftype)
        if frame_type is None:
            self._fail(f"unknown frame type 0x{ftype:02x}")
        if reserved != 0:
            self._fail("reserved header bytes are not zero")
        if length > self.max_payload:
            self._fail(f"frame announces {length} payload bytes; the limit is {self.max_payload}")
        if nfds > MAX_FDS_PER_FRAME:
            self._fail(f"frame announces {nfds} descriptors; the limit is {MAX_FDS_PER_FRAME}")
        if nfds and not self.allow_fds:
            self._fail("frame announces descriptors on a connection that carries none")
        if len(self._fds) < nfds and self._cut and self.allow_fds:
            self._cut = False
            got = tuple(self._fds.popleft() for _ in range(len(self._fds)))
            return frame_type, flags, length, got + (-1,) * (nfds - len(got))
        if len(self._fds) < nfds:
            self._fail(
                f"frame announces {nfds} descriptors but {len(self._fds)} arrived "
                "(truncated by the kernel, or a broken sender)"
            )
        if nfds == 0:
            return frame_type, flags, length, ()
        if nfds == 1:
            return frame_type, flags, length, (self._fds.popleft(),)
        fds = tuple(self._fds.popleft() for _ in range(nfds))
        return frame_type, flags, length, fds
