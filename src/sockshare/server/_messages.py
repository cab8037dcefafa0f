"""The control vocabulary of ``sockshare serve``: every CONTROL message between the
dispatcher and its workers, typed, with one codec.

A CONTROL frame (docs/protocol.md, type 0x30) carries one JSON object, compact
(``{"ev":"closed","n":3}``, keys in the order below). A worker's *reports* name
themselves with ``"ev"``, the dispatcher's *commands* with ``"cmd"``. :func:`decode`
turns an object (or a frame's payload) into one of the frozen dataclasses below,
:func:`encode` gives the object back, byte for byte what the runtime has always sent,
so the C and PHP workers, and an old and a new dispatcher during an upgrade, keep
understanding each other. ``tests/vectors/controls.json`` holds the exact bytes of each.

Decoding rules: fields not listed are ignored (a newer peer may add some); a field
marked *optional* may be missing (its default applies) and, where the type says
``null``, may be ``null``; anything else missing or of another type, an unknown
``"ev"``/``"cmd"``, both or neither, or a payload that is not a JSON object raises
:class:`~sockshare.RemoteProtocolError` naming the message and the field
(:class:`UnknownMessage`, a subclass, for a kind this side does not know: the
receivers ignore those, as the protocol asks). Integers are JSON integers
(``true`` is not one).

Reports, worker → dispatcher (``"ev"``); the class, then ``"ev"``, its fields in wire
order and what it means:

========================  =============  ========================================================
class                     ``"ev"``       fields; meaning
========================  =============  ========================================================
:class:`Hello`            hello          ``resume`` bool (optional, false), ``pid`` int|null
                                         (optional), ``peer`` str|null (optional), ``capacity`` int
                                         (optional, left out when unknown); the Python runtime is
                                         up: it resumes migrated connections, its socket for direct
                                         migration, how many connections its descriptors allow
:class:`Fatal`            fatal          ``reason`` str (optional, "fatal error"), ``startup`` bool
                                         (optional, false, left out when false); the app cannot be
                                         loaded (``startup``: its lifespan startup failed), the
                                         worker exits with status 3
:class:`WebCounts`        web            ``handed_over``, ``ws_out``, ``ws_in``, ``refused``,
                                         ``closed_1012``: ints >= 0 (optional, 0); a web app's
                                         worker's totals so far: keep-alive connections handed
                                         over, WebSockets moved out and in, moves refused,
                                         WebSockets closed with 1012 (docs/web.md)
:class:`Recycle`          recycle        ``reason`` str (optional, "recycle"); replace me (a web
                                         app's worker past ``--max-requests``): start a new
                                         worker, then drain this one as a reload does
:class:`Closed`           closed         ``n`` int >= 0 (optional, 1), ``active`` int >= 0 (optional,
                                         left out by the C/PHP workers); ``n`` connections closed
                                         since the last report, ``active`` still open
:class:`Opened`           opened         ``n`` int >= 0; ``n`` connections the worker accepted itself
                                         since the last report (``accept = "worker"``: it accepts
                                         on the pool's listeners), counted in before any close of
                                         them (sent ahead of ``closed`` in the same write)
:class:`Fed`              fed            ``n`` int >= 0, ``by`` int (optional); ``n`` handoffs from
                                         feeder ``by`` (``--dispatchers``) accepted since the last
                                         report: counted in here, before any close of them
                                         (``_feeders``)
:class:`Fds`              fds            ``full`` bool, ``capacity`` int (optional, left out when
                                         full); out of descriptors: send nothing more / room again
                                         for ``capacity`` connections in all
:class:`Draining`         draining       (none); stopping: pick it no more
:class:`Unmoved`          unmoved        ``refused``, ``closed``: ints >= 0 (optional, 0); since
                                         the last report, ``refused`` migrations the worker itself
                                         refused (``MigrationRefused`` before anything left: out
                                         of descriptors), ``closed`` connections a drain could not
                                         move and closed (no resume handler, not migratable)
:class:`MigrateAck`       migrate_ack    ``n`` int >= 0, ``req`` int|null (optional); the answer to
                                         ``migrate`` number ``req``: ``n`` connections flagged
:class:`Moving`           moving         ``to`` int, ``key`` [pid, id]; a direct move to worker
                                         ``to`` is still unanswered after the report delay
:class:`MovedOut`         moved_out      ``to`` int, ``key`` [pid, id]; a direct move left (the
                                         target took it, or may have)
:class:`MoveBack`         move_back      ``to`` int, ``key`` [pid, id]; an announced direct move
                                         came back
:class:`MovedIn`          moved_in       ``from`` int|null (optional), ``key`` [pid|null, id],
                                         ``latency`` number|null (optional); a direct move arrived,
                                         ``latency`` seconds after it started
:class:`OrphanQuery`      orphan         ``pid`` int, ``key`` [pid, id]; a direct move whose ACCEPT
                                         could not reach source ``pid``: may it be served here?
========================  =============  ========================================================

Commands, dispatcher → worker (``"cmd"``):

========================  =============  ========================================================
class                     ``"cmd"``      fields; meaning
========================  =============  ========================================================
:class:`Migrate`          migrate        ``n`` int >= 0|null (optional; null: all), ``reason`` str
                                         (optional, ""), ``req`` int|null (optional); flag up to
                                         ``n`` connections to migrate, answer ``migrate_ack``
:class:`Peers`            peers          ``peers`` [[id, pid, path, connections], ...]; the pool's
                                         other workers that take direct migrations
:class:`OrphanAnswer`     orphan         ``key`` [pid, id], ``dead`` bool; the answer to an
                                         ``orphan`` report: serve it only if the source is dead
:class:`Drain`            drain          ``migrate`` bool (optional, false), ``reason`` str
                                         (optional, ""); stop taking connections, migrate what can
                                         move (``migrate``), finish, exit
========================  =============  ========================================================

``key`` is ``[source pid, handoff id]``: the id of the HANDOFF on the source's channel
to the target, which both ends know. ``"orphan"`` is a report and a command: the
``"ev"``/``"cmd"`` tag tells them apart.

Receivers dispatch by type through a :class:`HandlerTable` (the worker runtime and the
supervisor each have one); the dispatcher's control *socket* (``sockshare status``,
``reload``, ``upgrade``, ``migrate``, an upgrade's ``takeover``) is another protocol,
request/response over its own socket (``_control``), not part of this vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from sockshare._errors import RemoteProtocolError
from sockshare.protocol import decode_control, encode_control

__all__ = [
    "COMMANDS",
    "REPORTS",
    "Closed",
    "Opened",
    "Command",
    "Draining",
    "Drain",
    "Fatal",
    "Fed",
    "Fds",
    "HandlerTable",
    "Hello",
    "Message",
    "MigrateAck",
    "Migrate",
    "MoveBack",
    "MoveKey",
    "MovedIn",
    "MovedOut",
    "Moving",
    "OrphanAnswer",
    "OrphanQuery",
    "PeerEntry",
    "Peers",
    "Recycle",
    "WebCounts",
    "Report",
    "UnknownMessage",
    "Unmoved",
    "decode",
    "encode",
    "to_bytes",
]


class UnknownMessage(RemoteProtocolError):
    """A control message of a kind this side does not know (a newer peer's, or a
    command sent to the dispatcher): the receivers ignore it."""


class MoveKey(NamedTuple):
    """A direct move: the source worker's pid and the HANDOFF id on its peer channel."""

    pid: int
    id: int


