"""The control vocabulary (``sockshare.server._messages``): round trips, every error path
of the decoder, forward compatibility, the handler table, and what the two receivers
(the worker runtime, the supervisor) do with unknown and malformed messages.

The exact bytes of each message are in tests/vectors/controls.json (tests/test_vectors.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_migration_unit import Relay, ReportingChannel

from sockshare import RemoteProtocolError, SockshareError
from sockshare.server import _messages as m
from sockshare.server._handler import WorkerInfo
from sockshare.server._runtime import Worker
from sockshare.server._supervision import Supervisor

KEY = m.MoveKey(4242, 17)

#: one of each message, non-default values where there are any
EXAMPLES: list[m.Message] = [
    m.Hello(True, 4242, "/run/4242.peer", 1000),
    m.Hello(),
    m.Fatal("no app"),
    m.Fatal("lifespan startup failed", startup=True),
    m.Recycle("max-requests"),
    m.WebCounts(1, 2, 3, 4, 5),
    m.Closed(3, 7),
    m.Closed(),
    m.Opened(5),
    m.Fed(3, 1),
    m.Fed(2),
    m.Fds(True),
    m.Fds(False, 250),
    m.Draining(),
    m.Unmoved(1, 4),
    m.Unmoved(),
    m.MigrateAck(2, 9),
    m.MigrateAck(0),
    m.Moving(2, KEY),
    m.MovedOut(2, KEY),
    m.MoveBack(2, KEY),
    m.MovedIn(1, (4242, 17), 0.25),
    m.MovedIn(None, (None, 17), None),
    m.OrphanQuery(4242, KEY),
    m.Migrate(2, "rebalance", 9),
    m.Migrate(),
    m.Peers((m.PeerEntry(2, 4243, "/run/4243.peer", 5),)),
    m.Peers(),
    m.OrphanAnswer(KEY, True),
    m.Drain(True, "reload"),
    m.Drain(),
]


def test_examples_cover_the_vocabulary() -> None:
    assert {type(x) for x in EXAMPLES} == {*m.REPORTS.values(), *m.COMMANDS.values()}
    assert {c.KIND for c in m.REPORTS.values()} == set(m.REPORTS)
    assert all(c.TAG == "ev" for c in m.REPORTS.values())
    assert all(c.TAG == "cmd" for c in m.COMMANDS.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=repr)
def test_round_trip(msg: m.Message) -> None:
    obj = m.encode(msg)
    assert next(iter(obj.items())) == (msg.TAG, msg.KIND)   # the tag first
    assert m.decode(obj) == msg
    assert m.decode(m.to_bytes(msg)) == msg
    assert m.decode(bytearray(m.to_bytes(msg))) == msg
    assert m.decode(memoryview(m.to_bytes(msg))) == msg
    assert m.to_bytes(msg) == json.dumps(obj, separators=(",", ":")).encode()
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.x = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("msg", EXAMPLES, ids=repr)
def test_extra_fields_are_ignored(msg: m.Message) -> None:
    obj = {**m.encode(msg), "added_later": {"any": [1, "thing"]}, "n2": None}
    assert m.decode(obj) == msg


def test_wire_names_and_omitted_fields() -> None:
    """What the runtime has always sent: "from" for MovedIn.source; capacity and active
    only when known; null pid/peer/req/n/latency written out."""
    assert m.encode(m.MovedIn(1, (5, 6), None)) == {"ev": "moved_in", "from": 1, "key": [5, 6],
                                                    "latency": None}
    assert m.encode(m.Closed(2)) == {"ev": "closed", "n": 2}
    assert m.encode(m.Fds(True)) == {"ev": "fds", "full": True}
    assert m.encode(m.Hello(True)) == {"ev": "hello", "resume": True, "pid": None, "peer": None}
    assert m.encode(m.Migrate()) == {"cmd": "migrate", "n": None, "reason": "", "req": None}
    assert m.encode(m.MigrateAck(1)) == {"ev": "migrate_ack", "n": 1, "req": None}


def test_defaults_of_optional_fields() -> None:
    assert m.decode({"ev": "closed"}) == m.Closed(1)
    assert m.decode({"ev": "hello"}) == m.Hello(False, None, None, None)
    assert m.decode({"ev": "fatal"}) == m.Fatal("fatal error")
    assert m.decode({"cmd": "drain"}) == m.Drain(False, "")
    assert m.decode({"cmd": "migrate"}) == m.Migrate(None, "", None)
    assert m.decode({"ev": "moved_in", "key": [None, 3]}) == m.MovedIn(None, (None, 3), None)
    assert m.decode({"ev": "moved_in", "key": [1, 3], "latency": 2}) == m.MovedIn(None, (1, 3), 2.0)


# --- every error path ------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "pattern"), [
    (b"{", r"CONTROL payload is not JSON"),
    (b"\xff", r"CONTROL payload is not JSON"),
    (b"[[[[" * 10000 + b"]]]]" * 10000, r"nests too deeply|not JSON"),
    (b"[1]", r"CONTROL payload is not a JSON object"),
    ([1], r"a control message is a JSON object, got \[1\]"),
    ("closed", r"a control message is a JSON object"),
    ({}, r"this one neither"),
    ({"n": 1}, r"this one neither"),
    ({"ev": "closed", "cmd": "drain"}, r"this one both"),
    ({"ev": None}, r"'ev' must be a string, got None"),
    ({"cmd": ["drain"]}, r"'cmd' must be a string"),
])
def test_malformed_objects(obj: Any, pattern: str) -> None:
    with pytest.raises(RemoteProtocolError, match=pattern) as info:
        m.decode(obj)
    assert not isinstance(info.value, m.UnknownMessage)
    assert isinstance(info.value, SockshareError)


@pytest.mark.parametrize("obj", [{"ev": "ready"}, {"ev": ""}, {"cmd": "status"},
                                 {"cmd": "closed"}, {"ev": "drain"}, {"ev": "migrate"}])
def test_unknown_kinds(obj: dict[str, Any]) -> None:
    """A report's name as a command (and the other way round) is unknown too."""
    with pytest.raises(m.UnknownMessage, match=r"unknown control message \{\"(ev|cmd)\""):
        m.decode(obj)


