"""A scriptable sockshare process for the token tests: one JSON command per line.

The test suite starts this script as a *real* separate process (an exporter, an
importer, or both) and drives it over its stdin/stdout: each line on stdin is a JSON
object ``{"op": ..., ...}``; each answer is one JSON line, either ``{"ok": value}`` or
``{"err": class name, "mro": [class names], "msg": text}``. Sockets live in a table of
integer handles. Every blocking call has a timeout.

Start-up options:

``--link FD``
    an already-connected UNIX stream socket shared with a sibling peer, used by the
    bulk ``loop_export``/``loop_import`` commands (tokens travel over it directly);
``--import-env VAR``
    (used by the ``exec`` command, which re-executes this script in the same pid) at
    start, import the token found in the environment variable ``VAR`` and print the
    result as the first line;
``--hello``
    (``exec`` without a variable) print ``{"ok": pid}`` as the first line. The test
    waits for that first line before it sends anything else: the old image may have
    buffered stdin that the new one never sees.

The ``fork`` command forks; the child connects to a UNIX socket the test listens on
and serves the same commands there, with the parent's socket table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import resource
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sockshare
from sockshare.backends import _pidfd
from sockshare.backends._agent import agent

# Everything is imported up front: a forked child that dropped to another uid may not
# be able to read the interpreter's files any more.

IO_TIMEOUT = 10.0

_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}
_TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM}


class Peer:
    """The command interpreter: a socket table and one method per op."""

    def __init__(self, link: socket.socket | None) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.next_h = 1
        self.link = link
        self.hog: list[int] = []  # descriptors held by ``exhaust``

    # -- helpers ---------------------------------------------------------------

    def _add(self, s: socket.socket) -> int:
        h = self.next_h
        self.next_h += 1
        self.socks[h] = s
        return h

    @staticmethod
    def _addr(family: int, a: Any) -> Any:
        if family == socket.AF_UNIX:
            return a
        return (a[0], int(a[1]))

    @staticmethod
    def _out_addr(a: Any) -> Any:
        if isinstance(a, bytes):
            return a.decode("latin-1")
        if isinstance(a, tuple):
            return [a[0], a[1]]
        return a

    def info(self, s: socket.socket) -> dict[str, Any]:
        fd = s.fileno()
        return {
            "fd": fd,
            "family": int(s.family),
            "type": int(s.type),
            "proto": s.proto,
            "so_domain": s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
            "so_type": s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
            "so_protocol": s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
            "timeout": s.gettimeout(),
            "inheritable": os.get_inheritable(fd),
            "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            "nonblock": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
            "inode": os.fstat(fd).st_ino,
            "sockname": self._out_addr(s.getsockname()),
        }

    # -- ops -------------------------------------------------------------------

    def op_pid(self) -> int:
        return os.getpid()

    def op_socket(self, family: str, type: str, proto: int = 0, bind: Any = None,
                  listen: bool = False, connect: Any = None, blocking: bool = True) -> Any:
        fam = _FAMILIES[family]
        s = socket.socket(fam, _TYPES[type], proto)
        try:
            s.settimeout(IO_TIMEOUT)
            if bind is not None:
                s.bind(self._addr(fam, bind))
            if listen:
                s.listen(16)
            if connect is not None:
                s.connect(self._addr(fam, connect))
            if not blocking:
                s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return {"h": self._add(s), **self.info(s)}

    def op_accept(self, h: int, timeout: float = IO_TIMEOUT) -> Any:
        lst = self.socks[h]
        old = lst.gettimeout()
        lst.settimeout(timeout)
        try:
            c, addr = lst.accept()
        finally:
            lst.settimeout(old)
        c.settimeout(IO_TIMEOUT)
        return {"h": self._add(c), "peer": self._out_addr(addr)}

    def op_send(self, h: int, data: str) -> int:
        s = self.socks[h]
        old = s.gettimeout()
        s.settimeout(IO_TIMEOUT)
        try:
            s.sendall(bytes.fromhex(data))
        finally:
            s.settimeout(old)
        return len(data) // 2

    def op_recv(self, h: int, n: int, timeout: float = IO_TIMEOUT) -> str:
        """Read exactly ``n`` bytes (less only at EOF) from a stream socket."""
        s = self.socks[h]
        old = s.gettimeout()
        s.settimeout(timeout)
        buf = b""
        try:
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    break
                buf += chunk
        finally:
            s.settimeout(old)
        return buf.hex()

    def op_sendto(self, h: int, data: str, addr: Any = None) -> int:
        s = self.socks[h]
        payload = bytes.fromhex(data)
        if addr is None:
            return s.send(payload)
        return s.sendto(payload, self._addr(s.family, addr))

    def op_recvfrom(self, h: int, timeout: float = IO_TIMEOUT) -> Any:
        s = self.socks[h]
        old = s.gettimeout()
        s.settimeout(timeout)
        try:
            data, addr = s.recvfrom(65536)
        finally:
            s.settimeout(old)
        return [data.hex(), self._out_addr(addr)]

    def op_info(self, h: int) -> Any:
        return self.info(self.socks[h])

    def op_setblocking(self, h: int, blocking: bool) -> None:
        self.socks[h].setblocking(blocking)

    def op_close(self, h: int) -> None:
        self.socks.pop(h).close()

    def op_export(self, h: int, pid: int, ttl: float | None = None, close: bool = False,
                  file: str | None = None, as_fd: bool = False) -> str:
        s = self.socks[h]
        target: socket.socket | int = s.fileno() if as_fd else s
        if ttl is None:
            token = sockshare.export_socket(target, pid)
        else:
            token = sockshare.export_socket(target, pid, ttl=ttl)
        if close:
            self.socks.pop(h).close()
        if file is not None:
            with open(file + ".tmp", "w", encoding="ascii") as f:
                f.write(token + "\n")
            os.replace(file + ".tmp", file)
        return token

    def op_import(self, token: str | None = None, file: str | None = None,
                  blocking: bool | None = None, timeout: float = 5.0) -> Any:
        if file is not None:
            with open(file, encoding="ascii") as f:
                token = f.read()
        assert token is not None
        try:
            if blocking is None:
                s = sockshare.import_socket(token, timeout=timeout)
            else:
                s = sockshare.import_socket(token, blocking=blocking, timeout=timeout)
        finally:
            _unpool()
        return {"h": self._add(s), **self.info(s)}

    def op_import_many(self, tokens: list[str], threads: int = 8,
                       timeout: float = IO_TIMEOUT) -> list[Any]:
        """Import ``tokens`` concurrently from ``threads`` threads (each import within
        ``timeout``); close each socket.

        Returns, per token, ``[family, type, inode]`` or ``[error class name]``.
        """
        def one(token: str) -> list[Any]:
            try:
                s = sockshare.import_socket(token, timeout=timeout)
            except sockshare.SockshareError as exc:
                return [type(exc).__name__]
            with s:
                return [int(s.family), int(s.type), os.fstat(s.fileno()).st_ino]

        try:
            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(one, tokens))
        finally:
            _unpool()

    def op_pidfd_getfd(self, pid: int, fd: int) -> Any:
        """Pull descriptor ``fd`` out of process ``pid`` with pidfd_getfd."""
        new = _pidfd.getfd(pid, fd)
        s = socket.socket(fileno=new)
        return {"h": self._add(s), **self.info(s)}

    def op_release(self, token: str) -> bool:
        return sockshare.release(token)

    def op_pending(self) -> int:
        return agent().pending()

    def op_watch_pending(self, seconds: float) -> list[int]:
        """``pending()`` read in a loop for ``seconds``: the values seen, each change once."""
        seen = [agent().pending()]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = agent().pending()
            if n != seen[-1]:
                seen.append(n)
        return seen

    def op_fds(self) -> list[int]:
        return sorted(int(x) for x in os.listdir("/proc/self/fd"))

    def op_exec(self, env: dict[str, str], var: str = "") -> None:
        """Re-execute this script in the same pid; if ``var``, import the token in
        ``env[var]`` first and print the result as the first line."""
        sys.stdout.flush()
        argv = [sys.executable, os.path.abspath(__file__)]
        argv += ["--import-env", var] if var else ["--hello"]
        os.execve(sys.executable, argv, {**os.environ, **env})

    def op_fork(self, path: str, uid: int | None = None) -> int:
        """Fork; the child serves commands on a UNIX connection to ``path``, after
        dropping to ``uid`` (and the same gid) if given."""
        pid = os.fork()
        if pid:
            return pid
        code = 0
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(IO_TIMEOUT)
            conn.connect(path)
            conn.settimeout(None)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            rf = conn.makefile("r", encoding="utf-8")
            wf = conn.makefile("w", encoding="utf-8")
            serve(self, rf, wf)
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    def op_waitpid(self, pid: int, timeout: float = IO_TIMEOUT) -> int:
        """Reap a child forked by ``fork``; return its exit status (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {pid} did not exit")
            time.sleep(0.01)

    def op_loop_export(self, h: int, pid: int, n: int) -> Any:
        """Export ``h`` ``n`` times for ``pid``; each token goes over the link; wait acks."""
        assert self.link is not None
        s = self.socks[h]
        rf = self.link.makefile("rb")
        t0 = time.perf_counter()
        try:
            for i in range(n):
                self.link.sendall(sockshare.export_socket(s, pid).encode() + b"\n")
                if rf.readline() != b"k\n":
                    raise RuntimeError(f"the importer stopped at cycle {i}")
        finally:
            rf.close()
        return time.perf_counter() - t0

    def op_loop_import(self, n: int) -> Any:
        """Import ``n`` tokens read from the link, check and close each, ack each."""
        assert self.link is not None
        rf = self.link.makefile("rb")
        kinds = set()
        try:
            for i in range(n):
                line = rf.readline()
                if not line:
                    raise RuntimeError(f"the exporter stopped at cycle {i}")
                s = sockshare.import_socket(line.decode().strip())
                kinds.add((int(s.family), int(s.type)))
                s.close()
                self.link.sendall(b"k\n")
        finally:
            rf.close()
            _unpool()
        return sorted(kinds)

    def op_log(self, path: str) -> None:
        """Write sockshare's log, every level, to ``path``, one line per record."""
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        logger = logging.getLogger("sockshare")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)

    def op_nofile(self, soft: int) -> list[int]:
        """Set this process's soft RLIMIT_NOFILE; return the (soft, hard) it had."""
        old = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
        return list(old)

    def op_exhaust(self) -> int:
        """Open /dev/null until EMFILE; return how many were opened (kept open)."""
        while True:
            try:
                self.hog.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return len(self.hog)

    def op_unexhaust(self) -> int:
        """Close what ``exhaust`` opened; return how many."""
        n = len(self.hog)
        for fd in self.hog:
            os.close(fd)
        self.hog = []
        return n

    def op_exit(self) -> None:
        raise SystemExit(0)


