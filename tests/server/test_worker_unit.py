"""The Python worker's parts, built in the test process: the handler API
(:mod:`sockshare.server._handler`), the runtime (:class:`sockshare.server._runtime.Worker`,
with this test playing the dispatcher on a real channel) and direct migration
(:mod:`sockshare.server._peers`, with a stand-in for its host, and with two real
workers). Real sockets and channels throughout; no subprocess."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests._fdcount import fd_count, wait_fd_count

from sockshare import AsyncChannel, AsyncChannelListener, Channel, SockshareError
from sockshare.server import (
    Connection,
    MigrationError,
    MigrationRefused,
    MigrationRequested,
    MigrationUnsupported,
    StateError,
    WorkerInfo,
)
from sockshare.server._handler import MAX_STATE, MIGRATION_WINDOW, encode_state
from sockshare.server._messages import Message, MovedOut, PeerEntry, Report
from sockshare.server._peers import PeerMigration
from sockshare.server._runtime import EXIT_APP_ERROR, Worker, resume_spec

pytestmark = pytest.mark.timeout(60)

INFO = WorkerInfo(id=4, pid=os.getpid(), generation=1, pool="default")
STEP = 5.0   # seconds any one expected event may take


async def _stream_pair() -> tuple[Connection, socket.socket]:
    """A Connection over one end of a socketpair (the other is the client)."""
    client, server_side = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=server_side)
    conn = Connection(reader, writer, {"handoff_id": "1.1", "client": ["10.0.0.2", 5000]}, INFO)
    client.setblocking(False)
    return conn, client


async def _recv(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), STEP)
        if not chunk:
            break
        out += chunk
    return out


# -- the handler API ------------------------------------------------------------------


def test_encode_state_is_compact_json_within_the_limit() -> None:
    assert encode_state({"n": 1, "s": "x"}) == b'{"n":1,"s":"x"}'
    assert len(encode_state("a" * (MAX_STATE - 2))) == MAX_STATE
    for bad in (float("nan"), {1, 2}, "a" * (MAX_STATE - 1)):
        with pytest.raises(StateError) as info:
            encode_state(bad)
        assert isinstance(info.value, SockshareError)
        assert isinstance(info.value, ValueError)   # callers may catch either


def test_resume_spec_follows_the_convention() -> None:
    assert resume_spec("app:handle", None) == "app:resume"
    assert resume_spec("app:api.handle", None) == "app:api.resume"
    assert resume_spec("app:handle", "other:go") == "other:go"
    assert resume_spec("app:handle", "-") is None
    assert resume_spec("no_colon", None) is None


def test_migrate_with_no_runtime_is_unsupported_and_touches_nothing() -> None:
    async def main() -> None:
        conn, client = await _stream_pair()
        with pytest.raises(MigrationUnsupported, match="no resume handler"):
            await conn.migrate({"n": 1})
        assert not conn.closed
        assert not conn.migrated
        client.sendall(b"still mine\n")
        assert await asyncio.wait_for(conn.reader.readline(), STEP) == b"still mine\n"
        await conn.close()
        assert conn.closed
        client.close()

    asyncio.run(main())


class _Recorder:
    """A stand-in runtime: records what :meth:`Connection.migrate` hands it."""

    def __init__(self, outcome: BaseException | None = None) -> None:
        self.outcome = outcome
        self.calls: list[tuple[Connection, bytes, bytes]] = []

    async def _resume(self, conn: Connection, state: Any) -> None:
        return None

    @property
    def resume(self) -> Callable[[Connection, Any], Awaitable[None]]:
        return self._resume

    def migration_meta(self, conn: Connection, state: Any, started: float,
                       reason: str = "") -> bytes:
        return json.dumps({"resume": state, "reason": reason}).encode()

    async def migrate_out(self, conn: Connection, meta: bytes, unread: bytes) -> None:
        self.calls.append((conn, meta, unread))
        if self.outcome is not None:
            raise self.outcome


def test_migrate_checks_the_state_then_hands_it_to_the_runtime() -> None:
    async def main() -> None:
        conn, client = await _stream_pair()
        rt = _Recorder()
        conn._runtime = rt
        conn.migratable = False
        with pytest.raises(MigrationUnsupported, match="not migratable"):
            await conn.migrate({"n": 1})
        conn.migratable = True
        with pytest.raises(StateError):
            await conn.migrate({"n": {1, 2}})
        assert rt.calls == []   # nothing was touched
        await conn.migrate({"n": 2}, unread=b"GET", reason="test")
        [(who, meta, unread)] = rt.calls
        assert who is conn
        assert unread == b"GET"
        assert json.loads(meta) == {"resume": {"n": 2}, "reason": "test"}
        rt.outcome = MigrationRefused("no room")
        with pytest.raises(MigrationRefused):
            await conn.migrate({"n": 3})
        with pytest.raises(MigrationError):   # the refusal left it migratable again
            await conn.migrate(None, unread=b"x" * (1 << 20))
        await conn.close()
        with pytest.raises(MigrationError, match="already closed"):
            await conn.migrate({"n": 4})
        client.close()

    asyncio.run(main())


def test_interruptible_raises_on_request_and_loses_no_bytes() -> None:
    async def main() -> None:
        conn, client = await _stream_pair()
        conn._runtime = _Recorder()
        conn.migratable = True
        read = asyncio.ensure_future(conn.interruptible(conn.reader.readline()))
        await asyncio.sleep(0.05)
        client.sendall(b"half a li")
        await asyncio.sleep(0.05)
        conn.request_migration("rebalance")
        with pytest.raises(MigrationRequested) as info:
            await asyncio.wait_for(read, STEP)
        assert info.value.reason == "rebalance"
        assert conn.migration_requested.is_set()
        assert conn.migration_reason == "rebalance"
        # asked already: raises at once, the read not even started
        with pytest.raises(MigrationRequested):
            await conn.interruptible(conn.reader.readline())
        # not migratable: requests do not interrupt
        conn.migratable = False
        client.sendall(b"ne\n")
        line = await asyncio.wait_for(conn.interruptible(conn.reader.readline()), STEP)
        assert line == b"half a line\n"
        await conn.close()
        client.close()

    asyncio.run(main())


# -- the runtime, with this test as the dispatcher ------------------------------------


async def _start(tmp: Path, app: Any, resume: Any = None, *, wid: int = 4, pid: int = 0,
                 name: str = "d.sock", listener: AsyncChannelListener | None = None,
                 max_conns: int | None = None,
                 ) -> tuple[Worker, asyncio.Task[int], AsyncChannel, AsyncChannelListener]:
    path = str(tmp / name)
    if listener is None:
        listener = AsyncChannelListener.listen(path, name="dispatcher")
    # (two workers in this one process need two pids: their peer sockets are <pid>.peer)
    info = WorkerInfo(id=wid, pid=pid or os.getpid(), generation=1, pool="default")
    worker = Worker(app, info, path, grace=2.0, resume=resume, max_conns=max_conns)
    run = asyncio.get_running_loop().create_task(worker.run())
    ch = await asyncio.wait_for(listener.accept(), STEP)
    return worker, run, ch, listener


async def _control(ch: AsyncChannel, ev: str) -> dict[str, Any]:
    """The next control message ``ev`` from the worker (others are skipped)."""
    async with asyncio.timeout(STEP):
        while True:
            msg = await ch.receive_control()
            if msg.get("ev") == ev:
                return msg


async def _stop(worker: Worker, run: asyncio.Task[int], ch: AsyncChannel,
                listener: AsyncChannelListener) -> int:
    ch.send_control({"cmd": "drain", "reason": "test"})
    await _control(ch, "draining")
    code = await asyncio.wait_for(run, STEP)
    await ch.aclose()
    listener.close()
    return code


def test_worker_serves_a_handoff_then_reports_its_close(tmp_path: Path) -> None:
    async def app(conn: Connection) -> None:
        line = await conn.reader.readline()
        conn.writer.write(f"{conn.worker.id} {conn.meta['pool']} ".encode() + line.upper())
        await conn.writer.drain()

    async def main() -> None:
        before = fd_count()
        worker, run, ch, listener = await _start(tmp_path, app)
        hello = await _control(ch, "hello")
        assert hello["resume"] is False
        assert hello["pid"] == os.getpid()
        assert hello["peer"] is None   # no resume handler: no peer listener
        client, server_side = socket.socketpair()
        client.setblocking(False)
        ticket = await asyncio.wait_for(
            ch.send(server_side, meta={"handoff_id": "1.1", "pool": "p"}, data=b"pre-"), STEP)
        assert ticket.state == "accepted"
        client.sendall(b"read\n")
        assert await _recv(client, 13) == b"4 p PRE-READ\n"
        assert await _recv(client, 1) == b""   # the app returned: the connection closed
        closed = await _control(ch, "closed")
        assert closed["n"] == 1
        assert await _stop(worker, run, ch, listener) == 0
        client.close()
        wait_fd_count("self", before, what="the worker's channel and the connection")

    asyncio.run(main())


def test_worker_whose_app_did_not_load_rejects_with_the_reason(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "d.sock")
        listener = AsyncChannelListener.listen(path, name="dispatcher")
        worker = Worker(None, INFO, path, app_error="myapp: ImportError: boom")
        run = asyncio.get_running_loop().create_task(worker.run())
        ch = await asyncio.wait_for(listener.accept(), STEP)
        client, server_side = socket.socketpair()
        ticket = await asyncio.wait_for(ch.send(server_side, meta={}), STEP)
        assert ticket.state == "rejected"
        assert "boom" in (ticket.reason or "")
        fatal = await _control(ch, "fatal")
        assert "boom" in fatal["reason"]
        assert await asyncio.wait_for(run, STEP) == EXIT_APP_ERROR
        assert ticket.socket is not None
        ticket.socket.close()
        client.close()
        await ch.aclose()
        listener.close()

    asyncio.run(main())


async def _mover(conn: Connection) -> None:
    """Reads a line, tries to migrate; if refused, says so and echoes on."""
    line = await conn.reader.readline()
    try:
        await conn.migrate({"first": line.decode().strip()}, reason="unit")
    except MigrationRefused:
        conn.writer.write(b"still here\n")
        conn.writer.write(await conn.reader.readline())
        await conn.writer.drain()


async def _no_resume(conn: Connection, state: Any) -> None:
    raise AssertionError("not resumed in this test")


def test_refused_migration_keeps_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        worker, run, ch, listener = await _start(tmp_path, _mover, _no_resume)
        hello = await _control(ch, "hello")
        assert hello["resume"] is True
        assert hello["peer"].endswith(f"{os.getpid()}.peer")
        client, server_side = socket.socketpair()
        client.setblocking(False)
        ticket = await asyncio.wait_for(ch.send(server_side, meta={"handoff_id": "1.2"}), STEP)
        assert ticket.state == "accepted"
        client.sendall(b"one\ntwo")
        h = await asyncio.wait_for(ch.receive(), STEP)
        assert h.meta["resume"] == {"first": "one"}
        assert h.meta["migration"]["from"] == 4
        assert h.meta["migration"]["reason"] == "unit"
        assert h.data == b"two"   # read by the worker, not consumed: travels with it
        h.reject("no room")
        ch.flush()
        client.sendall(b"\n")
        assert await _recv(client, 15) == b"still here\ntwo\n"
        assert await _control(ch, "closed")
        assert await _stop(worker, run, ch, listener) == 0
        client.close()

    asyncio.run(main())


def test_accepted_migration_leaves_the_connection_open(tmp_path: Path) -> None:
    async def main() -> None:
        worker, run, ch, listener = await _start(tmp_path, _mover, _no_resume)
        await _control(ch, "hello")
        client, server_side = socket.socketpair()
        client.setblocking(False)
        await asyncio.wait_for(ch.send(server_side, meta={"handoff_id": "1.3"}), STEP)
        client.sendall(b"go\n")
        h = await asyncio.wait_for(ch.receive(), STEP)
        target = h.socket
        h.accept()
        ch.flush()
        # the worker closed its descriptor only: no FIN reached the client
        await asyncio.sleep(0.1)
        with pytest.raises(BlockingIOError):
            client.recv(1)
        target.setblocking(True)
        target.sendall(b"from the new side\n")
        assert await _recv(client, 18) == b"from the new side\n"
        client.sendall(b"back\n")
        target.settimeout(STEP)
        assert target.recv(100) == b"back\n"
        async with asyncio.timeout(STEP):   # the handler returned, nothing reported closed
            while worker.conns:
                await asyncio.sleep(0.01)
        assert await _stop(worker, run, ch, listener) == 0
        target.close()
        client.close()

    asyncio.run(main())


def test_dispatcher_request_reaches_migratable_connections(tmp_path: Path) -> None:
    asked: list[str] = []

    async def app(conn: Connection) -> None:
        try:
            await conn.interruptible(conn.reader.readline())
        except MigrationRequested as exc:
            asked.append(exc.reason)

    async def main() -> None:
        worker, run, ch, listener = await _start(tmp_path, app, _no_resume)
        await _control(ch, "hello")
        clients = []
        for i in range(3):
            client, server_side = socket.socketpair()
            clients.append(client)
            await asyncio.wait_for(ch.send(server_side, meta={"handoff_id": f"1.{i}"}), STEP)
        ch.send_control({"cmd": "migrate", "n": 2, "reason": "rebalance", "req": 9})
        ack = await _control(ch, "migrate_ack")
        assert ack == {"ev": "migrate_ack", "n": 2, "req": 9}
        n = 0
        while n < 2:
            n += (await _control(ch, "closed"))["n"]
        assert asked == ["rebalance", "rebalance"]
        for c in clients:
            c.close()
        assert await _stop(worker, run, ch, listener) == 0

    asyncio.run(main())


# -- direct migration -----------------------------------------------------------------


class _Host:
    """A stand-in for the runtime around a :class:`PeerMigration`."""

    def __init__(self, wid: int) -> None:
        self.info = WorkerInfo(id=wid, pid=os.getpid(), generation=1, pool="default")
        self.stopping = asyncio.Event()
        self.ch: AsyncChannel | None = None
        self.sent: list[Message] = []

    def control(self, msg: Message, *, soon: bool = False) -> None:
        self.sent.append(msg)

    def queue_report(self, msg: Report) -> None:
        self.sent.append(msg)

    def take(self, ch: AsyncChannel, from_peer: bool = False) -> None:
        for h in ch.received():
            h.reject("stand-in")

    def serve_adopted(self, h: Any, conn: Connection) -> None:
        raise AssertionError("no orphans here")


def test_peer_list_and_pick(tmp_path: Path) -> None:
    async def main() -> None:
        host = _Host(1)
        peers = PeerMigration(host, announce_delay=0.002)
        nowhere = str(tmp_path / "nobody.peer")
        me = os.getpid()
        peers.set_peers([PeerEntry(2, 20, nowhere, 3), PeerEntry(1, me, nowhere, 0),
                         PeerEntry(3, 30, nowhere, 1)])
        # not itself, its pid (a reload's new worker may have its id: listed then);
        # malformed lists: test_messages
        assert sorted(peers.peers) == [2, 3]
        assert peers.pick() is None            # none connected (the paths do not exist)
        pairs = []
        for wid in (2, 3):
            a, b = Channel.pair()
            pairs.append((AsyncChannel.wrap(a), AsyncChannel.wrap(b)))
            peers.peers[wid].ch = pairs[-1][0]
        picked = []
        for _ in range(4):
            p = peers.pick()
            assert p is not None
            picked.append(p.id)
        # fewest connections first (3 had 1, 2 had 3), each pick counts one more; ties rotate
        assert picked == [3, 3, 2, 3]
        peers.set_peers([PeerEntry(3, 30, nowhere, 7)])   # 2 left the pool: its channel closes
        assert list(peers.peers) == [3]
        # the dispatcher's count, and our 3 picks not answered yet (it cannot have them)
        assert peers.peers[3].load == 7 + 3
        await peers.close()
        assert pairs[0][0].closed
        for mine, theirs in pairs:
            await mine.aclose()
            await theirs.aclose()

    asyncio.run(main())


def _connected_peers(host: _Host, loads: dict[int, int], rooms: dict[int, int | None]
                     ) -> tuple[PeerMigration, list[tuple[AsyncChannel, AsyncChannel]]]:
    """A PeerMigration whose peers (ids ``loads``) have open channels: (ours, theirs)."""
    peers = PeerMigration(host, announce_delay=30.0)
    peers.set_peers([PeerEntry(wid, 1000 + wid, "/nowhere", load, rooms.get(wid))
                     for wid, load in loads.items()])
    pairs = []
    for wid in loads:
        task = peers._background.pop()   # (the connect attempts to "/nowhere": not wanted)
        task.cancel()
        a, b = Channel.pair()
        pairs.append((AsyncChannel.wrap(a), AsyncChannel.wrap(b)))
        peers.peers[wid].ch = pairs[-1][0]
        peers.peers[wid].connecting = False
    return peers, pairs


async def _close_all(peers: PeerMigration, pairs: list[tuple[AsyncChannel, AsyncChannel]],
                     ends: list[tuple[socket.socket, socket.socket]]) -> None:
    """The end of a :func:`_connected_peers` test: sockets, peers, channels."""
    for a, b in ends:
        a.close()
        b.close()
    await peers.close()
    for mine, theirs in pairs:
        await mine.aclose()
        await theirs.aclose()


def test_moves_to_a_peer_in_one_turn_leave_in_one_write_and_are_reported_once(
        tmp_path: Path) -> None:
    """The moves to one peer started in one turn of the loop leave as one HANDOFF frame
    (one write, as the relay's do), and their outcome reaches the dispatcher as one
    ``moved_out`` naming them all (docs/server.md, "Direct migration")."""
    async def main() -> None:
        host = _Host(1)
        peers, pairs = _connected_peers(host, {2: 0}, {})
        _mine, theirs = pairs[0]
        peer = peers.peers[2]
        ends = [socket.socketpair() for _ in range(5)]
        moves = [asyncio.ensure_future(peers.move(peer, a, b'{"resume":{}}', b"")) for a, _b in ends]
        reads = 0
        got: list[Any] = []
        async with asyncio.timeout(STEP):
            while len(got) < 5:
                await theirs._wait_event()
                reads += 1
                got += theirs.received()
        assert reads == 1            # one write, one read
        assert len(got) == 5
        for h in got:
            h.accept()
            h.socket.close()
        theirs.flush()
        outcomes = await asyncio.wait_for(asyncio.gather(*moves), STEP)
        assert {o.value for o in outcomes} == {"accepted"}
        await asyncio.sleep(0)   # (the reports leave at the end of the turn)
        [report] = [m for m in host.sent if isinstance(m, MovedOut)]
        assert report.to == 2
        assert [k.id for k in report.keys] == [h.id for h in got]
        assert all(k.pid == os.getpid() for k in report.keys)
        await _close_all(peers, pairs, ends)

    asyncio.run(main())


def test_moves_whose_movers_are_cancelled_are_reported_when_answered(tmp_path: Path) -> None:
    """A mover cancelled (``asyncio.wait_for``) after its handoff left: the answer still
    comes, and is reported as it would have been -- an ACCEPT as ``moved_out`` (else
    the dispatcher keeps an announced move open and takes the target for hung at
    --timeout, and counts the connection here), a REJECT's connection closed (nobody
    waits for it) -- and the peer's in-flight count goes back to 0."""
    async def main() -> None:
        host = _Host(1)
        peers, pairs = _connected_peers(host, {2: 0}, {})
        _mine, theirs = pairs[0]
        peer = peers.peers[2]
        ends = [socket.socketpair() for _ in range(2)]
        assert [peers.pick(), peers.pick()] == [peer, peer]   # (as a mover does)
        moves = [asyncio.ensure_future(peers.move(peer, a, b'{"resume":{}}', b"")) for a, _b in ends]
        got: list[Any] = []
        async with asyncio.timeout(STEP):
            while len(got) < 2:
                await theirs._wait_event()
                got += theirs.received()
        for move in moves:
            move.cancel()
        for move in moves:
            with pytest.raises(asyncio.CancelledError):
                await move
        assert peer.inflight == 2   # (still on their way)
        got[0].accept()
        got[0].socket.close()
        got[1].reject("full")
        theirs.flush()
        async with asyncio.timeout(STEP):
            while peer.inflight:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)   # (the reports leave at the end of the turn)
        [report] = [m for m in host.sent if isinstance(m, MovedOut)]
        assert [k.id for k in report.keys] == [got[0].id]
        assert ends[1][0].fileno() == -1   # the refused one: closed here
        await _close_all(peers, pairs, ends)

    asyncio.run(main())


