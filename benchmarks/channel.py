"""Benchmark: handoffs per second over a sockshare Channel, against raw baselines.

Run:  python benchmarks/channel.py [--n 10000] [--runs 7] [--src OTHER_TREE/src] [--modes A,B]

``--src`` benchmarks the sockshare of another tree (A/B: run both, alternating, and
compare the ratios; the machine's drift shows in ``raw_send_fds_1``, whose code is the
same in both).

Every mode moves N descriptors from a sender process to a receiver process over a UNIX
socketpair; the receiver wraps each in a Python socket object (where the mode is
Python) and closes it. Elapsed time runs from the sender's first send to the
receiver's last close. CPU time (sender + receiver, user + system) is reported next to
it: on a shared machine whose other tenants take the cores, the wall time of a run
swings by 2x or more, the CPU it took much less, so A/B comparisons go by CPU. Modes,
all in one run, interleaved run by run:

* raw_send_fds_1   -- socket.send_fds / recv_fds, one fd + 164 payload bytes a message,
                      socket(fileno=...) on receipt: the baseline ratios refer to;
* raw_send_fds_64  -- the same with 64 fds a message;
* c_sendmsg_1/64   -- a C sendmsg/recvmsg loop (benchmarks/c/fdloop.c), no socket objects;
* chan_unacked     -- Channel.send(sock, meta=<64 B JSON>, data=<100 B>, ack=False);
* chan_acked       -- the same with ack=True, pipelined (the sender reads acks as it goes);
* chan_batch       -- Channel.send_many, 64 sockets a call, ack=False;
* chan_batch_acked -- the same, acked.

Prints medians of the per-run figures and ratios; writes benchmarks/results/channel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._handoffs import DATA, META, make_socks, src_dir

sys.path.insert(0, src_dir())

import sockshare  # (after choosing which tree to import it from)

PAYLOAD = json.dumps(META).encode() + DATA
HERE = Path(__file__).resolve().parent


def _fork_pair(
    sender: Callable[[socket.socket, int], Callable[[], None]],
    receiver: Callable[[socket.socket, int], None],
    n: int,
) -> tuple[float, float]:
    """Fork a receiver; ``sender(sock, n)`` prepares (handshake, sockets) and returns
    the timed part. Time runs from calling it to the receiver's last close; CPU is the
    sender's timed part plus the receiver's whole run. Returns (wall s, CPU s)."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # receiver
        code = 0
        try:
            a.close()
            os.close(r)
            c0 = time.process_time()
            receiver(b, n)
            os.write(w, f"{time.perf_counter()!r} {time.process_time() - c0!r}".encode())
        except BaseException as exc:
            sys.stderr.write(f"receiver failed: {exc!r}\n")
            code = 1
        os._exit(code)
    b.close()
    os.close(w)
    go = sender(a, n)
    t0, c0 = time.perf_counter(), time.process_time()
    go()
    cpu = time.process_time() - c0
    end = os.read(r, 128)
    os.close(r)
    a.close()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not end:
        raise RuntimeError("receiver failed")
    t_end, rx_cpu = (float(x) for x in end.split())
    return t_end - t0, cpu + rx_cpu


# --- raw baselines ----------------------------------------------------------------------


def raw_sender(k: int) -> Callable[[socket.socket, int], Callable[[], None]]:
    def prepare(sock: socket.socket, n: int) -> Callable[[], None]:
        base = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [base.fileno()] * k

        def go() -> None:
            for _ in range(n // k):
                socket.send_fds(sock, [PAYLOAD], fds)
            sock.recv(1)  # receiver done
            base.close()

        return go

    return prepare


def raw_receiver(k: int) -> Callable[[socket.socket, int], None]:
    def recv(sock: socket.socket, n: int) -> None:
        got = 0
        while got < n:
            _msg, fds, _flags, _addr = socket.recv_fds(sock, len(PAYLOAD), k)
            for fd in fds:
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd).close()
            got += len(fds)
        sock.send(b"k")

    return recv


# --- sockshare channel ------------------------------------------------------------------


def chan_sender(ack: bool, batch: int) -> Callable[[socket.socket, int], Callable[[], None]]:
    def prepare(sock: socket.socket, n: int) -> Callable[[], None]:
        ch = sockshare.Channel.from_socket(sock)
        socks = make_socks(n)
        return lambda: send(ch, socks, n)

    def send(ch: sockshare.Channel, socks: list[socket.socket], n: int) -> None:
        tickets = []
        if batch == 1:
            for i, s in enumerate(socks):
                tickets.append(ch.send(s, meta=META, data=DATA, ack=ack))
                if ack and i % 64 == 63:
                    ch.poll(0)
        else:
            for i in range(0, n, batch):
                chunk = [(s, META, DATA) for s in socks[i:i + batch]]
                tickets.extend(ch.send_many(chunk, ack=ack))
                if ack:
                    ch.poll(0)
        for t in tickets:
            if not t.wait(30):
                raise RuntimeError(f"handoff {t.id} {t.state}")
        ch.receive_control(timeout=60)
        ch._sock.detach()  # the fork helper closes it

    return prepare