#: (a valid object, field, value that is wrong, what the error says it must be);
#: value None with a pattern ending in "missing" means: the field removed
_BAD_FIELDS: list[tuple[m.Message, str, Any, str]] = [
    (m.Hello(True, 1, "/p", 3), "resume", 1, "true or false"),
    (m.Hello(True, 1, "/p", 3), "resume", None, "true or false"),
    (m.Hello(True, 1, "/p", 3), "pid", "1", "an integer or null"),
    (m.Hello(True, 1, "/p", 3), "pid", True, "an integer or null"),
    (m.Hello(True, 1, "/p", 3), "peer", 5, "a string or null"),
    (m.Hello(True, 1, "/p", 3), "capacity", 2.0, "an integer or null"),
    (m.Fatal("x"), "reason", None, "a string"),
    (m.Fatal("x"), "reason", 7, "a string"),
    (m.Closed(1, 2), "n", None, "an integer >= 0"),
    (m.Closed(1, 2), "n", -1, "an integer >= 0"),
    (m.Closed(1, 2), "n", False, "an integer >= 0"),
    (m.Closed(1, 2), "n", 1.0, "an integer >= 0"),
    (m.Closed(1, 2), "active", -3, "an integer >= 0 or null"),
    (m.Fds(False, 3), "full", "false", "true or false"),
    (m.Fds(False, 3), "capacity", "3", "an integer or null"),
    (m.MigrateAck(1, 2), "n", None, "an integer >= 0"),
    (m.MigrateAck(1, 2), "n", -1, "an integer >= 0"),
    (m.MigrateAck(1, 2), "req", "2", "an integer or null"),
    (m.Moving(2, KEY), "to", None, "an integer"),
    (m.Moving(2, KEY), "to", "2", "an integer"),
    (m.MovedOut(2, KEY), "key", None, r"\[pid, id\]"),
    (m.MovedOut(2, KEY), "key", [1], r"\[pid, id\]"),
    (m.MovedOut(2, KEY), "key", [1, 2, 3], r"\[pid, id\]"),
    (m.MovedOut(2, KEY), "key", [None, 2], r"\[pid, id\]"),
    (m.MoveBack(2, KEY), "key", {"pid": 1, "id": 2}, r"\[pid, id\]"),
    (m.MovedIn(1, (1, 2), 0.5), "from", "1", "an integer or null"),
    (m.MovedIn(1, (1, 2), 0.5), "key", [1, None], r"\[pid or null, id\]"),
    (m.MovedIn(1, (1, 2), 0.5), "key", [1, True], r"\[pid or null, id\]"),
    (m.MovedIn(1, (1, 2), 0.5), "latency", "0.5", "a number or null"),
    (m.MovedIn(1, (1, 2), 0.5), "latency", True, "a number or null"),
    (m.MovedIn(1, (1, 2), 0.5), "latency", math.nan, "a number or null"),
    (m.MovedIn(1, (1, 2), 0.5), "latency", math.inf, "a number or null"),
    (m.OrphanQuery(1, KEY), "pid", None, "an integer"),
    (m.OrphanQuery(1, KEY), "key", "4242:17", r"\[pid, id\]"),
    (m.Migrate(1, "r", 2), "n", -1, "an integer >= 0 or null"),
    (m.Migrate(1, "r", 2), "n", "all", "an integer >= 0 or null"),
    (m.Migrate(1, "r", 2), "reason", None, "a string"),
    (m.Migrate(1, "r", 2), "req", 1.5, "an integer or null"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", None, "a list of"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", [[1, 2, "/p"]], "a list of"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", [[1, 2, 3, 4]], "a list of"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", [[1, "2", "/p", 4]], "a list of"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", [[1, 2, "/p", True]], "a list of"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", ["junk"], "a list of"),
    (m.Peers((m.PeerEntry(1, 2, "/p", 3),)), "peers", {"1": [2, "/p", 3]}, "a list of"),
    (m.OrphanAnswer(KEY, True), "dead", None, "true or false"),
    (m.OrphanAnswer(KEY, True), "dead", 1, "true or false"),
    (m.OrphanAnswer(KEY, True), "key", [1, "2"], r"\[pid, id\]"),
    (m.Drain(True, "r"), "migrate", "yes", "true or false"),
    (m.Drain(True, "r"), "reason", 3, "a string"),
]


