"""Which worker gets the next connection: the balancing policies.

A policy is a callable ``policy(workers, conn) -> worker | None``. The dispatcher calls
it with the *candidates* only -- workers of the connection's pool whose channel is up,
that are not draining and are under their ``max_conns`` -- sorted by worker id, and a
:class:`ConnInfo` describing the connection. Returning ``None`` means "none of these":
the connection waits in the pool's queue like when every worker is full.

Built in (``--policy``):

``least-conn`` (default)
    the fewest connections, counting open ones *and* handoffs still in flight (so a burst
    does not all land on the worker that looked idle a microsecond ago); ties rotate.
``round-robin``
    the next worker id after the last one picked; with every worker available it
    alternates exactly.
``hash-addr``
    rendezvous (highest-random-weight) hashing of the client IP -- the PROXY-protocol
    source address when a sniffer found one. The same client lands on the same worker
    while that worker is available; a worker leaving or filling up only moves *its*
    clients (to their second choice), which is what "consistent" means here.
``hash-key``
    the same, on a metadata field (``--hash-key``, a dotted path such as ``host`` or
    ``proxy.src.0``); connections without the field fall back to the client address.
``module:function``
    a user callable with the same signature; an exception or a return value that is not
    one of the candidates is logged and replaced by ``least-conn``'s choice.

Hashing uses BLAKE2b, not :func:`hash` (salted per process): mappings are stable across
restarts of the dispatcher.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ConnInfo",
    "HashAddress",
    "HashKey",
    "LeastConnections",
    "Policy",
    "RoundRobin",
    "WorkerView",
    "load_callable",
    "make_policy",
]

log = logging.getLogger("sockshare.server.policy")


class WorkerView(Protocol):
    """What a policy may look at in a worker (read-only)."""

    @property
    def id(self) -> int: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def pool(self) -> str: ...
    @property
    def connections(self) -> int:
        """Open connections plus handoffs in flight to it."""
        ...
    @property
    def max_conns(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """The connection being placed."""

    client: Any            # [host, port] for TCP, a string for UNIX peers
    listener: str
    pool: str
    handoff_id: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def client_host(self) -> str:
        """The client's IP (PROXY source if known), or the UNIX peer name."""
        proxy = self.meta.get("proxy")
        if isinstance(proxy, Mapping):
            src = proxy.get("src")
            if isinstance(src, list | tuple) and src:
                return str(src[0])
        if isinstance(self.client, list | tuple) and self.client:
            return str(self.client[0])
        return str(self.client)


Policy = Callable[[Sequence[WorkerView], ConnInfo], WorkerView | None]


class RoundRobin:
    """Next worker id after the last pick, wrapping around."""

    def __init__(self) -> None:
        self._last = -1

    def __call__(self, workers: Sequence[WorkerView], conn: ConnInfo) -> WorkerView | None:
        if not workers:
            return None
        pick = next((w for w in workers if w.id > self._last), workers[0])
        self._last = pick.id
        return pick


class LeastConnections:
    """Fewest connections (open + in flight); ties go round-robin."""

    def __init__(self) -> None:
        self._last = -1

    def __call__(self, workers: Sequence[WorkerView], conn: ConnInfo) -> WorkerView | None:
        # one pass (this runs for every connection): the least loaded; among equals, the
        # first after the last pick in id order, else the first
        best: WorkerView | None = None
        best_n = 0
        after: WorkerView | None = None
        last = self._last
        for w in workers:
            n = w.connections
            if best is None or n < best_n:
                best, best_n = w, n
                after = w if w.id > last else None
            elif n == best_n and after is None and w.id > last:
                after = w
        pick = after or best
        if pick is not None:
            self._last = pick.id
        return pick


def _weight(key: str, worker_id: int) -> int:
    h = hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def rendezvous(workers: Sequence[WorkerView], key: str) -> WorkerView | None:
    """Highest-random-weight choice of a worker for ``key``."""
    if not workers:
        return None
    return max(workers, key=lambda w: _weight(key, w.id))


class HashAddress:
    """Consistent (rendezvous) hash of the client address."""

    def __call__(self, workers: Sequence[WorkerView], conn: ConnInfo) -> WorkerView | None:
        return rendezvous(workers, conn.client_host)


class HashKey:
    """Consistent (rendezvous) hash of a metadata field (a dotted path)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._path = [p for p in key.split(".") if p]

    def value(self, conn: ConnInfo) -> str | None:
        cur: Any = conn.meta
        for part in self._path:
            if isinstance(cur, Mapping):
                cur = cur.get(part)
            elif isinstance(cur, list | tuple) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            else:
                return None
            if cur is None:
                return None
        return cur if isinstance(cur, str) else repr(cur)

    def __call__(self, workers: Sequence[WorkerView], conn: ConnInfo) -> WorkerView | None:
        v = self.value(conn)
        return rendezvous(workers, v if v is not None else conn.client_host)


class _Checked:
    """Wraps a user callable: bad answers are logged and replaced by least-conn's."""

    def __init__(self, func: Policy, name: str) -> None:
        self._func = func
        self._name = name
        self._fallback = LeastConnections()

    def __call__(self, workers: Sequence[WorkerView], conn: ConnInfo) -> WorkerView | None:
        try:
            pick = self._func(workers, conn)
        except Exception:
            log.exception("policy %s raised; using least-conn for handoff %s", self._name,
                          conn.handoff_id)
            return self._fallback(workers, conn)
        if pick is None or any(pick is w for w in workers):
            return pick
        log.warning("policy %s returned %r, not one of the candidates; using least-conn",
                    self._name, pick)
        return self._fallback(workers, conn)


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``module:attr.path`` and return the object (raises ImportError/AttributeError)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ImportError(f"{spec!r} is not of the form module:callable")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def make_policy(name: str, hash_key: str = "host") -> Policy:
    """A fresh policy object for one pool."""
    if name == "least-conn":
        return LeastConnections()
    if name == "round-robin":
        return RoundRobin()
    if name == "hash-addr":
        return HashAddress()
    if name == "hash-key":
        return HashKey(hash_key)
    return _Checked(load_callable(name), name)
