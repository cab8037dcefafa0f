"""What ``sockshare serve`` was asked to do: listeners, pools, routes, limits.

A :class:`ServerConfig` comes from the command line (:func:`from_args` builds the
one-pool case: ``sockshare serve APP --bind ... --workers N``) or from a TOML file
(:func:`load_toml`, ``--config FILE``), with command-line flags that were given
explicitly overriding the file's top-level settings. Everything is validated here, once,
so the dispatcher can trust what it gets; mistakes raise :class:`ConfigError` with a
message that names the offending key.

The file format (docs/server.md has the full reference)::

    queue = 64                       # waiting connections per pool when all are full
    grace = 10.0                     # seconds workers get to finish on stop
    metrics = "127.0.0.1:9100"         # also GET /healthz (readiness)
    agent = "127.0.0.1:9200"           # HAProxy agent-check: ready N% | drain | maint

    [[listen]]
    bind = "127.0.0.1:8000"
    name = "web"
    sniff = true                     # read Host (HTTP) / SNI (TLS) before routing
    proxy = "optional"               # PROXY v1/v2 header: off | optional | required
    proxy_allow_from = ["127.0.0.0/8", "::1"]   # who may send one (the default)

    [pools.web]
    app = "sockshare.server._demo:handle"   # resume: sockshare.server._demo:resume
    workers = 2
    policy = "least-conn"
    max_conns = 100

    [pools.php]
    worker_cmd = "php examples/php/worker.php {channel}"
    workers = 1

    [[routes]]                       # first match wins; no match: default_pool
    host = "php.example"
    pool = "php"

Bind addresses: ``HOST:PORT`` (IPv4 or a name), ``[::1]:PORT`` (IPv6), ``unix:/path``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import ipaddress
import os
import socket
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sockshare._errors import SockshareError
from sockshare.server._web import WebAppError, WebSettings

__all__ = [
    "ACCEPT_MODES",
    "DEFAULT_APP",
    "ACCEPT_WINDOW_AUTO",
    "ACCEPT_WINDOW_MAX",
    "DEFAULT_BIND",
    "DEFAULT_PROXY_ALLOW",
    "POLICIES",
    "BindAddress",
    "ConfigError",
    "accept_window_us",
    "ListenerConfig",
    "PoolConfig",
    "RouteConfig",
    "ServerConfig",
    "from_args",
    "load_toml",
    "parse_bind",
    "parse_proxy_allow",
    "resolve_user",
]

DEFAULT_APP = "sockshare.server._demo:handle"
DEFAULT_BIND = "127.0.0.1:8000"
#: ``--accept`` values: who accepts a pool's new connections
ACCEPT_MODES = ("dispatcher", "worker")
#: Policy names accepted by ``--policy`` (or ``module:function`` for a user callable).
POLICIES = ("least-conn", "round-robin", "hash-addr", "hash-key")
#: Who may send a PROXY header (``--proxy-allow-from``): loopback, like uvicorn's
#: ``--forwarded-allow-ips``.
DEFAULT_PROXY_ALLOW = ("127.0.0.0/8", "::1")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


#: the window ``accept_window = "auto"`` means, in microseconds (docs/perf-dispatcher.md)
ACCEPT_WINDOW_AUTO = 300
#: the longest window allowed: the dispatcher's loop does nothing else meanwhile
ACCEPT_WINDOW_MAX = 2000


def accept_window_us(value: str | int) -> int:
    """The accept window in microseconds (0: off) of ``auto`` (:data:`ACCEPT_WINDOW_AUTO`
    on Linux, off elsewhere), ``off`` or a number of microseconds; :class:`ConfigError`
    for anything else."""
    text = str(value).strip().lower()
    if text == "auto":
        # measured on Linux only; elsewhere a sleep this short may last a timer tick
        return ACCEPT_WINDOW_AUTO if sys.platform.startswith("linux") else 0
    if text in ("off", "0"):
        return 0
    try:
        us = int(text)
    except ValueError:
        us = -1
    if not 0 <= us <= ACCEPT_WINDOW_MAX:
        raise ConfigError(f"accept_window must be auto, off or 0..{ACCEPT_WINDOW_MAX} "
                          f"(microseconds), not {value!r}")
    return us


class ConfigError(SockshareError, ValueError):
    """The configuration (flags or file) is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class BindAddress:
    """A parsed ``--bind`` value."""

    text: str
    family: int
    address: Any  # (host, port), (host, port, flow, scope) or a path

    @property
    def is_unix(self) -> bool:
        return self.family == getattr(socket, "AF_UNIX", -1)


