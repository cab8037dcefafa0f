"""The export agent: the exporting side of a token, one per process.

``export_socket`` registers a duplicate of the socket here under a random 64-bit id and
a 128-bit secret, and returns a token naming this agent. The agent is a daemon thread
started by the first export. It listens on

* POSIX: a UNIX stream socket, in the Linux abstract namespace (``\\0sockshare/<pid>/<random>``)
  or, elsewhere, as ``agent.sock`` in a private 0700 directory;
* Windows: a loopback TCP port (the socket itself travels inside the token as a
  ``WSAPROTOCOL_INFOW`` blob, already duplicated for the target pid by the OS).

An importer connects, sends a CLAIM frame (id, secret, its pid) and gets back either a
GRANT (with the descriptor attached by SCM_RIGHTS on POSIX) or an ERROR frame whose code
says why not. On POSIX the agent checks the peer's kernel-reported credentials
(``SO_PEERCRED``) as soon as it accepts: a peer that runs as another uid than the
exporter's (root excepted) gets a WRONG_PROCESS error and is closed at once, unread. At
CLAIM the peer's pid must be the token's target, and on Linux the very process the token
was exported for: its start time (``/proc/<pid>/stat``), taken at export, must match the
claimer's, read through ``SO_PEERPIDFD`` where the kernel has it (a pid reused by another
process after the target exited does not match). After a GRANT the
importer answers DONE and the agent closes its duplicate; if the importer hangs up
instead (it timed out, or died), the token is given back: it can be imported again
until it expires, unless it was released meanwhile. (An importer that hung up before its
CLAIM was served never takes the token at all: the GRANT is sent under the registry's lock,
before the token leaves the pending set, and cannot be.) The connection then stays open for the
importer's next CLAIM (importers pool one connection per agent: no connect, accept or
credential check per import), for at most ``IDLE_DEADLINE`` seconds. Expired and released entries are closed
by the agent's sweep. A bounded memory of finished ids (tombstones) lets the agent say
"consumed", "expired" or "released" rather than "unknown".

Nothing a peer does can make the agent hold more than a bounded number of descriptors:
it reads with no room for ancillary data, so descriptors an importer attaches (none is
expected) are discarded by the kernel and never enter this process; connections are
bounded per peer uid and in total (``_conn_limits``), the oldest silent or idle one
making room for a new one; and one descriptor is kept in reserve, so that at EMFILE the
agent can still accept and tell the importer "out of file descriptors" (an ERROR
``LIMIT``) rather than leave it waiting. Its log lines are rate-limited: at most one a
second of each kind, with a count of the ones left out.

``os.fork()``: the child inherits the registry but not the thread. An at-fork hook
closes the child's copies of every descriptor the agent held and starts afresh; tokens
made before the fork keep naming the parent's agent. Every duplicate is made and closed
under the registry's lock, which ``fork()`` takes first: no child inherits a duplicate
in transit between two states (tests/test_tokens.py forks during an export storm).
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from sockshare._errors import SockshareError
from sockshare.backends import _pidfd
from sockshare.backends._scm import close_fds, peer_credentials, send_with_fds
from sockshare.protocol import (
    Claim,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Grant,
    SocketKind,
    decode_claim,
    decode_done,
    encode_error,
    encode_frame,
    encode_grant,
)
from sockshare.protocol._token import (
    ADDR_ABSTRACT,
    ADDR_PATH,
    KIND_POSIX,
    KIND_WINDOWS,
    TokenInfo,
    encode_token,
)

__all__ = ["ExportAgent", "agent"]

log = logging.getLogger("sockshare.agent")

IS_WINDOWS = sys.platform == "win32"
#: How long an importer may take between connecting and finishing the exchange.
CONN_DEADLINE = 10.0
#: How long an importer's connection may wait, idle, for its next CLAIM.
IDLE_DEADLINE = 30.0
#: At most this many idle importer connections are kept.
MAX_IDLE = 64
#: How many finished token ids the agent remembers, to give precise refusals.
TOMBSTONES = 16384
#: Upper bound of a token lifetime; None-expiry tokens are not offered.
MAX_TTL = 7 * 24 * 3600.0
#: At most this many importer connections at once (fewer under a low ``ulimit -n``: a
#: quarter of it), and half of that from any one uid.
MAX_CONNS = 256
#: After a failed accept (EMFILE with no reserve left, ENOBUFS...), the listener rests.
ACCEPT_PAUSE = 0.1
#: One log line a second of each kind, at most.
LOG_INTERVAL = 1.0
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))


@dataclass(slots=True)
class _Entry:
    token_id: int
    secret: bytes
    target_pid: int
    fd: int  # the agent's duplicate (POSIX); -1 on Windows
    kind: SocketKind
    deadline: float  # time.monotonic()
    # the target process (Linux): its pidfs inode (exact) and start time (to the tick);
    # None, None: bound to its pid number only
    ino: int | None = None
    start: int | None = None
    released: bool = False  # release() came while a GRANT of it was in flight


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    fd: int  # sock.fileno(), kept: a closed socket says -1
    deadline: float
    since: float  # when it was accepted or last became idle
    decoder: FrameDecoder = field(
        default_factory=lambda: FrameDecoder(max_payload=256, allow_fds=False))
    granted: _Entry | None = None
    peer: tuple[int, int] = (0, 0)  # pid, uid
    idle: bool = False
    silent: bool = True  # no complete frame received yet
    #: the connecting process's pidfs inode and start time, once read (at its CLAIM)
    identity: tuple[int | None, int | None] | None = None


class _Log:
    """The agent's logger, at most one line a second of each kind: a peer that provokes
    a line per connection cannot flood the exporter's log."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str, *args: object) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            msg += f" (and {dropped} more like it since the last such line)"
        log.log(level, msg, *args)


