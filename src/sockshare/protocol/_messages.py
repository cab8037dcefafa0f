"""Payloads of each frame type: small frozen dataclasses and their byte layouts.

All integers are unsigned big-endian. Text is UTF-8. The layouts are documented field
by field in ``docs/protocol.md``; this module is the reference implementation, and
``tests/vectors/frames.json`` holds test vectors every implementation can check against.
Decoding functions raise :class:`~sockshare.RemoteProtocolError` on anything malformed:
they read what a peer sent.
"""

from __future__ import annotations

import _socket
import enum
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from sockshare._errors import (
    InvalidToken,
    LocalProtocolError,
    MessageTooLarge,
    PeerRefused,
    RemoteProtocolError,
    SockshareError,
    TokenConsumed,
    TokenExpired,
    WrongProcess,
)

__all__ = [
    "FLAG_ACK",
    "FLAG_WSA",
    "MAX_DATA",
    "MAX_META",
    "Claim",
    "ErrorCode",
    "ErrorMessage",
    "Grant",
    "HandoffEntry",
    "Hello",
    "Reject",
    "SocketKind",
    "decode_accept",
    "decode_claim",
    "decode_control",
    "decode_done",
    "decode_error",
    "decode_grant",
    "decode_handoff",
    "decode_hello",
    "decode_reject",
    "encode_accept",
    "encode_claim",
    "encode_control",
    "encode_done",
    "encode_error",
    "encode_grant",
    "encode_handoff",
    "encode_hello",
    "encode_reject",
    "error_to_exception",
]

#: Largest metadata (encoded JSON) one handoff may carry.
MAX_META = 16 * 1024
#: Largest pre-read data one handoff may carry.
MAX_DATA = 64 * 1024

_U16 = struct.Struct(">H")

# Frame flags
FLAG_ACK = 0x01  # HANDOFF: the sender waits for ACCEPT/REJECT before closing its copy
FLAG_WSA = 0x02  # HANDOFF/GRANT: entries carry a WSAPROTOCOL_INFO blob instead of an fd


class ErrorCode(enum.IntEnum):
    """Codes of an ERROR frame. Values are part of the wire format."""

    BAD_TOKEN = 1
    WRONG_PROCESS = 2
    CONSUMED = 3
    EXPIRED = 4
    RELEASED = 5
    PROTOCOL = 6
    REFUSED = 7
    LIMIT = 8
    INTERNAL = 9
    SHUTTING_DOWN = 10


_ERROR_CLASSES: dict[int, type[SockshareError]] = {
    ErrorCode.BAD_TOKEN: InvalidToken,
    ErrorCode.WRONG_PROCESS: WrongProcess,
    ErrorCode.CONSUMED: TokenConsumed,
    ErrorCode.EXPIRED: TokenExpired,
    ErrorCode.RELEASED: TokenExpired,
    ErrorCode.PROTOCOL: RemoteProtocolError,
    ErrorCode.REFUSED: PeerRefused,
    ErrorCode.LIMIT: MessageTooLarge,
}


# --- socket kinds: portable codes, since AF_INET6 is 10 on Linux, 30 on macOS, 23 on Windows

_FAMILIES = {1: socket.AF_INET, 2: socket.AF_INET6}
if hasattr(socket, "AF_UNIX"):
    _FAMILIES[3] = socket.AF_UNIX
_TYPES = {1: socket.SOCK_STREAM, 2: socket.SOCK_DGRAM}
if hasattr(socket, "SOCK_SEQPACKET"):
    _TYPES[3] = socket.SOCK_SEQPACKET
_FAMILY_CODES: dict[int, int] = {int(v): k for k, v in _FAMILIES.items()}
_TYPE_CODES: dict[int, int] = {int(v): k for k, v in _TYPES.items()}


@dataclass(frozen=True, slots=True)
class SocketKind:
    """Family, type and protocol of a socket, in this OS's numbering."""

    family: int
    type: int
    proto: int

    @classmethod
    def of(cls, sock: socket.socket) -> SocketKind:
        # The raw C getters return ints (socket.socket's properties build enums: slow).
        # SOCK_NONBLOCK/SOCK_CLOEXEC may be or-ed into the type on Linux.
        key = (_raw_family(sock), _raw_type(sock) & _TYPE_MASK, _raw_proto(sock))
        kind = _KINDS.get(key)
        if kind is None:
            kind = _KINDS[key] = cls(*key)
        return kind

    @staticmethod
    def code_of(sock: socket.socket) -> bytes:
        """``SocketKind.of(sock).pack()`` in one dictionary lookup (the send hot path)."""
        code = _CODES.get((_raw_family(sock), _raw_type(sock) & _TYPE_MASK, _raw_proto(sock)))
        if code is None:
            code = SocketKind.of(sock).pack()
            _CODES[(_raw_family(sock), _raw_type(sock) & _TYPE_MASK, _raw_proto(sock))] = code
        return code

    def pack(self) -> bytes:
        packed = _PACKED.get(self)
        if packed is None:
            try:
                fam, typ = _FAMILY_CODES[self.family], _TYPE_CODES[self.type]
            except KeyError:
                raise LocalProtocolError(
                    f"sockshare moves INET, INET6 and UNIX sockets of type STREAM, DGRAM or "
                    f"SEQPACKET; this one is family {self.family}, type {self.type}"
                ) from None
            packed = _PACKED[self] = struct.pack(">BBH", fam, typ, self.proto)
        return packed

    @classmethod
    def unpack(cls, raw: bytes) -> SocketKind:
        kind = _UNPACKED.get(raw)
        if kind is not None:
            return kind
        fam, typ, proto = struct.unpack(">BBH", raw)
        try:
            kind = cls(int(_FAMILIES[fam]), int(_TYPES[typ]), proto)
        except KeyError:
            raise RemoteProtocolError(f"unknown socket family/type codes {fam}/{typ}") from None
        if len(_UNPACKED) < 256:
            _UNPACKED[bytes(raw)] = kind
        return kind


