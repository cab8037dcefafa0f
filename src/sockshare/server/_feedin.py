"""The worker's side of ``--dispatchers N``: channels from the feeders.

With several dispatchers (``_feeders``), the dispatcher starts its workers with
``SOCKSHARE_FEEDERS=1``. Such a worker listens on ``<its pid>.feed`` beside the
dispatcher's channel (:meth:`FeedIn.listen`, before its hello: the dispatcher tells the
feeders about a worker only once it said hello, and the path follows from the pid). A
feeder connects, HELLO name ``feeder:<n>``; only a process of the dispatcher's uid (or
ours) whose parent is the dispatcher may (Linux: ``/proc/<pid>/stat``; elsewhere the uid
check alone).

What arrives on a feeder's channel is handled exactly like the dispatcher's handoffs
(``Worker.take(ch)``: set up, ACCEPT, run; rejected while draining, and the feeder gives
it to another worker). One thing more: the worker counts them in with the dispatcher,
``{"ev": "fed", "n": k}`` on the *dispatcher's* channel, sent before the ACCEPTs leave
and before any close report of them -- the same stream, so the dispatcher's count of the
worker's connections stays exact (a close never arrives before its connection was
counted). Closes, migrations, drains: nothing changes, the dispatcher keeps the books.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from sockshare._aio import AsyncChannel, AsyncChannelListener
from sockshare._errors import ChannelError, SockshareError

__all__ = ["ENV_FEEDERS", "FEED_SUFFIX", "FeedIn", "parent_pid"]

log = logging.getLogger("sockshare.server.worker")

#: set (to "1") in a worker's environment when the dispatcher runs feeders
ENV_FEEDERS = "SOCKSHARE_FEEDERS"
#: a worker's socket for the feeders' channels: ``<its pid>.feed``
FEED_SUFFIX = ".feed"


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent (Linux: /proc), None where that cannot be told."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:   # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (ValueError, IndexError):
        return None


class FeedIn:
    """The listener for feeders' channels and the channels it accepted."""

    def __init__(self, wid: int, take: Callable[[AsyncChannel], None]) -> None:
        self.wid = wid
        self._take = take
        self.path = ""
        self._listener: AsyncChannelListener | None = None
        self._accepting: asyncio.Task[None] | None = None
        #: the open channels, each with its feeder's number
        self.channels: dict[AsyncChannel, int] = {}
        self._dispatcher = 0
        self._watching: set[asyncio.Task[None]] = set()

    def listen(self, address: str, dispatcher: AsyncChannel) -> None:
        """Listen beside the dispatcher's channel ``address`` (a path only)."""
        if address.startswith(("@", "tcp://")) or not os.path.isabs(address):
            log.warning("worker %d: --dispatchers needs a channel path, not %s; only the "
                        "dispatcher hands connections to this worker", self.wid, address)
            return
        self._dispatcher = dispatcher.peer.pid
        path = os.path.join(os.path.dirname(address), f"{os.getpid()}{FEED_SUFFIX}")
        try:
            self._listener = AsyncChannelListener.listen(
                path, name=f"worker:{self.wid}", allow_uids={os.getuid(), dispatcher.peer.uid})
        except (OSError, SockshareError) as exc:
            log.warning("worker %d: cannot listen for feeders at %s (%s)", self.wid, path, exc)
            return
        self.path = path
        self._accepting = asyncio.get_running_loop().create_task(self._accept(self._listener))

    async def _accept(self, listener: AsyncChannelListener) -> None:
        while True:
            try:
                ch = await listener.accept()
            except (ChannelError, OSError):
                return
            except SockshareError as exc:   # a bad handshake: that one only
                log.warning("worker %d: refused a feeder channel: %s", self.wid, exc)
                continue
            ppid = parent_pid(ch.peer.pid)
            if not ch.peer.name.startswith("feeder:") or (ppid is not None
                                                          and ppid != self._dispatcher):
                log.warning("worker %d: refused a channel from pid %d (%r): not a feeder of "
                            "the dispatcher (pid %d)", self.wid, ch.peer.pid, ch.peer.name,
                            self._dispatcher)
                with contextlib.suppress(Exception):
                    await ch.aclose()
                continue
            ch.on_activity = lambda ch=ch: self._on_activity(ch)
            self.channels[ch] = int(ch.peer.name[7:]) if ch.peer.name[7:].isdigit() else 0
            self._on_activity(ch)   # (what came with the handshake's last read)
            task = asyncio.get_running_loop().create_task(self._watch(ch))
            self._watching.add(task)
            task.add_done_callback(self._watching.discard)

    def _on_activity(self, ch: AsyncChannel) -> None:
        try:
            self._take(ch)
            ch.received_controls()   # (feeders send none)
        except Exception:   # never let it escape into the channel's reader
            log.exception("worker %d: handling a feeder's frames failed", self.wid)

    async def _watch(self, ch: AsyncChannel) -> None:
        await ch.wait_closed()
        self.channels.pop(ch, None)
        with contextlib.suppress(Exception):
            await ch.aclose()

    def stop_listening(self) -> None:
        """No new feeder channels (draining); those open stay for their answers."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        self.stop_listening()
        for ch in list(self.channels):
            with contextlib.suppress(Exception):
                await ch.aclose()
        self.channels.clear()
