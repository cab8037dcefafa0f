"""The ``mq://name`` carrier: a POSIX message queue (``mq_open(3)``) through ctypes.

The kernel keeps message boundaries and order (all messages have priority 0), and
several writers and readers may share a queue safely: each message goes to exactly
one reader. The reader creates the queue by default (``O_CREAT | O_EXCL``, mode 0600,
``?maxmsg=`` and ``?msgsize=`` in the URL set its geometry, default 10 x 8192 bytes,
the Linux defaults an unprivileged user may use) and removes it (``mq_unlink``) on
close; a writer attaches to an existing queue and gets
:class:`~sockshare.CarrierNotFound` if there is none. ``create=True`` lets a writer
create it instead (and then the writer removes it on close).

Waits use ``mq_timedsend``/``mq_timedreceive`` in slices of at most half a second,
so a wall-clock jump cannot stretch a timeout. Before each send and between slices the
carrier checks whether the owner removed the queue: on Linux a queue descriptor is a
file whose link count drops to 0 on ``mq_unlink``. A writer then gets
:class:`~sockshare.CarrierClosed` instead of filling an orphaned queue, and a reader
gets the messages still queued, then :class:`~sockshare.CarrierClosed`.

Limits: ``max_message`` is the queue's ``mq_msgsize`` (8192 by default, at most
``/proc/sys/fs/mqueue/msgsize_max`` for unprivileged users), and each user's queues
share ``RLIMIT_MSGQUEUE`` (800 KiB by default, about nine default queues).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import sys
import urllib.parse

from sockshare._errors import CarrierError, CarrierTimeout, MessageTooLarge
from sockshare.carriers import _libc
from sockshare.carriers._base import Carrier, Deadline, full_or_timeout, os_error, query_int

__all__ = ["PosixMQCarrier", "mq_name"]

_NAME_MAX = 255
_SYMBOLS = ("mq_open", "mq_close", "mq_unlink", "mq_getattr", "mq_timedsend", "mq_timedreceive")


def _sysctl(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/fs/mqueue/{name}", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def mq_name(parts: urllib.parse.SplitResult) -> bytes:
    """The queue name (``b"/name"``) of ``mq://name`` or ``mq:///name``."""
    raw = parts.netloc if parts.netloc else parts.path.removeprefix("/")
    if parts.netloc and parts.path not in ("", "/"):
        raise ValueError(f"mq:// takes one name, not a path: {parts.geturl()!r}")
    name = urllib.parse.unquote(raw)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"mq:// needs a queue name without '/': {parts.geturl()!r}")
    encoded = os.fsencode(name)
    if len(encoded) > _NAME_MAX - 1 or b"\0" in encoded:
        raise ValueError(f"queue name too long or not valid: {name!r}")
    return b"/" + encoded


def _fail(what: str) -> CarrierError:
    return os_error(_libc.get_errno(), what)


