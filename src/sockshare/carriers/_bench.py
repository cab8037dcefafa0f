"""Benchmark the carriers between two real processes: latency (p50/p99) and throughput.

For each carrier this parent process starts a child (``python -m
sockshare.carriers._bench child ...``); the child opens the reader of a forward carrier,
the parent the reader of a backward one of the same kind. Then:

* latency: ``rounds`` ping-pongs of a ``size``-byte message; one-way latency is half
  of each round trip (no cross-process clock needed), after a short warm-up;
* throughput: ``messages`` messages one way as fast as the carrier takes them, timed
  from the first send to the child's "done" coming back.

Every wait has a timeout and the child is ended (by its own pid) if it outlives the run,
so a broken carrier makes the benchmark report an error, not hang. The plot
(:func:`write_plot`) imports matplotlib lazily; it is an optional dependency.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockshare._errors import SockshareError
from sockshare.carriers._libc import call as c_call
from sockshare.carriers._libc import missing as c_missing
from sockshare.carriers._registry import CARRIERS, available
from sockshare.carriers._registry import open as open_carrier

__all__ = ["BenchResult", "check_plot_support", "format_table", "run_bench", "write_plot"]

_OP_TIMEOUT = 30.0  # no single send/recv of the benchmark may take longer
_CHILD_EXIT = 15.0


@dataclass(frozen=True)
class BenchResult:
    """One carrier's figures (``error`` set, figures 0, if it failed)."""

    scheme: str
    size: int
    max_message: int
    rounds: int
    messages: int
    p50_us: float = 0.0
    p99_us: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    error: str = ""


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _free_sysv_key() -> int:
    """A System V key with no queue behind it (readers open-or-create)."""
    if c_missing("msgget"):
        return 0x5C0F0001
    for _ in range(100):
        key = random.randrange(0x5C100000, 0x5CFFFFFF)
        if c_call("msgget", key, 0) < 0:
            return key
    raise RuntimeError("no free System V key found")


