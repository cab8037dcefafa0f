"""Benchmark: web clients through reloads, sockshare against gunicorn and uvicorn.

Run:  python benchmarks/web_reload.py [--keepalive 20] [--websockets 10] [--reloads 20]
                                      [--grace 2] [--plot benchmarks/results/web_reload.png]
      (also: --only NAME..., --src DIR to run sockshare from another source tree,
      --logs DIR to keep the servers' logs)

The same Starlette app (benchmarks/reload_app.py) with 2 workers under

* ``sockshare`` -- ``sockshare serve reload_app:app --interface asgi --workers 2 --grace G``;
  a reload is ``sockshare reload --control PATH``, which returns once the new workers
  serve (the next reload waits for it);
* ``gunicorn``  -- ``gunicorn -k uvicorn_worker.UvicornWorker -w 2 --graceful-timeout G``;
  a reload is SIGHUP to the master (new workers, the old ones stopped gracefully);
* ``uvicorn``   -- ``uvicorn --workers 2 --timeout-graceful-shutdown G``; a reload is
  SIGHUP to the parent, which (uvicorn 0.55 checked; the benchmark says so when the
  installed one has no SIGHUP handler) replaces the workers one after the other: a new
  one starts, and once it is ready the old one gets SIGTERM and is waited for, in the
  parent's main loop, so SIGHUPs that come meanwhile wait their turn.

For gunicorn and uvicorn nothing says when a reload is over: the benchmark waits a fixed
``--reload-wait`` and checks that a new worker process appeared ("reloads seen").

One load phase per server, with, all the time:

* ``--keepalive`` K HTTP clients (``http.client``, one connection each, ``GET /pid`` in a
  loop, never reconnecting on their own): an error or a non-200 answer is a failed
  request; a connection the server reset or closed (an error on it, or an answer with
  ``Connection: close``) is counted, and the client reconnects so the run goes on;
* ``--websockets`` W WebSockets to ``/count``, which opts in to migration: the messages
  are numbered by the server, ``--depth`` of them in flight; any gap, reorder, error or
  close is a drop (then the client reconnects);
* W WebSockets to ``/echo``, a plain echo that does not opt in: on sockshare these stay on
  their old worker until ``--grace`` ends and are then closed with code 1012 (service
  restart), which is expected and counted apart from other drops.

During the phase, ``--reloads`` reloads, ``--spacing`` (0.5-1 s, random) apart; after the
last one, the phase goes on for grace + 1 s so that what it does is counted. Reported per
server: the reloads seen, the time of the phase (from the first reload until every client
has stopped: a client waiting on an answer finishes that exchange first), requests done, failed requests,
keep-alive connections reset/closed, WebSockets dropped (opted-in, plain: closed with 1012,
plain: other). The targets for sockshare: 0 failed requests, 0 resets and 0 dropped
opted-in WebSockets.

Prints a Markdown table, writes benchmarks/results/web_reload.json and, with ``--plot``, a
PNG (matplotlib, Agg). Servers run one at a time; all on 127.0.0.1. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.asgi import (  # noqa: E402
    Options,
    Running,
    _env,
    _git_describe,
    _spawn,
    _versions,
    descendants,
    free_port,
    write_result,
)

WORKERS = 2
SERVERS = ("sockshare", "gunicorn", "uvicorn")
NEEDS = {"sockshare": "uvicorn", "gunicorn": "uvicorn_worker", "uvicorn": "uvicorn"}
COLORS = {"sockshare": "#2b6cb0", "uvicorn": "#718096", "gunicorn": "#38a169"}
APP = "reload_app:app"


# --- servers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the starters and reloaders need."""

    opts: Options
    grace: float
    reload_wait: float


def _control(s: Settings) -> Path:
    return s.opts.tmp / "ctl" / "serve.ctl"


def start_sockshare(s: Settings) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "sockshare.server._cli", "serve", APP, "--interface", "asgi",
            "--workers", str(WORKERS), "--bind", f"127.0.0.1:{port}", "--control",
            str(_control(s)), "--loop", s.opts.loop, "--log-level", "info",
            "--grace", f"{s.grace:g}"]
    return _spawn("sockshare", port, argv, _env(HERE, s.opts.src), s.opts)


