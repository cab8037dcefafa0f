"""Who is alive: a process identity that survives pid reuse, for crash recovery.

A carrier that shares state between processes must tell a peer that died (SIGKILL, OOM,
a crash) from one that is merely slow. A pid alone is not enough: after a death the
number is free for the next process. :class:`ProcIdent` is the pid plus the process's
start time (field 22 of ``/proc/<pid>/stat``, in clock ticks since boot) plus the inode
of its pid namespace; :func:`alive` says False only when that exact process is gone:
no ``/proc/<pid>`` entry, a zombie (killed but not yet collected by its parent), or a
different start time (the pid was reused).

A process in another pid namespace cannot be judged (its pid means nothing here):
:func:`alive` then says True, so nothing is ever taken from a live process. Without
``/proc`` (not Linux) it falls back to ``kill(pid, 0)``, which cannot see pid reuse.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

__all__ = ["IDENT", "ProcIdent", "alive", "self_ident"]


class ProcIdent(NamedTuple):
    pid: int
    start: int  # start time in clock ticks since boot; 0 when unknown
    ns: int  # inode of /proc/<pid>/ns/pid; 0 when unknown


#: How a :class:`ProcIdent` is stored in shared memory or a file (24 bytes).
IDENT = struct.Struct("<QQQ")

_cache: tuple[int, ProcIdent] | None = None


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    return data.rpartition(b")")[2].split()


def _namespace(pid: int | str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def self_ident() -> ProcIdent:
    """This process's identity (computed once per process; a fork() child gets its own)."""
    global _cache
    pid = os.getpid()
    if _cache is not None and _cache[0] == pid:
        return _cache[1]
    start = 0
    try:
        fields = _stat_fields("self")
        if fields is not None and len(fields) > 19:
            start = int(fields[19])
    except (OSError, ValueError):
        pass
    ident = ProcIdent(pid, start, _namespace("self"))
    _cache = (pid, ident)
    return ident


def alive(ident: ProcIdent) -> bool:
    """False only if the process ``ident`` names is certainly gone (see the module doc)."""
    if ident.pid <= 0:
        return False
    me = self_ident()
    if ident.ns and me.ns and ident.ns != me.ns:
        return True  # another pid namespace: its pid cannot be looked up from here
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(ident.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        fields = _stat_fields(ident.pid)
    except OSError:
        return True  # cannot read it: assume alive, never take from a live process
    if fields is None:
        return False
    if fields and fields[0] in (b"Z", b"X", b"x"):
        return False  # killed; only its parent has not collected it yet
    if ident.start and len(fields) > 19:
        try:
            return int(fields[19]) == ident.start
        except ValueError:
            return True
    return True
