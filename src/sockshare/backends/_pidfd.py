"""Linux ``pidfd_open`` / ``pidfd_getfd``: pull a descriptor out of another process.

``pidfd_getfd(2)`` (Linux >= 5.6) duplicates descriptor ``fd`` of the process behind a
pidfd into the calling process, like a ``dup`` across the process boundary. It needs
no cooperation from the other process (it is never told), but

* the caller needs ``PTRACE_MODE_ATTACH_REALCREDS`` rights over the target: the same
  uid and, under Yama ``ptrace_scope=1``, the target must be a descendant, unless the
  caller has ``CAP_SYS_PTRACE``; containers' seccomp profiles often refuse the call;
* the caller must learn the descriptor number some other way (a pipe, a message);
* glibc has no wrapper: the syscalls are made through ``ctypes`` by number. Both
  x86_64 and aarch64 use the generic numbers, ``pidfd_open`` = 434 and
  ``pidfd_getfd`` = 438.

The received descriptor is close-on-exec: the kernel sets ``O_CLOEXEC`` on it (the
``flags`` argument must be 0); :func:`getfd` checks that and enforces it should a
kernel ever behave otherwise.

:func:`available` says whether the mechanism works here and, if not, why.

Process identity, for binding a token to a process rather than to a pid number (a pid
is reused once its process is gone):

* :func:`process_inode` / :func:`pidfd_inode`: since Linux 6.9 a pidfd is an inode of
  the ``pidfs`` filesystem, one per process, whose number is never reused until reboot:
  it names exactly one process (``None`` on older kernels, where every pidfd shares one
  anonymous inode);
* :func:`peer_pidfd`: a pidfd for the process at the other end of a UNIX socket
  (``SO_PEERPIDFD``, Linux >= 6.5), and :func:`pidfd_exited`: whether it has exited;
* :func:`start_time`: a process's start time (field 22 of ``/proc/<pid>/stat``, in
  clock ticks since boot, 10 ms): with the pid it names one process, unless the pid is
  reused within the same tick (which takes privileges over the pid namespace);
  :func:`proc_is_ours` says whether ``/proc`` shows this process's pid namespace
  (otherwise its numbers mean other processes).
:func:`getfd` raises :class:`~sockshare.BackendUnavailable` with the reason when the
OS refuses the call itself (``ENOSYS``: no such syscall; ``EPERM``/``EACCES``: no
ptrace rights or a seccomp filter), and plain ``OSError`` subclasses when the
arguments are wrong (``ProcessLookupError`` for a process that is gone, ``OSError``
with ``EBADF`` for a descriptor number the target does not have).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
import socket
import sys
from collections.abc import Callable

from sockshare._errors import BackendUnavailable

__all__ = [
    "NR_PIDFD_GETFD",
    "NR_PIDFD_OPEN",
    "available",
    "getfd",
    "peer_pidfd",
    "pidfd_exited",
    "pidfd_getfd",
    "pidfd_inode",
    "pidfd_open",
    "proc_is_ours",
    "process_inode",
    "start_time",
]

#: Syscall numbers, identical on x86_64 and aarch64 (asm-generic table).
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438
_ARCHES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})
#: getsockopt(SOL_SOCKET, SO_PEERPIDFD), asm-generic value (x86_64, aarch64); Python 3.11
#: does not name it.
SO_PEERPIDFD = 77

_syscall: Callable[..., int] | None = None
_why_not: str = ""


def _load() -> Callable[..., int] | None:
    """Find libc's ``syscall``; remember why not in ``_why_not``."""
    global _syscall, _why_not
    if _syscall is not None or _why_not:
        return _syscall
    if not sys.platform.startswith("linux"):
        _why_not = f"pidfd_getfd is Linux-only; this is {sys.platform}"
        return None
    machine = platform.machine().lower()
    if machine not in _ARCHES:
        _why_not = f"syscall numbers for {machine!r} are not known to sockshare"
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError) as exc:
        _why_not = f"libc's syscall() is not reachable through ctypes: {exc}"
        return None
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long]
    _syscall = fn
    return fn


def _explain(err: int, what: str) -> str:
    if err == errno.ENOSYS:
        return f"{what}: the kernel has no such syscall (ENOSYS; Linux >= 5.6 needed)"
    if err in (errno.EPERM, errno.EACCES):
        return (
            f"{what}: {errno.errorcode[err]}: no ptrace rights over the target (same uid "
            "needed and, under Yama ptrace_scope >= 1, a descendant or CAP_SYS_PTRACE), "
            "or a seccomp filter refuses the syscall"
        )
    return f"{what}: {os.strerror(err)}"


def _call(nr: int, a: int, b: int, what: str) -> int:
    fn = _load()
    if fn is None:
        raise BackendUnavailable(_why_not)
    ret = int(fn(nr, a, b, 0))
    if ret >= 0:
        return ret
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):
        raise BackendUnavailable(_explain(err, what))
    if err == errno.ESRCH:
        raise ProcessLookupError(err, f"{what}: no such process")
    raise OSError(err, _explain(err, what))