def start_gunicorn(s: Settings) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker",
            "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--graceful-timeout",
            f"{s.grace:g}", "--log-level", "info", APP]
    return _spawn("gunicorn", port, argv, _env(HERE), s.opts)


def start_uvicorn(s: Settings) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", APP, "--workers", str(WORKERS), "--host",
            "127.0.0.1", "--port", str(port), "--loop", s.opts.loop,
            "--timeout-graceful-shutdown", f"{max(1, round(s.grace))}", "--no-access-log",
            "--log-level", "info"]
    return _spawn("uvicorn", port, argv, _env(HERE), s.opts)


STARTERS: dict[str, Callable[[Settings], Running]] = {
    "sockshare": start_sockshare, "gunicorn": start_gunicorn, "uvicorn": start_uvicorn,
}


@dataclass
class Reload:
    """One reload: how long it took (for sockshare, until the new workers served; for
    the others, the fixed wait), whether a new worker process appeared, any error."""

    seconds: float
    seen: bool
    error: str | None = None


def _new_worker(srv: Running, before: set[int]) -> bool:
    return bool(set(descendants(srv.proc.pid)) - before)


def reload(name: str, srv: Running, s: Settings) -> Reload:
    before = set(descendants(srv.proc.pid))
    t0 = time.monotonic()
    if name == "sockshare":
        done = subprocess.run([sys.executable, "-m", "sockshare.server._cli", "reload",
                               "--control", str(_control(s))], capture_output=True, text=True,
                              env=_env(s.opts.src), timeout=90, check=False)
        took = time.monotonic() - t0
        error = None if done.returncode == 0 else (done.stderr or done.stdout).strip()
        return Reload(took, _new_worker(srv, before), error)
    srv.proc.send_signal(signal.SIGHUP)
    time.sleep(s.reload_wait)
    return Reload(time.monotonic() - t0, _new_worker(srv, before))


