"""Benchmark: K concurrent acknowledged ``await ch.send()`` on an AsyncChannel (issue #19).

Run:  python benchmarks/aio_send.py [--k 1000,4000,12000] [--runs 5] [--src OTHER_TREE/src]

``--src`` benchmarks the sockshare of another tree (A/B: run both and compare).

Each run forks a receiver process whose AsyncChannel accepts every handoff (and closes
its copy); the sender, in this process, hands over K sockets over a UNIX socketpair.
Time runs from the first send to the last answer, in microseconds per handoff, as
wall-clock time and as the sender's CPU time (steadier on a busy machine: the wake-ups
measured here are the sender's work):

* send_K   -- K tasks, each ``await ch.send(sock, meta=..., data=...)`` (acked): the
              shape of a worker whose handlers all migrate at once (reload, upgrade);
* nowait_K -- ``ch.send_nowait`` for each socket, then one ``await ch.wait(tickets)``:
              the baseline, with a single waiter.

The two should be close, and flat in K: a read of the channel wakes the waiters of the
tickets it answered, not all of them. Prints medians; writes
benchmarks/results/aio_send.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._handoffs import DATA, META, make_socks, src_dir

sys.path.insert(0, src_dir())

import sockshare  # (after choosing which tree to import it from)

HERE = Path(__file__).resolve().parent


async def _receive(sock: socket.socket) -> None:
    ch = sockshare.AsyncChannel.wrap(sockshare.Channel.from_socket(sock))
    async for h in ch:
        h.accept()
        h.socket.close()
    await ch.aclose()


def _receiver(sock: socket.socket) -> None:
    code = 0
    try:
        asyncio.run(_receive(sock))
    except BaseException as exc:
        sys.stderr.write(f"receiver failed: {exc!r}\n")
        code = 1
    os._exit(code)


async def _send_each(ch: sockshare.AsyncChannel, socks: list[socket.socket]) -> list[sockshare.Ticket]:
    return await asyncio.gather(*(ch.send(s, meta=META, data=DATA) for s in socks))


async def _send_nowait(ch: sockshare.AsyncChannel, socks: list[socket.socket]) -> list[sockshare.Ticket]:
    tickets = [ch.send_nowait([(s, META, DATA)])[0] for s in socks]
    await ch.wait(tickets)
    return tickets


Sender = Callable[[sockshare.AsyncChannel, list[socket.socket]], Awaitable[list[sockshare.Ticket]]]


def run_one(send: Sender, k: int) -> tuple[float, float]:
    """One run: fork a receiver, hand it ``k`` sockets; microseconds per handoff, of
    wall-clock time and of this process's CPU time."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        _receiver(b)
    b.close()

    async def main() -> tuple[float, float]:
        ch = sockshare.AsyncChannel.wrap(sockshare.Channel.from_socket(a))
        socks = make_socks(k)
        t0, c0 = time.perf_counter(), time.process_time()
        tickets = await send(ch, socks)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        bad = [t for t in tickets if t.state != "accepted"]
        if bad:
            raise RuntimeError(f"{len(bad)} handoff(s) not accepted, e.g. {bad[0].id}: {bad[0].state}")
        await ch.aclose()
        return elapsed, cpu

    try:
        elapsed, cpu = asyncio.run(main())
    finally:
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError("receiver failed")
    return elapsed / k * 1e6, cpu / k * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", default="1000,4000,12000", help="concurrent handoffs, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--src", help="the src directory of the sockshare to measure (default: this tree's)")
    args = ap.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(ks) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    print(f"sockshare from {Path(sockshare.__file__).parent}", file=sys.stderr)
    # a side that closes second may find the other gone (EPIPE): not what is measured
    logging.getLogger("sockshare.channel").setLevel(logging.ERROR)
    modes: dict[str, Callable[[], tuple[float, float]]] = {}
    for k in ks:
        modes[f"send_{k}"] = lambda k=k: run_one(_send_each, k)  # type: ignore[misc]
        modes[f"nowait_{k}"] = lambda k=k: run_one(_send_nowait, k)  # type: ignore[misc]
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for run in range(args.runs):
        for name, fn in modes.items():
            w, c = fn()
            wall[name].append(w)
            cpu[name].append(c)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    print(f"\nus per handoff, median of {args.runs} runs (Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores)\n")
    print(f"{'mode':<14} {'wall':>8} {'min':>8} {'sender CPU':>11} {'min':>8}")
    summary = {}
    for name in modes:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        summary[name] = {"us_per_handoff": w, "cpu_us_per_handoff": c, "runs": wall[name],
                         "cpu_runs": cpu[name]}
        print(f"{name:<14} {w:>8.2f} {min(wall[name]):>8.2f} {c:>11.2f} {min(cpu[name]):>8.2f}")
    out = HERE / "results" / "aio_send.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"src": src_dir(), "runs": args.runs, "modes": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
