"""The Python worker: receives connections from the dispatcher and runs the app on them.

``python -m sockshare.server._worker --app module:callable --channel ADDRESS --id N``
(the dispatcher starts it; ``SOCKSHARE_CHANNEL`` / ``SOCKSHARE_WORKER_ID`` work too).

Life of a worker:

1. import the app (``async def handle(conn: Connection) -> None``) and connect an
   :class:`~sockshare.AsyncChannel` to the dispatcher, HELLO name ``worker:N``. If the
   app cannot be imported the worker still connects, tells the dispatcher
   (``{"ev": "fatal"}``), rejects whatever was already sent to it with the reason and
   exits with status 3: the dispatcher re-dispatches and restarts it with backoff.
2. for each handoff: build a :class:`Connection` (a StreamReader that already holds the
   pre-read bytes, then ``connect_accepted_socket`` on the socket); only then ACCEPT
   the handoff. A handoff whose connection cannot be set up is REJECTed with a reason,
   and the dispatcher gives it to another worker.
3. run the app as a task. An exception in the app is logged, the connection closed; the
   worker goes on. Closed connections are reported to the dispatcher in CONTROL frames,
   ``{"ev": "closed", "n": k}``, batched per event-loop turn, so least-connections and
   ``max_conns`` see real numbers.
4. SIGTERM or SIGINT (or the dispatcher going away): ``{"ev": "draining"}``, every new
   handoff is rejected ("worker is shutting down"), running handlers get ``--grace``
   seconds to finish, what is left is cancelled, the channel closed, exit status 0. A
   second signal cancels the handlers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sockshare._aio import AsyncChannel
from sockshare._channel import Handoff
from sockshare._errors import ChannelError, SockshareError

__all__ = ["App", "Connection", "Worker", "WorkerInfo", "main", "open_connection"]

log = logging.getLogger("sockshare.server.worker")

App = Callable[["Connection"], Awaitable[None]]
#: StreamReader buffer limit of a Connection (same as asyncio's default).
READ_LIMIT = 2 ** 16
EXIT_APP_ERROR = 3


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Which worker is serving: id (stable across restarts), pid, generation (bumped at
    each restart of this id) and pool."""

    id: int
    pid: int
    generation: int
    pool: str


class Connection:
    """One client connection handed to this worker, as the app sees it.

    ``reader`` yields the bytes the dispatcher already read (``meta``'s sniffer fields
    were parsed from them) and then what the client sends next, seamlessly. ``meta``
    holds ``client`` (``[host, port]``, or ``"unix"``), ``pool``, ``route``,
    ``listener``, ``handoff_id``, ``attempt`` (when re-dispatched) and whatever the
    sniffer found (``host``, ``sni``, ``proxy``, ``method``, ``path``...); the table is
    in docs/server.md.
    """

    # Room is left for ``await conn.migrate(state)`` (moving a live connection to
    # another worker with application state): it will need ``_sock``'s transport to be
    # detached, and ``worker`` to reach the channel. Not implemented here.

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 meta: dict[str, Any], worker: WorkerInfo) -> None:
        self.reader = reader
        self.writer = writer
        self.meta = meta
        self.worker = worker
        self._closed = False

    @property
    def handoff_id(self) -> str:
        return str(self.meta.get("handoff_id", ""))

    @property
    def client_address(self) -> Any:
        """``(host, port)`` for TCP clients; the peer name (a string) for UNIX ones."""
        client = self.meta.get("client")
        if isinstance(client, list):
            return tuple(client)
        if client is None:
            return self.writer.get_extra_info("peername")
        return client

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the connection (flushing what was written); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError, RuntimeError):
            await self.writer.wait_closed()

    def __repr__(self) -> str:
        return f"<Connection {self.handoff_id} from {self.client_address!r} on worker {self.worker.id}>"


