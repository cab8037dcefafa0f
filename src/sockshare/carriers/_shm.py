"""The ``shm://name`` carrier: a bounded ring of message slots in POSIX shared memory,
built to survive any of its processes being killed at any instruction.

Layout (one file, ``/dev/shm/<name>``, mode 0600)::

    0     header: magic, slot count, slot size, closed flag, the owner's identity
          (pid, start time, pid namespace), head (next sequence number to hand out),
          tail (next sequence number to read), two futex words (DATA, SPACE) and
          their waiter counts
    128   one process-shared *robust* mutex (pthread, PTHREAD_MUTEX_ROBUST)
    4096  the slot table: per slot its state (FREE, WRITING, READY, SKIP), sequence
          number, length and, while WRITING, the writer's identity
    ...   the slots' payloads, ``msgsize`` bytes each (rounded up to 64)

Sending takes three steps. (1) Under the mutex: if ``head - tail < slots``, claim slot
``head % slots`` (state WRITING, with this process's identity and sequence number
``head``) and advance ``head``. (2) Without the lock: copy the payload into the slot.
(3) Under the mutex: mark the slot READY and bump DATA. Receiving, under the mutex,
looks at slot ``tail % slots``: READY is copied out, freed and ``tail`` advanced (bump
SPACE); SKIP is freed and passed over; WRITING waits for its writer. Messages are
delivered in the order their slots were claimed, so each writer's own messages stay in
order. Waiting is ``futex(FUTEX_WAIT)`` on DATA or SPACE, read under the mutex before
it is released, so no wake-up is lost; nothing spins.

Crash safety. The mutex is robust: when its holder dies, the kernel releases it and the
next process to take it is told so (``EOWNERDEAD``); that process repairs the ring
before going on. Every critical section leaves the ring consistent or in a state the
repair recognises: a slot claimed without ``head`` moving is freed, a message taken
without its slot being freed is freed. A writer killed between claiming and publishing
leaves a slot WRITING: whoever reaches it at the tail (a reader, or a writer waiting
for room) checks that writer's identity (:mod:`~sockshare.carriers._proc`: pid, start
time and namespace, so a reused pid is not mistaken for it) within 10 ms and skips the
slot if the writer is dead. A writer whose send fails with an exception marks its slot
SKIP itself. So: no lock stays held, no slot leaks, every message whose send returned
is delivered once and whole, in order, and a half-written one is never delivered.

Who owns it: the reader creates the ring by default (``?slots=`` and ``?msgsize=``
set the geometry, default 64 slots of 64 KiB: 4 MiB of address space, of which only
touched pages use memory) and removes it on close. ``create=True`` lets a writer be
the creator. Creation is atomic: the ring is initialised under a temporary name and
published with ``link(2)``, so nobody ever attaches to a half-made ring. This is why
the carrier uses ``/dev/shm`` directly (which is what glibc's ``shm_open`` does)
rather than ``multiprocessing.shared_memory``, whose resource tracker in Python 3.11
also unlinks segments that a process merely attached to.

When the owner closes, it sets the closed flag and wakes every waiter; writers then
raise :class:`~sockshare.CarrierClosed`, readers first receive what is still in the
ring. A waiter also notices within half a second if the owner process died without
closing. A dead owner's ring stays in ``/dev/shm``: a writer opening it gets
:class:`~sockshare.CarrierClosed` at once, and the next process that would create the
ring (a reader, by default) replaces it: it marks the old ring closed (its remaining
messages are discarded, its writers get :class:`~sockshare.CarrierClosed`), unlinks it
and creates a new one under the same name.

Linux only (robust process-shared mutexes, futexes and ``/dev/shm``). Processes that
share a ring must share a pid namespace for a dead writer's slot to be recovered; a
writer in another namespace is always presumed alive.
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

from sockshare._errors import CarrierClosed, CarrierError, CarrierFull, CarrierTimeout
from sockshare.carriers import _libc
from sockshare.carriers._base import Deadline, FileCarrier, os_error, query_int, remove_if_ours
from sockshare.carriers._proc import IDENT, ProcIdent, alive, self_ident

__all__ = ["SHM_DIR", "ShmCarrier", "shm_name"]

SHM_DIR = "/dev/shm"  # noqa: S108 - where shm_open(3) lives; files are made O_EXCL, 0600
_MAGIC = b"SKSHRNG2"

# header: magic, slots, msgsize, closed, (pad) at 0; owner identity at 24; then counters
_GEOMETRY = struct.Struct("<8sIII")
_OFF_CLOSED = 16
_OFF_OWNER = 24  # IDENT: pid, start, namespace
_OFF_HEAD, _OFF_TAIL = 48, 56
_OFF_DATA_EV, _OFF_SPACE_EV, _OFF_DATA_WAITERS, _OFF_SPACE_WAITERS = 64, 68, 72, 76
_OFF_REPAIRS, _OFF_SKIPPED = 80, 84  # recoveries so far: lock repairs, slots skipped
_OFF_MUTEX, _MUTEX_SIZE = 128, 128
_TABLE = 4096
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# one slot's record in the table: state, length, sequence number, writer identity
_SLOT = struct.Struct("<IIQ")
_SLOT_SIZE = 64
_OFF_SLOT_WRITER = 16
_FREE, _WRITING, _READY, _SKIP = 0, 1, 2, 3

# closed flag values
_OPEN, _CLOSED, _REPLACED = 0, 1, 2

#: How long a slot may stay WRITING at the tail before its writer's life is checked,
#: and how often after that.
_WRITER_CHECK = 0.01
#: The shortest wait for the lock, even with timeout=0 (its holders keep it microseconds).
_LOCK_FLOOR = 0.05
_EV_MASK = 0xFFFFFFFF

_SYMBOLS = (
    "pthread_mutexattr_init",
    "pthread_mutexattr_setpshared",
    "pthread_mutexattr_setrobust",
    "pthread_mutex_init",
    "pthread_mutex_trylock",
    "pthread_mutex_timedlock",
    "pthread_mutex_unlock",
    "pthread_mutex_consistent",
    "syscall",
)
_CLOCK_MONOTONIC: int = getattr(time, "CLOCK_MONOTONIC", 1)
_EOWNERDEAD: int = getattr(errno, "EOWNERDEAD", 130)
_ENOTRECOVERABLE: int = getattr(errno, "ENOTRECOVERABLE", 131)


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
    return (max_message + 63) // 64 * 64


def _data_base(slots: int) -> int:
    return _TABLE + (slots * _SLOT_SIZE + 4095) // 4096 * 4096


def _size(slots: int, max_message: int) -> int:
    return _data_base(slots) + slots * _stride(max_message)


class ShmCarrier(FileCarrier):
    """``shm://name``: a ring buffer in shared memory; see the module documentation."""

    scheme = "shm"
    query_params = ("slots", "msgsize")
    #: Default payload size of one slot; an instance reports its ring's actual size.
    max_message = 1 << 16
    #: Default number of slots of a ring this end creates.
    default_slots = 64

    _mm: mmap.mmap | None = None
    _anchors: list[ctypes.Array[ctypes.c_char]] | None = None
    _mutex = 0
    _data_ev = 0
    _space_ev = 0
    _slots = 0
    _stride = 0
    _data = 0
    _lock_fn = "pthread_mutex_timedlock"
    _monotonic = False

    def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
        if reason := self.unavailable_reason():
            raise CarrierError(f"shm:// is not available here: {reason}")
        name = shm_name(parts)
        self._path = os.path.join(SHM_DIR, name)
        if not _libc.missing("pthread_mutex_clocklock"):
            self._lock_fn, self._monotonic = "pthread_mutex_clocklock", True
        creates = self._creates(create)
        slots = query_int(parts, "slots", self.default_slots, 1, 1 << 16)
        size = query_int(parts, "msgsize", self.max_message, 0, 1 << 24)
        for _ in range(8):  # each round loses a race to another creator; bounded
            if creates and self._create(slots, size):
                return
            if self._attach(replace_dead=creates):
                return
        raise CarrierError(f"{self.url}: {self._path} kept changing while opening it; try again")

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
                os.ftruncate(fd, _size(slots, max_message))
                self._map(fd)
            finally:
                os.close(fd)
            mm = self._mm
            assert mm is not None
            attr = ctypes.create_string_buffer(64)
            for fn, *args in (
                ("pthread_mutexattr_init", attr),
                ("pthread_mutexattr_setpshared", attr, 1),  # PTHREAD_PROCESS_SHARED
                ("pthread_mutexattr_setrobust", attr, 1),  # PTHREAD_MUTEX_ROBUST
                ("pthread_mutex_init", self._mutex, attr),
            ):
                if rc := _libc.call(fn, *args):
                    raise CarrierError(f"{fn}: {os.strerror(rc)}")
            _GEOMETRY.pack_into(mm, 0, _MAGIC, slots, max_message, _OPEN)
            IDENT.pack_into(mm, _OFF_OWNER, *self_ident())
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

    def _attach(self, *, replace_dead: bool) -> bool:
        """Map the existing ring. If its owner is gone: replace it (True means "go and
        create it again": False) when ``replace_dead``, else refuse."""
        try:
            fd = os.open(self._path, os.O_RDWR)
        except FileNotFoundError as exc:
            if replace_dead:
                return False  # gone since we tried to create it: create again
            raise _os_fail(exc, f"open {self._path}") from exc
        except OSError as exc:
            raise _os_fail(exc, f"open {self._path}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < _TABLE:
                raise CarrierError(f"{self._path} is not a sockshare ring")
            self._map(fd)
        finally:
            os.close(fd)
        self._read_geometry()
        assert self._mm is not None
        if _size(self._slots, self.max_message) > len(self._mm):
            raise CarrierError(f"{self._path} is not a sockshare ring (size does not match)")
        if self._closed_state() == _OPEN and not self._owner_gone():
            return True
        owner = self._owner_ident()
        if not replace_dead:
            raise CarrierClosed(
                f"{self.url}: {self._path} is left over from a reader (pid {owner.pid}) that is "
                "gone; the next reader to open it will replace it"
            )
        self._retire((st.st_dev, st.st_ino))
        self._unmap()
        return False

    def _retire(self, ident: tuple[int, int]) -> None:
        """Under the old ring's lock: mark it replaced, wake its waiters and unlink it
        (only if the name still points to it). Safe against several new readers at once:
        the first does it, the others find it done and go and attach to the new ring."""
        self._lock(Deadline(5.0), check_gone=False)
        try:
            if self._closed_state() == _OPEN and not self._owner_gone():
                return  # someone else replaced it under our feet? It is a live ring now.
            self._set_closed(_REPLACED)
            remove_if_ours(self._path, ident)
        finally:
            self._unlock()
        self._wake(self._data_ev)
        self._wake(self._space_ev)

    def _map(self, fd: int) -> None:
        self._mm = mmap.mmap(fd, os.fstat(fd).st_size)
        anchors = [
            (ctypes.c_char * size).from_buffer(self._mm, offset)
            for offset, size in ((_OFF_MUTEX, _MUTEX_SIZE), (_OFF_DATA_EV, 4), (_OFF_SPACE_EV, 4))
        ]
        self._anchors = anchors
        self._mutex, self._data_ev, self._space_ev = (ctypes.addressof(a) for a in anchors)

    def _read_geometry(self) -> None:
        assert self._mm is not None
        magic, slots, size, _ = _GEOMETRY.unpack_from(self._mm, 0)
        if magic != _MAGIC or slots == 0:
            raise CarrierError(f"{self._path} is not a sockshare ring (or one of another version)")
        self._slots, self.max_message = slots, size
        self._stride = _stride(size)
        self._data = _data_base(slots)

    def _unmap(self) -> None:
        self._mutex = self._data_ev = self._space_ev = 0
        self._anchors = None  # drop the exported buffers, or mmap.close() refuses
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    # -- shared state -------------------------------------------------------------------

    def _closed_state(self) -> int:
        assert self._mm is not None
        value: int = _U32.unpack_from(self._mm, _OFF_CLOSED)[0]
        return value

    def _set_closed(self, value: int) -> None:
        assert self._mm is not None
        _U32.pack_into(self._mm, _OFF_CLOSED, value)
        self._bump(_OFF_DATA_EV)
        self._bump(_OFF_SPACE_EV)

    def _owner_ident(self) -> ProcIdent:
        assert self._mm is not None
        return ProcIdent(*IDENT.unpack_from(self._mm, _OFF_OWNER))

    def _owner_gone(self) -> bool:
        if self._removes():
            return False
        return not alive(self._owner_ident())

    def _gone_reason(self) -> str | None:
        """Why this end must give up, or None: checked while waiting."""
        state = self._closed_state()
        if state == _REPLACED:
            return _REPLACED_TEXT
        if state != _OPEN:
            return _CLOSED_BY_OWNER
        if self._owner_gone():
            return f"the ring's owner (pid {self._owner_ident().pid}) is gone"
        return None

    def _get(self, offset: int) -> int:
        assert self._mm is not None
        value: int = _U64.unpack_from(self._mm, offset)[0]
        return value

    def _put64(self, offset: int, value: int) -> None:
        assert self._mm is not None
        _U64.pack_into(self._mm, offset, value)

    def _bump(self, offset: int) -> None:
        assert self._mm is not None
        _U32.pack_into(self._mm, offset, (_U32.unpack_from(self._mm, offset)[0] + 1) & _EV_MASK)

    def _slot(self, index: int) -> tuple[int, int, int]:
        """(state, length, sequence number) of slot ``index``."""
        assert self._mm is not None
        state, length, seq = _SLOT.unpack_from(self._mm, _TABLE + index * _SLOT_SIZE)
        return state, length, seq

    def _set_state(self, index: int, state: int) -> None:
        assert self._mm is not None
        _U32.pack_into(self._mm, _TABLE + index * _SLOT_SIZE, state)

    def _writer(self, index: int) -> ProcIdent:
        assert self._mm is not None
        return ProcIdent(*IDENT.unpack_from(self._mm, _TABLE + index * _SLOT_SIZE + _OFF_SLOT_WRITER))

    # -- the lock -----------------------------------------------------------------------

    def _lock(self, deadline: Deadline, *, check_gone: bool = True) -> None:
        """Take the ring's mutex; repair the ring if its last holder died holding it.

        While it waits (only if another process holds the lock longer than a moment), it
        raises :class:`_Gone` if the owner closed or died, unless ``check_gone`` is off."""
        rc = _libc.call("pthread_mutex_trylock", self._mutex)
        if rc == errno.EBUSY:
            floor = Deadline(_LOCK_FLOOR)
            while True:
                wait = max(deadline.slice(), floor.slice())
                ts = _libc.abs_timespec(wait, monotonic=self._monotonic)
                if self._monotonic:
                    rc = _libc.call(self._lock_fn, self._mutex, _CLOCK_MONOTONIC, ctypes.byref(ts))
                else:
                    rc = _libc.call(self._lock_fn, self._mutex, ctypes.byref(ts))
                if rc != errno.ETIMEDOUT:
                    break
                if check_gone and (reason := self._gone_reason()):
                    raise _Gone(reason)
                if deadline.expired() and floor.expired():
                    raise CarrierTimeout(
                        f"{self.url}: another process held the ring's lock for over "
                        f"{max(deadline.timeout or 0.0, _LOCK_FLOOR):g} s (is it stopped?)"
                    )
        if rc == 0:
            return
        if rc == _EOWNERDEAD:
            try:
                self._repair()
            finally:
                _libc.call("pthread_mutex_consistent", self._mutex)
            return
        if rc == _ENOTRECOVERABLE:
            raise _Gone("the ring's lock cannot be recovered; a new reader must make a new ring")
        raise CarrierError(f"{self.url}: {self._lock_fn}: {os.strerror(rc)}")

    def _unlock(self) -> None:
        _libc.call("pthread_mutex_unlock", self._mutex)

    def _repair(self) -> None:
        """The last holder of the lock died inside a critical section: make the ring
        consistent. Only two sections change more than one word: claiming (the slot's
        record, then ``head``) and taking (``tail``, then the slot's state). So: a slot
        outside ``tail..head`` that is not FREE is freed; a FREE slot inside is SKIPped."""
        head, tail = self._get(_OFF_HEAD), self._get(_OFF_TAIL)
        if not 0 <= head - tail <= self._slots:  # cannot happen; never trust it anyway
            tail = head
            self._put64(_OFF_TAIL, tail)
        for index in range(self._slots):
            state, _, seq = self._slot(index)
            inside = tail <= seq < head and seq % self._slots == index
            if not inside and state != _FREE:
                self._set_state(index, _FREE)
            elif inside and state == _FREE:
                self._set_state(index, _SKIP)
        self._bump(_OFF_DATA_EV)
        self._bump(_OFF_SPACE_EV)
        self._bump(_OFF_REPAIRS)

    # -- waiting ------------------------------------------------------------------------

    def _wait_locked(self, ev_offset: int, waiters_offset: int, deadline: Deadline,
                     recheck: float | None) -> None:
        """Called with the lock held: release it, sleep until the event word changes
        (or for the next slice of ``deadline``; at most ``recheck`` seconds, when a
        writer's slot is due to be checked again), take it again. No wake-up is lost:
        the word is read under the lock and every change is made under it."""
        assert self._mm is not None
        mm = self._mm
        seconds = deadline.slice()
        if recheck is not None:
            seconds = min(seconds, recheck)
        expected = _U32.unpack_from(mm, ev_offset)[0]
        _U32.pack_into(mm, waiters_offset, _U32.unpack_from(mm, waiters_offset)[0] + 1)
        self._unlock()
        address = self._data_ev if ev_offset == _OFF_DATA_EV else self._space_ev
        try:
            _libc.futex_wait(address, expected, seconds)
        finally:
            self._lock(Deadline(max(seconds, 5.0)))
            count = _U32.unpack_from(mm, waiters_offset)[0]
            _U32.pack_into(mm, waiters_offset, max(0, count - 1))

    def _wake(self, address: int) -> None:
        if address:
            _libc.futex_wake(address)

    def _wake_after(self, ev_offset: int, waiters_offset: int) -> bool:
        """Under the lock: bump the event word; True if someone waits (wake after unlock)."""
        assert self._mm is not None
        self._bump(ev_offset)
        waiting: int = _U32.unpack_from(self._mm, waiters_offset)[0]
        return waiting > 0

    def _reclaim_tail(self, checks: dict[int, float]) -> tuple[bool, float | None]:
        """Under the lock: free SKIP slots and slots of dead writers at the tail.

        Returns (freed anything, seconds until the WRITING slot at the tail should be
        checked again, or None if the tail is not a WRITING slot). ``checks`` remembers,
        per sequence number, when its writer was first seen writing."""
        freed = False
        while True:
            head, tail = self._get(_OFF_HEAD), self._get(_OFF_TAIL)
            if tail >= head:
                return freed, None
            index = tail % self._slots
            state, _, seq = self._slot(index)
            if state == _WRITING and seq == tail:
                now = time.monotonic()
                first = checks.setdefault(seq, now)
                if now - first < _WRITER_CHECK:
                    return freed, _WRITER_CHECK - (now - first)
                if alive(self._writer(index)):
                    checks[seq] = now  # check again a little later
                    return freed, _WRITER_CHECK
            elif state == _READY and seq == tail:
                return freed, None
            # SKIP, a dead writer's slot, or (after a repair) anything inconsistent
            checks.pop(seq, None)
            self._bump(_OFF_SKIPPED)
            self._put64(_OFF_TAIL, tail + 1)
            self._set_state(index, _FREE)
            self._bump(_OFF_SPACE_EV)
            freed = True

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

    def _claim(self, size: int, deadline: Deadline) -> tuple[int, int]:
        """Step 1 of a send: claim the slot at ``head``. Returns (slot index, sequence)."""
        assert self._mm is not None
        mm = self._mm
        checks: dict[int, float] = {}
        self._lock(deadline)
        wake = waited = False
        try:
            while True:
                if (self._closed_state() != _OPEN or waited) and (reason := self._gone_reason()):
                    raise _Gone(reason)
                head, tail = self._get(_OFF_HEAD), self._get(_OFF_TAIL)
                if head - tail < self._slots:
                    index = head % self._slots
                    record = _TABLE + index * _SLOT_SIZE
                    IDENT.pack_into(mm, record + _OFF_SLOT_WRITER, *self_ident())
                    _SLOT.pack_into(mm, record, _WRITING, size, head)
                    self._put64(_OFF_HEAD, head + 1)
                    return index, head
                freed, recheck = self._reclaim_tail(checks)
                if freed:
                    wake = self._wake_after(_OFF_SPACE_EV, _OFF_SPACE_WAITERS) or wake
                    continue
                if deadline.expired():
                    if deadline.timeout == 0:
                        raise CarrierFull(f"send to {self.url}: full, and timeout=0 does not wait")
                    raise CarrierTimeout(f"send to {self.url}: still full after {deadline.timeout:g} s")
                self._wait_locked(_OFF_SPACE_EV, _OFF_SPACE_WAITERS, deadline, recheck)
                waited = True
        finally:
            self._unlock()
            if wake:
                self._wake(self._space_ev)

    def _put(self, data: bytes, deadline: Deadline) -> None:
        assert self._mm is not None
        mm = self._mm
        if self._closed_state() != _OPEN:
            raise _Gone(self._gone_reason() or _CLOSED_BY_OWNER)
        index, seq = self._claim(len(data), deadline)
        try:
            offset = self._data + index * self._stride
            mm[offset : offset + len(data)] = data
            published = self._settle(index, seq, _READY, Deadline(max(5.0, deadline.remaining() or 0.0)))
        except BaseException:
            self._abandon(index, seq)   # (a slot already READY is left as it is)
            raise
        if not published:
            raise _Gone(self._gone_reason() or "the ring was repaired and this message dropped")

    def _settle(self, index: int, seq: int, state: int, lock_deadline: Deadline, *,
                check_gone: bool = True) -> bool:
        """The end of a send: slot ``index``, if it is still the one the sender claimed
        (WRITING, sequence ``seq``), becomes ``state`` (READY, or SKIP), and receivers
        are woken. True if it did (False: the ring was repaired meanwhile)."""
        self._lock(lock_deadline, check_gone=check_gone)
        try:
            now_state, _, now_seq = self._slot(index)
            settled = now_state == _WRITING and now_seq == seq
            if settled:
                self._set_state(index, state)
            wake = self._wake_after(_OFF_DATA_EV, _OFF_DATA_WAITERS)
        finally:
            self._unlock()
        if wake:
            self._wake(self._data_ev)
        return settled

    def _abandon(self, index: int, seq: int) -> None:
        """A send failed after claiming its slot: mark the slot SKIP so nobody waits."""
        with contextlib.suppress(CarrierError, _Gone):
            self._settle(index, seq, _SKIP, Deadline(1.0), check_gone=False)

    def _take(self, deadline: Deadline) -> bytes:
        assert self._mm is not None
        mm = self._mm
        checks: dict[int, float] = {}
        self._lock(deadline)
        wake = waited = False
        try:
            while True:
                freed, recheck = self._reclaim_tail(checks)
                if freed:
                    wake = self._wake_after(_OFF_SPACE_EV, _OFF_SPACE_WAITERS) or wake
                head, tail = self._get(_OFF_HEAD), self._get(_OFF_TAIL)
                if tail < head and recheck is None:  # the tail slot is READY
                    index = tail % self._slots
                    _, size, _ = self._slot(index)
                    offset = self._data + index * self._stride
                    message = mm[offset : offset + min(size, self.max_message)]
                    self._put64(_OFF_TAIL, tail + 1)
                    self._set_state(index, _FREE)
                    wake = self._wake_after(_OFF_SPACE_EV, _OFF_SPACE_WAITERS) or wake
                    return message
                gone = tail >= head and (self._closed_state() != _OPEN or waited)
                if gone and (reason := self._gone_reason()):
                    raise _Gone(reason)
                if deadline.expired():
                    raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s")
                self._wait_locked(_OFF_DATA_EV, _OFF_DATA_WAITERS, deadline, recheck)
                waited = True
        finally:
            self._unlock()
            if wake:
                self._wake(self._space_ev)

    def _free_slots(self) -> int:
        """Slots not holding a message or being written (for tests and diagnostics)."""
        return self._slots - (self._get(_OFF_HEAD) - self._get(_OFF_TAIL))

    def _recoveries(self) -> tuple[int, int]:
        """(lock repairs after a holder died, slots skipped) since the ring was made."""
        assert self._mm is not None
        repairs, skipped = struct.unpack_from("<II", self._mm, _OFF_REPAIRS)
        return repairs, skipped

    def _release(self) -> None:
        if self._mm is not None and self._removes() and self._mutex:
            try:
                self._lock(Deadline(1.0), check_gone=False)
            except CarrierError:
                _U32.pack_into(self._mm, _OFF_CLOSED, _CLOSED)  # wake them anyway
            else:
                try:
                    if self._closed_state() == _OPEN:
                        self._set_closed(_CLOSED)
                finally:
                    self._unlock()
            self._wake(self._data_ev)
            self._wake(self._space_ev)
            self._remove_file()
        self._unmap()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform != "linux":
            return "needs Linux (robust process-shared mutexes, futexes and /dev/shm)"
        if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
            return f"{SHM_DIR} is missing or not writable"
        if absent := _libc.missing(*_SYMBOLS):
            return f"the C library lacks {', '.join(absent)}"
        if _libc.futex_number() is None:
            import platform

            return f"the futex system call number is not known for {platform.machine()}"
        return None


_CLOSED_BY_OWNER = "the ring was closed by its owner"
_REPLACED_TEXT = "the ring's owner died and a new reader replaced the ring; open a new writer to reach it"


class _Gone(Exception):
    """The ring's owner closed it or died: this end must give up."""


def _os_fail(exc: OSError, what: str) -> CarrierError:
    return os_error(exc.errno or 0, what)
