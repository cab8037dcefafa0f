"""``sockshare serve``, ``status``, ``reload``, ``upgrade``, ``migrate`` and ``health``.

:func:`add_commands` registers the subcommands on an argparse ``subparsers`` object
(each parser sets ``func=callable(args) -> int``); :mod:`sockshare.cli` calls it.
``python -m sockshare.server._cli serve ...`` runs the same commands stand-alone.

``serve`` follows gunicorn/uvicorn conventions::

    sockshare serve [APP] --bind 127.0.0.1:8000 --bind unix:/run/app.sock --workers 4 \\
        --policy least-conn --max-conns 100 --queue 64 --metrics 127.0.0.1:9100

With neither ``APP`` nor ``--worker-cmd`` it serves the demo app
(``sockshare.server._demo:handle``) on 127.0.0.1:8000. ``--config FILE`` reads pools,
routes and listeners from TOML; flags given next to it override its top-level settings.
Every flag may also come from the environment (:func:`apply_environment`):
``SOCKSHARE_<FLAG>`` and ``SOCKSHARE_CMD_ARGS``; the command line wins over both.

``status`` asks a running dispatcher over its control socket and prints a table
(``rich`` if installed, plain text otherwise), ``--json`` for scripts, ``--watch`` to
refresh until interrupted. ``reload`` (a new generation of workers, like SIGHUP),
``upgrade`` (a new dispatcher process, like SIGUSR2), ``migrate --from WORKER
[--count N]`` (move live connections off a worker) and ``health [ready|drain|maint]``
(what the health agent answers; see ``_health``) talk to the same control socket.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import shlex
import sys
import time
from typing import Any

from sockshare.server._config import DEFAULT_APP, DEFAULT_BIND, POLICIES, ConfigError, from_args
from sockshare.server._control import (
    ControlError,
    describe_server,
    find_servers,
    request,
    runtime_dir,
)
from sockshare.server._drainwait import wait_retired
from sockshare.server._pidfile import pid_alive

__all__ = ["add_commands", "main", "render_status"]


def add_commands(subparsers: Any) -> None:
    """Register ``serve`` and ``status``."""
    p = subparsers.add_parser(
        "serve", help="run a dispatcher and its workers",
        description="Accept connections and hand each one to a worker process. Every flag "
                    "can also come from the environment: SOCKSHARE_<FLAG> (--max-conns: "
                    "SOCKSHARE_MAX_CONNS; repeatable flags comma-separated), and "
                    "SOCKSHARE_CMD_ARGS (flags as on a command line). Precedence: command "
                    "line > SOCKSHARE_CMD_ARGS > SOCKSHARE_<FLAG> > --config file > defaults.")
    _serve_flags(p)
    p.set_defaults(func=serve)

    s = subparsers.add_parser("status", help="show a running server's workers and counters")
    s.add_argument("--control", metavar="PATH", help="control socket (default: the only running server)")
    s.add_argument("--json", action="store_true", help="print the raw JSON status")
    s.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) until interrupted")
    s.set_defaults(func=status)

    r = subparsers.add_parser("reload", help="start a new generation of workers (like SIGHUP)",
                              description="Start new workers (the app is imported again; "
                                          "with --config, the file is read again first), move "
                                          "live connections to them, retire the old ones.")
    r.add_argument("--control", metavar="PATH", help="control socket (default: the only running server)")
    r.add_argument("--no-wait", action="store_true",
                   help="return at once instead of waiting for the old workers to be gone")
    r.set_defaults(func=reload)

    u = subparsers.add_parser("upgrade", help="replace the dispatcher process (like SIGUSR2)",
                              description="Start a new dispatcher with the listening sockets; it "
                                          "takes over once its workers are ready.")
    u.add_argument("--control", metavar="PATH", help="control socket (default: the only running server)")
    u.add_argument("--no-wait", action="store_true",
                   help="return at once instead of waiting for the old dispatcher to be gone")
    u.set_defaults(func=upgrade)

    m = subparsers.add_parser("migrate", help="move live connections off a worker",
                              description="Ask a worker to migrate its connections to the other "
                                          "workers of its pool.")
    m.add_argument("--from", dest="source", type=int, required=True, metavar="WORKER",
                   help="worker id (sockshare status, ID column)")
    m.add_argument("--count", type=int, metavar="N", help="how many (default: every one that can move)")
    m.add_argument("--control", metavar="PATH", help="control socket (default: the only running server)")
    m.add_argument("--no-wait", action="store_true", help="do not wait for the migrations to finish")
    m.set_defaults(func=migrate)

    st = subparsers.add_parser("stop", help="stop a running server gracefully (like SIGTERM)",
                               description="Stop accepting, let the workers finish within "
                                           "--grace, exit. On Windows, where there is no "
                                           "SIGTERM, this is how a server is stopped.")
    st.add_argument("--control", metavar="PATH", help="control socket (default: the only running server)")
    st.add_argument("--quick", action="store_true", help="like SIGQUIT: workers get 1 s, then are killed")
    st.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for it to exit")
    st.set_defaults(func=stop)

    h = subparsers.add_parser("health", help="print or set what the health agent answers",
                              description="Print the agent's line (ready N%%, drain, maint; exit "
                                          "status 0 when ready), or set it by hand: drain and "
                                          "maint hold until 'ready'. The server goes on serving "
                                          "whatever it is sent.")
    h.add_argument("state", nargs="?", choices=("ready", "drain", "maint"),
                   help="drain or maint by hand; ready: back to the computed state")
    h.add_argument("--control", metavar="PATH", help="control socket (default: the only running server)")
    h.set_defaults(func=health)


def _serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``serve`` (also read from the environment: :func:`apply_environment`)."""
    p.add_argument("app", nargs="?", help=f"module:callable, async def handle(conn) (default: {DEFAULT_APP})")
    p.add_argument("-b", "--bind", action="append", metavar="ADDR",
                   help=f"HOST:PORT, [v6]:PORT or unix:/path; repeatable (default: {DEFAULT_BIND})")
    p.add_argument("-w", "--workers", type=int, metavar="N", help="workers per pool (default: 2)")
    p.add_argument("--worker-cmd", metavar="CMD",
                   help="run this command as the worker (any language; see docs/server.md)")
    p.add_argument("--policy", metavar="P",
                   help=f"{', '.join(POLICIES)} or module:function (default: least-conn)")
    p.add_argument("--hash-key", metavar="FIELD", help="meta field for --policy hash-key (default: host)")
    p.add_argument("--max-conns", type=int, metavar="N", help="connections per worker (default: unlimited)")
    p.add_argument("--queue", type=int, metavar="N",
                   help="connections that may wait when every worker is full (default: 64)")
    p.add_argument("--queue-timeout", type=float, metavar="S",
                   help="seconds a queued connection may wait (default: 30)")
    p.add_argument("--sniff", action="store_true", help="read Host / TLS SNI before routing")
    p.add_argument("--sniff-timeout", type=float, metavar="S",
                   help="seconds a client has to send what the sniffer reads (default: 5)")
    p.add_argument("--sniff-max", type=int, metavar="N",
                   help="connections sniffed at once; past it new ones wait in the kernel's "
                        "accept queue (default: 512)")
    p.add_argument("--defer-accept", type=int, metavar="S",
                   help="TCP listeners (Linux): accept a connection once its first bytes came "
                        "(TCP_DEFER_ACCEPT), or after about S seconds if none did; for sniffing "
                        "listeners, whose clients speak first (default: 0, off)")
    p.add_argument("--accept-window", metavar="auto|off|USEC",
                   help="under load, let an accept burst grow this many microseconds before "
                        "accepting it (fewer wake-ups per connection); a lone connection is "
                        "accepted at once (default: auto, 300)")
    p.add_argument("--fd-reserve", type=int, metavar="N",
                   help="descriptors kept free for workers and the control socket: accepting "
                        "pauses past RLIMIT_NOFILE - N (default: 16 + 8 per worker)")
    p.add_argument("--proxy-protocol", choices=("off", "optional", "required"),
                   help="expect a PROXY v1/v2 header (default: off)")
    p.add_argument("--proxy-allow-from", metavar="CIDR,...",
                   help="sources whose PROXY header is believed, '*' for any; from others "
                        "'optional' passes it on as data, 'required' refuses (default: "
                        "127.0.0.0/8,::1)")
    p.add_argument("--backlog", type=int, metavar="N",
                   help="listen backlog of every listener (default: 1024)")
    p.add_argument("--pid-file", metavar="PATH",
                   help="write the server's pid there (the master's: the one to signal) "
                        "once the listeners are bound; removed on exit")
    p.add_argument("-u", "--user", metavar="USER",
                   help="run the workers as USER (name or uid; the dispatcher must be root)")
    p.add_argument("-g", "--group", metavar="GROUP",
                   help="run the workers as GROUP (default: USER's group)")
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration (pools, routes)")
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve Prometheus metrics at HOST:PORT/metrics (and readiness at /healthz)")
    p.add_argument("--agent", metavar="ADDR",
                   help="answer HAProxy agent-check at HOST:PORT: 'ready N%%', 'drain' or 'maint' "
                        "(docs/deploy.md)")
    p.add_argument("--control", metavar="PATH", help="control socket path (default: per-user runtime dir)")
    p.add_argument("--grace", type=float, metavar="S", help="seconds to finish on stop (default: 10)")
    p.add_argument("--max-retries", type=int, metavar="N",
                   help="re-dispatches of a returned handoff before giving up (default: 3)")
    p.add_argument("-t", "--timeout", type=float, metavar="S",
                   help="a worker that leaves a handoff unanswered S seconds is killed and "
                        "restarted, its handoffs go to other workers (default: 30; 0: never)")
    p.add_argument("--upgrade-probation", type=float, metavar="S",
                   help="on upgrade, the old dispatcher keeps serving beside the new one this "
                        "long (and until the new one answers with ready workers) before it "
                        "hands over; if the new one dies first, the old one goes on (default: 1)")
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"))
    p.add_argument("--resume", metavar="SPEC",
                   help="module:callable, async def resume(conn, state), for migrated connections "
                        "(default: resume beside the app's handler, if any; '-': none)")
    p.add_argument("--no-rebalance", action="store_true",
                   help="never move connections between workers to even out the load")
    p.add_argument("--dispatchers", type=int, metavar="N",
                   help="processes sharing the dispatcher's work: the dispatcher (supervision, "
                        "the books; it accepts only while no feeder does) and N-1 feeders that "
                        "accept and hand connections to every worker, least-conn over the "
                        "whole pool (default: 1; docs/server.md, 'Several dispatchers')")
    p.add_argument("--accept", choices=("dispatcher", "worker"), default=None,
                   help="who accepts new connections: the dispatcher, which hands each one to "
                        "a worker (default), or the workers themselves, on the listening "
                        "sockets they inherit (faster per new connection; no Host/SNI routing, "
                        "no PROXY parsing; docs/server.md, 'Accept modes')")
    p.add_argument("--no-direct-migration", action="store_true",
                   help="relay every migration through the dispatcher (default: a handler's "
                        "own migrate() goes straight to another worker)")
    _web_flags(p)


