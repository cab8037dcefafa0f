"""Benchmark: one socket handed from an exporter process to an importer process.

    python benchmarks/tokens.py [--n N] [--runs R] [--warmup W] [--profile]

Two processes, connected by an already-open UNIX stream socket (the *link*). The
exporter holds a connected TCP socket (127.0.0.1) and hands it over ``N`` times per
run, three ways, interleaved run by run so that machine noise hits all three alike:

``token``
    ``sockshare.export_socket(sock, importer_pid)``, the token sent over the link;
    the importer calls ``sockshare.import_socket(token)`` (its own exchange with the
    exporter's agent: connect, CLAIM, GRANT + SCM_RIGHTS, DONE) and closes the socket.
``send_fds`` (baseline 1)
    ``socket.send_fds`` of the descriptor over the link; ``socket.recv_fds``, a socket
    object made from the fd (family/type given), closed.
``pidfd_getfd`` (baseline 2)
    the exporter sends the descriptor number; the importer pulls it with
    ``pidfd_getfd`` (``sockshare.backends._pidfd``, a pidfd opened once), wraps, closes.

Each handoff is timed from the exporter's clock reading just before it starts
(``export_socket`` / ``send_fds`` / sending the number) to the importer's reading right
after it closed the socket it received; the start time travels in the message
(``time.perf_counter_ns`` is CLOCK_MONOTONIC, one clock for both processes). The
importer then sends a 1-byte ack, and the exporter starts the next handoff only after
it: one handoff in flight at a time. Per run: median and p99; reported: the median of
the run medians (and of the run p99s), and ratios to baseline 1.

``--profile`` runs cProfile in the importer (its ``import_socket`` calls) and in the
exporter's agent thread, and prints the top entries of both.

Results go to ``benchmarks/results/tokens.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sockshare
from sockshare.backends import _pidfd

METHODS = ("token", "send_fds", "pidfd_getfd")
RESULTS = Path(__file__).parent / "results" / "tokens.json"
_T0 = struct.Struct("=q")  # exporter's perf_counter_ns at the start of a handoff
_NUM = struct.Struct("=qi")  # t0, fd number
IO_TIMEOUT = 30.0


# --- exporter (child process) -------------------------------------------------------


def _connected_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lst.getsockname(), timeout=IO_TIMEOUT)
    srv, _ = lst.accept()
    return lst, cli, srv


def _profile_agent_thread() -> cProfile.Profile:
    """Profile the export agent thread: start the agent, then wrap its loop."""
    prof = cProfile.Profile()
    from sockshare.backends._agent import agent

    ag = agent()
    original = ag._run

    def profiled() -> None:
        prof.enable()
        try:
            original()
        finally:
            prof.disable()

    ag._run = profiled  # type: ignore[method-assign]
    return prof


def exporter_main(link_fd: int, importer_pid: int, profile: bool) -> None:
    link = socket.socket(fileno=link_fd)
    link.settimeout(IO_TIMEOUT)
    lst, cli, srv = _connected_pair()
    fd = srv.fileno()
    prof = _profile_agent_thread() if profile else None
    export_ns: list[int] = []
    cpu_ns: dict[str, list[float]] = {}  # method -> process CPU ns per handoff, per batch
    rf = link.makefile("rb", buffering=0)
    while True:
        cmd = rf.read(5)  # method letter + handoff count
        if not cmd or cmd[:1] == b"q":
            break
        method, n = cmd[:1], struct.unpack("=I", cmd[1:])[0]
        c0 = time.process_time_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            if method == b"t":
                token = sockshare.export_socket(srv, importer_pid)
                export_ns.append(time.perf_counter_ns() - t0)
                link.sendall(b"%d %s\n" % (t0, token.encode()))
            elif method == b"f":
                socket.send_fds(link, [_T0.pack(t0)], [fd])
            else:
                link.sendall(_NUM.pack(t0, fd))
            if link.recv(1) != b"a":
                raise SystemExit("importer went away")
        cpu_ns.setdefault(method.decode(), []).append((time.process_time_ns() - c0) / max(n, 1))
    # the connection survived every handoff
    srv.sendall(b"ok")
    assert cli.recv(2) == b"ok"
    report: dict[str, Any] = {"export_ns": export_ns, "cpu_ns": cpu_ns}
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        report["agent_profile"] = s.getvalue()
    data = json.dumps(report).encode()
    link.sendall(struct.pack("=I", len(data)) + data)
    for s_ in (srv, cli, lst, link):
        s_.close()


# --- importer (this process) ----------------------------------------------------------


class Importer:
    def __init__(self, link: socket.socket, exporter_pid: int) -> None:
        self.link = link
        self.rf = link.makefile("rb", buffering=0)
        self.pidfd = -1
        ok, why = _pidfd.available()
        self.pidfd_why = why
        if ok:
            try:
                self.pidfd = _pidfd.pidfd_open(exporter_pid)
            except (OSError, sockshare.BackendUnavailable) as exc:
                self.pidfd_why = str(exc)
        self.import_ns: list[int] = []

    def _command(self, method: bytes, n: int) -> None:
        self.link.sendall(method + struct.pack("=I", n))

    def run(self, method: str, n: int) -> list[int]:
        """``n`` handoffs by ``method``; return their latencies in ns."""
        out: list[int] = []
        link = self.link
        if method == "token":
            self._command(b"t", n)
            buf = b""
            for _ in range(n):
                while b"\n" not in buf:
                    chunk = link.recv(4096)
                    if not chunk:
                        raise EOFError("exporter went away")
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                stamp, token = line.split(b" ", 1)
                ti = time.perf_counter_ns()
                s = sockshare.import_socket(token.decode("ascii"))
                s.close()
                t1 = time.perf_counter_ns()
                self.import_ns.append(t1 - ti)
                out.append(t1 - int(stamp))
                link.sendall(b"a")
        elif method == "send_fds":
            self._command(b"f", n)
            for _ in range(n):
                data, fds, _flags, _addr = socket.recv_fds(link, _T0.size, 1)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fds[0])
                s.close()
                t1 = time.perf_counter_ns()
                out.append(t1 - _T0.unpack(data)[0])
                link.sendall(b"a")
        else:
            self._command(b"p", n)
            for _ in range(n):
                t0, num = _NUM.unpack(self._read_exact(_NUM.size))
                new = _pidfd.pidfd_getfd(self.pidfd, num)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=new)
                s.close()
                t1 = time.perf_counter_ns()
                out.append(t1 - t0)
                link.sendall(b"a")
        return out

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.rf.read(n - len(buf))
            if not chunk:
                raise EOFError("the exporter went away")
            buf += chunk
        return buf

    def finish(self) -> dict[str, Any]:
        self.link.sendall(b"q\0\0\0\0")
        (size,) = struct.unpack("=I", self._read_exact(4))
        report: dict[str, Any] = json.loads(self._read_exact(size))
        if self.pidfd >= 0:
            os.close(self.pidfd)
        return report


def _pct(values: list[int], q: float) -> float:
    s = sorted(values)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="handoffs per method per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=200, help="untimed handoffs first")
    ap.add_argument("--profile", action="store_true", help="cProfile importer and agent")
    ap.add_argument("--only", choices=METHODS, action="append",
                    help="measure only this method (repeatable; send_fds is always kept)")
    ap.add_argument("--role", default="importer", help=argparse.SUPPRESS)
    ap.add_argument("--link-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--importer-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "exporter":
        exporter_main(args.link_fd, args.importer_pid, args.profile)
        return

    mine, theirs = socket.socketpair()
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "exporter",
           "--link-fd", str(theirs.fileno()), "--importer-pid", str(os.getpid())]
    if args.profile:
        cmd.append("--profile")
    proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
    theirs.close()
    mine.settimeout(IO_TIMEOUT)
    try:
        imp = Importer(mine, proc.pid)
        methods = [m for m in METHODS if m != "pidfd_getfd" or imp.pidfd >= 0]
        if args.only:
            methods = [m for m in methods if m in args.only or m == "send_fds"]
        for m in methods:
            imp.run(m, args.warmup)
        imp.import_ns.clear()
        prof = cProfile.Profile() if args.profile else None
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for _r in range(args.runs):
            for m in methods:
                if prof is not None and m == "token":
                    prof.enable()
                c0 = time.process_time_ns()
                lat = imp.run(m, args.n)
                cpu = (time.process_time_ns() - c0) / args.n
                if prof is not None and m == "token":
                    prof.disable()
                runs[m].append({"median_us": statistics.median(lat) / 1e3,
                                "p99_us": _pct(lat, 0.99) / 1e3,
                                "min_us": min(lat) / 1e3,
                                "importer_cpu_us": cpu / 1e3})
        exporter_report = imp.finish()
        proc.wait(timeout=IO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mine.close()

    summary: dict[str, dict[str, float]] = {}
    letters = {"token": "t", "send_fds": "f", "pidfd_getfd": "p"}
    for m in methods:
        # the exporter's batches: warm-up first, then one per run
        for r, c in zip(runs[m], exporter_report["cpu_ns"][letters[m]][1:], strict=True):
            r["exporter_cpu_us"] = c / 1e3
        meds = [r["median_us"] for r in runs[m]]
        summary[m] = {
            "median_us": statistics.median(meds),
            "p99_us": statistics.median(r["p99_us"] for r in runs[m]),
            "run_median_min_us": min(meds),
            "run_median_max_us": max(meds),
            "importer_cpu_us": statistics.median(r["importer_cpu_us"] for r in runs[m]),
            "exporter_cpu_us": statistics.median(r["exporter_cpu_us"] for r in runs[m]),
        }
    base = summary["send_fds"]["median_us"]
    for m in methods:
        summary[m]["ratio_to_send_fds"] = summary[m]["median_us"] / base
    exp_ns = exporter_report["export_ns"]
    parts = {
        "export_socket_median_us": statistics.median(exp_ns) / 1e3 if exp_ns else 0.0,
        "import_socket_median_us": (statistics.median(imp.import_ns) / 1e3
                                    if imp.import_ns else 0.0),
    }

    print(f"\nsocket handoff between two processes: {args.runs} runs x {args.n} handoffs, "
          f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python "
          f"{platform.python_version()}")
    print(f"{'method':<14}{'median µs':>11}{'p99 µs':>10}{'runs (min..max)':>20}"
          f"{'x send_fds':>12}{'CPU µs: imp + exp':>20}")
    for m in methods:
        s = summary[m]
        print(f"{m:<14}{s['median_us']:>11.1f}{s['p99_us']:>10.1f}"
              f"{s['run_median_min_us']:>10.1f}..{s['run_median_max_us']:<8.1f}"
              f"{s['ratio_to_send_fds']:>12.2f}"
              f"{s['importer_cpu_us']:>11.1f} + {s['exporter_cpu_us']:<6.1f}")
    if imp.pidfd < 0:
        print(f"pidfd_getfd: not measured ({imp.pidfd_why})")
    print(f"token parts (medians): export_socket {parts['export_socket_median_us']:.1f} µs "
          f"in the exporter, import_socket {parts['import_socket_median_us']:.1f} µs in "
          "the importer")
    target = 100.0
    if "token" in summary:
        verdict = "met" if summary["token"]["median_us"] < target else "MISSED"
        print(f"target: token median under {target:.0f} µs: {verdict}")

    if prof is not None:
        profile_text = io.StringIO()
        pstats.Stats(prof, stream=profile_text).sort_stats("cumulative").print_stats(25)
        print("\n=== importer (token runs), cumulative ===\n" + profile_text.getvalue())
        print("=== exporter agent thread, cumulative ===\n"
              + exporter_report.get("agent_profile", ""))

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "tokens",
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "machine": platform.machine()},
        "n": args.n, "runs_count": args.runs, "warmup": args.warmup,
        "profiled": args.profile,
        "summary": summary, "token_parts": parts, "runs": runs,
        "pidfd_unavailable": "" if imp.pidfd >= 0 else imp.pidfd_why,
    }, indent=2) + "\n")
    print(f"\nwritten: {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
