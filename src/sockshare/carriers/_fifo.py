"""The ``fifo://`` carrier: a POSIX named pipe, or a Windows named pipe on Windows.

POSIX (``fifo:///path/to/pipe``)
    The reader creates the FIFO (``mkfifo``, mode 0600) unless it exists, and removes
    it on close if it created it. Each message goes out as one ``write`` of an 8-byte
    header (a 2-byte magic, the 2-byte length, a CRC-32 of length and payload) plus the
    payload, at most ``PIPE_BUF`` (4096 on Linux) bytes, which POSIX makes atomic:
    messages of concurrent writers never interleave, a reader sees a frame whole or not
    at all, and a full pipe makes a non-blocking write fail whole, so a timed-out send
    leaves nothing behind.

    Anything else written into the FIFO (a stray ``echo``, a crashed or foreign writer)
    cannot desynchronise the stream: the reader only delivers frames whose magic, length
    and checksum hold; it skips anything else byte by byte up to the next valid frame. A
    frame that claims more bytes than the pipe holds when it runs dry is not one of ours
    (ours are never split), so it is skipped at once instead of swallowing the frames
    behind it. Skipped bytes are counted in :attr:`FifoCarrier.discarded`.
    A writer opening the FIFO before any reader has it open waits (polling with
    backoff, up to the open timeout) and then raises :class:`~sockshare.CarrierTimeout`;
    one whose reader has gone gets :class:`~sockshare.CarrierClosed`. The reader also
    holds a write end itself, so it does not see end-of-file between writers.
    One reader per FIFO: two readers could each take part of the pipe's contents.

Windows (``fifo:///name`` is ``\\\\.\\pipe\\name``)
    A message-mode named pipe made with ``_winapi``: the reader is the pipe server and
    keeps one instance listening at a time (the next one is made before the last one is
    closed, so the name never vanishes while the reader lives; it goes with the reader).
    Writers are clients and take turns (``ERROR_PIPE_BUSY`` waits up to the timeout).
    Remote clients are rejected. Tested only under Wine (``tests/carriers``, marked
    ``wine``), not on real Windows.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import struct
import sys
import urllib.parse
import zlib

from sockshare._errors import CarrierClosed, CarrierError, CarrierInUse, CarrierTimeout
from sockshare.carriers._base import (
    Backoff,
    Carrier,
    Deadline,
    FileCarrier,
    full_or_timeout,
    os_error,
    wait_fd,
)

__all__ = ["FifoCarrier"]

_FRAME = struct.Struct("!2sHI")  # magic, payload length, CRC-32 of length and payload
_MAGIC = b"\xf1\x70"
_PIPE_BUF: int = getattr(select, "PIPE_BUF", 4096)
_OPEN_POLL_CAP = 0.05  # longest pause while a writer waits for a reader to appear


def _fifo_path(parts: urllib.parse.SplitResult) -> str:
    if parts.netloc:
        raise ValueError(f"fifo:// takes a path (fifo:///tmp/pipe), not a host {parts.netloc!r}")
    path = urllib.parse.unquote(parts.path)
    if not path:
        raise ValueError("fifo:// needs a path")
    return path


#: CRC-32 of each possible 2-byte length: the checksum goes on from there over the payload.
_LENGTH_CRC = [zlib.crc32(struct.pack("!H", n)) for n in range(_PIPE_BUF + 1)]


def _frame(data: bytes) -> bytes:
    return _FRAME.pack(_MAGIC, len(data), zlib.crc32(data, _LENGTH_CRC[len(data)])) + data


def _raise_os(exc: OSError, what: str) -> CarrierError:
    return os_error(exc.errno or 0, what, refused=CarrierClosed)


if sys.platform == "win32":
    import _winapi

    _PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
    _ERROR_FILE_NOT_FOUND = 2
    _ERROR_ACCESS_DENIED = 5
    _ERROR_BROKEN_PIPE = 109
    _ERROR_SEM_TIMEOUT = 121
    _ERROR_PIPE_BUSY = 231
    _ERROR_NO_DATA = 232
    _ERROR_PIPE_NOT_CONNECTED = 233
    _ERROR_MORE_DATA = 234
    _ERROR_PIPE_CONNECTED = 535
    _ERROR_IO_PENDING = 997
    _GONE = (_ERROR_BROKEN_PIPE, _ERROR_NO_DATA, _ERROR_PIPE_NOT_CONNECTED)

    def _pipe_name(parts: urllib.parse.SplitResult) -> str:
        name = urllib.parse.unquote(parts.netloc + parts.path).lstrip("/")
        if not name:
            raise ValueError("fifo:// needs a pipe name")
        if name.lower().startswith("\\\\.\\pipe\\"):
            return name
        return "\\\\.\\pipe\\" + name.replace("/", "\\")

    def _wait(ov: _winapi.Overlapped, deadline: Deadline) -> bool:
        """Wait for an overlapped operation; on timeout cancel it and return False."""
        rem = deadline.remaining()
        ms = _winapi.INFINITE if rem is None else int(rem * 1000 + 0.999)
        res = _winapi.WaitForMultipleObjects([ov.event], False, ms)
        if res == _winapi.WAIT_TIMEOUT:
            ov.cancel()
            try:
                ov.GetOverlappedResult(True)
            except OSError:
                pass
            return False
        return True

    class FifoCarrier(Carrier):
        """``fifo:///name``: a Windows message-mode named pipe ``\\\\.\\pipe\\name``."""

        scheme = "fifo"
        max_message = 1 << 16

        _handle: int | None = None
        _connected = False
        _name = ""

        def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
            self._name = _pipe_name(parts)
            if create is not None and create != (self.mode == "r"):
                raise ValueError("a Windows named pipe is always created by its reader")
            if self.mode == "r":
                self._owner = True
                self._handle = self._new_instance(first=True)
            else:
                self._open_client(deadline)

        def _new_instance(self, *, first: bool) -> int:
            open_mode = _winapi.PIPE_ACCESS_INBOUND | _winapi.FILE_FLAG_OVERLAPPED
            if first:  # fail if anyone else already serves this name
                open_mode |= _winapi.FILE_FLAG_FIRST_PIPE_INSTANCE
            try:
                return int(
                    _winapi.CreateNamedPipe(
                        self._name,
                        open_mode,
                        _winapi.PIPE_TYPE_MESSAGE
                        | _winapi.PIPE_READMODE_MESSAGE
                        | _winapi.PIPE_WAIT
                        | _PIPE_REJECT_REMOTE_CLIENTS,
                        _winapi.PIPE_UNLIMITED_INSTANCES,
                        0,
                        self.max_message + 64,
                        _winapi.NMPWAIT_WAIT_FOREVER,
                        _winapi.NULL,
                    )
                )
            except OSError as exc:
                if exc.winerror == _ERROR_ACCESS_DENIED:
                    raise CarrierInUse(f"{self._name} is in use by another reader") from exc
                raise CarrierError(f"CreateNamedPipe {self._name}: {exc}") from exc

        def _open_client(self, deadline: Deadline) -> None:
            from sockshare._errors import CarrierNotFound, CarrierPermission

            while True:
                try:
                    self._handle = int(
                        _winapi.CreateFile(
                            self._name,
                            _winapi.GENERIC_WRITE,
                            0,
                            _winapi.NULL,
                            _winapi.OPEN_EXISTING,
                            _winapi.FILE_FLAG_OVERLAPPED,
                            _winapi.NULL,
                        )
                    )
                    return
                except OSError as exc:
                    if exc.winerror == _ERROR_FILE_NOT_FOUND:
                        raise CarrierNotFound(f"{self._name}: no such pipe") from exc
                    if exc.winerror == _ERROR_ACCESS_DENIED:
                        raise CarrierPermission(f"{self._name}: access denied") from exc
                    if exc.winerror != _ERROR_PIPE_BUSY:
                        raise CarrierError(f"open {self._name}: {exc}") from exc
                rem = deadline.remaining()
                if rem == 0:
                    raise CarrierTimeout(f"{self._name}: busy with another writer")
                ms = _winapi.NMPWAIT_WAIT_FOREVER if rem is None else max(1, int(rem * 1000))
                try:
                    _winapi.WaitNamedPipe(self._name, ms)
                except OSError as exc:
                    if exc.winerror == _ERROR_SEM_TIMEOUT:
                        raise CarrierTimeout(f"{self._name}: busy with another writer") from exc
                    if exc.winerror == _ERROR_FILE_NOT_FOUND:
                        raise CarrierNotFound(f"{self._name}: no such pipe") from exc
                    raise CarrierError(f"WaitNamedPipe {self._name}: {exc}") from exc

        def _accept(self, deadline: Deadline) -> bool:
            assert self._handle is not None
            try:
                ov = _winapi.ConnectNamedPipe(self._handle, overlapped=True)
            except OSError as exc:
                if exc.winerror in (_ERROR_PIPE_CONNECTED, _ERROR_NO_DATA):
                    self._connected = True  # connected (and maybe gone) before we asked
                    return True
                raise CarrierError(f"ConnectNamedPipe {self._name}: {exc}") from exc
            if not _wait(ov, deadline):
                return False
            _, err = ov.GetOverlappedResult(True)
            if err not in (0, _ERROR_PIPE_CONNECTED):
                raise CarrierError(f"ConnectNamedPipe {self._name}: error {err}")
            self._connected = True
            return True

        def _next_writer(self) -> None:
            """The writer hung up: open the next pipe instance, then drop the old one, so
            the name never disappears (no "not found" window, no squatting)."""
            old = self._handle
            self._handle = self._new_instance(first=False)
            self._connected = False
            if old is not None:
                _winapi.CloseHandle(old)

        def _recv(self, deadline: Deadline) -> bytes:
            timeout = f"{self._name}: nothing received in {deadline.timeout} s"
            while True:
                if not self._connected and not self._accept(deadline):
                    raise CarrierTimeout(timeout)
                assert self._handle is not None
                try:
                    ov, err = _winapi.ReadFile(self._handle, self.max_message + 1, overlapped=True)
                except OSError as exc:
                    if exc.winerror in _GONE:
                        self._next_writer()
                        continue
                    raise CarrierError(f"ReadFile {self._name}: {exc}") from exc
                if err == _ERROR_IO_PENDING and not _wait(ov, deadline):
                    raise CarrierTimeout(timeout)
                try:
                    _, err = ov.GetOverlappedResult(True)
                except OSError as exc:
                    if exc.winerror in _GONE:
                        self._next_writer()
                        continue
                    raise CarrierError(f"ReadFile {self._name}: {exc}") from exc
                if err == 0:
                    data = bytes(ov.getbuffer() or b"")
                    if len(data) <= self.max_message:
                        return data
                    continue
                if err == _ERROR_MORE_DATA:  # oversized: not one of ours, drain and skip
                    self._next_writer()
                    continue
                if err in _GONE:
                    self._next_writer()
                    continue
                raise CarrierError(f"ReadFile {self._name}: error {err}")

        def _send(self, data: bytes, deadline: Deadline) -> None:
            assert self._handle is not None
            try:
                ov, err = _winapi.WriteFile(self._handle, data, overlapped=True)
            except OSError as exc:
                if exc.winerror in _GONE:
                    raise CarrierClosed(f"{self._name}: the reader is gone") from exc
                raise CarrierError(f"WriteFile {self._name}: {exc}") from exc
            if err == _ERROR_IO_PENDING and not _wait(ov, deadline):
                raise full_or_timeout(deadline, f"send to {self._name}")
            try:
                _, err = ov.GetOverlappedResult(True)
            except OSError as exc:
                if exc.winerror in _GONE:
                    raise CarrierClosed(f"{self._name}: the reader is gone") from exc
                raise CarrierError(f"WriteFile {self._name}: {exc}") from exc
            if err in _GONE:
                raise CarrierClosed(f"{self._name}: the reader is gone")
            if err != 0:
                raise CarrierError(f"WriteFile {self._name}: error {err}")

        def _release(self) -> None:
            if self._handle is not None:
                _winapi.CloseHandle(self._handle)
                self._handle = None

        @classmethod
        def unavailable_reason(cls) -> str | None:
            return None