def _unpool() -> None:
    """Close the pooled agent connections after an import, so that fd counts compare
    like with like (the pool itself is tested in tests/test_token_pool.py)."""
    sockshare.close_agent_connections()


def _error(exc: BaseException) -> dict[str, Any]:
    return {"err": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
            "msg": str(exc)}


def handle(peer: Peer, line: str) -> dict[str, Any]:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        return {"ok": getattr(peer, "op_" + op)(**cmd)}
    except SystemExit:
        raise
    except BaseException as exc:
        return _error(exc)


def serve(peer: Peer, rf: Any, wf: Any) -> None:
    while True:
        line = rf.readline()
        if not line:
            return
        try:
            answer = handle(peer, line)
        except SystemExit:
            wf.write(json.dumps({"ok": None}) + "\n")
            wf.flush()
            return
        wf.write(json.dumps(answer) + "\n")
        wf.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--link", type=int, default=-1)
    ap.add_argument("--import-env", default="")
    ap.add_argument("--hello", action="store_true")
    args = ap.parse_args()
    link = None
    if args.link >= 0:
        link = socket.socket(fileno=args.link)
        link.settimeout(IO_TIMEOUT)
    peer = Peer(link)
    if args.hello:
        sys.stdout.write(json.dumps({"ok": os.getpid()}) + "\n")
        sys.stdout.flush()
    if args.import_env:
        try:
            s = sockshare.import_socket(os.environ[args.import_env])
            first: dict[str, Any] = {"ok": {"h": peer._add(s), **peer.info(s)}}
        except BaseException as exc:
            first = _error(exc)
        _unpool()
        sys.stdout.write(json.dumps(first) + "\n")
        sys.stdout.flush()
    serve(peer, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
