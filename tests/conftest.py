"""Shared pytest fixtures: short socket directories, fd counting, child processes.

Every test that starts a process registers it with ``procs`` so that it is ended (by
pid, never by name) even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")


def fd_count(pid: int | str = "self") -> int:
    """Open descriptors of a process, from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory for UNIX socket paths (sun_path is ~108 bytes)."""
    d = tempfile.mkdtemp(prefix="ss-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Procs:
    """Start Python child processes and make sure they end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def python(
        self,
        code: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        pass_fds: Collection[int] = (),
        stdin: int | IO[bytes] | None = None,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        stderr: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``python -c code args...`` with this tree's ``src`` first on PYTHONPATH and *env*
        added to this process's environment; stdout is a pipe unless told otherwise."""
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        p = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=full_env,
            pass_fds=pass_fds,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )
        self.started.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.started:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr, p.stdin):
                if f is not None:
                    f.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the wineserver the Windows tests started (it would idle on for 15 minutes)."""
    from tests import wine_support

    wine_support.shutdown()