# --- clients --------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients of one phase saw (each field is written by many threads, under
    ``lock``)."""

    requests: int = 0
    failed: int = 0
    resets: int = 0
    ws_messages: int = 0
    count_drops: Counter[str] = field(default_factory=Counter)
    echo_drops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    pids: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


#: errors on a keep-alive connection that mean the server reset or closed it
_CLOSED = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead,
           http.client.BadStatusLine)


class Clients:
    """The phase's K keep-alive clients and 2 W WebSocket clients, one thread each."""

    def __init__(self, port: int, keepalive: int, websockets: int, depth: int,
                 pause: float) -> None:
        self.port = port
        self.depth = depth
        self.pause = pause
        self.tally = Tally()
        self.stop = threading.Event()
        self.ready: set[str] = set()
        self.threads = [threading.Thread(target=self._keepalive, args=(f"ka{i}",), daemon=True)
                        for i in range(keepalive)]
        for kind in ("count", "echo"):
            self.threads += [threading.Thread(target=self._websocket, args=(kind, f"{kind}{i}"),
                                              daemon=True) for i in range(websockets)]
        for t in self.threads:
            t.start()

    def all_ready(self) -> bool:
        with self.tally.lock:
            return len(self.ready) == len(self.threads)

    def _first(self, who: str) -> None:
        if who not in self.ready:
            with self.tally.lock:
                self.ready.add(who)

    def _keepalive(self, who: str) -> None:
        t = self.tally
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        local: int | None = None
        while not self.stop.is_set():
            try:
                conn.request("GET", "/pid")
                r = conn.getresponse()
                body = r.read()
                if conn.sock is None:        # the answer said Connection: close
                    with t.lock:
                        t.resets += 1
                        t.errors["keep-alive: answer with Connection: close"] += 1
                    local = None
                else:
                    port = conn.sock.getsockname()[1]
                    if local is not None and port != local:   # cannot happen: checked anyway
                        with t.lock:
                            t.resets += 1
                            t.errors["keep-alive: reconnected"] += 1
                    local = port
                with t.lock:
                    if r.status == 200:
                        t.requests += 1
                        t.pids.add(int(body))
                    else:
                        t.failed += 1
                        t.errors[f"keep-alive: HTTP {r.status}"] += 1
                self._first(who)
            except Exception as exc:
                with t.lock:
                    t.failed += 1
                    if isinstance(exc, _CLOSED):
                        t.resets += 1
                    t.errors[f"keep-alive: {type(exc).__name__}"] += 1
                conn.close()
                local = None
                time.sleep(0.05)
            time.sleep(self.pause)
        conn.close()

    def _websocket(self, kind: str, who: str) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        t = self.tally
        drops = t.count_drops if kind == "count" else t.echo_drops
        url = f"ws://127.0.0.1:{self.port}/{kind}"
        while not self.stop.is_set():
            connected = False
            try:
                with connect(url, open_timeout=10) as ws:
                    connected = True
                    sent = seen = 0
                    while not self.stop.is_set():
                        while sent - seen < self.depth:
                            sent += 1
                            ws.send(f"m{sent}")
                        words = str(ws.recv(timeout=10)).split()
                        seen += 1
                        ok = (len(words) == 3 and words[0] == str(seen) and words[2] == f"m{seen}"
                              if kind == "count" else len(words) == 2 and words[1] == f"m{seen}")
                        if not ok:
                            with t.lock:
                                drops["gap or reorder"] += 1
                            break
                        with t.lock:
                            t.ws_messages += 1
                        self._first(who)
                        time.sleep(self.pause)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                with t.lock:
                    drops[f"closed {code}" if code is not None else "closed, no close frame"] += 1
            except Exception as exc:
                with t.lock:
                    if connected:
                        drops[type(exc).__name__] += 1
                    else:
                        t.errors[f"{kind}: connect {type(exc).__name__}"] += 1
                if not connected:
                    time.sleep(0.1)

    def finish(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(20)


# --- one phase ------------------------------------------------------------------------


@dataclass
class Phase:
    """One server's phase, as reported."""

    name: str
    seconds: float
    reloads: list[Reload]
    tally: Tally
    status: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        t = self.tally
        return {
            "reloads": len(self.reloads),
            "reloads_seen": sum(r.seen for r in self.reloads),
            "reload_errors": [r.error for r in self.reloads if r.error],
            "reload_seconds_mean": (sum(r.seconds for r in self.reloads) / len(self.reloads)
                                    if self.reloads else 0.0),
            "phase_seconds": self.seconds,
            "requests": t.requests, "failed": t.failed, "resets": t.resets,
            "ws_messages": t.ws_messages,
            "opted_in_dropped": sum(t.count_drops.values()),
            "opted_in_drops": dict(t.count_drops),
            "plain_closed_1012": t.echo_drops["closed 1012"],
            "plain_dropped_other": sum(v for k, v in t.echo_drops.items() if k != "closed 1012"),
            "plain_drops": dict(t.echo_drops),
            "errors": dict(t.errors),
            "worker_pids_seen": len(t.pids),
            "sockshare_counters": (self.status or {}).get("counters"),
        }


def _sockshare_status(s: Settings) -> dict[str, Any] | None:
    done = subprocess.run([sys.executable, "-m", "sockshare.server._cli", "status", "--json",
                           "--control", str(_control(s))], capture_output=True, text=True,
                          env=_env(s.opts.src), timeout=30, check=False)
    try:
        st: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return None
    return st


def run_phase(name: str, s: Settings, args: argparse.Namespace, rng: random.Random) -> Phase:
    srv = STARTERS[name](s)
    try:
        srv.wait_ready(WORKERS)
        print(f"{name}: on :{srv.port} (pid {srv.proc.pid}, workers {srv.workers})",
              file=sys.stderr)
        clients = Clients(srv.port, args.keepalive, args.websockets, args.depth, args.pause)
        deadline = time.monotonic() + 30
        while not clients.all_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not clients.all_ready():
            print(f"{name}: not every client got an answer within 30 s", file=sys.stderr)
        reloads: list[Reload] = []
        t0 = time.monotonic()
        try:
            for i in range(args.reloads):
                r = reload(name, srv, s)
                reloads.append(r)
                print(f"{name}: reload {i + 1}/{args.reloads} {r.seconds:.2f} s"
                      f"{'' if r.seen else ' (no new worker seen)'}"
                      f"{f' ERROR {r.error}' if r.error else ''}", file=sys.stderr)
                time.sleep(rng.uniform(*args.spacing))
            time.sleep(s.grace + 1.0)
        finally:
            clients.finish()
        seconds = time.monotonic() - t0
        status = _sockshare_status(s) if name == "sockshare" else None
    finally:
        srv.close()
    return Phase(name, seconds, reloads, clients.tally, status)


# --- results --------------------------------------------------------------------------

COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("reloads seen", lambda r: f"{r['reloads_seen']}/{r['reloads']}"),
    ("phase s", lambda r: f"{r['phase_seconds']:.1f}"),
    ("requests", lambda r: f"{r['requests']:,}"),
    ("failed requests", lambda r: str(r["failed"])),
    ("keep-alive resets/closes", lambda r: str(r["resets"])),
    ("opted-in WS dropped", lambda r: str(r["opted_in_dropped"])),
    ("plain WS closed 1012", lambda r: str(r["plain_closed_1012"])),
    ("plain WS other drops", lambda r: str(r["plain_dropped_other"])),
    ("WS messages", lambda r: f"{r['ws_messages']:,}"),
]


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    head = ["server", *(c for c, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in rows.items():
        lines.append("| " + " | ".join([n, *(f(r) for _, f in COLUMNS)]) + " |")
    return "\n".join(lines)


def target(rows: dict[str, dict[str, Any]]) -> str | None:
    r = rows.get("sockshare")
    if r is None:
        return None
    met = r["failed"] == 0 and r["resets"] == 0 and r["opted_in_dropped"] == 0
    return (f"sockshare: {r['failed']} failed requests, {r['resets']} resets, "
            f"{r['opted_in_dropped']} opted-in WebSockets dropped (target 0, 0, 0): "
            f"{'met' if met else 'MISSED'}")


FAILURES = [("failed requests", "failed", ""), ("keep-alive resets/closes", "resets", ""),
            ("opted-in WS dropped", "opted_in_dropped", ""),
            ("plain WS other drops", "plain_dropped_other", ""),
            ("plain WS closed 1012", "plain_closed_1012", "//")]


def plot(rows: dict[str, dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(11, 5.4))
    fig.suptitle(f"Failures through {args.reloads} reloads ({WORKERS} workers, grace "
                 f"{args.grace:g} s): {args.keepalive} keep-alive HTTP clients, "
                 f"{args.websockets} opted-in + {args.websockets} plain WebSockets",
                 fontsize=10)
    width = 0.8 / len(FAILURES)
    shades = ["#c53030", "#dd6b20", "#6b46c1", "#975a16", "#a0aec0"]
    for j, (label, key, hatch) in enumerate(FAILURES):
        xs = [i + (j - (len(FAILURES) - 1) / 2) * width for i in range(len(names))]
        vals = [rows[n][key] for n in names]
        ax.bar(xs, vals, width, color=shades[j], hatch=hatch, edgecolor="#333", label=label)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)),
                  [f"{n}\n{rows[n]['requests']:,} requests, {rows[n]['phase_seconds']:.0f} s"
                   for n in names])
    ax.set_ylabel("count over the phase")
    ax.set_title("hatched: plain WebSockets closed with 1012 (expected on sockshare after "
                 "the grace time)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.text(0.995, 0.005, f"sockshare code: {args.code}; Python {platform.python_version()}; "
             f"{_versions()}; benchmarks/web_reload.py", ha="right", va="bottom", fontsize=7,
             color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver ---------------------------------------------------------------------------


def _spacing(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    a, b = float(lo), float(hi or lo)
    if not 0 <= a <= b <= 60:
        raise argparse.ArgumentTypeError("LO-HI seconds, 0 <= LO <= HI <= 60")
    return a, b


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--keepalive", type=int, default=20, metavar="K",
                    help="keep-alive HTTP clients (default 20)")
    ap.add_argument("--websockets", type=int, default=10, metavar="W",
                    help="WebSockets of each kind, opted-in and plain (default 10)")
    ap.add_argument("--reloads", type=int, default=20, help="reloads per server (default 20)")
    ap.add_argument("--spacing", type=_spacing, default=(0.5, 1.0), metavar="LO-HI",
                    help="seconds between reloads, random in LO-HI (default 0.5-1)")
    ap.add_argument("--grace", type=float, default=2.0,
                    help="sockshare --grace, gunicorn --graceful-timeout, uvicorn "
                         "--timeout-graceful-shutdown (rounded) (default 2)")
    ap.add_argument("--reload-wait", type=float, default=1.0,
                    help="gunicorn, uvicorn: seconds after SIGHUP before checking that a new "
                         "worker appeared (default 1)")
    ap.add_argument("--depth", type=int, default=4,
                    help="messages in flight on each WebSocket (default 4)")
    ap.add_argument("--pause", type=float, default=0.02,
                    help="seconds each client waits between requests/messages (default 0.02)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="the servers' event loop (default uvloop)")
    ap.add_argument("--only", nargs="+", choices=SERVERS, default=list(SERVERS))
    ap.add_argument("--seed", type=int, default=None, help="seed of the reload spacing")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="write a PNG (needs matplotlib), e.g. benchmarks/results/web_reload.png")
    ap.add_argument("--logs", default=None, metavar="DIR",
                    help="copy the servers' logs to DIR (default: dropped)")
    ap.add_argument("--src", default=str(ROOT / "src"),
                    help="the sockshare source tree to run (default: this checkout's src)")
    ap.add_argument("--src-label", default=None,
                    help="what --src is, for the JSON and the plot (default: git HEAD of --src)")
    args = ap.parse_args()
    if not (0 <= args.keepalive <= 1000 and 0 <= args.websockets <= 1000
            and 0 <= args.reloads <= 1000 and args.grace > 0 and args.reload_wait >= 0
            and 1 <= args.depth <= 64 and args.pause >= 0):
        ap.error("--keepalive/--websockets/--reloads 0..1000, --grace > 0, --depth 1..64")
    src = Path(args.src).resolve()
    if not (src / "sockshare" / "server" / "_wsmove.py").exists():
        ap.error(f"--src {src}: not a sockshare source tree with WebSocket migration")
    args.code = args.src_label or _git_describe(src) or str(src)
    names = []
    for n in SERVERS:
        if n not in args.only:
            continue
        if importlib.util.find_spec(NEEDS[n]) is None:
            print(f"skipping {n}: {NEEDS[n]} is not installed", file=sys.stderr)
            continue
        names.append(n)
    if "uvicorn" in names:
        from uvicorn.supervisors.multiprocess import Multiprocess

        if not hasattr(Multiprocess, "handle_hup"):
            print("this uvicorn has no SIGHUP handler: its reloads measure what SIGHUP does "
                  "to it", file=sys.stderr)
    for mod in ("starlette", "websockets"):
        if importlib.util.find_spec(mod) is None:
            print(f"{mod} is not installed: pip install 'sockshare[asgi]' starlette",
                  file=sys.stderr)
            return 2
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ss-reload-bench-"))
    settings = Settings(Options(src, args.loop, tmp), args.grace, args.reload_wait)
    rows: dict[str, dict[str, Any]] = {}
    try:
        for n in names:
            rows[n] = run_phase(n, settings, args, rng).row()
            print(f"{n}: {json.dumps(rows[n], default=str)}", file=sys.stderr)
    finally:
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, Path(args.logs) / log.name)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(markdown(rows))
    line = target(rows)
    if line:
        print(line)
    for n, r in rows.items():
        print(f"{n}: opted-in drops {r['opted_in_drops'] or '-'}; plain drops "
              f"{r['plain_drops'] or '-'}; client errors {r['errors'] or '-'}")
    result = {
        "keepalive": args.keepalive, "websockets": args.websockets, "reloads": args.reloads,
        "spacing": args.spacing, "grace": args.grace, "reload_wait": args.reload_wait,
        "depth": args.depth, "pause": args.pause, "loop": args.loop, "workers": WORKERS,
        "cores": os.cpu_count(), "python": platform.python_version(), "versions": _versions(),
        "src": str(src), "code": args.code, "kernel": platform.release(),
        "loadavg_end": os.getloadavg(), "servers": rows,
    }
    write_result("web_reload", result, args.plot, lambda path: plot(rows, path, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
