"""Unit tests of the web interface's pure parts: telling apps apart, the settings and
their flags and TOML keys, and the access log's atoms (no process, no socket)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

import pytest

from sockshare.server._cli import add_commands
from sockshare.server._config import ConfigError, from_args, parse_document
from sockshare.server._web import AccessLog, WebAppError, WebSettings, detect_interface


async def asgi_func(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI 3 function."""


async def handle(conn: Any) -> None:
    """A sockshare handler."""


def wsgi_func(environ: Any, start_response: Any) -> list[bytes]:
    return [b""]


class AsgiObject:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


class WsgiObject:
    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        return []


def test_interfaces_are_told_apart_as_uvicorn_does() -> None:
    assert detect_interface(asgi_func) == "asgi"
    assert detect_interface(AsgiObject()) == "asgi"
    assert detect_interface(handle) == "handler"
    assert detect_interface(wsgi_func) == "wsgi"
    assert detect_interface(WsgiObject()) == "wsgi"
    assert detect_interface(functools.partial(asgi_func)) == "asgi"


def test_real_frameworks_are_recognised() -> None:
    flask = pytest.importorskip("flask", reason="pip install flask")
    starlette = pytest.importorskip("starlette.applications", reason="pip install starlette")
    assert detect_interface(flask.Flask("x")) == "wsgi"
    assert detect_interface(starlette.Starlette()) == "asgi"


def test_what_cannot_be_told_apart_is_a_clear_error() -> None:
    def three(a: Any, b: Any, c: Any) -> None:
        pass

    with pytest.raises(WebAppError, match="--interface"):
        detect_interface(three)
    with pytest.raises(WebAppError, match="class"):
        detect_interface(AsgiObject)
    with pytest.raises(WebAppError, match="not callable"):
        detect_interface(42)


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_flags_reach_the_pool_settings() -> None:
    cfg = from_args(_serve_args("m:app", "--interface", "wsgi", "--threads", "4",
                                "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem",
                                "--max-requests", "100", "--max-requests-jitter", "10",
                                "--limit-concurrency", "50", "--root-path", "/api",
                                "--proxy-headers", "--forwarded-allow-ips", "10.0.0.1",
                                "--access-log-format", "%(h)s %(s)s",
                                "--graceful-timeout", "7"))
    web = cfg.pools["default"].web
    assert (web.interface, web.threads, web.ssl_certfile, web.ssl_keyfile) == ("wsgi", 4, "c.pem", "k.pem")
    assert (web.max_requests, web.max_requests_jitter, web.limit_concurrency) == (100, 10, 50)
    assert (web.root_path, web.proxy_headers, web.forwarded_allow_ips) == ("/api", True, "10.0.0.1")
    assert web.access_log
    assert web.access_log_format == "%(h)s %(s)s"
    assert cfg.grace == 7.0
    assert WebSettings.from_json(web.to_json()) == web


def test_toml_pools_carry_their_own_web_settings() -> None:
    cfg = parse_document({
        "listen": [{"bind": "127.0.0.1:0", "sniff": True}],
        "pools": {"a": {"app": "m:a", "interface": "asgi", "ssl_certfile": "a.pem",
                        "ssl_keyfile": "a.key"},
                  "b": {"app": "m:b", "interface": "wsgi", "threads": 2}},
        "routes": [{"sni": "a.test", "pool": "a"}],
    })
    cfg.validate()
    assert cfg.pools["a"].web.tls
    assert cfg.pools["a"].web.ssl_certfile == "a.pem"
    assert cfg.pools["b"].web.threads == 2
    assert not cfg.pools["b"].web.tls


def test_websocket_keepalive_settings_from_the_file_and_the_flags() -> None:
    """``ws_ping_interval`` / ``ws_ping_timeout`` (uvicorn's names and defaults, 20 s
    each; 0 turns either off), from a pool's table (an integer is seconds too) or from
    ``--ws-ping-interval`` / ``--ws-ping-timeout``."""
    cfg = parse_document({"listen": [{"bind": "127.0.0.1:0"}],
                          "pools": {"p": {"app": "m:a", "ws_ping_interval": 5,
                                          "ws_ping_timeout": 0}}})
    cfg.validate()
    assert (cfg.pools["p"].web.ws_ping_interval, cfg.pools["p"].web.ws_ping_timeout) == (5.0, 0.0)
    assert (WebSettings().ws_ping_interval, WebSettings().ws_ping_timeout) == (20.0, 20.0)
    web = from_args(_serve_args("m:a", "--ws-ping-interval", "0",
                                "--ws-ping-timeout", "2.5")).pools["default"].web
    assert (web.ws_ping_interval, web.ws_ping_timeout) == (0.0, 2.5)


