"""The demo page's "Move me" button in a real headless Chromium, against a real
``sockshare serve`` (the built-in demo app, two workers).

Both demos: the built-in handler app, and the ASGI one (``_demo_asgi``, the same page on
the ``sockshare.migration`` ASGI extension). A person opens the page, types messages,
clicks "Move me" a few times, and sees: the pid serving the WebSocket changes, the
message counter goes on, and every message they sent was answered exactly once, in
order. The browser's WebSocket never reconnects (one connection accepted for it by the
dispatcher). Then ``sockshare reload`` moves it once more, without a click. A screenshot
goes to the test's tmp dir (``demo-moved.png``).

Needs ``apt-get install chromium``: skipped without it locally, failed without it in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _browser import Browser, require_chromium
from live_helpers import LiveServer

pytestmark = pytest.mark.timeout(120)

REPLIES = "[...document.querySelectorAll('#ws-log li[data-reply]')].map((li) => li.dataset.reply)"
MOVES = "[...document.querySelectorAll('#ws-log li[data-moved]')].map((li) => li.dataset.moved)"


def _say(page: object, text: str) -> None:
    page.evaluate(  # type: ignore[attr-defined]
        f"document.getElementById('ws-input').value = {json.dumps(text)};"
        "document.getElementById('ws-form').requestSubmit()")


@pytest.mark.parametrize("app", [None, "sockshare.server._demo_asgi:app"], ids=["handler", "asgi"])
def test_move_me_button_migrates_the_websocket(tmp_path: Path, app: str | None) -> None:
    """The built-in demo (sockshare's handler API), and the same demo as an ASGI app
    that opts in to the ``sockshare.migration`` extension (docs/web.md)."""
    chromium = require_chromium()
    with LiveServer(tmp_path, "--no-rebalance", app=app, workers=2) as srv:
        host, port = srv.address()
        workers = {w["pid"] for w in srv.status()["workers"]}
        with Browser(chromium) as browser:
            page = browser.new_page(width=1280, height=900)
            page.navigate(f"http://{host}:{port}/")
            page.wait_for(f"({REPLIES}).length >= 1")
            first_pid = int(page.evaluate("document.getElementById('ws-worker-pid').textContent"))
            assert first_pid in workers
            sent = ["hello from the page"]
            for i in range(3):
                _say(page, f"before {i}")
                sent.append(f"before {i}")
            page.wait_for(f"({REPLIES}).length >= {len(sent)}")

            pids = [first_pid]
            for move in range(1, 4):
                page.wait_for("!document.getElementById('move-me').disabled")
                page.evaluate("document.getElementById('move-me').click()")
                page.wait_for(f"({MOVES}).length >= {move}")
                moved = json.loads(page.evaluate(f"({MOVES})[{move - 1}]"))
                assert moved["from_pid"] == pids[-1]
                assert moved["worker_pid"] != pids[-1]
                assert moved["worker_pid"] in workers
                assert moved["moves"] == move
                assert moved["reason"] == "button"
                assert moved["n"] == len(sent)   # the counter goes on from where it was
                pids.append(moved["worker_pid"])
                assert page.evaluate("document.getElementById('ws-worker-pid').textContent") == str(
                    moved["worker_pid"])
                for i in range(2):   # typed right after the move: nothing may be lost
                    _say(page, f"after move {move}.{i}")
                    sent.append(f"after move {move}.{i}")
            page.wait_for(f"({REPLIES}).length >= {len(sent)}")

            # a reload moves it once more, without a click
            assert srv.command({"cmd": "reload", "wait": True})["ok"]
            page.wait_for(f"({MOVES}).length >= 4")
            moved = json.loads(page.evaluate(f"({MOVES})[3]"))
            assert moved["reason"] == "reload"
            assert moved["worker_pid"] not in workers
            _say(page, "after the reload")
            sent.append("after the reload")
            page.wait_for(f"({REPLIES}).length >= {len(sent)}")

            replies = [json.loads(r) for r in page.evaluate(REPLIES)]
            assert [r["echo"] for r in replies] == sent          # none lost, none twice
            assert [r["n"] for r in replies] == list(range(1, len(sent) + 1))
            assert replies[-1]["worker_pid"] == moved["worker_pid"]
            assert page.evaluate("document.getElementById('ws-count').textContent") == str(len(sent))
            assert page.evaluate("document.getElementById('ws-status').dataset.state") == "open"
            log_text = page.evaluate("document.getElementById('ws-log').innerText")
            assert f"moved from worker pid {pids[0]} to pid {pids[1]}" in log_text
            shot = page.screenshot(tmp_path / "demo-moved.png")
            assert shot.read_bytes().startswith(b"\x89PNG")
            page.close()
        st = srv.status()
        # 3 clicks + the WebSocket on reload; the page's idle keep-alive HTTP connections
        # moved on reload too
        assert st["counters"]["migrations"] >= 4
        assert st["counters"]["migrations_refused"] == 0
        assert st["counters"]["refused"] == 0
        # the page and its WebSocket: the browser never had to reconnect
        assert st["listeners"][0]["accepted"] <= 3
