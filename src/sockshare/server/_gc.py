"""The garbage-collection policy of the server's processes: collections wait while
connections move (the workers, and the dispatcher that relays the moves).

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
  the hold kept many objects young (:data:`FREEZE_MIN`), its end *freezes* them
  (``gc.freeze()``: O(1), the lists are spliced) before the collector is back, so that
  no collection walks what moved in: left to itself, the collector walked them with a
  young collection at the first allocation, again with a middle one, and again with the
  next full one -- 1.9 s of CPU in each new worker of a reload of 20,000 WebSockets.
  One full collection at the hold's end instead (the policy before this one) still
  walked them once, 0.24 s for 2,500 WebSockets, 0.8-0.9 s for 10,000, and found no
  garbage at all (0 unreachable objects, scale.py, reload and upgrade of 5,000); it
  came 2 s after the last move, often just as the next reload or upgrade made that
  worker leave, and delayed its drain by as much (a third of an old worker's CPU in
  back-to-back reloads of 20,000, py-spy). What was frozen goes back to the collector
  (``gc.unfreeze()`` and one full collection, :meth:`MoveBurst.sweep_due`) once a
  quarter of it went away (:data:`SWEEP_DROP`: connections closed or moved out, whose
  cyclic garbage, if any, waits among the frozen objects), or :data:`SWEEP_MAX` seconds
  after the freeze, whichever comes first (a later large hold freezes too, but puts off
  neither: the deadline runs from the first freeze not swept yet, and what went away
  before counts); a worker that leaves first never walks it.
  A hold lasts through gaps of up to :data:`QUIET` = 2 s between moves: under load,
  gaps of half a second were common in a move of 20,000, and each ended the hold.
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

The dispatcher uses :func:`freeze_startup` once its workers are ready and a
:class:`MoveBurst` while it relays moves: without them it spent 5.9 µs a move of a
reload in collections (young ones walking the moves in flight, and a full one walking
its start-up), docs/server.md, "The dispatcher's collections".
"""

from __future__ import annotations

import asyncio
import gc
import time

__all__ = ["FREEZE_MIN", "HOLD_MAX", "NEVER", "QUIET", "SWEEP_DROP", "SWEEP_EVERY", "SWEEP_MAX",
           "YOUNG_MAX", "MoveBurst", "freeze_for_exit", "freeze_startup"]

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
#: objects a hold must have gained for its end to freeze them (smaller holds: the
#: collector as usual)
FREEZE_MIN = 100_000
#: what a hold froze goes back to the collector once this share of it went away...
SWEEP_DROP = 0.25
#: ...or this many seconds after the first freeze not swept yet
SWEEP_MAX = 900.0
#: seconds between two looks at the frozen objects (``gc.get_freeze_count()`` walks
#: their list: 9 ms for 1.2 million, the objects of 10,000 WebSockets)
SWEEP_EVERY = 30.0


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
        #: frozen objects after the last freeze at a hold's end (0: none waiting)
        self._frozen = 0
        #: when the first freeze since the last sweep was (a later one keeps it)
        self._frozen_at = 0.0
        #: frozen objects that went away before the last freeze, since the first one
        self._gone = 0
        #: frozen objects before the first freeze since the last sweep (the start-up's)
        self._before = 0
        self._sweep_timer: asyncio.TimerHandle | None = None

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
        if self._sweep_timer is not None:   # (what is frozen leaves with the process)
            self._sweep_timer.cancel()
            self._sweep_timer = None
        young, middle, _old = gc.get_threshold()
        if young:   # (0: the collector is off anyway)
            gc.set_threshold(young, middle, NEVER)

    def release(self) -> None:
        """Collections run again (those put off run at the next allocations); what a
        large hold kept young is frozen first (module docstring)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        gained = self._gained + gc.get_count()[0]
        self._held = False
        if not self._retired and gained >= FREEZE_MIN:
            # (before the collector is back: its first young collection, at the next
            # allocation, would walk everything the hold kept young)
            self._freeze_held()
        gc.enable()

    def _freeze_held(self) -> None:
        if self._frozen:
            # (a freeze not swept yet: its deadline stands, and what went away since
            # counts -- a worker that takes in a large batch more often than SWEEP_MAX
            # would otherwise put the sweep off forever, and the garbage frozen with it)
            self._gone += max(0, self._frozen - gc.get_freeze_count())
        else:
            self._gone = 0
            self._frozen_at = time.monotonic()
            # (what was frozen before -- the start-up's -- never goes away: a quarter is
            # a quarter of what the holds froze)
            self._before = gc.get_freeze_count()
        gc.freeze()
        self._frozen = gc.get_freeze_count()
        if self._sweep_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:   # (no loop: sweep_due() is for the caller to ask)
                return
            self._sweep_timer = loop.call_later(SWEEP_EVERY, self._sweep_check)

    def sweep_due(self, now: float | None = None) -> bool:
        """Whether what the large holds froze should go back to the collector now: a
        quarter of it went away (:data:`SWEEP_DROP`), or :data:`SWEEP_MAX` passed since
        the first of those freezes (a later hold's freeze puts off neither)."""
        if not self._frozen or self._retired or self._held:
            return False
        now = time.monotonic() if now is None else now
        if now - self._frozen_at >= SWEEP_MAX:
            return True
        gone = self._gone + self._frozen - gc.get_freeze_count()
        return gone >= SWEEP_DROP * max(1, self._gone + self._frozen - self._before)

    def sweep(self) -> None:
        """Give the frozen objects back to the collector, and collect once (the cyclic
        garbage of what went away meanwhile). Everything frozen goes back, the
        start-up's too: from now on the collector's own rules apply, until the next
        large hold."""
        self._frozen = self._gone = 0
        gc.unfreeze()
        gc.collect()

    def _sweep_check(self) -> None:
        self._sweep_timer = None
        if not self._frozen or self._retired:
            return
        if self.sweep_due():
            self.sweep()
            return
        self._sweep_timer = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep_check)
