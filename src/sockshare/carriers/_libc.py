"""ctypes bindings for the C calls the standard library does not wrap.

POSIX message queues (``mq_*``), System V message queues (``msg*``) and process-shared
POSIX semaphores (``sem_*``), robust mutexes (``pthread_mutex_*``) and futexes (through
``syscall``) have no Python API. This module finds them in the C
library (glibc >= 2.34 has everything in libc; older glibc keeps ``mq_*`` in librt),
declares their C signatures once, and exposes each as a small typed Python function
that returns the C result and leaves ``errno`` to :func:`ctypes.get_errno`.

Nothing here raises on a missing symbol at import time: :func:`missing` tells which
symbols are absent, so ``carriers.available()`` can say why a carrier is not usable.
Blocking calls release the GIL (ctypes does so for every foreign call).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from functools import cache
from typing import Any

__all__ = [
    "MqAttr",
    "Timespec",
    "abs_timespec",
    "call",
    "futex_wait",
    "futex_wake",
    "get_errno",
    "missing",
    "rel_timespec",
]

get_errno = ctypes.get_errno


class Timespec(ctypes.Structure):
    """``struct timespec`` (``time_t`` and ``long`` are both C long on Linux and macOS)."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class MqAttr(ctypes.Structure):
    """``struct mq_attr`` as glibc lays it out."""

    _fields_ = [
        ("mq_flags", ctypes.c_long),
        ("mq_maxmsg", ctypes.c_long),
        ("mq_msgsize", ctypes.c_long),
        ("mq_curmsgs", ctypes.c_long),
        ("_reserved", ctypes.c_long * 4),
    ]


_p = ctypes.c_void_p
_int = ctypes.c_int
_long = ctypes.c_long
_size = ctypes.c_size_t
_ssize = ctypes.c_ssize_t
_str = ctypes.c_char_p

#: name -> (restype, argtypes)
_SIGNATURES: dict[str, tuple[Any, list[Any] | None]] = {
    # POSIX message queues
    "mq_open": (_int, [_str, _int, ctypes.c_uint, ctypes.POINTER(MqAttr)]),
    "mq_close": (_int, [_int]),
    "mq_unlink": (_int, [_str]),
    "mq_getattr": (_int, [_int, ctypes.POINTER(MqAttr)]),
    "mq_timedsend": (_int, [_int, _p, _size, ctypes.c_uint, ctypes.POINTER(Timespec)]),
    "mq_timedreceive": (
        _ssize,
        [_int, _p, _size, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(Timespec)],
    ),
    # System V message queues
    "msgget": (_int, [_int, _int]),
    "msgsnd": (_int, [_int, _p, _size, _int]),
    "msgrcv": (_ssize, [_int, _p, _size, _long, _int]),
    "msgctl": (_int, [_int, _int, _p]),
    # process-shared semaphores
    "sem_init": (_int, [_p, _int, ctypes.c_uint]),
    "sem_destroy": (_int, [_p]),
    "sem_post": (_int, [_p]),
    "sem_trywait": (_int, [_p]),
    "sem_wait": (_int, [_p]),
    "sem_timedwait": (_int, [_p, ctypes.POINTER(Timespec)]),
    "sem_clockwait": (_int, [_p, _int, ctypes.POINTER(Timespec)]),
    # process-shared robust mutexes (these return an error number, not -1 and errno)
    "pthread_mutexattr_init": (_int, [_p]),
    "pthread_mutexattr_destroy": (_int, [_p]),
    "pthread_mutexattr_setpshared": (_int, [_p, _int]),
    "pthread_mutexattr_setrobust": (_int, [_p, _int]),
    "pthread_mutex_init": (_int, [_p, _p]),
    "pthread_mutex_trylock": (_int, [_p]),
    "pthread_mutex_timedlock": (_int, [_p, ctypes.POINTER(Timespec)]),
    "pthread_mutex_clocklock": (_int, [_p, _int, ctypes.POINTER(Timespec)]),
    "pthread_mutex_unlock": (_int, [_p]),
    "pthread_mutex_consistent": (_int, [_p]),
    # syscall(2) is variadic: the caller passes ctypes-typed arguments
    "syscall": (_long, None),
}


