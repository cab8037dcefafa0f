"""Each balancing policy does what it says, with a real dispatcher and real workers.

Plus the pure policy functions on their own (rendezvous hashing moves only the keys of a
worker that leaves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Server, ask, connect, hold, read_line

from sockshare.server._policy import (
    ConnInfo,
    HashKey,
    LeastConnections,
    RoundRobin,
    _weight,
    rendezvous,
)

pytestmark = pytest.mark.timeout(60)


def expected_worker(key: str, ids: list[int]) -> int:
    return max(ids, key=lambda wid: _weight(key, wid))


def test_round_robin_alternates_exactly(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "round-robin", workers=3) as srv:
        addr = srv.address()
        ids = [ask(addr)["id"] for _ in range(18)]
        assert ids[:3] == [1, 2, 3]
        assert ids == [1, 2, 3] * 6, ids


def test_least_conn_prefers_the_idle_worker(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "least-conn", workers=2) as srv:
        addr = srv.address()
        s1, a1 = hold(addr)
        s2, a2 = hold(addr)
        assert a2["id"] != a1["id"], "the second connection must go to the idle worker"
        s3, a3 = hold(addr)
        busy = a3["id"]
        idle = a1["id"] if busy == a2["id"] else a2["id"]

        def settled(st: dict[str, Any]) -> bool:
            w: dict[int, dict[str, Any]] = {x["id"]: x for x in st["workers"]}
            return bool(w[busy]["connections"] == 2 and w[idle]["connections"] == 1
                    and w[busy]["inflight"] == 0 and w[idle]["inflight"] == 0)

        try:
            for _ in range(10):
                srv.wait_for(settled, what="2 open on the busy worker, 1 on the idle one")
                assert ask(addr)["id"] == idle
            # and once the long-lived ones close, the counts go back to zero
        finally:
            for s in (s1, s2, s3):
                s.close()
        srv.wait_for(lambda st: all(w["connections"] == 0 for w in st["workers"]),
                     what="all connections reported closed")


def test_hash_addr_is_stable_per_client_ip(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "hash-addr", workers=3) as srv:
        addr = srv.address()
        seen: dict[str, set[int]] = {}
        for i in range(2, 12):
            ip = f"127.0.0.{i}"
            for _ in range(3):
                seen.setdefault(ip, set()).add(ask(addr, src=ip)["id"])
        for ip, ids in seen.items():
            assert ids == {expected_worker(ip, [1, 2, 3])}, (ip, ids)
        assert len(set().union(*seen.values())) >= 2


def test_hash_key_on_a_meta_field(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "hash-key", "--hash-key", "listener", workers=3,
                bind=["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"]) as srv:
        for name in ("l0", "l1", "l2"):
            addr = srv.address(name)
            ids = {ask(addr)["id"] for _ in range(4)}
            assert ids == {expected_worker(name, [1, 2, 3])}, (name, ids)


def test_hash_key_on_the_sniffed_host(tmp_path: Path) -> None:
    with Server(tmp_path, "--sniff", "--policy", "hash-key", "--hash-key", "host", workers=3) as srv:
        addr = srv.address()
        used = set()
        for host in ("a.example", "b.example", "c.example", "d.example", "e.example"):
            for _ in range(2):
                with connect(addr) as s:
                    s.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                    import json
                    answer = json.loads(read_line(s))
                assert answer["meta"]["host"] == host
                assert answer["meta"]["protocol"] == "http"
                assert answer["pre"] > 0, "the sniffed head must arrive as pre-read data"
                assert answer["id"] == expected_worker(host, [1, 2, 3]), (host, answer)
                used.add(answer["id"])
        assert len(used) >= 2


def test_user_callable_policy(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "serve_apps:pick_last", workers=3) as srv:
        addr = srv.address()
        assert {ask(addr)["id"] for _ in range(6)} == {3}


def test_broken_user_policy_falls_back_to_least_conn(tmp_path: Path) -> None:
    with Server(tmp_path, "--policy", "serve_apps:broken_policy", workers=2) as srv:
        addr = srv.address()
        assert {ask(addr)["id"] for _ in range(4)} <= {1, 2}
        assert "broken_policy raised" in srv.log()


# --- the policy functions alone ------------------------------------------------------------


@dataclass
class W:
    id: int
    connections: int = 0
    pid: int | None = None
    pool: str = "p"
    max_conns: int | None = None


def info(client: str = "10.0.0.1", **meta: object) -> ConnInfo:
    return ConnInfo([client, 1234], "main", "p", "h1", meta)


def test_round_robin_function() -> None:
    rr = RoundRobin()
    ws = [W(1), W(2), W(3)]
    assert [rr(ws, info()).id for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]  # type: ignore[union-attr]
    # a worker missing from the candidates (full) is skipped, the order goes on
    assert rr([ws[0], ws[2]], info()).id == 3  # type: ignore[union-attr]


def test_least_conn_function() -> None:
    lc = LeastConnections()
    ws = [W(1, 5), W(2, 1), W(3, 1)]
    assert lc(ws, info()).id == 2  # type: ignore[union-attr]
    assert lc(ws, info()).id == 3  # type: ignore[union-attr]  # ties rotate
    assert lc([], info()) is None


def test_rendezvous_moves_only_the_keys_of_a_leaving_worker() -> None:
    ws = [W(i) for i in range(1, 6)]
    keys = [f"10.1.{i // 250}.{i % 250}" for i in range(2000)]
    before = {k: rendezvous(ws, k).id for k in keys}  # type: ignore[union-attr]
    shares = [sum(1 for v in before.values() if v == w.id) for w in ws]
    assert min(shares) > 2000 / 5 * 0.7, shares
    without3 = [w for w in ws if w.id != 3]
    after = {k: rendezvous(without3, k).id for k in keys}  # type: ignore[union-attr]
    for k in keys:
        if before[k] != 3:
            assert after[k] == before[k]


def test_hash_key_paths_and_fallback() -> None:
    hk = HashKey("proxy.src.0")
    assert hk.value(info(proxy={"src": ["1.2.3.4", 5]})) == "1.2.3.4"
    assert hk.value(info()) is None
    ws = [W(1), W(2), W(3)]
    # without the field, the client address decides
    assert hk(ws, info("9.9.9.9")) is rendezvous(ws, "9.9.9.9")