def test_picks_run_to_one_peer_while_many_moves_come_and_spread_at_the_end(
        tmp_path: Path) -> None:
    """Told that many moves are coming (a drain), ``pick`` keeps the same peer for runs of
    up to STICK (its batches stay whole: one write, one answer, one peer woken) and
    spreads the last ones one by one: the counts end within one of each other. Without
    it, ties rotate at every move. A peer's room is never exceeded."""
    from sockshare.server._peers import STICK

    async def main() -> None:
        peers, pairs = _connected_peers(_Host(1), {2: 0, 3: 0}, {})
        assert [peers.pick().id for _ in range(4)] == [2, 3, 2, 3]   # type: ignore[union-attr]
        peers, more = _connected_peers(_Host(1), {2: 0, 3: 0}, {})
        pairs += more
        peers.expect(400)
        picked = [peers.pick().id for _ in range(400)]   # type: ignore[union-attr]
        runs = [1]
        for a, b in itertools.pairwise(picked):
            if a == b:
                runs[-1] += 1
            else:
                runs.append(1)
        assert max(runs) <= 2 * STICK
        assert sum(runs[:4]) / 4 >= STICK / 2, runs[:10]   # long runs first
        assert runs[-4:] == [1, 1, 1, 1], runs[-10:]       # one by one at the end
        assert abs(picked.count(2) - picked.count(3)) <= 1
        peers, more = _connected_peers(_Host(1), {2: 0, 3: 5}, {2: 2, 3: None})
        pairs += more
        peers.expect(100)
        assert [peers.pick().id for _ in range(6)] == [2, 2, 3, 3, 3, 3]   # type: ignore[union-attr]
        peers, more = _connected_peers(_Host(1), {2: 0}, {2: 1})
        pairs += more
        assert peers.pick() is not None
        assert peers.pick() is None   # no room left anywhere: the relay's turn
        # a peer that refused a move rests (the others take the moves); the least
        # loaded one whose channel is not open yet: relayed (the dispatcher balances)
        peers, more = _connected_peers(_Host(1), {2: 0, 3: 5}, {})
        pairs += more
        peers.peers[2].resting = time.monotonic() + 60
        assert [peers.pick().id for _ in range(2)] == [3, 3]   # type: ignore[union-attr]
        peers.peers[2].resting = 0.0
        peers.peers[2].ch = None
        assert peers.pick() is None
        for m, t in pairs:
            await m.aclose()
            await t.aclose()

    asyncio.run(main())