class PosixMQCarrier(Carrier):
    """``mq://name``: a POSIX message queue; see the module documentation."""

    scheme = "mq"
    query_params = ("maxmsg", "msgsize")
    #: The default ``mq_msgsize``; an instance reports its queue's actual size.
    max_message = 8192

    _mqd = -1
    _name = b""
    _buf: ctypes.Array[ctypes.c_char] | None = None

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        if reason := self.unavailable_reason():
            raise CarrierError(f"mq:// is not available here: {reason}")
        self._name = mq_name(parts)
        access = os.O_RDONLY if self.mode == "r" else os.O_WRONLY
        if self._creates(create):
            msgsize = query_int(parts, "msgsize", min(8192, _sysctl("msgsize_max", 8192)), 1, 1 << 24)
            maxmsg = query_int(parts, "maxmsg", _sysctl("msg_default", 10), 1, 1 << 16)
            attr = _libc.MqAttr(0, maxmsg, msgsize, 0)
            self._mqd = _libc.call(
                "mq_open", self._name, access | os.O_CREAT | os.O_EXCL, 0o600, ctypes.byref(attr)
            )
            if self._mqd >= 0:
                self._owner = True
            elif _libc.get_errno() == errno.EINVAL:
                raise ValueError(
                    f"{self.url}: the kernel refused maxmsg={maxmsg} msgsize={msgsize} "
                    "(see /proc/sys/fs/mqueue/msg_max and msgsize_max)"
                )
            elif _libc.get_errno() in (errno.EMFILE, errno.ENOSPC, errno.ENOMEM):
                raise CarrierError(
                    f"{self.url}: cannot create another queue: {os.strerror(_libc.get_errno())} "
                    "(RLIMIT_MSGQUEUE or /proc/sys/fs/mqueue/queues_max)"
                )
            elif _libc.get_errno() != errno.EEXIST:
                raise _fail(f"mq_open {self.url}")
        if self._mqd < 0:
            self._mqd = _libc.call("mq_open", self._name, access, 0, None)
            if self._mqd < 0:
                raise _fail(f"mq_open {self.url}")
        attr = _libc.MqAttr()
        if _libc.call("mq_getattr", self._mqd, ctypes.byref(attr)) != 0:
            raise _fail(f"mq_getattr {self.url}")
        self.max_message = int(attr.mq_msgsize)
        if self.mode == "r":
            self._buf = ctypes.create_string_buffer(self.max_message)

    def _removed(self) -> bool:
        """True if the queue's name was unlinked (Linux: the descriptor is a file)."""
        if sys.platform != "linux":
            return False
        try:
            return os.fstat(self._mqd).st_nlink == 0
        except OSError:
            return False

    def _send(self, data: bytes, deadline: Deadline) -> None:
        if self._removed():  # one fstat: never fill a queue nobody can open any more
            raise self._give_up("the queue was removed by its owner")
        while True:
            ts = _libc.abs_timespec(deadline.slice(), monotonic=False)
            rc = _libc.call("mq_timedsend", self._mqd, data, len(data), 0, ctypes.byref(ts))
            if rc == 0:
                return
            err = _libc.get_errno()
            if err == errno.EINTR:
                continue
            if err == errno.EMSGSIZE:
                raise MessageTooLarge(f"{self.url}: over the queue's mq_msgsize; nothing sent")
            if err != errno.ETIMEDOUT:
                raise _fail(f"mq_timedsend {self.url}")
            if self._removed():
                raise self._give_up("the queue was removed by its owner")
            if deadline.expired():
                raise full_or_timeout(deadline, f"send to {self.url}")

    def _recv(self, deadline: Deadline) -> bytes:
        assert self._buf is not None
        while True:
            removed = self._removed()  # checked before the attempt: no message is missed
            ts = _libc.abs_timespec(0 if removed else deadline.slice(), monotonic=False)
            n = _libc.call("mq_timedreceive", self._mqd, self._buf, len(self._buf), None, ctypes.byref(ts))
            if n >= 0:
                return self._buf.raw[:n]
            err = _libc.get_errno()
            if err == errno.EINTR:
                continue
            if err != errno.ETIMEDOUT:
                raise _fail(f"mq_timedreceive {self.url}")
            if removed:
                raise self._give_up("the queue was removed by its owner")
            if deadline.expired():
                raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s")

    def _release(self) -> None:
        if self._mqd >= 0:
            _libc.call("mq_close", self._mqd)
            self._mqd = -1
        if self._removes() and self._name:
            _libc.call("mq_unlink", self._name)  # ENOENT: someone removed it already
            self._name = b""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform == "win32":
            return "POSIX message queues do not exist on Windows"
        if absent := _libc.missing(*_SYMBOLS):
            return f"the C library lacks {', '.join(absent)} (macOS has no POSIX message queues)"
        name = f"/sockshare-probe-{os.getpid()}-{secrets.token_hex(4)}".encode()
        attr = _libc.MqAttr(0, 1, 16, 0)
        mqd = _libc.call("mq_open", name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, ctypes.byref(attr))
        if mqd < 0:
            return f"mq_open failed: {os.strerror(_libc.get_errno())}"
        _libc.call("mq_close", mqd)
        _libc.call("mq_unlink", name)
        return None