def parse_bind(text: str) -> BindAddress:
    """``HOST:PORT`` (IPv4 or name), ``[v6]:PORT``, ``unix:/path``."""
    t = text.strip()
    if t.startswith("unix:"):
        path = t[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ConfigError(f"bind {text!r}: unix: needs a path")
        return BindAddress(t, socket.AF_UNIX, os.path.abspath(path))
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"bind {text!r}: IPv6 addresses are written [addr]:port")
        return BindAddress(t, socket.AF_INET6, (host, _port(text, rest[1:])))
    host, sep, port = t.rpartition(":")
    if not sep:
        raise ConfigError(f"bind {text!r}: expected HOST:PORT, [v6]:PORT or unix:/path")
    if ":" in host:
        raise ConfigError(f"bind {text!r}: write IPv6 addresses in brackets, [::1]:8000")
    return BindAddress(t, socket.AF_INET, (host or "0.0.0.0", _port(text, port)))


def parse_proxy_allow(entries: tuple[str, ...] | list[str], where: str = "proxy_allow_from",
                      ) -> tuple[Network, ...] | None:
    """The networks of a ``--proxy-allow-from`` list; None for ``*`` (anyone)."""
    nets: list[Network] = []
    for e in entries:
        t = e.strip()
        if t == "*":
            return None
        try:
            nets.append(ipaddress.ip_network(t, strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {e!r} is not an address or CIDR network "
                              "(e.g. 10.0.0.0/8, ::1, or * for anyone)") from None
    return tuple(nets)


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def resolve_user(user: str | None, group: str | None) -> tuple[int, int, list[int]] | None:
    """``(uid, gid, supplementary groups)`` the workers run as (``--user``/``--group``),
    None when neither is given. A name or a number; the group defaults to the user's."""
    if user is None and group is None:
        return None
    if sys.platform == "win32":
        raise ConfigError("--user/--group: not on Windows (start the server as that user)")
    import grp
    import pwd

    try:
        if user is None:
            uid, gid0, name = os.getuid(), os.getgid(), None
        elif user.isdigit():
            uid = int(user)
            try:
                pw = pwd.getpwuid(uid)
                gid0, name = pw.pw_gid, pw.pw_name
            except KeyError:
                gid0, name = uid, None
        else:
            pw = pwd.getpwnam(user)
            uid, gid0, name = pw.pw_uid, pw.pw_gid, pw.pw_name
    except KeyError:
        raise ConfigError(f"--user {user!r}: no such user") from None
    try:
        gid = gid0 if group is None else int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"--group {group!r}: no such group") from None
    groups = list(os.getgrouplist(name, gid)) if name is not None else [gid]
    return uid, gid, groups


