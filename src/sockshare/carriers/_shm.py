"""The ``shm://name`` carrier: a bounded ring of message slots in POSIX shared memory.

Layout (one file, ``/dev/shm/<name>``, mode 0600)::

    0     header: magic, slot count, slot size, owner pid (and its pid namespace),
          closed flag, head (next slot to write), tail (next slot to read)
    64    four process-shared POSIX semaphores (sem_init(pshared=1), 64 bytes each):
            EMPTY  counts free slots        (writers wait on it: back-pressure)
            FILLED counts written messages  (readers wait on it)
            WLOCK  binary: one writer at a time moves ``head``
            RLOCK  binary: one reader at a time moves ``tail``
    4096  ``slots`` slots, each a 4-byte length and up to ``max_message`` bytes

A send waits for EMPTY, takes WLOCK, copies the message into slot ``head``, advances
``head``, releases WLOCK and posts FILLED; a receive mirrors it with FILLED, RLOCK and
``tail``, then posts EMPTY. The semaphore operations are the memory barriers that
make the copied bytes visible to the other process. Waiting is ``sem_clockwait`` on
CLOCK_MONOTONIC (``sem_timedwait`` on older glibc): the kernel puts the waiter to
sleep on a futex, nothing spins.

Who owns it: the reader creates the ring by default (``?slots=`` and ``?msgsize=``
set the geometry, default 64 slots of 64 KiB: 4 MiB of address space, of which only
touched pages use memory) and removes it on close. ``create=True`` lets a writer be
the creator. Creation is atomic: the ring is initialised under a temporary name and
published with ``link(2)``, so nobody ever attaches to a half-made ring. This is why
the carrier uses ``/dev/shm`` directly (which is what glibc's ``shm_open`` does)
rather than ``multiprocessing.shared_memory``, whose resource tracker in Python 3.11
also unlinks segments that a process merely attached to.

When the owner closes, it sets the closed flag and posts EMPTY and FILLED once; every
waiter that wakes re-posts and raises :class:`~sockshare.CarrierClosed` (readers first
receive what is still in the ring). A waiter also notices within half a second if the
owner process died without closing (its pid is gone). A dead owner leaves
``/dev/shm/<name>`` behind; opening it then fails at once with
:class:`~sockshare.CarrierClosed` naming the file to remove.

More than one writer or reader is safe: the locks serialise them and each message goes
to exactly one reader. A process killed while holding WLOCK or RLOCK (a window of a
few microseconds) leaves that lock taken: other writers (or readers) then time out
with :class:`~sockshare.CarrierTimeout` until the owner makes a new ring.

Linux only (it needs process-shared unnamed semaphores and ``/dev/shm``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import secrets
import stat
import struct
import sys
import time
import urllib.parse

from sockshare._errors import CarrierClosed, CarrierError, CarrierTimeout
from sockshare.carriers import _libc
from sockshare.carriers._base import Carrier, Deadline, full_or_timeout, os_error, query_int

__all__ = ["SHM_DIR", "ShmCarrier", "shm_name"]

SHM_DIR = "/dev/shm"  # noqa: S108 - where shm_open(3) lives; files are made O_EXCL, 0600
_MAGIC = b"SKSHRNG1"
# magic, slots, slot payload size, owner pid, closed, head, tail, owner pid namespace inode
_HEADER = struct.Struct("<8sIIIIQQQ")
_OFF_CLOSED, _OFF_HEAD, _OFF_TAIL = 20, 24, 32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SEM_BASE, _SEM_STRIDE = 64, 64
_EMPTY, _FILLED, _WLOCK, _RLOCK = range(4)
_DATA_BASE = 4096
_LEN = _U32
_SYMBOLS = ("sem_init", "sem_post", "sem_trywait", "sem_timedwait")
_CLOCK_MONOTONIC: int = getattr(time, "CLOCK_MONOTONIC", 1)


def shm_name(parts: urllib.parse.SplitResult) -> str:
    """The segment name of ``shm://name`` or ``shm:///name``."""
    raw = parts.netloc if parts.netloc else parts.path.removeprefix("/")
    if parts.netloc and parts.path not in ("", "/"):
        raise ValueError(f"shm:// takes one name, not a path: {parts.geturl()!r}")
    name = urllib.parse.unquote(raw)
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"shm:// needs a name without '/' or a leading '.': {parts.geturl()!r}")
    if len(os.fsencode(name)) > 200:
        raise ValueError(f"shm:// name too long: {name!r}")
    return name


def _stride(max_message: int) -> int:
    return (_LEN.size + max_message + 63) // 64 * 64


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _clock_wait_fn() -> tuple[str, bool]:
    """(function name, uses CLOCK_MONOTONIC)."""
    if not _libc.missing("sem_clockwait"):
        return "sem_clockwait", True
    return "sem_timedwait", False


