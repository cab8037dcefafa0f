"""Tests in this folder run inside Windows CPython (under Wine, via scripts/wine_python.py).

A Linux pytest run ignores the whole folder; ``tests/test_wine_smoke.py`` runs it with
``python3 scripts/wine_python.py pytest tests/windows`` and checks the result. The Windows
run uses ``--confcutdir`` here, so the Linux conftest.py files above are not loaded.

Inside Windows, the ``spawn`` fixture of the tests here: ``spawn(name, *args, env=None)``
starts a sibling ``winpeer.py`` peer with this interpreter; every peer it started is
ended afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

collect_ignore_glob = [] if sys.platform == "win32" else ["*"]

if sys.platform == "win32":
    from winpeer import PeerClient, Peers

    @pytest.fixture
    def spawn() -> Iterator[Callable[..., PeerClient]]:
        peers = Peers()

        def start(name: str, *args: str, env: dict[str, str] | None = None) -> PeerClient:
            return peers.add(PeerClient.spawn(name, *args, "--lifetime", "60", env=env))

        try:
            yield start
        finally:
            peers.finish()