def reader_url(scheme: str, directory: str, tag: str) -> str:
    """A fresh address for a reader of ``scheme`` (files go in ``directory``)."""
    unique = f"sockshare-bench-{os.getpid()}-{tag}"
    return {
        "unix": f"unix://{directory}/{tag}.sock",
        "unixgram": f"unixgram://{directory}/{tag}.dgram",
        "tcp": "tcp://127.0.0.1:0",
        "udp": "udp://127.0.0.1:0",
        "fifo": f"fifo://{directory}/{tag}.fifo",
        "mq": f"mq:///{unique}",
        "sysvmq": f"sysvmq://{_free_sysv_key():#x}",
        "shm": f"shm://{unique}",
    }[scheme]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent.parent)  # the folder holding sockshare/
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_carrier(
    scheme: str,
    *,
    rounds: int,
    messages: int,
    size: int,
    progress: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Benchmark one carrier with a child process; errors are reported in the result."""
    max_message = CARRIERS[scheme].max_message
    size = min(size, max_message)
    base = BenchResult(scheme, size, max_message, rounds, messages)
    directory = tempfile.mkdtemp(prefix="ssb-")
    child: subprocess.Popen[bytes] | None = None
    try:
        with open_carrier(reader_url(scheme, directory, "back"), "r", timeout=_OP_TIMEOUT) as back:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sockshare.carriers._bench",
                    "child",
                    reader_url(scheme, directory, "fwd"),
                    back.url,
                    str(rounds + _warmup(rounds)),
                    str(messages),
                ],
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            hello = back.recv()
            if not hello.startswith(b"ready "):
                raise RuntimeError(f"unexpected hello from the child: {hello[:60]!r}")
            with open_carrier(hello[6:].decode(), "w", timeout=_OP_TIMEOUT) as fwd:
                result = _measure(base, fwd.send, back.recv, progress)
                fwd.send(b"bye")
            if child.wait(timeout=_CHILD_EXIT) != 0:
                raise RuntimeError(f"child exited with {child.returncode}")
        return result
    except (SockshareError, OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        detail = ""
        if child is not None and child.poll() is not None and child.stderr is not None:
            last = child.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            detail = f" (child: {last[0]})" if last else ""
        return BenchResult(scheme, size, max_message, rounds, messages, error=f"{exc}{detail}")
    finally:
        if child is not None:
            if child.poll() is None:
                child.kill()  # our own child, by its pid
            child.wait()
            if child.stderr is not None:
                child.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)


def _warmup(rounds: int) -> int:
    return max(10, rounds // 10)


def _measure(
    base: BenchResult,
    send: Callable[[bytes], None],
    recv: Callable[[], bytes],
    progress: Callable[[str], None],
) -> BenchResult:
    payload = os.urandom(base.size)
    warmup = _warmup(base.rounds)
    samples: list[float] = []
    shown = time.monotonic()
    for i in range(base.rounds + warmup):
        t0 = time.perf_counter_ns()
        send(payload)
        echo = recv()
        t1 = time.perf_counter_ns()
        if len(echo) != len(payload):
            raise RuntimeError("the echo does not match what was sent")
        if i >= warmup:
            samples.append((t1 - t0) / 2000.0)  # one way, in microseconds
        if time.monotonic() - shown > 0.1:
            progress(f"latency {i + 1}/{base.rounds + warmup}")
            shown = time.monotonic()
    samples.sort()
    t0 = time.perf_counter_ns()
    for i in range(base.messages):
        send(payload)
        if time.monotonic() - shown > 0.1:
            progress(f"throughput {i + 1}/{base.messages}")
            shown = time.monotonic()
    if recv() != b"done":
        raise RuntimeError("the child did not confirm the messages")
    elapsed = max(1e-9, (time.perf_counter_ns() - t0) / 1e9)
    rate = base.messages / elapsed
    return BenchResult(
        base.scheme,
        base.size,
        base.max_message,
        base.rounds,
        base.messages,
        p50_us=_percentile(samples, 0.50),
        p99_us=_percentile(samples, 0.99),
        msgs_per_s=rate,
        mb_per_s=rate * base.size / 1e6,
    )


def run_bench(
    schemes: Sequence[str] | None = None,
    *,
    rounds: int = 2000,
    messages: int = 20000,
    size: int = 256,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[BenchResult], dict[str, str]]:
    """Benchmark ``schemes`` (default: every carrier that works here).

    Returns the results and, for carriers skipped as unavailable, the reason.
    """
    status = available()
    wanted = list(schemes) if schemes else list(CARRIERS)
    results: list[BenchResult] = []
    skipped: dict[str, str] = {}
    usable = [s for s in wanted if status[s].available]
    for s in wanted:
        if not status[s].available:
            skipped[s] = status[s].detail
    for n, scheme in enumerate(usable, 1):
        prefix = f"[{n}/{len(usable)}] {scheme:<9}"
        progress(f"{prefix} starting")
        results.append(
            run_carrier(
                scheme,
                rounds=rounds,
                messages=messages,
                size=size,
                progress=functools.partial(_prefixed, progress, prefix),
            )
        )
    return results, skipped


def _prefixed(progress: Callable[[str], None], prefix: str, text: str) -> None:
    progress(f"{prefix} {text}")


def format_table(results: Sequence[BenchResult]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| carrier | max_message (B) | msg size (B) | p50 latency (µs) | p99 latency (µs) "
        "| throughput (msg/s) | throughput (MB/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.scheme} | {r.max_message} | {r.size} | error: {r.error} | | | |")
        else:
            lines.append(
                f"| {r.scheme} | {r.max_message} | {r.size} | {r.p50_us:.1f} | {r.p99_us:.1f} "
                f"| {r.msgs_per_s:,.0f} | {r.mb_per_s:.1f} |"
            )
    return "\n".join(lines)


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: pip install 'sockshare[bench]'"
        ) from exc
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def check_plot_support() -> None:
    """Raise :class:`PlotUnavailable` early, before a long run, if plotting cannot work."""
    _pyplot()


def write_plot(results: Sequence[BenchResult], path: str, title: str) -> None:
    """Bar charts of latency (p50, p99) and throughput per carrier, as a PNG."""
    plt = _pyplot()
    ok = [r for r in results if not r.error]
    names = [r.scheme for r in ok]
    ys = list(range(len(ok)))
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 0.5 * len(ok) + 2.2))
    lat.barh([y + 0.2 for y in ys], [r.p50_us for r in ok], height=0.4, label="p50")
    lat.barh([y - 0.2 for y in ys], [r.p99_us for r in ok], height=0.4, label="p99")
    lat.set_xscale("log")
    lat.set_xlabel("one-way latency (µs, log scale)")
    lat.set_yticks(ys, names)
    lat.invert_yaxis()
    lat.legend()
    thr.barh(ys, [r.msgs_per_s / 1000 for r in ok], height=0.6, color="tab:green")
    thr.set_xlabel("throughput (thousand messages/s)")
    thr.set_yticks(ys, names)
    thr.invert_yaxis()
    for ax in (lat, thr):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the child side -------------------------------------------------------------------


def _child(fwd_url: str, back_url: str, rounds: int, messages: int) -> int:
    with (
        open_carrier(fwd_url, "r", timeout=_OP_TIMEOUT) as rx,
        open_carrier(back_url, "w", timeout=_OP_TIMEOUT) as tx,
    ):
        tx.send(b"ready " + rx.url.encode())
        for _ in range(rounds):
            tx.send(rx.recv())
        for _ in range(messages):
            rx.recv()
        tx.send(b"done")
        with contextlib.suppress(SockshareError):
            rx.recv()  # "bye": the parent's writer is finished with our reader
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 5 or args[0] != "child":
        print("usage: python -m sockshare.carriers._bench child FWD_URL BACK_URL ROUNDS MESSAGES")
        return 2
    return _child(args[1], args[2], int(args[3]), int(args[4]))


if __name__ == "__main__":
    sys.exit(main())