def _web_flags(p: argparse.ArgumentParser) -> None:
    """The flags of web apps (ASGI/WSGI), named as uvicorn and gunicorn name them."""
    g = p.add_argument_group("web apps (ASGI, WSGI; pip install 'sockshare[asgi]' or '[wsgi]')")
    g.add_argument("--interface", choices=("auto", "asgi", "wsgi", "handler"),
                   help="what APP is: auto tells them apart (default: auto)")
    g.add_argument("--threads", type=int, metavar="N", help="WSGI: threads per worker (default: 10)")
    g.add_argument("--http", choices=("auto", "h11", "httptools"),
                   help="HTTP/1.1 implementation (default: auto, httptools if installed)")
    g.add_argument("--ws", choices=("auto", "none", "websockets", "websockets-sansio", "wsproto"),
                   help="WebSocket implementation (default: auto)")
    g.add_argument("--loop", choices=("auto", "asyncio", "uvloop"),
                   help="the workers' event loop (default: auto, uvloop if installed)")
    g.add_argument("--lifespan", choices=("auto", "on", "off"), help="ASGI lifespan (default: auto)")
    g.add_argument("--ssl-certfile", metavar="FILE", help="TLS ends in the workers: certificate")
    g.add_argument("--ssl-keyfile", metavar="FILE", help="TLS private key")
    g.add_argument("--ssl-keyfile-password", metavar="PW", help="password of the private key")
    g.add_argument("--ssl-ca-certs", metavar="FILE", help="CA certificates to verify clients")
    g.add_argument("--ssl-cert-reqs", type=int, choices=(0, 1, 2),
                   help="client certificates: 0 none, 1 optional, 2 required (default: 0)")
    g.add_argument("--access-log", action="store_true", default=None,
                   help="log each request (gunicorn's combined format)")
    g.add_argument("--access-log-format", metavar="FMT",
                   help="access log format, gunicorn's atoms: %%(h)s %%(r)s %%(s)s %%(b)s ...")
    g.add_argument("--log-config", metavar="FILE",
                   help="logging configuration for the workers: dictConfig JSON or INI")
    g.add_argument("--max-requests", type=int, metavar="N",
                   help="replace a worker after N requests, without dropping a connection (0: never)")
    g.add_argument("--max-requests-jitter", type=int, metavar="N",
                   help="add a random 0..N to --max-requests per worker")
    g.add_argument("--limit-concurrency", type=int, metavar="N",
                   help="per worker: serve N connections at once; a request on one more gets 503")
    g.add_argument("--graceful-timeout", type=float, metavar="S", help="another name for --grace")
    g.add_argument("--root-path", metavar="PATH", help="ASGI root_path (app mounted below a prefix)")
    g.add_argument("--proxy-headers", action="store_true", default=None,
                   help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips")
    g.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="comma-separated addresses trusted for proxy headers (default: 127.0.0.1)")
    g.add_argument("--timeout-keep-alive", type=int, metavar="S",
                   help="seconds an idle keep-alive connection is kept (default: 5)")
    g.add_argument("--limit-header-size", type=int, metavar="BYTES",
                   help="largest request head; past it 431 (default: 65536)")
    g.add_argument("--ws-max-size", type=int, metavar="BYTES",
                   help="largest WebSocket message (default: 16 MiB)")
    g.add_argument("--ws-ping-interval", type=float, metavar="S",
                   help="seconds between keep-alive pings on a WebSocket (default: 20; 0: none)")
    g.add_argument("--ws-ping-timeout", type=float, metavar="S",
                   help="seconds a ping waits for its pong before the WebSocket is closed "
                        "(default: 20; 0: forever)")