@pytest.mark.parametrize(("msg", "field", "value", "expected"), _BAD_FIELDS,
                         ids=[f"{x[0].KIND}-{x[1]}-{x[2]!r}" for x in _BAD_FIELDS])
def test_ill_typed_fields(msg: m.Message, field: str, value: Any, expected: str) -> None:
    obj = {**m.encode(msg), field: value}
    with pytest.raises(RemoteProtocolError, match=rf"^control message \{{\"{msg.TAG}\": "
                       rf"\"{msg.KIND}\"\}}: field '{field}' must be {expected}.*, got "):
        m.decode(obj)


_REQUIRED = [("opened", "n"), ("fed", "n"), ("fds", "full"), ("migrate_ack", "n"), ("moving", "to"),
             ("moving", "key"),
             ("moved_out", "to"), ("moved_out", "key"), ("move_back", "to"),
             ("move_back", "key"), ("moved_in", "key"), ("orphan", "pid"), ("orphan", "key")]
_REQUIRED_CMD = [("peers", "peers"), ("orphan", "key"), ("orphan", "dead")]


@pytest.mark.parametrize(("tag", "kind", "field"),
                         [("ev", k, f) for k, f in _REQUIRED] + [("cmd", k, f) for k, f in _REQUIRED_CMD])
def test_missing_required_fields(tag: str, kind: str, field: str) -> None:
    full = next(x for x in EXAMPLES if (tag, kind) == (x.TAG, x.KIND))
    obj = m.encode(full)
    del obj[field]
    with pytest.raises(RemoteProtocolError, match=rf"field '{field}' must be .*, missing$"):
        m.decode(obj)


