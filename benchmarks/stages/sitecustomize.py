"""The dispatcher's stages, timed: loaded by benchmarks/dispatcher_stages.py only.

That driver puts this directory first on ``PYTHONPATH`` of the server it starts and sets
``SOCKSHARE_STAGES`` to a file name; every process started that way imports this module
at start-up (Python's ``site`` does), and the one that runs ``python -m
sockshare.server._cli`` (the dispatcher) wraps its hot functions when its event loop
starts: each call's thread CPU time (``SOCKSHARE_STAGES_CLOCK=cpu``, the default:
``time.thread_time_ns``, itself a system call of about 0.4 µs) or wall time (``wall``),
and the number of calls. The totals are written as JSON to that file (``<name>.<pid>``)
when the process exits. Without ``SOCKSHARE_STAGES`` this module does nothing.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_OUT = os.environ.get("SOCKSHARE_STAGES", "")


def _install(stats: dict[str, list[int]], clock: Callable[[], int]) -> None:
    import asyncio.base_events
    import asyncio.events
    import selectors

    from sockshare import _aio, _fast, _state
    from sockshare.server import _listeners, _supervision

    def wrap(owner: Any, name: str, label: str) -> None:
        if not hasattr(owner, name):
            return
        f = getattr(owner, name)
        st = stats.setdefault(label, [0, 0])

        @functools.wraps(f)
        def timed(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return f(*a, **k)
            finally:
                st[0] += 1
                st[1] += clock() - t

        setattr(owner, name, timed)

    wrap(asyncio.base_events.BaseEventLoop, "_run_once", "loop: one iteration")
    wrap(selectors.EpollSelector, "select", "loop: epoll_wait")
    wrap(asyncio.events.Handle, "_run", "loop: callbacks")
    wrap(_listeners.Listeners, "on_acceptable", "listener callback")
    wrap(_listeners, "_sleep", "  the window's sleep")
    wrap(_listeners.Listeners, "_dispatch_compiled", "  _dispatch_compiled")
    wrap(_listeners.Listeners, "_dispatch_sniffed", "  _dispatch_sniffed")
    wrap(_listeners.Listeners, "_admit", "  _admit (Python path)")
    wrap(_aio.AsyncChannel, "send_compiled", "    send_compiled")
    wrap(_aio.AsyncChannel, "_on_readable", "channel read callback")
    wrap(_aio, "recv_with_fds_cut", "  recv (Python path)")
    wrap(_state.ChannelState, "receive_data", "  receive_data (Python path)")
    wrap(_state.ChannelState, "settled_answers", "  settled_answers")
    wrap(_supervision.Supervisor, "_settle_safely", "  supervisor: settle")
    wrap(_supervision.Supervisor, "_apply_control", "    supervisor: a report")
    wrap(_supervision.Supervisor, "_settled", "  supervisor: settled (shortcut)")
    sp = _fast.speedups
    if sp is not None:
        class Timed:
            """The C module, some of its functions timed."""

            def __getattr__(self, name: str) -> Any:
                return getattr(sp, name)

        proxy = Timed()
        for name in ("dispatch_burst", "dispatch_sniffed", "send_fds", "recv_answers",
                     "settle_accepts"):
            if hasattr(sp, name):
                setattr(proxy, name, getattr(sp, name))
                wrap(proxy, name, f"C {name}")
        _fast.speedups = proxy


def _start() -> None:
    import asyncio.runners

    clock = time.perf_counter_ns if os.environ.get("SOCKSHARE_STAGES_CLOCK") == "wall" \
        else time.thread_time_ns
    stats: dict[str, list[int]] = {}
    run = asyncio.runners.Runner.run

    def run_timed(self: asyncio.runners.Runner, coro: Any, **kw: Any) -> Any:
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if getattr(spec, "name", "") == "sockshare.server._cli" and not stats:
            _install(stats, clock)

            def dump() -> None:
                with open(f"{_OUT}.{os.getpid()}", "w") as f:
                    json.dump(stats, f)

            atexit.register(dump)
        return run(self, coro, **kw)

    asyncio.runners.Runner.run = run_timed   # type: ignore[method-assign]


if _OUT:
    _start()
