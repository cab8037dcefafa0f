"""ctypes bindings for the C calls the standard library does not wrap.

POSIX message queues (``mq_*``), System V message queues (``msg*``) and process-shared
POSIX semaphores (``sem_*``) have no Python API. This module finds them in the C
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
    "get_errno",
    "missing",
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
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
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
