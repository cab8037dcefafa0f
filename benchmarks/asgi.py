"""Benchmark: an ASGI app under ``sockshare serve`` against uvicorn, gunicorn and granian.

Run:  python benchmarks/asgi.py [--rounds 5] [--duration 10] [--connections 64]
                                [--loop uvloop|asyncio] [--plot benchmarks/results/asgi.png]
      (also: --only NAME..., --threads N for wrk, --src DIR to run sockshare from another
      source tree, e.g. an exported commit, for A/B runs, --src-label TEXT)

What it measures: requests/s of the same small ASGI app (benchmarks/asgi_app.py: any
``GET`` gets ``hello``), on 127.0.0.1, with 2 workers each, served by

* ``sockshare`` -- ``sockshare serve asgi_app:app --interface asgi --workers 2``: the
  dispatcher accepts each connection and hands it to a worker, which serves it with
  uvicorn's protocol classes;
* ``sockshare-worker`` -- the same with ``--accept worker``: the workers accept on the
  listening socket themselves (docs/server.md, "Accept modes"), as uvicorn's do;
* ``uvicorn``   -- ``uvicorn asgi_app:app --workers 2`` (the reference of the ratios);
* ``gunicorn``  -- ``gunicorn -k asgi_gunicorn.Worker -w 2``: uvicorn_worker's
  ``UvicornWorker`` with the HTTP implementation and loop pinned (benchmarks/asgi_gunicorn.py);
* ``granian``   -- ``granian --interface asgi --workers 2`` (if installed; its HTTP is
  Rust's hyper, not configurable to httptools).

The same HTTP implementation wherever it can be chosen (``httptools``), the same event
loop for all (``--loop``, default uvloop), no access logs. The load comes from ``wrk``
(``apt-get install wrk``; not a Python package) in two modes:

* **keep-alive**: wrk's default, ``--connections`` connections, each reused;
* **new connection per request**: ``-H 'Connection: close'``, so every request is a new
  TCP connection (for sockshare: a handoff per request).

All servers are started once (on free 127.0.0.1 ports, ready when a ``GET /`` answers
``hello``, polled with a deadline), warmed up, then measured in ``--rounds`` rounds; each
round runs every (server, mode) pair once, in a shuffled order, so no server always runs
first or last on a noisy machine. Reported per server and mode: the median requests/s, the
ratio to uvicorn (the median of the per-round ratios, which cancels slow drifts in the
machine's load), the server's CPU per request (its main process and workers, utime +
stime from /proc, median); wrk's socket errors and non-2xx answers are summed. Servers are stopped by
pid (SIGTERM, SIGKILL after a deadline, then any worker of theirs still alive).

Targets (the issue): keep-alive at least 1.0x uvicorn, a new connection per request at
least 0.9x uvicorn. wrk runs on the same cores as the servers: on a 2-core machine, the
figures are noisy and only the ratios mean much.

Prints a Markdown table, writes benchmarks/results/asgi.json and, with ``--plot``, a PNG
(matplotlib, Agg: ``pip install matplotlib``). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import importlib.util
import json
import os
import platform
import random
import re
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

WORKERS = 2
SERVERS = ("sockshare", "sockshare-worker", "uvicorn", "gunicorn", "granian")
MODES = ("keep-alive", "close")
MODE_LABELS = {"keep-alive": "keep-alive", "close": "new connection per request"}
REFERENCE = "uvicorn"
TARGETS = {"keep-alive": 1.0, "close": 0.9}
COLORS = {"sockshare": "#2b6cb0", "sockshare-worker": "#63b3ed", "uvicorn": "#718096", "gunicorn": "#38a169",
          "granian": "#dd6b20"}
READY_TIMEOUT = 30.0


# --- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/<pid>/task/*/children), depth first."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            out.append(kid)
            out.extend(descendants(kid))
    return out


def answers_hello(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        return r.status == 200 and r.read() == b"hello"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class Running:
    """A started server: its main process, its port, its log."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    workers: list[int] = field(default_factory=list)

    def wait_ready(self, workers: int = WORKERS) -> None:
        """Until ``GET /`` answers ``hello`` and the main process has ``workers``
        descendants (at least), within READY_TIMEOUT seconds."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            kids = descendants(self.proc.pid)
            if len(kids) >= workers and answers_hello(self.port):
                self.workers = kids
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT:.0f} s:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *self.workers]

    def close(self) -> None:
        """SIGTERM the main process (ours, by pid), SIGKILL after 15 s; then SIGKILL any
        of its workers still alive (they were its children when it started)."""
        kids = descendants(self.proc.pid) or self.workers
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        for pid in kids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), from /proc/<pid>/stat; a
    process that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
        total += int(fields[11]) + int(fields[12])     # fields 14 and 15 of the man page
    return total / CLK_TCK


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass(frozen=True)
class Options:
    """What the starters need from the command line."""

    src: Path
    loop: str
    tmp: Path


_COMPILED: set[Path] = set()


def _byte_compile(path: Path) -> None:
    """Write the bytecode of a source tree the servers import, once per run. Where
    PYTHONDONTWRITEBYTECODE is set (some CI images and containers set it), every process
    start would otherwise compile the tree again: about 0.1 s of CPU a process for
    sockshare's modules, which a reload (two new workers) or an upgrade (four new
    processes) would count against its moves and an installed server never pays."""
    path = path.resolve()
    if path in _COMPILED or not path.is_dir():
        return
    _COMPILED.add(path)
    import compileall
    compileall.compile_dir(str(path), quiet=1, workers=1)


def _env(*paths: Path, **extra: str) -> dict[str, str]:
    for p in paths:
        _byte_compile(p)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths),
                                         *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.pop("SOCKSHARE_CHANNEL", None)
    env.update(extra)
    return env


def _spawn(name: str, port: int, argv: list[str], env: dict[str, str], opts: Options) -> Running:
    log = opts.tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=str(HERE))
    return Running(name, port, proc, log)


def start_sockshare(opts: Options, accept: str = "dispatcher") -> Running:
    port = free_port()
    name = "sockshare" if accept == "dispatcher" else f"sockshare-{accept}"
    argv = [sys.executable, "-m", "sockshare.server._cli", "serve", "asgi_app:app",
            "--interface", "asgi", "--workers", str(WORKERS),
            "--bind", f"127.0.0.1:{port}", "--control", str(opts.tmp / name / "serve.ctl"),
            "--http", "httptools", "--loop", opts.loop, "--log-level", "warning",
            "--grace", "2"]
    if accept != "dispatcher":
        argv += ["--accept", accept]
    return _spawn(name, port, argv, _env(HERE, opts.src), opts)


def start_sockshare_worker(opts: Options) -> Running:
    return start_sockshare(opts, "worker")


def start_uvicorn(opts: Options) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--workers", str(WORKERS),
            "--host", "127.0.0.1", "--port", str(port), "--http", "httptools",
            "--loop", opts.loop, "--no-access-log", "--log-level", "warning"]
    return _spawn("uvicorn", port, argv, _env(HERE), opts)


def start_gunicorn(opts: Options) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", "asgi_gunicorn.Worker", "-w", str(WORKERS),
            "-b", f"127.0.0.1:{port}", "--log-level", "warning", "asgi_app:app"]
    return _spawn("gunicorn", port, argv, _env(HERE, SOCKSHARE_BENCH_LOOP=opts.loop), opts)


def start_granian(opts: Options) -> Running:
    port = free_port()
    exe = shutil.which("granian")
    argv = ([exe] if exe else [sys.executable, "-m", "granian"]) + [
        "--interface", "asgi", "--workers", str(WORKERS), "--host", "127.0.0.1",
        "--port", str(port), "--http", "1", "--loop", opts.loop, "--no-access-log",
        "--log-level", "warning", "asgi_app:app"]
    return _spawn("granian", port, argv, _env(HERE), opts)


STARTERS: dict[str, Callable[[Options], Running]] = {
    "sockshare": start_sockshare, "sockshare-worker": start_sockshare_worker,
    "uvicorn": start_uvicorn, "gunicorn": start_gunicorn,
    "granian": start_granian,
}
#: the module each server needs
NEEDS = {"sockshare": "uvicorn", "sockshare-worker": "uvicorn", "uvicorn": "uvicorn",
         "gunicorn": "uvicorn_worker",
         "granian": "granian"}


# --- load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One wrk run."""

    rps: float
    requests: int
    errors: int       # socket errors (connect, read, write, timeout) + non-2xx/3xx answers
    cpu_us: float = 0.0   # the server's processes' CPU per request (us, utime + stime)


