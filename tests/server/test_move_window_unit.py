"""``MoveWindow``: at most ``size`` migrations at once, the others in their order of
arrival; a cancelled waiter gives up its turn (or the slot it was given), and a release
costs the same with 10,000 waiting as with one."""

from __future__ import annotations

import asyncio
import time

from sockshare.server._handler import MoveWindow


async def _hold(window: MoveWindow, order: list[int], i: int, gate: asyncio.Event) -> None:
    async with window:
        order.append(i)
        await gate.wait()


def test_at_most_size_at_once_in_arrival_order() -> None:
    async def main() -> list[int]:
        window = MoveWindow(2)
        order: list[int] = []
        gate = asyncio.Event()
        tasks = [asyncio.create_task(_hold(window, order, i, gate)) for i in range(6)]
        await asyncio.sleep(0.01)
        assert order == [0, 1]   # two in, four waiting
        assert window.waiting == 4
        gate.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4, 5]


def test_a_cancelled_waiter_gives_its_turn_and_its_slot_on() -> None:
    async def main() -> list[int]:
        window = MoveWindow(1)
        order: list[int] = []
        gate = asyncio.Event()
        first = asyncio.create_task(_hold(window, order, 0, gate))
        await asyncio.sleep(0)
        second = asyncio.create_task(_hold(window, order, 1, gate))
        third = asyncio.create_task(_hold(window, order, 2, gate))
        fourth = asyncio.create_task(_hold(window, order, 3, gate))
        await asyncio.sleep(0.01)
        second.cancel()   # waiting: its turn is skipped
        await asyncio.sleep(0)
        gate.set()
        # the slot goes to the third, which is cancelled before it runs: the fourth has it
        await asyncio.sleep(0)
        third.cancel()
        await asyncio.gather(first, fourth)
        for t in (second, third):
            assert t.cancelled()
        async with window:   # and the slot is free again afterwards
            order.append(9)
        return order

    order = asyncio.run(main())
    assert order in ([0, 3, 9], [0, 2, 3, 9])


def test_a_release_is_o1_with_thousands_waiting() -> None:
    async def run(n: int) -> float:
        window = MoveWindow(128)
        done = 0

        async def one() -> None:
            nonlocal done
            async with window:
                await asyncio.sleep(0)
                done += 1

        t0 = time.process_time()
        await asyncio.gather(*(one() for _ in range(n)))
        assert done == n
        return (time.process_time() - t0) / n

    small = asyncio.run(run(1_000))
    large = asyncio.run(run(20_000))
    assert large < small * 3, (small, large)   # (per move: flat, not 20x)
