"""Benchmark: where the dispatcher's CPU per connection goes, stage by stage.

Run:  python benchmarks/dispatcher_stages.py [--conns 20000] [--rounds 2]
                                             [--only sockshare-window ...]
                                             [--base-src DIR] [--clock cpu|wall]
                                             [--sniff]

Starts ``sockshare serve`` as benchmarks/serve.py does (2 workers, ``serve_app:handle``;
configuration ``sockshare-window``: the accept window ``auto``, the compiled hot paths;
``pure-window``: the same in pure Python; ``base``: the tree ``--base-src`` with its
defaults, ``base-pure`` the same in pure Python; ``c-linger``: benchmarks/c/dispatcher.c
with a 300 µs linger, its CPU only), with benchmarks/stages/ first on its
``PYTHONPATH``: the dispatcher times its hot functions
(benchmarks/stages/sitecustomize.py) -- the loop's iterations and its ``epoll_wait``,
the listener callback and in it the window's sleep, the compiled burst and the channel
writes, the worker channels' read callback and in it the C read, the supervisor's
settle and the reports -- with their thread CPU time (``--clock cpu``, the default;
each measurement is a system call of about 0.4 µs, so the figures are a little above
the uninstrumented ones) or wall time. One load-generator pass of ``--conns``
connections (benchmarks/c/loadgen.c, 32 at a time) after a warm-up of 3,000; the
configurations interleaved round by round. Prints, per configuration and round, the
dispatcher's utime and stime per connection (/proc, uninstrumented counts) and each
stage's calls per connection, µs per call and µs per connection (totals over warm-up and
pass, divided by all their connections). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import serve  # noqa: E402

CONFIGS = ("sockshare-window", "pure-window", "base", "base-pure", "c-linger")
WARMUP = 3000


def _ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def one(name: str, opts: serve.Options, loadgen: str, conns: int, clock: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ss-stages-"))
    out = tmp / "stages"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "SOCKSHARE_STAGES",
                                            "SOCKSHARE_STAGES_CLOCK")}
    if name != "c-linger":
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(HERE / "stages"), saved["PYTHONPATH"]) if p)
        os.environ["SOCKSHARE_STAGES"] = str(out)
        os.environ["SOCKSHARE_STAGES_CLOCK"] = clock
    try:
        if name == "base-pure":   # the --base-src tree on its pure-Python hot paths
            if opts.base_src is None:
                raise SystemExit("base-pure needs --base-src")
            run = serve.start_sockshare(tmp, opts, name="base-pure", src=opts.base_src,
                                        accept_window=None,
                                        extra_env={"SOCKSHARE_PURE_PYTHON": "1"})
        else:
            run = serve.STARTERS[name](tmp, opts)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        serve.load(loadgen, run, WARMUP, 32)
        assert run.dispatcher is not None
        u0, s0 = _ticks(run.dispatcher)
        res = serve.load(loadgen, run, conns, 32)
        u1, s1 = _ticks(run.dispatcher)
        pid = run.dispatcher
    finally:
        run.close()
    sample = serve.sample(run, res)
    result: dict[str, Any] = {
        "user_us": (u1 - u0) / serve.CLK_TCK / conns * 1e6,
        "sys_us": (s1 - s0) / serve.CLK_TCK / conns * 1e6,
        "cps": sample.cps, "errors": sample.errors, "balance": sample.balance, "stages": {},
    }
    for _ in range(50):   # (written when the dispatcher exits)
        path = Path(f"{out}.{pid}")
        if path.exists():
            result["stages"] = json.loads(path.read_text())
            break
        time.sleep(0.1)
    return result


def show(name: str, rnd: int, r: dict[str, Any], conns: int) -> None:
    total = conns + WARMUP
    print(f"\n{name}, round {rnd}: dispatcher user {r['user_us']:.1f} + sys {r['sys_us']:.1f} "
          f"µs/conn; {r['cps']:,.0f} conn/s, balance {r['balance']:.3f}, errors {r['errors']}")
    for label, (calls, ns) in r["stages"].items():
        if calls:
            print(f"  {label:<30} {calls / total:6.3f} calls/conn {ns / calls / 1e3:8.2f} µs/call "
                  f"{ns / total / 1e3:7.2f} µs/conn")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--conns", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=CONFIGS, default=["sockshare-window"])
    ap.add_argument("--src", default=str(HERE.parent / "src"))
    ap.add_argument("--base-src", default=None)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--sniff", action="store_true", help="the servers sniff the HTTP Host")
    args = ap.parse_args()
    if not 1 <= args.conns <= 1_000_000 or not 1 <= args.rounds <= 20:
        ap.error("--conns 1..1000000, --rounds 1..20")
    names = list(args.only)
    if args.base_src and "base" not in names and "base-pure" not in names:
        names.append("base")
    if args.sniff and "c-linger" in names:
        ap.error("c-linger does not sniff")
    opts = serve.Options(src=Path(args.src).resolve(), sniff=args.sniff,
                         base_src=Path(args.base_src).resolve() if args.base_src else None)
    loadgen = serve.build_loadgen(Path(tempfile.mkdtemp(prefix="ss-stages-lg-")))
    print(f"load average {os.getloadavg()[0]:.2f}")
    for rnd in range(1, args.rounds + 1):
        for name in names:
            show(name, rnd, one(name, opts, loadgen, args.conns, args.clock), args.conns)
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