@pytest.mark.parametrize(("pool", "match"), [
    ({"app": "m:a", "interface": "cgi"}, "interface must be one of"),
    ({"app": "m:a", "threads": 0}, "threads must be at least 1"),
    ({"app": "m:a", "ssl_keyfile": "k.pem"}, "ssl_keyfile needs ssl_certfile"),
    ({"app": "m:a", "threads": "8"}, "threads must be int"),
    ({"app": "m:a", "ws_ping_interval": -1}, "ws_ping_interval must be 0 .off. or a positive"),
    ({"app": "m:a", "ws_ping_timeout": float("nan")}, "ws_ping_timeout must be 0 .off."),
    ({"app": "m:a", "ws_ping_interval": "20"}, "ws_ping_interval must be float"),
    ({"worker_cmd": "php w.php", "interface": "asgi"}, "not worker_cmd"),
])
def test_bad_web_settings_name_their_key(pool: dict[str, Any], match: str) -> None:
    def load() -> None:
        parse_document({"listen": [{"bind": "127.0.0.1:0"}], "pools": {"p": pool}}).validate()

    with pytest.raises(ConfigError, match=match):
        load()


def test_access_log_atoms_follow_gunicorn() -> None:
    log = AccessLog(asgi_func)
    scope = {"type": "http", "method": "GET", "path": "/a b", "raw_path": b"/a%20b",
             "query_string": b"x=1", "http_version": "1.1", "client": ("10.1.2.3", 5555),
             "headers": [(b"user-agent", b"curl/8"), (b"referer", b"http://r/")]}
    atoms = log.atoms(scope, 404, 12, 0.0125)
    assert atoms["h"] == "10.1.2.3"
    assert atoms["r"] == "GET /a%20b?x=1 HTTP/1.1"
    assert (atoms["s"], atoms["b"], atoms["a"], atoms["f"]) == ("404", "12", "curl/8", "http://r/")
    assert (atoms["M"], atoms["D"]) == ("12", "12500")
    assert log.atoms(scope, 204, 0, 0.0)["b"] == "-"
    line = log.fmt % atoms
    assert line.startswith('10.1.2.3 - - [')
    assert '"GET /a%20b?x=1 HTTP/1.1" 404 12 "http://r/" "curl/8"' in line


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("mask", [True, False])
def test_frame_end_follows_rfc_6455_lengths(size: int, mask: bool) -> None:
    """Frames made by websockets' own encoder: the end is found from the header alone,
    for the 7-bit, 16-bit and 64-bit length forms, masked (client) or not."""
    frames = pytest.importorskip("websockets.frames", reason="pip install websockets")
    from sockshare.server._wsmove import frame_end

    text = frames.Frame(frames.Opcode.TEXT, b"x" * size, fin=True).serialize(
        mask=mask, extensions=[])
    cont = frames.Frame(frames.Opcode.CONT, b"y", fin=False).serialize(mask=mask, extensions=[])
    ping = frames.Frame(frames.Opcode.PING, b"p", fin=True).serialize(mask=mask, extensions=[])
    buf = cont + ping + text
    assert frame_end(buf, 0) == (len(cont), False, 0)
    assert frame_end(buf, len(cont)) == (len(cont) + len(ping), True, 9)
    assert frame_end(buf, len(cont) + len(ping)) == (len(buf), True, 1)
    lengths = 2 + (0 if size < 126 else 2 if size < 65536 else 8)
    for cut in range(lengths):   # the length fields incomplete: not known yet
        assert frame_end(text[:cut], 0) is None
    assert frame_end(text[:lengths], 0) == (len(text), True, 1)   # (the mask is counted)
