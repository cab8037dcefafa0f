"""What the server does differently on Windows: event loop, processes, stop requests.

On Linux and macOS every helper here does what the server always did (asyncio's default
loop, ``asyncio.create_subprocess_exec`` in its own process group, ``add_signal_handler``),
so the POSIX path is unchanged. On Windows (docs/windows.md, "serve on Windows"):

* :func:`run` runs the coroutine on a :class:`asyncio.SelectorEventLoop`: the dispatcher
  watches listening sockets and channels with ``add_reader``, which the default
  ``ProactorEventLoop`` lacks (and Microsoft warns against sharing a socket bound to an
  I/O completion port);
* :func:`start_process` starts a worker with :class:`subprocess.Popen` in a new process
  group (a console's Ctrl+C reaches the dispatcher only) and waits for it on a thread:
  the selector loop has no subprocess support on Windows. :class:`ThreadedProcess` has
  the part of :class:`asyncio.subprocess.Process` the server uses;
* :func:`on_stop_signals` maps Ctrl+C (SIGINT) and Ctrl+Break (SIGBREAK,
  ``CTRL_BREAK_EVENT``) to a graceful stop; there is no SIGHUP/SIGUSR2: ``sockshare
  reload``/``upgrade``/``stop`` go through the control channel;
* :func:`pid_alive` asks ``OpenProcess`` (``os.kill(pid, 0)`` would *terminate* the
  process on Windows);
* :func:`split_command` splits a ``worker_cmd`` the way the shell of the platform
  would: ``shlex`` (POSIX rules) on Linux and macOS, the rules of the Microsoft C
  runtime (``CommandLineToArgvW``) on Windows, where ``shlex`` would eat the
  backslashes of ``C:\\path\\to\\worker.exe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar, cast

__all__ = ["WINDOWS", "ThreadedProcess", "close_fd", "dup_fd", "on_stop_signals", "pid_alive", "run",
           "split_command", "split_windows", "start_process"]

WINDOWS = sys.platform == "win32"

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``; on Windows on a selector loop (see the module's docstring)."""
    if WINDOWS:
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def split_command(cmd: str) -> list[str]:
    """``cmd`` split into argv as this platform's shell would (see the module's docstring)."""
    return split_windows(cmd) if WINDOWS else shlex.split(cmd)


def split_windows(cmd: str) -> list[str]:
    """Split a command line by the rules of the Microsoft C runtime (what
    :func:`subprocess.list2cmdline` writes): blanks separate arguments outside double
    quotes; a backslash is literal unless a run of them ends at a ``"``: then 2n
    backslashes give n and the quote opens or closes, 2n+1 give n and a literal quote.
    Inside quotes, ``""`` is a literal quote (as the CRT since 2008 reads it)."""
    args: list[str] = []
    cur: list[str] = []
    has_arg = False
    quoted = False
    i, n = 0, len(cmd)
    while i < n:
        c = cmd[i]
        if c == "\\":
            j = i
            while j < n and cmd[j] == "\\":
                j += 1
            run_len = j - i
            if j < n and cmd[j] == '"':
                cur.append("\\" * (run_len // 2))
                if run_len % 2:
                    cur.append('"')
                    j += 1
            else:
                cur.append("\\" * run_len)
            has_arg = True
            i = j
            continue
        if c == '"':
            has_arg = True
            if quoted and i + 1 < n and cmd[i + 1] == '"':
                cur.append('"')
                i += 2
                continue
            quoted = not quoted
        elif c in " \t" and not quoted:
            if has_arg:
                args.append("".join(cur))
                cur, has_arg = [], False
        else:
            cur.append(c)
            has_arg = True
        i += 1
    if has_arg:
        args.append("".join(cur))
    return args


def dup_fd(fd: int) -> int:
    """A duplicate of a connection's descriptor (Windows: a socket handle, duplicated
    with ``WSADuplicateSocket`` into this process; ``os.dup`` knows only CRT fds there)."""
    return socket.dup(fd) if WINDOWS else os.dup(fd)


def close_fd(fd: int) -> None:
    """Close what :func:`dup_fd` returned, unwrapped."""
    if WINDOWS:
        socket.close(fd)
    else:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (Windows: ``OpenProcess`` + ``GetExitCodeProcess``)."""
    from sockshare._tokens import _pid_alive

    return _pid_alive(pid)


class ThreadedProcess:
    """A :class:`subprocess.Popen` waited for on a thread, seen from the event loop as
    the server uses an :class:`asyncio.subprocess.Process`: ``pid``, ``returncode``
    (set on the loop, once the process is gone), ``await wait()``, ``kill()``,
    ``terminate()``, ``send_signal()``."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self._done: asyncio.Future[int] = loop.create_future()
        self._loop = loop
        threading.Thread(target=self._wait, name=f"wait-{self.pid}", daemon=True).start()

    def _wait(self) -> None:
        rc = self._popen.wait()
        # the process handle now, not when the Popen is collected: a dispatcher that
        # restarts and reloads workers for months keeps its handle count flat
        handle = getattr(self._popen, "_handle", None)
        close = getattr(handle, "Close", None)
        if close is not None:
            with contextlib.suppress(OSError):
                close()
        try:
            self._loop.call_soon_threadsafe(self._exited, rc)
        except RuntimeError:   # the loop is closed: nobody waits any more
            pass

    def _exited(self, rc: int) -> None:
        self.returncode = rc
        if not self._done.done():
            self._done.set_result(rc)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        """On Windows anything but CTRL_C_EVENT/CTRL_BREAK_EVENT is TerminateProcess."""
        if self.returncode is None:
            self._popen.send_signal(sig)

    def terminate(self) -> None:
        if self.returncode is None:
            self._popen.terminate()

    def kill(self) -> None:
        if self.returncode is None:
            self._popen.kill()


async def start_process(argv: Sequence[str], env: Mapping[str, str],
                        **kwargs: Any) -> asyncio.subprocess.Process:
    """Start a worker (or a new dispatcher): its own process group, stdin /dev/null."""
    if not WINDOWS:
        return await asyncio.create_subprocess_exec(*argv, env=env, process_group=0,
                                                    stdin=asyncio.subprocess.DEVNULL, **kwargs)
    if kwargs:
        raise ValueError(f"not on Windows: {', '.join(sorted(kwargs))}")
    popen = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                             creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
    # (the server calls only what ThreadedProcess has)
    return cast(asyncio.subprocess.Process, ThreadedProcess(popen, asyncio.get_running_loop()))


def on_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[str], None]) -> Callable[[], None]:
    """Windows: Ctrl+C and Ctrl+Break call ``stop(name)`` on the loop. Returns the undo."""
    names: dict[int, str] = {signal.SIGINT: "SIGINT"}
    brk = getattr(signal, "SIGBREAK", None)
    if brk is not None:
        names[brk] = "SIGBREAK"
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(stop, names.get(signum, str(signum)))

    for sig in names:
        previous[sig] = signal.signal(sig, handler)

    def undo() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return undo
