"""The Python codec against ``tests/vectors/frames.json``, in both directions.

* the file is what ``tests/vectors/make_vectors.py`` generates today (no silent drift);
* every valid vector decodes (fed whole and byte by byte) to its ``frame`` and
  ``fields``, and encoding the fields gives the bytes back, through the message
  encoders and through the channel's own frame builders (``single_frame``,
  ``handoff_frames``);
* the channel state machine receives every valid HANDOFF/ACCEPT/REJECT/BYE/ERROR
  vector with real descriptors;
* every invalid vector fails with ``RemoteProtocolError`` for the documented reason, in
  the pure codec and in the channel, and the channel closes the descriptors that
  arrived with it (counted in /proc/self/fd);
* ``tests/vectors/controls.json``: every CONTROL message of ``sockshare serve``
  (``sockshare.server._messages``) decodes from its frame to its type and fields, encodes
  back to the same bytes, and every invalid one fails for its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sockshare import PeerRefused, RemoteProtocolError
from sockshare import _state as channel_mod
from sockshare._state import ChannelState as _ChannelState
from sockshare._state import Ticket, _encode_meta
from sockshare.protocol import (
    FLAG_ACK,
    ErrorCode,
    FrameDecoder,
    FrameType,
    HandoffEntry,
    Hello,
    Reject,
    SocketKind,
    decode_accept,
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
)
from sockshare.server import _messages as messages
from tests.vectors import make_vectors

pytestmark = [
    pytest.mark.timeout(60),
    # the vectors include UNIX-socket kinds, which the Windows codec cannot represent
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX socket kinds"),
]

VECTORS_FILE = Path(__file__).parent / "vectors" / "frames.json"
DOC = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
VALID = [v for v in DOC["vectors"] if v["valid"]]
INVALID = [v for v in DOC["vectors"] if not v["valid"]]

#: What the Python error message says for each reason code of the file.
REASON_PATTERNS = {
    "bad-magic": r"bad magic",
    "bad-version": r"protocol version 2",
    "unknown-type": r"unknown frame type 0x7f",
    "reserved-not-zero": r"reserved header bytes",
    "payload-too-large": r"payload bytes; the limit is",
    "too-many-fds": r"254 descriptors; the limit is 253",
    "missing-fds": r"descriptors but \d+ arrived",
    "truncated-frame": r"middle of a frame",
    "bad-length": r"payload has \d+ bytes, expected",
    "trailing-bytes": r"trailing bytes",
    "unknown-kind": r"unknown socket family/type",
    "entry-over-limits": r"over the limits",
    "bad-utf8": r"not valid UTF-8",
    "fd-count-mismatch": r"lists \d+ sockets but carries \d+ fds",
    "fds-on-wrong-frame": r"frame carried \d+ descriptors",
    "no-entries": r"HANDOFF frame with no entries",
}

_FAMILY = {1: socket.AF_INET, 2: socket.AF_INET6, 3: socket.AF_UNIX}
_TYPE = {1: socket.SOCK_STREAM, 2: socket.SOCK_DGRAM, 3: socket.SOCK_SEQPACKET}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def _ids(v: dict[str, Any]) -> str:
    return str(v["name"])


def _kind(e: dict[str, Any]) -> SocketKind:
    return SocketKind(int(_FAMILY[e["family"]]), int(_TYPE[e["type"]]), e["proto"])


def _real_socket(e: dict[str, Any]) -> socket.socket:
    """A socket of the entry's kind (its descriptor is what travels)."""
    try:
        return socket.socket(_FAMILY[e["family"]], _TYPE[e["type"]], e["proto"])
    except OSError as exc:  # e.g. IPv6 disabled in a container
        pytest.skip(f"cannot make a {e} socket here: {exc}")


