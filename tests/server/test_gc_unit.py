"""The worker's garbage-collection policy (``_gc``): collections (every generation)
wait while connections move, and come back once they stop, or after ``HOLD_MAX`` held
in a row."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from sockshare.server import _gc
from sockshare.server._gc import MoveBurst


@pytest.fixture(autouse=True)
def _thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    enabled = gc.isenabled()
    yield
    gc.unfreeze()   # (what a test froze goes back: nothing else in this process freezes)
    gc.set_threshold(*saved)
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_full_collections_wait_while_moves_go_on_then_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "QUIET", 0.5)
    gc.set_threshold(700, 10, 10)

    gc.enable()

    async def main() -> list[bool]:
        hold = MoveBurst()
        seen = []
        for _ in range(4):   # moves 10 ms apart: held all along
            hold.moved()
            seen.append(gc.isenabled())
            await asyncio.sleep(0.01)
        assert hold.holding
        for _ in range(100):   # quiet: released after QUIET (within 5 s on a busy machine)
            await asyncio.sleep(0.05)
            if not hold.holding:
                break
        assert not hold.holding
        seen.append(gc.isenabled())
        return seen

    seen = asyncio.run(main())
    assert seen[:4] == [False] * 4   # no collection at all meanwhile, young ones included
    assert seen[-1] is True
    assert gc.get_threshold() == (700, 10, 10)   # (the thresholds are left alone)


def test_a_hold_ends_after_hold_max_even_if_moves_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "QUIET", 0.05)
    monkeypatch.setattr(_gc, "HOLD_MAX", 0.1)
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> list[bool]:
        hold = MoveBurst()
        held = []
        for _ in range(10):
            hold.moved()
            held.append(hold.holding)
            await asyncio.sleep(0.02)
        hold.release()
        return held

    held = asyncio.run(main())
    assert held[0]
    assert not all(held)   # (released once, for QUIET at least, then held again)
    assert gc.isenabled()
    assert gc.get_threshold() == (700, 10, 10)


def test_no_hold_when_the_collector_is_off() -> None:
    gc.set_threshold(0, 10, 10)

    async def main() -> bool:
        hold = MoveBurst()
        hold.moved()
        return hold.holding

    assert not asyncio.run(main())
    assert gc.get_threshold() == (0, 10, 10)


def test_a_collector_the_app_turned_off_stays_off() -> None:
    gc.set_threshold(700, 10, 10)
    gc.disable()

    async def main() -> bool:
        hold = MoveBurst()
        hold.moved()
        held = hold.holding
        hold.release()
        return held

    assert not asyncio.run(main())
    assert not gc.isenabled()


class _Node:
    def __init__(self) -> None:
        self.me = self   # a cycle: only the collector frees it


def test_a_hold_collects_the_youngest_generation_past_young_max(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "YOUNG_MAX", 5_000)
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> tuple[bool, int, bool]:
        hold = MoveBurst()
        hold.moved()
        probe = _Node()
        ref = weakref.ref(probe)
        del probe
        for _ in range(10_000):   # cyclic garbage, the collector off
            _Node()
        assert ref() is not None   # (held: nothing collected yet)
        hold.moved()   # past YOUNG_MAX: the youngest generation collected, still held
        held, young, freed = hold.holding, gc.get_count()[0], ref() is None
        hold.release()
        return held, young, freed

    held, young, freed = asyncio.run(main())
    assert held
    assert freed
    assert young < 5_000


def _recorder() -> tuple[list[int], Callable[[str, dict[str, int]], None]]:
    """A ``gc.callbacks`` entry that lists the generation of every collection begun."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])
    return seen, record


def test_a_retiring_worker_never_walks_its_oldest_generation_again() -> None:
    """The drain of a worker with 10,000 WebSockets stalled for seconds in a full
    collection (and was killed for making no progress): once retired, collections of
    the young generations go on -- cyclic garbage is still freed -- but generation 2
    is never collected again, however much survives."""
    gc.set_threshold(700, 10, 10)
    gc.enable()
    seen, record = _recorder()

    def churn() -> tuple[list[object], bool]:
        keep: list[object] = []
        probe = _Node()
        ref = weakref.ref(probe)
        del probe
        for i in range(60_000):   # survivors (as connections) and cyclic garbage
            keep.append([i])
            _Node()
        return keep, ref() is None

    gc.callbacks.append(record)
    try:
        before, _ = churn()   # the same churn, not retired: full collections happen
        full_before = seen.count(2)
        seen.clear()

        async def main() -> None:
            hold = MoveBurst()
            hold.retire()
            hold.retire()   # (idempotent)
            hold.moved()
            hold.release()   # collections back on, between two moves
        asyncio.run(main())
        after, freed = churn()
    finally:
        gc.callbacks.remove(record)
    assert full_before >= 1
    assert 2 not in seen
    assert 0 in seen   # young collections still run...
    assert freed   # ...and free cycles
    assert gc.get_threshold() == (700, 10, _gc.NEVER)
    del before, after


