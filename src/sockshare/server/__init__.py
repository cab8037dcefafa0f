"""The server runtime: ``sockshare serve``.

One dispatcher process owns the listening sockets and accepts; worker processes serve.
Each accepted connection is handed to a worker over a handoff :class:`~sockshare.Channel`
together with the bytes a sniffer already read and metadata (client address, route,
handoff id). Layout:

* :mod:`._dispatcher` -- listeners, accept loop, balancing, queue, supervision, the
  migration relay, rebalancing, reload, upgrade, systemd (LISTEN_FDS, sd_notify, fd store);
* :mod:`._sniff` -- HTTP/1.x, TLS ClientHello (SNI, by MSG_PEEK) and PROXY v1/v2 sniffers;
* :mod:`._worker` -- the Python worker runtime and :class:`Connection`, with
  ``conn.migrate(state)`` / ``resume(conn, state)``;
* :mod:`._demo` -- the built-in demo app (HTTP page, ``/whoami``, WebSocket echo that moves
  between workers with its "move me" button);
* :mod:`._control` -- the owner-only control socket read by ``sockshare status``;
* :mod:`._cli` -- the ``serve``, ``status``, ``reload``, ``upgrade`` and ``migrate`` commands;
* :mod:`._loadgen` -- the load generator of the live benchmark and its CI test.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sockshare.server._config import ConfigError
    from sockshare.server._control import ControlError
    from sockshare.server._sniff import SniffError, SniffResult, SniffRules
    from sockshare.server._worker import (
        Connection,
        MigrationAborted,
        MigrationError,
        MigrationRefused,
        MigrationUnsupported,
        StateError,
        WorkerInfo,
    )

# Loaded on first use: the worker runs as ``python -m sockshare.server._worker``, which
# must not find itself already imported by this package.
_WHERE = {
    "ConfigError": "_config",
    "ControlError": "_control",
    "SniffError": "_sniff",
    "SniffResult": "_sniff",
    "SniffRules": "_sniff",
    "Connection": "_worker",
    "MigrationAborted": "_worker",
    "MigrationError": "_worker",
    "MigrationRefused": "_worker",
    "MigrationUnsupported": "_worker",
    "StateError": "_worker",
    "WorkerInfo": "_worker",
}

__all__ = [
    "ConfigError",
    "Connection",
    "ControlError",
    "MigrationAborted",
    "MigrationError",
    "MigrationRefused",
    "MigrationUnsupported",
    "SniffError",
    "SniffResult",
    "SniffRules",
    "StateError",
    "WorkerInfo",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sockshare.server' has no attribute {name!r}")
    return getattr(import_module(f"sockshare.server.{module}"), name)
