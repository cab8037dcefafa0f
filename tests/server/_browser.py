"""Headless Chromium driven over the DevTools protocol (CDP), for tests.

::

    chromium = require_chromium()            # skips locally, fails under CI=true
    with Browser(chromium) as browser:
        page = browser.new_page(width=1280, height=800)
        page.navigate("http://127.0.0.1:8080/")
        pid = page.wait_for("document.getElementById('worker-pid')?.textContent")
        page.screenshot(tmp_path / "page.png")

How it works: Chromium starts in its own process group with a fresh ``--user-data-dir``
and ``--remote-debugging-port=0``; it writes the port it picked (and the browser
endpoint's path) to ``<user-data-dir>/DevToolsActivePort``, which we poll. We then speak
CDP over a WebSocket of our own (blocking socket plus :mod:`wsproto`): one browser-level
connection, one *flattened* session per page (``Target.attachToTarget`` with
``flatten: true``), commands matched to replies by ``id``, events queued until asked for.

Every wait has a deadline. :meth:`Browser.close` asks Chromium to quit
(``Browser.close``), and then SIGKILLs *its own process group* -- the one it started,
found by the pid it started -- before reaping the leader, so stray renderer or zygote
processes never outlive a test and no unrelated process is touched.

Kept free of sockshare imports so any test (the migration demo, later) can use it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "install chromium (apt-get install chromium)"

#: The command line the project agreed on, plus the CDP port request.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # loopback pages only; never route them through an env proxy
    "--remote-debugging-port=0",
)

START_TIMEOUT = 30.0
CALL_TIMEOUT = 15.0
CLOSE_TIMEOUT = 5.0


def chromium_path() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def require_chromium() -> str:
    """The Chromium binary; without one: skip locally, fail in CI (``CI=true``)."""
    path = chromium_path()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is missing in CI: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return path


class CdpError(RuntimeError):
    """Chromium answered a command with an error, or did not answer in time."""


class _WebSocket:
    """A blocking WebSocket client (text messages only) over :mod:`wsproto`."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: collections.deque[Any] = collections.deque()
        self.parts: list[str] = []
        try:
            # No Origin header: Chromium only checks --remote-allow-origins when one is sent.
            self.sock.sendall(self.ws.send(Request(host=f"{host}:{port}", target=path)))
            deadline = time.monotonic() + timeout
            while True:
                event = self._next_event(deadline)
                if isinstance(event, AcceptConnection):
                    break
                if isinstance(event, RejectConnection):
                    raise CdpError(f"DevTools refused the WebSocket: HTTP {event.status_code}")
        except BaseException:
            self.sock.close()
            raise

    def _next_event(self, deadline: float) -> Any:
        while not self.events:
            self.events.extend(self.ws.events())
            if self.events:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("DevTools WebSocket: nothing received in time")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            self.ws.receive_data(data or None)
        return self.events.popleft()

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def recv_text(self, deadline: float) -> str:
        """The next whole text message (fragments joined); pings answered on the way."""
        while True:
            event = self._next_event(deadline)
            if isinstance(event, TextMessage):
                self.parts.append(event.data)
                if event.message_finished:
                    text = "".join(self.parts)
                    self.parts.clear()
                    return text
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise CdpError(f"DevTools closed the WebSocket ({event.code} {event.reason})")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        self.sock.close()


