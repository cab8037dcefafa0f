"""The shape every carrier shares: the ``Carrier`` base class, deadlines and error mapping.

A carrier moves whole, bounded messages one way, from writers (``mode="w"``) to a
reader (``mode="r"``), over one kernel IPC facility. This module holds what does not
depend on the facility:

* :class:`Carrier`, the abstract base: argument checks (mode, closed, size limit) happen
  here, before a subclass touches the OS, so an oversized message is refused with
  :class:`~sockshare.MessageTooLarge` before anything is sent;
* :class:`Deadline`, which turns a relative ``timeout`` into an absolute monotonic
  point so loops that retry (EINTR, partial writes, backoff) never wait past it;
* :func:`os_error`, which maps an ``errno`` to the precise
  :class:`~sockshare.CarrierError` subclass;
* small helpers: waiting for a file descriptor, polling with bounded backoff.

Subclasses implement ``_setup`` (open the resource), ``_send``, ``_recv`` and
``_release`` (idempotent, must cope with a half-finished ``_setup``).
"""

from __future__ import annotations

import abc
import errno
import io
import math
import os
import select
import sys
import time
import urllib.parse
import warnings
from typing import ClassVar, Literal, Self

from sockshare._errors import (
    CarrierClosed,
    CarrierError,
    CarrierFull,
    CarrierNotFound,
    CarrierPermission,
    CarrierTimeout,
    MessageTooLarge,
)

__all__ = [
    "Carrier",
    "Deadline",
    "FileCarrier",
    "Mode",
    "Backoff",
    "full_or_timeout",
    "os_error",
    "query_int",
    "remove_if_ours",
    "wait_fd",
]

Mode = Literal["r", "w"]

#: Longest single wait inside a timed loop; loops re-check their state (peer alive,
#: resource removed, clock jumps) at least this often.
WAIT_SLICE = 0.5