def test_retiring_leaves_a_collector_the_app_turned_off_alone() -> None:
    gc.set_threshold(0, 10, 10)
    MoveBurst().retire()
    assert gc.get_threshold() == (0, 10, 10)


def test_the_end_of_a_large_hold_freezes_what_moved_in_and_walks_nothing() -> None:
    """Connections that moved in are frozen at the end of the hold, not walked: a full
    collection there found no garbage in a reload (0 unreachable) and cost 0.8-0.9 s of
    CPU per 10,000 WebSockets, often just as the next reload made the worker leave; left
    to the collector they were walked three times (young, middle, full)."""
    gc.set_threshold(700, 10, 10)
    gc.enable()
    seen, record = _recorder()

    async def main() -> tuple[list[int], int, list[int], int]:
        hold = MoveBurst()
        hold.moved()
        gc.callbacks.append(record)
        try:
            kept = [[i] for i in range(_gc.FREEZE_MIN + 10_000)]   # as moved-in connections
            hold.release()
            at_release, frozen = list(seen), gc.get_freeze_count()
            seen.clear()
            small = MoveBurst()
            small.moved()
            more = [[i] for i in range(1_000)]   # a small hold: nothing frozen at its end
            small.release()
            after_small = list(seen)
            frozen_small = gc.get_freeze_count()
            del kept, more
        finally:
            gc.callbacks.remove(record)
        return at_release, frozen, after_small, frozen_small

    at_release, frozen, after_small, frozen_small = asyncio.run(main())
    assert at_release == []   # no collection at all at the hold's end
    assert frozen >= _gc.FREEZE_MIN + 10_000   # what moved in is out of every walk
    assert 2 not in after_small
    assert frozen_small == frozen or frozen_small < frozen   # (the small hold froze nothing)
    assert gc.isenabled()


def _held_then_frozen(n: int) -> tuple[MoveBurst, list[object], weakref.ref[_Node]]:
    """A hold that took in n objects and one cycle (an object only the collector frees,
    dead by the time the hold ends), released inside a running loop or not."""
    hold = MoveBurst()
    hold.moved()
    kept: list[object] = [[i] for i in range(n)]
    probe = _Node()
    ref = weakref.ref(probe)
    del probe
    hold.release()
    return hold, kept, ref