@cache
def _libraries() -> tuple[ctypes.CDLL, ...]:
    if sys.platform == "win32":
        return ()
    found: list[ctypes.CDLL] = []
    for name in ("c", "rt", "pthread"):
        path = ctypes.util.find_library(name)
        if path is None:
            continue
        try:
            found.append(ctypes.CDLL(path, use_errno=True))
        except OSError:
            continue
    if not found:
        found.append(ctypes.CDLL(None, use_errno=True))
    return tuple(found)


@cache
def _function(name: str) -> Any:
    restype, argtypes = _SIGNATURES[name]
    for lib in _libraries():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            continue
        fn.restype = restype
        fn.argtypes = argtypes
        return fn
    return None


def missing(*names: str) -> list[str]:
    """The symbols among ``names`` that this C library does not have."""
    return [name for name in names if _function(name) is None]


def call(name: str, *args: object) -> int:
    """Call C function ``name``; returns its integer result (check ``get_errno()`` on -1)."""
    fn = _function(name)
    if fn is None:
        raise OSError(f"the C library has no {name}()")
    ctypes.set_errno(0)
    return int(fn(*args))


def abs_timespec(seconds_from_now: float, *, monotonic: bool) -> Timespec:
    """An absolute ``timespec`` that many seconds ahead on CLOCK_MONOTONIC or CLOCK_REALTIME."""
    if sys.platform == "win32":
        raise OSError("no POSIX clocks on Windows")
    clock = time.CLOCK_MONOTONIC if monotonic else time.CLOCK_REALTIME
    at = time.clock_gettime_ns(clock) + max(0, int(seconds_from_now * 1e9))
    return Timespec(at // 1_000_000_000, at % 1_000_000_000)


def rel_timespec(seconds: float) -> Timespec:
    """A relative ``timespec`` of ``seconds`` (not negative)."""
    ns = max(0, int(seconds * 1e9))
    return Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


#: futex(2) syscall numbers by ``platform.machine()``; the call is not in libc.
_SYS_FUTEX = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
    "riscv64": 98,
    "loongarch64": 98,
    "i386": 240,
    "i686": 240,
    "armv7l": 240,
    "armv6l": 240,
    "ppc64le": 221,
    "ppc64": 221,
    "s390x": 238,
}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


@cache
def futex_number() -> int | None:
    """The futex syscall number on this machine, or None (not Linux, unknown CPU)."""
    if not sys.platform.startswith("linux"):
        return None
    import platform

    return _SYS_FUTEX.get(platform.machine().lower())


def futex_wait(address: int, expected: int, seconds: float) -> int:
    """Sleep while the shared 32-bit word at ``address`` holds ``expected``, at most
    ``seconds``. Returns 0 when woken, else the errno (EAGAIN: the word had already
    changed; ETIMEDOUT; EINTR). Not FUTEX_PRIVATE: the word is in shared memory."""
    number = futex_number()
    assert number is not None
    ts = rel_timespec(seconds)
    rc = call(
        "syscall",
        ctypes.c_long(number),
        ctypes.c_void_p(address),
        ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_uint32(expected),
        ctypes.byref(ts),
        ctypes.c_void_p(None),
        ctypes.c_int(0),
    )
    return 0 if rc == 0 else get_errno()


def futex_wake(address: int) -> None:
    """Wake every process sleeping in :func:`futex_wait` on ``address``."""
    number = futex_number()
    assert number is not None
    call(
        "syscall",
        ctypes.c_long(number),
        ctypes.c_void_p(address),
        ctypes.c_int(_FUTEX_WAKE),
        ctypes.c_int(0x7FFFFFFF),
        ctypes.c_void_p(None),
        ctypes.c_void_p(None),
        ctypes.c_int(0),
    )