class ShmCarrier(Carrier):
    """``shm://name``: a ring buffer in shared memory; see the module documentation."""

    scheme = "shm"
    query_params = ("slots", "msgsize")
    #: Default payload size of one slot; an instance reports its ring's actual size.
    max_message = 1 << 16
    #: Default number of slots of a ring this end creates.
    default_slots = 64

    _mm: mmap.mmap | None = None
    _views: list[ctypes.Array[ctypes.c_char]] | None = None
    _sems: tuple[int, ...] = ()
    _path = ""
    _ident: tuple[int, int] | None = None
    _slots = 0
    _stride = 0
    _owner_pid = 0
    _owner_ns = 0
    _wait_name = "sem_timedwait"
    _monotonic = False

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        if reason := self.unavailable_reason():
            raise CarrierError(f"shm:// is not available here: {reason}")
        name = shm_name(parts)
        self._path = os.path.join(SHM_DIR, name)
        self._wait_name, self._monotonic = _clock_wait_fn()
        if self._creates(create):
            slots = query_int(parts, "slots", self.default_slots, 1, 1 << 16)
            size = query_int(parts, "msgsize", self.max_message, 0, 1 << 24)
            if self._create(slots, size):
                return
        self._attach()

    # -- creating and attaching --------------------------------------------------------

    def _create(self, slots: int, max_message: int) -> bool:
        """Make and publish a new ring. False if ``name`` already exists (attach then)."""
        tmp = os.path.join(SHM_DIR, f".{os.path.basename(self._path)}.{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _os_fail(exc, f"create {tmp}") from exc
        try:
            try:
                os.ftruncate(fd, _DATA_BASE + slots * _stride(max_message))
                self._map(fd)
            finally:
                os.close(fd)
            mm = self._mm
            assert mm is not None
            for index, value in ((_EMPTY, slots), (_FILLED, 0), (_WLOCK, 1), (_RLOCK, 1)):
                if _libc.call("sem_init", self._sems[index], 1, value) != 0:
                    raise CarrierError(f"sem_init: {os.strerror(_libc.get_errno())}")
            _HEADER.pack_into(mm, 0, _MAGIC, slots, max_message, os.getpid(), 0, 0, 0, _pid_namespace())
            try:
                os.link(tmp, self._path)
            except FileExistsError:
                self._unmap()
                return False
            except OSError as exc:
                raise _os_fail(exc, f"create {self._path}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._owner = True
        st = os.stat(self._path)
        self._ident = (st.st_dev, st.st_ino)
        self._read_geometry()
        return True

    def _attach(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDWR)
        except OSError as exc:
            raise _os_fail(exc, f"open {self._path}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < _DATA_BASE:
                raise CarrierError(f"{self._path} is not a sockshare ring")
            self._map(fd)
        finally:
            os.close(fd)
        self._read_geometry()
        assert self._mm is not None
        if _DATA_BASE + self._slots * self._stride > len(self._mm):
            raise CarrierError(f"{self._path} is not a sockshare ring (size does not match)")
        if self._is_closed() or self._owner_gone():
            raise CarrierClosed(
                f"{self.url}: {self._path} is left over from an owner (pid {self._owner_pid}) "
                "that is gone; remove the file to reuse the name"
            )

    def _map(self, fd: int) -> None:
        self._mm = mmap.mmap(fd, os.fstat(fd).st_size)
        views = [
            (ctypes.c_char * _SEM_STRIDE).from_buffer(self._mm, _SEM_BASE + i * _SEM_STRIDE) for i in range(4)
        ]
        self._views = views
        self._sems = tuple(ctypes.addressof(v) for v in views)

    def _read_geometry(self) -> None:
        assert self._mm is not None
        magic, slots, size, pid, _, _, _, pidns = _HEADER.unpack_from(self._mm, 0)
        if magic != _MAGIC or slots == 0:
            raise CarrierError(f"{self._path} is not a sockshare ring")
        self._slots, self.max_message = slots, size
        self._stride = _stride(size)
        self._owner_pid, self._owner_ns = pid, pidns

    def _unmap(self) -> None:
        self._sems = ()
        self._views = None  # drop the exported buffers, or mmap.close() refuses
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    # -- waiting ------------------------------------------------------------------------

    def _is_closed(self) -> bool:
        assert self._mm is not None
        closed: int = _U32.unpack_from(self._mm, _OFF_CLOSED)[0]
        return closed != 0

    def _owner_gone(self) -> bool:
        if self._owner or self._owner_ns != _pid_namespace():
            return False  # a pid from another namespace means nothing here
        try:
            os.kill(self._owner_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _post(self, index: int) -> None:
        _libc.call("sem_post", self._sems[index])

    def _wait(self, index: int, deadline: Deadline) -> bool:
        """Take semaphore ``index``; False on timeout. Raises :class:`_Gone` if the owner
        closed or died (noticed between waits of at most half a second)."""
        sem = self._sems[index]
        while True:
            ts = _libc.abs_timespec(deadline.slice(), monotonic=self._monotonic)
            if self._monotonic:
                rc = _libc.call(self._wait_name, sem, _CLOCK_MONOTONIC, ctypes.byref(ts))
            else:
                rc = _libc.call(self._wait_name, sem, ctypes.byref(ts))
            if rc == 0:
                return True
            err = _libc.get_errno()
            if err == errno.EINTR:
                continue
            if err != errno.ETIMEDOUT:
                raise CarrierError(f"{self.url}: {self._wait_name}: {os.strerror(err)}")
            if self._is_closed():
                raise _Gone(_CLOSED_BY_OWNER)
            if self._owner_gone():
                raise _Gone(f"the ring's owner (pid {self._owner_pid}) is gone")
            if deadline.expired():
                return False

    # -- messages -----------------------------------------------------------------------

    def _send(self, data: bytes, deadline: Deadline) -> None:
        try:
            self._put(data, deadline)
        except _Gone as gone:
            raise self._give_up(str(gone)) from None

    def _recv(self, deadline: Deadline) -> bytes:
        try:
            return self._take(deadline)
        except _Gone as gone:
            raise self._give_up(str(gone)) from None

    def _put(self, data: bytes, deadline: Deadline) -> None:
        mm = self._mm
        assert mm is not None
        if self._is_closed():
            raise _Gone(_CLOSED_BY_OWNER)
        if not self._wait(_EMPTY, deadline):
            raise full_or_timeout(deadline, f"send to {self.url}")
        if self._is_closed():  # woken by the owner's close: pass the wake-up on
            self._post(_EMPTY)
            raise _Gone(_CLOSED_BY_OWNER)
        try:
            if not self._wait(_WLOCK, deadline):
                raise CarrierTimeout(f"{self.url}: another writer held the ring's lock too long")
        except BaseException:
            self._post(_EMPTY)  # give the slot back
            raise
        try:
            head = _U64.unpack_from(mm, _OFF_HEAD)[0]
            offset = _DATA_BASE + (head % self._slots) * self._stride
            _LEN.pack_into(mm, offset, len(data))
            mm[offset + _LEN.size : offset + _LEN.size + len(data)] = data
            _U64.pack_into(mm, _OFF_HEAD, head + 1)
        finally:
            self._post(_WLOCK)
        self._post(_FILLED)

    def _take(self, deadline: Deadline) -> bytes:
        mm = self._mm
        assert mm is not None
        timeout = f"{self.url}: nothing received in {deadline.timeout:g} s"
        if not self._wait(_FILLED, deadline):
            raise CarrierTimeout(timeout)
        try:
            if not self._wait(_RLOCK, deadline):
                raise CarrierTimeout(f"{self.url}: another reader held the ring's lock too long")
        except BaseException:
            self._post(_FILLED)  # the message stays for the next receive
            raise
        try:
            tail = _U64.unpack_from(mm, _OFF_TAIL)[0]
            if tail == _U64.unpack_from(mm, _OFF_HEAD)[0]:  # a wake-up from close, no message
                self._post(_FILLED)  # pass it on
                raise _Gone(_CLOSED_BY_OWNER)
            offset = _DATA_BASE + (tail % self._slots) * self._stride
            size = _LEN.unpack_from(mm, offset)[0]
            message = mm[offset + _LEN.size : offset + _LEN.size + min(size, self.max_message)]
            _U64.pack_into(mm, _OFF_TAIL, tail + 1)
        finally:
            self._post(_RLOCK)
        self._post(_EMPTY)
        if size > self.max_message:
            raise CarrierError(f"{self.url}: a corrupt slot was skipped")
        return message

    def _release(self) -> None:
        if self._mm is not None and self._removes():
            _U32.pack_into(self._mm, _OFF_CLOSED, 1)
            if self._sems:
                self._post(_EMPTY)  # wake one waiter each; they pass it on
                self._post(_FILLED)
            if self._ident is not None:
                try:
                    st = os.lstat(self._path)
                    if (st.st_dev, st.st_ino) == self._ident:
                        os.unlink(self._path)
                except FileNotFoundError:
                    pass
                self._ident = None
        self._unmap()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform != "linux":
            return "needs Linux (process-shared unnamed semaphores and /dev/shm)"
        if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
            return f"{SHM_DIR} is missing or not writable"
        if absent := _libc.missing(*_SYMBOLS):
            return f"the C library lacks {', '.join(absent)}"
        with mmap.mmap(-1, _SEM_STRIDE) as probe:
            view = (ctypes.c_char * _SEM_STRIDE).from_buffer(probe)
            ok = _libc.call("sem_init", ctypes.addressof(view), 1, 0) == 0
            err = _libc.get_errno()
            del view
        if not ok:
            return f"sem_init(pshared=1) failed: {os.strerror(err)}"
        return None


_CLOSED_BY_OWNER = "the ring was closed by its owner"


class _Gone(Exception):
    """The ring's owner closed it or died: this end must give up."""


def _os_fail(exc: OSError, what: str) -> CarrierError:
    return os_error(exc.errno or 0, what)
