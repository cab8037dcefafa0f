"""The token: the printable text that names one exported socket.

A token is ``"ss1."`` followed by the unpadded base64url encoding of a binary body.
The body starts with a one-byte kind and ends with a CRC-32 of everything before it, so
that a token damaged in transit (a cut env var, a lost character) is told apart from a
forged one: the first is :class:`~sockshare.InvalidToken` "garbled", the second is
refused by the exporter's agent, which checks the 128-bit secret.

Two kinds exist (byte layouts in ``docs/protocol.md``):

``U`` (POSIX)
    names the exporter's *export agent*, a UNIX socket in the Linux abstract namespace
    or a path in a private 0700 directory; the importer connects there and claims the
    socket with the token id and secret, and receives it by SCM_RIGHTS.
``W`` (Windows)
    carries the ``WSAPROTOCOL_INFOW`` blob from ``WSADuplicateSocket`` (already
    duplicated for the target pid) plus the loopback port of the exporter's agent,
    which the importer contacts to enforce single use, expiry and release.

This module only converts between text and :class:`TokenInfo`; it performs no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from dataclasses import dataclass

from sockshare._errors import InvalidToken

__all__ = ["PREFIX", "TokenInfo", "decode_token", "encode_token"]

PREFIX = "ss1."
#: Refuse absurd inputs before decoding them (a Windows token is about 900 characters).
MAX_TOKEN_TEXT = 4096

KIND_POSIX = ord("U")
KIND_WINDOWS = ord("W")

_POSIX = struct.Struct(">BIIIQ16sQBH")  # kind, exp pid, exp uid, target pid, id, secret,
#                                         expires ms, addr kind, addr len
_WIN = struct.Struct(">BIIQ16sQHH")  # kind, exp pid, target pid, id, secret, expires ms,
#                                      agent port, blob len

ADDR_ABSTRACT = 0
ADDR_PATH = 1

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """Everything a token says. ``address`` is the agent's UNIX address (POSIX kind)."""

    kind: int
    exporter_pid: int
    target_pid: int
    token_id: int
    secret: bytes
    expires_ms: int
    exporter_uid: int = 0
    address: bytes = b""
    address_kind: int = ADDR_ABSTRACT
    agent_port: int = 0
    blob: bytes = b""

    @property
    def is_windows(self) -> bool:
        return self.kind == KIND_WINDOWS


def encode_token(t: TokenInfo) -> str:
    """Return the token text for ``t``."""
    if len(t.secret) != 16:
        raise ValueError("a token secret is 16 bytes")
    if t.kind == KIND_POSIX:
        body = _POSIX.pack(
            t.kind, t.exporter_pid, t.exporter_uid, t.target_pid, t.token_id, t.secret,
            t.expires_ms, t.address_kind, len(t.address),
        ) + t.address
    elif t.kind == KIND_WINDOWS:
        body = _WIN.pack(
            t.kind, t.exporter_pid, t.target_pid, t.token_id, t.secret, t.expires_ms,
            t.agent_port, len(t.blob),
        ) + t.blob
    else:
        raise ValueError(f"unknown token kind {t.kind!r}")
    body += struct.pack(">I", zlib.crc32(body))
    return PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode("ascii")


def decode_token(text: str | bytes) -> TokenInfo:
    """Parse a token; raise :class:`InvalidToken` saying exactly what is wrong with it.

    Decoding is strict: after the prefix, only the unpadded base64url alphabet, in the
    one canonical encoding of the body, of exactly the length the body's fields give.
    Whitespace around the token (the newline of a line read from a pipe or a file) is
    ignored; anything else added, removed or changed makes it invalid.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise InvalidToken("a sockshare token is ASCII text; this one is not") from None
    if not isinstance(text, str):
        raise InvalidToken(f"a sockshare token is a str, not {type(text).__name__}")
    text = text.strip()
    if len(text) > MAX_TOKEN_TEXT:
        raise InvalidToken(f"{len(text)} characters is far too long for a sockshare token")
    if not text.startswith("ss"):
        raise InvalidToken("this is not a sockshare token (it does not start with 'ss1.')")
    if not text.startswith(PREFIX):
        version = text[2:].split(".", 1)[0]
        raise InvalidToken(
            f"token of format version {version!r}; this sockshare reads version 1: "
            "upgrade the importing side"
        )
    b64 = text[len(PREFIX):]
    if not _B64URL.fullmatch(b64):
        bad = next(c for c in b64 if not (c.isascii() and (c.isalnum() or c in "-_")))
        raise InvalidToken(
            f"the token is garbled: {bad!r} is not a base64url character (A-Z a-z 0-9 - _, "
            "no padding): pass the token on unchanged"
        )
    if len(b64) % 4 == 1:
        raise InvalidToken("the token is garbled or truncated: its length is impossible")
    try:
        body = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("the token is garbled: its text is not base64url") from None
    if base64.urlsafe_b64encode(body).rstrip(b"=") != b64.encode("ascii"):
        # the last character carries bits the body does not have: not our encoding
        raise InvalidToken("the token is garbled: its last character was changed")
    if len(body) < 5 or zlib.crc32(body[:-4]) != struct.unpack(">I", body[-4:])[0]:
        raise InvalidToken(
            "the token is garbled or truncated (checksum mismatch): pass it on unchanged"
        )
    body = body[:-4]
    kind = body[0]
    if kind == KIND_POSIX:
        if len(body) < _POSIX.size:
            raise InvalidToken("the token is truncated")
        (_, epid, euid, tpid, tid, secret, exp, akind, alen) = _POSIX.unpack_from(body)
        address = body[_POSIX.size:]
        if len(address) != alen or akind not in (ADDR_ABSTRACT, ADDR_PATH):
            raise InvalidToken("the token's agent address is malformed")
        return TokenInfo(kind, epid, tpid, tid, secret, exp, euid, address, akind)
    if kind == KIND_WINDOWS:
        if len(body) < _WIN.size:
            raise InvalidToken("the token is truncated")
        (_, epid, tpid, tid, secret, exp, port, blen) = _WIN.unpack_from(body)
        blob = body[_WIN.size:]
        if len(blob) != blen:
            raise InvalidToken("the token's WSAPROTOCOL_INFO blob is malformed")
        return TokenInfo(kind, epid, tpid, tid, secret, exp, agent_port=port, blob=blob)
    raise InvalidToken(f"unknown token kind {kind!r}")
