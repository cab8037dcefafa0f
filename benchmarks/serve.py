"""Benchmark: ``sockshare serve`` against the usual ways to spread connections on 2 workers.

Run:  python benchmarks/serve.py [--conns 20000] [--runs 7] [--concurrency 32]
                                 [--plot docs/serve-benchmark.png]
      (also: --policy P for the sockshare pool, --node-server http, --src DIR to
      benchmark another sockshare source tree, e.g. an exported commit, --only ...;
      --sniff: the sockshare listeners sniff the HTTP Host; --base-src DIR adds
      configuration "base", another tree in the same rounds (before/after); --only pure
      adds this tree with SOCKSHARE_PURE_PYTHON=1, its pure-Python hot paths;
      --only c-dispatcher adds the floor: benchmarks/c/dispatcher.c, the dispatcher's job
      in plain C for the same Python workers; --only c-linger the same program waiting
      --c-linger microseconds (default 300) before each accept burst;
      --only sockshare-window adds this tree with its accept window on (--accept-window
      auto|USEC, default auto; ``sockshare`` and ``pure`` run with it off), pure-window
      the same on the pure-Python hot paths; sockshare-defer and pure-defer: those two
      with --defer-accept S on the listener too (TCP_DEFER_ACCEPT: accept once the
      request came; --defer-accept S, default 1), meant for --sniff;
      --dispatchers N [N ...]: one configuration more per N, ``sockshare-Nd``, the same
      server with ``--dispatchers N``: the lead and N-1 feeders, each one's CPU per
      connection shown; the JSON and PNG are then serve-dispatchers.json and
      docs/serve-dispatchers.png)

What it measures: short connections (connect, one small HTTP request, the response, the
server closes) to 127.0.0.1, through four configurations with 2 workers each, all
started once and measured in one run, interleaved run by run (the order rotates each
round, so no configuration always goes first on a noisy machine):

* ``sockshare``  -- ``sockshare serve serve_app:handle --workers 2`` (default policy
  ``least-conn``; ``--policy`` to change it): the dispatcher
  accepts and hands each connection to a Python worker over its channel (SCM_RIGHTS,
  acked); the app (benchmarks/serve_app.py) reads the request head, writes a fixed
  response with ``X-Worker: <pid>``, closes;
* ``sockshare-window`` (only with ``--only``) -- the same with ``--accept-window``
  (default ``auto``): under load each accept burst waits the window before it is
  accepted; ``sockshare`` itself runs with ``--accept-window off`` (as before the window
  existed), so that one run compares the two; ``pure-window``: the same, pure Python;
* ``c-dispatcher`` (only with ``--only``) -- the floor of the dispatcher's job:
  benchmarks/c/dispatcher.c (built with ``cc -O2`` with the project's C peer,
  examples/c/sockshare_peer.c) accepts in bursts, picks least-conn from its own counts and
  hands each burst over, acknowledged, one HANDOFF frame per worker, to the same Python
  workers ``sockshare serve`` runs (``python -m sockshare.server.worker``); no
  re-dispatch, no restarts (docs/perf-dispatcher.md, "The floor: the same job in C");
* ``c-linger`` (only with ``--only``) -- the same C dispatcher, sleeping ``--c-linger``
  microseconds at the start of each burst (``CDISP_LINGER_US``), so that more connections
  go in each frame: an experiment on batching, not something sockshare does;
* ``shared``     -- the same Python worker code, pre-fork shared accept: both processes
  run ``asyncio.start_server`` on one inherited listening socket;
* ``reuseport``  -- the same code, each process binding the port with SO_REUSEPORT (the
  kernel hashes connections over the two listeners): the reference for the ratios;
* ``node``       -- Node.js ``cluster`` with ``SCHED_RR`` (benchmarks/node/cluster.js: the
  primary accepts and passes handles to 2 workers running a tiny ``net`` server that
  does the same as the Python one; ``--node-server http`` runs ``node:http`` instead).

The load generator is benchmarks/c/loadgen.c (built with ``cc -O2`` at start): N
connections, C at a time, epoll, one thread; it can only target 127.0.0.1, is bounded in
count and time, and counts the connections each worker served from the ``X-Worker``
header. Per configuration, the median over runs of: connections/s; the ratio to
SO_REUSEPORT (the median of the per-round ratios, which cancels slow drifts in the
machine's load); the dispatcher's CPU per connection (``/proc/<pid>/stat`` utime+stime
before and after; for Node the primary, which does the same job); the workers' CPU per
connection; the balance (max/min connections per worker); errors. Targets from the issue:
sockshare >= 0.9x SO_REUSEPORT and >= 2.5x Node cluster in connections/s, balance <= 1.1.

Prints a table, writes benchmarks/results/serve.json and a PNG (matplotlib, Agg; a
benchmark-only dependency: ``pip install matplotlib``). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from sockshare.server._control import ControlError, request  # noqa: E402

WORKERS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIGS = ("sockshare", "sockshare-window", "sockshare-defer", "pure", "pure-window",
           "pure-defer", "base", "c-dispatcher",
           "c-linger", "shared", "reuseport", "node")
LABELS = {
    "sockshare": "sockshare\nserve",
    "sockshare-window": "sockshare serve\n(accept window)",
    "pure": "sockshare serve\n(pure Python)",
    "pure-window": "pure Python\n(accept window)",
    "sockshare-defer": "sockshare serve\n(window, deferred accept)",
    "pure-defer": "pure Python\n(window, deferred accept)",
    "base": "sockshare serve\n(--base-src)",
    "c-dispatcher": "C dispatcher\n+ Python workers",
    "c-linger": "C dispatcher,\nlingering",
    "sockshare-2d": "sockshare\n2 disp.",
    "sockshare-3d": "sockshare\n3 disp.",
    "shared": "pre-fork\nshared accept",
    "reuseport": "SO_REUSEPORT\n(reference)",
    "node": "Node cluster\nSCHED_RR",
}
TARGET_VS_REUSEPORT = 0.9
TARGET_VS_NODE = 2.5
TARGET_BALANCE = 1.1
_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}


# --- processes ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14 and 15 of the man page


def read_ready(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> list[str]:
    """Wait (bounded) for the ``ready ...`` line a server prints on stdout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} did not become ready (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{proc.args!r} exited before it was ready")
            buf += chunk
    words = buf.split(b"\n", 1)[0].decode().split()
    if not words or words[0] != "ready":
        raise RuntimeError(f"{proc.args!r} said {buf!r}")
    return words[1:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process we started (by pid), SIGKILL it after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class Running:
    """A started configuration: where it listens, and which pids to watch."""

    name: str
    port: int
    workers: list[int]
    dispatcher: int | None          # the process that accepts and hands over, if any
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: --dispatchers N: the feeder processes (they accept and hand over too)
    feeders: list[int] = field(default_factory=list)

    def close(self) -> None:
        for p in self.procs:
            stop(p)


@dataclass(frozen=True)
class Options:
    """What the starters need from the command line."""

    src: Path = ROOT / "src"
    policy: str = "least-conn"
    node_server: str = "net"
    #: --sniff: the sockshare listeners read the HTTP Host before routing
    sniff: bool = False
    #: --base-src: another tree run as the "base" configuration, same options
    base_src: Path | None = None
    #: --c-linger: microseconds the c-linger configuration waits before each burst
    c_linger_us: int = 300
    #: --accept-window: the sockshare-window configurations' setting
    accept_window: str = "auto"
    #: --defer-accept: the *-defer configurations' setting (seconds)
    defer_accept: int = 1


def start_sockshare(tmp: Path, opts: Options, *, name: str = "sockshare",
                    src: Path | None = None, extra_env: dict[str, str] | None = None,
                    dispatchers: int = 1, accept_window: str | None = "off",
                    defer_accept: int | None = None) -> Running:
    if dispatchers > 1:
        name = f"{name}-{dispatchers}d"
    control = tmp / f"ctl-{name}" / "serve.ctl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(src or opts.src),
                                                    env.get("PYTHONPATH", "")) if p)
    env.pop("SOCKSHARE_CHANNEL", None)
    env.pop("SOCKSHARE_PURE_PYTHON", None)
    env.update(extra_env or {})
    logpath = tmp / f"serve-{name}.log"
    log = open(logpath, "wb")   # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockshare.server._cli", "serve", "serve_app:handle",
         "--bind", "127.0.0.1:0", "--workers", str(WORKERS), "--control", str(control),
         "--policy", opts.policy, "--log-level", "warning", "--grace", "2",
         *(["--sniff"] if opts.sniff else []),
         *(["--accept-window", accept_window] if accept_window is not None else []),
         *(["--defer-accept", str(defer_accept)] if defer_accept is not None else []),
         *(["--dispatchers", str(dispatchers)] if dispatchers > 1 else [])],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    log.close()
    run = Running(name, 0, [], proc.pid, [proc])
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("sockshare serve exited: " + logpath.read_text())
            with contextlib.suppress(OSError, ValueError, KeyError, ControlError):
                st = request(str(control), {"cmd": "status"}, timeout=2.0)["status"]
                ready = [w["pid"] for w in st["workers"] if w["state"] == "ready" and w["pid"]]
                feeders = [d["pid"] for d in st.get("dispatchers", [])
                           if d["role"] == "feeder" and d["accepting"] and d["workers"] == WORKERS]
                if len(ready) == WORKERS and len(feeders) == dispatchers - 1:
                    run.feeders = feeders
                    run.workers = ready
                    # the process that accepts and hands over: under a master (``serve``
                    # as started), the dispatcher is its child, not proc
                    run.dispatcher = int(st.get("dispatcher") or proc.pid)
                    run.port = int(st["listeners"][0]["address"].rsplit(":", 1)[1])
                    return run
            if time.monotonic() > deadline:
                raise RuntimeError("sockshare serve did not get its workers ready in 30 s")
            time.sleep(0.1)
    except BaseException:
        run.close()
        raise


