"""The control socket: how ``sockshare status`` talks to a running dispatcher.

A UNIX stream socket, mode 0600: ``$XDG_RUNTIME_DIR/sockshare/<pid>.ctl``, else
``/tmp/sockshare-<uid>/<pid>.ctl`` (a directory of mode 0700 owned by the server's uid,
where the dispatcher's handoff channel ``<pid>.chan`` lives too), or ``--control PATH``
(its directory is created 0700 if missing; an existing one is never chmod'ed, and is
refused when another user could replace the socket in it: :func:`check_socket_dir`).

The protocol is newline-delimited JSON, one request per line, one response per line::

    -> {"cmd": "status"}
    <- {"ok": true, "status": {...}}
    -> {"cmd": "reload", "wait": true}
    <- {"ok": true, "generation": 2}
    -> {"cmd": "nope"}
    <- {"ok": false, "error": "unknown command 'nope' (known: ping, status, ...)"}

Commands: ``status``, ``ping``, ``reload``, ``upgrade``, ``migrate``, ``health``, ``stop``,
``peers`` (docs/server.md), ``takeover``, which only the dispatcher that an ``upgrade``
started may send, and ``listeners`` (Windows: the same, for its listening sockets).

Whatever a client sends cannot disturb the dispatcher: a line that is not JSON, not an
object, not UTF-8, or names no known command gets an error response; a line longer than
64 KiB, more than 16 bad lines, or 60 s of silence close the connection; at most 32
clients are served at once. The handler runs on the dispatcher's event loop; it may be a
coroutine function (``reload`` and ``upgrade`` can wait for their outcome), and it never
raises: an exception inside it becomes an error response.

On an upgrade the new dispatcher binds its control socket beside the old one's path and
:meth:`ControlServer.move` renames it over that path once it has taken over; a server
only ever removes the socket file it created itself (checked by inode), so the old
dispatcher's exit does not remove the new one's socket.

:func:`request` is the (blocking) client side used by ``sockshare status``.

On Windows (no UNIX sockets to speak of, no file modes) the server listens on loopback
TCP instead, on a port the system picks, and ``<pid>.ctl`` is a *file* holding
``{"pid": ..., "port": ..., "secret": ...}``: 32 random bytes, written once, in
``%LOCALAPPDATA%\\sockshare``, whose ACL (inherited from the user's profile) lets only
that user, SYSTEM and the Administrators read it. Every request carries the secret
(``"auth"``); one without it, or with a wrong one, is answered ``not authenticated``
and the connection is closed, before the command is even looked at
(docs/windows.md, "serve on Windows").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import os
import secrets
import shlex
import socket
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from sockshare._errors import SockshareError

__all__ = [
    "ControlError",
    "ControlServer",
    "check_socket_dir",
    "default_path",
    "describe_server",
    "find_servers",
    "request",
    "runtime_dir",
]

log = logging.getLogger("sockshare.server.control")

MAX_LINE = 64 * 1024
MAX_BAD = 16
IDLE_TIMEOUT = 60.0
MAX_CLIENTS = 32

Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]

#: control over loopback TCP with a secret in the ``.ctl`` file (see the module's docstring)
TCP_CONTROL = sys.platform == "win32"
#: the answer to a request without the right secret (the connection is then closed)
REFUSED: dict[str, Any] = {"ok": False, "error": "not authenticated: a request must carry the "
                                                 "secret of the server's control file"}


class ControlError(SockshareError):
    """The control socket cannot be created, found or used."""


def runtime_dir() -> str:
    """sockshare's private per-user directory for control and channel sockets.

    ``$XDG_RUNTIME_DIR/sockshare``, else ``<tmp>/sockshare-<uid>``; created with mode
    0700. Refuses one that is a symlink or belongs to another uid; one of ours that is
    open to group or others (someone loosened it) is set back to 0700: this directory
    is sockshare's own, named after it, never one the user chose.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if TCP_CONTROL:
        base = os.environ.get("LOCALAPPDATA") or tempfile.gettempdir()
        path = os.path.join(base, "sockshare")
        os.makedirs(path, exist_ok=True)   # (the profile's ACL: see the module's docstring)
        return path
    if xdg and os.path.isdir(xdg):
        path = os.path.join(xdg, "sockshare")
    else:
        path = os.path.join(tempfile.gettempdir(), f"sockshare-{os.getuid()}")
    ensure_private_dir(path)
    return path


