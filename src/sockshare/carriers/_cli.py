"""Command-line front end of the carriers: ``send``, ``recv`` and ``bench carriers``.

:func:`add_commands` registers the subcommands on the ``sockshare`` parser (the lead's
``sockshare.cli``); ``python -m sockshare.carriers._cli`` runs them on their own::

    sockshare recv mq:///jobs --timeout 10 &      # the reader creates the queue
    sockshare send mq:///jobs 'hello' --timeout 5 # waits up to 5 s for it to exist
    sockshare bench carriers --plot carriers.png

Exit status: 0 done, 1 a carrier error (message on stderr), 2 usage, 3 timeout.
``recv`` writes each message's raw bytes to stdout followed by a newline.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

from sockshare._errors import CarrierNotFound, CarrierTimeout, SockshareError
from sockshare.carriers._base import Backoff, Deadline
from sockshare.carriers._registry import CARRIERS
from sockshare.carriers._registry import open as open_carrier

__all__ = ["add_commands", "main"]

EXIT_ERROR = 1
EXIT_TIMEOUT = 3


def _timeout(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"timeout must be >= 0, not {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value


def _fail(exc: BaseException) -> int:
    print(f"sockshare: error: {exc}", file=sys.stderr)
    return EXIT_TIMEOUT if isinstance(exc, CarrierTimeout) else EXIT_ERROR


def _cmd_send(args: argparse.Namespace) -> int:
    message: bytes
    if args.message == "-":
        message = sys.stdin.buffer.read()
    else:
        message = args.message.encode("utf-8", "surrogateescape")
    deadline = Deadline(args.timeout)
    backoff = Backoff(deadline, first=1e-3, cap=0.05)
    try:
        while True:  # a reader started just before us may not have created it yet
            try:
                carrier = open_carrier(args.url, "w", timeout=deadline.remaining())
                break
            except CarrierNotFound:
                if args.timeout is None or deadline.expired():
                    raise
                backoff.pause()
        with carrier:
            carrier.send(message, timeout=deadline.remaining())
    except (SockshareError, ValueError) as exc:
        return _fail(exc)
    return 0


def _cmd_recv(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    try:
        with open_carrier(args.url, "r", timeout=args.timeout) as carrier:
            for _ in range(args.count):
                out.write(carrier.recv() + b"\n")
                out.flush()
    except (SockshareError, ValueError) as exc:
        return _fail(exc)
    return 0


class _Progress:
    """One stderr line rewritten in place on a terminal; plain lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.width = 0

    def __call__(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            pad = " " * max(0, self.width - len(text))
            sys.stderr.write(f"\r{text}{pad}")
            self.width = len(text)
        else:
            phase = text.split()[:3]  # "[n/N] scheme phase": one line per phase
            if phase != self.last.split()[:3]:
                sys.stderr.write(text + "\n")
        self.last = text
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and not self.quiet and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def _cmd_bench(args: argparse.Namespace) -> int:
    from sockshare.carriers import _bench

    if args.plot:
        try:
            _bench.check_plot_support()
        except _bench.PlotUnavailable as exc:
            return _fail(exc)
    schemes: list[str] | None = None
    if args.only:
        schemes = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in schemes if s not in CARRIERS]
        if unknown:
            print(f"sockshare: error: unknown carrier(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
    progress = _Progress(args.quiet)
    started = time.monotonic()
    try:
        results, skipped = _bench.run_bench(
            schemes, rounds=args.rounds, messages=args.messages, size=args.size, progress=progress
        )
    finally:
        progress.done()
    title = (
        f"sockshare bench carriers: {args.size}-byte messages, {args.rounds} round trips, "
        f"{args.messages} messages one way; {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {time.monotonic() - started:.1f} s"
    )
    print(title)
    print()
    print(_bench.format_table(results))
    for scheme, reason in skipped.items():
        print(f"skipped {scheme}: {reason}")
    if args.plot:
        _bench.write_plot(results, args.plot, title.split(";", maxsplit=1)[0])
        print(f"plot written to {args.plot}")
    return EXIT_ERROR if any(r.error for r in results) else 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``send``, ``recv`` and ``bench`` on the ``sockshare`` command line."""
    schemes = ", ".join(f"{s}://" for s in CARRIERS)
    send = subparsers.add_parser(
        "send",
        help="send one message over a carrier URL",
        description=f"Send MESSAGE over a carrier ({schemes}). With --timeout, wait that long "
        "for the reader to create the queue/pipe/ring and for room in it.",
    )
    send.add_argument("url", metavar="URL", help="e.g. mq:///jobs, unix:///tmp/x.sock")
    send.add_argument("message", metavar="MESSAGE", help="the message; '-' reads it from stdin")
    send.add_argument("--timeout", type=_timeout, default=None, metavar="S", help="seconds (default: wait)")
    send.set_defaults(func=_cmd_send)

    recv = subparsers.add_parser(
        "recv",
        help="receive messages from a carrier URL",
        description="Open the reading end of URL (creating the queue/pipe/ring/address and "
        "removing it on exit), print each message's bytes and a newline.",
    )
    recv.add_argument("url", metavar="URL")
    recv.add_argument(
        "--timeout", type=_timeout, default=None, metavar="S", help="per message (default: wait)"
    )
    recv.add_argument("--count", type=_positive, default=1, metavar="N", help="messages to receive (1)")
    recv.set_defaults(func=_cmd_recv)

    bench = subparsers.add_parser(
        "bench",
        help="benchmark sockshare components",
        description="Measure latency (p50/p99, one way) and throughput of every carrier "
        "between two processes.",
    )
    bench.add_argument("what", choices=["carriers"], help="what to benchmark")
    bench.add_argument("--only", metavar="LIST", help="comma-separated schemes (default: all that work)")
    bench.add_argument("--rounds", type=_positive, default=2000, help="ping-pong rounds for latency (2000)")
    bench.add_argument("--messages", type=_positive, default=20000, help="messages for throughput (20000)")
    bench.add_argument("--size", type=int, default=256, help="message size in bytes (256)")
    bench.add_argument("--plot", metavar="FILE", help="also write a PNG chart (needs matplotlib)")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.set_defaults(func=_cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the carrier subcommands without the rest of the ``sockshare`` CLI."""
    parser = argparse.ArgumentParser(prog="sockshare", description="sockshare carriers")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
