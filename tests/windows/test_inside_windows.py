"""Runs inside Windows CPython: the interpreter the Wine harness provides is the real thing.

Skipped when collected by a Linux pytest (the folder's conftest.py ignores it anyway).
"""

import os
import socket
import sys

import pytest

if sys.platform != "win32":
    pytest.skip("Windows-only: run through scripts/wine_python.py pytest", allow_module_level=True)


def test_platform_is_windows() -> None:
    assert sys.platform == "win32"
    assert sys.maxsize > 2**32, "a 64-bit interpreter"


def test_socket_share_exists() -> None:
    assert callable(socket.socket.share)
    assert callable(socket.fromshare)


def test_share_to_self_round_trip() -> None:
    """share() + fromshare() in one process: the duplicate carries the same connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=10)
        conn, _ = server.accept()
        with client, conn:
            blob = conn.share(os.getpid())
            assert len(blob) == 628  # WSAPROTOCOL_INFOW on x64
            with socket.fromshare(blob) as dup:
                dup.settimeout(10)
                client.sendall(b"ping")
                assert dup.recv(16) == b"ping"
                dup.sendall(b"pong")
                assert client.recv(16) == b"pong"


def test_sockshare_imports_from_repo_src() -> None:
    import sockshare

    assert "src" in sockshare.__file__