_raw_family = _socket.socket.__dict__["family"].__get__
_raw_type = _socket.socket.__dict__["type"].__get__
_raw_proto = _socket.socket.__dict__["proto"].__get__
_TYPE_MASK = 0xF if hasattr(socket, "SOCK_NONBLOCK") else -1
_KINDS: dict[tuple[int, int, int], SocketKind] = {}
_PACKED: dict[SocketKind, bytes] = {}
_UNPACKED: dict[bytes, SocketKind] = {}
_CODES: dict[tuple[int, int, int], bytes] = {}


# --- HELLO --------------------------------------------------------------------

_HELLO = struct.Struct(">BBIIII")


@dataclass(frozen=True, slots=True)
class Hello:
    """Handshake: who the peer is and what it can do."""

    pid: int
    uid: int
    role: int = 0  # 1 sender, 2 receiver, 3 both
    features: int = 0  # bit 0: SCM_RIGHTS, bit 1: WSA blobs, bit 2: acks
    max_payload: int = 1 << 20
    name: str = ""
    version: int = 1


def encode_hello(h: Hello) -> bytes:
    name = h.name.encode()
    if len(name) > MAX_HELLO_NAME:
        raise MessageTooLarge(f"a HELLO name is at most {MAX_HELLO_NAME} bytes")
    return _HELLO.pack(h.version, h.role, h.features, h.pid, h.uid, h.max_payload) + name


#: The longest HELLO name, in bytes (docs/protocol.md, section 3.1).
MAX_HELLO_NAME = 255


def decode_hello(p: bytes) -> Hello:
    _need(p, _HELLO.size, "HELLO", exact=False)
    if len(p) > _HELLO.size + MAX_HELLO_NAME:
        raise RemoteProtocolError(f"HELLO payload has {len(p)} bytes, expected at most "
                                  f"{_HELLO.size + MAX_HELLO_NAME} (a name of 255 bytes)")
    version, role, features, pid, uid, max_payload = _HELLO.unpack_from(p)
    name = _text(p[_HELLO.size:], "HELLO name")
    return Hello(pid, uid, role, features, max_payload, name, version)


# --- ERROR --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    code: int
    text: str


def encode_error(code: ErrorCode, text: str) -> bytes:
    # 4094: the whole payload fits the 4096-byte limit a peer applies during the handshake
    return struct.pack(">H", int(code)) + _cut(text, 4094)


def decode_error(p: bytes) -> ErrorMessage:
    _need(p, 2, "ERROR", exact=False)
    return ErrorMessage(struct.unpack_from(">H", p)[0], _text(p[2:], "ERROR text"))


def error_to_exception(err: ErrorMessage) -> SockshareError:
    """Map an ERROR frame to the exception the local caller should see."""
    cls = _ERROR_CLASSES.get(err.code, SockshareError)
    return cls(err.text or f"the peer reported error code {err.code}")


# --- CLAIM / GRANT / DONE (token import) ------------------------------------------

_CLAIM = struct.Struct(">Q16sI")


@dataclass(frozen=True, slots=True)
class Claim:
    token_id: int
    secret: bytes
    pid: int


def encode_claim(c: Claim) -> bytes:
    return _CLAIM.pack(c.token_id, c.secret, c.pid)


def decode_claim(p: bytes) -> Claim:
    _need(p, _CLAIM.size, "CLAIM")
    tid, secret, pid = _CLAIM.unpack(p)
    return Claim(tid, secret, pid)


@dataclass(frozen=True, slots=True)
class Grant:
    token_id: int
    kind: SocketKind


def encode_grant(g: Grant) -> bytes:
    return struct.pack(">Q", g.token_id) + g.kind.pack()


def decode_grant(p: bytes) -> Grant:
    _need(p, 12, "GRANT")
    return Grant(struct.unpack_from(">Q", p)[0], SocketKind.unpack(p[8:12]))


def encode_done(token_id: int) -> bytes:
    return struct.pack(">Q", token_id)


def decode_done(p: bytes) -> int:
    _need(p, 8, "DONE")
    return int(struct.unpack(">Q", p)[0])


# --- HANDOFF / ACCEPT / REJECT (channel) ------------------------------------------

