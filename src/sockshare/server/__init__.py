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

Those modules are private: what an app or the docs use is imported from here
(``from sockshare.server import Connection, MigrationRequested, sniff``), see ``__all__``.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sockshare.server._config import ConfigError
    from sockshare.server._control import ControlError
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
    from sockshare.server._worker import (
        Connection,
        MigrationAborted,
        MigrationError,
        MigrationRefused,
        MigrationRequested,
        MigrationUnsupported,
        StateError,
        WorkerInfo,
    )

# Loaded on first use: the worker runs as ``python -m sockshare.server._worker``, which
# must not find itself already imported by this package.
_WHERE = {
    "ConfigError": "_config",
    "ControlError": "_control",
    "MAX_CLIENT_HELLO": "_sniff",
    "MAX_HTTP_HEAD": "_sniff",
    "MAX_PROXY_HEADER": "_sniff",
    "MAX_SNIFF_META": "_sniff",
    "NEED_DATA": "_sniff",
    "ClientHello": "_sniff",
    "HttpHead": "_sniff",
    "NeedData": "_sniff",
    "ProxyHeader": "_sniff",
    "SniffError": "_sniff",
    "SniffResult": "_sniff",
    "SniffRules": "_sniff",
    "classify": "_sniff",
    "parse_client_hello": "_sniff",
    "parse_http_head": "_sniff",
    "parse_proxy_header": "_sniff",
    "proxy_signature": "_sniff",
    "route": "_sniff",
    "sniff": "_sniff",
    "Connection": "_worker",
    "MigrationAborted": "_worker",
    "MigrationError": "_worker",
    "MigrationRefused": "_worker",
    "MigrationRequested": "_worker",
    "MigrationUnsupported": "_worker",
    "StateError": "_worker",
    "WorkerInfo": "_worker",
}

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


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sockshare.server' has no attribute {name!r}")
    return getattr(import_module(f"sockshare.server.{module}"), name)
