"""Places where the code did not keep docs/protocol.md's promises (found in an audit).

* §5.2: "After the handshake a sender MUST NOT send a frame with a payload over the
  peer's HELLO ``max payload``". A CONTROL frame was checked against 1 MiB only: a
  control over a smaller peer limit went out and the peer, which refuses a frame over
  its limit (§1), broke the channel. It is now refused before anything is sent
  (:class:`~sockshare.MessageTooLarge`), and the channel stays up.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

import sockshare

SMALL = 4096


def _pair(small_side_max: int) -> tuple[sockshare.Channel, sockshare.Channel]:
    """A channel over a socketpair whose second end accepts payloads up to
    ``small_side_max`` bytes (its HELLO says so)."""
    a, b = socket.socketpair()
    out: list[sockshare.Channel] = []
    t = threading.Thread(target=lambda: out.append(
        sockshare.Channel.from_socket(b, max_payload=small_side_max)))
    t.start()
    big = sockshare.Channel.from_socket(a)
    t.join(10)
    return big, out[0]


def test_a_control_over_the_peers_limit_is_refused_before_it_is_sent() -> None:
    big, small = _pair(SMALL)
    try:
        assert big.peer.max_payload == SMALL
        with pytest.raises(sockshare.MessageTooLarge):
            big.send_control({"pad": "x" * (2 * SMALL)})
        big.send_control({"ok": 1})  # the channel is still good, on both sides
        assert small.receive_control(timeout=5) == {"ok": 1}  # (not the big one first)
    finally:
        big.close()
        small.close()


def test_an_async_control_over_the_peers_limit_is_refused_before_it_is_sent() -> None:
    big_sync, small = _pair(SMALL)

    async def main() -> None:
        big = sockshare.AsyncChannel.wrap(big_sync)
        try:
            with pytest.raises(sockshare.MessageTooLarge):
                big.send_control({"pad": "x" * (2 * SMALL)})
            big.send_control({"ok": 1})
            await big.drain()
            assert await asyncio.to_thread(small.receive_control, 5) == {"ok": 1}
            assert big.usable
        finally:
            await big.aclose()

    try:
        asyncio.run(main())
    finally:
        small.close()
