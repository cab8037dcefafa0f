"""The token API: ``export_socket``, ``import_socket``, ``release``.

The portable form of PHP's ``socket_wsaprotocol_info_export/import/release`` and of
Python's Windows-only ``socket.share``/``socket.fromshare``::

    token = sockshare.export_socket(sock, target_pid)   # exporter
    sock = sockshare.import_socket(token)               # in process target_pid
    sockshare.release(token)                            # exporter withdraws it

A token is bound to its target process (on Linux to the process itself, by its start
time; elsewhere to its pid), single use, and expires (30 s by default). The exporter's
duplicate of the socket is closed when the token is imported, released or expires; an
import that fails for any reason leaves no descriptor open on either side, and takes at
most its ``timeout`` in all. The exchange behind an import is described in
``docs/protocol.md`` ("Tokens").
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time

from sockshare._errors import (
    ExporterBusy,
    ExporterGone,
    ExporterTimeout,
    ExportFailed,
    ImportFailed,
    InvalidToken,
    RemoteProtocolError,
    SockshareError,
    TokenConsumed,
    WrongProcess,
)
from sockshare.backends._agent import agent
from sockshare.backends._fds import checked_socket
from sockshare.backends._scm import FdsTruncated, close_fds, peer_credentials, recv_with_fds
from sockshare.protocol import (
    Claim,
    ErrorCode,
    FrameDecoder,
    FrameType,
    decode_error,
    decode_grant,
    decode_token,
    encode_claim,
    encode_done,
    encode_frame,
    error_to_exception,
)
from sockshare.protocol._token import ADDR_ABSTRACT, TokenInfo

__all__ = ["DEFAULT_TTL", "close_agent_connections", "export_socket", "import_socket", "release"]

#: Default token lifetime in seconds.
DEFAULT_TTL = 30.0

# Windows: WSASocket must never see the same WSAPROTOCOL_INFO twice in one process (the
# duplicated handle is consumed by the first import), so we remember what we imported.
_seen_lock = threading.Lock()
_seen: set[tuple[int, int]] = set()


def export_socket(
    sock: socket.socket | int, target_pid: int, *, ttl: float = DEFAULT_TTL
) -> str:
    """Export ``sock`` for the process ``target_pid``; return a printable ASCII token.

    The token may travel by any IPC (pipe, env var, file, queue, HTTP header). Only the
    process ``target_pid`` can import it, once, within ``ttl`` seconds. The caller keeps
    ``sock`` and may close it right away: the exporter holds its own duplicate until the
    token is imported, released or expired.

    On Linux the token is bound to the process that has pid ``target_pid`` now (its
    start time is recorded): should it exit, a process that later gets the same pid
    cannot import the token. Elsewhere the binding is to the pid number.

    Raises ``ValueError`` for a bad ``ttl`` or pid,
    :class:`~sockshare.LocalProtocolError` for a socket kind sockshare cannot move, and
    :class:`~sockshare.ExportFailed` (an ``OSError``, with its ``errno``) when the OS
    refuses: this process is out of file descriptors (``EMFILE``), ``sock`` is not a
    socket (``ENOTSOCK``), no process has pid ``target_pid`` (``ESRCH``).
    """
    try:
        if isinstance(sock, int):
            dup = os.dup(sock)
            try:
                probe = socket.socket(fileno=dup)
            except BaseException:  # not a socket (ENOTSOCK): do not leak the duplicate
                os.close(dup)
                raise
            try:
                return agent().export(probe, target_pid, ttl)
            finally:
                probe.close()
        if sock.fileno() < 0:
            raise ValueError("cannot export a closed socket")
        return agent().export(sock, target_pid, ttl)
    except OSError as exc:
        if isinstance(exc, SockshareError):
            raise
        raise _export_failed(exc, sock, target_pid) from exc


def _export_failed(exc: OSError, sock: socket.socket | int, target_pid: int) -> ExportFailed:
    err = exc.errno or 0
    if err in (errno.EMFILE, errno.ENFILE):
        what = (f"this process is out of file descriptors ({errno.errorcode[err]}): close "
                "some, or raise its limit (ulimit -n), then export again")
    elif err == errno.ESRCH:
        what = (f"no process has pid {target_pid}: a token is bound to a running process; "
                "export it once the target runs")
    elif err == errno.ENOTSOCK:
        what = f"descriptor {sock} is not a socket"
    elif err == errno.EBADF:
        what = f"descriptor {sock} is not open"
    else:
        what = exc.strerror or str(exc)
    return ExportFailed(err, f"cannot export the socket: {what}")


def release(token: str) -> bool:
    """Withdraw a token this process exported and nobody imported yet.

    Returns ``True`` if the token was pending (its duplicate is now closed), ``False``
    if it was already imported, expired, released, or was not exported by this process.
    Raises :class:`~sockshare.InvalidToken` if ``token`` is not a token at all.
    """
    return agent().release(decode_token(token))


def import_socket(
    token: str, *, blocking: bool = True, timeout: float = 5.0
) -> socket.socket:
    """Import the socket named by ``token``; the caller owns the returned socket.

    The socket is non-inheritable. It is put in blocking mode (``blocking=True``,
    ``gettimeout() is None``) or non-blocking mode explicitly; the O_NONBLOCK flag lives
    on the open file description, so this also changes it for any copy the exporter
    still holds. ``timeout`` (seconds) is one deadline for the whole import: connecting,
    claiming and receiving, however the exporter dribbles its answer.

    Raises :class:`~sockshare.InvalidToken`, :class:`~sockshare.WrongProcess`,
    :class:`~sockshare.TokenConsumed`, :class:`~sockshare.TokenExpired`,
    :class:`~sockshare.ExporterGone` (the exporter exited),
    :class:`~sockshare.ExporterTimeout` (alive, but no answer within ``timeout``; also a
    ``TimeoutError``) or :class:`~sockshare.ExporterBusy` (alive, but it cannot serve
    now, e.g. out of file descriptors) or :class:`~sockshare.ImportFailed` (this process
    is out of file descriptors: the token is not consumed), all subclasses of
    ``SockshareError``.
    """
    deadline = time.monotonic() + timeout
    info = decode_token(token)
    if sys.platform == "win32" and not info.is_windows:
        raise InvalidToken(
            "this is a POSIX token (made on Linux/macOS, for SCM_RIGHTS over a UNIX socket): "
            "it cannot be imported on Windows; export the socket from a Windows process"
        )
    if info.target_pid != os.getpid():
        raise WrongProcess(
            f"this token was exported for pid {info.target_pid}; this process is "
            f"pid {os.getpid()}: export it again for this process"
        )
    if info.is_windows:
        sock = _import_windows(info, deadline, timeout)
    else:
        sock = _import_posix(info, deadline, timeout)
    sock.setblocking(blocking)
    return sock


# --- POSIX ----------------------------------------------------------------------


def _left(deadline: float) -> float:
    """Seconds left until ``deadline``; ``TimeoutError`` once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the import's deadline passed")
    return left