def test_direct_migration_between_two_workers(tmp_path: Path) -> None:
    resumed: list[tuple[int, Any, bytes, dict[str, Any]]] = []

    async def resume(conn: Connection, state: Any) -> None:
        rest = await conn.reader.readline()
        resumed.append((conn.worker.id, state, rest, conn.meta["migration"]))
        conn.writer.write(f"resumed on {conn.worker.id}\n".encode())
        await conn.writer.drain()

    async def main() -> None:
        listener = AsyncChannelListener.listen(str(tmp_path / "d.sock"), name="dispatcher")
        a, run_a, ch_a, _ = await _start(tmp_path, _mover, resume, wid=1, listener=listener)
        b, run_b, ch_b, _ = await _start(tmp_path, _mover, resume, wid=2, pid=os.getpid() + 1,
                                         listener=listener)
        hello_a, hello_b = await _control(ch_a, "hello"), await _control(ch_b, "hello")
        ch_a.send_control({"cmd": "peers", "peers": [[2, os.getpid() + 1, hello_b["peer"], 0]]})
        ch_b.send_control({"cmd": "peers", "peers": [[1, hello_a["pid"], hello_a["peer"], 0]]})
        async with asyncio.timeout(STEP):   # a's channel to b opens in the background
            while a.peers.pick() is None:
                await asyncio.sleep(0.01)
        a.peers.peers[2].load = 0
        client, server_side = socket.socketpair()
        client.setblocking(False)
        await asyncio.wait_for(ch_a.send(server_side, meta={"handoff_id": "1.9"}), STEP)
        client.sendall(b"hop\nrest\n")
        assert await _recv(client, 13) == b"resumed on 2\n"
        [(wid, state, rest, migration)] = resumed
        assert (wid, state, rest) == (2, {"first": "hop"}, b"rest\n")
        assert migration["from"] == 1
        assert migration["count"] == 1
        moved_out = await _control(ch_a, "moved_out")
        moved_in = await _control(ch_b, "moved_in")
        assert moved_out["to"] == 2
        assert moved_in["from"] == 1
        assert moved_out["key"] == moved_in["key"]
        assert await _stop(a, run_a, ch_a, listener) == 0
        assert await _stop(b, run_b, ch_b, listener) == 0
        client.close()

    asyncio.run(main())



