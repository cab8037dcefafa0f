"""The worker's garbage-collection policy (``_gc``): collections (every generation)
wait while connections move, and come back once they stop, or after ``HOLD_MAX`` held
in a row."""

from __future__ import annotations

import asyncio
import gc
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


def test_the_end_of_a_large_hold_runs_one_full_collection_and_nothing_before_it() -> None:
    """Connections that moved in are walked once at the end of the hold (a full
    collection), not by a young, a middle and a full collection in turn: the young
    collection the collector would run at the first allocation once back on walked
    all of them in a reload of 20,000 (0.6 s of a new worker's CPU)."""
    gc.set_threshold(700, 10, 10)
    gc.enable()
    seen, record = _recorder()

    async def main() -> tuple[list[int], list[int]]:
        hold = MoveBurst()
        hold.moved()
        gc.callbacks.append(record)
        try:
            kept = [[i] for i in range(_gc.FULL_MIN + 10_000)]   # as moved-in connections
            hold.release()
            at_release = list(seen)
            seen.clear()
            small = MoveBurst()
            small.moved()
            more = [[i] for i in range(1_000)]   # a small hold: nothing run at its end
            small.release()
            del kept, more
        finally:
            gc.callbacks.remove(record)
        return at_release, seen

    at_release, after_small = asyncio.run(main())
    assert at_release[:1] == [2]   # the full collection first, no young one before it
    assert 2 not in after_small
    assert gc.isenabled()
