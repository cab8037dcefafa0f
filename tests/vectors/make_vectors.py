"""Generate ``tests/vectors/frames.json`` (channel-protocol test vectors) and
``tests/vectors/controls.json`` (the server's CONTROL messages) for every implementation
(Python, the C and PHP examples, anyone else's), made by the Python reference codecs.

    python tests/vectors/make_vectors.py            # rewrite both files
    python tests/vectors/make_vectors.py --check    # exit 1 if either is stale

The output is deterministic (no pids, no clocks), so ``--check`` (and
``tests/test_vectors.py``) catch a codec change that was not written down.

``controls.json`` (see :func:`build_controls`): one CONTROL message per line.
``payload`` is the frame's JSON text, ``hex`` the whole CONTROL frame; a valid vector
names the message (``type``, a class of ``sockshare.server._messages``, its ``tag`` and
``kind``), its ``direction``, the JSON ``object`` and the decoded ``fields``;
``canonical`` is what encoding the decoded message gives (the payload itself, except
for the decode-only vectors: extra fields, omitted optional ones). An invalid vector
has ``error`` (the Python class) and ``reason`` (a code of CONTROL_REASONS).

``frames.json``:

File format (version 1), meant to be easy to read without a JSON library:

* one top-level object; ``"vectors"`` is a list with **one vector per line**;
* every vector has ``name``, ``valid``, ``description``, ``hex`` (a whole frame,
  lowercase hex), ``fds`` (how many descriptors travel with the frame's first byte),
  ``max_payload`` (the receiver's payload limit for this vector) and ``eof`` (true: the
  peer closes the stream right after these bytes);
* u64 handoff ids are JSON *strings* of decimal digits (many JSON libraries lose
  precision above 2**53); every other integer fits in 32 bits and is a JSON number;
* byte strings are in ``*_hex`` fields, which are authoritative; where the bytes are
  text, the same text is repeated in a plain field (``name``, ``meta``, ``reason``,
  ``text``) for reading;
* valid vectors carry ``frame`` (type, type_name, flags, nfds, length) and ``fields``
  (the decoded payload); invalid vectors carry ``error`` (the Python exception class),
  ``reason`` (a stable code, see REASONS) and ``layer`` (who must detect it: ``frame``
  = the frame decoder, ``payload`` = the payload decoder of that frame type,
  ``channel`` = the channel, when it matches descriptors to HANDOFF entries).

Decoding procedure for a vector: make a frame decoder with ``max_payload``; feed it
the bytes of ``hex`` with ``fds`` descriptors; take every complete frame; if ``eof``,
tell the decoder the stream ended; decode each frame's payload by its type; for
HANDOFF check that the entry count equals the number of descriptors, and for every
other type that it carried none. A valid vector decodes to ``frame`` and ``fields``
with no error; encoding ``fields`` gives ``hex`` back. An invalid vector fails at
``layer`` with ``reason``, and an implementation must then close the descriptors.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # runnable without an installed sockshare
    sys.path.insert(0, str(SRC))

import dataclasses  # noqa: E402

from sockshare import RemoteProtocolError  # noqa: E402
from sockshare.protocol import (  # noqa: E402
    FLAG_ACK,
    HEADER,
    MAGIC,
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
    encode_error,
    encode_frame,
    encode_handoff,
    encode_hello,
    encode_reject,
)

OUT = Path(__file__).with_name("frames.json")
DEFAULT_MAX = 1 << 20

#: Portable codes of the socket kinds (the wire never carries OS numbers).
FAMILY_CODES = {"inet": 1, "inet6": 2, "unix": 3}
TYPE_CODES = {"stream": 1, "dgram": 2, "seqpacket": 3}
_FAMILY = {1: socket.AF_INET, 2: socket.AF_INET6, 3: socket.AF_UNIX}
_TYPE = {1: socket.SOCK_STREAM, 2: socket.SOCK_DGRAM, 3: socket.SOCK_SEQPACKET}

#: Reason codes of the invalid vectors, and what each means.
REASONS = {
    "bad-magic": "the first two header bytes are not 'SS'",
    "bad-version": "the header's protocol version is not 1",
    "unknown-type": "the header's frame type is not one of the defined types",
    "reserved-not-zero": "header bytes 6-7 are not zero",
    "payload-too-large": "the header announces more payload than the receiver's limit",
    "too-many-fds": "the header announces more than 253 descriptors",
    "missing-fds": "fewer descriptors arrived with the frame than the header announces",
    "truncated-frame": "the stream ended inside a frame",
    "bad-length": "the payload is shorter than its layout needs (or not its fixed size, or "
                  "longer than its largest: a HELLO name over 255 bytes)",
    "trailing-bytes": "bytes are left after the last HANDOFF entry",
    "unknown-kind": "a HANDOFF entry's family or type code is not defined",
    "entry-over-limits": "a HANDOFF entry's meta (> 16384) or data (> 65536) is too long",
    "bad-utf8": "a text field is not valid UTF-8",
    "fd-count-mismatch": "a HANDOFF frame's entry count differs from its descriptors",
    "fds-on-wrong-frame": "a frame other than HANDOFF carried descriptors",
    "no-entries": "a HANDOFF frame's entry count is 0 (a frame carries 1..253 entries)",
}


def meta_bytes(meta: Any) -> bytes:
    """Metadata the way the Python channel encodes it: compact JSON, ASCII escapes."""
    if isinstance(meta, bytes):
        return meta
    if meta is None:
        return b""
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode()


def kind(family: str, stype: str, proto: int) -> SocketKind:
    return SocketKind(int(_FAMILY[FAMILY_CODES[family]]), int(_TYPE[TYPE_CODES[stype]]), proto)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _header(frame: bytes) -> dict[str, Any]:
    _magic, _version, ftype, flags, nfds, _reserved, length = HEADER.unpack_from(frame)
    return {"type": ftype, "type_name": FrameType(ftype).name, "flags": flags,
            "nfds": nfds, "length": length}


def valid(name: str, description: str, frame: bytes, fields: dict[str, Any]) -> dict[str, Any]:
    head = _header(frame)
    return {"name": name, "valid": True, "description": description, "hex": frame.hex(),
            "fds": head["nfds"], "max_payload": DEFAULT_MAX, "eof": False,
            "frame": head, "fields": fields}


def invalid(name: str, description: str, raw: bytes, reason: str, layer: str, *,
            fds: int = 0, eof: bool = False, max_payload: int = DEFAULT_MAX) -> dict[str, Any]:
    assert reason in REASONS, reason
    v = {"name": name, "valid": False, "description": description, "hex": raw.hex(),
         "fds": fds, "max_payload": max_payload, "eof": eof,
         "error": "RemoteProtocolError", "reason": reason, "layer": layer}
    _check_fails(v)
    return v


# --- valid vectors ---------------------------------------------------------------------


def hello_vector(name: str, description: str, h: Hello) -> dict[str, Any]:
    raw_name = h.name.encode()
    frame = encode_frame(FrameType.HELLO, encode_hello(h))
    return valid(name, description, frame, {
        "version": h.version, "role": h.role, "features": h.features, "pid": h.pid,
        "uid": h.uid, "max_payload": h.max_payload, "name": h.name, "name_hex": raw_name.hex(),
    })


def handoff_vector(name: str, description: str, items: list[tuple[int, SocketKind, Any, bytes]],
                   *, ack: bool) -> dict[str, Any]:
    entries = [HandoffEntry(hid, k, meta_bytes(m), d) for hid, k, m, d in items]
    frame = encode_frame(FrameType.HANDOFF, encode_handoff(entries),
                         flags=FLAG_ACK if ack else 0, nfds=len(entries))
    out = []
    for e in entries:
        fam, typ, proto = struct.unpack(">BBH", e.kind.pack())
        out.append({"id": str(e.id), "family": fam, "type": typ, "proto": proto,
                    "meta": _text(e.meta), "meta_hex": e.meta.hex(),
                    "data": _text(e.data), "data_hex": e.data.hex()})
    return valid(name, description, frame, {"count": len(entries), "entries": out})


def valid_vectors() -> list[dict[str, Any]]:
    return [
        hello_vector(
            "hello", "HELLO of a Python channel end: role 3 (both), features SCM_RIGHTS|acks",
            Hello(pid=4242, uid=1000, role=3, features=0x5, max_payload=DEFAULT_MAX,
                  name="py-sender")),
        hello_vector(
            "hello-receiver-no-name", "HELLO of a receiver (role 2) with a smaller payload "
            "limit and an empty name (the name is the rest of the payload)",
            Hello(pid=123456, uid=0, role=2, features=0x5, max_payload=65536, name="")),
        hello_vector(
            "hello-utf8-name", "HELLO whose name is non-ASCII UTF-8",
            Hello(pid=7, uid=4294967294, role=1, features=0x1, max_payload=4096,
                  name="wörker-☃")),
        handoff_vector(
            "handoff-1", "HANDOFF of one TCP connection, ACK requested, with JSON meta and "
            "the request line the sender already read",
            [(1, kind("inet", "stream", 6), {"route": "/chat", "user": "ada"},
              b"GET /chat HTTP/1.1\r\nHost: example\r\n\r\n")], ack=True),
        handoff_vector(
            "handoff-3", "HANDOFF of three sockets in one frame (3 fds, in entry order): "
            "big ids, empty meta/data, UTF-8 meta given as bytes, binary data",
            [(0x0102030405060708, kind("inet6", "stream", 6), {"route": "/ws", "n": 2},
              b"\x00\x01\x02\xff binary\r\n"),
             (2, kind("unix", "stream", 0), None, b""),
             (0xFFFFFFFFFFFFFFFE, kind("unix", "seqpacket", 0),
              '{"note":"café ☕"}'.encode(), b"x")], ack=True),
        handoff_vector(
            "handoff-no-ack", "fire-and-forget HANDOFF (flags 0: the receiver must not "
            "answer), no meta, no data",
            [(99, kind("inet", "stream", 0), None, b"")], ack=False),
        valid("accept-2", "ACCEPT of two handoff ids, one of them the largest u64",
              encode_frame(FrameType.ACCEPT, encode_accept([1, 0xFFFFFFFFFFFFFFFF])),
              {"count": 2, "ids": ["1", str(0xFFFFFFFFFFFFFFFF)]}),
        valid("reject", "REJECT of handoff 2 with a UTF-8 reason",
              encode_frame(FrameType.REJECT, encode_reject(Reject(2, "kein Platz: überlastet"))),
              {"id": "2", "reason": "kein Platz: überlastet",
               "reason_hex": "kein Platz: überlastet".encode().hex()}),
        valid("reject-no-reason", "REJECT with an empty reason",
              encode_frame(FrameType.REJECT, encode_reject(Reject(77, ""))),
              {"id": "77", "reason": "", "reason_hex": ""}),
        valid("bye", "BYE: the orderly end of a channel, empty payload",
              encode_frame(FrameType.BYE), {}),
        valid("error", "ERROR 7 (REFUSED) as a listener sends it instead of its HELLO",
              encode_frame(FrameType.ERROR, encode_error(
                  ErrorCode.REFUSED, "uid 1001 may not hand off to this listener")),
              {"code": 7, "code_name": "REFUSED",
               "text": "uid 1001 may not hand off to this listener",
               "text_hex": b"uid 1001 may not hand off to this listener".hex()}),
        valid("error-no-text", "ERROR 6 (PROTOCOL) with an empty text",
              encode_frame(FrameType.ERROR, encode_error(ErrorCode.PROTOCOL, "")),
              {"code": 6, "code_name": "PROTOCOL", "text": "", "text_hex": ""}),
    ]


# --- invalid vectors -------------------------------------------------------------------


def _hdr(ftype: int, *, flags: int = 0, nfds: int = 0, length: int = 0, magic: bytes = MAGIC,
         version: int = 1, reserved: int = 0) -> bytes:
    return HEADER.pack(magic, version, ftype, flags, nfds, reserved, length)


def _frame(ftype: int, payload: bytes, *, nfds: int = 0, flags: int = 0) -> bytes:
    return _hdr(ftype, flags=flags, nfds=nfds, length=len(payload)) + payload


def _entry(hid: int, fam: int, typ: int, proto: int, meta: bytes, data: bytes,
           *, mlen: int | None = None, dlen: int | None = None) -> bytes:
    return struct.pack(">QBBHII", hid, fam, typ, proto,
                       len(meta) if mlen is None else mlen,
                       len(data) if dlen is None else dlen) + meta + data


def invalid_vectors() -> list[dict[str, Any]]:
    h1 = bytes.fromhex(valid_vectors()[3]["hex"])  # handoff-1
    tcp = (1, 1, 6)
    one = struct.pack(">H", 1) + _entry(5, *tcp, b'{"a":1}', b"hi")
    return [
        invalid("bad-magic", "first bytes are not 'SS' (here: an HTTP request)",
                b"GET / HTTP/1.1\r\n", "bad-magic", "frame"),
        invalid("bad-version", "a BYE header with protocol version 2",
                _hdr(0x03, version=2), "bad-version", "frame"),
        invalid("unknown-type", "frame type 0x7f", _hdr(0x7F), "unknown-type", "frame"),
        invalid("reserved-not-zero", "a BYE header with reserved bytes 00 01",
                _hdr(0x03, reserved=1), "reserved-not-zero", "frame"),
        invalid("payload-too-large", "a HANDOFF header announcing 1 MiB + 1 payload bytes "
                "(detected from the header alone)",
                _hdr(0x20, flags=1, nfds=1, length=DEFAULT_MAX + 1), "payload-too-large",
                "frame", fds=1),
        invalid("payload-over-agreed-limit", "handoff-1 sent to a receiver whose limit "
                "(HELLO max_payload) is 64 bytes", h1, "payload-too-large", "frame",
                fds=1, max_payload=64),
        invalid("too-many-fds", "a HANDOFF header announcing 254 descriptors (limit 253)",
                _hdr(0x20, nfds=254, length=2) + b"\x00\x00", "too-many-fds", "frame"),
        invalid("missing-fds", "handoff-1 whose descriptor did not arrive (the kernel "
                "dropped it, or the sender did not attach it to the first byte)",
                h1, "missing-fds", "frame", fds=0),
        invalid("truncated-frame", "handoff-1 without its last 5 bytes, then end of stream",
                h1[:-5], "truncated-frame", "frame", fds=1, eof=True),
        invalid("truncated-header", "7 header bytes, then end of stream",
                h1[:7], "truncated-frame", "frame", fds=1, eof=True),
        invalid("hello-short", "HELLO payload of 10 bytes (the fixed part is 18)",
                _frame(0x01, bytes(10)), "bad-length", "payload"),
        invalid("hello-bad-utf8", "HELLO name that is not UTF-8",
                _frame(0x01, struct.pack(">BBIIII", 1, 3, 5, 1, 1, 4096) + b"\xc3\x28"),
                "bad-utf8", "payload"),
        invalid("hello-name-too-long", "HELLO whose name is 256 bytes (at most 255)",
                _frame(0x01, struct.pack(">BBIIII", 1, 3, 5, 1, 1, 4096) + b"n" * 256),
                "bad-length", "payload"),
        invalid("handoff-empty-payload", "HANDOFF with no payload at all (no count)",
                _frame(0x20, b""), "bad-length", "payload"),
        invalid("handoff-no-entries", "HANDOFF whose entry count is 0 (1..253 is allowed)",
                _frame(0x20, struct.pack(">H", 0)), "no-entries", "payload"),
        invalid("handoff-truncated-entry", "HANDOFF count 2 with only one entry",
                _frame(0x20, struct.pack(">H", 2) + one[2:], nfds=2, flags=1),
                "bad-length", "payload", fds=2),
        invalid("handoff-short-body", "entry announces 100 meta bytes; 7 follow",
                _frame(0x20, struct.pack(">H", 1) + _entry(5, *tcp, b'{"a":1}', b"",
                                                           mlen=100), nfds=1),
                "bad-length", "payload", fds=1),
        invalid("handoff-trailing-bytes", "a one-entry HANDOFF with one extra byte",
                _frame(0x20, one + b"\x00", nfds=1), "trailing-bytes", "payload", fds=1),
        invalid("handoff-unknown-family", "entry with family code 9",
                _frame(0x20, struct.pack(">H", 1) + _entry(5, 9, 1, 0, b"", b""), nfds=1),
                "unknown-kind", "payload", fds=1),
        invalid("handoff-unknown-type", "entry with type code 0",
                _frame(0x20, struct.pack(">H", 1) + _entry(5, 1, 0, 0, b"", b""), nfds=1),
                "unknown-kind", "payload", fds=1),
        invalid("handoff-meta-over-limit", "entry announcing 16385 meta bytes (limit "
                "16384), detected before the body is looked at",
                _frame(0x20, struct.pack(">H", 1) + _entry(5, *tcp, b"", b"", mlen=16385),
                       nfds=1), "entry-over-limits", "payload", fds=1),
        invalid("handoff-data-over-limit", "entry announcing 65537 data bytes (limit 65536)",
                _frame(0x20, struct.pack(">H", 1) + _entry(5, *tcp, b"", b"", dlen=65537),
                       nfds=1), "entry-over-limits", "payload", fds=1),
        invalid("handoff-fd-count-mismatch", "one entry, two descriptors",
                _frame(0x20, one, nfds=2, flags=1), "fd-count-mismatch", "channel", fds=2),
        invalid("accept-short", "ACCEPT count 2 with one id",
                _frame(0x21, struct.pack(">HQ", 2, 1)), "bad-length", "payload"),
        invalid("accept-trailing", "ACCEPT count 1 with two ids (ACCEPT has an exact size)",
                _frame(0x21, struct.pack(">HQQ", 1, 1, 2)), "bad-length", "payload"),
        invalid("reject-short", "REJECT payload of 7 bytes (the id needs 8)",
                _frame(0x22, bytes(7)), "bad-length", "payload"),
        invalid("reject-bad-utf8", "REJECT reason that is not UTF-8",
                _frame(0x22, struct.pack(">Q", 1) + b"\xff\xfe"), "bad-utf8", "payload"),
        invalid("error-short", "ERROR payload of 1 byte (the code needs 2)",
                _frame(0x02, b"\x00"), "bad-length", "payload"),
        invalid("fds-on-accept", "an ACCEPT frame that carries a descriptor",
                _frame(0x21, struct.pack(">HQ", 1, 1), nfds=1), "fds-on-wrong-frame",
                "channel", fds=1),
    ]


# --- self-check: every invalid vector fails in the reference codec at its layer ----------


def _check_fails(v: dict[str, Any]) -> None:
    layer = decode_vector(v)
    if layer != v["layer"]:
        raise AssertionError(f"vector {v['name']}: failed at {layer!r}, expected {v['layer']!r}")


def decode_vector(v: dict[str, Any]) -> str | None:
    """Run the decoding procedure with the Python codec; return the failing layer or None."""
    dec = FrameDecoder(max_payload=v["max_payload"])
    try:
        dec.feed(bytes.fromhex(v["hex"]), list(range(1000, 1000 + v["fds"])))
        frames = []
        while (f := dec.next_frame()) is not None:
            frames.append(f)
        if v["eof"]:
            dec.end_of_stream()
    except RemoteProtocolError:
        return "frame"
    for f in frames:
        try:
            if f.type == FrameType.HELLO:
                decode_hello(f.payload)
            elif f.type == FrameType.HANDOFF:
                entries = decode_handoff(f.payload)
            elif f.type == FrameType.ACCEPT:
                decode_accept(f.payload)
            elif f.type == FrameType.REJECT:
                decode_reject(f.payload)
            elif f.type == FrameType.ERROR:
                decode_error(f.payload)
        except RemoteProtocolError:
            return "payload"
        if (f.type == FrameType.HANDOFF and len(entries) != len(f.fds)) or (
                f.type != FrameType.HANDOFF and f.fds):
            return "channel"
    return None


# --- CONTROL messages (controls.json) ------------------------------------------------------

CONTROLS_OUT = Path(__file__).with_name("controls.json")

#: Reason codes of the invalid CONTROL vectors.
CONTROL_REASONS = {
    "not-json": "the payload is not JSON (or not UTF-8)",
    "not-an-object": "the payload is JSON but not an object",
    "no-tag": 'the object has neither "ev" nor "cmd"',
    "both-tags": 'the object has both "ev" and "cmd"',
    "tag-not-string": 'the "ev" or "cmd" value is not a string',
    "unknown-kind": "no such report or command (receivers ignore these)",
    "missing-field": "a required field is missing",
    "ill-typed-field": "a field has the wrong type or an out-of-range value",
}


def _control_payload(obj: Any) -> bytes:
    """Compact JSON, as the channel writes a CONTROL payload."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def _fields(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(msg)))
    return out