def _timed_out(info: TokenInfo, timeout: float) -> ExporterGone:
    """The error for an import that ran out of time: the exporter exited, or it is
    alive and its agent did not answer (stopped, overloaded, out of descriptors)."""
    if not _pid_alive(info.exporter_pid):
        return _gone(info)
    return ExporterTimeout(
        f"the exporting process (pid {info.exporter_pid}) is alive, but its export agent "
        f"did not complete the import within the {timeout} s timeout: it may be stopped, "
        "overloaded or out of file descriptors (check that process); the token stays "
        "valid until it expires: import again, or with a longer timeout"
    )


#: errnos that say this process (or the system) is out of descriptors
_NO_FDS = frozenset({errno.EMFILE, errno.ENFILE})


def _out_of_fds(code: int, what: str) -> ImportFailed:
    return ImportFailed(code, f"this process is out of file descriptors ({what}); the token "
                              "was not consumed: free descriptors and import again")


def _connect_agent(info: TokenInfo, deadline: float, timeout: float) -> socket.socket:
    try:
        if info.is_windows:
            ch = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr: str | bytes | tuple[str, int] = ("127.0.0.1", info.agent_port)
        else:
            ch = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = b"\0" + info.address if info.address_kind == ADDR_ABSTRACT else info.address
    except OSError as exc:
        if exc.errno in _NO_FDS:
            raise _out_of_fds(exc.errno, "no socket for the exporter's agent") from exc
        raise
    pause = 0.001
    try:
        while True:
            ch.settimeout(_left(deadline))
            try:
                ch.connect(addr)
                return ch
            except BlockingIOError:
                # EAGAIN: a UNIX listener's backlog is full (the agent is not accepting
                # right now): try again until the deadline
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 0.05)
    except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as exc:
        ch.close()
        raise _gone(info) from exc
    except TimeoutError as exc:
        ch.close()
        raise _timed_out(info, timeout) from exc
    except OSError as exc:  # an unusable address (path too long)...
        ch.close()
        raise ExporterGone(f"cannot reach the export agent of pid {info.exporter_pid}: {exc}") from exc
    except BaseException:
        ch.close()
        raise