def _decode_payload(ftype: FrameType, payload: bytes) -> dict[str, Any]:
    """Decode with the Python codec into the file's ``fields`` shape."""
    if ftype == FrameType.HELLO:
        h = decode_hello(payload)
        return {"version": h.version, "role": h.role, "features": h.features, "pid": h.pid,
                "uid": h.uid, "max_payload": h.max_payload, "name": h.name,
                "name_hex": h.name.encode().hex()}
    if ftype == FrameType.HANDOFF:
        entries = decode_handoff(payload)
        out = []
        for e in entries:
            fam, typ, proto = struct.unpack(">BBH", e.kind.pack())
            out.append({"id": str(e.id), "family": fam, "type": typ, "proto": proto,
                        "meta": e.meta.decode("utf-8", "replace"), "meta_hex": e.meta.hex(),
                        "data": e.data.decode("utf-8", "replace"), "data_hex": e.data.hex()})
        return {"count": len(entries), "entries": out}
    if ftype == FrameType.ACCEPT:
        ids = decode_accept(payload)
        return {"count": len(ids), "ids": [str(i) for i in ids]}
    if ftype == FrameType.REJECT:
        r = decode_reject(payload)
        return {"id": str(r.id), "reason": r.reason, "reason_hex": r.reason.encode().hex()}
    if ftype == FrameType.ERROR:
        err = decode_error(payload)
        return {"code": err.code, "code_name": ErrorCode(err.code).name, "text": err.text,
                "text_hex": err.text.encode().hex()}
    assert ftype == FrameType.BYE
    return {}


def _encode_fields(v: dict[str, Any]) -> bytes:
    """Encode a valid vector's ``fields`` with the Python message encoders."""
    f, head = v["fields"], v["frame"]
    ftype = FrameType(head["type"])
    if ftype == FrameType.HELLO:
        payload = encode_hello(Hello(f["pid"], f["uid"], f["role"], f["features"],
                                     f["max_payload"], bytes.fromhex(f["name_hex"]).decode(),
                                     f["version"]))
    elif ftype == FrameType.HANDOFF:
        payload = encode_handoff([
            HandoffEntry(int(e["id"]), _kind(e), bytes.fromhex(e["meta_hex"]),
                         bytes.fromhex(e["data_hex"]))
            for e in f["entries"]])
    elif ftype == FrameType.ACCEPT:
        payload = encode_accept([int(i) for i in f["ids"]])
    elif ftype == FrameType.REJECT:
        payload = encode_reject(Reject(int(f["id"]), bytes.fromhex(f["reason_hex"]).decode()))
    elif ftype == FrameType.ERROR:
        payload = encode_error(ErrorCode(f["code"]), bytes.fromhex(f["text_hex"]).decode())
    else:
        payload = b""
    return encode_frame(ftype, payload, flags=head["flags"], nfds=head["nfds"])


# --- the file itself -----------------------------------------------------------------


def test_file_is_what_the_generator_makes() -> None:
    assert VECTORS_FILE.read_text(encoding="utf-8") == make_vectors.build(), (
        "tests/vectors/frames.json is stale: run python tests/vectors/make_vectors.py")


def test_file_covers_the_required_cases() -> None:
    kinds = {(v["frame"]["type_name"], v["fields"].get("count")) for v in VALID}
    assert {("HELLO", None), ("HANDOFF", 1), ("HANDOFF", 3), ("ACCEPT", 2), ("REJECT", None),
            ("BYE", None), ("ERROR", None)} <= kinds
    assert {v["reason"] for v in INVALID} == set(REASON_PATTERNS) == set(DOC["reasons"])
    # one vector per line, for line-oriented readers (the C and PHP checkers)
    lines = [ln.strip().rstrip(",") for ln in VECTORS_FILE.read_text(encoding="utf-8").splitlines()]
    per_line = [json.loads(ln) for ln in lines if ln.startswith('{"name": ')]
    assert per_line == DOC["vectors"]


# --- valid vectors: decode ---------------------------------------------------------------


@pytest.mark.parametrize("v", VALID, ids=_ids)
@pytest.mark.parametrize("chunk", [0, 1, 5], ids=["whole", "bytewise", "5-byte-chunks"])
def test_decode_valid(v: dict[str, Any], chunk: int) -> None:
    raw = bytes.fromhex(v["hex"])
    dec = FrameDecoder(max_payload=v["max_payload"])
    fds = list(range(500, 500 + v["fds"]))  # placeholders: the decoder never touches them
    frames = []
    pieces = [raw] if not chunk else [raw[i:i + chunk] for i in range(0, len(raw), chunk)]
    for i, piece in enumerate(pieces):
        dec.feed(piece, fds if i == 0 else [])
        while (f := dec.next_frame()) is not None:
            frames.append(f)
    dec.end_of_stream()
    assert len(frames) == 1
    f = frames[0]
    assert {"type": int(f.type), "type_name": f.type.name, "flags": f.flags,
            "nfds": len(f.fds), "length": len(f.payload)} == v["frame"]
    assert list(f.fds) == fds
    assert _decode_payload(f.type, f.payload) == v["fields"]


