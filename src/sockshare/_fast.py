"""Which hot paths run compiled: the optional C module :mod:`sockshare._speedups`, or the
pure-Python ones.

The C module (src/sockshare/_speedups.c, built by setup.py where a compiler is found,
Linux/CPython only) does the dispatcher's accept loop, HANDOFF frame encoding, the
``sendmsg``/``recvmsg`` with SCM_RIGHTS, ACCEPT decoding, and the channel's one-socket
hot paths (the frame packed and sent in one call; a ``recvmmsg`` whose whole one-socket
frames become checked socket objects and Handoffs in C); every one of them has its
Python twin, which stays the reference and what Windows, macOS and a build without a
compiler run. The wire is the same either way (tests/vectors).

* ``SOCKSHARE_PURE_PYTHON=1`` (any value but ``""``/``0``) forces the Python paths;
* where the module should exist (Linux, CPython) and does not import, :func:`report`
  logs one line, once per process (the server calls it at start-up; ``sockshare doctor``
  says which path is active).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["ENV_PURE", "Speedups", "active_path", "expected", "report", "speedups"]

ENV_PURE = "SOCKSHARE_PURE_PYTHON"

log = logging.getLogger("sockshare")

class Speedups(Protocol):
    """What the C module offers (its stub: src/sockshare/_speedups.pyi)."""

    MAX_FDS: int

    def accept_many(self, lfd: int, budget: int, fd_high: int, /) -> tuple[list[tuple[int, Any]], int]: ...
    def handoff_frame(self, flags: int, items: list[tuple[int, bytes, bytes, bytes]], /) -> bytes: ...
    def send_fds(self, fd: int, data: bytes | bytearray | memoryview, fds: Sequence[int], /) -> int: ...
    def recv_fds(self, fd: int, bufsize: int, flags: int, /) -> tuple[bytes, list[int], int]: ...
    def recv_batch(  # noqa: PLR0917 - the C signature
        self, fd: int, bufsize: int, flags: int, max_msgs: int, single: bool, sockcls: type | None,
        blocking: int, max_payload: int, handoff_cls: type, answer: Any, /,
    ) -> tuple[list[Any], int, list[tuple[bytes, list[int], int]]]: ...
    def send_single(  # noqa: PLR0917 - the C signature
        self, fd: int, sock: Any, flags: int, hid: int, meta: Any, data: bytes, max_payload: int,
        close: bool, /,
    ) -> int | bytes: ...
    def new_slots(self, cls: type, /, *values: Any) -> Any: ...
    def accept_ids(self, payload: bytes | bytearray | memoryview, /) -> list[int]: ...
    def close_fds(self, fds: Sequence[int], /) -> None: ...
    def dispatch_burst(  # noqa: PLR0917 - the C signature
        self, lfd: int, budget: int, fd_high: int, seq: int, hid: int, last: int, prefix: bytes,
        mid: bytes, end: bytes, kind: bytes, flags: int, now: float,
        workers: list[tuple[int, int, int, dict[int, tuple[int, bytes, float, bytes]]]], /,
    ) -> tuple[list[tuple[int, bytes, list[int], int]], int, int, int, int, int, int]: ...
    def dispatch_sniffed(  # noqa: PLR0917 - the C signature
        self, lfd: int, budget: int, fd_high: int, seq: int, hid: int, last: int, prefix: bytes,
        mid: bytes, end: bytes, kind: bytes, flags: int, now: float,
        workers: list[tuple[int, int, int, dict[int, tuple[int, bytes, float, bytes]]]],
        max_head: int, max_meta: int, max_payload: int, pending: list[tuple[int, Any]], /,
    ) -> tuple[list[tuple[int, bytes, list[int], int]], int, int, int, int, int, int,
               list[tuple[int, Any, int]]]: ...
    def http_head(self, buf: bytes | bytearray | memoryview, max_size: int, /,
                  ) -> tuple[str, str, str, str | None, int] | None: ...
    def recv_answers(self, fd: int, bufsize: int, raw: dict[int, tuple[int, bytes, float, bytes]],
                     max_payload: int, /) -> tuple[int, int, list[Any], bytes, list[int], int]: ...
    def settle_accepts(self, payload: bytes | bytearray | memoryview,
                       raw: dict[int, tuple[int, bytes, float, bytes]], /) -> tuple[int, list[int]]: ...


#: the C module, or None (pure Python)
speedups: Speedups | None = None
#: why it is None ("" when it is loaded)
why_not = ""
_reported = False


def expected() -> bool:
    """Whether a build of this platform compiles the module (setup.py: Linux, CPython)."""
    return sys.platform.startswith("linux") and platform.python_implementation() == "CPython"


def _load() -> None:
    global speedups, why_not
    if os.environ.get(ENV_PURE, "") not in ("", "0"):
        why_not = f"{ENV_PURE}={os.environ[ENV_PURE]}"
        return
    if not expected():
        why_not = f"no compiled module on {sys.platform}/{platform.python_implementation()}"
        return
    try:
        from sockshare import _speedups
    except ImportError as exc:
        why_not = f"sockshare._speedups did not import ({exc})"
        return
    missing = [n for n in vars(Speedups) if not n.startswith("_") and not hasattr(_speedups, n)]
    if missing:   # (a build of an older source tree)
        why_not = f"sockshare._speedups is an older build (no {', '.join(missing)}): rebuild it"
        return
    speedups = _speedups


_load()


def active_path() -> str:
    """``"compiled (sockshare._speedups)"`` or ``"pure Python (<why>)"``."""
    if speedups is not None:
        return "compiled (sockshare._speedups)"
    return f"pure Python ({why_not})"


def report() -> None:
    """Log once per process when the compiled module should be here and is not (a build
    without a C compiler, say): a WARNING on the ``sockshare`` logger. Forced pure Python
    (``SOCKSHARE_PURE_PYTHON=1``) and platforms without the module say nothing."""
    global _reported
    if _reported or speedups is not None or not expected() or why_not.startswith(ENV_PURE):
        return
    _reported = True
    log.warning("sockshare: running the pure-Python hot paths: %s; reinstall with a C "
                "compiler for the compiled ones (set %s=1 to silence this)", why_not, ENV_PURE)