def ensure_private_dir(path: str) -> None:
    """Create or check sockshare's own directory ``path`` (see :func:`runtime_dir`)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path!r} is not a directory (a symlink?): refusing to use it")
    if st.st_uid != os.getuid():
        raise ControlError(f"{path!r} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def check_socket_dir(path: str) -> None:
    """The directory that will hold a control socket given with ``--control``.

    A missing directory is created with mode 0700 (its parent must exist). An existing
    one is used as it is -- its mode is never changed, it may be shared, like ``/tmp``
    or ``/run`` -- but only if nobody else can replace the socket in it: it must be a
    directory owned by us or by root, and not writable by every user unless it has the
    sticky bit (which lets only a file's owner remove or rename it). Otherwise
    :class:`ControlError` says why. The socket itself is always mode 0600.
    """
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot create the control socket's directory {path!r}: "
                           f"{exc.strerror or exc}") from exc
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ControlError(f"cannot use {path!r} for the control socket: {exc.strerror or exc}") from exc
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path!r} is not a directory: cannot put the control socket in it")
    if st.st_uid not in (os.getuid(), 0):
        raise ControlError(
            f"{path!r} belongs to uid {st.st_uid}, neither to us ({os.getuid()}) nor to "
            "root: its owner could replace the control socket; give --control a path in a "
            "directory of yours")
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise ControlError(
            f"{path!r} (mode {mode:04o}) is writable by every user and has no sticky bit: "
            "anyone could replace the control socket; give --control a path in a private "
            "directory (or one with the sticky bit, like /tmp)")


def default_path(pid: int | None = None) -> str:
    return os.path.join(runtime_dir(), f"{pid or os.getpid()}.ctl")


def read_control_file(path: str) -> tuple[int, int, str]:
    """(Windows) ``(pid, port, secret)`` from a control file, or :class:`ControlError`."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        pid, port, secret = obj["pid"], obj["port"], obj["secret"]
    except FileNotFoundError as exc:
        raise ControlError(f"no sockshare server answers at {path!r}: {exc}") from exc
    except PermissionError as exc:
        raise ControlError(f"not allowed to read {path!r} (another user's server?)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"{path!r} is not a sockshare control file: {exc}") from exc
    if not (isinstance(pid, int) and isinstance(port, int) and isinstance(secret, str)):
        raise ControlError(f"{path!r} is not a sockshare control file")
    return pid, port, secret


def _connect(path: str, timeout: float) -> tuple[socket.socket, str]:
    """A connected control socket and the secret to send (``""``: a UNIX socket)."""
    if TCP_CONTROL:
        _pid, port, secret = read_control_file(path)
        return socket.create_connection(("127.0.0.1", port), timeout=timeout), secret
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s, ""


def _probe(path: str) -> str:
    """``"listening"``, ``"refused"`` (a socket file nobody listens on) or ``"unknown"``."""
    try:
        probe, _secret = _connect(path, 1.0)
    except ConnectionRefusedError:
        return "refused"
    except (OSError, ControlError):
        return "unknown"   # gone already, not a socket, not ours, too slow
    probe.close()
    return "listening"


def find_servers(directory: str | None = None) -> list[str]:
    """Control sockets in ``directory`` (default: :func:`runtime_dir`) that a live
    dispatcher listens on.

    A ``<pid>.ctl`` whose process is gone, or whose pid now belongs to a process that
    does not listen on it (the pid was reused), is left by a server that was killed
    (SIGKILL, a crash): it is removed. Sockets of processes we may not signal (another
    user's) are listed as they are.
    """
    try:
        d = directory or runtime_dir()
        names = os.listdir(d)
    except (OSError, ControlError):
        return []
    out = []
    for name in sorted(names, key=lambda n: (len(n), n)):
        stem, ext = os.path.splitext(name)
        if ext != ".ctl" or not stem.isdigit():
            continue
        path = os.path.join(d, name)
        if TCP_CONTROL:
            from sockshare.server._platform import pid_alive

            if pid_alive(int(stem)):
                out.append(path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    log.info("removed %s: the server that made it is gone", path)
            continue
        try:
            os.kill(int(stem), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            out.append(path)
            continue
        state = _probe(path)
        if state == "listening" or (alive and state == "unknown"):
            out.append(path)
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
                log.info("removed %s: the server that made it is gone", path)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return shlex.join(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0"))


def describe_server(path: str, *, timeout: float = 2.0) -> str:
    """One server for a list a user picks from: pid, command line, listeners, and the
    ``--control`` that names it."""
    stem = os.path.splitext(os.path.basename(path))[0]
    pid, cmd, listening, note = stem, "", "", ""
    try:
        resp = request(path, {"cmd": "status"}, timeout=timeout)
        st = resp.get("status") if resp.get("ok") else None
    except (ControlError, OSError, ValueError) as exc:
        st, note = None, f" (did not answer: {exc})"
    if isinstance(st, dict):
        pid = str(st.get("pid", pid))
        argv = st.get("argv")
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            cmd = shlex.join(argv)
        listening = ", ".join(f"{lst.get('name')}={lst.get('address')}"
                              for lst in st.get("listeners") or [] if isinstance(lst, dict))
        if st.get("successor") and not st.get("handed_over"):
            note = f" (upgrading: pid {st['successor']} is taking over)"
        elif st.get("predecessor") and not st.get("ready", True):
            note = f" (taking over from pid {st['predecessor']})"
    if not cmd and pid.isdigit():
        cmd = _cmdline(int(pid))
    if len(cmd) > 200:
        cmd = cmd[:197] + "..."
    return (f"pid {pid}{note}: {cmd or '?'}\n      listening: {listening or '?'}\n"
            f"      --control {path}")


class ControlServer:
    """Serves ``handler(request) -> response`` on a private UNIX socket (Windows:
    loopback TCP, with the secret in the file at ``path``)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._inode = 0
        #: (Windows) what every request must carry as "auth"
        self._secret = ""
        self.port = 0

    async def start(self) -> None:
        if TCP_CONTROL:
            await self._start_tcp()
            return
        check_socket_dir(os.path.dirname(os.path.abspath(self.path)))
        from sockshare._channel import _remove_stale_socket

        try:
            _remove_stale_socket(self.path)
        except SockshareError as exc:
            raise ControlError(str(exc)) from exc
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino

    async def _start_tcp(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        self._secret = secrets.token_hex(32)
        text = json.dumps({"pid": os.getpid(), "port": self.port, "secret": self._secret})
        tmp = f"{self.path}.{os.getpid()}.tmp"
        # O_EXCL: a file someone put there first is not ours to write our secret into
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.path)
        self._inode = os.stat(self.path).st_ino

    def _authorized(self, req: dict[str, Any]) -> bool:
        if not self._secret:
            return True   # a UNIX socket: its mode (0600) is the check
        given = req.pop("auth", None)
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self._secret.encode())

    def move(self, path: str) -> None:
        """Rename the socket file to ``path`` (atomically replacing what is there)."""
        os.replace(self.path, path)
        self.path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._clients):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:   # never another server's socket
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            writer.write(_line({"ok": False, "error": "too many control clients"}))
            writer.close()
            return
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bad = 0
        while bad < MAX_BAD:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():  # a last request without its newline
                    writer.write(_line(await self._answer(exc.partial)))
                    await writer.drain()
                return
            except asyncio.LimitOverrunError:
                writer.write(_line({"ok": False, "error": f"request longer than {MAX_LINE} bytes"}))
                await writer.drain()
                return
            except TimeoutError:
                return
            if not raw.strip():
                continue
            response = await self._answer(raw)
            if response is REFUSED:
                writer.write(_line(response))
                await writer.drain()
                return
            if not response.get("ok"):
                bad += 1
            writer.write(_line(response))
            await writer.drain()
        writer.write(_line({"ok": False, "error": "too many bad requests; closing"}))

    async def _answer(self, raw: bytes) -> dict[str, Any]:
        try:
            req = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return {"ok": False, "error": f"not a JSON line: {exc}"}
        if self._secret and not (isinstance(req, dict) and self._authorized(req)):
            return REFUSED
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        try:
            out = self._handler(req)
            if inspect.isawaitable(out):
                out = await out
            return out
        except Exception as exc:
            log.exception("control command %r failed", req.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def request(path: str, req: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a control socket and return the decoded response."""
    try:
        s, secret = _connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"no sockshare server answers at {path!r}: {exc}") from exc
    except PermissionError as exc:
        raise ControlError(f"not allowed to open {path!r} (another user's server?)") from exc
    except TimeoutError as exc:
        raise ControlError(f"the server at {path!r} did not answer within {timeout} s") from exc
    if secret:
        req = {**req, "auth": secret}
    try:
        s.sendall(_line(req))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    except TimeoutError as exc:
        raise ControlError(f"the server at {path!r} did not answer within {timeout} s") from exc
    finally:
        s.close()
    if not buf:
        raise ControlError(f"the server at {path!r} closed the connection without answering")
    try:
        out = json.loads(buf)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"the server at {path!r} answered something that is not JSON: {exc}") from None
    if not isinstance(out, dict):
        raise ControlError(f"unexpected answer from {path!r}: {buf[:200]!r}")
    return out
