"""Waiting for a reload's old workers to be gone, with progress: ``sockshare reload``.

``sockshare reload`` (and ``upgrade``, ``migrate``) wait by default until the work is
done (docs/server.md, "Reload"); for a reload that is: the new generation serves *and*
every worker that served before it has exited -- each of its connections moved to a new
worker or closed (one that could not move: no resume handler, not migratable).
:func:`wait_retired` polls the dispatcher's status for that and shows the progress:

* on a terminal, one line rewritten in place (a ``rich`` progress bar if rich is
  installed): connections moved so far, left, and the rate;
* otherwise (a pipe, a log), a plain line about once a second while something is left;
* in both cases a last line with what became of them (moved, closed, lost).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["DrainProgress", "Outcome", "old_workers", "wait_retired"]

Status = Callable[[], dict[str, Any]]


def old_workers(st: dict[str, Any]) -> dict[int, int]:
    """pid -> open connections of every worker process in a status snapshot."""
    return {w["pid"]: int(w.get("connections", 0)) for w in st.get("workers", ()) if w.get("pid")}


class Outcome:
    """What :func:`wait_retired` saw: how long, and the counters' deltas."""

    def __init__(self, seconds: float, moved: int, closed: int, lost: int, left: int) -> None:
        self.seconds = seconds
        self.moved = moved
        self.closed = closed
        self.lost = lost
        #: connections still on old workers (> 0 only when interrupted)
        self.left = left

    def __str__(self) -> str:
        return (f"{self.moved} connection(s) moved, {self.closed} closed (could not move), "
                f"{self.lost} lost, in {self.seconds:.1f} s")


class DrainProgress:
    """Shows ``moved / left / rate`` of a drain on ``out``: a rich bar or a line rewritten
    in place on a terminal, plain lines (at most one per ``every`` seconds) elsewhere."""

    def __init__(self, out: TextIO, total: int, label: str = "reload", *,
                 tty: bool | None = None, every: float = 1.0, use_rich: bool = True) -> None:
        self.out = out
        self.total = max(0, total)
        self.label = label
        self.tty = out.isatty() if tty is None else tty
        self.every = every
        self.started = time.monotonic()
        self._last_plain = -1e9
        self._last_left: int | None = None
        self._width = 0
        self._rich: Any = None
        self._task: Any = None
        if self.tty and self.total and use_rich:
            try:
                progress_mod: Any = importlib.import_module("rich.progress")
                console_mod: Any = importlib.import_module("rich.console")
            except ImportError:
                pass
            else:
                self._rich = progress_mod.Progress(
                    progress_mod.TextColumn(f"{label}: old workers draining"),
                    progress_mod.BarColumn(), progress_mod.MofNCompleteColumn(),
                    progress_mod.TextColumn("{task.fields[rate]}"),
                    console=console_mod.Console(file=out), transient=True)
                self._rich.start()
                self._task = self._rich.add_task("drain", total=self.total, rate="")

    def _line(self, left: int) -> str:
        elapsed = max(1e-3, time.monotonic() - self.started)
        moved = max(0, self.total - left)
        return (f"{self.label}: {moved} connection(s) moved or closed, {left} left on the old "
                f"workers, {moved / elapsed:.0f}/s")

    def update(self, left: int) -> None:
        """The old workers hold ``left`` connections now."""
        self.total = max(self.total, left)   # (opened on them just before they retired)
        if self._rich is not None:
            elapsed = max(1e-3, time.monotonic() - self.started)
            moved = self.total - left
            self._rich.update(self._task, total=self.total, completed=moved,
                              rate=f"{moved / elapsed:.0f}/s")
            return
        if self.tty:
            text = self._line(left)
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.out.write(f"\r{text}{pad}")
            self.out.flush()
            return
        now = time.monotonic()
        if left != self._last_left and now - self._last_plain >= self.every:
            self._last_plain = now
            self._last_left = left
            self.out.write(self._line(left) + "\n")
            self.out.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()


def wait_retired(status: Status, before: dict[str, Any], after: dict[str, Any] | None = None,
                 *, out: TextIO = sys.stdout, label: str = "reload", interval: float = 0.1,
                 tty: bool | None = None) -> Outcome:
    """Poll ``status()`` until no worker process of the snapshot ``before`` runs any
    more, showing the progress on ``out``. ``after``: a snapshot taken once the new
    generation served (its old workers' connections are the total to move). Returns
    what the counters say happened meanwhile; KeyboardInterrupt propagates (the
    workers go on draining: only the waiting stops)."""
    old = set(old_workers(before))
    first = after if after is not None else status()
    c0 = before.get("counters", {})
    total = sum(n for pid, n in old_workers(first).items() if pid in old)
    progress = DrainProgress(out, total, label, tty=tty)
    st = first
    left = total
    try:
        while True:
            running = {pid: n for pid, n in old_workers(st).items() if pid in old}
            left = sum(running.values())
            if not running:
                break
            progress.update(left)
            time.sleep(interval)
            st = status()
    finally:
        progress.close()
    c1 = st.get("counters", {})

    def delta(key: str) -> int:
        return max(0, int(c1.get(key, 0)) - int(c0.get(key, 0)))

    return Outcome(time.monotonic() - progress.started, delta("migrations"),
                   delta("drain_closed"), delta("lost"), left)
