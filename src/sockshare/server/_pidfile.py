"""``--pid-file``: the server's pid in a file, for init scripts and monitors (under a
master, ``sockshare serve`` as started, the master's: the pid to signal).

:func:`claim` runs before the listeners are bound: a file naming a live process other
than the dispatcher being upgraded refuses the start (:class:`PidFileError`); a stale
one (its pid is dead, or it holds no pid) is replaced later. :func:`write` puts our pid
there (atomically: a temporary file renamed), once the listeners are bound -- for the new
dispatcher of an upgrade, once it has taken over. :func:`remove` deletes it on exit, only
if it still names us (after an upgrade it names the successor).
"""

from __future__ import annotations

import contextlib
import os
import sys

from sockshare._errors import SockshareError

__all__ = ["PidFileError", "claim", "pid_alive", "read", "remove", "write"]


class PidFileError(SockshareError, OSError):
    """``--pid-file`` names a running process, or cannot be written."""


def read(path: str) -> int | None:
    """The pid in ``path``; None if there is no file or no pid in it."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidFileError(f"pid file {path!r}: {exc}") from exc
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone. Read
    from ``/proc`` where there is one, else asked with signal 0 (Windows: OpenProcess;
    ``os.kill(pid, 0)`` would terminate it there)."""
    if sys.platform == "win32":
        from sockshare._tokens import _pid_alive

        return _pid_alive(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True





def claim(path: str, *, predecessor: int = 0, owner: int = 0) -> None:
    """Refuse to start if ``path`` names a live process (other than ``predecessor``, the
    dispatcher we take over from, ``owner``, the master we run under, and ourselves)."""
    pid = read(path)
    if (pid is None or pid in (os.getpid(), predecessor, owner) or pid <= 0
            or not pid_alive(pid)):
        return
    raise PidFileError(f"pid file {path!r}: process {pid} is running (another sockshare "
                       "serve?); stop it, or remove the file if that pid is not a server")


def write(path: str, pid: int = 0) -> None:
    """Write ``pid`` (default: ours) to ``path`` (replacing a stale file). Under a master
    (``sockshare serve`` as started), the master's pid: the one to signal."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{pid or os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PidFileError(f"cannot write the pid file {path!r}: {exc}") from exc


def remove(path: str, pid: int = 0) -> None:
    """Delete ``path`` if it names ``pid`` (default: this process)."""
    with contextlib.suppress(OSError, SockshareError):
        if read(path) == (pid or os.getpid()):
            os.unlink(path)