# --- valid vectors: encode ---------------------------------------------------------------


@pytest.mark.parametrize("v", VALID, ids=_ids)
def test_encode_valid(v: dict[str, Any]) -> None:
    assert _encode_fields(v).hex() == v["hex"]


@contextlib.contextmanager
def _next_ids(first: int) -> Iterator[None]:
    saved = channel_mod._ids
    channel_mod._ids = itertools.count(first)
    try:
        yield
    finally:
        channel_mod._ids = saved


HANDOFFS = [v for v in VALID if v["frame"]["type_name"] == "HANDOFF"]


def _consecutive_ids(v: dict[str, Any]) -> bool:
    ids = [int(e["id"]) for e in v["fields"]["entries"]]
    return ids == list(range(ids[0], ids[0] + len(ids)))


# the channel numbers its handoffs consecutively: only such vectors can be rebuilt by it
@pytest.mark.parametrize("v", [v for v in HANDOFFS if _consecutive_ids(v)], ids=_ids)
def test_channel_builds_the_same_handoff_frames(v: dict[str, Any]) -> None:
    """The channel's own builders (hot path included) produce the vector's bytes."""
    entries = v["fields"]["entries"]
    ids = [int(e["id"]) for e in entries]
    socks = [_real_socket(e) for e in entries]
    try:
        items = [(s, bytes.fromhex(e["meta_hex"]), bytes.fromhex(e["data_hex"]))
                 for s, e in zip(socks, entries, strict=True)]
        ack = bool(v["frame"]["flags"] & FLAG_ACK)
        st = _ChannelState()
        with _next_ids(ids[0]):
            frames = st.handoff_frames(items, ack)
        assert len(frames) == 1
        frame, fds, tickets = frames[0]
        assert frame.hex() == v["hex"]
        assert fds == [s.fileno() for s in socks]
        assert [t.id for t in tickets] == ids
        if len(items) == 1:
            with _next_ids(ids[0]):
                single, fd, _ticket = st.single_frame(*items[0], ack)
            assert single.hex() == v["hex"]
            assert fd == socks[0].fileno()
        for e in entries:  # JSON metas: what the channel makes of the decoded object
            meta = bytes.fromhex(e["meta_hex"])
            if meta and meta.isascii():
                assert _encode_meta(json.loads(meta)) == meta
    finally:
        for s in socks:
            s.close()


# --- valid vectors through the channel state, with real descriptors ----------------------


def _feed(st: _ChannelState, raw: bytes, fds: list[int], answers: list[Any],
          chunk: int = 0) -> None:
    def answer(hid: int, reason: str | None) -> None:
        answers.append((hid, reason))
    if not chunk:
        st.receive_data(raw, fds, answer)
        return
    for i in range(0, len(raw), chunk):
        st.receive_data(raw[i:i + chunk], fds if i == 0 else [], answer)


def _feed_all(st: _ChannelState, v: dict[str, Any], fds: list[int], chunk: int) -> None:
    """The vector's bytes with ``fds``, then the end of the stream if it says so."""
    _feed(st, bytes.fromhex(v["hex"]), fds, [], chunk)
    if v["eof"]:
        st.receive_data(b"", [], None)


@pytest.mark.parametrize("v", HANDOFFS, ids=_ids)
@pytest.mark.parametrize("chunk", [0, 7])
def test_channel_receives_valid_handoffs(v: dict[str, Any], chunk: int) -> None:
    entries = v["fields"]["entries"]
    before = fd_count()
    socks = [_real_socket(e) for e in entries]
    st = _ChannelState()
    try:
        _feed(st, bytes.fromhex(v["hex"]), [os.dup(s.fileno()) for s in socks], [], chunk)
        got = list(st.incoming)
        assert [h.id for h in got] == [int(e["id"]) for e in entries]
        assert [h.data.hex() for h in got] == [e["data_hex"] for e in entries]
        assert [h.raw_meta.hex() for h in got] == [e["meta_hex"] for e in entries]
        assert {h.acked for h in got} == {bool(v["frame"]["flags"] & FLAG_ACK)}
        for h, s in zip(got, socks, strict=True):
            assert h.socket.type == s.type
            assert os.path.samestat(os.fstat(h.socket.fileno()), os.fstat(s.fileno()))
    finally:
        for h in st.incoming:
            h.socket.close()
        for s in socks:
            s.close()
    assert fd_count() == before


