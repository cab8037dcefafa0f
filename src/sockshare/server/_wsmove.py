"""WebSockets that move between workers: the ``sockshare.migration`` ASGI extension.

The worker's WebSocket protocol for ASGI apps is uvicorn's sans-I/O one (websockets'
``ServerProtocol`` parses the frames), subclassed here (:func:`movable_class`) so that a
live WebSocket can leave one worker and go on in another, with no second handshake and
no frame lost. docs/web.md ("WebSocket migration") specifies the extension so that
another ASGI server could offer it too. In short:

* an app is offered ``scope["extensions"]["sockshare.migration"] = {"requested":
  asyncio.Event, "reason": str, "migrate": async (state) -> None}``; the server sets the
  event when it wants the connection to move (a reload, an upgrade, recycling,
  rebalancing);
* the app answers ``await send({"type": "sockshare.migrate", "state": <JSON>})``, or,
  where a framework checks the messages an app sends (Starlette does), calls
  ``await scope["extensions"]["sockshare.migration"]["migrate"](state)``, the same
  thing. It returns once another worker has the connection (the app then returns; its
  next ``receive()`` is a ``websocket.disconnect``), or raises
  :class:`~sockshare.server.MigrationRefused` if none took it (nothing lost: reading
  resumes, the connection is still the app's);
* the new worker runs the app with the same scope plus ``scope["extensions"]
  ["sockshare.resume"] = {"state": <JSON>, "from": pid}``; its ``websocket.accept`` is
  answered locally (the client saw the 101 long ago) and its first ``receive()`` is a
  ``websocket.connect``, so an unchanged endpoint works.

Nothing the client sent is lost. The protocol keeps the raw bytes from the end of the
last message the app took: the frames of messages parsed but not yet taken, and any
partial frame. Those bytes go with the socket as the handoff's pre-read data, and the
new worker's parser reads them first. Finding where a frame ends takes its header only
(the length fields; RFC 6455 section 5.2). Decoding stays with websockets. Reading pauses
once a message is queued (uvicorn's flow control), so the bytes kept stay small.
Control frames seen again by the new parser (a ping already answered) are harmless.

What cannot move says why (:class:`~sockshare.server.MigrationRefused`, logged and
counted): TLS that ended in this worker (its state is in this process's memory; there is
no kTLS here), a connection that is closing, unread bytes over the 64 KiB a handoff
carries, and compression with context takeover. When migration is on, permessage-deflate
is offered with ``server_no_context_takeover`` and ``client_no_context_takeover``, so
each message is compressed on its own and a fresh compressor in the new worker reads
the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sockshare.protocol import MAX_DATA, MAX_META

if TYPE_CHECKING:
    from sockshare.server._web import WebServer

__all__ = ["MIGRATE", "frame_end", "movable_class"]

log = logging.getLogger("sockshare.web")

#: the ASGI message type an app sends to move its WebSocket
MIGRATE = "sockshare.migrate"
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def frame_end(buf: bytes | bytearray, start: int) -> tuple[int, bool, int] | None:
    """Where the frame that starts at ``start`` ends, its FIN bit and its opcode, from its
    header alone; None until the header is complete."""
    if len(buf) - start < 2:
        return None
    b0, b1 = buf[start], buf[start + 1]
    n = b1 & 0x7F
    pos = start + 2
    if n == 126:
        if len(buf) < pos + 2:
            return None
        n = int.from_bytes(buf[pos:pos + 2], "big")
        pos += 2
    elif n == 127:
        if len(buf) < pos + 8:
            return None
        n = int.from_bytes(buf[pos:pos + 8], "big")
        pos += 8
    if b1 & 0x80:
        pos += 4
    return pos + n, bool(b0 & 0x80), b0 & 0x0F


def movable_class(base: type[Any], web: WebServer) -> type[Any]:
    """uvicorn's ``WebSocketsSansIOProtocol`` (``base``) made movable (module docstring)."""
    from websockets.extensions.permessage_deflate import (
        PerMessageDeflate,
        ServerPerMessageDeflateFactory,
    )
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    from sockshare.server._handler import (
        MigrationAborted,
        MigrationRefused,
        StateError,
        answer_first,
    )

    def deflate_factory() -> Any:
        return ServerPerMessageDeflateFactory(
            server_no_context_takeover=True, client_no_context_takeover=True,
            server_max_window_bits=12, client_max_window_bits=12,
            compress_settings={"memLevel": 5})

    pid = os.getpid()   # (this worker's: the class is made in it)

    class Movable(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.config.ws_per_message_deflate and not web.making_resumed:
                # (one that resumes keeps uvicorn's: _ss_resume sets it up, no handshake)
                logger: Any = getattr(self.__dict__.get("conn"), "logger", None)
                self.conn = ServerProtocol(extensions=[deflate_factory()],
                                           max_size=self.config.ws_max_size, logger=logger)
            self._ss_raw = bytearray()      # bytes from the end of the last message taken
            self._ss_ends: deque[int] = deque()   # ends of the messages queued, in _ss_raw
            self._ss_scan = 0               # where the next frame header starts in _ss_raw
            self._ss_in_message = False     # a fragmented data message has begun
            self._ss_framing = False        # past the HTTP request: bytes are frames
            self._ss_resumed = False        # started in another worker: no handshake here
            self._ss_accepted = False
            self._ss_offer: dict[str, Any] | None = None
            self._ss_moving = False

        # -- the connection's life ------------------------------------------------------

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            c = web.conn_for(transport)
            if c is not None and isinstance(c.resume, dict) and isinstance(c.resume.get("ws"), dict):
                self._ss_resume(c.resume["ws"], c.client)

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            self._ss_framing = True
            self._ss_offer_migration()

        def _ss_offer_migration(self) -> None:
            scope = getattr(self, "scope", None)
            if scope is None or self.scheme == "wss" or web.relay is None:
                return   # TLS ended here cannot move: no offer
            self._ss_offer = {"requested": asyncio.Event(), "reason": "",
                              "migrate": self._ss_migrate}
            scope.setdefault("extensions", {})["sockshare.migration"] = self._ss_offer
            if web.handover_reason:
                # opened while its worker drains (its upgrade request was in progress
                # when the drain asked the WebSockets open then): asked now
                self.request_move(web.handover_reason)

        def _ss_resume(self, ws: dict[str, Any], client: tuple[str, int] | None) -> None:
            """Go on with a WebSocket another worker handed over: open, no handshake."""
            extensions: list[Any] = []
            deflate = ws.get("deflate")
            if isinstance(deflate, list) and len(deflate) == 2:
                extensions.append(PerMessageDeflate(True, True, int(deflate[0]), int(deflate[1]),
                                                    {"memLevel": 5}))
            # uvicorn's ServerProtocol, made OPEN: its parser (waiting for the request
            # line) is replaced by one that reads frames (websockets' ``parse`` skips the
            # handshake once the state is OPEN) -- no second protocol object a move
            conn = self.conn
            conn.state = State.OPEN
            conn.extensions = extensions
            conn.parser = conn.parse()
            next(conn.parser)
            sc = ws.get("scope") or {}
            self.scope = {
                "type": "websocket", "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
                "http_version": "1.1", "scheme": self.scheme, "server": self.server,
                "client": client or self.client, "root_path": self.root_path,
                "path": sc.get("path", "/"), "raw_path": str(sc.get("raw_path", "/")).encode("latin-1"),
                "query_string": str(sc.get("query_string", "")).encode("latin-1"),
                "headers": [(str(k).encode("latin-1"), str(v).encode("latin-1"))
                            for k, v in sc.get("headers", [])],
                "subprotocols": list(sc.get("subprotocols", [])),
                "state": self.app_state.copy(),
                "extensions": {"websocket.http.response": {},
                               "sockshare.resume": {"state": ws.get("state"), "from": ws.get("from")}},
            }
            self.handshake_initiated = self.handshake_complete = True
            self._ss_resumed = self._ss_framing = True
            self._ss_offer_migration()
            self.queue.put_nowait({"type": "websocket.connect"})
            task = self.loop.create_task(self.run_asgi())
            task.add_done_callback(self.on_task_complete)
            self.tasks.add(task)
            self.start_keepalive()
            web.counts["ws_migrated_in"] += 1

        # -- bytes in, messages out ---------------------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self._ss_framing:
                raw = self._ss_raw
                raw += data
                while True:
                    found = frame_end(raw, self._ss_scan)
                    if found is None or found[0] > len(raw):
                        break
                    end, fin, opcode = found
                    self._ss_scan = end
                    if opcode < 8:   # a data frame (control frames never end a message)
                        self._ss_in_message = not fin
                        if fin:
                            self._ss_ends.append(end)
                if not self._ss_ends and not self._ss_in_message and self._ss_scan:
                    # only control frames since the last message taken (pings...):
                    # nothing to keep for a move, and nothing to grow without bound
                    del raw[:self._ss_scan]
                    self._ss_scan = 0
            super().data_received(data)

        async def receive(self) -> Any:
            message = await super().receive()
            if message.get("type") == "websocket.receive" and self._ss_ends:
                end = self._ss_ends.popleft()   # the app took it: forget its bytes
                del self._ss_raw[:end]
                self._ss_scan -= end
                self._ss_ends = deque(e - end for e in self._ss_ends)
            return message

        async def send(self, message: Any) -> None:
            kind = message.get("type")
            if kind == MIGRATE:
                await self._ss_migrate(message.get("state"))
                return
            if kind == "websocket.accept" and self._ss_resumed and not self._ss_accepted:
                self._ss_accepted = True   # the client saw the 101 in the first worker
                return
            await super().send(message)

        # -- moving ---------------------------------------------------------------------------

        def request_move(self, reason: str) -> bool:
            """Ask the app to move (True if it was offered the extension and not asked
            already: one that was, and did not move, is not counted again -- a request
            for ``n`` connections then asks others)."""
            offer = self._ss_offer
            if offer is None or self._ss_moving or offer["requested"].is_set():
                return False
            offer["reason"] = reason
            offer["requested"].set()
            return True

        def _ss_why_not(self) -> str | None:
            if self.scheme == "wss":
                return "TLS ended in this worker: its state cannot leave this process"
            if not self.handshake_complete or self.initial_response is not None:
                return "the WebSocket is not open"
            if self.close_sent or self.disconnected or self.transport.is_closing():
                return "the WebSocket is closing"
            if self._ss_moving:
                return "it is already moving"
            for ext in self.conn.extensions:
                if not (isinstance(ext, PerMessageDeflate) and ext.remote_no_context_takeover
                        and ext.local_no_context_takeover):
                    return f"the {ext.name} extension keeps state between messages"
            if len(self._ss_raw) > MAX_DATA:
                return f"{len(self._ss_raw)} unread bytes are over the {MAX_DATA}-byte limit"
            if web.relay is None:
                return "this worker cannot hand connections over"
            return None

        async def _ss_migrate(self, state: Any) -> None:
            why = self._ss_why_not()
            if why is not None:
                web.counts["ws_refused"] += 1
                log.info("WebSocket %s cannot move: %s", self._ss_id(), why)
                raise MigrationRefused(why)
            try:
                encoded_state = _COMPACT.encode(state)
            except (TypeError, ValueError) as exc:
                raise StateError(f"the migration state is not JSON: {exc}") from None
            meta = self._ss_meta(encoded_state)
            transport = self.transport
            self._ss_moving = True
            web.ws_moving += 1
            transport.pause_reading()
            self.stop_keepalive()
            in_flight = False
            try:
                deadline = time.monotonic() + 10.0
                while transport.get_write_buffer_size() and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                if transport.get_write_buffer_size() or transport.is_closing():
                    raise MigrationRefused("the client did not take what was written")
                async with web.ws_slots:   # (MIGRATION_WINDOW at once)
                    raw = transport.get_extra_info("socket")
                    # (out of descriptors: waits for a move in flight to end, or refused)
                    relay_out = web.relay
                    assert relay_out is not None   # (checked by _ss_why_not)
                    dup = await web.dup_for_move(raw)
                    relay = asyncio.ensure_future(relay_out(dup, meta, bytes(self._ss_raw)))
                    relay.add_done_callback(lambda _t: web.move_ended())
                    try:
                        outcome = await asyncio.shield(relay)
                    except asyncio.CancelledError:
                        # the mover was cancelled with the WebSocket on its way: it is,
                        # once the answer is applied (detached, or served here again),
                        # never in between
                        in_flight = True
                        await answer_first(relay)
                        failed = relay.cancelled() or relay.exception() is not None
                        with contextlib.suppress(MigrationRefused, MigrationAborted):
                            self._ss_apply("rejected: the move failed" if failed
                                           else relay.result())
                        raise
            except BaseException as exc:
                if in_flight:
                    raise
                web.ws_moving -= 1
                self._ss_moving = False
                self._ss_resume_here()
                if isinstance(exc, MigrationRefused):   # (logged and counted: docs/web.md)
                    web.counts["ws_refused"] += 1
                    log.info("WebSocket %s stays here: %s", self._ss_id(), exc)
                raise
            self._ss_apply(outcome)

        def _ss_apply(self, outcome: str) -> None:
            """The relay's answer: moved (detached here), gone (MigrationAborted) or
            refused (served here again: MigrationRefused)."""
            web.ws_moving -= 1
            if outcome in ("accepted", "gone"):
                web.counts["ws_migrated_out" if outcome == "accepted" else "ws_lost"] += 1
                web.detach(self)
                if outcome == "gone":
                    raise MigrationAborted("the channel broke while the WebSocket was on its way; "
                                           "it is no longer served here")
                return
            self._ss_moving = False
            self._ss_resume_here()
            web.counts["ws_refused"] += 1
            log.info("WebSocket %s stays here: %s", self._ss_id(), outcome)
            raise MigrationRefused(f"no worker took the WebSocket ({outcome})")

        def _ss_resume_here(self) -> None:
            if not self.transport.is_closing():
                if not self.read_paused:
                    self.transport.resume_reading()
                self.start_keepalive()
            if self._ss_offer is not None:
                self._ss_offer["requested"].clear()

        def _ss_id(self) -> Any:
            c = getattr(self, "_ss_conn", None)
            return c.meta.get("handoff_id") if c is not None else "?"

        def _ss_meta(self, state: str) -> bytes:
            """The handoff meta (compact JSON): the connection's, its migration, and
            ``resume.ws`` -- ``state`` is the app's state, encoded already: it goes in
            as it is, last (not decoded and encoded again)."""
            c = getattr(self, "_ss_conn", None)
            base = dict(c.meta) if c is not None else {}
            previous = base.get("migration")   # (the count goes on from the last move)
            for key in ("resume", "migration", "attempt"):
                base.pop(key, None)
            sc = self.scope
            deflate = None
            for ext in self.conn.extensions:
                if isinstance(ext, PerMessageDeflate):
                    # (the new worker's compressor: what this side decompresses is
                    # "remote", what it compresses "local", as here)
                    deflate = [ext.remote_max_window_bits, ext.local_max_window_bits]
            count = previous.get("count", 0) if isinstance(previous, dict) else 0
            base["migration"] = {"from": web.worker_id, "from_pid": pid,
                                 "count": (count if isinstance(count, int) else 0) + 1,
                                 "started": time.monotonic(),
                                 "reason": (self._ss_offer or {}).get("reason") or "app"}
            base["resume"] = {"ws": {
                "from": pid, "deflate": deflate,
                "scope": {"path": sc["path"], "raw_path": sc["raw_path"].decode("latin-1"),
                          "query_string": sc["query_string"].decode("latin-1"),
                          "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                                      for k, v in sc["headers"]],
                          "subprotocols": list(sc.get("subprotocols", []))}}}
            # '...,"resume":{"ws":{...}}}' -> '...,"resume":{"ws":{...,"state":STATE}}}'
            text = _COMPACT.encode(base)
            raw = f'{text[:-3]},"state":{state}}}}}}}'.encode()
            if len(raw) > MAX_META:
                raise StateError(f"the migration state and the request's headers are over the "
                                 f"{MAX_META}-byte metadata limit of a handoff")
            return raw

    Movable.__name__ = Movable.__qualname__ = "MovableWebSocket"
    return Movable
