"""The ``sysvmq://key`` carrier: a System V message queue (``msgget(2)``) through ctypes.

The key is a non-zero 32-bit number, decimal or ``0x`` hex (``sysvmq://0x5c0f0001``).
The reader creates the queue by default (``IPC_CREAT | IPC_EXCL``, mode 0600) and
removes it (``IPC_RMID``) on close; a writer attaches and gets
:class:`~sockshare.CarrierNotFound` if there is none (``create=True`` makes the writer
the creator and remover instead). Removal is immediate: messages still queued are
lost, and every later operation by other processes fails with
:class:`~sockshare.CarrierClosed`.

The creator also writes an owner record (:mod:`~sockshare.carriers._owner`,
``/dev/shm/.sockshare-sysvmq.<key>``). A writer waiting on a full queue checks it every
half second and raises :class:`~sockshare.CarrierClosed` once the owner has died (a
writer opening the queue checks it once). A reader that finds the key taken by a queue
whose owner is dead replaces it: it removes the old queue (its stale messages go with
it; its writers get :class:`~sockshare.CarrierClosed`) and creates a new one, which it
owns and removes on close.

The kernel keeps boundaries and order; any number of writers and readers may share a
queue (each message goes to one reader). All messages have ``mtype`` 1.

``msgsnd``/``msgrcv`` have no timed form. With ``timeout=None`` a receive blocks in the
kernel, and so does a send to a queue without an owner record; otherwise (a finite
timeout, or a send that must keep an eye on the owner) the carrier polls with
``IPC_NOWAIT``: it only yields the
CPU for the first 50 microseconds, then sleeps with a backoff doubling from 20
microseconds to 1 ms. An idle wait costs about a thousand cheap wake-ups a second and
adds at most about 1 ms of latency.

Limits: ``max_message`` is ``/proc/sys/kernel/msgmax`` (8192 by default), and a queue
holds at most ``msgmnb`` bytes (16384 by default: two maximum-size messages).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import sys
import time
import urllib.parse

from sockshare._errors import CarrierClosed, CarrierError, CarrierTimeout
from sockshare.carriers import _libc
from sockshare.carriers._base import (
    WAIT_SLICE,
    Backoff,
    Carrier,
    Deadline,
    full_or_timeout,
    os_error,
)
from sockshare.carriers._owner import OwnerRecord
from sockshare.carriers._proc import ProcIdent, alive

__all__ = ["SysVMQCarrier", "sysv_key"]

_IPC_PRIVATE = 0
_IPC_RMID = 0
_IPC_CREAT = 0o1000
_IPC_EXCL = 0o2000
_IPC_NOWAIT = 0o4000
_MSG_NOERROR = 0o10000
_MTYPE = struct.Struct("l")  # the C long in front of every message
_SYMBOLS = ("msgget", "msgsnd", "msgrcv", "msgctl")
_SPIN = 50e-6  # how long a timed wait only yields before it starts sleeping
_REMOVED = (errno.EIDRM, errno.EINVAL)  # removed while we waited, or before this call


def _proc_kernel(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/kernel/{name}", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def sysv_key(parts: urllib.parse.SplitResult) -> int:
    """The ``key_t`` (a signed C int) of ``sysvmq://KEY``."""
    raw = parts.netloc or parts.path.removeprefix("/")
    if parts.netloc and parts.path not in ("", "/"):
        raise ValueError(f"sysvmq:// takes one key: {parts.geturl()!r}")
    try:
        key = int(raw, 0)
    except ValueError:
        raise ValueError(f"sysvmq:// needs a numeric key, e.g. sysvmq://0x5c0f0001: {raw!r}") from None
    if not 0 < key <= 0xFFFFFFFF:
        raise ValueError(f"sysvmq:// key must be in 1..0xFFFFFFFF, not {raw!r}")
    return key - (1 << 32) if key >= 1 << 31 else key


def _fail(what: str) -> CarrierError:
    return os_error(_libc.get_errno(), what)


