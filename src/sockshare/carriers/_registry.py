"""URL scheme to carrier class, :func:`open` and :func:`available`."""

from __future__ import annotations

import urllib.parse
from typing import NamedTuple

from sockshare.carriers._base import Carrier, Mode
from sockshare.carriers._fifo import FifoCarrier
from sockshare.carriers._posixmq import PosixMQCarrier
from sockshare.carriers._shm import ShmCarrier
from sockshare.carriers._sockets import TcpCarrier, UdpCarrier, UnixCarrier, UnixgramCarrier
from sockshare.carriers._sysvmq import SysVMQCarrier

__all__ = ["CARRIERS", "Availability", "available", "open"]

#: Every carrier class by URL scheme, in the order the docs and the benchmark use.
CARRIERS: dict[str, type[Carrier]] = {
    cls.scheme: cls
    for cls in (
        UnixCarrier,
        UnixgramCarrier,
        TcpCarrier,
        UdpCarrier,
        FifoCarrier,
        PosixMQCarrier,
        SysVMQCarrier,
        ShmCarrier,
    )
}


class Availability(NamedTuple):
    """Whether a carrier works on this machine; ``detail`` says why not (or its limit).

    A 2-tuple, so ``ok, detail = carriers.available()["mq"]`` works.
    """

    available: bool
    detail: str

    def __bool__(self) -> bool:
        return self.available


def available() -> dict[str, Availability]:
    """Each carrier scheme with whether it works here (by trying it) and why not.

    The probes are real but leave nothing behind (a queue or semaphore made to test
    is removed at once). ``bool(available()["mq"])`` is the short answer.
    """
    result: dict[str, Availability] = {}
    for scheme, cls in CARRIERS.items():
        try:
            reason = cls.unavailable_reason()
        except Exception as exc:  # a probe must never break the listing
            reason = f"probe failed: {exc!r}"
        if reason is None:
            result[scheme] = Availability(True, f"works here; max_message {cls.max_message} bytes")
        else:
            result[scheme] = Availability(False, reason)
    return result


def open(
    url: str,
    mode: Mode = "r",
    *,
    timeout: float | None = None,
    create: bool | None = None,
) -> Carrier:
    """Open one end of the carrier named by ``url``; its scheme picks the mechanism.

    ``mode="r"`` receives and ``mode="w"`` sends. ``timeout`` (seconds, ``None`` =
    forever) bounds waiting for the peer while opening and is the default for every
    ``send``/``recv``. ``create`` decides who makes the queue, FIFO or ring: by
    default the reader does (and removes it on close) and a writer attaches to an
    existing one; ``create=True`` makes a writer the creator, ``create=False`` makes a
    reader attach only. Socket carriers always bind in the reader.

    Raises ``ValueError`` for a malformed URL or an unknown scheme, and a
    :class:`~sockshare.CarrierError` subclass when the OS says no.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    cls = CARRIERS.get(scheme)
    if cls is None:
        known = ", ".join(f"{name}://" for name in CARRIERS)
        raise ValueError(f"unknown carrier scheme in {url!r} (known: {known})")
    return cls(url, mode, timeout=timeout, create=create)
