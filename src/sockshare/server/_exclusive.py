"""Listeners for several dispatchers (``--dispatchers N``): one wake-up per connection.

The lead and its feeders (``_feeders``) wait on the same listening sockets. With plain
epoll every process waiting on a socket is woken for each new connection; one accepts
it, the others find the queue empty (a failed accept each, and a loop turn for
nothing: measured here, it cost each dispatcher as much per connection as handing one
over). Linux's ``EPOLLEXCLUSIVE`` wakes one waiter instead: :class:`ExclusiveListeners`
is :class:`~sockshare.server._listeners.Listeners` whose listening sockets are
registered with it in the asyncio loop's epoll (asyncio has no flag for it: the
registration the loop made is replaced in its epoll object, the loop's own bookkeeping
unchanged; a loop without an epoll selector just keeps the plain registration).

Used only with ``--dispatchers`` > 1, by the lead and by every feeder; the default
single dispatcher keeps :class:`Listeners` as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from typing import Any

from sockshare.server._listeners import Listeners, ListenerState

__all__ = ["ExclusiveListeners", "make_exclusive"]

log = logging.getLogger("sockshare.server")

_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)
_EPOLLIN = getattr(select, "EPOLLIN", 0)


def make_exclusive(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    """Turn the loop's read registration of ``fd`` into an exclusive one (one waiter
    woken per event, among the processes that registered it so). False where it cannot
    be done (no EPOLLEXCLUSIVE, not an epoll selector): the plain registration stays."""
    selector = getattr(loop, "_selector", None)
    ep: Any = getattr(selector, "_selector", None)
    epoll = getattr(select, "epoll", None)
    if not _EXCLUSIVE or epoll is None or not isinstance(ep, epoll):
        return False
    try:
        ep.unregister(fd)
        ep.register(fd, _EPOLLIN | _EXCLUSIVE)
    except OSError as exc:
        log.debug("EPOLLEXCLUSIVE on descriptor %d: %s", fd, exc)
        with contextlib.suppress(OSError):
            ep.register(fd, _EPOLLIN)
        return False
    return True


class ExclusiveListeners(Listeners):
    """:class:`Listeners` whose accept wake-ups go to one dispatcher at a time."""

    def start(self) -> None:
        super().start()
        self._exclusive()

    def release(self, ls: ListenerState, why: str) -> None:
        was_held = bool(ls.holds)
        super().release(ls, why)
        if was_held and not ls.holds:
            self._exclusive(ls)

    def _exclusive(self, only: ListenerState | None = None) -> None:
        loop = asyncio.get_running_loop()
        for ls in self.all:
            if (only is None or ls is only) and ls.sock.fileno() >= 0 and not ls.holds:
                make_exclusive(loop, ls.sock.fileno())