def _gone(info: TokenInfo) -> ExporterGone:
    if _pid_alive(info.exporter_pid):
        return ExporterGone(
            f"the export agent of pid {info.exporter_pid} is not reachable: that process "
            "exec'd or is no longer the exporter; export the socket again"
        )
    return ExporterGone(
        f"the exporting process (pid {info.exporter_pid}) has exited, and the socket "
        "with it: export it again from a live process"
    )


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        import _winapi

        try:  # PROCESS_QUERY_LIMITED_INFORMATION
            handle = _winapi.OpenProcess(0x1000, False, pid)
        except PermissionError:
            return True  # it exists, but is not ours to query
        except OSError:
            return False  # ERROR_INVALID_PARAMETER: no such process
        try:
            return bool(_winapi.GetExitCodeProcess(handle) == _winapi.STILL_ACTIVE)
        finally:
            _winapi.CloseHandle(handle)
    if not 0 < pid < 2**31:  # a token field is 32 bits; os.kill(0) means our own group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


class _Stale(ExporterGone):
    """A pooled connection the agent had already closed: retry on a fresh one."""


def _exchange(ch: socket.socket, info: TokenInfo, deadline: float,
              timeout: float) -> tuple[socket.socket | None, SockshareError | None]:
    """Send CLAIM; return the granted socket (None on Windows), or the refusal the agent
    answered with (an ERROR frame: the connection is still good for another claim,
    unless the agent refused the connection itself). Every wait ends by ``deadline``."""
    decoder = FrameDecoder(max_payload=8192, allow_fds=not info.is_windows)
    got_any = False
    try:
        try:
            ch.settimeout(_left(deadline))
            ch.sendall(encode_frame(FrameType.CLAIM, encode_claim(
                Claim(info.token_id, info.secret, os.getpid()))))
        except (ConnectionResetError, BrokenPipeError):
            # The agent closed the connection: an idle one it dropped (end of file
            # below), or a new one it refused at once (its ERROR frame waits below).
            pass
        while True:
            ch.settimeout(_left(deadline))
            if info.is_windows:
                data, fds = ch.recv(8192), list[int]()
            else:
                try:
                    data, fds = recv_with_fds(ch, 8192)
                except FdsTruncated as exc:   # (the GRANT's socket: never ours)
                    raise _out_of_fds(errno.EMFILE, "the kernel dropped the granted "
                                                    "socket") from exc
            if not data and not fds:
                if not got_any:
                    raise _Stale("the export agent hung up before answering")
                decoder.end_of_stream()
                raise ExporterGone("the export agent hung up before answering")
            got_any = True
            decoder.feed(data, fds)
            frame = decoder.next_frame()
            if frame is None:
                continue
            if frame.type == FrameType.ERROR:
                close_fds(frame.fds)
                if decoder.buffered:
                    raise RemoteProtocolError("the export agent sent more than one answer")
                err = decode_error(frame.payload)
                if err.code in (ErrorCode.LIMIT, ErrorCode.INTERNAL):
                    # out of descriptors, too many connections: it is alive, try later
                    return None, ExporterBusy(err.text or f"the export agent of pid "
                                              f"{info.exporter_pid} cannot serve imports now")
                return None, error_to_exception(err)
            if frame.type != FrameType.GRANT or len(frame.fds) != (0 if info.is_windows else 1):
                close_fds(frame.fds)
                raise RemoteProtocolError(f"the export agent answered {frame.type.name} "
                                          f"with {len(frame.fds)} fds")
            try:
                grant = decode_grant(frame.payload)
                if grant.token_id != info.token_id:
                    raise RemoteProtocolError("the export agent granted another token")
                if info.is_windows:
                    return None, None
                return checked_socket(frame.fds[0], grant.kind, None, "the granted socket"), None
            except BaseException:
                close_fds(frame.fds)
                raise
    except TimeoutError as exc:
        raise _timed_out(info, timeout) from exc
    except ConnectionResetError as exc:
        if not got_any:
            raise _Stale("the export agent closed the connection") from exc
        raise ExporterGone("the export agent hung up before answering") from exc
    finally:
        close_fds(decoder.take_fds())


# One pooled connection per export agent (at most a few, when imports run in parallel
# threads), so that an import is one CLAIM/GRANT/DONE exchange on an open connection.
_pool_lock = threading.Lock()
_pool: dict[tuple[int, bytes], list[socket.socket]] = {}
_POOL_PER_AGENT = 4
_POOL_AGENTS = 16


def _checkout(key: tuple[int, bytes]) -> socket.socket | None:
    with _pool_lock:
        conns = _pool.get(key)
        if not conns:
            return None
        ch = conns.pop()
        if not conns:
            del _pool[key]
        return ch