class Browser:
    """One headless Chromium process and a CDP connection to it."""

    def __init__(
        self,
        executable: str | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.executable = executable or require_chromium()
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.user_data_dir = Path(tempfile.mkdtemp(prefix="sockshare-chromium-"))
        self.stderr_path = self.user_data_dir.parent / (self.user_data_dir.name + ".stderr")
        self.proc: subprocess.Popen[bytes] | None = None
        self._ws: _WebSocket | None = None
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque()

    # -- life cycle

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        args = [
            self.executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.user_data_dir}",
            *self.extra_args,
            "about:blank",
        ]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group: ours to kill, and only it
            )
        port, path = self._wait_for_devtools()
        self._ws = _WebSocket("127.0.0.1", port, path, timeout=self.start_timeout)

    def _wait_for_devtools(self) -> tuple[int, str]:
        assert self.proc is not None
        marker = self.user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}: {self.stderr_tail()}")
            with contextlib.suppress(OSError, ValueError):
                lines = marker.read_text().split("\n")
                if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
                    return int(lines[0]), lines[1].strip()
            time.sleep(0.05)
        raise CdpError(f"chromium did not open DevTools in {self.start_timeout}s: {self.stderr_tail()}")

    def stderr_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_bytes()[-limit:].decode("utf-8", "replace")
        return ""

    def close(self) -> None:
        """Quit Chromium (politely, then by SIGKILL to its group) and remove its profile."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self.call("Browser.close", timeout=CLOSE_TIMEOUT)
            self._ws.close()
            self._ws = None
        proc, self.proc = self.proc, None
        if proc is not None:
            self._wait_exited_unreaped(proc.pid, CLOSE_TIMEOUT)
            # The leader is not reaped yet, so its pid -- and the group id -- is still ours.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(CLOSE_TIMEOUT)
        shutil.rmtree(self.user_data_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.stderr_path.unlink()

    @staticmethod
    def _wait_exited_unreaped(pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is not None:
                return
            time.sleep(0.05)

    # -- CDP

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, Any]:
        """Send one command; its ``result`` (events that arrive meanwhile are queued)."""
        if self._ws is None:
            raise CdpError("browser is not running")
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        self._ws.send_text(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = json.loads(self._ws.recv_text(deadline))
            except TimeoutError:
                raise CdpError(f"{method}: no answer in {timeout}s") from None
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self._events.append(reply)

    def wait_event(
        self, method: str, *, session_id: str | None = None, timeout: float = CALL_TIMEOUT
    ) -> dict[str, Any]:
        """The first queued or incoming event ``method`` (of ``session_id``); its params."""
        for event in list(self._events):
            if event["method"] == method and event.get("sessionId") == session_id:
                self._events.remove(event)
                params: dict[str, Any] = event.get("params", {})
                return params
        if self._ws is None:
            raise CdpError("browser is not running")
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = json.loads(self._ws.recv_text(deadline))
            except TimeoutError:
                raise CdpError(f"no {method} event in {timeout}s") from None
            if msg.get("method") == method and msg.get("sessionId") == session_id:
                found: dict[str, Any] = msg.get("params", {})
                return found
            if "method" in msg:
                self._events.append(msg)

    def drop_events(self, session_id: str | None = None) -> None:
        self._events = collections.deque(e for e in self._events if e.get("sessionId") != session_id)

    def new_page(self, *, width: int = 1280, height: int = 800) -> Page:
        """A new tab with a fixed viewport, attached with its own flattened session."""
        target_id = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session_id = self.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, target_id, session_id)
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page


class Page:
    """One tab, driven through its CDP session."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.browser.call(method, params, session_id=self.session_id, **kw)

    def navigate(self, url: str, *, timeout: float = CALL_TIMEOUT) -> None:
        """Load ``url`` and wait for its load event; raise on a network error."""
        self.browser.drop_events(self.session_id)
        result = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CdpError(f"navigate {url}: {result['errorText']}")
        self.browser.wait_event("Page.loadEventFired", session_id=self.session_id, timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float = CALL_TIMEOUT) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = CALL_TIMEOUT, interval: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; that value. CdpError on time-out."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression, timeout=max(0.5, deadline - time.monotonic()))
            if value:
                return value
            time.sleep(interval)
        raise CdpError(f"timed out after {timeout}s waiting for {expression!r} (last: {value!r})")

    def screenshot(self, path: Path, *, timeout: float = CALL_TIMEOUT) -> Path:
        """Write a PNG of the viewport to ``path``."""
        data = self.call("Page.captureScreenshot", {"format": "png"}, timeout=timeout)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(CdpError):
            self.browser.call("Target.closeTarget", {"targetId": self.target_id})