@pytest.mark.parametrize("v", [v for v in VALID if v["frame"]["type_name"] in
                               ("ACCEPT", "REJECT", "BYE", "ERROR")], ids=_ids)
def test_channel_receives_valid_answers(v: dict[str, Any]) -> None:
    st = _ChannelState()
    f = v["fields"]
    ids = [int(i) for i in f.get("ids", [])] + ([int(f["id"])] if "id" in f else [])
    for hid in ids:
        st.tickets[hid] = Ticket(hid, None)
    kind = v["frame"]["type_name"]
    raw = bytes.fromhex(v["hex"])
    if kind == "BYE":
        _feed(st, raw, [], [])  # the peer sends no more, but still reads our answers
        assert st.peer_said_bye
        assert st.broken is None
    elif kind == "ERROR":
        expected = PeerRefused if f["code"] == ErrorCode.REFUSED else RemoteProtocolError
        with pytest.raises(expected, match=re.escape(f["text"]) if f["text"] else None):
            _feed(st, raw, [], [])
    else:
        _feed(st, raw, [], [])
        assert not st.tickets
        if kind == "ACCEPT":
            assert st.counters["accepted"] == len(ids)
        else:
            (ticket,) = st.returned
            assert (ticket.state, ticket.reason) == ("rejected", f["reason"])


# --- invalid vectors ---------------------------------------------------------------------


@pytest.mark.parametrize("v", INVALID, ids=_ids)
def test_codec_refuses_invalid(v: dict[str, Any]) -> None:
    """The pure codec fails at the vector's layer, for its reason."""
    raw = bytes.fromhex(v["hex"])
    dec = FrameDecoder(max_payload=v["max_payload"])
    frames = []
    with contextlib.ExitStack() as stack:
        if v["layer"] == "frame":
            stack.enter_context(pytest.raises(RemoteProtocolError,
                                              match=REASON_PATTERNS[v["reason"]]))
        dec.feed(raw, list(range(500, 500 + v["fds"])))
        while (f := dec.next_frame()) is not None:
            frames.append(f)
        if v["eof"]:
            dec.end_of_stream()
    if v["layer"] == "frame":
        assert sorted(dec.take_fds()) == list(range(500, 500 + v["fds"]))
        return
    (f,) = frames
    if v["layer"] == "payload":
        with pytest.raises(RemoteProtocolError, match=REASON_PATTERNS[v["reason"]]):
            _decode_payload(f.type, f.payload)
    else:  # channel: the payload is fine, the descriptors do not match it
        _decode_payload(f.type, f.payload)
        n = len(decode_handoff(f.payload)) if f.type == FrameType.HANDOFF else 0
        assert n != len(f.fds)


def _is_hello(v: dict[str, Any]) -> bool:
    frame_hex: str = v["hex"]
    return frame_hex.startswith("53530101")


# HELLO is not a channel frame (the channel refuses it as unexpected), so the
# HELLO vectors are checked by the codec test only.
@pytest.mark.parametrize("v", [v for v in INVALID if not _is_hello(v)], ids=_ids)
@pytest.mark.parametrize("chunk", [0, 3])
def test_channel_refuses_invalid_and_closes_fds(v: dict[str, Any], chunk: int) -> None:
    """Fed to the channel with real descriptors: RemoteProtocolError, no fd left open."""
    before = fd_count()
    a, b = socket.socketpair()
    st = _ChannelState(max_payload=v["max_payload"])
    fds = [os.dup(a.fileno()) for _ in range(v["fds"])]
    try:
        with pytest.raises(RemoteProtocolError, match=REASON_PATTERNS[v["reason"]]) as info:
            _feed_all(st, v, fds, chunk)
        st.fail(info.value)  # what Channel._break does
        assert not st.incoming
    finally:
        a.close()
        b.close()
    assert fd_count() == before, "descriptors of a refused frame were left open"


# --- CONTROL messages: tests/vectors/controls.json ------------------------------------------

