"""Owner records: which live process owns a kernel queue, for the queues that cannot say.

A POSIX or System V message queue outlives the process that made it, and the kernel
keeps no owner pid we can read back. So the reader that creates one (the owner) also
writes a small record next to it, ``/dev/shm/.sockshare-<kind>.<name>`` (mode 0600):
its identity (:mod:`~sockshare.carriers._proc`: pid, start time, pid namespace) and
the queue's *incarnation* (the System V queue id, or the POSIX queue's inode number),
so a record left by an earlier queue of the same name never speaks for a new one.

With it:

* a writer waiting on a full queue checks the record between waits and gives up with
  :class:`~sockshare.CarrierClosed` when the owner is dead (and a writer opening the
  queue checks it once);
* a reader that finds the queue already there and its owner dead takes it over
  (:meth:`OwnerRecord.take_over`): under an exclusive ``flock`` of the record it checks
  again, replaces the queue by a new, empty one and publishes its own record (a
  ``rename`` over the old one), so of several new readers exactly one takes over and the
  others attach to the new queue;
* the owner removes its record when it closes.

No record (``/dev/shm`` missing, a queue made by another program, or an owner killed
between creating the queue and writing the record) means "unknown": the queue is then
treated as before, with no owner check. A record not owned by this user is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import struct
from collections.abc import Callable

from sockshare.carriers._base import remove_if_ours
from sockshare.carriers._proc import IDENT, ProcIdent, alive, self_ident

__all__ = ["OwnerRecord"]

RECORD_DIR = "/dev/shm"  # noqa: S108 - tmpfs, files made O_EXCL 0600 and renamed into place
_RECORD = struct.Struct(f"<{IDENT.format.lstrip('<')}Q")  # identity, incarnation


class OwnerRecord:
    """The owner record of queue ``name`` of ``kind`` (``"mq"``, ``"sysvmq"``)."""

    __slots__ = ("_ident", "path")

    def __init__(self, kind: str, name: str) -> None:
        if len(name.encode()) > 200 or "/" in name or name.startswith("."):
            name = hashlib.sha256(name.encode()).hexdigest()
        self.path = os.path.join(RECORD_DIR, f".sockshare-{kind}.{name}")
        self._ident: tuple[int, int] | None = None  # the file this process published

    @staticmethod
    def available() -> bool:
        return os.path.isdir(RECORD_DIR) and os.access(RECORD_DIR, os.W_OK)

    def publish(self, incarnation: int) -> None:
        """Record this process as the owner of queue ``incarnation`` (best effort)."""
        if not self.available():
            return
        tmp = f"{self.path}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return
        try:
            os.write(fd, _RECORD.pack(*self_ident(), incarnation))
            st = os.fstat(fd)
            os.rename(tmp, self.path)
            self._ident = (st.st_dev, st.st_ino)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        finally:
            os.close(fd)

    def _read_fd(self, fd: int) -> tuple[ProcIdent, int] | None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size != _RECORD.size:
            return None
        data = os.pread(fd, _RECORD.size, 0)
        if len(data) != _RECORD.size:
            return None
        pid, start, ns, incarnation = _RECORD.unpack(data)
        return ProcIdent(pid, start, ns), incarnation

    def read(self) -> tuple[ProcIdent, int] | None:
        """(owner, incarnation), or None if there is no usable record."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return self._read_fd(fd)
        except OSError:
            return None
        finally:
            os.close(fd)

    def dead_owner(self, incarnation: int) -> ProcIdent | None:
        """The owner of queue ``incarnation`` if it is recorded and certainly dead."""
        record = self.read()
        if record is None or record[1] != incarnation or alive(record[0]):
            return None
        return record[0]

    def take_over(self, incarnation: int, replace: Callable[[], int | None]) -> bool:
        """If queue ``incarnation``'s recorded owner is dead, call ``replace`` (which
        removes the old queue and makes a new one, returning its incarnation, or None if
        someone else made one first) and record this process as the new owner. True if
        this process now owns the new queue. Several callers at once: one wins."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            import fcntl  # POSIX only, as are the queues that have owner records

            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                here = os.lstat(self.path)
            except FileNotFoundError:
                return False
            st = os.fstat(fd)
            if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
                return False  # another reader took over (and renamed its record in) first
            record = self._read_fd(fd)
            if record is None or record[1] != incarnation or alive(record[0]):
                return False
            new = replace()
            if new is None:
                return False
            self.publish(new)
            return True
        finally:
            os.close(fd)  # releases the flock

    def remove(self) -> None:
        """Remove the record this process published (and only that one)."""
        if self._ident is None:
            return
        remove_if_ours(self.path, self._ident)
        self._ident = None