def _python_worker(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE / "serve_app.py"), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=pass_fds)


def start_shared(_tmp: Path, _opts: Options) -> Running:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    run = Running("shared", 0, [], None)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1024)
        fd = lsock.fileno()
        for _ in range(WORKERS):
            p = _python_worker("shared", "--fd", str(fd), pass_fds=(fd,))
            run.procs.append(p)
        for p in run.procs:
            run.port = int(read_ready(p)[0])
            run.workers.append(p.pid)
    except BaseException:
        run.close()
        raise
    finally:
        lsock.close()   # the workers hold it now
    return run


def start_reuseport(_tmp: Path, _opts: Options) -> Running:
    run = Running("reuseport", 0, [], None)
    try:
        for _ in range(WORKERS):
            p = _python_worker("reuseport", "--port", str(run.port))
            run.procs.append(p)
            run.port = int(read_ready(p)[0])
            run.workers.append(p.pid)
    except BaseException:
        run.close()
        raise
    return run


def start_node(_tmp: Path, opts: Options) -> Running:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("no `node` on PATH")
    proc = subprocess.Popen([node, str(HERE / "node" / "cluster.js"), str(WORKERS), opts.node_server],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    run = Running("node", 0, [], proc.pid, [proc])
    try:
        words = read_ready(proc)
        run.port = int(words[0])
        run.workers = [int(w) for w in words[1:]]
    except BaseException:
        run.close()
        raise
    return run


def start_pure(tmp: Path, opts: Options) -> Running:
    """The same tree on its pure-Python hot paths (SOCKSHARE_PURE_PYTHON=1)."""
    return start_sockshare(tmp, opts, name="pure", extra_env={"SOCKSHARE_PURE_PYTHON": "1"})


def start_base(tmp: Path, opts: Options) -> Running:
    if opts.base_src is None:
        raise RuntimeError("the base configuration needs --base-src")
    # (an older tree may not know --accept-window: its default)
    return start_sockshare(tmp, opts, name="base", src=opts.base_src, accept_window=None)


def start_window(tmp: Path, opts: Options) -> Running:
    """This tree with its accept window on (``--accept-window``, default auto)."""
    return start_sockshare(tmp, opts, name="sockshare-window", accept_window=opts.accept_window)


def start_defer(tmp: Path, opts: Options) -> Running:
    """sockshare-window with ``--defer-accept`` (TCP_DEFER_ACCEPT on the listener)."""
    return start_sockshare(tmp, opts, name="sockshare-defer", accept_window=opts.accept_window,
                           defer_accept=opts.defer_accept)


def start_pure_defer(tmp: Path, opts: Options) -> Running:
    """pure-window with ``--defer-accept``."""
    return start_sockshare(tmp, opts, name="pure-defer", accept_window=opts.accept_window,
                           defer_accept=opts.defer_accept,
                           extra_env={"SOCKSHARE_PURE_PYTHON": "1"})


def start_pure_window(tmp: Path, opts: Options) -> Running:
    """The pure-Python hot paths with the accept window on."""
    return start_sockshare(tmp, opts, name="pure-window", accept_window=opts.accept_window,
                           extra_env={"SOCKSHARE_PURE_PYTHON": "1"})


def build_c_dispatcher(tmp: Path) -> str:
    """benchmarks/c/dispatcher.c with the project's C peer (its codec), ``cc -O2``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a C compiler (cc) is needed for the C dispatcher")
    out = tmp / "c-dispatcher"
    if out.exists():   # (built once for c-dispatcher and c-linger)
        return str(out)
    peer = ROOT / "examples" / "c"
    subprocess.run([cc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-I", str(peer), "-o", str(out),
                    str(HERE / "c" / "dispatcher.c"), str(peer / "sockshare_peer.c")], check=True)
    return str(out)


def start_c_dispatcher(tmp: Path, opts: Options, *, name: str = "c-dispatcher",
                       linger_us: int = 0) -> Running:
    """The floor: benchmarks/c/dispatcher.c (plain C, no interpreter) doing the
    dispatcher's job on this path -- accept bursts, least-conn from its own counts, one
    acknowledged HANDOFF frame per worker per burst, ACCEPTs close its copies -- for the
    same Python workers (``python -m sockshare.server.worker``, as the supervisor starts
    them), which connect to its channel listener."""
    if opts.sniff:
        raise RuntimeError("the C dispatcher does not sniff")
    exe = build_c_dispatcher(tmp)
    path = tmp / f"c-dispatcher-{time.monotonic_ns()}.chan"   # (one per start)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(opts.src),
                                                    env.get("PYTHONPATH", "")) if p)
    for k in ("SOCKSHARE_CHANNEL", "SOCKSHARE_PURE_PYTHON", "SOCKSHARE_FEEDERS"):
        env.pop(k, None)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    csock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    run = Running(name, 0, [], None)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1024)   # sockshare's default backlog
        csock.bind(str(path))   # (the dispatcher listens: the workers check its pid)
        os.chmod(path, 0o600)
        fds = (lsock.fileno(), csock.fileno())
        denv = dict(os.environ, CDISP_LINGER_US=str(linger_us))
        disp = subprocess.Popen([exe, str(fds[0]), str(fds[1]), str(WORKERS)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                pass_fds=fds, env=denv)
        run.procs.append(disp)
        run.dispatcher = disp.pid
        if read_ready(disp) != ["channel"]:
            raise RuntimeError("the C dispatcher did not listen on its channel")
        for wid in range(1, WORKERS + 1):
            w = subprocess.Popen(
                [sys.executable, "-m", "sockshare.server.worker", "--app", "serve_app:handle",
                 "--channel", str(path), "--id", str(wid), "--pool", "default",
                 "--generation", "1", "--grace", "2", "--log-level", "warning"],
                stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))
            run.procs.append(w)
            run.workers.append(w.pid)
        run.port = int(read_ready(disp, timeout=30.0)[0])
    except BaseException:
        run.close()
        raise
    finally:
        lsock.close()   # the dispatcher holds them now
        csock.close()
    return run


def start_c_linger(tmp: Path, opts: Options) -> Running:
    """The C dispatcher waiting ``opts.c_linger_us`` before each burst (bigger frames)."""
    return start_c_dispatcher(tmp, opts, name="c-linger", linger_us=opts.c_linger_us)


STARTERS: dict[str, Callable[[Path, Options], Running]] = {
    "sockshare": start_sockshare, "sockshare-window": start_window, "pure": start_pure,
    "pure-window": start_pure_window, "base": start_base,
    "sockshare-defer": start_defer, "pure-defer": start_pure_defer,
    "c-dispatcher": start_c_dispatcher, "c-linger": start_c_linger,
    "shared": start_shared, "reuseport": start_reuseport,
    "node": start_node,
}


# --- load ---------------------------------------------------------------------------


def build_loadgen(tmp: Path) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a C compiler (cc) is needed for the load generator")
    out = tmp / "loadgen"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(HERE / "c" / "loadgen.c")], check=True)
    return str(out)


def load(loadgen: str, run: Running, n: int, concurrency: int) -> dict[str, Any]:
    """One load-generator pass against ``run``, with the CPU the servers spent on it."""
    timeout = min(600.0, max(30.0, n / 500))
    pids = run.workers + ([run.dispatcher] if run.dispatcher else []) + run.feeders
    before = {pid: cpu_seconds(pid) for pid in pids}
    out = subprocess.run([loadgen, str(run.port), str(n), str(concurrency), str(timeout)],
                         check=True, capture_output=True, text=True, timeout=timeout + 30)
    after = {pid: cpu_seconds(pid) for pid in pids}
    res: dict[str, Any] = json.loads(out.stdout)
    res["cpu_delta"] = {pid: after[pid] - before[pid] for pid in pids}
    return res


@dataclass
class Sample:
    """One configuration, one run."""

    cps: float
    errors: int
    balance: float
    per_worker: list[int]
    dispatcher_us: float | None
    workers_us: float
    loadgen_us: float
    #: --dispatchers N: the lead's and each feeder's CPU per connection (dispatcher_us is
    #: their sum)
    per_dispatcher_us: list[float] = field(default_factory=list)


def sample(run: Running, res: dict[str, Any]) -> Sample:
    ok = int(res["ok"])
    errors = sum(int(v) for v in res["errors"].values())
    per_worker = [int(res["workers"].get(str(pid), 0)) for pid in run.workers]
    stray = ok - sum(per_worker)   # answered by a pid that is not ours: count as errors
    lo, hi = min(per_worker), max(per_worker)
    cpu = res["cpu_delta"]
    done = max(1, ok + errors)
    disp = [cpu[p] / done * 1e6 for p in ([run.dispatcher] if run.dispatcher else []) + run.feeders]
    return Sample(
        cps=ok / res["elapsed"],
        errors=errors + stray,
        balance=hi / lo if lo else float("inf"),
        per_worker=per_worker,
        dispatcher_us=sum(disp) if disp else None,
        workers_us=sum(cpu[p] for p in run.workers) / done * 1e6,
        loadgen_us=float(res["cpu"]) / done * 1e6,
        per_dispatcher_us=disp if run.feeders else [],
    )


# --- report -------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    ref = samples["reuseport"]
    node = samples.get("node")
    out: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        # paired ratios: configuration / reference measured in the same round
        ratios = [s.cps / r.cps for s, r in zip(runs, ref, strict=True)]
        disp = [s.dispatcher_us for s in runs if s.dispatcher_us is not None]
        entry: dict[str, Any] = {
            "cps_median": med([s.cps for s in runs]),
            "cps_runs": [round(s.cps, 1) for s in runs],
            "ratio_to_reuseport": med(ratios),
            "ratio_to_reuseport_runs": [round(x, 3) for x in ratios],
            "ratio_of_medians": med([s.cps for s in runs]) / med([r.cps for r in ref]),
            "balance_median": med([s.balance for s in runs]),
            "balance_runs": [round(s.balance, 3) for s in runs],
            "per_worker_runs": [s.per_worker for s in runs],
            "dispatcher_cpu_us_per_conn": med(disp) if disp else None,
            "workers_cpu_us_per_conn": med([s.workers_us for s in runs]),
            "loadgen_cpu_us_per_conn": med([s.loadgen_us for s in runs]),
            "per_dispatcher_cpu_us_per_conn": (
                [med([s.per_dispatcher_us[i] for s in runs])
                 for i in range(len(runs[0].per_dispatcher_us))] if runs[0].per_dispatcher_us
                else None),
            "errors_median": med([float(s.errors) for s in runs]),
            "errors_total": sum(s.errors for s in runs),
        }
        if node:
            entry["ratio_to_node"] = med([s.cps / r.cps for s, r in zip(runs, node, strict=True)])
        out[name] = entry
    return out


def print_table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    ref_bal = summary["reuseport"]["balance_median"]
    print(f"\n{args.conns} connections x {args.runs} runs, {args.concurrency} concurrent, "
          f"{WORKERS} workers each; medians over runs ({os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load avg at end {os.getloadavg()[0]:.2f})\n")
    head = (f"{'configuration':<13} {'conns/s':>8} {'vs REUSEPORT':>12} {'vs node':>8} "
            f"{'disp. CPU':>10} {'workers CPU':>11} {'balance':>8} {'(REUSEPORT)':>11} "
            f"{'errors':>7}")
    print(head)
    print(f"{'':<13} {'':>8} {'':>12} {'':>8} {'us/conn':>10} {'us/conn':>11} {'max/min':>8}")
    print("-" * len(head))
    for name, s in summary.items():
        disp = s["dispatcher_cpu_us_per_conn"]
        print(f"{name:<13} {s['cps_median']:>8,.0f} {s['ratio_to_reuseport']:>11.2f}x "
              f"{s.get('ratio_to_node', float('nan')):>7.2f}x "
              f"{(f'{disp:.1f}' if disp is not None else '-'):>10} "
              f"{s['workers_cpu_us_per_conn']:>11.1f} {s['balance_median']:>8.3f} "
              f"{ref_bal:>11.3f} {s['errors_total']:>7}")
    print("\n(node's dispatcher CPU is its cluster primary, which accepts and passes handles)")
    for name, s in summary.items():
        per = s.get("per_dispatcher_cpu_us_per_conn")
        if per:
            print(f"{name}: dispatcher CPU us/conn per process: lead {per[0]:.1f}, "
                  + ", ".join(f"feeder {i} {v:.1f}" for i, v in enumerate(per[1:], 1))
                  + f" (sum {sum(per):.1f}; busiest {max(per):.1f})")
    if "sockshare" not in summary:
        return
    ss = summary["sockshare"]
    checks = [
        (f"sockshare >= {TARGET_VS_REUSEPORT}x SO_REUSEPORT", ss["ratio_to_reuseport"],
         ss["ratio_to_reuseport"] >= TARGET_VS_REUSEPORT),
        (f"sockshare >= {TARGET_VS_NODE}x Node cluster", ss.get("ratio_to_node", float("nan")),
         ss.get("ratio_to_node", 0.0) >= TARGET_VS_NODE),
        (f"sockshare balance <= {TARGET_BALANCE}", ss["balance_median"],
         ss["balance_median"] <= TARGET_BALANCE),
    ]
    print("\ntargets:")
    for what, value, met in checks:
        print(f"  {what:<34} {value:6.2f}  {'met' if met else 'MISSED'}")


def plot(summary: dict[str, dict[str, Any]], samples: dict[str, list[Sample]],
         path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    colors = {"sockshare": "#2b6cb0", "pure": "#4299e1", "base": "#63b3ed", "shared": "#9f7aea",
              "reuseport": "#718096",
              "node": "#dd6b20"}
    colors.update({n: "#3182ce" for n in names if n not in colors})
    x = range(len(names))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.6),
                                        gridspec_kw={"width_ratios": [1.35, 1, 1]})
    fig.suptitle(f"Short connections on 127.0.0.1, 2 workers each: {args.conns:,} connections "
                 f"x {args.runs} interleaved runs, {args.concurrency} concurrent, load generator "
                 f"on the same {os.cpu_count()} cores (shared, noisy machine); medians over runs",
                 fontsize=11)

    # throughput, with the run-to-run spread and the ratio to SO_REUSEPORT on each bar
    cps = [summary[n]["cps_median"] for n in names]
    lo = [summary[n]["cps_median"] - min(s.cps for s in samples[n]) for n in names]
    hi = [max(s.cps for s in samples[n]) - summary[n]["cps_median"] for n in names]
    bars = ax1.bar(x, cps, color=[colors[n] for n in names], yerr=[lo, hi], capsize=4,
                   error_kw={"elinewidth": 1, "ecolor": "#333"})
    ref = summary["reuseport"]["cps_median"]
    top = max(m + h for m, h in zip(cps, hi, strict=True))
    ax1.axhline(ref * TARGET_VS_REUSEPORT, color="#2f855a", ls="--", lw=1)
    ax1.text(-0.45, ref * TARGET_VS_REUSEPORT, f"target: {TARGET_VS_REUSEPORT}x SO_REUSEPORT",
             ha="left", va="bottom", fontsize=8, color="#2f855a", bbox=_BOX)
    if "node" in summary:
        goal = summary["node"]["cps_median"] * TARGET_VS_NODE
        top = max(top, goal)
        ax1.axhline(goal, color="#c05621", ls=":", lw=1)
        ax1.text(-0.45, goal, f"target: {TARGET_VS_NODE}x Node cluster", ha="left", va="bottom",
                 fontsize=8, color="#c05621", bbox=_BOX)
    ax1.set_ylim(0, top * 1.08)
    for b, n in zip(bars, names, strict=True):
        s = summary[n]
        label = f"{s['ratio_to_reuseport']:.2f}x"
        if n == "sockshare" and "ratio_to_node" in s:
            label += f"\n({s['ratio_to_node']:.2f}x node)"
        ax1.text(b.get_x() + b.get_width() / 2, b.get_height() / 2, label, ha="center",
                 va="center", color="white", fontsize=10, fontweight="bold")
    ax1.set_title("connections/s; label: ratio to SO_REUSEPORT (median of per-round\n"
                  "ratios); whiskers: min-max over runs", fontsize=10)
    ax1.set_ylabel("connections per second")
    ax1.set_xticks(list(x), [LABELS.get(n, n) for n in names], fontsize=8)

    # balance
    bal = [min(summary[n]["balance_median"], 10.0) for n in names]
    bars = ax2.bar(x, bal, color=[colors[n] for n in names])
    ax2.axhline(TARGET_BALANCE, color="#2f855a", ls="--", lw=1)
    ax2.text(-0.45, TARGET_BALANCE, f"target: {TARGET_BALANCE}", ha="left", va="bottom",
             fontsize=8, color="#2f855a", bbox=_BOX)
    for b, n in zip(bars, names, strict=True):
        ax2.text(b.get_x() + b.get_width() / 2, b.get_height(),
                 f"{summary[n]['balance_median']:.3f}", ha="center", va="bottom", fontsize=9)
    ax2.set_ylim(1.0, max(max(bal) * 1.12, TARGET_BALANCE * 1.1))
    ax2.set_title("worker balance: max/min connections\nper worker (1.0 = even; lower is better)",
                  fontsize=10)
    ax2.set_xticks(list(x), [LABELS.get(n, n) for n in names], fontsize=8)

    # CPU per connection: dispatcher (or node primary) + workers
    disp = [summary[n]["dispatcher_cpu_us_per_conn"] or 0.0 for n in names]
    work = [summary[n]["workers_cpu_us_per_conn"] for n in names]
    ax3.bar(x, work, color="#a0aec0", label="workers (both)")
    ax3.bar(x, disp, bottom=work, color="#e53e3e", label="dispatcher / node primary")
    for i in range(len(names)):
        total = work[i] + disp[i]
        text = f"{total:.0f}" + (f"\n(disp. {disp[i]:.0f})" if disp[i] else "")
        ax3.text(i, total, text, ha="center", va="bottom", fontsize=8)
    ax3.set_ylim(0, max(w + d for w, d in zip(work, disp, strict=True)) * 1.25)
    ax3.set_title("server CPU per connection (us, utime+stime)", fontsize=10)
    ax3.set_xticks(list(x), [LABELS.get(n, n) for n in names], fontsize=8)
    ax3.legend(fontsize=8, loc="upper right")

    fig.text(0.995, 0.005, f"sockshare code: {getattr(args, 'code', '?')}; sockshare policy "
             f"{getattr(args, 'policy', '?')}; Python {platform.python_version()}; node "
             f"{_node_version()} ({getattr(args, 'node_server', 'net')} server); "
             f"benchmarks/serve.py", ha="right", va="bottom", fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver -------------------------------------------------------------------------


def _node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    return subprocess.run([node, "--version"], check=False, capture_output=True,
                          text=True).stdout.strip()


def _git_describe(src: Path) -> str | None:
    """HEAD of the tree ``src`` is in, with ``+dirty`` when src/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--conns", type=int, default=20000, help="connections per run (default 20000)")
    ap.add_argument("--runs", type=int, default=7, help="runs per configuration (default 7)")
    ap.add_argument("--concurrency", type=int, default=32, help="connections at a time (default 32)")
    ap.add_argument("--warmup", type=int, default=2000, help="connections before the first run")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "serve-benchmark.png"),
                    help="PNG to write (default docs/serve-benchmark.png)")
    ap.add_argument("--only", nargs="+", choices=CONFIGS,
                    default=[c for c in CONFIGS if c not in ("base", "pure", "sockshare-window",
                                                              "pure-window")],
                    help="a subset of configurations (reuseport is always included)")
    ap.add_argument("--policy", default="least-conn", help="the sockshare pool's policy")
    ap.add_argument("--node-server", choices=("net", "http"), default="net",
                    help="the Node workers' server: net (same work as the Python one) or http")
    ap.add_argument("--src", default=str(ROOT / "src"),
                    help="the sockshare source tree to run (default: this checkout's src)")
    ap.add_argument("--base-src", default=None,
                    help="another sockshare source tree (e.g. a worktree of an older commit), "
                         "run as configuration 'base' in the same rounds")
    ap.add_argument("--sniff", action="store_true",
                    help="the sockshare configurations sniff (HTTP Host) before routing")
    ap.add_argument("--dispatchers", type=int, nargs="+", default=[1], metavar="N",
                    help="also run sockshare with --dispatchers N (configuration sockshare-Nd)")
    ap.add_argument("--c-linger", type=int, default=300, metavar="US",
                    help="microseconds configuration c-linger waits before each burst "
                         "(default 300)")
    ap.add_argument("--accept-window", default="auto", metavar="auto|USEC",
                    help="the sockshare-window configurations' --accept-window (default auto)")
    ap.add_argument("--defer-accept", type=int, default=1, metavar="S",
                    help="the *-defer configurations' --defer-accept (default 1)")
    ap.add_argument("--src-label", default=None,
                    help="what --src is, for the JSON and the plot (default: git HEAD of --src)")
    args = ap.parse_args()
    opts = Options(Path(args.src).resolve(), args.policy, args.node_server, args.sniff,
                   Path(args.base_src).resolve() if args.base_src else None, args.c_linger,
                   args.accept_window, args.defer_accept)
    args.code = args.src_label or _git_describe(opts.src) or str(opts.src)
    if not 1 <= args.conns <= 1_000_000 or not 1 <= args.concurrency <= 1024 or args.runs < 1:
        ap.error("--conns 1..1000000, --concurrency 1..1024, --runs >= 1")
    if not 0 <= args.c_linger < 1_000_000:
        ap.error("--c-linger 0..999999 (microseconds)")
    names = [n for n in CONFIGS if n in args.only or n == "reuseport"
             or (n == "base" and opts.base_src is not None)]
    if not all(1 <= n <= 16 for n in args.dispatchers):
        ap.error("--dispatchers 1..16")
    starters = dict(STARTERS)
    multi = sorted({n for n in args.dispatchers if n > 1})
    for i, nd in enumerate(multi):
        name = f"sockshare-{nd}d"
        names.insert(i + (1 if names[0] == "sockshare" else 0), name)
        starters[name] = functools.partial(start_sockshare, dispatchers=nd)
    if multi and args.plot == str(ROOT / "docs" / "serve-benchmark.png"):
        args.plot = str(ROOT / "docs" / "serve-dispatchers.png")
    tmp = Path(tempfile.mkdtemp(prefix="ss-serve-bench-"))
    running: dict[str, Running] = {}
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    try:
        loadgen = build_loadgen(tmp)
        for n in names:
            running[n] = starters[n](tmp, opts)
            load(loadgen, running[n], args.warmup, args.concurrency)   # warm up, discarded
        print("started: " + ", ".join(f"{n} on :{r.port} (workers {r.workers}"
                                       + (f", dispatcher {r.dispatcher})" if r.dispatcher else ")")
                                       for n, r in running.items()), file=sys.stderr)
        for i in range(args.runs):
            order = names[i % len(names):] + names[:i % len(names)]
            for n in order:
                time.sleep(0.3)   # let the previous configuration's last closes settle
                s = sample(running[n], load(loadgen, running[n], args.conns, args.concurrency))
                samples[n].append(s)
                disp = f"{s.dispatcher_us:5.1f}" if s.dispatcher_us is not None else "    -"
                print(f"run {i + 1}/{args.runs} {n:<10} {s.cps:>8,.0f} conn/s  balance "
                      f"{s.balance:.3f}  errors {s.errors}  dispatcher {disp} us/conn  "
                      f"workers {s.workers_us:5.1f} us/conn", file=sys.stderr)
    finally:
        for r in running.values():
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(samples)
    print_table(summary, args)
    result = {
        "conns": args.conns, "runs": args.runs, "concurrency": args.concurrency,
        "workers": WORKERS, "cores": os.cpu_count(), "python": platform.python_version(),
        "node": _node_version(), "src": str(opts.src), "code": args.code,
        "policy": opts.policy, "node_server": opts.node_server, "sniff": opts.sniff,
        "base_src": str(opts.base_src) if opts.base_src else None,
        "dispatchers": args.dispatchers, "accept_window": opts.accept_window,
        "kernel": platform.release(), "loadavg_end": os.getloadavg(),
        "targets": {"vs_reuseport": TARGET_VS_REUSEPORT, "vs_node": TARGET_VS_NODE,
                    "balance": TARGET_BALANCE},
        "configs": summary,
    }
    out = HERE / "results" / ("serve-dispatchers.json" if multi else "serve.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(summary, samples, Path(args.plot), args)
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
    else:
        print(f"\nwrote {out.relative_to(ROOT)} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
