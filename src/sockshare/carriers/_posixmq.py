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

Crashes (Linux): the creator also writes an owner record
(:mod:`~sockshare.carriers._owner`, ``/dev/shm/.sockshare-mq.<name>``), naming the queue by
its inode number. A writer waiting on a full queue checks it between slices and raises
:class:`~sockshare.CarrierClosed` once the owner has died (a writer opening the queue
checks it once). A reader that finds the name taken by a queue whose owner is dead
replaces it: it unlinks the old queue (its stale messages go with it; its writers see
the removal and get :class:`~sockshare.CarrierClosed`) and creates a new one, which it
owns and removes on close.

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

from sockshare._errors import CarrierClosed, CarrierError, CarrierTimeout, MessageTooLarge
from sockshare.carriers import _libc
from sockshare.carriers._base import Carrier, Deadline, full_or_timeout, os_error, query_int
from sockshare.carriers._owner import OwnerRecord
from sockshare.carriers._proc import ProcIdent, alive

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
    _record: OwnerRecord | None = None
    _watched = False  # the queue has an owner record that a waiting writer checks

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        if reason := self.unavailable_reason():
            raise CarrierError(f"mq:// is not available here: {reason}")
        self._name = mq_name(parts)
        if sys.platform == "linux":  # a queue descriptor is a file: its inode names the queue
            self._record = OwnerRecord("mq", os.fsdecode(self._name[1:]))
        access = os.O_RDONLY if self.mode == "r" else os.O_WRONLY
        if self._creates(create):
            msgsize = query_int(parts, "msgsize", min(8192, _sysctl("msgsize_max", 8192)), 1, 1 << 24)
            maxmsg = query_int(parts, "maxmsg", _sysctl("msg_default", 10), 1, 1 << 16)
            attr = _libc.MqAttr(0, maxmsg, msgsize, 0)
            for _ in range(8):  # each round lost a race with another reader; bounded
                if self._create(access, attr) or self._attach_or_take_over(access, attr):
                    break
            else:
                raise CarrierError(f"{self.url}: the queue kept changing while opening it; try again")
        if self._mqd < 0:
            self._mqd = _libc.call("mq_open", self._name, access, 0, None)
            if self._mqd < 0:
                raise _fail(f"mq_open {self.url}")
            if (dead := self._watch()) is not None:
                raise CarrierClosed(
                    f"{self.url}: the queue is left over from an owner (pid {dead.pid}) that is gone; "
                    "the next reader to open it will replace it"
                )
        attr = _libc.MqAttr()
        if _libc.call("mq_getattr", self._mqd, ctypes.byref(attr)) != 0:
            raise _fail(f"mq_getattr {self.url}")
        self.max_message = int(attr.mq_msgsize)
        if self.mode == "r":
            self._buf = ctypes.create_string_buffer(self.max_message)

    def _create(self, access: int, attr: _libc.MqAttr) -> bool:
        """Create the queue (and publish the owner record). False if it exists."""
        mqd = _libc.call("mq_open", self._name, access | os.O_CREAT | os.O_EXCL, 0o600, ctypes.byref(attr))
        if mqd >= 0:
            self._mqd, self._owner = mqd, True
            if self._record is not None:
                self._record.publish(os.fstat(mqd).st_ino)
            return True
        err = _libc.get_errno()
        if err == errno.EINVAL:
            raise ValueError(
                f"{self.url}: the kernel refused maxmsg={attr.mq_maxmsg} msgsize={attr.mq_msgsize} "
                "(see /proc/sys/fs/mqueue/msg_max and msgsize_max)"
            )
        if err in (errno.EMFILE, errno.ENOSPC, errno.ENOMEM):
            raise CarrierError(
                f"{self.url}: cannot create another queue: {os.strerror(err)} "
                "(RLIMIT_MSGQUEUE or /proc/sys/fs/mqueue/queues_max)"
            )
        if err != errno.EEXIST:
            raise _fail(f"mq_open {self.url}")
        return False

    def _attach_or_take_over(self, access: int, attr: _libc.MqAttr) -> bool:
        """The queue exists: attach to it, or replace it if its owner is dead. False if
        the caller should try again from the start."""
        mqd = _libc.call("mq_open", self._name, access, 0, None)
        if mqd < 0:
            if _libc.get_errno() == errno.ENOENT:
                return False  # removed since: create it
            raise _fail(f"mq_open {self.url}")
        self._mqd = mqd
        if self._watch() is None:
            return True  # a live owner, or none recorded: attach
        assert self._record is not None
        old = os.fstat(mqd).st_ino
        fresh: list[int] = []

        def replace() -> int | None:
            _libc.call("mq_unlink", self._name)
            new = _libc.call(
                "mq_open", self._name, access | os.O_CREAT | os.O_EXCL, 0o600, ctypes.byref(attr)
            )
            if new < 0:
                if _libc.get_errno() == errno.EEXIST:
                    return None
                raise _fail(f"mq_open {self.url}")
            fresh.append(new)
            return os.fstat(new).st_ino

        try:
            taken = self._record.take_over(old, replace)
        finally:
            _libc.call("mq_close", mqd)
            self._mqd = -1
        if taken:
            self._mqd, self._owner, self._watched = fresh[0], True, False
            return True
        for new in fresh:  # made, but the record could not be published: keep it anyway
            self._mqd, self._owner = new, True
            return True
        return False

    def _watch(self) -> ProcIdent | None:
        """Read the attached queue's owner record once: note whether there is one to
        watch while sending; return the owner if it is dead."""
        if self._record is None:
            return None
        found = self._record.read()
        self._watched = found is not None and found[1] == os.fstat(self._mqd).st_ino
        if self._watched and found is not None and not alive(found[0]):
            return found[0]
        return None

    def _owner_died(self) -> CarrierClosed | None:
        """The error to raise if the queue's recorded owner has died (not for the owner)."""
        if not self._watched or self._record is None or self._removes():
            return None
        found = self._record.read()
        if found is None or found[1] != os.fstat(self._mqd).st_ino or alive(found[0]):
            return None
        return self._give_up(f"the queue's owner (pid {found[0].pid}) is gone")

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
            if (gone := self._owner_died()) is not None:
                raise gone
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
            if self._record is not None:
                self._record.remove()

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
