"""Stand-ins for a worker's channel in the dispatcher's unit tests (admission, listeners,
migration): no process and no socket behind it, only what those parts use of an
AsyncChannel, recorded for the test to look at."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Ticket:
    id: int


@dataclass
class StandInChannel:
    """``send_nowait`` of a batch (always acked, as the dispatcher sends) and
    ``send_control``: each batch and control message kept, in order."""

    batches: list[list[tuple[Any, Any, bytes]]] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def send_nowait(self, items: list[tuple[Any, Any, bytes]], *, ack: bool) -> list[Ticket]:
        assert ack
        self.batches.append(list(items))
        return [Ticket(next(self._ids)) for _ in items]

    def send_control(self, obj: dict[str, Any]) -> None:
        self.controls.append(obj)