async def _stop_resumed(client: socket.socket) -> None:
    """End a connection resumed by the max_conns test's handler: a line, its answer, and
    the handler returns (the connection leaves the worker's count)."""
    client.sendall(b"one\n")
    assert await _recv(client, 12) == b"resumed one\n"
    assert await _recv(client, 1) == b""


def test_a_peers_move_past_max_conns_is_refused_and_the_connection_stays_with_its_source(
        tmp_path: Path) -> None:
    """Each source counts down its own copy of a target's room, so two sources at once
    could take it past ``max_conns``: the target refuses a peer's move that would
    (REJECT "worker at max_conns"); the source keeps the connection (its copy open, the
    client unharmed) and relays it. The dispatcher's own handoffs are not refused (it
    counts exactly)."""
    resumed: list[Any] = []

    async def resume(conn: Connection, state: Any) -> None:
        resumed.append(state)
        line = await conn.reader.readline()
        conn.writer.write(b"resumed " + line)
        await conn.writer.drain()

    async def main() -> None:
        before = fd_count()
        worker, run, ch, listener = await _start(tmp_path, _mover, resume, max_conns=1)
        hello = await _control(ch, "hello")
        peer = await AsyncChannel.connect(hello["peer"], name="peer:source")
        pairs = [socket.socketpair() for _ in range(3)]
        for client, _ in pairs:
            client.setblocking(False)

        def meta(i: int) -> dict[str, Any]:
            return {"handoff_id": f"9.{i}", "resume": {"n": i},
                    "migration": {"from": 9, "from_pid": 99999, "count": 1}}

        first = await asyncio.wait_for(peer.send(pairs[0][1], meta=meta(0)), STEP)
        assert first.state == "accepted"
        second = await asyncio.wait_for(peer.send(pairs[1][1], meta=meta(1)), STEP)
        assert second.state == "rejected"
        assert second.reason == "worker at max_conns"
        # the source still has it: its end works, nothing was read by the target
        pairs[1][0].sendall(b"ping\n")
        assert pairs[1][1].recv(16) == b"ping\n"
        # the dispatcher's handoff is taken (max_conns is its to keep)
        third = await asyncio.wait_for(ch.send(pairs[2][1], meta={"handoff_id": "1.1"}), STEP)
        assert third.state == "accepted"
        pairs[2][0].sendall(b"x\nrest")   # (_mover: it asks us to migrate it; refused)
        h = await asyncio.wait_for(ch.receive(), STEP)
        h.reject("no room")
        ch.flush()
        pairs[2][0].sendall(b"\n")
        assert await _recv(pairs[2][0], 16) == b"still here\nrest\n"
        # two sources at once, in one turn of the target's loop: one of them only (the
        # first is not in its connections yet when the second is read)
        assert await _recv(pairs[2][0], 1) == b""   # (its handler returned)
        await asyncio.wait_for(_stop_resumed(pairs[0][0]), STEP)
        assert resumed == [{"n": 0}]
        other = await AsyncChannel.connect(hello["peer"], name="peer:other")
        both = [socket.socketpair() for _ in range(2)]
        for client, _ in both:
            client.setblocking(False)
        tickets = [*peer.send_nowait([(both[0][1], json.dumps(meta(5)).encode(), b"")]),
                   *other.send_nowait([(both[1][1], json.dumps(meta(6)).encode(), b"")])]
        async with asyncio.timeout(STEP):
            while any(t.state == "pending" for t in tickets):
                await asyncio.sleep(0.01)
        assert sorted(t.state for t in tickets) == ["accepted", "rejected"], tickets
        taken = next(i for i, t in enumerate(tickets) if t.state == "accepted")
        both[taken][1].close()   # (the sender's copy, as an ACCEPT's sender closes it)
        await asyncio.wait_for(_stop_resumed(both[taken][0]), STEP)
        await other.aclose()
        for a, b in both:
            a.close()
            b.close()
        await peer.aclose()
        assert await _stop(worker, run, ch, listener) == 0
        for a, b in pairs:
            a.close()
            b.close()
        wait_fd_count("self", before, what="the channels and the connections")

    asyncio.run(main())