else:

    class FifoCarrier(FileCarrier):
        """``fifo:///path``: a POSIX named pipe (FIFO) carrying checksummed frames."""

        scheme = "fifo"
        #: ``PIPE_BUF`` less the 8-byte header: the largest write POSIX keeps atomic.
        max_message = _PIPE_BUF - _FRAME.size
        #: Bytes this reader skipped because they were not valid frames (written by
        #: something else than a carrier writer).
        discarded = 0

        _rfd = -1
        _wfd = -1
        _buf: bytearray | None = None

        def _setup(self, parts: urllib.parse.SplitResult, create: bool | None, deadline: Deadline) -> None:
            self._path = path = _fifo_path(parts)
            if self._creates(create):
                try:
                    os.mkfifo(path, 0o600)
                    self._owner = True
                    st = os.lstat(path)
                    self._ident = (st.st_dev, st.st_ino)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _raise_os(exc, f"mkfifo {path}") from exc
            if self.mode == "r":
                self._rfd = self._open_fifo(os.O_RDONLY | os.O_NONBLOCK)
                # our own write end: no EOF (and no busy POLLHUP) while no writer is there
                self._wfd = self._open_fifo(os.O_WRONLY | os.O_NONBLOCK)
                self._buf = bytearray()
                return
            backoff = Backoff(deadline, cap=_OPEN_POLL_CAP)
            while True:
                try:
                    self._wfd = self._open_fifo(os.O_WRONLY | os.O_NONBLOCK)
                    return
                except _NoReader:
                    if deadline.expired():
                        raise CarrierTimeout(
                            f"{self.url}: no reader opened the FIFO in {deadline.timeout:g} s"
                        ) from None
                    backoff.pause()

        def _open_fifo(self, flags: int) -> int:
            try:
                fd = os.open(self._path, flags)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    raise _NoReader from None
                raise _raise_os(exc, f"open {self._path}") from exc
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                raise CarrierInUse(f"{self._path} exists and is not a FIFO")
            return fd

        def _send(self, data: bytes, deadline: Deadline) -> None:
            frame = _frame(data)
            while True:
                try:
                    written = os.write(self._wfd, frame)
                except BlockingIOError:
                    pass
                except BrokenPipeError as exc:
                    raise self._give_up("the reader is gone") from exc
                except OSError as exc:
                    raise _raise_os(exc, f"write {self.url}") from exc
                else:
                    assert written == len(frame), "writes up to PIPE_BUF are atomic"
                    return
                if not wait_fd(self._wfd, write=True, timeout=deadline.remaining()):
                    raise full_or_timeout(deadline, f"send to {self.url}")

        def _take(self, *, dry: bool) -> bytes | None:
            """The next valid frame's payload from the buffer, or None if more is needed.

            ``dry``: the pipe had nothing more to read. A frame of ours is written
            atomically, so an incomplete one then is not ours and is skipped."""
            buf = self._buf
            assert buf is not None
            if len(buf) >= _FRAME.size:  # the usual case: a valid frame right at the start
                magic, size, crc = _FRAME.unpack_from(buf)
                end = _FRAME.size + size
                if magic == _MAGIC and size <= self.max_message and len(buf) >= end:
                    message = bytes(buf[_FRAME.size : end])
                    if zlib.crc32(message, _LENGTH_CRC[size]) == crc:
                        del buf[:end]
                        return message
            while True:
                start = buf.find(_MAGIC)
                if start < 0:  # keep a last byte that may begin a magic
                    keep = 1 if buf[-1:] == _MAGIC[:1] else 0
                    self._skip(len(buf) - keep)
                    if not dry or not keep:
                        return None
                    start = 0
                self._skip(start)
                if len(buf) < _FRAME.size:
                    if dry and buf:
                        self._skip(1)
                        continue
                    return None
                _, size, crc = _FRAME.unpack_from(buf)
                end = _FRAME.size + size
                if size > self.max_message or (dry and len(buf) < end):
                    self._skip(1)
                    continue
                if len(buf) < end:
                    return None
                message = bytes(buf[_FRAME.size : end])
                if zlib.crc32(message, _LENGTH_CRC[size]) != crc:
                    self._skip(1)
                    continue
                del buf[:end]
                return message

        def _skip(self, count: int) -> None:
            if count > 0:
                assert self._buf is not None
                del self._buf[:count]
                self.discarded += count

        def _recv(self, deadline: Deadline) -> bytes:
            assert self._buf is not None
            while True:
                message = self._take(dry=False)
                if message is not None:
                    return message
                try:
                    chunk = os.read(self._rfd, 1 << 16)
                except BlockingIOError:
                    chunk = b""
                except OSError as exc:
                    raise _raise_os(exc, f"read {self.url}") from exc
                if chunk:
                    self._buf += chunk
                    continue
                if self._buf:  # the pipe is dry: what is left cannot be the start of a frame
                    message = self._take(dry=True)
                    if message is not None:
                        return message
                if not wait_fd(self._rfd, write=False, timeout=deadline.remaining()):
                    raise CarrierTimeout(f"{self.url}: nothing received in {deadline.timeout:g} s")

        def _release(self) -> None:
            if self._rfd >= 0:
                os.close(self._rfd)
                self._rfd = -1
            if self._wfd >= 0:
                os.close(self._wfd)
                self._wfd = -1
            self._remove_file()

        @classmethod
        def unavailable_reason(cls) -> str | None:
            if not hasattr(os, "mkfifo"):
                return "os.mkfifo is not available on this platform"
            return None

    class _NoReader(Exception):
        """ENXIO: the FIFO exists but nobody has it open for reading."""