class Deadline:
    """An absolute point on the monotonic clock, or "never" for ``timeout=None``."""

    __slots__ = ("_end", "timeout")

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None:
            timeout = float(timeout)
            if math.isnan(timeout) or timeout < 0:
                raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
            if math.isinf(timeout):  # forever, as None: no poll() or settimeout() takes inf
                timeout = None
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` when waiting forever."""
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def slice(self, cap: float = WAIT_SLICE) -> float:
        """The next wait in a sliced loop: what is left, at most ``cap``."""
        rem = self.remaining()
        return cap if rem is None else min(cap, rem)


def full_or_timeout(deadline: Deadline, what: str) -> CarrierError:
    """The error for a send that found no room: full if it was not meant to wait."""
    if deadline.timeout == 0:
        return CarrierFull(f"{what}: full, and timeout=0 does not wait")
    return CarrierTimeout(f"{what}: still full after {deadline.timeout:g} s")


def os_error(
    err: int,
    what: str,
    *,
    refused: type[CarrierError] = CarrierNotFound,
) -> CarrierError:
    """Map an errno to the precise carrier error. ``what`` says which call on which URL.

    ``refused`` is the class for ECONNREFUSED: "nobody listens" when connecting
    (:class:`CarrierNotFound`), "the peer went away" on an established carrier
    (:class:`CarrierClosed`).
    """
    text = f"{what}: {os.strerror(err)} [{errno.errorcode.get(err, err)}]"
    if err in (errno.ENOENT, errno.ENXIO):
        return CarrierNotFound(text)
    if err == errno.ECONNREFUSED:
        return refused(text)
    if err in (errno.EACCES, errno.EPERM):
        return CarrierPermission(text)
    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
        return CarrierFull(text)
    if err == errno.ETIMEDOUT:
        return CarrierTimeout(text)
    if err in (errno.EPIPE, errno.ECONNRESET, errno.EIDRM, errno.ENOTCONN, errno.ECONNABORTED):
        return CarrierClosed(text)
    return CarrierError(text)


def remove_if_ours(path: str, ident: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the file this process made there (``ident``: its
    ``(st_dev, st_ino)``); a file of the same name made since by another, or none, is
    left alone."""
    if ident is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except FileNotFoundError:
        pass


def wait_fd(fd: int, *, write: bool, timeout: float | None) -> bool:
    """Wait until ``fd`` is readable (or writable). False when the timeout ran out.

    Hang-ups and errors count as ready: the next read or write then reports them.
    """
    if sys.platform != "win32":
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        ms = None if timeout is None else math.ceil(timeout * 1000)
        return bool(poller.poll(ms))
    readers, writers, _ = select.select([] if write else [fd], [fd] if write else [], [], timeout)
    return bool(readers or writers)


#: First and longest pause of a :class:`Backoff`.
BACKOFF_FIRST = 20e-6
BACKOFF_CAP = 1e-3


class Backoff:
    """Pacing for a polling loop, where the kernel offers no timed wait (System V
    queues; opening a FIFO before its reader).

    For the first ``spin`` seconds each :meth:`pause` only yields the CPU (an answer
    often comes within microseconds, and a sleep costs at least the ~50 us timer slack);
    after that it sleeps, doubling from ``first`` up to ``cap``, never past the deadline.
    The cap bounds the added latency; at 1 ms an idle wait is about a thousand cheap
    wake-ups a second, not a busy core.
    """

    __slots__ = ("_cap", "_deadline", "_delay", "_spin_until")

    def __init__(
        self, deadline: Deadline, *, spin: float = 0.0, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP
    ) -> None:
        self._deadline = deadline
        self._delay = first
        self._cap = cap
        self._spin_until = time.monotonic() + spin

    def pause(self) -> None:
        if time.monotonic() < self._spin_until:
            _yield()
            return
        rem = self._deadline.remaining()
        time.sleep(self._delay if rem is None else min(self._delay, rem))
        self._delay = min(self._delay * 2, self._cap)


def _yield() -> None:
    if sys.platform == "win32":
        time.sleep(0)
    else:
        os.sched_yield()


def query_int(parts: urllib.parse.SplitResult, name: str, default: int, low: int, high: int) -> int:
    """An integer URL query parameter, checked against ``low..high``."""
    values = urllib.parse.parse_qs(parts.query, keep_blank_values=True).get(name)
    if not values:
        return default
    try:
        value = int(values[-1], 0)
    except ValueError:
        raise ValueError(f"query parameter {name}={values[-1]!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"query parameter {name}={value} is outside {low}..{high}")
    return value


def _check_query(parts: urllib.parse.SplitResult, allowed: tuple[str, ...]) -> None:
    for key in urllib.parse.parse_qs(parts.query, keep_blank_values=True):
        if key not in allowed:
            raise ValueError(
                f"unknown query parameter {key!r} for {parts.scheme}:// "
                f"(allowed: {', '.join(allowed) or 'none'})"
            )


class Carrier(abc.ABC):
    """One end of a one-way message carrier. Get one with :func:`sockshare.carriers.open`.

    A reader (``mode="r"``) receives, a writer (``mode="w"``) sends. Every carrier keeps
    message boundaries: one ``send`` is one ``recv``, whole, in order per writer.

    Timeouts: ``timeout`` given to the constructor is the default for :meth:`send`
    and :meth:`recv` (and for waiting on the peer while opening); a call's own
    ``timeout`` overrides it. ``None`` waits forever, ``0`` does not wait at all.

    A carrier is not thread-safe: use it from one thread at a time.
    """

    #: The URL scheme this class handles (``"unix"``, ``"mq"`` ...).
    scheme: ClassVar[str] = ""
    #: Query parameters the URL may carry (only used when creating the resource).
    query_params: ClassVar[tuple[str, ...]] = ()
    #: Largest message accepted by :meth:`send`, in bytes. The class value is the
    #: default; an instance may refine it from the resource it opened (a queue made
    #: by another process with other limits).
    max_message: int = 0

    _closed: bool = True  # until _setup has succeeded
    _owner: bool = False
    _pid = 0  # the process that opened this end
    _close_reason = "this carrier was closed"

    def __init__(
        self,
        url: str,
        mode: Mode = "r",
        *,
        timeout: float | None = None,
        create: bool | None = None,
    ) -> None:
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', not {mode!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != self.scheme:
            raise ValueError(f"{type(self).__name__} takes {self.scheme}:// URLs, not {url!r}")
        if parts.fragment:
            raise ValueError(f"a carrier URL has no #fragment: {url!r}")
        _check_query(parts, self.query_params)
        self.mode: Mode = mode
        self.url = url
        self._pid = os.getpid()
        self.timeout = Deadline(timeout).timeout
        deadline = Deadline(self.timeout)
        try:
            self._setup(parts, create, deadline)
        except BaseException:
            self._release()
            raise
        self._closed = False

    # -- what subclasses implement ---------------------------------------------------

    @abc.abstractmethod
    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        """Open (and if asked to, make) the resource. Set ``self._owner`` if made here.

        ``create`` is what the caller passed: ``None`` means this carrier's default
        (see :meth:`_creates`).
        """

    def _creates(self, create: bool | None) -> bool:
        """The default ownership rule: the reader creates, the writer attaches."""
        return self.mode == "r" if create is None else create

    @abc.abstractmethod
    def _send(self, data: bytes, deadline: Deadline) -> None:
        """Send one message (size already checked)."""

    @abc.abstractmethod
    def _recv(self, deadline: Deadline) -> bytes:
        """Receive one whole message."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free OS resources; remove the named resource if :meth:`_removes`. Idempotent."""

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` if this carrier works on this machine, else why not."""

    # -- the public interface ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def owner(self) -> bool:
        """True if this end created the resource and removes it when closed."""
        return self._removes()

    def _removes(self) -> bool:
        """Whether closing removes the resource: only in the process that created it.

        A child made by ``fork()`` inherits this object; when it closes its copy (or
        exits and collects it) the parent's queue, FIFO or ring must stay.
        """
        return self._owner and os.getpid() == self._pid

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message.

        Raises :class:`~sockshare.MessageTooLarge` (nothing sent) over
        :attr:`max_message`; :class:`~sockshare.CarrierFull` if there is no room and
        the timeout is 0; :class:`~sockshare.CarrierTimeout` if there is still no room
        when it runs out; :class:`~sockshare.CarrierClosed` if this end was closed or
        the reader is gone (this end is then closed). ``timeout=None`` means the
        carrier's default timeout.
        """
        if not isinstance(data, bytes):
            if not isinstance(data, bytearray | memoryview):
                raise TypeError(f"send() takes bytes, not {type(data).__name__}")
            data = bytes(data)
        self._check_usable("w")
        if len(data) > self.max_message:
            raise MessageTooLarge(
                f"{self.url}: a {len(data)}-byte message is over this carrier's "
                f"max_message of {self.max_message} bytes; nothing was sent"
            )
        self._send(data, Deadline(self.timeout if timeout is None else timeout))

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next whole message.

        Raises :class:`~sockshare.CarrierTimeout` if none arrives in time and
        :class:`~sockshare.CarrierClosed` if this end was closed or the carrier was
        removed by its owner (after the messages already in it were received; this
        end is then closed).
        ``timeout=None`` means the carrier's default timeout.
        """
        self._check_usable("r")
        return self._recv(Deadline(self.timeout if timeout is None else timeout))

    def close(self) -> None:
        """Close this end; if it is the owner, remove the resource. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            warnings.warn(f"unclosed carrier {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("owner" if self.owner else "open")
        return f"<{type(self).__name__} {self.url!r} mode={self.mode!r} {state}>"

    def _give_up(self, reason: str) -> CarrierClosed:
        """Close this end after a failure that leaves it unusable (the peer is gone, a
        stream was cut mid-message); return the :class:`CarrierClosed` to raise. Every
        later call raises it again, with the same reason."""
        self._close_reason = reason
        self.close()
        return CarrierClosed(f"{self.url}: {reason}")

    def _check_usable(self, mode: Mode) -> None:
        if self._closed:
            raise CarrierClosed(f"{self.url}: {self._close_reason}")
        if self.mode != mode:
            verb = "send on" if mode == "w" else "receive from"
            raise io.UnsupportedOperation(f"cannot {verb} {self.url}: it was opened with mode={self.mode!r}")


class FileCarrier(Carrier):
    """A carrier whose reader makes a file at ``_path`` (a socket, a FIFO, a ring):
    ``_ident`` is its ``(st_dev, st_ino)``, and :meth:`_remove_file` removes it when
    the process that made it closes, if it is still that file."""

    _path = ""
    _ident: tuple[int, int] | None = None

    def _remove_file(self) -> None:
        if self._removes():
            remove_if_ours(self._path, self._ident)
            self._ident = None