def test_a_window_of_moves_queued_in_one_turn_leaves_before_the_turn_ends(tmp_path: Path) -> None:
    """A drain wakes thousands of connections in one loop turn: a window's worth of
    handoffs (MIGRATION_WINDOW) leaves as soon as it is queued (the dispatcher sees the
    first moves at once), not only once every connection of the turn has set up its
    move; fewer wait for the end of the turn (one write for all of them)."""
    async def main() -> list[int]:
        path = str(tmp_path / "d.sock")
        listener = AsyncChannelListener.listen(path, name="dispatcher")
        worker = Worker(None, INFO, path, app_error="unused")
        ch, dispatcher = await asyncio.wait_for(
            asyncio.gather(AsyncChannel.connect(path, name="worker"), listener.accept()), STEP)
        worker.ch = ch
        sent_before: list[int] = []
        writes = 0
        send_nowait = ch.send_nowait

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            writes += 1
            return send_nowait(*args, **kwargs)

        ch.send_nowait = counting   # type: ignore[method-assign]
        pairs = [socket.socketpair() for _ in range(MIGRATION_WINDOW + 22)]

        async def move(i: int) -> None:
            sent_before.append(writes)
            ticket = await worker._hand_over(ch, pairs[i][1], b'{"resume":{}}', b"")
            assert ticket.state == "accepted"

        tasks = [asyncio.create_task(move(i)) for i in range(len(pairs))]
        got = 0
        while got < len(pairs):   # the dispatcher's side: accept them all
            await asyncio.wait_for(dispatcher.wait_activity(), STEP)
            for h in dispatcher.received():
                h.accept()
                h.socket.close()
                got += 1
            dispatcher.flush()
        await asyncio.wait_for(asyncio.gather(*tasks), STEP)
        for a, b in pairs:
            a.close()
            b.close()
        await ch.aclose()
        await dispatcher.aclose()
        listener.close()
        return sent_before

    sent_before = asyncio.run(main())
    # the first window left when its last move was queued, the rest at the turn's end
    assert sent_before[MIGRATION_WINDOW - 1] == 0
    assert sent_before[MIGRATION_WINDOW] == 1
    assert sent_before[-1] == 1