def test_what_a_hold_froze_goes_back_once_a_quarter_of_it_went_away() -> None:
    """The frozen objects go back to the collector, with one full collection, once a
    quarter of them went away (connections closed or moved on): cyclic garbage among
    them waits until then, no longer."""
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> None:
        # (everything alive is frozen with them: make them most of it)
        n = max(_gc.FREEZE_MIN + 20_000, 2 * len(gc.get_objects()))
        hold, kept, ref = _held_then_frozen(n)
        assert gc.get_freeze_count() > _gc.FREEZE_MIN
        assert not hold.sweep_due()
        gc.collect()
        assert ref() is not None   # frozen: not even a full collection frees it
        del kept[: len(kept) // 10]   # a tenth went away: not yet
        assert not hold.sweep_due()
        del kept[:]   # past a quarter
        assert hold.sweep_due()
        hold.sweep()
        assert gc.get_freeze_count() == 0
        assert ref() is None   # the cycle is freed
        assert not hold.sweep_due()   # (once)
    asyncio.run(main())


def test_what_a_hold_froze_goes_back_after_sweep_max_however_little_went_away(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cycles that leave nothing behind to count are freed too: after ``SWEEP_MAX``
    the frozen objects go back whatever happened meanwhile (checked on the loop every
    ``SWEEP_EVERY`` seconds)."""
    monkeypatch.setattr(_gc, "SWEEP_EVERY", 0.05)
    monkeypatch.setattr(_gc, "SWEEP_MAX", 0.2)
    monkeypatch.setattr(_gc, "FREEZE_MIN", 1_000)
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> tuple[bool, bool]:
        _hold, kept, ref = _held_then_frozen(5_000)
        frozen_at_first = gc.get_freeze_count() > 0
        for _ in range(100):   # the loop's check sweeps within SWEEP_MAX (5 s at most)
            await asyncio.sleep(0.05)
            if gc.get_freeze_count() == 0:
                break
        del kept
        return frozen_at_first, ref() is None

    frozen_at_first, freed = asyncio.run(main())
    assert frozen_at_first
    assert gc.get_freeze_count() == 0
    assert freed


def test_a_worker_that_leaves_keeps_what_it_froze(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retiring worker never walks what it froze: it all goes when the process
    exits (the drain would otherwise stall in that walk)."""
    monkeypatch.setattr(_gc, "SWEEP_EVERY", 0.02)
    monkeypatch.setattr(_gc, "SWEEP_MAX", 0.05)
    monkeypatch.setattr(_gc, "FREEZE_MIN", 1_000)
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> int:
        hold, kept, _ref = _held_then_frozen(5_000)
        hold.retire()
        del kept
        assert not hold.sweep_due()
        await asyncio.sleep(0.3)   # past SWEEP_MAX, several checks' worth
        return gc.get_freeze_count()

    assert asyncio.run(main()) > 0


def test_a_later_large_hold_does_not_put_off_what_the_first_froze(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that takes in a large batch of moves every few minutes (rebalancing,
    migrations) freezes again at each hold's end; the garbage of what it froze before
    (connections closed since, as cycles: they do not lower the frozen count) must still
    go back to the collector ``SWEEP_MAX`` after the *first* freeze, and what went away
    before a later freeze still counts towards the quarter. Otherwise each new hold
    started both over, and the frozen garbage grew without bound."""
    monkeypatch.setattr(_gc, "FREEZE_MIN", 1_000)
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> None:
        hold, _kept, _ref = _held_then_frozen(5_000)   # (kept alive: nothing went away)
        first_done = time.monotonic()   # (the first freeze was before this)
        await asyncio.sleep(0.2)
        hold.moved()   # a second large hold, later
        more = [[i] for i in range(2_000)]
        hold.release()
        assert gc.get_freeze_count() > 0
        # the deadline still runs from the first freeze, not from the second
        assert hold.sweep_due(now=first_done + _gc.SWEEP_MAX)
        del more
    asyncio.run(main())


def test_what_went_away_before_a_later_freeze_still_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter of what was frozen, counted across the freezes of later holds."""
    monkeypatch.setattr(_gc, "FREEZE_MIN", 1_000)
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def drops() -> None:
        n = max(20_000, 2 * len(gc.get_objects()))
        hold, kept, _ref = _held_then_frozen(n)
        first = gc.get_freeze_count()
        del kept[: first * 15 // 100]   # 15 % went away: not yet
        assert not hold.sweep_due()
        hold.moved()   # a second large hold
        more = [[i] for i in range(3_000)]
        hold.release()
        assert gc.get_freeze_count() > first * 85 // 100 + 2_000   # (it froze)
        assert not hold.sweep_due()
        del kept[: first * 15 // 100]   # 30 % of the first freeze in all: due
        assert hold.sweep_due()
        del more
    asyncio.run(drops())


def test_a_quarter_is_a_quarter_of_what_the_holds_froze() -> None:
    """What was frozen before the hold (the start-up's: modules, classes, the app) never
    goes away; it must not dilute the quarter: a third of what moved in going away is
    enough, however much the start-up left frozen."""
    gc.set_threshold(700, 10, 10)
    gc.enable()

    async def main() -> tuple[bool, bool]:
        n = max(_gc.FREEZE_MIN + 20_000, len(gc.get_objects()))
        startup = [[i] for i in range(4 * n)]   # frozen before: four times the moved-in
        gc.freeze()
        hold, kept, _ref = _held_then_frozen(n)
        del kept[: n // 10]
        early = hold.sweep_due()
        del kept[: n // 4]   # a third of what moved in, under a tenth of all frozen
        due = hold.sweep_due()
        del startup
        return early, due
    early, due = asyncio.run(main())
    assert not early
    assert due