_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(out: str) -> Sample:
    rps = _RPS.search(out)
    total = _TOTAL.search(out)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = 0
    sock = _SOCKET.search(out)
    if sock is not None:
        errors += sum(int(g) for g in sock.groups())
    bad = _NON2XX.search(out)
    if bad is not None:
        errors += int(bad.group(1))
    return Sample(float(rps.group(1)), int(total.group(1)), errors)


def wrk(wrk_path: str, server: Running, mode: str, duration: int, connections: int,
        threads: int) -> Sample:
    argv = [wrk_path, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
            "--timeout", "5s"]
    if mode == "close":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{server.port}/")
    cpu0 = cpu_seconds(server.pids)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                          check=False)
    cpu = cpu_seconds(server.pids) - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    s = parse_wrk(done.stdout)
    return dataclasses.replace(s, cpu_us=cpu * 1e6 / s.requests if s.requests else 0.0)


# --- results --------------------------------------------------------------------------


Samples = dict[str, dict[str, list[Sample]]]   # server -> mode -> one per round


def summarize(samples: Samples, names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for n in names:
        out[n] = {}
        for m in MODES:
            mine = samples[n][m]
            row: dict[str, Any] = {
                "rps_median": statistics.median(s.rps for s in mine),
                "rps_min": min(s.rps for s in mine), "rps_max": max(s.rps for s in mine),
                "rps": [s.rps for s in mine], "errors": sum(s.errors for s in mine),
                "cpu_us_median": statistics.median(s.cpu_us for s in mine),
            }
            if REFERENCE in samples:
                ref = samples[REFERENCE][m]
                row["ratio"] = statistics.median(
                    s.rps / r.rps for s, r in zip(mine, ref, strict=True) if r.rps > 0)
            out[n][m] = row
    return out


def markdown(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = ["server"]
    for m in MODES:
        head += [f"{MODE_LABELS[m]} req/s", f"x {REFERENCE}", "CPU us/req"]
    head.append("errors")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, by_mode in summary.items():
        cells = [n]
        for m in MODES:
            row = by_mode[m]
            cells.append(f"{row['rps_median']:,.0f}")
            cells.append(f"{row['ratio']:.2f}x" if "ratio" in row else "-")
            cells.append(f"{row['cpu_us_median']:.0f}")
        cells.append(str(sum(by_mode[m]["errors"] for m in MODES)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    if REFERENCE not in summary:
        return []
    out = []
    for name in ("sockshare", "sockshare-worker"):
        if name not in summary:
            continue
        for m in MODES:
            ratio = summary[name][m]["ratio"]
            met = ratio >= TARGETS[m]
            out.append(f"{name} {MODE_LABELS[m]}: {ratio:.2f}x {REFERENCE} (target "
                       f">= {TARGETS[m]:.1f}x): {'met' if met else 'MISSED'}")
    return out


def plot(summary: dict[str, dict[str, dict[str, Any]]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(MODES) + 1, figsize=(17, 5.4),
                             gridspec_kw={"width_ratios": [1, 1, 0.8]})
    fig.suptitle(f"ASGI 'hello' on 127.0.0.1, 2 workers each, wrk -c {args.connections} "
                 f"-t {args.threads} -d {args.duration}s, {args.rounds} interleaved rounds "
                 f"(medians); loop {args.loop}; wrk on the same {os.cpu_count()} shared cores",
                 fontsize=10)
    for ax, m in zip(axes[:len(MODES)], MODES, strict=True):
        med = [summary[n][m]["rps_median"] for n in names]
        lo = [summary[n][m]["rps_median"] - summary[n][m]["rps_min"] for n in names]
        hi = [summary[n][m]["rps_max"] - summary[n][m]["rps_median"] for n in names]
        bars = ax.bar(range(len(names)), med, color=[COLORS[n] for n in names],
                      yerr=[lo, hi], capsize=4, error_kw={"elinewidth": 1, "ecolor": "#333"})
        if REFERENCE in summary:
            goal = summary[REFERENCE][m]["rps_median"] * TARGETS[m]
            ax.axhline(goal, color="#2f855a", ls="--", lw=1)
            ax.text(-0.45, goal, f"target: {TARGETS[m]:.1f}x {REFERENCE}", ha="left",
                    va="bottom", fontsize=8, color="#2f855a",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
        for b, n in zip(bars, names, strict=True):
            row = summary[n][m]
            if "ratio" in row:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() / 2, f"{row['ratio']:.2f}x",
                        ha="center", va="center", color="white", fontsize=10, fontweight="bold")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("requests per second")
        ax.set_title(f"{MODE_LABELS[m]}\nlabel: ratio to {REFERENCE} (median of per-round "
                     "ratios); whiskers: min-max", fontsize=10)
    ax = axes[len(MODES)]
    width = 0.8 / len(MODES)
    for j, m in enumerate(MODES):
        xs = [i + (j - (len(MODES) - 1) / 2) * width for i in range(len(names))]
        vals = [summary[n][m]["cpu_us_median"] for n in names]
        ax.bar(xs, vals, width, color=[COLORS[n] for n in names], alpha=1.0 if j == 0 else 0.55,
               edgecolor="#333", hatch="" if j == 0 else "//", label=MODE_LABELS[m])
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_title("server CPU per request (us, main process + workers,\nutime + stime; median)",
                 fontsize=10)
    top = max(summary[n][m]["cpu_us_median"] for n in names for m in MODES)
    ax.set_ylim(0, top * 1.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.text(0.995, 0.005, f"sockshare code: {args.code}; Python {platform.python_version()}; "
             f"{_versions()}; benchmarks/asgi.py", ha="right", va="bottom", fontsize=7,
             color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("uvicorn", "httptools", "uvloop", "gunicorn", "uvicorn-worker", "granian"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{pkg} {version(pkg)}")
    return ", ".join(out)


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


# --- driver ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--duration", type=int, default=10,
                    help="seconds of each wrk run (default 10)")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="seconds of load per server and mode before the rounds (default 2; "
                         "0: none)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="every server's event loop (default uvloop)")
    ap.add_argument("--only", nargs="+", choices=SERVERS, default=list(SERVERS),
                    help="a subset of servers (uvicorn, the reference, is always run)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the shuffled orders")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="write a PNG (needs matplotlib), e.g. benchmarks/results/asgi.png")
    ap.add_argument("--src", default=str(ROOT / "src"),
                    help="the sockshare source tree to run (default: this checkout's src)")
    ap.add_argument("--src-label", default=None,
                    help="what --src is, for the JSON and the plot (default: git HEAD of --src)")
    args = ap.parse_args()
    if args.rounds < 1 or not 1 <= args.duration <= 600 or not 0 <= args.warmup <= 600 \
            or not 1 <= args.connections <= 10000 or not 1 <= args.threads <= args.connections:
        ap.error("--rounds >= 1, --duration 1..600, --warmup 0..600, --connections 1..10000, "
                 "--threads 1..connections")
    wrk_path = shutil.which("wrk")
    if wrk_path is None:
        print("wrk is not installed: apt-get install wrk (Debian/Ubuntu), brew install wrk "
              "(macOS), or build it from its sources", file=sys.stderr)
        return 2
    src = Path(args.src).resolve()
    if not (src / "sockshare" / "server" / "_web.py").exists():
        ap.error(f"--src {src}: not a sockshare source tree with ASGI support")
    args.code = args.src_label or _git_describe(src) or str(src)
    names = []
    for n in SERVERS:
        if n not in args.only and n != REFERENCE:
            continue
        if importlib.util.find_spec(NEEDS[n]) is None:
            print(f"skipping {n}: {NEEDS[n]} is not installed", file=sys.stderr)
            continue
        names.append(n)
    if REFERENCE not in names:
        print(f"{REFERENCE} (the reference) is not installed: pip install 'sockshare[asgi]'",
              file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ss-asgi-bench-"))
    opts = Options(src, args.loop, tmp)
    running: dict[str, Running] = {}
    samples: Samples = {n: {m: [] for m in MODES} for n in names}
    try:
        for n in names:
            running[n] = STARTERS[n](opts)
        for r in running.values():
            r.wait_ready()
        print("started: " + ", ".join(f"{n} on :{r.port} (pid {r.proc.pid}, workers "
                                       f"{r.workers})" for n, r in running.items()),
              file=sys.stderr)
        for n in names if args.warmup else []:
            for m in MODES:
                wrk(wrk_path, running[n], m, args.warmup, args.connections, args.threads)
        for i in range(args.rounds):
            order = [(n, m) for n in names for m in MODES]
            rng.shuffle(order)
            for n, m in order:
                time.sleep(0.5)   # the previous run's connections close, TIME_WAIT settles
                s = wrk(wrk_path, running[n], m, args.duration, args.connections,
                        args.threads)
                samples[n][m].append(s)
                print(f"round {i + 1}/{args.rounds} {n:<10} {m:<10} {s.rps:>10,.0f} req/s"
                      f"  {s.cpu_us:6.1f} us CPU/req  errors {s.errors}", file=sys.stderr)
    finally:
        for r in running.values():
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(samples, names)
    print()
    print(markdown(summary))
    for line in targets(summary):
        print(line)
    result = {
        "rounds": args.rounds, "duration": args.duration, "connections": args.connections,
        "threads": args.threads, "loop": args.loop, "workers": WORKERS,
        "cores": os.cpu_count(), "python": platform.python_version(), "versions": _versions(),
        "src": str(src), "code": args.code, "kernel": platform.release(),
        "loadavg_end": os.getloadavg(), "targets": TARGETS, "servers": summary,
    }
    write_result("asgi", result, args.plot, lambda path: plot(summary, path, args))
    return 0


def write_result(name: str, result: dict[str, Any], plot_to: str | None,
                 draw: Callable[[Path], None]) -> None:
    """``benchmarks/results/NAME.json``, and the plot if one was asked for (matplotlib)."""
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}", file=sys.stderr)
    if plot_to:
        try:
            draw(Path(plot_to))
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        else:
            print(f"wrote {plot_to}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