def test_required_fields_are_exactly_those() -> None:
    """Every other field may be left out."""
    required = {("ev", k, f) for k, f in _REQUIRED} | {("cmd", k, f) for k, f in _REQUIRED_CMD}
    for msg in EXAMPLES:
        for field in list(m.encode(msg))[1:]:
            obj = m.encode(msg)
            del obj[field]
            if (msg.TAG, msg.KIND, field) in required:
                with pytest.raises(RemoteProtocolError):
                    m.decode(obj)
            else:
                m.decode(obj)


# --- round trips of arbitrary values -------------------------------------------------------

_ints = st.integers(min_value=-(2**63), max_value=2**64)
_counts = st.integers(min_value=0, max_value=2**64)
_text = st.text(max_size=40)
_keys = st.builds(m.MoveKey, _ints, _ints)
_finite = st.floats(allow_nan=False, allow_infinity=False)

_MESSAGES = st.one_of(
    st.builds(m.Hello, st.booleans(), st.none() | _ints, st.none() | _text, st.none() | _ints),
    st.builds(m.Fatal, _text),
    st.builds(m.Closed, _counts, st.none() | _counts),
    st.builds(m.Opened, _counts),
    st.builds(m.Fed, _counts, st.none() | _counts),
    st.builds(m.Fds, st.booleans(), st.none() | _ints),
    st.just(m.Draining()),
    st.builds(m.Unmoved, _counts, _counts),
    st.builds(m.MigrateAck, _counts, st.none() | _ints),
    st.builds(m.Moving, _ints, _keys, st.lists(_keys, max_size=3).map(tuple)),
    st.builds(m.MovedOut, _ints, _keys, st.lists(_keys, max_size=3).map(tuple)),
    st.builds(m.MoveBack, _ints, _keys, st.lists(_keys, max_size=3).map(tuple)),
    st.builds(m.MovedIn, st.none() | _ints, st.tuples(st.none() | _ints, _ints),
              st.none() | _finite,
              st.lists(st.tuples(_ints, st.none() | _finite), max_size=3).map(tuple)),
    st.builds(m.OrphanQuery, _ints, _keys),
    st.builds(m.Migrate, st.none() | _counts, _text, st.none() | _ints),
    st.builds(m.Peers, st.lists(st.builds(m.PeerEntry, _ints, _ints, _text, _ints,
                                          st.none() | _counts),
                                max_size=4).map(tuple)),
    st.builds(m.OrphanAnswer, _keys, st.booleans()),
    st.builds(m.Drain, st.booleans(), _text),
)


@given(_MESSAGES)
def test_any_message_round_trips(msg: m.Message) -> None:
    assert m.decode(m.to_bytes(msg)) == msg
    assert m.decode(m.encode(msg)) == msg


@given(st.dictionaries(st.sampled_from(["ev", "cmd", "n", "key", "full", "peers", "to"]),
                       st.one_of(st.none(), st.booleans(), _ints, _text,
                                 st.sampled_from(sorted({*m.REPORTS, *m.COMMANDS})),
                                 st.lists(st.none() | _ints, max_size=3))))
def test_decode_never_fails_otherwise(obj: dict[str, Any]) -> None:
    """Whatever the object, decode gives a message or a RemoteProtocolError."""
    try:
        msg = m.decode(obj)
    except RemoteProtocolError:
        return
    assert m.decode(m.encode(msg)) == msg


# --- the handler table ---------------------------------------------------------------------


