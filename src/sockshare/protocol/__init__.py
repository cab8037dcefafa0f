"""The sans-I/O core: token format, frame codec, message payloads.

Nothing in this package touches a socket, a file descriptor or the clock in a way that
blocks: bytes and integers go in, dataclasses and bytes come out. The OS mechanisms in
:mod:`sockshare.backends` and the channel in :mod:`sockshare._channel` move those bytes.
A C, Go or PHP program that follows ``docs/protocol.md`` interoperates with it.
"""

from sockshare.protocol._frames import (
    HEADER,
    MAGIC,
    MAX_FDS_PER_FRAME,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from sockshare.protocol._messages import *  # noqa: F403
from sockshare.protocol._messages import __all__ as _messages_all
from sockshare.protocol._token import PREFIX, TokenInfo, decode_token, encode_token

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_FDS_PER_FRAME",
    "MAX_PAYLOAD",
    "PREFIX",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "TokenInfo",
    "decode_token",
    "encode_frame",
    "encode_token",
    *_messages_all,
]