CONTROLS_FILE = Path(__file__).parent / "vectors" / "controls.json"
CONTROLS = json.loads(CONTROLS_FILE.read_text(encoding="utf-8"))
CONTROL_VALID = [v for v in CONTROLS["vectors"] if v["valid"]]
CONTROL_INVALID = [v for v in CONTROLS["vectors"] if not v["valid"]]

#: What the Python error message says for each reason code of controls.json.
CONTROL_PATTERNS = {
    "not-json": r"CONTROL payload is not JSON",
    "not-an-object": r"CONTROL payload is not a JSON object",
    "no-tag": r'one of "ev" \(a report\) or "cmd" \(a command\), this one neither',
    "both-tags": r'one of "ev" \(a report\) or "cmd" \(a command\), this one both',
    "tag-not-string": r"'(ev|cmd)' must be a string",
    "unknown-kind": r"unknown control message \{\"(ev|cmd)\": ",
    "missing-field": r"field '\w+' must be .*, missing$",
    "ill-typed-field": r"field '\w+' must be .*, got ",
}


def test_controls_file_is_what_the_generator_makes() -> None:
    assert CONTROLS_FILE.read_text(encoding="utf-8") == make_vectors.build_controls(), (
        "tests/vectors/controls.json is stale: run python tests/vectors/make_vectors.py")


def test_controls_cover_every_message_and_reason() -> None:
    kinds = {(v["tag"], v["kind"]) for v in CONTROL_VALID}
    assert kinds == ({("ev", k) for k in messages.REPORTS}
                     | {("cmd", k) for k in messages.COMMANDS})
    assert {v["reason"] for v in CONTROL_INVALID} == set(CONTROL_PATTERNS) \
        == set(CONTROLS["reasons"])
    lines = [ln.strip().rstrip(",") for ln in CONTROLS_FILE.read_text(encoding="utf-8").splitlines()]
    assert [json.loads(ln) for ln in lines if ln.startswith('{"name": ')] == CONTROLS["vectors"]


def _control_frame_payload(v: dict[str, Any]) -> bytes:
    """The vector's CONTROL frame through the frame decoder: its payload."""
    dec = FrameDecoder()
    dec.feed(bytes.fromhex(v["hex"]))
    f = dec.next_frame()
    assert f is not None
    assert (f.type, f.flags, list(f.fds)) == (FrameType.CONTROL, 0, [])
    assert dec.next_frame() is None
    return f.payload


@pytest.mark.parametrize("v", CONTROL_VALID, ids=_ids)
def test_control_decode_valid(v: dict[str, Any]) -> None:
    payload = _control_frame_payload(v)
    assert payload.decode() == v["payload"]
    for source in (payload, json.loads(payload)):   # the payload, or the channel's object
        msg = messages.decode(source)
        assert type(msg).__name__ == v["type"]
        tag_kind = (msg.TAG, msg.KIND)
        assert tag_kind == (v["tag"], v["kind"])
        assert json.loads(json.dumps(dataclasses.asdict(msg))) == v["fields"]


@pytest.mark.parametrize("v", CONTROL_VALID, ids=_ids)
def test_control_encode_valid(v: dict[str, Any]) -> None:
    """Encoding the decoded message gives the canonical bytes (the payload itself unless
    the vector is decode-only), in the channel's CONTROL frame too."""
    msg = messages.decode(_control_frame_payload(v))
    canonical = v["canonical"].encode()
    assert messages.to_bytes(msg) == canonical
    assert list(messages.encode(msg).items()) == list(json.loads(canonical).items())
    if canonical == v["payload"].encode():
        assert messages.encode(msg) == v["object"]
        # what Channel.send_control writes
        assert encode_frame(FrameType.CONTROL, encode_control(messages.encode(msg))).hex() \
            == v["hex"]


@pytest.mark.parametrize("v", CONTROL_INVALID, ids=_ids)
def test_control_refuses_invalid(v: dict[str, Any]) -> None:
    payload = _control_frame_payload(v)
    with pytest.raises(RemoteProtocolError, match=CONTROL_PATTERNS[v["reason"]]) as info:
        messages.decode(payload)
    assert type(info.value).__name__ == v["error"]
    assert isinstance(info.value, messages.UnknownMessage) == (v["reason"] == "unknown-kind")