_ENTRY = struct.Struct(">Q4sII")  # id, kind (family, type: u8; proto: u16), meta_len, data_len


@dataclass(slots=True)
class HandoffEntry:
    """One socket in a HANDOFF frame. ``meta`` is encoded JSON, ``data`` raw bytes."""

    id: int
    kind: SocketKind
    meta: bytes = b""
    data: bytes = b""
    blob: bytes = b""  # WSAPROTOCOL_INFO, only with FLAG_WSA


def encode_handoff(entries: list[HandoffEntry], *, wsa: bool = False) -> bytes:
    parts = [_U16.pack(len(entries))]
    append, pack = parts.append, _ENTRY.pack
    for e in entries:
        meta, data = e.meta, e.data
        if len(meta) > MAX_META:
            raise MessageTooLarge(f"metadata of {len(meta)} bytes; the limit is {MAX_META}")
        if len(data) > MAX_DATA:
            raise MessageTooLarge(f"pre-read data of {len(data)} bytes; the limit is {MAX_DATA}")
        append(pack(e.id, e.kind.pack(), len(meta), len(data)))
        append(meta)
        append(data)
        if wsa:
            parts.append(struct.pack(">H", len(e.blob)))
            parts.append(e.blob)
    return b"".join(parts)


def decode_handoff(p: bytes, *, wsa: bool = False) -> list[HandoffEntry]:
    _need(p, 2, "HANDOFF", exact=False)
    (count,) = _U16.unpack_from(p)
    if count == 0:
        raise RemoteProtocolError("HANDOFF frame with no entries")
    pos, out = 2, []
    unpack, esize, end = _ENTRY.unpack_from, _ENTRY.size, len(p)
    for _ in range(count):
        if pos + esize > end:
            _need(p, pos + esize, "HANDOFF entry", exact=False)
        hid, rawkind, mlen, dlen = unpack(p, pos)
        pos += esize
        if mlen > MAX_META or dlen > MAX_DATA:
            raise RemoteProtocolError(
                f"handoff entry with {mlen} metadata / {dlen} data bytes is over the limits"
            )
        if pos + mlen + dlen > end:
            _need(p, pos + mlen + dlen, "HANDOFF entry body", exact=False)
        meta, data = p[pos:pos + mlen], p[pos + mlen:pos + mlen + dlen]
        pos += mlen + dlen
        blob = b""
        if wsa:
            _need(p, pos + 2, "HANDOFF blob length", exact=False)
            (blen,) = struct.unpack_from(">H", p, pos)
            _need(p, pos + 2 + blen, "HANDOFF blob", exact=False)
            blob = p[pos + 2:pos + 2 + blen]
            pos += 2 + blen
        kind = _UNPACKED.get(rawkind) or SocketKind.unpack(rawkind)
        out.append(HandoffEntry(hid, kind, meta, data, blob))
    if pos != len(p):
        raise RemoteProtocolError(f"HANDOFF frame has {len(p) - pos} trailing bytes")
    return out


def encode_accept(ids: list[int]) -> bytes:
    return struct.pack(f">H{len(ids)}Q", len(ids), *ids)


def decode_accept(p: bytes) -> list[int]:
    _need(p, 2, "ACCEPT", exact=False)
    (count,) = struct.unpack_from(">H", p)
    _need(p, 2 + 8 * count, "ACCEPT")
    return list(struct.unpack_from(f">{count}Q", p, 2))


@dataclass(frozen=True, slots=True)
class Reject:
    id: int
    reason: str


def encode_reject(r: Reject) -> bytes:
    return struct.pack(">Q", r.id) + _cut(r.reason, 1024)


def decode_reject(p: bytes) -> Reject:
    _need(p, 8, "REJECT", exact=False)
    return Reject(struct.unpack_from(">Q", p)[0], _text(p[8:], "REJECT reason"))


# --- CONTROL ------------------------------------------------------------------


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one per call


#: a CONTROL payload is JSON (docs/protocol.md, section 3.7): no NaN or Infinity, which
#: Python's json reads but no other JSON reader does
_STRICT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_control(obj: dict[str, Any]) -> bytes:
    """A CONTROL payload: ``obj`` as compact JSON; :class:`LocalProtocolError` for what
    JSON cannot hold (as handoff metadata)."""
    if not isinstance(obj, dict):
        raise LocalProtocolError(f"a control message is a dict (a JSON object), not "
                                 f"{type(obj).__name__}")
    try:
        return _STRICT.encode(obj).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"a control message must be JSON-compatible: {exc}") from None


def decode_control(p: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(p)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"CONTROL payload is not JSON: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("CONTROL payload nests too deeply") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("CONTROL payload is not a JSON object")
    return obj


# --- helpers ------------------------------------------------------------------


def _need(p: bytes, n: int, what: str, *, exact: bool = True) -> None:
    if len(p) < n or (exact and len(p) != n):
        raise RemoteProtocolError(f"{what} payload has {len(p)} bytes, expected {n}")


def _cut(text: str, limit: int) -> bytes:
    """UTF-8 of ``text``, cut to ``limit`` bytes on a character boundary (a cut
    mid-character would make the peer's decoder refuse the frame)."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from None
