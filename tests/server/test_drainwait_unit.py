"""``sockshare reload``'s waiting display (``_drainwait``): plain lines on a pipe, one
line rewritten in place on a terminal, and the outcome from the counters' deltas."""

from __future__ import annotations

import importlib.util
import io
from typing import Any

from sockshare.server._drainwait import DrainProgress, wait_retired


def _st(workers: list[tuple[int | None, int]], **counters: int) -> dict[str, Any]:
    return {"workers": [{"pid": pid, "connections": n} for pid, n in workers],
            "counters": counters}


def test_wait_retired_polls_until_the_old_pids_are_gone() -> None:
    before = _st([(11, 100), (12, 100)], migrations=5, drain_closed=0, lost=0)
    snaps = iter([
        _st([(11, 60), (12, 40), (21, 100)], migrations=105),
        _st([(11, 0), (21, 200)], migrations=205),
        _st([(21, 199), (22, 0)], migrations=204, drain_closed=1),
    ])
    out = io.StringIO()
    first = _st([(11, 100), (12, 100), (21, 0), (22, 0)], migrations=5)
    outcome = wait_retired(lambda: next(snaps), before, first, out=out, interval=0.0,
                           tty=False)
    assert (outcome.moved, outcome.closed, outcome.lost, outcome.left) == (199, 1, 0, 0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("reload: 0 connection(s) moved or closed, 200 left")
    assert "connection(s) moved, 1 closed (could not move), 0 lost" in str(outcome)


def test_terminal_line_is_rewritten_in_place() -> None:
    out = io.StringIO()
    p = DrainProgress(out, 10, tty=True, use_rich=False)
    p.update(8)
    p.update(0)
    p.close()
    text = out.getvalue()
    assert "\n" not in text
    assert text.count("\r") == 4   # two updates, then the line cleared
    assert "2 connection(s) moved or closed, 8 left" in text


def test_a_rich_bar_when_rich_is_installed() -> None:
    if importlib.util.find_spec("rich") is None:
        return   # (plain lines then: the tests above)
    out = io.StringIO()
    p = DrainProgress(out, 10, tty=True)
    p.update(4)
    p.close()
    assert "\r2 connection(s)" not in out.getvalue()   # the bar, not the plain line
