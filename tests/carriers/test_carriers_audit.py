"""Findings of the carrier audit (docs/carriers.md against the code).

``timeout=float("inf")`` passes the timeout check (only NaN and negatives are refused,
docs/carriers.md, "Errors": ``ValueError`` for a bad timeout) and means waiting forever,
as ``None`` does, on every carrier: ``unix://`` and ``tcp://`` raised ``OverflowError``
from ``poll()``/``settimeout()``, even with a message waiting.
"""

from __future__ import annotations

import pytest

from sockshare import carriers
from tests.carriers.conftest import SCHEMES, Addresses, needs

INF = float("inf")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_infinite_timeout_waits_forever_like_none(addrs: Addresses, scheme: str) -> None:
    needs(scheme)
    with carriers.open(addrs.url(scheme), "r", timeout=INF) as rx:
        with carriers.open(rx.url, "w", timeout=INF) as tx:
            tx.send(b"one")
            tx.send(b"two", timeout=INF)
        assert rx.recv() == b"one"
        assert rx.recv(timeout=INF) == b"two"