def pidfd_open(pid: int) -> int:
    """Return a pidfd (close-on-exec) for process ``pid``. The caller closes it."""
    if pid <= 0:
        raise ValueError(f"pid must be positive, not {pid!r}")
    return _call(NR_PIDFD_OPEN, pid, 0, f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """Duplicate descriptor ``fd`` of the process behind ``pidfd``; return the new fd.

    The new descriptor is close-on-exec (checked, and forced should it not be).
    """
    if fd < 0:
        raise ValueError(f"fd must be >= 0, not {fd!r}")
    new = _call(NR_PIDFD_GETFD, pidfd, fd, f"pidfd_getfd(fd {fd})")
    try:
        if os.get_inheritable(new):
            os.set_inheritable(new, False)
    except BaseException:
        os.close(new)
        raise
    return new


def getfd(pid: int, fd: int) -> int:
    """Duplicate descriptor ``fd`` of process ``pid`` into this process (close-on-exec).

    Raises :class:`~sockshare.BackendUnavailable` (with the reason) if the OS refuses,
    ``ProcessLookupError`` if ``pid`` is gone, ``OSError(EBADF)`` if it has no ``fd``.
    """
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


def available() -> tuple[bool, str]:
    """``(True, what)`` if pidfd_getfd works here, else ``(False, reason)``.

    The probe pulls one of this process's own descriptors, which needs no ptrace
    rights: a ``True`` does not promise access to every other process (see
    :func:`getfd` for the per-target refusal).
    """
    try:
        r, w = os.pipe()
    except OSError as exc:  # EMFILE: cannot even probe
        return False, f"cannot probe: {exc}"
    try:
        new = getfd(os.getpid(), r)
    except BackendUnavailable as exc:
        return False, str(exc)
    except OSError as exc:
        return False, f"pidfd_getfd probe failed: {exc}"
    finally:
        os.close(r)
        os.close(w)
    os.close(new)
    return True, ("pulled a descriptor from this process; other processes need ptrace "
                  "rights (same uid and not restricted by Yama, or CAP_SYS_PTRACE)")


# --- process identity ---------------------------------------------------------------

_peer_pidfd_works: bool | None = None if sys.platform.startswith("linux") else False


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/<pid>/stat``
    field 22): with the pid, it names one process, whatever later reuses the number.

    Raises ``ProcessLookupError`` if there is no such process; returns ``None`` if it
    cannot be told (no ``/proc``, as on macOS, or ``/proc`` hides the process). Other
    ``OSError`` (EMFILE) propagate: the caller cannot tell, and must not guess.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        if not os.path.isdir("/proc/self"):
            return None  # no procfs at all
        raise ProcessLookupError(errno.ESRCH, f"no process has pid {pid}") from None
    except PermissionError:  # hidden from us (mounted with hidepid)
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: cut at the last ')'
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


_proc_checked: tuple[int, bool] = (0, False)


def proc_is_ours() -> bool:
    """True if ``/proc`` shows this process's pid namespace (``/proc/self`` is our pid).

    In a pid namespace entered without mounting its own ``/proc``, ``/proc/<n>`` is
    another process than pid ``n`` of ours: start times read there would be wrong.
    """
    global _proc_checked
    pid = os.getpid()
    if _proc_checked[0] != pid:
        try:
            ours = os.readlink("/proc/self") == str(pid)
        except OSError:
            ours = False
        _proc_checked = (pid, ours)
    return _proc_checked[1]


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd (close-on-exec) for the process that connected ``sock``, from
    ``SO_PEERPIDFD`` (Linux >= 6.5), or ``None`` where the kernel has no such option
    (or the peer is gone). Other errors (EMFILE) propagate. The caller closes it."""
    global _peer_pidfd_works
    if _peer_pidfd_works is False or platform.machine().lower() not in _ARCHES:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            _peer_pidfd_works = False
            return None
        if exc.errno == errno.ESRCH:  # the peer is gone (and reaped)
            return None
        raise  # EMFILE...: the caller cannot tell who it is now
    _peer_pidfd_works = True
    fd = int.from_bytes(raw, sys.byteorder, signed=True)
    return fd if fd >= 0 else None


def pidfd_exited(pidfd: int) -> bool:
    """True once the process behind ``pidfd`` has exited (a pidfd polls readable then)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


_pidfs: bool | None = None


def _has_pidfs() -> bool:
    """True if pidfds have one inode per process (pidfs, Linux >= 6.9): told by
    comparing a pidfd's (device, inode) with an epoll descriptor's, which is the shared
    anonymous inode where pidfs does not exist."""
    global _pidfs
    if _pidfs is None:
        try:
            fd = pidfd_open(os.getpid())
        except (OSError, BackendUnavailable):
            _pidfs = False
            return False
        try:
            ep = select.epoll()
            try:
                a, b = os.fstat(fd), os.fstat(ep.fileno())
                _pidfs = (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino)
            finally:
                ep.close()
        finally:
            os.close(fd)
    return _pidfs


def pidfd_inode(pidfd: int) -> int | None:
    """The pidfs inode number of the process behind ``pidfd`` (unique until reboot), or
    ``None`` where pidfds have no inode of their own (Linux < 6.9)."""
    if not _has_pidfs():
        return None
    return os.fstat(pidfd).st_ino


def process_inode(pid: int) -> int | None:
    """The pidfs inode number of process ``pid`` (see :func:`pidfd_inode`), or ``None``
    where it cannot be had. Raises ``ProcessLookupError`` if there is no such process."""
    if not hasattr(select, "epoll") or _load() is None or not _has_pidfs():
        return None
    try:
        fd = pidfd_open(pid)
    except BackendUnavailable:  # seccomp, or no such syscall
        return None
    try:
        return pidfd_inode(fd)
    finally:
        os.close(fd)
