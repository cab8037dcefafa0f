"""A web app's life under ``sockshare serve``: the lifespan (state visible to routes, a
failed startup stops the server with status 3 and the app's exception in the log),
``--interface`` (auto tells each framework's object apart; a wrong explicit one is a
clear error at load time), ``--max-requests`` (workers are replaced without dropping a
request)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import web_django_app
import web_fastapi_app
import web_flask_app
import web_raw_apps
import web_starlette_app
from serve_helpers import Server, env_with_apps, exit_output
from web_helpers import WEB_DIR, base_url, sockshare, wait_until, worker_pids

from sockshare.server._web import WebAppError, check_interface, detect_interface

pytestmark = pytest.mark.timeout(60)


# -- lifespan --------------------------------------------------------------------------


def test_lifespan_state_in_every_worker(tmp_path: Path) -> None:
    """Two keep-alive connections at once go to the two workers (least connections):
    each worker ran the lifespan startup and its routes see the state."""
    with sockshare(tmp_path, "web_starlette_app:app", workers=2) as server, \
            httpx.Client(base_url=base_url(server), timeout=10) as a, \
            httpx.Client(base_url=base_url(server), timeout=10) as b:
        seen = {c.get("/scope").json()["pid"] for c in (a, b)}
        assert seen == set(worker_pids(server))
        for c in (a, b):
            assert c.get("/state").json() == {"greeting": "hello from the lifespan",
                                              "same_process": True}


def test_failed_lifespan_startup_exits_3(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "sockshare.server._cli", "serve", "web_starlette_app:failing",
            "--bind", "127.0.0.1:0", "--workers", "2", "--control", str(tmp_path / "s.ctl")]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=str(WEB_DIR), env=env_with_apps(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = exit_output(proc)
    assert proc.returncode == 3, text
    assert time.monotonic() - started < 30
    assert f"RuntimeError: {web_starlette_app.STARTUP_ERROR}" in text
    assert "lifespan startup failed" in text


# -- --interface -----------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "kind"), [
    (web_starlette_app.app, "asgi"),
    (web_fastapi_app.app, "asgi"),
    (web_flask_app.app, "wsgi"),
    (web_django_app.wsgi, "wsgi"),
    (web_django_app.asgi, "asgi"),
    (web_raw_apps.asgi_app, "asgi"),
    (web_raw_apps.wsgi_app, "wsgi"),
    (web_raw_apps.handler, "handler"),
], ids=["starlette", "fastapi", "flask", "django-wsgi", "django-asgi", "asgi-function",
        "wsgi-function", "handler"])
def test_auto_detects_each_framework(obj: Callable[..., Any], kind: str) -> None:
    assert detect_interface(obj) == kind
    check_interface(obj, kind)
    for other in ("asgi", "wsgi", "handler"):
        if other != kind:
            with pytest.raises(WebAppError, match=f"--interface {other}: .*give --interface "
                                                  f"{kind} or auto"):
                check_interface(obj, other)


@pytest.mark.parametrize(("app", "body"), [
    ("web_raw_apps:asgi_app", b"ok asgi"),
    ("web_raw_apps:wsgi_app", b"ok wsgi"),
    ("web_raw_apps:handler", b"ok handler"),
])
def test_auto_serves_each_kind(tmp_path: Path, app: str, body: bytes) -> None:
    with sockshare(tmp_path, app, "--interface", "auto", workers=1) as server:
        r = httpx.get(base_url(server) + "/", timeout=10)
        assert (r.status_code, r.content) == (200, body)


@pytest.mark.parametrize(("app", "wrong", "right"), [
    ("web_starlette_app:app", "wsgi", "an ASGI app: give --interface asgi or auto"),
    ("web_flask_app:app", "asgi", "a WSGI app: give --interface wsgi or auto"),
    ("web_flask_app:app", "handler", "a WSGI app: give --interface wsgi or auto"),
])
def test_wrong_interface_is_a_clear_error(tmp_path: Path, app: str, wrong: str, right: str) -> None:
    server = Server(tmp_path, "--interface", wrong, app=app, workers=1, ready=0, cwd=WEB_DIR)
    try:
        wait_until(lambda: right in server.log(), 15, "the error in the log")
        log = server.log()
        assert f"{app}: --interface {wrong}: the app cannot be called as" in log
        assert "Exception in ASGI application" not in log
    finally:
        server.close()


# -- --max-requests --------------------------------------------------------------------


def test_max_requests_replaces_worker_without_dropping(tmp_path: Path) -> None:
    with sockshare(tmp_path, "web_starlette_app:app", "--max-requests", "20",
                   workers=1) as server:
        url = base_url(server)
        pids: list[int] = []
        failures: list[str] = []
        for i in range(50):
            try:
                r = httpx.get(url + "/scope", timeout=10, headers={"connection": "close"})
            except httpx.HTTPError as exc:
                failures.append(f"request {i}: {exc!r}")
                continue
            if r.status_code != 200:
                failures.append(f"request {i}: {r.status_code}")
                continue
            pids.append(r.json()["pid"])
        assert failures == [], server.log()
        changes = sum(a != b for a, b in itertools.pairwise(pids))
        assert changes >= 1, pids
        assert len(set(pids)) >= 2
        # the worker goes on serving until its replacement is ready: no more than 20
        # requests of each, but a few more while the next one imports the app
        assert pids[:20] == [pids[0]] * 20, pids
        assert "(--max-requests): asking to be replaced" in server.log()
