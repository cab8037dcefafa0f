"""Carriers: move a token (or any bounded message) between processes over one IPC mechanism.

A token from :func:`sockshare.export_socket` is a short ASCII string; it still has to
reach the importing process. A carrier does that over the kernel facility you already
use, picked by URL::

    from sockshare import carriers

    rx = carriers.open("mq:///orders-handoff", mode="r")   # the reader creates the queue
    tx = carriers.open("mq:///orders-handoff", mode="w")   # a writer attaches to it
    tx.send(sockshare.export_socket(conn, worker_pid).encode())
    sock = sockshare.import_socket(rx.recv(timeout=5).decode())

Carriers, by URL (``max_message`` in brackets):

* ``unix:///path`` -- UNIX stream socket, length-prefixed (1 MiB);
* ``unixgram:///path`` -- UNIX datagram socket (64 KiB);
* ``tcp://host:port`` -- TCP, length-prefixed (1 MiB);
* ``udp://host:port`` -- UDP with acknowledgements and resends (65 482 bytes);
* ``fifo:///path`` -- named pipe, ``\\\\.\\pipe\\name`` on Windows (PIPE_BUF - 8 = 4088);
* ``mq://name`` -- POSIX message queue (its mq_msgsize, 8192 by default);
* ``sysvmq://key`` -- System V message queue (msgmax, 8192 by default);
* ``shm://name`` -- shared-memory ring guarded by a robust process-shared mutex (64 KiB).

Every carrier has the same interface (:class:`Carrier`): ``send(bytes)``,
``recv(timeout=...) -> bytes``, ``close()``, use as a context manager, and
``max_message``. Boundaries are kept: one ``send`` is one ``recv``. Failures are
:class:`~sockshare.CarrierError` subclasses (not found, permission, timeout, full,
closed); a message over ``max_message`` is refused with
:class:`~sockshare.MessageTooLarge` before anything is sent.

Ownership: the reader creates the socket address, FIFO, queue or ring and removes it
when it closes (``create=True`` on a writer reverses that for FIFO, queues and rings).
:func:`available` tells which carriers work on this machine. See ``docs/carriers.md``.
"""

from __future__ import annotations

from sockshare.carriers._base import Carrier, Mode
from sockshare.carriers._fifo import FifoCarrier
from sockshare.carriers._posixmq import PosixMQCarrier
from sockshare.carriers._registry import CARRIERS, Availability, available, open
from sockshare.carriers._shm import ShmCarrier
from sockshare.carriers._sockets import TcpCarrier, UdpCarrier, UnixCarrier, UnixgramCarrier
from sockshare.carriers._sysvmq import SysVMQCarrier

__all__ = [
    "CARRIERS",
    "Availability",
    "Carrier",
    "FifoCarrier",
    "Mode",
    "PosixMQCarrier",
    "ShmCarrier",
    "SysVMQCarrier",
    "TcpCarrier",
    "UdpCarrier",
    "UnixCarrier",
    "UnixgramCarrier",
    "available",
    "open",
]