def _conn_limits() -> tuple[int, int]:
    """(connections in total, connections per peer uid) the agent accepts at once."""
    total = MAX_CONNS
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            total = max(8, min(total, soft // 4))
    except (ImportError, OSError, ValueError):
        pass
    return total, max(4, total // 2)


class ExportAgent:
    """The per-process registry of exported sockets and the thread that serves them."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # RLock: a fork from a signal handler inside it proceeds
        self._entries: dict[int, _Entry] = {}
        #: granted, DONE not received yet: back to _entries if the importer hangs up
        self._inflight: dict[int, _Entry] = {}
        self._tombs: OrderedDict[int, ErrorCode] = OrderedDict()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._limits = (MAX_CONNS, MAX_CONNS // 2)
        self._reserve = -1  # a spare descriptor, given up to accept at EMFILE
        self._paused_until: float | None = None  # accepts resume then (monotonic)
        self._log = _Log()
        self._thread: threading.Thread | None = None
        self._dir: str | None = None
        self._address: bytes = b""
        self._address_kind = ADDR_ABSTRACT
        self._port = 0
        self._pid = os.getpid()
        self._uid = os.getuid() if hasattr(os, "getuid") else 0
        self._stopping = False
        self._sel: selectors.BaseSelector | None = None
        # When the agent's select() returns at the latest (monotonic; None: never), as
        # of its last sweep. export() wakes the thread only for an earlier deadline.
        self._next_sweep: float | None = None

    # -- public, called from any thread of the exporting process --------------------

    def export(self, sock: socket.socket, target_pid: int, ttl: float) -> str:
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be > 0 and at most {MAX_TTL:.0f} seconds, not {ttl!r}")
        if not 0 < target_pid < 2**32:
            raise ValueError(f"target_pid must be a process id, not {target_pid!r}")
        kind = SocketKind.of(sock)
        kind.pack()  # raises LocalProtocolError for families/types we cannot move
        if not IS_WINDOWS and not (_PROC_IDENTITY and _pidfd.proc_is_ours()):
            _check_pid_exists(target_pid)  # (with /proc of ours, the identity check does)
        self._ensure_running()
        token_id = secrets.randbits(64)
        secret = secrets.token_bytes(16)
        expires_ms = int((time.time() + ttl) * 1000)
        deadline = time.monotonic() + ttl
        if sys.platform == "win32":
            blob = sock.share(target_pid)
            entry = _Entry(token_id, secret, target_pid, -1, kind, deadline)
            info = TokenInfo(KIND_WINDOWS, self._pid, target_pid, token_id, secret, expires_ms,
                             agent_port=self._port, blob=blob)
        else:
            entry = _Entry(token_id, secret, target_pid, -1, kind, deadline)
            info = TokenInfo(KIND_POSIX, self._pid, target_pid, token_id, secret, expires_ms,
                             exporter_uid=_euid(), address=self._address,
                             address_kind=self._address_kind)
        with self._lock:
            if _PROC_IDENTITY and _pidfd.proc_is_ours():
                # Linux: bind the token to the target process itself, not to its pid
                # number (raises ProcessLookupError if there is none). Under the lock:
                # no forked child inherits the pidfd opened meanwhile.
                entry.ino = _pidfd.process_inode(target_pid)
                if entry.ino is None:  # Linux < 6.9: to the clock tick
                    entry.start = _pidfd.start_time(target_pid)
            if sys.platform != "win32":
                # duplicated under the lock, which os.fork() takes too: a child never
                # inherits a duplicate that no registry of ours lists
                entry.fd = os.dup(sock.fileno())  # non-inheritable since PEP 446
            self._entries[token_id] = entry
            wake = self._next_sweep is None or deadline < self._next_sweep
        if wake:  # otherwise the sweep already planned will see it in time
            self._wake()
        return encode_token(info)

    def release(self, info: TokenInfo) -> bool:
        """Withdraw an unused token of ours. True if it was still waiting for import."""
        if info.exporter_pid != self._pid:
            return False
        with self._lock:
            entry = self._entries.get(info.token_id)
            if entry is None:
                flying = self._inflight.get(info.token_id)
                if flying is not None and hmac.compare_digest(flying.secret, info.secret):
                    flying.released = True  # not given back if that import fails
                return False
            if not hmac.compare_digest(entry.secret, info.secret):
                return False
            del self._entries[info.token_id]
            self._tomb(info.token_id, ErrorCode.RELEASED)
            if entry.fd >= 0:
                close_fds([entry.fd])
        return True

    def pending(self) -> int:
        """How many exported sockets wait for import (their duplicates are open)."""
        with self._lock:
            return len(self._entries)

    # -- lifecycle -------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            try:
                self._open_listener()
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
                if not IS_WINDOWS:
                    self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                self._limits = _conn_limits()
                self._thread = threading.Thread(
                    target=self._run, name=f"sockshare-export-agent-{self._pid}", daemon=True
                )
                self._thread.start()
            except BaseException:  # EMFILE halfway: leave nothing open, try afresh next time
                self._close_own()
                self._thread = None
                raise

    def _close_own(self) -> None:
        """Close the agent's own descriptors (listener, wake pair, reserve)."""
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        if self._reserve >= 0:
            close_fds([self._reserve])
            self._reserve = -1
        if self._dir is not None:
            for rm, path in ((os.unlink, os.path.join(self._dir, "agent.sock")),
                             (os.rmdir, self._dir)):
                try:
                    rm(path)
                except OSError:
                    pass
            self._dir = None

    def _open_listener(self) -> None:
        if IS_WINDOWS:
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener = lst
            lst.bind(("127.0.0.1", 0))
            self._port = lst.getsockname()[1]
        else:
            lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener = lst
            if sys.platform.startswith("linux"):
                name = f"\0sockshare/{self._pid}/{secrets.token_hex(8)}".encode()
                lst.bind(name)
                self._address, self._address_kind = name[1:], ADDR_ABSTRACT
            else:
                self._dir = tempfile.mkdtemp(prefix="sockshare-")  # mode 0700
                path = os.path.join(self._dir, "agent.sock")
                lst.bind(path)
                self._address, self._address_kind = path.encode(), ADDR_PATH
        lst.listen(128)
        lst.setblocking(False)

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # full (already woken) or closed
                pass

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork; our copies of its descriptors did.
        self._lock = threading.RLock()  # RLock: a fork from a signal handler inside it proceeds
        fds = {e.fd for e in self._entries.values() if e.fd >= 0}
        fds |= {e.fd for e in self._inflight.values() if e.fd >= 0}
        fds |= {c.granted.fd for c in self._conns.values() if c.granted and c.granted.fd >= 0}
        if self._reserve >= 0:
            fds.add(self._reserve)
        close_fds(list(fds))
        for s in [self._listener, self._wake_r, self._wake_w, *(c.sock for c in self._conns.values())]:
            if s is not None:
                s.close()
        if self._sel is not None:
            self._sel.close()
        self.__init__()  # type: ignore[misc]

    # -- the agent thread ----------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel = selectors.DefaultSelector()
        assert self._listener is not None
        assert self._wake_r is not None
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stopping:
                timeout = self._sweep()
                for key, _ in sel.select(timeout):
                    if key.fileobj is self._listener:
                        if self._paused_until is None:
                            self._accept()
                    elif key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        conn = self._conns.get(key.fd)
                        if conn is not None:
                            self._serve(conn)
        except Exception:  # pragma: no cover - the agent must never die silently
            log.exception("sockshare export agent crashed; exported tokens can no longer be imported")
        finally:
            sel.close()

    def _sweep(self) -> float | None:
        """Close expired entries and stale connections; return the select timeout."""
        now = time.monotonic()
        expired: list[int] = []
        nearest: float | None = None
        with self._lock:
            for tid, e in list(self._entries.items()):
                if e.deadline <= now:
                    del self._entries[tid]
                    self._tomb(tid, ErrorCode.EXPIRED)
                    if e.fd >= 0:
                        expired.append(e.fd)
                elif nearest is None or e.deadline < nearest:
                    nearest = e.deadline
            self._next_sweep = nearest
            close_fds(expired)
        for conn in list(self._conns.values()):
            if conn.deadline <= now:
                self._drop(conn, "the importer took too long")
            elif nearest is None or conn.deadline < nearest:
                nearest = conn.deadline
        if self._paused_until is not None:
            if self._paused_until <= now:
                self._resume_accepting()
            elif nearest is None or self._paused_until < nearest:
                nearest = self._paused_until
        return None if nearest is None else max(0.0, nearest - now) + 0.001

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            s, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and friends: keep serving the rest
            self._accept_failed(exc)
            return
        s.setblocking(False)
        pid = uid = 0
        if not IS_WINDOWS:
            try:
                pid, uid, _gid = peer_credentials(s)
            except (OSError, SockshareError):
                s.close()
                return
            me = _euid()
            if uid not in (me, 0):
                # Refused before reading anything: a stranger costs one accept, no more.
                self._log(logging.WARNING, "uid",
                          "export agent refused a connection from pid %d, uid %d: it serves "
                          "uid %d (and root) only", pid, uid, me)
                self._refuse(s, ErrorCode.WRONG_PROCESS,
                             f"the importer runs as uid {uid}; the exporter (pid {self._pid}) "
                             f"only hands sockets to uid {me}")
                return
        total, per_uid = self._limits
        full_uid = self._per_uid.get(uid, 0) >= per_uid
        if full_uid or len(self._conns) >= total:
            victim = self._evictable(uid if full_uid else None)
            if victim is None:
                self._log(logging.WARNING, "limit",
                          "export agent refused an importer (pid %d, uid %d): %d connections "
                          "open, %d from that uid", pid, uid, len(self._conns),
                          self._per_uid.get(uid, 0))
                self._refuse(s, ErrorCode.LIMIT,
                             f"the export agent of pid {self._pid} has too many importer "
                             f"connections ({len(self._conns)}): retry later")
                return
            self._drop(victim, "making room for a new importer")
        now = time.monotonic()
        conn = _Conn(s, s.fileno(), now + CONN_DEADLINE, now, peer=(pid, uid))
        self._conns[conn.fd] = conn
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        assert self._sel is not None
        self._sel.register(s, selectors.EVENT_READ, None)
        # The importer sends its CLAIM right after connecting: it is usually here
        # already, so serve it now rather than after one more trip through select().
        self._serve(conn)

    def _evictable(self, uid: int | None) -> _Conn | None:
        """The connection to close for a newcomer: the oldest one that is idle or has
        sent nothing yet (of ``uid``, if given); never one in the middle of an import."""
        best: _Conn | None = None
        for c in self._conns.values():
            evictable = c.idle or (c.silent and c.granted is None)
            if (evictable and (uid is None or c.peer[1] == uid)
                    and (best is None or c.since < best.since)):
                best = c
        return best

    def _refuse(self, s: socket.socket, code: ErrorCode, text: str) -> None:
        """Answer a connection not admitted with one ERROR frame, and close it."""
        try:
            s.send(encode_frame(FrameType.ERROR, encode_error(code, text)))
            s.recv(512)  # what it sent already (its CLAIM): closing with unread data
        except OSError:  # resets the connection, which may cost TCP peers our answer
            pass
        s.close()

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE) and self._reserve >= 0:
            # Out of descriptors: give up the spare one to accept this importer and tell
            # it why, instead of leaving it to wait for its whole timeout.
            with self._lock:  # (fork takes it: no child inherits the fds in between)
                close_fds([self._reserve])
                self._reserve = -1
                try:
                    s: socket.socket | None = self._listener.accept()[0] if self._listener else None
                except OSError:
                    s = None
                if s is not None:
                    s.setblocking(False)
                    self._refuse(s, ErrorCode.LIMIT, (
                        f"the exporting process (pid {self._pid}) is out of file descriptors "
                        f"({errno.errorcode.get(exc.errno or 0, exc.errno)}): it is alive but cannot "
                        "serve this import now; retry later, or have it close descriptors or "
                        "raise its limit (ulimit -n)"))
                self._reserve = _open_reserve()
            self._log(logging.WARNING, "emfile",
                      "export agent is out of file descriptors (%s): it refuses importers "
                      "until some are closed", exc)
            if s is not None:
                return
        self._log(logging.WARNING, "accept",
                  "export agent could not accept an importer: %s (accepts pause for %.1f s)",
                  exc, ACCEPT_PAUSE)
        self._pause_accepting()

    def _pause_accepting(self) -> None:
        """Stop watching the listener for a while: a failing accept must not spin."""
        self._paused_until = time.monotonic() + ACCEPT_PAUSE
        if self._sel is not None and self._listener is not None:
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass

    def _resume_accepting(self) -> None:
        self._paused_until = None
        if self._reserve < 0 and not IS_WINDOWS:
            with self._lock:
                self._reserve = _open_reserve()
        if self._sel is not None and self._listener is not None:
            try:
                self._sel.register(self._listener, selectors.EVENT_READ, None)
            except (KeyError, ValueError):  # still registered
                pass

    def _serve(self, conn: _Conn) -> None:
        try:
            # No room for ancillary data: descriptors a peer attaches (no importer frame
            # carries any) are closed by the kernel and never enter this process.
            if IS_WINDOWS:  # (no recvmsg, and no descriptors to receive)
                data, flags = conn.sock.recv(512), 0
            else:
                data, _anc, flags, _addr = conn.sock.recvmsg(512)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn, "receive failed")
            return
        try:
            if flags & _CTRUNC:
                raise ValueError("an importer sends no file descriptors; those attached "
                                 "were discarded")
            if not data:
                conn.decoder.end_of_stream()
                self._drop(conn, "")
                return
            conn.decoder.feed(data)
            while (frame := conn.decoder.next_frame()) is not None:
                conn.silent = False
                if frame.type == FrameType.CLAIM and conn.granted is None:
                    conn.idle = False
                    conn.deadline = time.monotonic() + CONN_DEADLINE
                    self._on_claim(conn, decode_claim(frame.payload))
                    if self._conns.get(conn.fd) is not conn:
                        return  # dropped: its importer hung up
                elif frame.type == FrameType.DONE and conn.granted is not None:
                    if decode_done(frame.payload) != conn.granted.token_id:
                        raise ValueError("DONE names another token")
                    # The importer has the socket: close our duplicate, and keep the
                    # connection for its next CLAIM (an importer pools connections).
                    with self._lock:
                        self._inflight.pop(conn.granted.token_id, None)
                        if conn.granted.fd >= 0:
                            close_fds([conn.granted.fd])
                    conn.granted = None
                    self._idle(conn)
                else:
                    raise ValueError(f"unexpected {frame.type.name} frame")
        except (SockshareError, ValueError, OSError) as exc:
            close_fds(conn.decoder.take_fds())
            self._reply_error(conn, ErrorCode.PROTOCOL, str(exc))
            self._drop(conn, f"protocol error: {exc}")

    def _on_claim(self, conn: _Conn, claim: Claim) -> None:
        with self._lock:
            entry = self._entries.get(claim.token_id)
            if entry is None:
                code = self._tombs.get(claim.token_id, ErrorCode.BAD_TOKEN)
                self._reply_error(conn, code, _REFUSALS[code])
                return
            if not hmac.compare_digest(entry.secret, claim.secret):
                self._reply_error(conn, ErrorCode.BAD_TOKEN, "the token's secret is wrong (forged token)")
                return
            pid, uid = conn.peer if not IS_WINDOWS else (claim.pid, self._uid)
            if pid != entry.target_pid:
                self._reply_error(
                    conn, ErrorCode.WRONG_PROCESS,
                    f"this token was exported for pid {entry.target_pid}; pid {pid} may not import it",
                )
                return
            try:
                same = self._same_process(entry, conn)
            except OSError as exc:  # EMFILE: cannot open /proc/<pid>/stat
                self._reply_error(conn, ErrorCode.LIMIT,
                                  f"the exporting process (pid {self._pid}) cannot check the "
                                  f"importer's identity now ({exc}): retry later")
                return
            if not same:
                self._reply_error(
                    conn, ErrorCode.WRONG_PROCESS,
                    f"this token was exported for the process that had pid {pid} then; that "
                    f"process has exited and pid {pid} now belongs to another one, which may "
                    "not import it",
                )
                return
            my_uid = _euid() if not IS_WINDOWS else self._uid
            if uid not in (my_uid, 0):
                self._reply_error(
                    conn, ErrorCode.WRONG_PROCESS,
                    f"the importer runs as uid {uid}; the exporter only hands sockets to uid {my_uid}",
                )
                return
            if entry.deadline <= time.monotonic():
                del self._entries[claim.token_id]
                self._tomb(claim.token_id, ErrorCode.EXPIRED)
                close_fds([entry.fd] if entry.fd >= 0 else [])
                self._reply_error(conn, ErrorCode.EXPIRED, _REFUSALS[ErrorCode.EXPIRED])
                return
            # Sent under the lock, the token still pending: an importer that hung up
            # before its GRANT (it timed out while this process was stopped or slow, or
            # it died) never takes the token, not even for an instant -- pending() keeps
            # counting it, release() withdraws it and says so. (A non-blocking send: it
            # never waits under the lock.)
            frame = encode_frame(FrameType.GRANT, encode_grant(Grant(entry.token_id, entry.kind)),
                                 nfds=0 if IS_WINDOWS else 1)
            try:
                send_with_fds(conn.sock, frame, [] if IS_WINDOWS else [entry.fd])
            except OSError as exc:
                unsent: OSError | None = exc
                if entry.fd < 0:  # Windows: the target has the socket already (and closed it)
                    del self._entries[claim.token_id]
                    self._tomb(claim.token_id, ErrorCode.CONSUMED)
            else:
                unsent = None
                del self._entries[claim.token_id]
                self._tomb(claim.token_id, ErrorCode.CONSUMED)
                if entry.fd >= 0:
                    self._inflight[claim.token_id] = entry
                conn.granted = entry
        if unsent is not None:
            self._drop(conn, f"the GRANT could not be sent ({unsent}): the importer hung up "
                             "(it timed out, or died); the token stays pending")

    def _same_process(self, entry: _Entry, conn: _Conn) -> bool:
        """Is the process that connected ``conn`` the one ``entry`` was exported for
        (whose pid it has)? Exact where both pidfs inodes are known, to the clock tick
        by start times otherwise, by pid only where neither can be had."""
        if entry.ino is None and entry.start is None:
            return True
        ino, start = self._identity(conn)
        if entry.ino is not None:  # (None: SO_PEERPIDFD refused; it predates pidfs)
            return ino == entry.ino
        return start == entry.start

    def _identity(self, conn: _Conn) -> tuple[int | None, int | None]:
        """(pidfs inode, start time) of the process that connected ``conn``, read once
        per connection. Called under the lock (no forked child inherits the pidfd)."""
        if conn.identity is not None:
            return conn.identity
        pidfd = _pidfd.peer_pidfd(conn.sock)  # the connecting process itself, if the kernel can
        try:  # (OSError such as EMFILE propagate, and nothing is cached)
            ino = _pidfd.pidfd_inode(pidfd) if pidfd is not None else None
            start = None
            if ino is None:
                try:
                    start = _pidfd.start_time(conn.peer[0])
                except ProcessLookupError:
                    pass
                # Read before this check: if the connecting process is alive now, the
                # process we read was that one (a live process keeps its pid).
                if pidfd is not None and _pidfd.pidfd_exited(pidfd):
                    start = None
        finally:
            if pidfd is not None:
                close_fds([pidfd])
        conn.identity = (ino, start)
        return conn.identity

    def _reply_error(self, conn: _Conn, code: ErrorCode, text: str) -> None:
        try:
            conn.sock.send(encode_frame(FrameType.ERROR, encode_error(code, text)))
        except OSError:
            pass
        if code != ErrorCode.PROTOCOL:
            self._idle(conn)  # a refusal: the connection may serve the next claim

    def _idle(self, conn: _Conn) -> None:
        """The connection waits for another CLAIM, for at most IDLE_DEADLINE seconds;
        past MAX_IDLE idle connections the oldest is closed."""
        conn.since = time.monotonic()
        conn.deadline = conn.since + IDLE_DEADLINE
        conn.idle = True
        idle = [c for c in self._conns.values() if c.idle]
        if len(idle) > MAX_IDLE:
            self._drop(min(idle, key=lambda c: c.deadline), "too many idle importers")

    def _drop(self, conn: _Conn, why: str) -> None:
        if why:
            self._log(logging.DEBUG, "drop", "export agent closes an importer connection: %s", why)
        if self._conns.pop(conn.fd, None) is not None:
            n = self._per_uid.get(conn.peer[1], 0) - 1
            if n > 0:
                self._per_uid[conn.peer[1]] = n
            else:
                self._per_uid.pop(conn.peer[1], None)
        if self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        if conn.granted is not None:
            self._give_back(conn.granted)
            conn.granted = None
        conn.sock.close()

    def _give_back(self, entry: _Entry) -> None:
        """The importer hung up between GRANT and DONE: it timed out, or died, before
        the descriptor reached it (or right after). Unless released or expired, the
        token can be imported again -- a slow exporter does not lose the connection."""
        if entry.fd < 0:  # Windows: the duplicate is the target's already
            return
        with self._lock:
            self._inflight.pop(entry.token_id, None)
            if (not entry.released and entry.deadline > time.monotonic()
                    and self._tombs.get(entry.token_id) == ErrorCode.CONSUMED):
                del self._tombs[entry.token_id]
                self._entries[entry.token_id] = entry  # (this thread's next sweep sees it)
                return
            if entry.released:
                code = ErrorCode.RELEASED
            elif entry.deadline <= time.monotonic():
                # never delivered, and its time ran out meanwhile: expired, not consumed
                code = ErrorCode.EXPIRED
            else:
                code = ErrorCode.CONSUMED
            self._tomb(entry.token_id, code)
            close_fds([entry.fd])

    def _tomb(self, token_id: int, code: ErrorCode) -> None:
        self._tombs[token_id] = code
        while len(self._tombs) > TOMBSTONES:
            self._tombs.popitem(last=False)


_REFUSALS = {
    ErrorCode.BAD_TOKEN: "the exporter knows no such token: forged, or consumed/expired long ago",
    ErrorCode.CONSUMED: "this token was already imported; tokens are single use: export again",
    ErrorCode.EXPIRED: "this token expired before it was imported: export again (or pass a longer ttl)",
    ErrorCode.RELEASED: "the exporter released this token before it was imported",
}


#: Start times bind tokens to processes where /proc has them (Linux).
_PROC_IDENTITY = sys.platform.startswith("linux")


def _check_pid_exists(pid: int) -> None:
    """Raise ``ProcessLookupError`` (ESRCH) if no process has ``pid``: where a token
    cannot be bound to the process itself (macOS, BSD, a ``/proc`` of another pid
    namespace), it is still bound to a pid that exists."""
    if pid >= 2**31:  # beyond pid_t: no process has it
        raise ProcessLookupError(errno.ESRCH, f"no process has pid {pid}")
    try:
        os.kill(pid, 0)
    except PermissionError:  # it exists, and is not ours to signal
        pass


def _open_reserve() -> int:
    """The spare descriptor the agent gives up at EMFILE (-1 if even that fails)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _euid() -> int:
    """The uid that counts now (SO_PEERCRED reports effective uids). Read at each export
    and claim: a server that drops privileges after importing sockshare exports as the
    uid it dropped to."""
    return os.geteuid() if hasattr(os, "geteuid") else 0


_agent = ExportAgent()


def agent() -> ExportAgent:
    """The process's export agent (a fresh one in a forked child)."""
    return _agent


if hasattr(os, "register_at_fork"):
    # fork() waits until no agent operation is half done (a duplicate made but not yet
    # listed, or unlisted but not yet closed), so the child closes every copy it got
    os.register_at_fork(before=_agent._before_fork, after_in_parent=_agent._after_fork_in_parent,
                        after_in_child=_agent._after_fork_in_child)