def _port(text: str, port: str) -> int:
    try:
        n = int(port)
    except ValueError:
        raise ConfigError(f"bind {text!r}: port {port!r} is not a number") from None
    if not 0 <= n <= 65535:
        raise ConfigError(f"bind {text!r}: port {n} is out of range")
    return n


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening address. ``pool`` routes everything it accepts (unless a route
    matches first); ``sniff`` reads the protocol header before routing."""

    bind: BindAddress
    name: str
    sniff: bool = False
    pool: str | None = None
    backlog: int = 1024
    #: PROXY protocol header: "off", "optional" or "required" (sniffed and consumed)
    proxy: str = "off"
    #: source networks whose PROXY header is believed ("*": any); from anyone else,
    #: "optional" passes the bytes on as the client's data, "required" refuses
    proxy_allow: tuple[str, ...] = DEFAULT_PROXY_ALLOW
    #: TCP_DEFER_ACCEPT (Linux), seconds: a connection is accepted once its first bytes
    #: came, or after about this long if none did (docs/sniffing.md, "Deferred accept");
    #: 0: the socket's own setting is left as it is
    defer_accept: int = 0

    @property
    def sniffs(self) -> bool:
        """Whether connections on this listener go through the sniffers first."""
        return self.sniff or self.proxy != "off"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A set of identical workers: a Python ``app`` or a ``worker_cmd`` in any language."""

    name: str
    app: str | None = None
    worker_cmd: str | None = None
    workers: int = 1
    policy: str = "least-conn"
    #: meta field (dotted path, e.g. ``host`` or ``proxy.src.0``) for ``hash-key``
    hash_key: str = "host"
    #: connections per worker (open + being handed over); None: unlimited
    max_conns: int | None = None
    #: connections waiting for a free worker; past it they are refused
    queue: int = 64
    #: the resume handler, ``module:callable`` ("-": none); None: ``resume`` beside the app's
    resume: str | None = None
    #: move connections from busy to idle workers; None: on unless a hash policy
    rebalance: bool | None = None
    #: how a Python app is served: --interface, TLS, HTTP settings (ASGI/WSGI)
    web: WebSettings = field(default_factory=WebSettings)
    #: who accepts the pool's new connections: "dispatcher" (it hands each one over) or
    #: "worker" (each worker accepts on the pool's listeners itself; docs/server.md,
    #: "Accept modes")
    accept: str = "dispatcher"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Chooses a pool. Every field given must match; ``host``/``sni`` take globs."""

    pool: str
    host: str | None = None
    sni: str | None = None
    proxy: bool | None = None
    listener: str | None = None

    def matches(self, listener: str, meta: Mapping[str, Any]) -> bool:
        if self.listener is not None and self.listener != listener:
            return False
        if self.proxy is not None and (meta.get("proxy") is not None) != self.proxy:
            return False
        if self.host is not None and not _glob(self.host, meta.get("host")):
            return False
        return not (self.sni is not None and not _glob(self.sni, meta.get("sni")))


def _glob(pattern: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    host = value.lower()
    if host.startswith("[") and "]" in host:          # [v6]:port
        host = host[1:host.index("]")]
    elif host.count(":") == 1:                         # name:port
        host = host.partition(":")[0]
    return fnmatch.fnmatchcase(host, pattern.lower())


@dataclass(slots=True)
class ServerConfig:
    """Everything the dispatcher needs. Built by :func:`from_args` / :func:`load_toml`."""

    listeners: list[ListenerConfig]
    pools: dict[str, PoolConfig]
    routes: list[RouteConfig] = field(default_factory=list)
    default_pool: str = "default"
    grace: float = 10.0
    metrics: str | None = None
    #: HAProxy agent-check listener, HOST:PORT (docs/deploy.md, ``_health``)
    agent: str | None = None
    control: str | None = None
    log_level: str = "info"
    #: a logging configuration file for the workers (dictConfig JSON, or fileConfig INI)
    log_config: str | None = None
    sniff_timeout: float = 5.0
    #: connections being sniffed at once, at most; past it the sniffing listeners stop
    #: accepting (connections wait in the kernel's accept queue) until one is done
    sniff_max: int = 512
    #: descriptors kept free (for starting workers, the control socket, an upgrade):
    #: accepting pauses when an accepted descriptor reaches RLIMIT_NOFILE - fd_reserve;
    #: None: 16 + 8 per worker, at most half the limit
    fd_reserve: int | None = None
    #: times a returned handoff is re-dispatched before the connection is closed
    max_retries: int = 3
    #: seconds a connection may wait in a queue before it is refused
    queue_timeout: float = 30.0
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    #: a worker that ran this long resets the backoff
    stable_after: float = 10.0
    #: seconds a started worker gets to connect its channel
    connect_timeout: float = 15.0
    #: upgrade: seconds the new dispatcher serves beside the old one, which keeps its
    #: listeners and workers (and takes back over if the new one dies), before the old
    #: one hands over; it also waits until the new one answers a status with ready workers
    upgrade_probation: float = 1.0
    #: a worker that leaves a handoff unanswered this long is hung: killed and restarted,
    #: its unanswered handoffs go to other workers (0: never)
    timeout: float = 30.0
    #: seconds between two looks at the load spread of each pool
    rebalance_interval: float = 1.0
    #: rebalance when busiest - idlest > max(rebalance_min, rebalance_spread * busiest)
    rebalance_min: int = 4
    rebalance_spread: float = 0.5
    #: a handler's own migrate() goes straight to a peer worker (one hop); False: every
    #: migration is relayed by the dispatcher (two hops)
    direct_migration: bool = True
    #: the dispatcher's pid, written once the listeners are bound, removed on exit
    pid_file: str | None = None
    #: the workers run as this user / group (the dispatcher must be root)
    user: str | None = None
    group: str | None = None
    #: processes sharing the dispatcher's work: the dispatcher (the lead) and
    #: dispatchers - 1 *feeders* that accept on the same listeners and hand connections
    #: to every worker of the pool (``_feeders``)
    dispatchers: int = 1
    #: the accept batching window: ``"auto"`` (ACCEPT_WINDOW_AUTO µs), ``"off"``, or
    #: microseconds; under load a burst waits that long before it is accepted, so that
    #: more connections share its costs (``_listeners``); a lone connection never waits
    accept_window: str = "auto"

    def validate(self) -> None:
        if not self.listeners:
            raise ConfigError("no listener: give --bind or [[listen]]")
        if not 1 <= self.dispatchers <= 64:
            raise ConfigError(f"dispatchers must be 1 to 64, got {self.dispatchers}")
        if self.dispatchers > 1 and sys.platform == "win32":
            # feeders reach the workers over UNIX sockets and share the accept queue with
            # EPOLLEXCLUSIVE: neither exists there (docs/windows.md)
            raise ConfigError("--dispatchers: one dispatcher only on Windows")
        accept_window_us(self.accept_window)
        if not self.pools:
            raise ConfigError("no pool defined")
        if self.default_pool not in self.pools:
            raise ConfigError(f"default_pool {self.default_pool!r} is not a defined pool")
        names = [lc.name for lc in self.listeners]
        if len(set(names)) != len(names):
            raise ConfigError(f"listener names must be unique: {names}")
        binds = [lc.bind.text for lc in self.listeners
                 if lc.bind.is_unix or lc.bind.address[1] != 0]   # port 0: each its own port
        if len(set(binds)) != len(binds):
            raise ConfigError(f"the same address is bound twice: {binds}")
        for lc in self.listeners:
            if lc.proxy not in ("off", "optional", "required"):
                raise ConfigError(f"listener {lc.name!r}: proxy must be off, optional or required")
            if lc.pool is not None and lc.pool not in self.pools:
                raise ConfigError(f"listener {lc.name!r}: unknown pool {lc.pool!r}")
            parse_proxy_allow(lc.proxy_allow, f"listener {lc.name!r}: proxy_allow_from")
            if lc.backlog < 1:
                raise ConfigError(f"listener {lc.name!r}: backlog must be at least 1")
            if not 0 <= lc.defer_accept <= 3600:
                raise ConfigError(f"listener {lc.name!r}: defer_accept must be 0..3600 seconds")
            if lc.defer_accept and lc.bind.is_unix:
                raise ConfigError(f"listener {lc.name!r}: defer_accept is for TCP listeners")
        for i, r in enumerate(self.routes):
            if r.pool not in self.pools:
                raise ConfigError(f"routes[{i}]: unknown pool {r.pool!r}")
            if r.listener is not None and r.listener not in names:
                raise ConfigError(f"routes[{i}]: unknown listener {r.listener!r}")
        for p in self.pools.values():
            if (p.app is None) == (p.worker_cmd is None):
                raise ConfigError(f"pool {p.name!r}: give exactly one of app or worker_cmd")
            if p.app is not None and ":" not in p.app:
                raise ConfigError(f"pool {p.name!r}: app must be module:callable, not {p.app!r}")
            if p.workers < 1:
                raise ConfigError(f"pool {p.name!r}: workers must be at least 1")
            if p.max_conns is not None and p.max_conns < 1:
                raise ConfigError(f"pool {p.name!r}: max_conns must be at least 1")
            if p.queue < 0:
                raise ConfigError(f"pool {p.name!r}: queue must be 0 or more")
            if p.resume is not None and p.resume not in ("-", "none") and ":" not in p.resume:
                raise ConfigError(f"pool {p.name!r}: resume must be module:callable or '-', "
                                  f"not {p.resume!r}")
            if p.resume is not None and p.worker_cmd is not None:
                raise ConfigError(f"pool {p.name!r}: resume is for Python apps, not worker_cmd")
            try:
                p.web.check(f"pool {p.name!r}")
            except WebAppError as exc:
                raise ConfigError(str(exc)) from None
            if p.worker_cmd is not None and p.web != WebSettings():
                raise ConfigError(f"pool {p.name!r}: interface, TLS and HTTP settings are for "
                                  "Python apps, not worker_cmd")
            if p.policy not in POLICIES and ":" not in p.policy:
                raise ConfigError(f"pool {p.name!r}: policy {p.policy!r} is not one of "
                                  f"{', '.join(POLICIES)} or module:function")
        self._check_worker_accept()
        if self.sniff_max < 1 or not self.sniff_timeout > 0:
            raise ConfigError("sniff_max must be at least 1 and sniff_timeout positive")
        if self.fd_reserve is not None and self.fd_reserve < 0:
            raise ConfigError("fd_reserve must not be negative")
        if self.grace < 0 or self.max_retries < 0 or self.timeout < 0 or self.upgrade_probation < 0:
            raise ConfigError("grace, max_retries, timeout and upgrade_probation must not be negative")
        if self.rebalance_interval <= 0 or self.rebalance_min < 1 or self.rebalance_spread < 0:
            raise ConfigError("rebalance_interval must be positive, rebalance_min at least 1 and "
                              "rebalance_spread not negative")
        for key in ("metrics", "agent"):
            value = getattr(self, key)
            if value is not None and parse_bind(value).is_unix:
                raise ConfigError(f"{key} takes HOST:PORT, not {value!r}")
        if resolve_user(self.user, self.group) is not None and os.geteuid() != 0:
            raise ConfigError(f"--user/--group: only root can start workers as another user "
                              f"(this process runs as uid {os.geteuid()}); start as root, or "
                              "leave them out")

    def worker_listeners(self, pool: str) -> list[ListenerConfig]:
        """The listeners whose connections all go to ``pool`` (no route could send one
        elsewhere): those its workers accept on with ``accept = "worker"``."""
        return [lc for lc in self.listeners if self.route(lc, {})[0] == pool
                and not self._routed_on(lc)]

    def _routed_on(self, lc: ListenerConfig) -> list[int]:
        """The routes that look at a connection of ``lc`` (more than its listener)."""
        return [i for i, r in enumerate(self.routes)
                if r.listener in (None, lc.name)
                and (r.host is not None or r.sni is not None or r.proxy is not None)]

    def _check_worker_accept(self) -> None:
        """``accept = "worker"``: refuse what needs the dispatcher to accept (and read)
        each connection, with a message that says which and why."""
        worker = [p for p in self.pools.values() if p.accept == "worker"]
        for p in self.pools.values():
            if p.accept not in ACCEPT_MODES:
                raise ConfigError(f"pool {p.name!r}: accept must be one of "
                                  f"{', '.join(ACCEPT_MODES)}, not {p.accept!r}")
        if not worker:
            return
        names = ", ".join(repr(p.name) for p in worker)
        if sys.platform == "win32":
            raise ConfigError(f"pool {names}: accept = \"worker\" is not supported on Windows "
                              "yet (the workers would need the listeners through WSADuplicateSocket, not "
                              "inheritance; not built); use "
                              "accept = \"dispatcher\"")
        if self.dispatchers > 1:
            raise ConfigError(f"pool {names}: accept = \"worker\" and --dispatchers "
                              f"{self.dispatchers}: the workers accept themselves, there is nothing "
                              "for feeder dispatchers to do; give one or the other")
        for p in worker:
            where = f"pool {p.name!r}: accept = \"worker\""
            if p.worker_cmd is not None:
                raise ConfigError(f"{where} needs a Python ASGI or WSGI app (the worker serves "
                                  "what it accepts with uvicorn's protocols), not worker_cmd")
            if p.web.interface == "handler":
                raise ConfigError(f"{where} needs an ASGI or WSGI app, not --interface handler "
                                  "(a handler's connections come through the dispatcher)")
            mine = [lc for lc in self.listeners if self.route(lc, {})[0] == p.name]
            if not mine:
                raise ConfigError(f"{where}: no listener sends its connections to this pool "
                                  "(give the listener pool = \"" + p.name + "\" or make it the "
                                  "default pool)")
            for lc in mine:
                lw = f"{where} on listener {lc.name!r}"
                routed = self._routed_on(lc)
                if routed:
                    r = self.routes[routed[0]]
                    by = "Host" if r.host is not None else "SNI" if r.sni is not None else "PROXY"
                    raise ConfigError(
                        f"{lw}: routes[{routed[0]}] routes by {by} on that listener, which needs "
                        "the dispatcher to read each connection first (a listener shared by "
                        "several pools); use accept = \"dispatcher\" for it, or a listener of "
                        "its own")
                if lc.sniff:
                    raise ConfigError(f"{lw}: sniff = true needs the dispatcher to read each "
                                      "connection (Host/SNI); use accept = \"dispatcher\"")
                if lc.proxy != "off":
                    raise ConfigError(f"{lw}: PROXY protocol parsing (proxy = {lc.proxy!r}) is "
                                      "done by the dispatcher; use accept = \"dispatcher\", or "
                                      "--proxy-headers in the worker")
            for other in self.pools.values():
                if other.name == p.name:
                    continue
                shared = [r for r in self.routes
                          if r.pool == other.name and any(r.listener in (None, lc.name)
                                                          for lc in mine)]
                if shared:
                    raise ConfigError(f"{where}: pool {other.name!r} is routed to from the "
                                      "same listener; a listener whose workers accept serves "
                                      "one pool only")

    def route(self, listener: ListenerConfig, meta: Mapping[str, Any]) -> tuple[str, str]:
        """``(pool, why)`` for a connection accepted on ``listener`` with sniffed ``meta``;
        ``why`` is ``routes[i]``, ``listener`` or ``default`` (it goes to meta "route")."""
        for i, r in enumerate(self.routes):
            if r.matches(listener.name, meta):
                return r.pool, f"routes[{i}]"
        if listener.pool:
            return listener.pool, "listener"
        return self.default_pool, "default"


# --- command line -------------------------------------------------------------------


def _listeners_from(binds: list[str]) -> list[ListenerConfig]:
    out = []
    for i, b in enumerate(binds):
        out.append(ListenerConfig(bind=parse_bind(b), name=f"l{i}" if len(binds) > 1 else "main"))
    return out


def from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the configuration of ``sockshare serve`` from parsed flags (and ``--config``)."""
    if getattr(args, "config", None):
        # --queue overrides the file's top-level queue: the default of every pool
        # without its own (so it is applied before the pools are built)
        cfg = load_toml(args.config, queue=getattr(args, "queue", None))
        _override(cfg, args)
        cfg.validate()
        return cfg
    app = args.app
    if app is None and not args.worker_cmd:
        app = DEFAULT_APP
    if app is not None and args.worker_cmd:
        raise ConfigError("give an APP or --worker-cmd, not both")
    pool = PoolConfig(
        name="default", app=app, worker_cmd=args.worker_cmd or None, web=web_from_args(args),
        workers=args.workers if args.workers is not None else 2,
        policy=args.policy or "least-conn", hash_key=args.hash_key or "host",
        max_conns=args.max_conns, queue=args.queue if args.queue is not None else 64,
        resume=getattr(args, "resume", None),
        rebalance=False if getattr(args, "no_rebalance", False) else None,
        accept=getattr(args, "accept", None) or "dispatcher",
    )
    binds = args.bind or [DEFAULT_BIND]
    listeners = [
        ListenerConfig(bind=lc.bind, name=lc.name, sniff=bool(args.sniff),
                       proxy=args.proxy_protocol or "off")
        for lc in _listeners_from(binds)
    ]
    cfg = ServerConfig(listeners=listeners, pools={"default": pool})
    _override(cfg, args)
    cfg.validate()
    return cfg