def control_vector(name: str, description: str, msg: Any, *,
                   received: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid vector: ``msg`` encoded, or (decode-only) the object ``received``, which
    decodes to ``msg``."""
    from sockshare.server._messages import Command, decode, to_bytes

    canonical = to_bytes(msg)
    payload = canonical if received is None else _control_payload(received)
    if decode(payload) != msg:
        raise AssertionError(f"control vector {name}: {payload!r} does not decode to {msg}")
    return {"name": name, "valid": True, "description": description,
            "direction": "dispatcher->worker" if isinstance(msg, Command) else "worker->dispatcher",
            "type": type(msg).__name__, "tag": msg.TAG, "kind": msg.KIND,
            "payload": payload.decode(), "hex": encode_frame(FrameType.CONTROL, payload).hex(),
            "object": json.loads(payload), "fields": _fields(msg),
            "canonical": canonical.decode()}


def control_invalid(name: str, description: str, payload: bytes | Any,
                    reason: str) -> dict[str, Any]:
    from sockshare.server._messages import UnknownMessage, decode

    assert reason in CONTROL_REASONS, reason
    raw = payload if isinstance(payload, bytes) else _control_payload(payload)
    try:
        decode(raw)
    except RemoteProtocolError as exc:
        error = type(exc).__name__
        if (reason == "unknown-kind") != isinstance(exc, UnknownMessage):
            raise AssertionError(f"control vector {name}: {exc!r} for reason {reason}") from None
    else:
        raise AssertionError(f"control vector {name}: {raw!r} decodes")
    return {"name": name, "valid": False, "description": description,
            "payload": raw.decode("utf-8", "replace"),
            "hex": encode_frame(FrameType.CONTROL, raw).hex(), "error": error, "reason": reason}


def control_vectors() -> list[dict[str, Any]]:
    from sockshare.server import _messages as m

    key = m.MoveKey(4242, 17)
    v, bad = control_vector, control_invalid
    return [
        # -- reports, worker -> dispatcher
        v("hello", "the Python runtime's hello: resumes, listens for peers, fd capacity",
          m.Hello(True, 4242, "/run/user/1000/sockshare/4242.peer", 1000)),
        v("hello-no-peer", "a hello without resume, peer socket or known capacity",
          m.Hello(False, 4243, None)),
        v("fatal", "the app cannot be loaded",
          m.Fatal("the app cannot be loaded: app:handle: ImportError: no module named app")),
        v("fatal-startup", "a web app's lifespan startup failed: the server stops (exit 3)",
          m.Fatal("the app's lifespan startup failed:\nRuntimeError: database is down",
                  startup=True)),
        v("recycle", "past --max-requests: replace this worker without dropping a connection",
          m.Recycle("max-requests")),
        v("web", "a web app's worker's move counters so far",
          m.WebCounts(120, 4, 2, 1, 3)),
        v("closed", "the Python runtime's close report: 3 closed, 7 still open",
          m.Closed(3, active=7)),
        v("closed-foreign", "the C and PHP workers' close report (no active count): "
          "2 closed", m.Closed(2)),
        v("opened", "accept = worker: 5 connections the worker accepted itself, counted in "
          "before their closes", m.Opened(5)),
        v("fed", "--dispatchers: 4 handoffs from feeder 1 accepted, counted in before "
          "their closes", m.Fed(4, by=1)),
        v("fds-full", "out of descriptors: send nothing more", m.Fds(full=True)),
        v("fds-free", "below the mark again: room for 250 connections",
          m.Fds(full=False, capacity=250)),
        v("draining", "stopping: pick this worker no more", m.Draining()),
        v("unmoved", "1 migration refused in the worker (out of descriptors), 4 connections "
          "a drain could not move: closed", m.Unmoved(1, 4)),
        v("migrate_ack", "migrate request 9: 2 connections flagged", m.MigrateAck(2, 9)),
        v("migrate_ack-no-req", "an answer to a migrate without a request number",
          m.MigrateAck(0, None)),
        v("moving", "a direct move to worker 2, still unanswered", m.Moving(2, key)),
        v("moved_out", "a direct move to worker 2 left", m.MovedOut(2, key)),
        v("move_back", "an announced direct move came back", m.MoveBack(2, key)),
        v("moved_out-batch", "three direct moves to worker 2 left (one report for a batch)",
          m.MovedOut(2, key, (m.MoveKey(4242, 18), m.MoveKey(4242, 19)))),
        v("moving-batch", "two direct moves of a batch to worker 2, still unanswered",
          m.Moving(2, key, (m.MoveKey(4242, 18),))),
        v("moved_in", "a direct move from worker 1 arrived, 1.5 ms after it started",
          m.MovedIn(1, (4242, 17), 0.0015)),
        v("moved_in-unknown-source", "a direct move whose meta named no source",
          m.MovedIn(None, (None, 17), None)),
        v("moved_in-batch", "three direct moves from worker 1 (pid 4242) arrived in one read; "
          "the last one's latency is unknown",
          m.MovedIn(1, (4242, 17), 0.0015, ((18, 0.0016), (19, None)))),
        v("orphan-query", "may I serve a direct move whose ACCEPT could not reach pid 4242?",
          m.OrphanQuery(4242, key)),
        # -- commands, dispatcher -> worker
        v("migrate", "migrate up to 2 connections (rebalancing), request 9",
          m.Migrate(2, "rebalance", 9)),
        v("migrate-all", "migrate every connection that can move",
          m.Migrate(None, "request", 3)),
        v("peers", "the pool's other workers that take direct migrations",
          m.Peers((m.PeerEntry(2, 4243, "/run/user/1000/sockshare/4243.peer", 5),
                   m.PeerEntry(3, 4244, "/run/user/1000/sockshare/4244.peer", 0)))),
        v("peers-empty", "nobody to migrate to directly: relay", m.Peers(())),
        v("peers-room", "peers with room for 95 and 100 more connections (max_conns, "
          "descriptors): no more than that goes to each",
          m.Peers((m.PeerEntry(2, 4243, "/run/user/1000/sockshare/4243.peer", 5, 95),
                   m.PeerEntry(3, 4244, "/run/user/1000/sockshare/4244.peer", 0, 100)))),
        v("orphan-answer", "the source is dead: serve it", m.OrphanAnswer(key, True)),
        v("drain", "reload: drain, migrating what can move",
          m.Drain(migrate=True, reason="reload")),
        # -- decode-only: what a receiver must accept
        v("closed-extra-field", "unknown fields are ignored (a newer peer's)", m.Closed(2),
          received={"ev": "closed", "n": 2, "since": 1.5}),
        v("closed-no-n", '"n" may be left out: one connection', m.Closed(1),
          received={"ev": "closed"}),
        v("hello-foreign", "a foreign worker's minimal hello (docs/server.md)",
          m.Hello(True), received={"ev": "hello", "resume": True}),
        v("moved_in-int-latency", "a latency written as an integer", m.MovedIn(1, (4242, 17), 0.0),
          received={"ev": "moved_in", "from": 1, "key": [4242, 17], "latency": 0}),
        v("migrate-minimal", "a migrate with only a count", m.Migrate(4),
          received={"cmd": "migrate", "n": 4}),
        v("drain-minimal", "a drain without migration or reason", m.Drain(),
          received={"cmd": "drain"}),
        # -- invalid
        bad("not-json", "a truncated object", b'{"ev":"closed",', "not-json"),
        bad("not-utf8", "a payload that is not UTF-8 (payload shown with U+FFFD; hex is "
            "authoritative)", b'{"ev":"\xff"}', "not-json"),
        bad("not-an-object", "a JSON list", [1, 2], "not-an-object"),
        bad("no-tag", "neither ev nor cmd", {"n": 1}, "no-tag"),
        bad("both-tags", "both ev and cmd", {"ev": "closed", "cmd": "drain"}, "both-tags"),
        bad("tag-not-string", "an ev that is a number", {"ev": 1}, "tag-not-string"),
        bad("unknown-report", "no report is called ready", {"ev": "ready"}, "unknown-kind"),
        bad("unknown-command", "status is a control-socket request, not a CONTROL command",
            {"cmd": "status"}, "unknown-kind"),
        bad("report-as-command", "closed is a report: as a command it is unknown",
            {"cmd": "closed", "n": 1}, "unknown-kind"),
        bad("fds-no-full", "fds without full", {"ev": "fds", "capacity": 3}, "missing-field"),
        bad("migrate_ack-no-n", "migrate_ack without n", {"ev": "migrate_ack", "req": 1},
            "missing-field"),
        bad("moving-no-key", "moving without key", {"ev": "moving", "to": 2}, "missing-field"),
        bad("orphan-answer-no-dead", "an orphan answer without dead",
            {"cmd": "orphan", "key": [4242, 17]}, "missing-field"),
        bad("closed-n-string", "n as a string", {"ev": "closed", "n": "2"}, "ill-typed-field"),
        bad("closed-n-bool", "true is not an integer", {"ev": "closed", "n": True},
            "ill-typed-field"),
        bad("closed-n-negative", "a negative count", {"ev": "closed", "n": -1},
            "ill-typed-field"),
        bad("hello-resume-string", "resume as a string", {"ev": "hello", "resume": "yes"},
            "ill-typed-field"),
        bad("fds-capacity-float", "a capacity that is not an integer",
            {"ev": "fds", "full": False, "capacity": 1.5}, "ill-typed-field"),
        bad("moved_out-short-key", "a key of one number", {"ev": "moved_out", "to": 2,
                                                           "key": [4242]}, "ill-typed-field"),
        bad("moved_in-latency-string", "a latency that is not a number",
            {"ev": "moved_in", "from": 1, "key": [4242, 17], "latency": "fast"},
            "ill-typed-field"),
        bad("migrate-n-negative", "a negative migrate count", {"cmd": "migrate", "n": -2},
            "ill-typed-field"),
        bad("peers-junk-entry", "a peer entry that is not [id, pid, path, connections(, room)]",
            {"cmd": "peers", "peers": [[2, 4243, "/p", 0], ["junk"]]}, "ill-typed-field"),
        bad("peers-not-a-list", "peers as an object", {"cmd": "peers", "peers": {}},
            "ill-typed-field"),
        bad("peers-negative-room", "a peer with room for -1 connections",
            {"cmd": "peers", "peers": [[2, 4243, "/p", 0, -1]]}, "ill-typed-field"),
        bad("moved_out-more-junk", "a batch's more keys that are not [pid, id]",
            {"ev": "moved_out", "to": 2, "key": [4242, 17], "more": [[4242]]}, "ill-typed-field"),
        bad("moved_in-more-latency-string", "a batch's arrival with a latency that is not a "
            "number", {"ev": "moved_in", "from": 1, "key": [4242, 17], "latency": 0.1,
                       "more": [[18, "fast"]]}, "ill-typed-field"),
        bad("orphan-dead-int", "dead as a number", {"cmd": "orphan", "key": [4242, 17],
                                                    "dead": 1}, "ill-typed-field"),
    ]


def build_controls() -> str:
    vectors = control_vectors()
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "duplicate control vector names"
    head = {
        "format": "sockshare-control-vectors",
        "format_version": 1,
        "generated_by": "tests/vectors/make_vectors.py (do not edit by hand)",
        "frame_type": int(FrameType.CONTROL),
        "reasons": CONTROL_REASONS,
    }
    body = json.dumps(head, indent=1, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    lines = [json.dumps(v, ensure_ascii=False, separators=(", ", ": ")) for v in vectors]
    return body + ',\n "vectors": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def build() -> str:
    vectors = valid_vectors()
    for v in vectors:
        assert decode_vector(v) is None, v["name"]
    vectors += invalid_vectors()
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "duplicate vector names"
    head = {
        "format": "sockshare-frame-vectors",
        "format_version": 1,
        "protocol_version": 1,
        "generated_by": "tests/vectors/make_vectors.py (do not edit by hand)",
        "limits": {"max_payload": DEFAULT_MAX, "max_fds_per_frame": 253,
                   "max_meta": 16384, "max_data": 65536},
        "family_codes": FAMILY_CODES,
        "type_codes": TYPE_CODES,
        "frame_types": {t.name: int(t) for t in FrameType},
        "flags": {"HANDOFF_ACK": 1},
        "error_codes": {c.name: int(c) for c in ErrorCode},
        "reasons": REASONS,
    }
    body = json.dumps(head, indent=1, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    lines = [json.dumps(v, ensure_ascii=False, separators=(", ", ": ")) for v in vectors]
    return body + ',\n "vectors": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def main(argv: list[str]) -> int:
    stale = 0
    for out, text in ((OUT, build()), (CONTROLS_OUT, build_controls())):
        json.loads(text)  # well-formed
        if "--check" in argv:
            if not out.exists() or out.read_text(encoding="utf-8") != text:
                print(f"{out} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
                stale = 1
            else:
                print(f"{out.name} is up to date")
            continue
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out} ({text.count(chr(10))} lines)")
    return stale


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