def _checkin(key: tuple[int, bytes], ch: socket.socket) -> None:
    with _pool_lock:
        if key not in _pool and len(_pool) >= _POOL_AGENTS:
            for old in _pool.pop(next(iter(_pool))):
                old.close()
        conns = _pool.setdefault(key, [])
        if len(conns) < _POOL_PER_AGENT:
            conns.append(ch)
            return
    ch.close()


def close_agent_connections() -> int:
    """Close the connections this process keeps open to other processes' export agents
    (one per agent, reused by later imports). Returns how many were closed."""
    with _pool_lock:
        conns = [c for cs in _pool.values() for c in cs]
        _pool.clear()
    for c in conns:
        c.close()
    return len(conns)


def _forget_pool_in_child() -> None:
    global _pool_lock
    _pool_lock = threading.Lock()
    for cs in _pool.values():  # the child's copies; the parent's stay open
        for c in cs:
            c.close()
    _pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _import_posix(info: TokenInfo, deadline: float, timeout: float) -> socket.socket:
    key = (info.exporter_pid, info.address)
    for _attempt in range(2):
        ch = _checkout(key)
        reused = ch is not None
        if ch is None:
            ch = _connect_agent(info, deadline, timeout)
            try:
                if sys.platform.startswith("linux") or sys.platform == "darwin":
                    pid, _uid, _gid = peer_credentials(ch)
                    if pid and pid != info.exporter_pid:
                        raise ExporterGone(
                            f"the token's agent address is held by pid {pid}, not by the "
                            f"exporter (pid {info.exporter_pid}): refusing to talk to it"
                        )
            except BaseException:
                ch.close()
                raise
        try:
            sock, refusal = _exchange(ch, info, deadline, timeout)
        except _Stale:
            ch.close()
            if reused:
                continue  # the agent had closed our idle connection: one fresh try
            raise
        except (OSError, ValueError) as exc:
            ch.close()
            if isinstance(exc, SockshareError):
                raise
            raise ExporterGone(f"the exchange with the export agent failed: {exc}") from exc
        except BaseException:
            ch.close()
            raise
        if refusal is not None:
            _checkin(key, ch)
            raise refusal
        assert sock is not None
        try:  # DONE is 20 bytes on a connection that reads: never blocks in practice
            ch.settimeout(max(deadline - time.monotonic(), 0.5))
            ch.sendall(encode_frame(FrameType.DONE, encode_done(info.token_id)))
        except OSError:
            ch.close()  # the agent closes its copy on hang-up too; we own the socket
        else:
            _checkin(key, ch)
        return sock
    raise ExporterGone(f"the export agent of pid {info.exporter_pid} keeps closing connections")


# --- Windows --------------------------------------------------------------------


def _import_windows(info: TokenInfo, deadline: float, timeout: float) -> socket.socket:
    if sys.platform != "win32":
        raise InvalidToken(
            "this token carries a Windows WSAPROTOCOL_INFO blob: only the Windows "
            "process it was exported for can import it"
        )
    key = (info.exporter_pid, info.token_id)
    with _seen_lock:
        if key in _seen:
            raise TokenConsumed(
                "this process already presented this token (imported or refused); tokens are "
                "single use: export again"
            )
        _seen.add(key)
    # Take ownership of the handle the OS already duplicated into this process first, so
    # that every refusal below can close it instead of leaking it. (fromshare() twice on
    # one blob returns the same handle twice: hence the set above.)
    try:
        sock = socket.fromshare(info.blob)
    except OSError as exc:
        raise InvalidToken(f"Windows refused the WSAPROTOCOL_INFO blob: {exc}") from exc
    try:
        if not _pid_alive(info.exporter_pid):
            # Fail fast: Windows retries a refused loopback connect for about 2 s, and a
            # dead exporter's port may belong to another program by now.
            raise _gone(info)
        ch = _connect_agent(info, deadline, timeout)
        try:
            _sock, refusal = _exchange(ch, info, deadline, timeout)
            if refusal is not None:
                raise refusal
            try:
                ch.settimeout(max(deadline - time.monotonic(), 0.5))
                ch.sendall(encode_frame(FrameType.DONE, encode_done(info.token_id)))
            except OSError:
                pass
        finally:
            ch.close()
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError) and not isinstance(exc, SockshareError):
            # e.g. WSAECONNABORTED when the exporter dies in the middle of the exchange
            raise ExporterGone(f"the exchange with the export agent failed: {exc}") from exc
        raise
    return sock