#: WebSettings fields that have a command-line flag of the same name
WEB_FLAGS = ("interface", "threads", "http", "ws", "loop", "lifespan", "ssl_certfile",
             "ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs", "ssl_cert_reqs",
             "access_log", "access_log_format", "max_requests", "max_requests_jitter",
             "limit_concurrency", "root_path", "proxy_headers", "forwarded_allow_ips",
             "timeout_keep_alive", "limit_header_size", "ws_max_size", "ws_ping_interval",
             "ws_ping_timeout")


def web_from_args(args: argparse.Namespace, base: WebSettings | None = None) -> WebSettings:
    """The web settings the flags give (over ``base``, a pool's own from the file)."""
    given = {k: getattr(args, k) for k in WEB_FLAGS if getattr(args, k, None) is not None}
    if given.get("access_log_format") is not None:
        given.setdefault("access_log", True)
    return dataclasses.replace(base or WebSettings(), **given)


def _override(cfg: ServerConfig, args: argparse.Namespace) -> None:
    if getattr(args, "graceful_timeout", None) is not None and getattr(args, "grace", None) is None:
        args.grace = args.graceful_timeout
    for key in ("grace", "metrics", "agent", "control", "log_level", "log_config", "max_retries",
                "queue_timeout", "timeout", "upgrade_probation", "sniff_max", "fd_reserve",
                "sniff_timeout", "pid_file", "user", "group", "dispatchers", "accept_window"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    if getattr(args, "no_direct_migration", False):
        cfg.direct_migration = False
    if getattr(args, "config", None) and args.bind:
        cfg.listeners = _listeners_from(args.bind)
    listen: dict[str, Any] = {}
    if getattr(args, "backlog", None) is not None:
        listen["backlog"] = args.backlog
    if getattr(args, "proxy_allow_from", None) is not None:
        listen["proxy_allow"] = _split_list(args.proxy_allow_from)
    if getattr(args, "defer_accept", None) is not None:
        listen["defer_accept"] = args.defer_accept
    if listen:
        cfg.listeners = [dataclasses.replace(lc, **listen) for lc in cfg.listeners]
    if getattr(args, "config", None):
        _override_file(cfg, args)
    if getattr(args, "config", None) and any(getattr(args, k, None) is not None for k in WEB_FLAGS):
        cfg.pools = {name: dataclasses.replace(p, web=web_from_args(args, p.web))
                     if p.app is not None else p for name, p in cfg.pools.items()}


def _override_file(cfg: ServerConfig, args: argparse.Namespace) -> None:
    """Flags next to ``--config`` that are pool or listener settings: each applies to
    every pool (listener) of the file, as a web flag does. The app is the file's to name:
    an APP or ``--worker-cmd`` beside it is an error, not ignored."""
    if getattr(args, "app", None) is not None or getattr(args, "worker_cmd", None):
        raise ConfigError("APP and --worker-cmd cannot be given with --config: a pool's app is "
                          "its app = ... (or worker_cmd = ...) in the file")
    pool: dict[str, Any] = {key: getattr(args, key) for key in
                            ("workers", "policy", "hash_key", "max_conns", "resume", "accept")
                            if getattr(args, key, None) is not None}
    if getattr(args, "no_rebalance", False):
        pool["rebalance"] = False
    if pool:
        cfg.pools = {name: dataclasses.replace(p, **pool) for name, p in cfg.pools.items()}
    listen: dict[str, Any] = {}
    if getattr(args, "sniff", False):
        listen["sniff"] = True
    if getattr(args, "proxy_protocol", None) is not None:
        listen["proxy"] = args.proxy_protocol
    if listen:
        cfg.listeners = [dataclasses.replace(lc, **listen) for lc in cfg.listeners]


# --- TOML ---------------------------------------------------------------------------


_TOP = {"queue", "grace", "metrics", "agent", "control", "log_level", "log_config", "sniff_timeout",
        "max_retries", "queue_timeout", "backoff_initial", "backoff_max", "stable_after",
        "connect_timeout", "timeout",
        "rebalance_interval", "rebalance_min", "rebalance_spread", "direct_migration",
        "upgrade_probation", "sniff_max", "fd_reserve", "default_pool", "listen", "pools", "routes",
        "pid_file", "user", "group", "dispatchers", "accept_window"}
_POOL = {"app", "worker_cmd", "workers", "policy", "hash_key", "max_conns", "queue", "resume",
         "rebalance", "accept", *WEB_FLAGS}
_LISTEN = {"bind", "name", "sniff", "pool", "backlog", "proxy", "proxy_allow_from",
           "defer_accept"}
_ROUTE = {"pool", "host", "sni", "proxy", "listener"}


def load_toml(path: str | os.PathLike[str], *, queue: int | None = None) -> ServerConfig:
    """Read a TOML configuration file (see the module docstring). ``queue`` (``--queue``)
    replaces the file's top-level ``queue``: the queue of every pool without its own."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {os.fspath(path)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {os.fspath(path)!r}: {exc}") from exc
    if queue is not None:
        doc["queue"] = queue
    return parse_document(doc)


def parse_document(doc: Mapping[str, Any]) -> ServerConfig:
    """Turn a decoded TOML document into a validated :class:`ServerConfig`."""
    _only(doc, _TOP, "the top level")
    default_queue = _typed(doc, "queue", int, 64, "queue")
    pools: dict[str, PoolConfig] = {}
    raw_pools = doc.get("pools", {})
    if not isinstance(raw_pools, dict) or not raw_pools:
        raise ConfigError("[pools.NAME] tables are required (at least one pool)")
    for name, p in raw_pools.items():
        where = f"pools.{name}"
        if not isinstance(p, dict):
            raise ConfigError(f"{where} must be a table")
        _only(p, _POOL, where)
        pools[name] = PoolConfig(
            name=name,
            app=_typed(p, "app", str, None, where),
            worker_cmd=_typed(p, "worker_cmd", str, None, where),
            workers=_typed(p, "workers", int, 1, where),
            policy=_typed(p, "policy", str, "least-conn", where),
            hash_key=_typed(p, "hash_key", str, "host", where),
            max_conns=_typed(p, "max_conns", int, None, where),
            queue=_typed(p, "queue", int, default_queue, where),
            resume=_typed(p, "resume", str, None, where),
            rebalance=_typed(p, "rebalance", bool, None, where),
            accept=_typed(p, "accept", str, "dispatcher", where),
            web=_web_table(p, where),
        )
    listeners: list[ListenerConfig] = []
    raw_listen = doc.get("listen", [])
    if not isinstance(raw_listen, list):
        raise ConfigError("listen must be an array of tables: [[listen]]")
    for i, lt in enumerate(raw_listen):
        where = f"listen[{i}]"
        if not isinstance(lt, dict):
            raise ConfigError(f"{where} must be a table")
        _only(lt, _LISTEN, where)
        bind = _typed(lt, "bind", str, None, where)
        if bind is None:
            raise ConfigError(f"{where}: bind is required")
        listeners.append(ListenerConfig(
            bind=parse_bind(bind), name=_typed(lt, "name", str, f"l{i}", where),
            sniff=_typed(lt, "sniff", bool, False, where), pool=_typed(lt, "pool", str, None, where),
            backlog=_typed(lt, "backlog", int, 1024, where),
            proxy=_typed(lt, "proxy", str, "off", where),
            proxy_allow=_allow_list(lt, where),
            defer_accept=_typed(lt, "defer_accept", int, 0, where)))
    routes: list[RouteConfig] = []
    raw_routes = doc.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError("routes must be an array of tables: [[routes]]")
    for i, rt in enumerate(raw_routes):
        where = f"routes[{i}]"
        if not isinstance(rt, dict):
            raise ConfigError(f"{where} must be a table")
        _only(rt, _ROUTE, where)
        pool = _typed(rt, "pool", str, None, where)
        if pool is None:
            raise ConfigError(f"{where}: pool is required")
        routes.append(RouteConfig(pool=pool, host=_typed(rt, "host", str, None, where),
                                  sni=_typed(rt, "sni", str, None, where),
                                  proxy=_typed(rt, "proxy", bool, None, where),
                                  listener=_typed(rt, "listener", str, None, where)))
    cfg = ServerConfig(listeners=listeners, pools=pools, routes=routes,
                       default_pool=_typed(doc, "default_pool", str, next(iter(pools)), "the top level"))
    for key, typ in (("grace", float), ("metrics", str), ("agent", str), ("control", str), ("log_level", str),
                     ("log_config", str),
                     ("sniff_timeout", float), ("max_retries", int), ("queue_timeout", float),
                     ("backoff_initial", float), ("backoff_max", float), ("stable_after", float),
                     ("connect_timeout", float), ("timeout", float), ("rebalance_interval", float),
                     ("rebalance_min", int), ("rebalance_spread", float),
                     ("direct_migration", bool), ("upgrade_probation", float),
                     ("sniff_max", int), ("fd_reserve", int), ("pid_file", str), ("user", str),
                     ("group", str), ("dispatchers", int)):
        if key in doc:
            setattr(cfg, key, _typed(doc, key, typ, None, "the top level"))
    if "accept_window" in doc:
        value = doc["accept_window"]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError('accept_window must be "auto", "off" or microseconds (an integer)')
        cfg.accept_window = str(value)
    return cfg


def _allow_list(lt: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """A listener's ``proxy_allow_from``: an array of strings, or one comma-separated."""
    value = lt.get("proxy_allow_from", list(DEFAULT_PROXY_ALLOW))
    if isinstance(value, str):
        return _split_list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: proxy_allow_from must be an array of strings")
    return tuple(value)


def _web_table(p: Mapping[str, Any], where: str) -> WebSettings:
    """A pool's web settings from its table (the same names as the flags)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(WebSettings):
        if f.name in p:
            typ: type = {"int": int, "str": str, "bool": bool, "str | None": str,
                         "int | None": int, "float": float}[str(f.type)]
            values[f.name] = _typed(p, f.name, typ, None, where)
    return WebSettings(**values)


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _typed(table: Mapping[str, Any], key: str, typ: type, default: Any, where: str) -> Any:
    if key not in table:
        return default
    value = table[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be an integer")
    if not isinstance(value, typ):
        raise ConfigError(f"{where}: {key} must be {typ.__name__}, not {type(value).__name__}")
    return value