class SysVMQCarrier(Carrier):
    """``sysvmq://key``: a System V message queue; see the module documentation."""

    scheme = "sysvmq"
    #: ``/proc/sys/kernel/msgmax`` on Linux (8192 by default).
    max_message = 8192

    _qid = -1
    _buf: ctypes.Array[ctypes.c_char] | None = None
    _record: OwnerRecord | None = None
    _watched = False  # the queue has an owner record that a waiting writer checks

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        if reason := self.unavailable_reason():
            raise CarrierError(f"sysvmq:// is not available here: {reason}")
        key = sysv_key(parts)
        self._record = record = OwnerRecord("sysvmq", f"{key & 0xFFFFFFFF:08x}")
        # asking for read (reader) or write (writer) permission makes msgget check it now
        want = 0o400 if self.mode == "r" else 0o200
        if self._creates(create):
            self._create_or_take_over(key, want, record)
        if self._qid < 0:
            self._qid = _libc.call("msgget", key, want)
            if self._qid < 0:
                raise _fail(f"msgget {self.url}")
            if (dead := self._watch(record)) is not None:
                raise CarrierClosed(
                    f"{self.url}: the queue is left over from an owner (pid {dead.pid}) that is gone; "
                    "the next reader to open it will replace it"
                )
        self.max_message = min(_proc_kernel("msgmax", 8192), _proc_kernel("msgmnb", 16384))
        self._buf = ctypes.create_string_buffer(_MTYPE.size + self.max_message)

    def _create_or_take_over(self, key: int, want: int, record: OwnerRecord) -> None:
        """Create the queue, or attach to it, or replace it if its owner is dead."""
        for _ in range(8):  # each round lost a race with another reader; bounded
            qid = _libc.call("msgget", key, _IPC_CREAT | _IPC_EXCL | 0o600)
            if qid >= 0:
                self._qid, self._owner = qid, True
                record.publish(qid)
                return
            if _libc.get_errno() != errno.EEXIST:
                raise _fail(f"msgget {self.url}")
            qid = _libc.call("msgget", key, want)
            if qid < 0:
                if _libc.get_errno() in (errno.ENOENT, errno.EIDRM):
                    continue  # removed since: create it
                raise _fail(f"msgget {self.url}")
            self._qid = qid
            if self._watch(record) is None:
                return  # a live owner, or none recorded: attach
            if record.take_over(qid, functools.partial(self._replace, key, qid)):
                self._owner, self._watched = True, False
                return
        raise CarrierError(f"{self.url}: the queue kept changing while opening it; try again")

    def _watch(self, record: OwnerRecord) -> ProcIdent | None:
        """Read the attached queue's owner record once: note whether there is one to
        watch while sending; return the owner if it is dead."""
        found = record.read()
        self._watched = found is not None and found[1] == self._qid
        if self._watched and found is not None and not alive(found[0]):
            return found[0]
        return None

    def _replace(self, key: int, old: int) -> int | None:
        """Remove queue ``old`` (its owner is dead) and create a new one: its id, or None
        if another process created one first."""
        if _libc.call("msgctl", old, _IPC_RMID, None) != 0 and _libc.get_errno() not in _REMOVED:
            raise _fail(f"msgctl(IPC_RMID) of the dead owner's queue {self.url}")
        qid = _libc.call("msgget", key, _IPC_CREAT | _IPC_EXCL | 0o600)
        if qid < 0:
            if _libc.get_errno() == errno.EEXIST:
                return None
            raise _fail(f"msgget {self.url}")
        self._qid = qid
        return qid

    def _owner_died(self) -> CarrierClosed | None:
        """The error to raise if the queue's recorded owner has died (not for the owner)."""
        if self._record is None or self._removes():
            return None
        dead = self._record.dead_owner(self._qid)
        if dead is None:
            return None
        return self._give_up(f"the queue's owner (pid {dead.pid}) is gone")

    def _send(self, data: bytes, deadline: Deadline) -> None:
        message = _MTYPE.pack(1) + data
        # block in the kernel only if there is no owner to watch
        blocking = deadline.timeout is None and not self._watched
        backoff = Backoff(deadline, spin=_SPIN)
        next_check = time.monotonic() + WAIT_SLICE
        while True:
            flags = 0 if blocking else _IPC_NOWAIT
            if _libc.call("msgsnd", self._qid, message, len(data), flags) == 0:
                return
            err = _libc.get_errno()
            if err == errno.EINTR:
                continue
            if err in _REMOVED:
                raise self._give_up("the queue was removed by its owner")
            if err != errno.EAGAIN:
                raise _fail(f"msgsnd {self.url}")
            if deadline.expired():
                raise full_or_timeout(deadline, f"send to {self.url}")
            if time.monotonic() >= next_check:
                if (gone := self._owner_died()) is not None:
                    raise gone
                next_check = time.monotonic() + WAIT_SLICE
            backoff.pause()

    def _recv(self, deadline: Deadline) -> bytes:
        buf = self._buf
        assert buf is not None
        blocking = deadline.timeout is None
        backoff = Backoff(deadline, spin=_SPIN)
        while True:
            flags = 0 if blocking else _IPC_NOWAIT
            n = _libc.call("msgrcv", self._qid, buf, self.max_message, 0, flags)
            if n >= 0:
                return buf.raw[_MTYPE.size : _MTYPE.size + n]
            err = _libc.get_errno()
            if err == errno.EINTR:
                continue
            if err == errno.E2BIG:  # bigger than msgmax was when we opened: not ours, drop it
                _libc.call("msgrcv", self._qid, buf, 0, 0, _IPC_NOWAIT | _MSG_NOERROR)
                continue
            if err in _REMOVED:
                raise self._give_up("the queue was removed by its owner")
            if err != errno.ENOMSG:
                raise _fail(f"msgrcv {self.url}")
            if deadline.expired():
                raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s")
            backoff.pause()

    def _release(self) -> None:
        if self._removes() and self._qid >= 0:
            _libc.call("msgctl", self._qid, _IPC_RMID, None)
            if self._record is not None:
                self._record.remove()
        self._qid = -1

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform == "win32":
            return "System V message queues do not exist on Windows"
        if absent := _libc.missing(*_SYMBOLS):
            return f"the C library lacks {', '.join(absent)}"
        qid = _libc.call("msgget", _IPC_PRIVATE, _IPC_CREAT | 0o600)
        if qid < 0:
            return f"msgget failed: {os.strerror(_libc.get_errno())}"
        _libc.call("msgctl", qid, _IPC_RMID, None)
        return None