async def open_connection(handoff: Handoff, worker: WorkerInfo, *,
                          limit: int = READ_LIMIT) -> Connection:
    """Wrap a received handoff in asyncio streams; pre-read bytes come first."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    if handoff.data:
        reader.feed_data(handoff.data)
    try:
        meta = dict(handoff.meta)
    except ValueError:  # undecodable JSON meta: the connection itself is still fine
        meta = {}
    transport, protocol = await loop.connect_accepted_socket(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock=handoff.socket)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return Connection(reader, writer, meta, worker)


class Worker:
    """The worker's event-loop side: one channel, many handler tasks."""

    def __init__(self, app: App | None, info: WorkerInfo, channel: str, *, grace: float = 10.0,
                 app_error: str = "") -> None:
        self.app = app
        self.info = info
        self.address = channel
        self.grace = grace
        self.app_error = app_error
        self.ch: AsyncChannel | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self._signals = 0
        self._closed_unreported = 0
        self._flush_scheduled = False

    # -- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("worker %d: %s, draining (%d connection(s) running, grace %.1f s)",
                     self.info.id, signal.Signals(signum).name, len(self.tasks), self.grace)
            self.stopping.set()
        else:
            log.warning("worker %d: second signal, cancelling %d handler(s)", self.info.id,
                        len(self.tasks))
            for t in self.tasks:
                t.cancel()

    # -- reporting -------------------------------------------------------------------

    def _control(self, obj: dict[str, Any]) -> None:
        if self.ch is not None:
            with contextlib.suppress(SockshareError):
                self.ch.send_control(obj)

    def _closed_one(self) -> None:
        self._closed_unreported += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_report)

    def _flush_report(self) -> None:
        self._flush_scheduled = False
        n, self._closed_unreported = self._closed_unreported, 0
        if n:
            self._control({"ev": "closed", "n": n, "active": len(self.tasks)})

    # -- handoffs --------------------------------------------------------------------

    async def _serve(self, h: Handoff) -> None:
        if self.stopping.is_set():
            h.reject("worker is shutting down")
            return
        try:
            conn = await open_connection(h, self.info)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("worker %d: cannot set up handoff %d: %s", self.info.id, h.id, exc)
            if not h.answered:
                h.reject(f"cannot set up the connection: {exc}")
            return
        try:
            h.accept()
        except SockshareError as exc:  # the channel broke under us: the sender still has it
            log.warning("worker %d: could not accept handoff %d: %s", self.info.id, h.id, exc)
            conn.writer.transport.abort()
            return
        assert self.app is not None
        try:
            await self.app(conn)
        except asyncio.CancelledError:
            log.info("worker %d: handler for %s cancelled", self.info.id, conn.handoff_id)
        except Exception:
            log.exception("worker %d: handler failed on %s", self.info.id, conn.handoff_id)
        finally:
            if not conn.closed:
                await conn.close()
            self._closed_one()

    def _start(self, h: Handoff) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(h))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _receive(self, ch: AsyncChannel) -> None:
        try:
            async for h in ch:
                if self.stopping.is_set():
                    h.reject("worker is shutting down")
                else:
                    self._start(h)
        except ChannelError as exc:
            log.warning("worker %d: channel to the dispatcher broke: %s", self.info.id, exc)

    # -- life ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.ch = await AsyncChannel.connect(self.address, name=f"worker:{self.info.id}")
        except (OSError, SockshareError) as exc:
            log.error("worker %d: cannot connect to the dispatcher at %s: %s", self.info.id,
                      self.address, exc)
            return 1
        ch = self.ch
        if self.app is None:
            return await self._fail(ch)
        receiver = loop.create_task(self._receive(ch))
        stop = loop.create_task(self.stopping.wait())
        await asyncio.wait({receiver, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not self.stopping.is_set():
            log.info("worker %d: the dispatcher closed the channel; finishing %d connection(s)",
                     self.info.id, len(self.tasks))
            self.stopping.set()
        else:
            self._control({"ev": "draining"})
        await self._drain()
        self._flush_report()
        receiver.cancel()
        stop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, SockshareError, OSError):
            await ch.aclose()
        log.info("worker %d (pid %d) stopped", self.info.id, self.info.pid)
        return 0

    async def _drain(self) -> None:
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=self.grace)
            if pending:
                log.warning("worker %d: %d handler(s) still running after %.1f s: cancelled",
                            self.info.id, len(pending), self.grace)
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=1.0)

    async def _fail(self, ch: AsyncChannel) -> int:
        reason = f"the app cannot be loaded: {self.app_error}"
        self._control({"ev": "fatal", "reason": reason})
        # whatever the dispatcher sent before it read "fatal" goes back with the reason
        with contextlib.suppress(TimeoutError, ChannelError):
            async with asyncio.timeout(0.2):
                async for h in ch:
                    h.reject(reason)
        with contextlib.suppress(TimeoutError, SockshareError, OSError):
            await ch.aclose()
        return EXIT_APP_ERROR


def load_app(spec: str) -> App:
    """Import ``module:callable``; the callable takes a :class:`Connection`."""
    from sockshare.server._policy import load_callable

    func = load_callable(spec)

    if inspect.iscoroutinefunction(func):
        return func

    async def call(conn: Connection) -> None:
        result = func(conn)
        if inspect.isawaitable(result):
            await result

    return call


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sockshare.server._worker",
                                description="A sockshare Python worker (started by the dispatcher).")
    p.add_argument("--app", required=True, help="module:callable, async def handle(conn)")
    p.add_argument("--channel", default=os.environ.get("SOCKSHARE_CHANNEL"),
                   help="the dispatcher's channel address (default: $SOCKSHARE_CHANNEL)")
    p.add_argument("--id", type=int, default=int(os.environ.get("SOCKSHARE_WORKER_ID", "0")))
    p.add_argument("--pool", default=os.environ.get("SOCKSHARE_POOL", "default"))
    p.add_argument("--generation", type=int,
                   default=int(os.environ.get("SOCKSHARE_GENERATION", "0")))
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    info = WorkerInfo(args.id, os.getpid(), args.generation, args.pool)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker:{info.id}[{info.pid}] %(name)s: %(message)s")
    if not args.channel:
        log.error("no channel address: give --channel or set SOCKSHARE_CHANNEL")
        return 2
    app: App | None = None
    error = ""
    try:
        app = load_app(args.app)
    except Exception as exc:
        error = f"{args.app}: {type(exc).__name__}: {exc}"
        log.error("worker %d: %s", info.id, error)
    worker = Worker(app, info, args.channel, grace=args.grace, app_error=error)
    return asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
