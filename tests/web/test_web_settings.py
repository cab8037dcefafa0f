"""Settings people bring from gunicorn and uvicorn, on real ``sockshare serve`` processes:
a WSGI app's slow requests run in threads, so ``--timeout`` never takes a busy but
healthy worker for a hung one; ``--log-config`` and ``--access-log-format`` decide where
and how each request is logged."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
from web_helpers import base_url, sockshare, wait_until, worker_pids

pytest.importorskip("a2wsgi", reason="pip install 'sockshare[wsgi]' (or the test extra)")
pytestmark = pytest.mark.timeout(120)


def _get(url: str, timeout: float = 20.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return int(r.status), bytes(r.read())


def test_slow_wsgi_requests_never_look_like_a_hung_worker(tmp_path: Path) -> None:
    """Three requests busy for 2 s each with ``--timeout 1``: each gets its answer, a
    quick request made meanwhile is answered at once, and the worker is not killed."""
    with sockshare(tmp_path, "web_flask_app:app", "--interface", "wsgi", "--threads", "4",
                   "--timeout", "1", workers=1) as srv:
        url = base_url(srv)
        pid = worker_pids(srv)[0]
        results: list[tuple[int, bytes]] = []
        threads = [threading.Thread(target=lambda: results.append(_get(f"{url}/slow")))
                   for _ in range(3)]
        for t in threads:
            t.start()
        quick = _get(f"{url}/json/x", timeout=1.5)   # the loop is free: answered at once
        assert quick[0] == 200
        for t in threads:
            t.join(20)
        assert [status for status, _ in results] == [200, 200, 200]
        assert {json.loads(body)["pid"] for _, body in results} == {pid}
        assert worker_pids(srv) == [pid]
        assert srv.status()["counters"]["hung_kills"] == 0


def test_log_config_and_access_log_format(tmp_path: Path) -> None:
    """A dictConfig JSON file sends the access log to a file of its own, in the format
    given by ``--access-log-format`` (gunicorn's atoms)."""
    access = tmp_path / "access.log"
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"bare": {"format": "%(message)s"}},
        "handlers": {"access": {"class": "logging.FileHandler", "filename": str(access),
                                "formatter": "bare"}},
        "loggers": {"sockshare.access": {"handlers": ["access"], "level": "INFO",
                                         "propagate": False}},
    }))
    with sockshare(tmp_path, "web_flask_app:app", "--log-config", str(config),
                   "--access-log-format", "%(h)s|%(m)s|%(U)s|%(q)s|%(s)s|%(b)s|%(a)s",
                   workers=1) as srv:
        req = urllib.request.Request(f"{base_url(srv)}/json/anna?x=1",
                                     headers={"User-Agent": "settings-test/1"})
        with urllib.request.urlopen(req, timeout=10) as r:
            size = len(r.read())
        wait_until(lambda: access.exists() and access.read_text().strip() != "", timeout=10,
                   what="the access log line")
        line = access.read_text().strip().splitlines()[-1]
        assert line == f"127.0.0.1|GET|/json/anna|x=1|200|{size}|settings-test/1"
        assert "sockshare.access" not in srv.log()   # it went to its own file only
