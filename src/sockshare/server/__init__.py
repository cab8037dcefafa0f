"""The server runtime: ``sockshare serve``.

One dispatcher process owns the listening sockets and accepts; worker processes serve.
Each accepted connection is handed to a worker over a handoff :class:`~sockshare.Channel`
together with the bytes a sniffer already read and metadata (client address, route,
handoff id). Layout:

* :mod:`._dispatcher` -- a small ``Dispatcher`` that composes the parts below and runs
  setup, signals, housekeeping and stop;
* :mod:`._listeners` -- listening and inherited sockets (systemd LISTEN_FDS, fd store,
  upgrades), the accept loop, the fd reserve, sniffing, sd_notify;
* :mod:`._admission` -- pools, the queue, placing, batching, re-dispatch and refusal (no
  process code: buildable in a test with stand-ins);
* :mod:`._supervision` -- worker processes and their channels, reload, ``--timeout``;
* :mod:`._migration` -- the relay, direct-move bookkeeping, orphans, peer lists,
  rebalancing, ``sockshare migrate``;
* :mod:`._upgrade` -- both sides of ``sockshare upgrade`` (hand-over with probation, takeover);
* :mod:`._slots` -- worker slots and their states (every transition in one table), pools;
* :mod:`._status`, :mod:`._metrics` -- the status snapshot and ``/metrics``;
* :mod:`._tasks` -- the one helper that keeps background tasks;
* :mod:`._sniff` -- HTTP/1.x, TLS ClientHello (SNI, by MSG_PEEK) and PROXY v1/v2 sniffers;
* :mod:`._handler` -- what an app sees: :class:`Connection` (with ``conn.migrate(state)``
  and ``resume(conn, state)``), :class:`WorkerInfo`, the migration errors;
* :mod:`._runtime` -- the Python worker process: handoffs in, the app's tasks, reports
  to the dispatcher, drain; started as ``python -m sockshare.server.worker``
  (:mod:`.worker`);
* :mod:`._peers` -- direct migration from worker to worker (peer channels, orphans);
* :mod:`._demo` -- the built-in demo app (HTTP page, ``/whoami``, WebSocket echo that moves
  between workers with its "move me" button);
* :mod:`._control` -- the owner-only control socket read by ``sockshare status``;
* :mod:`._cli` -- the ``serve``, ``status``, ``reload``, ``upgrade`` and ``migrate`` commands.

Those modules are private: what an app or the docs use is imported from here
(``from sockshare.server import Connection, MigrationRequested, sniff``), see ``__all__``.
"""

from sockshare.server._config import ConfigError
from sockshare.server._control import ControlError
from sockshare.server._handler import (
    Connection,
    MigrationAborted,
    MigrationError,
    MigrationRefused,
    MigrationRequested,
    MigrationUnsupported,
    StateError,
    WorkerInfo,
)
from sockshare.server._sniff import (
    MAX_CLIENT_HELLO,
    MAX_HTTP_HEAD,
    MAX_PROXY_HEADER,
    MAX_SNIFF_META,
    NEED_DATA,
    ClientHello,
    HttpHead,
    NeedData,
    ProxyHeader,
    SniffError,
    SniffResult,
    SniffRules,
    classify,
    parse_client_hello,
    parse_http_head,
    parse_proxy_header,
    proxy_signature,
    route,
    sniff,
)

__all__ = [
    "ClientHello",
    "ConfigError",
    "Connection",
    "ControlError",
    "HttpHead",
    "MAX_CLIENT_HELLO",
    "MAX_HTTP_HEAD",
    "MAX_PROXY_HEADER",
    "MAX_SNIFF_META",
    "MigrationAborted",
    "MigrationError",
    "MigrationRefused",
    "MigrationRequested",
    "MigrationUnsupported",
    "NEED_DATA",
    "NeedData",
    "ProxyHeader",
    "SniffError",
    "SniffResult",
    "SniffRules",
    "StateError",
    "WorkerInfo",
    "classify",
    "parse_client_hello",
    "parse_http_head",
    "parse_proxy_header",
    "proxy_signature",
    "route",
    "sniff",
]