class PeerEntry(NamedTuple):
    """One of the pool's other workers, in a ``peers`` command."""

    id: int
    pid: int
    path: str
    connections: int
    #: how many more connections it may be given (its limit: ``max_conns``, its
    #: descriptors), None for no limit (wire: a 5th element, left out when None)
    room: int | None = None


# --- reading fields ----------------------------------------------------------------------

_MISSING: Any = object()


class _Fields:
    """The fields of one received object, read with precise errors."""

    __slots__ = ("kind", "obj", "tag")

    def __init__(self, obj: Mapping[str, Any], tag: str, kind: str) -> None:
        self.obj = obj
        self.tag = tag
        self.kind = kind

    @property
    def what(self) -> str:
        """The message's name in errors, ``{"ev": "closed"}`` (made only for an error:
        every control message the dispatcher receives is read here)."""
        return json.dumps({self.tag: self.kind})

    def _fail(self, key: str, expected: str, value: Any) -> RemoteProtocolError:
        shown = "missing" if value is _MISSING else f"got {_show(value)}"
        return RemoteProtocolError(f"control message {self.what}: field {key!r} must be "
                                   f"{expected}, {shown}")

    def _get(self, key: str, default: Any) -> Any:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING and default is not _MISSING:
            return default
        return value

    def integer(self, key: str, default: Any = _MISSING, *, null: bool = False,
            minimum: int | None = None) -> Any:
        value = self._get(key, default)
        if value is None and null:
            return None
        if (not isinstance(value, int) or isinstance(value, bool)
                or (minimum is not None and value < minimum)):
            raise self._fail(key, _int_name(null, minimum), value)
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def text(self, key: str, default: Any = _MISSING, *, null: bool = False) -> Any:
        value = self._get(key, default)
        if value is None and null:
            return None
        if not isinstance(value, str):
            raise self._fail(key, "a string or null" if null else "a string", value)
        return value

    def number(self, key: str, default: Any = _MISSING) -> float | None:
        """A JSON number or null (an integer is taken as a float)."""
        value = self._get(key, default)
        if value is None:
            return None
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not math.isfinite(value)):
            raise self._fail(key, "a number or null", value)
        return float(value)

    def more_keys(self, key: str = "more") -> tuple[MoveKey, ...]:
        """More [pid, id] keys of the same report (a batch): absent is none."""
        value = self._get(key, [])
        expected = "a list of [pid, id] (two integers each)"
        if not isinstance(value, list):
            raise self._fail(key, expected, value)
        out = []
        for item in value:
            if not (isinstance(item, list) and len(item) == 2 and _is_int(item[0])
                    and _is_int(item[1])):
                raise self._fail(key, expected, item)
            out.append(MoveKey(item[0], item[1]))
        return tuple(out)

    def more_arrivals(self, key: str = "more") -> tuple[tuple[int, float | None], ...]:
        """More [id, latency] pairs of a ``moved_in`` (the same source): absent is none."""
        value = self._get(key, [])
        expected = "a list of [id, latency seconds or null]"
        if not isinstance(value, list):
            raise self._fail(key, expected, value)
        out: list[tuple[int, float | None]] = []
        for item in value:
            if not (isinstance(item, list) and len(item) == 2 and _is_int(item[0])
                    and (item[1] is None or (isinstance(item[1], int | float)
                                             and not isinstance(item[1], bool)
                                             and math.isfinite(item[1])))):
                raise self._fail(key, expected, item)
            out.append((item[0], None if item[1] is None else float(item[1])))
        return tuple(out)

    def move_key(self, key: str = "key", *, null_pid: bool = False) -> Any:
        value = self._get(key, _MISSING)
        expected = "[pid or null, id]" if null_pid else "[pid, id] (two integers)"
        if not isinstance(value, list) or len(value) != 2:
            raise self._fail(key, expected, value)
        pid, hid = value
        if not _is_int(hid) or not (_is_int(pid) or (null_pid and pid is None)):
            raise self._fail(key, expected, value)
        return (pid, hid) if null_pid else MoveKey(pid, hid)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_name(null: bool, minimum: int | None) -> str:
    name = "an integer" if minimum is None else f"an integer >= {minimum}"
    return f"{name} or null" if null else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A control message (one CONTROL frame)."""

    #: ``"ev"`` (a report) or ``"cmd"`` (a command), and the kind it names
    TAG: ClassVar[str] = ""
    KIND: ClassVar[str] = ""

    def fields(self) -> dict[str, Any]:
        """The wire fields after the tag, in wire order."""
        return {}

    @classmethod
    def read(cls, f: _Fields) -> Message:
        """Build from the received fields (the tag already matched)."""
        return cls()


@dataclass(frozen=True)
class Report(Message):
    """Worker → dispatcher (``"ev"``)."""

    TAG: ClassVar[str] = "ev"


@dataclass(frozen=True)
class Command(Message):
    """Dispatcher → worker (``"cmd"``)."""

    TAG: ClassVar[str] = "cmd"


@dataclass(frozen=True)
class Hello(Report):
    KIND: ClassVar[str] = "hello"
    resume: bool = False
    pid: int | None = None
    peer: str | None = None
    capacity: int | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"resume": self.resume, "pid": self.pid, "peer": self.peer}
        if self.capacity is not None:
            out["capacity"] = self.capacity
        return out

    @classmethod
    def read(cls, f: _Fields) -> Hello:
        return cls(f.boolean("resume", False), f.integer("pid", None, null=True),
                   f.text("peer", None, null=True), f.integer("capacity", None, null=True))


@dataclass(frozen=True)
class Fatal(Report):
    KIND: ClassVar[str] = "fatal"
    reason: str = "fatal error"
    startup: bool = False

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason}
        if self.startup:
            out["startup"] = True
        return out

    @classmethod
    def read(cls, f: _Fields) -> Fatal:
        return cls(f.text("reason", "fatal error"), f.boolean("startup", False))


@dataclass(frozen=True)
class Recycle(Report):
    KIND: ClassVar[str] = "recycle"
    reason: str = "recycle"

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def read(cls, f: _Fields) -> Recycle:
        return cls(f.text("reason", "recycle"))


@dataclass(frozen=True)
class Closed(Report):
    KIND: ClassVar[str] = "closed"
    n: int = 1
    active: int | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        if self.active is not None:
            out["active"] = self.active
        return out

    @classmethod
    def read(cls, f: _Fields) -> Closed:
        return cls(f.integer("n", 1, minimum=0), f.integer("active", None, null=True, minimum=0))


@dataclass(frozen=True)
class Opened(Report):
    KIND: ClassVar[str] = "opened"
    n: int

    def fields(self) -> dict[str, Any]:
        return {"n": self.n}

    @classmethod
    def read(cls, f: _Fields) -> Opened:
        return cls(f.integer("n", minimum=0))


@dataclass(frozen=True)
class Fed(Report):
    KIND: ClassVar[str] = "fed"
    n: int
    #: the feeder's number (its ``feeder:<n>`` name), when known
    by: int | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        if self.by is not None:
            out["by"] = self.by
        return out

    @classmethod
    def read(cls, f: _Fields) -> Fed:
        return cls(f.integer("n", minimum=0), f.integer("by", None, null=True, minimum=0))


@dataclass(frozen=True)
class Fds(Report):
    KIND: ClassVar[str] = "fds"
    full: bool
    capacity: int | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"full": self.full}
        if self.capacity is not None:
            out["capacity"] = self.capacity
        return out

    @classmethod
    def read(cls, f: _Fields) -> Fds:
        return cls(f.boolean("full"), f.integer("capacity", None, null=True))


@dataclass(frozen=True)
class WebCounts(Report):
    KIND: ClassVar[str] = "web"
    #: keep-alive connections handed over between requests / WebSockets moved out /
    #: WebSockets moved in / moves refused (kept here) / WebSockets closed with 1012
    handed_over: int = 0
    ws_out: int = 0
    ws_in: int = 0
    refused: int = 0
    closed_1012: int = 0

    def fields(self) -> dict[str, Any]:
        return {"handed_over": self.handed_over, "ws_out": self.ws_out, "ws_in": self.ws_in,
                "refused": self.refused, "closed_1012": self.closed_1012}

    @classmethod
    def read(cls, f: _Fields) -> WebCounts:
        return cls(*(f.integer(k, 0, minimum=0) for k in
                     ("handed_over", "ws_out", "ws_in", "refused", "closed_1012")))


@dataclass(frozen=True)
class Draining(Report):
    KIND: ClassVar[str] = "draining"

    @classmethod
    def read(cls, f: _Fields) -> Draining:
        return cls()


@dataclass(frozen=True)
class Unmoved(Report):
    KIND: ClassVar[str] = "unmoved"
    #: migrations refused in the worker / connections a drain could not move: closed
    refused: int = 0
    closed: int = 0

    def fields(self) -> dict[str, Any]:
        return {"refused": self.refused, "closed": self.closed}

    @classmethod
    def read(cls, f: _Fields) -> Unmoved:
        return cls(f.integer("refused", 0, minimum=0), f.integer("closed", 0, minimum=0))


@dataclass(frozen=True)
class MigrateAck(Report):
    KIND: ClassVar[str] = "migrate_ack"
    n: int
    req: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"n": self.n, "req": self.req}

    @classmethod
    def read(cls, f: _Fields) -> MigrateAck:
        return cls(f.integer("n", minimum=0), f.integer("req", None, null=True))


@dataclass(frozen=True)
class _DirectMove(Report):
    """A source's report of direct moves to worker ``to``: ``key``, and the ``more``
    of the same batch (wire: ``"more"``, left out when empty)."""

    to: int
    key: MoveKey
    more: tuple[MoveKey, ...] = ()

    @property
    def keys(self) -> tuple[MoveKey, ...]:
        return (self.key, *self.more)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"to": self.to, "key": list(self.key)}
        if self.more:
            out["more"] = [list(k) for k in self.more]
        return out

    @classmethod
    def read(cls, f: _Fields) -> _DirectMove:
        return cls(f.integer("to"), f.move_key(), f.more_keys())


@dataclass(frozen=True)
class Moving(_DirectMove):
    KIND: ClassVar[str] = "moving"


@dataclass(frozen=True)
class MovedOut(_DirectMove):
    KIND: ClassVar[str] = "moved_out"


@dataclass(frozen=True)
class MoveBack(_DirectMove):
    KIND: ClassVar[str] = "move_back"


@dataclass(frozen=True)
class MovedIn(Report):
    KIND: ClassVar[str] = "moved_in"
    #: the source worker's id (wire: ``"from"``)
    source: int | None
    #: (source pid, handoff id); the pid is None if the migration meta had none
    key: tuple[int | None, int]
    latency: float | None = None
    #: more arrivals from the same source in the same report, (id, latency) (wire:
    #: ``"more": [[id, latency], ...]``, left out when empty)
    more: tuple[tuple[int, float | None], ...] = ()

    def arrivals(self) -> tuple[tuple[int, float | None], ...]:
        """(handoff id, latency) of every connection the report counts in."""
        return ((self.key[1], self.latency), *self.more)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.source, "key": list(self.key), "latency": self.latency}
        if self.more:
            out["more"] = [list(m) for m in self.more]
        return out

    @classmethod
    def read(cls, f: _Fields) -> MovedIn:
        return cls(f.integer("from", None, null=True), f.move_key(null_pid=True),
                   f.number("latency", None), f.more_arrivals())


@dataclass(frozen=True)
class OrphanQuery(Report):
    KIND: ClassVar[str] = "orphan"
    pid: int
    key: MoveKey

    def fields(self) -> dict[str, Any]:
        return {"pid": self.pid, "key": list(self.key)}

    @classmethod
    def read(cls, f: _Fields) -> OrphanQuery:
        return cls(f.integer("pid"), f.move_key())


@dataclass(frozen=True)
class Migrate(Command):
    KIND: ClassVar[str] = "migrate"
    #: how many connections (None: every one that can move)
    n: int | None = None
    reason: str = ""
    req: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"n": self.n, "reason": self.reason, "req": self.req}

    @classmethod
    def read(cls, f: _Fields) -> Migrate:
        return cls(f.integer("n", None, null=True, minimum=0), f.text("reason", ""),
                   f.integer("req", None, null=True))


@dataclass(frozen=True)
class Peers(Command):
    KIND: ClassVar[str] = "peers"
    peers: tuple[PeerEntry, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {"peers": [list(p) if p.room is not None else list(p[:4]) for p in self.peers]}

    @classmethod
    def read(cls, f: _Fields) -> Peers:
        listed = f.obj.get("peers", _MISSING)
        expected = "a list of [id, pid, path, connections(, room)]"
        if not isinstance(listed, list):
            raise f._fail("peers", expected, listed)
        out = []
        for item in listed:
            if not (isinstance(item, list) and len(item) in (4, 5) and _is_int(item[0])
                    and _is_int(item[1]) and isinstance(item[2], str) and _is_int(item[3])
                    and (len(item) == 4 or (_is_int(item[4]) and item[4] >= 0))):
                raise f._fail("peers", expected, item)
            out.append(PeerEntry(*item))
        return cls(tuple(out))


@dataclass(frozen=True)
class OrphanAnswer(Command):
    KIND: ClassVar[str] = "orphan"
    key: MoveKey
    dead: bool

    def fields(self) -> dict[str, Any]:
        return {"key": list(self.key), "dead": self.dead}

    @classmethod
    def read(cls, f: _Fields) -> OrphanAnswer:
        return cls(f.move_key(), f.boolean("dead"))


@dataclass(frozen=True)
class Drain(Command):
    KIND: ClassVar[str] = "drain"
    migrate: bool = False
    reason: str = ""

    def fields(self) -> dict[str, Any]:
        return {"migrate": self.migrate, "reason": self.reason}

    @classmethod
    def read(cls, f: _Fields) -> Drain:
        return cls(f.boolean("migrate", False), f.text("reason", ""))


#: every report and command, by kind
REPORTS: dict[str, type[Report]] = {c.KIND: c for c in (
    Hello, Fatal, Recycle, WebCounts, Closed, Opened, Fed, Fds, Draining, Unmoved, MigrateAck, Moving,
    MovedOut,
    MoveBack, MovedIn, OrphanQuery)}
COMMANDS: dict[str, type[Command]] = {c.KIND: c for c in (Migrate, Peers, OrphanAnswer, Drain)}
_BY_TAG: dict[str, Mapping[str, type[Message]]] = {"ev": REPORTS, "cmd": COMMANDS}


# --- the codec -----------------------------------------------------------------------------


def encode(msg: Message) -> dict[str, Any]:
    """The JSON object of ``msg`` (what ``Channel.send_control`` takes)."""
    return {msg.TAG: msg.KIND, **msg.fields()}


def to_bytes(msg: Message) -> bytes:
    """The CONTROL frame payload of ``msg`` (compact JSON, as the channel sends it)."""
    return encode_control(encode(msg))


def decode(obj: Mapping[str, Any] | bytes | bytearray | memoryview) -> Message:
    """The message in a received object (or a CONTROL payload); raises
    :class:`~sockshare.RemoteProtocolError` (:class:`UnknownMessage` for an unknown kind)."""
    if isinstance(obj, bytes | bytearray | memoryview):
        obj = decode_control(bytes(obj))
    if not isinstance(obj, Mapping):
        raise RemoteProtocolError(f"a control message is a JSON object, got {_show(obj)}")
    tags = [t for t in ("ev", "cmd") if t in obj]
    if len(tags) != 1:
        raise RemoteProtocolError('a control message has one of "ev" (a report) or "cmd" '
                                  f'(a command), this one {"both" if tags else "neither"}: '
                                  f"{_show(dict(obj))}")
    tag = tags[0]
    kind = obj[tag]
    if not isinstance(kind, str):
        raise RemoteProtocolError(f"control message: {tag!r} must be a string, got {_show(kind)}")
    cls = _BY_TAG[tag].get(kind)
    if cls is None:
        raise UnknownMessage(f"unknown control message {json.dumps({tag: kind})}")
    return cls.read(_Fields(obj, tag, kind))


# --- dispatch --------------------------------------------------------------------------------

C = TypeVar("C")
M = TypeVar("M", bound=Message)


class HandlerTable(Generic[C]):
    """Handlers by message type, each called as ``handler(context, message)`` (the
    context: the worker runtime, or the slot of the worker that sent it)."""

    def __init__(self) -> None:
        self._handlers: dict[type[Message], Callable[[C, Any], None]] = {}

    def on(self, cls: type[M], handler: Callable[[C, M], None]) -> HandlerTable[C]:
        """Handle messages of type ``cls`` (chainable)."""
        self._handlers[cls] = handler
        return self

    def __contains__(self, cls: type[Message]) -> bool:
        return cls in self._handlers

    def dispatch(self, context: C, msg: Message) -> bool:
        """Call ``msg``'s handler; False if this table has none for its type."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            return False
        handler(context, msg)
        return True