def chan_receiver(sock: socket.socket, n: int) -> None:
    ch = sockshare.Channel.from_socket(sock)
    got = 0
    while got < n:
        batch = ch.receive_many()
        ch.accept_all(batch)
        for h in batch:
            h.socket.close()
        got += len(batch)
    ch.send_control({"done": True})
    ch._sock.detach()


# --- C ------------------------------------------------------------------------------


def build_c() -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="ss-bench-"), "fdloop")
    subprocess.run([cc, "-O2", "-Wall", "-o", out, str(HERE / "c" / "fdloop.c")], check=True)
    return out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_c(binary: str, n: int, k: int) -> tuple[float, float]:
    """The C loop's own elapsed time, and the CPU of its two processes (it forks)."""
    c0 = _children_cpu()
    out = subprocess.run([binary, str(n), str(k)], check=True, capture_output=True, text=True)
    return float(out.stdout), _children_cpu() - c0


# --- driver -------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="handoffs per run")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--src", help="the src directory of the sockshare to measure (default: this tree's)")
    ap.add_argument("--modes", help="comma-separated modes to run (default: all; "
                    "raw_send_fds_1 always runs: the ratios refer to it)")
    args = ap.parse_args()
    print(f"sockshare from {Path(sockshare.__file__).parent}", file=sys.stderr)
    n = args.n - args.n % 64
    binary = build_c()
    modes: dict[str, Callable[[], tuple[float, float]]] = {
        "raw_send_fds_1": lambda: _fork_pair(raw_sender(1), raw_receiver(1), n),
        "raw_send_fds_64": lambda: _fork_pair(raw_sender(64), raw_receiver(64), n),
        "chan_unacked": lambda: _fork_pair(chan_sender(False, 1), chan_receiver, n),
        "chan_acked": lambda: _fork_pair(chan_sender(True, 1), chan_receiver, n),
        "chan_batch": lambda: _fork_pair(chan_sender(False, 64), chan_receiver, n),
        "chan_batch_acked": lambda: _fork_pair(chan_sender(True, 64), chan_receiver, n),
    }
    if binary:
        modes["c_sendmsg_1"] = lambda: run_c(binary, n, 1)
        modes["c_sendmsg_64"] = lambda: run_c(binary, n, 64)
    if args.modes:
        keep = {"raw_send_fds_1", *args.modes.split(",")}
        unknown = keep - modes.keys()
        if unknown:
            ap.error(f"unknown modes: {', '.join(sorted(unknown))}")
        modes = {m: fn for m, fn in modes.items() if m in keep}
    results: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    for run in range(args.runs):
        for name, fn in modes.items():
            wall, cpu = fn()
            results[name].append(wall / n * 1e6)  # us per handoff
            cpus[name].append(cpu / n * 1e6)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    base = statistics.median(results["raw_send_fds_1"])
    cbase = statistics.median(cpus["raw_send_fds_1"])
    print(f"\n{n} handoffs per run, {args.runs} runs, median of runs "
          f"(Python {sys.version.split()[0]}, {os.cpu_count()} cores)\n")
    print(f"{'mode':<18} {'us/handoff':>11} {'handoffs/s':>12} {'vs raw_send_fds_1':>18} "
          f"{'CPU us':>8} {'CPU vs raw':>11}")
    summary = {}
    per_run: dict[str, tuple[list[float], list[float]]] = {}
    for name, vals in results.items():
        med = statistics.median(vals)
        cmed = statistics.median(cpus[name])
        # each run against the raw_send_fds_1 run next to it (interleaved)
        per_run[name] = ([v / r for v, r in zip(vals, results["raw_send_fds_1"], strict=True)],
                         [v / r for v, r in zip(cpus[name], cpus["raw_send_fds_1"], strict=True)])
        summary[name] = {"us_per_handoff": med, "per_s": 1e6 / med, "ratio": med / base,
                         "runs": vals, "cpu_us_per_handoff": cmed, "cpu_ratio": cmed / cbase,
                         "cpu_runs": cpus[name], "run_ratios": per_run[name][0],
                         "cpu_run_ratios": per_run[name][1]}
        print(f"{name:<18} {med:>11.2f} {1e6 / med:>12,.0f} {med / base:>17.2f}x "
              f"{cmed:>8.2f} {cmed / cbase:>10.2f}x")
    print("\nper-run ratios to raw_send_fds_1 (wall / CPU):")
    for name in summary:
        if name != "raw_send_fds_1":
            walls, cpus_ = per_run[name]
            print(f"{name:<18} " + " ".join(f"{w:.2f}/{c:.2f}" for w, c in zip(walls, cpus_, strict=True)))
    out = HERE / "results" / "channel.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"n": n, "runs": args.runs, "modes": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