# --- serve ----------------------------------------------------------------------------

#: SOCKSHARE_<FLAG> variables that are not flags (the workers' environment, upgrades)
_NOT_FLAGS = frozenset({"CHANNEL", "WORKER_ID", "POOL", "GENERATION", "WEB", "UPGRADE_FROM",
                        "UPGRADE_CONTROL", "CMD_ARGS"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class _EnvParser(argparse.ArgumentParser):
    """``serve``'s flags, for the environment: a mistake is a :class:`ConfigError`; for
    the ``SOCKSHARE_<FLAG>`` variables it names the variable (``SOCKSHARE_MAX_CONNS
    (--max-conns): invalid int value: 'x'``), not only the flag it stands for."""

    def error(self, message: str) -> Any:   # (argparse would exit)
        if self.prog == _FLAG_VARIABLES:
            for action in self._actions:
                name = "/".join(action.option_strings)
                if name and message.startswith(f"argument {name}: "):
                    raise ConfigError(f"{env_name(action)} ({name}): "
                                      f"{message.removeprefix(f'argument {name}: ')}")
        raise ConfigError(f"{self.prog}: {message}")


#: the ``prog`` of the parser of the ``SOCKSHARE_<FLAG>`` variables
_FLAG_VARIABLES = "SOCKSHARE_<FLAG>"


def _env_parser(prog: str) -> _EnvParser:
    p = _EnvParser(prog=prog, add_help=False, argument_default=argparse.SUPPRESS)
    _serve_flags(p)
    return p


def env_name(action: argparse.Action) -> str:
    """``SOCKSHARE_<FLAG>`` of a ``serve`` option: ``--max-conns`` -> ``SOCKSHARE_MAX_CONNS``."""
    if not action.option_strings:
        return f"SOCKSHARE_{action.dest.upper()}"
    longest = max(action.option_strings, key=len)
    return "SOCKSHARE_" + longest.lstrip("-").upper().replace("-", "_")


def environment_argv(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The ``SOCKSHARE_<FLAG>`` variables as command-line arguments (``SOCKSHARE_BIND=a,b``:
    ``--bind=a --bind=b``; a switch: 1/true/yes/on or 0/false/no/off)."""
    argv: list[str] = []
    app: list[str] = []
    for action in _env_parser("environment")._actions:
        name = env_name(action)
        if name not in environ or name.removeprefix("SOCKSHARE_") in _NOT_FLAGS:
            continue
        value = environ[name]
        if not action.option_strings:
            app = [value] if value else []
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:   # store_true
            v = value.strip().lower()
            if v not in _TRUE | _FALSE:
                raise ConfigError(f"{name}={value!r}: say 1/true/yes/on or 0/false/no/off")
            if v in _TRUE:
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            argv += [f"{flag}={v.strip()}" for v in value.split(",") if v.strip()]
        else:
            argv.append(f"{flag}={value}")
    return argv + app


def apply_environment(args: argparse.Namespace,
                      environ: dict[str, str] | os._Environ[str] | None = None) -> argparse.Namespace:
    """Fill the flags not given on the command line from the environment:
    ``SOCKSHARE_CMD_ARGS`` (parsed like a command line, as gunicorn's GUNICORN_CMD_ARGS),
    then ``SOCKSHARE_<FLAG>``. A flag is "not given" when it is None (False for a switch;
    a 0 is given: ``--ws-ping-interval 0`` is not replaced, although ``0 == False``)."""
    env = os.environ if environ is None else environ
    layers = [("SOCKSHARE_CMD_ARGS", vars(_env_parser("SOCKSHARE_CMD_ARGS").parse_args(
                  shlex.split(env.get("SOCKSHARE_CMD_ARGS", ""))))),
              ("", vars(_env_parser(_FLAG_VARIABLES).parse_args(environment_argv(env))))]
    #: the settings the environment gave: flag dest -> "VARIABLE=value" (error messages)
    from_env: dict[str, str] = {}
    for variable, layer in layers:
        for key, value in layer.items():
            current = getattr(args, key, None)
            if value is not None and (current is None or current is False):
                setattr(args, key, value)
                name = variable or f"SOCKSHARE_{key.upper()}"
                from_env[key] = f"{name}={env.get(name, value)}"
    args.from_environment = from_env
    return args


def _env_hint(args: argparse.Namespace, message: str) -> str:
    """A configuration error's message, naming the environment variable that gave the
    setting it is about (docs/server.md: a bad value names the variable), or every
    variable in play when it cannot tell which."""
    given: dict[str, str] = getattr(args, "from_environment", {}) or {}
    if not given:
        return message
    words = message.replace("-", "_").lower()
    named = [v for k, v in given.items() if k.lower() in words]
    if named:
        return f"{message} ({'; '.join(named)}, from the environment)"
    return f"{message} (also set from the environment: {'; '.join(given.values())})"


def serve(args: argparse.Namespace) -> int:
    from sockshare.server._master import ENV_MASTER, Master

    try:
        cfg = from_args(apply_environment(args))
    except ConfigError as exc:
        print(f"sockshare serve: {_env_hint(args, str(exc))}", file=sys.stderr)
        return 2
    # the process started is the master (docs/server.md, "The stable process"); it runs
    # the dispatcher generations: the same command line, with SOCKSHARE_MASTER set
    # (Windows: no master; the dispatcher is the process started, docs/windows.md)
    role = "dispatcher" if os.environ.get(ENV_MASTER) or sys.platform == "win32" else "master"
    level = getattr(logging, cfg.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s")
    if role == "master":
        return Master([sys.executable, *sys.orig_argv[1:]], grace=cfg.grace).run()
    from sockshare.server._dispatcher import Dispatcher
    from sockshare.server._platform import run

    try:
        reread = (lambda: from_args(args)) if args.config else None
        return run(Dispatcher(cfg, reconfigure=reread).run())
    except KeyboardInterrupt:
        return 130


# --- status ---------------------------------------------------------------------------


def _pick_control(path: str | None) -> str:
    """``--control``, else the only live server in the runtime directory (sockets left
    by dead servers are removed on the way); several: say which and how to pick one."""
    if path:
        return path
    found = find_servers()
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError("no running sockshare server found in "
                           f"{_runtime_dir_text()}; give --control PATH")
    lines = "\n".join(f"  {describe_server(p)}" for p in found)
    raise ControlError(f"{len(found)} sockshare servers are running; pick one with "
                       f"--control PATH:\n{lines}")


def _runtime_dir_text() -> str:
    try:
        return runtime_dir()
    except ControlError as exc:
        return f"the runtime directory ({exc})"


def _fmt_age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


_COLUMNS = ("ID", "POOL", "PID", "GEN", "STATE", "CONNS", "INFLIGHT", "HANDOFFS", "RATE/S",
            "REJECTS", "RESTARTS", "LOST", "MIG IN", "MIG OUT")


def _rows(st: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(str(w["id"]), w["pool"], str(w["pid"] or "-"), str(w["generation"]), w["state"],
             str(w["connections"]), str(w["inflight"]), str(w["handoffs"]), f"{w['rate']:.1f}",
             str(w["rejects"]), str(w["restarts"]), str(w["lost"]), str(w.get("migrated_in", 0)),
             str(w.get("migrated_out", 0))) for w in st["workers"]]


def _summary(st: dict[str, Any]) -> list[str]:
    c = st["counters"]
    rate = sum(w["rate"] for w in st["workers"])
    queues = ", ".join(f"{p['name']} {p['queue']}/{p['queue_limit']}" for p in st["pools"])
    listeners = ", ".join(f"{lst['name']}={lst['address']}" for lst in st["listeners"])
    refused = c["refused"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(c["refused_by_reason"].items()))
    lat = st.get("migration_latency") or {}
    master = f" (master; dispatcher pid {st['dispatcher']})" if st.get("master") else ""
    return [
        f"sockshare pid {st['pid']}{master}  up {_fmt_age(st['uptime'])}"
        f"{'  STOPPING' if st.get('stopping') else ''}  listening: {listeners}",
        f"accepted {c['accepted']}  handoffs {c['handoffs']} ({rate:.1f}/s)  rejects {c['rejects']}"
        f"  re-dispatched {c['redispatches']}  refused {refused}{f' ({reasons})' if reasons else ''}"
        f"  lost {c['lost']}  hung killed {c.get('hung_kills', 0)}  queue {queues}",
        f"generation {st.get('generation', 1)}  reloads {c.get('reloads', 0)}"
        f" (failed {c.get('reload_failures', 0)})  upgrades {c.get('upgrades', 0)}"
        f" (failed {c.get('upgrade_failures', 0)})  migrations {c.get('migrations', 0)}"
        f" (direct {c.get('migrations_direct', 0)}, refused {c.get('migrations_refused', 0)},"
        f" closed {c.get('migrations_closed', 0)})"
        f"  latency p50 {lat.get('p50_ms', 0):.3f} ms p99 {lat.get('p99_ms', 0):.3f} ms"
        f"  rebalances {c.get('rebalances', 0)}",
        *_dispatchers_line(st),
    ]


def _dispatchers_line(st: dict[str, Any]) -> list[str]:
    """``--dispatchers N``: one line, each dispatcher process's share."""
    ds = st.get("dispatchers")
    if not ds:
        return []
    parts = []
    for d in ds:
        name = "lead" if d["role"] == "lead" else f"feeder {d['id']}"
        state = "accepting" if d.get("accepting") else ("books" if d["role"] == "lead" else "down"
                                                         if not d.get("up") else "idle")
        parts.append(f"{name} pid {d.get('pid') or '-'} ({state}) handoffs {d.get('handoffs', 0)}"
                     f" cpu {d.get('cpu', 0):.1f}s")
    return ["dispatchers: " + "; ".join(parts)]


def render_status(st: dict[str, Any]) -> str:
    """The plain-text table (used when ``rich`` is not installed)."""
    rows = [_COLUMNS, *_rows(st)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = [*_summary(st), ""]
    for r in rows:
        lines.append("  ".join(cell.rjust(widths[i]) if i not in (1, 4) else cell.ljust(widths[i])
                               for i, cell in enumerate(r)).rstrip())
    return "\n".join(lines) + "\n"


def _render_rich(st: dict[str, Any]) -> str | None:
    try:
        console_mod: Any = importlib.import_module("rich.console")
        table_mod: Any = importlib.import_module("rich.table")
    except ImportError:
        return None
    buf = io.StringIO()
    console = console_mod.Console(file=buf, force_terminal=sys.stdout.isatty(), width=120)
    for line in _summary(st):
        console.print(line, highlight=False)
    table = table_mod.Table(show_edge=False)
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col in ("POOL", "STATE") else "right")
    for r in _rows(st):
        table.add_row(*r)
    console.print(table)
    return buf.getvalue()


def status(args: argparse.Namespace) -> int:
    try:
        path = _pick_control(args.control)
    except ControlError as exc:
        print(f"sockshare status: {exc}", file=sys.stderr)
        return 1
    try:
        while True:
            try:
                resp = request(path, {"cmd": "status"})
            except (ControlError, OSError, ValueError) as exc:
                print(f"sockshare status: {exc}", file=sys.stderr)
                return 1
            if not resp.get("ok"):
                print(f"sockshare status: {resp.get('error')}", file=sys.stderr)
                return 1
            st = resp["status"]
            text = (json.dumps(st, indent=2) + "\n") if args.json else (
                _render_rich(st) or render_status(st))
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
            sys.stdout.write(text)
            sys.stdout.flush()
            if not args.watch:
                return 0
            time.sleep(max(0.1, args.watch))
    except KeyboardInterrupt:
        return 0


def _command(name: str, args: argparse.Namespace, req: dict[str, Any],
             timeout: float) -> dict[str, Any] | None:
    try:
        path = _pick_control(args.control)
        resp = request(path, req, timeout=timeout)
    except (ControlError, OSError, ValueError) as exc:
        print(f"sockshare {name}: {exc}", file=sys.stderr)
        return None
    if not resp.get("ok"):
        print(f"sockshare {name}: {resp.get('error')}", file=sys.stderr)
        return None
    return resp


def _status_of(path: str) -> dict[str, Any]:
    resp = request(path, {"cmd": "status"}, timeout=10.0)
    if not resp.get("ok"):
        raise ControlError(str(resp.get("error")))
    st: dict[str, Any] = resp["status"]
    return st


def reload(args: argparse.Namespace) -> int:
    """Done (by default) once the new generation serves *and* the old workers exited:
    their connections moved or closed (``_drainwait``)."""
    if args.no_wait:
        resp = _command("reload", args, {"cmd": "reload", "wait": False}, 60.0)
        if resp is None:
            return 1
        print(f"reload requested (#{resp['queued']})")
        return 0
    try:
        path = _pick_control(args.control)
        before = _status_of(path)
    except (ControlError, OSError, ValueError) as exc:
        print(f"sockshare reload: {exc}", file=sys.stderr)
        return 1
    resp = _command("reload", args, {"cmd": "reload", "wait": True}, 60.0)
    if resp is None:
        return 1
    print(f"reloaded: generation {resp.get('generation')} serving; waiting for the old "
          f"workers to finish", flush=True)
    try:
        outcome = wait_retired(lambda: _status_of(path), before, _status_of(path))
    except (ControlError, OSError, ValueError) as exc:
        print(f"sockshare reload: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sockshare reload: interrupted; the old workers go on draining", file=sys.stderr)
        return 130
    print(f"old workers gone: {outcome}")
    return 0



def upgrade(args: argparse.Namespace) -> int:
    """Done (by default) once the new dispatcher took over *and* the old one exited:
    its workers' connections moved to the new dispatcher's workers or closed."""
    old_pid = 0
    if not args.no_wait:
        try:
            st = _status_of(_pick_control(args.control))
            # the dispatcher that hands over (under a master, "pid" is the master's)
            old_pid = int(st.get("dispatcher") or st.get("pid") or 0)
        except (ControlError, OSError, ValueError) as exc:
            print(f"sockshare upgrade: {exc}", file=sys.stderr)
            return 1
    resp = _command("upgrade", args, {"cmd": "upgrade", "wait": not args.no_wait}, 60.0)
    if resp is None:
        return 1
    print(f"new dispatcher pid {resp['pid']}: {resp.get('state')}", flush=True)
    if args.no_wait or not old_pid or old_pid == resp.get("pid") or resp.get("state") != "handed over":
        return 0
    started = time.monotonic()
    try:
        while pid_alive(old_pid):
            time.sleep(0.1)
    except KeyboardInterrupt:
        print(f"sockshare upgrade: interrupted; the old dispatcher (pid {old_pid}) goes on "
              f"draining", file=sys.stderr)
        return 130
    print(f"old dispatcher (pid {old_pid}) gone after {time.monotonic() - started:.1f} s")
    return 0


def migrate(args: argparse.Namespace) -> int:
    """Done (by default) once every connection the worker flagged moved or was refused
    (it stays where it was: no worker had room), or none moved for 10 s."""
    req = {"cmd": "migrate", "from": args.source, "count": args.count, "wait": not args.no_wait}
    resp = _command("migrate", args, req, 600.0)
    if resp is None:
        return 1
    print(f"worker {resp['worker']}: {resp['flagged']} connection(s) asked to move, "
          f"{resp['migrated']} migrated"
          + (f", {resp['refused']} refused (they stay)" if resp.get("refused") else ""))
    return 0


def stop(args: argparse.Namespace) -> int:
    """Ask for a graceful stop; by default wait until the server's pid is gone."""
    resp = _command("stop", args, {"cmd": "stop", "quick": bool(args.quick)}, 10.0)
    if resp is None:
        return 1
    pid = int(resp.get("dispatcher") or resp.get("pid") or 0)
    print(f"stopping pid {pid}", flush=True)
    if args.no_wait or not pid:
        return 0
    try:
        while pid_alive(pid):
            time.sleep(0.1)
    except KeyboardInterrupt:
        return 130
    print("stopped")
    return 0


def health(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "health"}
    if args.state:
        req["set"] = args.state
    resp = _command("health", args, req, 10.0)
    if resp is None:
        return 1
    print(resp["line"])
    return 0 if str(resp["line"]).startswith("ready") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sockshare.server._cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
