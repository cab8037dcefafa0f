"""The worker's garbage-collection policy: collections wait while connections move.

CPython's cyclic collector runs a *full* collection (every tracked object in the
process) whenever the objects that survived into the oldest generation grew by 25 %
since the last one. A worker that takes 10,000 migrated WebSockets in a few seconds
grows by far more than that, again and again: each full collection walks every
connection it already holds (some hundreds of objects each), so a move of N connections
paid several O(N) walks -- about half of the target worker's CPU in a reload of 5,000
(profiled: 0.74 s of 1.72 s), more as N grows.

So, in a worker:

* :func:`freeze_startup` -- once the app is imported and started, everything alive
  (modules, classes, the app's globals) goes to the permanent generation
  (``gc.freeze()``, as its documentation advises for long-lived servers): no full
  collection walks it again;
* :func:`freeze_for_exit` -- when the worker is done: the interpreter's finalization
  collects everything once more, which took an old worker of 2,500 WebSockets 0.5 s
  before it could exit (the end of a reload); frozen, nothing is walked;
* :class:`MoveBurst` -- while connections move in or out, collections are held (the
  collector is off: ``gc.disable()``), and resume :data:`QUIET` seconds after the last
  move, or after :data:`HOLD_MAX` seconds held in a row, whichever comes first. When
  the hold kept many objects young (:data:`FULL_MIN`, and a quarter of what the last
  such collection left), its end runs one full collection, before the collector is
  back: left to itself, the collector walked them with a young collection at the first
  allocation, again with a middle one, and again with the next full one -- 1.9 s of CPU
  in each new worker of a reload of 20,000 WebSockets, 0.9 s with one full collection
  (2026-12-07, three interleaved runs, load average 3-6). A hold lasts through gaps of
  up to :data:`QUIET` = 2 s between moves: under load, gaps of half a second were
  common in a move of 20,000, and each ended the hold.
  Holding only the full collections (the oldest generation's threshold out of reach,
  the young ones collected as usual) still left 10-15 % of a target worker's CPU in a
  reload of 5,000 WebSockets in young collections: every object a moved connection
  keeps (its protocol, parser, queue, task, scope...) is walked by a young collection
  and again by a middle one while thousands more arrive; with the collector off
  during the burst the server's CPU a move went down by about 15 % (interleaved runs,
  docs/server.md, "Where the time goes"). Memory: only cyclic garbage waits (what
  reference counting cannot free), for seconds at most, and the youngest generation is
  collected once (only it) whenever it gained :data:`YOUNG_MAX` objects meanwhile;
* :meth:`MoveBurst.retire` -- once the worker is leaving (drained for a reload, an
  upgrade, a signal): the oldest generation is never collected again in it. Between
  two moves of a drain the collector ran again, and the first full collection walked
  every connection still there: 1-5 s for a worker holding 10,000 WebSockets on this
  2-core machine under load, during which no connection left. The dispatcher, seeing
  no progress for ``--grace`` + 3 s, killed one such worker with its 9,872 connections
  (a reload of 20,000 at a load average of 14, 2026-12-07). Everything a leaving
  worker holds is freed when it exits; the young and middle generations are still
  collected between moves, so its cyclic garbage stays bounded.
"""

from __future__ import annotations

import asyncio
import gc
import time

__all__ = ["FULL_MIN", "HOLD_MAX", "NEVER", "QUIET", "YOUNG_MAX", "MoveBurst", "freeze_for_exit",
           "freeze_startup"]

#: seconds without a move before collections resume (a hold lasts through shorter gaps)
QUIET = 2.0
#: the longest collections are held in a row (then they resume for QUIET seconds)
HOLD_MAX = 15.0
#: objects the youngest generation may gain while held before it is collected once
#: (only it: what survives is not walked again until the hold ends) -- the cyclic
#: garbage a busy worker makes meanwhile is bounded by this, not only by HOLD_MAX
YOUNG_MAX = 2_000_000
#: the oldest generation's threshold in a retiring worker: out of reach
NEVER = 1 << 30
#: objects a hold must have gained (at least, and a quarter of those tracked after the
#: last full collection run at a hold's end) for its end to run one full collection
FULL_MIN = 100_000


def freeze_startup() -> None:
    """Move every object alive now to the permanent generation (after a collection,
    so that garbage from the imports is not frozen with it)."""
    gc.collect()
    gc.freeze()


def freeze_for_exit() -> None:
    """The process is about to exit: no collection (the finalization's included) walks
    what is alive now."""
    gc.disable()
    gc.freeze()


class MoveBurst:
    """Holds collections while connections move (module docstring)."""

    def __init__(self) -> None:
        self._held = False   # the collector is off, by us
        self._since = 0.0
        self._last = 0.0
        self._resting_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._retired = False
        #: objects the young generation gained during this hold (net of those freed)
        self._gained = 0
        #: objects tracked after the last full collection run here (_collect_once)
        self._base = 0

    @property
    def holding(self) -> bool:
        return self._held

    def moved(self) -> None:
        """A connection moved in or out (or a batch of them): hold, or go on holding."""
        now = time.monotonic()
        self._last = now
        if self._held:
            if now - self._since >= HOLD_MAX:
                self._rest(now)
            elif gc.get_count()[0] > YOUNG_MAX:
                self._gained += gc.get_count()[0]
                gc.collect(0)
            return
        if now < self._resting_until:
            return
        if not gc.isenabled() or gc.get_threshold()[0] == 0:
            return   # (the collector is off: nothing to hold)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:   # (no loop to end the hold: no hold)
            return
        self._held = True
        self._since = now
        self._gained = 0
        gc.disable()
        self._timer = loop.call_later(QUIET, self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._held:
            return
        now = time.monotonic()
        if now - self._since >= HOLD_MAX:
            self._rest(now)
            return
        due = min(self._last + QUIET, self._since + HOLD_MAX)
        if now >= due:
            self.release()
            return
        self._timer = asyncio.get_running_loop().call_later(due - now, self._check)

    def _rest(self, now: float) -> None:
        """Held for HOLD_MAX: collections run again for QUIET seconds at least."""
        self.release()
        self._resting_until = now + QUIET

    def retire(self) -> None:
        """The worker is leaving: no full collection runs in it again (module
        docstring). Idempotent; a collector turned off (threshold 0) stays off."""
        if self._retired:
            return
        self._retired = True
        young, middle, _old = gc.get_threshold()
        if young:   # (0: the collector is off anyway)
            gc.set_threshold(young, middle, NEVER)

    def release(self) -> None:
        """Collections run again (those put off run at the next allocations)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        gained = self._gained + gc.get_count()[0]
        self._held = False
        if not self._retired and gained >= max(FULL_MIN, self._base // 4):
            # (before the collector is back: its first young collection, at the next
            # allocation, would walk everything the hold kept young once more)
            self._collect_once()
        gc.enable()

    def _collect_once(self) -> None:
        """One full collection now, instead of what the collector would run on its own
        after a large hold: each object walked by a young collection, again by a middle
        one and again by the next full one -- three walks of everything that moved in
        (module docstring)."""
        gc.collect()
        self._base = len(gc.get_objects(generation=2))

