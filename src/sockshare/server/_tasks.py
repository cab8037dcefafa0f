"""The one way the dispatcher keeps background tasks: :class:`Tasks`.

A task set that holds its tasks (asyncio keeps only weak references), says what to do
when one dies of a bug (``on_failure``: stop the server for a critical task, log for
another), and cancels and awaits them all at teardown. ``asyncio.TaskGroup`` does not
fit: one failed task would cancel its siblings, and the dispatcher decides per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["Tasks", "log_task_failure"]

log = logging.getLogger("sockshare.server")

T = TypeVar("T")


def log_task_failure(task: asyncio.Task[Any]) -> None:
    """A task that is not critical died of a bug: log it, go on."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %r", task.get_coro().__qualname__,  # type: ignore[union-attr]
                  task.exception(), exc_info=task.exception())


class Tasks:
    """Running tasks, each with a done-callback for its failure."""

    __slots__ = ("_discard", "_tasks")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._discard = self._tasks.discard

    def spawn(self, coro: Coroutine[Any, Any, T],
              on_done: Callable[[asyncio.Task[Any]], None] | None = log_task_failure
              ) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._discard)
        if on_done is not None:
            task.add_done_callback(on_done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def cancel_and_wait(self) -> None:
        """Cancel every task and wait for each (their errors are theirs to log)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
