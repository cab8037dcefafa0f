"""The demo page in a real headless Chromium, driven over the DevTools protocol.

The page is served by the demo handler under the loopback harness of ``test_demo.py``;
Chromium loads it, the page's script opens ``/ws`` and says hello, and we read what a
person would see: ``#worker-pid``, ``document.title`` and the replies in ``#ws-log``. A
screenshot goes to the test's tmp dir (``demo-page.png``).

Needs ``apt-get install chromium``: skipped without it locally, failed without it in CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from _browser import Browser, require_chromium
from test_demo import WORKER_ID, DemoServer

REPLIES_JS = """(() => {
  const items = [...document.querySelectorAll('#ws-log li[data-reply]')];
  return items.length >= %d ? items.map((li) => li.dataset.reply) : null;
})()"""


def test_page_shows_the_worker_and_its_websocket_replies(tmp_path: Path) -> None:
    chromium = require_chromium()
    pid = os.getpid()
    with DemoServer() as server:
        with Browser(chromium) as browser:
            page = browser.new_page(width=1280, height=800)
            page.navigate(server.url("/"))

            assert page.evaluate("document.getElementById('worker-pid').textContent") == str(pid)
            assert str(pid) in page.evaluate("document.title")

            # the page says hello over /ws on load; the echo names the same worker
            replies = page.wait_for(REPLIES_JS % 1)
            first = json.loads(replies[0])
            assert first == {
                "echo": "hello from the page",
                "worker_pid": pid,
                "worker_id": WORKER_ID,
                "n": 1,
            }

            # type into the panel like a person would
            page.evaluate(
                "document.getElementById('ws-input').value = 'second message';"
                "document.getElementById('ws-form').requestSubmit()"
            )
            replies = page.wait_for(REPLIES_JS % 2)
            second = json.loads(replies[1])
            assert second["echo"] == "second message"
            assert second["n"] == 2
            assert second["worker_pid"] == pid

            log_text = page.evaluate("document.getElementById('ws-log').innerText")
            assert f"worker pid {pid}" in log_text
            assert page.evaluate("document.getElementById('ws-status').dataset.state") == "open"

            shot = page.screenshot(tmp_path / "demo-page.png")
            png = shot.read_bytes()
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            assert len(png) > 10_000  # a rendered page, not a blank one
            page.close()
        # page + /ws: two connections, both served without error
        assert server.accepted >= 2
    assert server.errors == []