def test_handler_table() -> None:
    seen: list[tuple[str, m.Message]] = []
    table: m.HandlerTable[str] = (m.HandlerTable[str]()
                                  .on(m.Closed, lambda ctx, msg: seen.append((ctx, msg)))
                                  .on(m.Drain, lambda ctx, msg: seen.append((ctx + "!", msg))))
    assert m.Closed in table
    assert m.Fds not in table
    assert table.dispatch("w1", m.Closed(2))
    assert table.dispatch("w2", m.Drain())
    assert not table.dispatch("w3", m.Fds(True))
    # by exact type: the three direct-move reports are three entries
    assert not table.dispatch("w4", m.MovedOut(1, KEY))
    assert seen == [("w1", m.Closed(2)), ("w2!", m.Drain())]


# --- the receivers -------------------------------------------------------------------------


async def _resume(conn: Any, state: Any) -> None:
    """(A resume handler: the worker then takes migration commands.)"""


def _worker() -> Worker:
    return Worker(None, WorkerInfo(1, 4242, 1, "default"), "/nowhere", resume=_resume)


def test_worker_applies_commands_by_table(caplog: pytest.LogCaptureFixture) -> None:
    w = _worker()
    w._apply_control(m.encode(m.Peers((m.PeerEntry(1, 4242, "/p", 0),))))  # itself: skipped
    assert not w.peers.peers
    w._apply_control({"cmd": "drain", "migrate": True, "reason": "reload", "later": 1})
    assert w.stopping.is_set()
    assert w._migrate_all == "reload"


def test_worker_ignores_unknown_and_malformed_commands(caplog: pytest.LogCaptureFixture) -> None:
    w = _worker()
    caplog.set_level(logging.DEBUG, logger="sockshare.server.worker")
    w._apply_control({"cmd": "reticulate"})                       # unknown: debug
    w._apply_control({"ev": "closed", "n": 1})                    # a report: not for a worker
    w._apply_control({"cmd": "drain", "migrate": "yes"})          # malformed: warning
    assert not w.stopping.is_set()
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in levels] == [logging.DEBUG, logging.DEBUG, logging.WARNING]
    assert "field 'migrate' must be true or false" in levels[2][1]


def test_supervisor_applies_reports_by_table(caplog: pytest.LogCaptureFixture) -> None:
    relay = Relay()
    try:
        w1, _w2, _w3 = relay.workers
        relay.d.migration = relay.mig
        sup = Supervisor(relay.d)  # type: ignore[arg-type]
        w1.active = 5
        ch = ReportingChannel()
        caplog.set_level(logging.DEBUG, logger="sockshare.server")
        ch.reports += [
            {"ev": "closed", "n": 2},                          # C/PHP form
            {"ev": "closed", "n": 1, "active": 2},             # Python form
            {"ev": "closed", "n": "1"},                        # malformed: ignored
            {"ev": "ready"},                                   # unknown: ignored
            {"cmd": "drain"},                                  # a command: not for us
            {"ev": "fds", "full": True},
        ]
        sup._settle_safely(w1, ch)  # type: ignore[arg-type]
        assert w1.active == 2
        assert w1.fd_full
        assert "field 'n' must be an integer >= 0, got '1'" in caplog.text
        assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    finally:
        relay.close()


def test_the_docs_table_lists_the_whole_vocabulary() -> None:
    """docs/server.md, "Control messages": "The whole vocabulary is _messages.py" -- each
    report and command there has its row (a C or PHP worker is written from that table)."""
    import re
    from pathlib import Path

    from sockshare.server._messages import COMMANDS, REPORTS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    section = doc.split("## Control messages", 1)[1].split("\n## ", 1)[0]
    reports, commands = section.split("Commands, dispatcher", 1)
    row = re.compile(r"^\| `([a-z_]+)` \|(.*)$", re.M)
    assert {m.group(1) for m in row.finditer(reports)} == set(REPORTS)
    assert {m.group(1) for m in row.finditer(commands)} == set(COMMANDS)
    fatal = next(m.group(2) for m in row.finditer(reports) if m.group(1) == "fatal")
    assert "`startup`" in fatal
