"""The accept loop, built in the test process: a real listening socket on 127.0.0.1, a
real :class:`~sockshare.server._admission.Admission`, one worker slot whose channel is a
stand-in that records the batches it would send.

What it pins: one readable listener is one accept burst and one batch per worker; the
metadata encoded once per listener (the fast path) is exactly the JSON of the metadata;
and the descriptor reserve holds the listener (connections wait in the kernel's queue)
until descriptors are free again, then accepts the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from types import SimpleNamespace

from stand_ins import StandInChannel

from sockshare.server._admission import Admission
from sockshare.server._config import ListenerConfig, PoolConfig, ServerConfig, parse_bind
from sockshare.server._listeners import Listeners, ListenerState, bind_listener
from sockshare.server._slots import PoolState, WorkerSlot


class Front:
    """Listeners + Admission + one worker, with a stand-in for the dispatcher."""

    def __init__(self) -> None:
        lc = ListenerConfig(parse_bind("127.0.0.1:0"), "main")
        pc = PoolConfig("default", app="x:y")
        self.cfg = ServerConfig(listeners=[lc], pools={"default": pc})
        self.pool = PoolState(pc)
        self.counters: dict[str, int] = dict.fromkeys(("accepted", "fd_pauses", "redispatches"), 0)
        self.admission = Admission(self.cfg, {"default": self.pool}, self.counters)
        self.worker = WorkerSlot(1, self.pool)
        self.channel = StandInChannel()
        self.worker.connected(self.channel, stopping=False)  # type: ignore[arg-type]
        self.pool.workers.append(self.worker)
        d = SimpleNamespace(cfg=self.cfg, pools={"default": self.pool}, slots=[self.worker],
                            counters=self.counters, admission=self.admission, pid=os.getpid(),
                            stopping=False, handover=SimpleNamespace(handed_over=False))
        self.listeners = Listeners(d)  # type: ignore[arg-type]
        self.ls = ListenerState(lc, bind_listener(lc))
        self.listeners.all.append(self.ls)
        self.listeners.prepare()
        self.clients: list[socket.socket] = []

    def connect(self, n: int) -> None:
        for _ in range(n):
            self.clients.append(socket.create_connection(self.ls.sock.getsockname()[:2], timeout=5))

    def handed(self) -> list[socket.socket]:
        return [item[0] for batch in self.channel.batches for item in batch]

    def close(self) -> None:
        for s in self.clients + self.handed():
            s.close()
        self.listeners.close_all()


def test_one_burst_is_one_batch_with_the_metadata_encoded_once() -> None:
    f = Front()
    try:
        f.connect(5)
        f.listeners.on_acceptable(f.ls)
        assert [len(b) for b in f.channel.batches] == [5]
        assert f.counters["accepted"] == 5
        assert f.ls.accepted == 5
        assert len(f.worker.pending) == 5
        for i, (sock, raw, data) in enumerate(f.channel.batches[0], start=1):
            assert isinstance(raw, bytes)
            assert data == b""
            meta = json.loads(raw)
            assert meta == {"handoff_id": f"{os.getpid()}.{i}", "listener": "main",
                            "client": list(sock.getpeername()[:2]), "route": meta["route"],
                            "pool": "default"}
    finally:
        f.close()


def test_the_descriptor_reserve_holds_the_listener_until_descriptors_are_free() -> None:
    async def run() -> None:
        f = Front()
        try:
            f.connect(6)
            probe = os.open(os.devnull, os.O_RDONLY)   # the lowest free descriptor
            os.close(probe)
            # the reserve starts three descriptors up: the third accepted reaches it
            # (and accepting resumes once the lowest free one is back under the mark
            # by an eighth of the reserve: one here)
            f.listeners._fd_high = probe + 2
            f.listeners._fd_limit = probe + 10
            f.listeners.on_acceptable(f.ls)
            assert f.counters["fd_pauses"] == 1
            assert f.ls.holds == {"fds"}
            assert len(f.handed()) == 3   # the others wait in the kernel's accept queue
            for s in f.handed():   # (the worker took them: our copies go)
                s.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while f.counters["accepted"] == 3 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert f.counters["accepted"] > 3   # released: accepting went on
            assert f.counters["fd_pauses"] == 2   # (and reached the reserve again)
        finally:
            f.close()

    asyncio.run(run())
