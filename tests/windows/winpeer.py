"""A scriptable sockshare process for the Windows tests: one JSON command per line.

Two halves, so the Windows tests (inside Windows CPython) and the Linux tests (driving
Windows CPython under Wine) script the very same child:

* run as a script (``python.exe winpeer.py``), it is the *peer*: each line on stdin is a
  JSON object ``{"op": ..., ...}``; each answer is one JSON line, ``{"ok": value}`` or
  ``{"err": class name, "mro": [class names], "msg": text}``. Sockets, channels,
  tickets and handoffs live in one table of integer handles. Every blocking call has a
  timeout, and the peer ends itself after ``--lifetime`` seconds whatever happens, so a
  lost parent never leaves it behind.
* imported, :class:`PeerClient` drives one such process through its pipes, reading its
  output in threads so that every wait is bounded.

Only the standard library and sockshare: the embeddable Windows CPython has nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

IO_TIMEOUT = 10.0
SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------- the peer


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def _s(data: bytes) -> str:
    return data.decode("latin-1")


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from ``sock``; EOFError if it closes first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(65536, size - len(buf)))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def sees_eof(sock: socket.socket, timeout: float) -> bool:
    """True if ``sock`` reports end of file within ``timeout`` (no process holds the
    other end any more); its timeout is put back to IO_TIMEOUT after."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    finally:
        sock.settimeout(IO_TIMEOUT)


class Peer:
    """The command interpreter: an object table and one method per op."""

    def __init__(self) -> None:
        self.objs: dict[int, Any] = {}
        self.next_h = 1

    def _add(self, obj: Any) -> int:
        for h, o in self.objs.items():
            if o is obj:
                return h
        h = self.next_h
        self.next_h += 1
        self.objs[h] = obj
        return h

    def _sock(self, h: int) -> socket.socket:
        s = self.objs[h]
        assert isinstance(s, socket.socket), f"handle {h} is a {type(s).__name__}"
        return s

    @staticmethod
    def _ends(s: socket.socket) -> dict[str, Any]:
        out: dict[str, Any] = {"local": s.getsockname()[1]}
        try:
            out["peer"] = s.getpeername()[1]
        except OSError:
            out["peer"] = None
        return out

    # -- plain sockets -----------------------------------------------------------

    def op_pid(self) -> int:
        return os.getpid()

    def op_listen(self) -> dict[str, Any]:
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(IO_TIMEOUT)
        return {"h": self._add(srv), "port": srv.getsockname()[1]}

    def op_accept(self, h: int) -> dict[str, Any]:
        conn, _ = self._sock(h).accept()
        conn.settimeout(IO_TIMEOUT)
        return {"h": self._add(conn), **self._ends(conn)}

    def op_connect(self, port: int) -> dict[str, Any]:
        s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        return {"h": self._add(s), **self._ends(s)}

    def op_send(self, h: int, data: str) -> int:
        self._sock(h).sendall(_b(data))
        return len(data)

    def op_recv(self, h: int, n: int) -> str:
        return _s(recv_exact(self._sock(h), n))

    def op_recv_eof(self, h: int, timeout: float = IO_TIMEOUT) -> bool:
        """True when the peer closed (recv returns b''); False if it stays open."""
        return sees_eof(self._sock(h), timeout)

    def op_echo(self, h: int) -> int:
        """Echo everything until the peer shuts down its side; return the byte count."""
        s = self._sock(h)
        total = 0
        while chunk := s.recv(65536):
            s.sendall(chunk)
            total += len(chunk)
        return total

    def op_shutdown(self, h: int) -> None:
        self._sock(h).shutdown(socket.SHUT_WR)

    def op_close(self, h: int) -> None:
        obj = self.objs.pop(h)
        obj.close()

    def op_info(self, h: int) -> dict[str, Any]:
        s = self._sock(h)
        return {"timeout": s.gettimeout(), "inheritable": s.get_inheritable(),
                "family": int(s.family), "type": int(s.type), **self._ends(s)}

    # -- tokens ------------------------------------------------------------------

    def op_export(self, h: int, pid: int, ttl: float = 30.0, close: bool = False,
                  file: str | None = None) -> str:
        import sockshare

        s = self._sock(h)
        token = sockshare.export_socket(s, pid, ttl=ttl)
        if close:  # the exporter may let go at once: the duplicate is already the target's
            self.objs.pop(h)
            s.close()
        if file:
            Path(file).write_text(token, encoding="ascii")
        return token

    def op_import(self, token: str | None = None, env: str | None = None,
                  file: str | None = None, blocking: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        import sockshare

        if env is not None:
            token = os.environ[env]
        elif file is not None:
            token = Path(file).read_text(encoding="ascii")
        assert token is not None
        start = time.perf_counter()
        s = sockshare.import_socket(token, blocking=blocking, timeout=timeout)
        took = time.perf_counter() - start
        info = {"timeout": s.gettimeout(), "inheritable": s.get_inheritable(), "ms": took * 1000}
        if blocking:
            s.settimeout(IO_TIMEOUT)
        return {"h": self._add(s), **info, **self._ends(s)}

    def op_release(self, token: str) -> bool:
        import sockshare

        return sockshare.release(token)

    def op_pending(self) -> int:
        from sockshare.backends._agent import agent

        return agent().pending()

    # -- channels ----------------------------------------------------------------

    def op_ch_listen(self) -> dict[str, Any]:
        import sockshare

        lst = sockshare.Channel.listen("tcp://127.0.0.1:0")
        return {"h": self._add(lst), "address": lst.address}

    def op_ch_accept(self, h: int) -> dict[str, Any]:
        ch = self.objs[h].accept(timeout=IO_TIMEOUT)
        return {"h": self._add(ch), "peer_pid": ch.peer.pid}

    def op_ch_connect(self, address: str) -> dict[str, Any]:
        import sockshare

        ch = sockshare.Channel.connect(address, timeout=IO_TIMEOUT)
        ch.send_timeout = IO_TIMEOUT
        return {"h": self._add(ch), "peer_pid": ch.peer.pid}

    def op_ch_send(self, ch: int, h: int, meta: Any = None, data: str = "",
                   ack: bool = True) -> dict[str, Any]:
        sock = self._sock(h)
        ticket = self.objs[ch].send(sock, meta=meta, data=_b(data), ack=ack)
        if ticket.socket is None:  # fire-and-forget: the channel closed our copy
            self.objs.pop(h, None)
        return {"t": self._add(ticket), "state": ticket.state}

    def op_ticket_wait(self, t: int, timeout: float = IO_TIMEOUT) -> dict[str, Any]:
        ticket = self.objs[t]
        ticket.wait(timeout)
        out: dict[str, Any] = {"state": ticket.state, "reason": ticket.reason, "h": None}
        if ticket.socket is not None:
            out["h"] = self._add(ticket.socket)
            ticket.socket.settimeout(IO_TIMEOUT)
        else:  # accepted: our copy is closed; forget it
            for k, v in list(self.objs.items()):
                if isinstance(v, socket.socket) and v.fileno() == -1:
                    del self.objs[k]
        return out

    def op_ch_receive(self, ch: int, timeout: float = IO_TIMEOUT) -> dict[str, Any]:
        handoff = self.objs[ch].receive(timeout=timeout)
        handoff.socket.settimeout(IO_TIMEOUT)
        return {"hid": self._add(handoff), "h": self._add(handoff.socket), "meta": handoff.meta,
                "data": _s(handoff.data), "acked": handoff.acked, **self._ends(handoff.socket)}

    def op_ho_accept(self, hid: int) -> None:
        self.objs.pop(hid).accept()

    def op_ho_reject(self, hid: int, reason: str = "") -> None:
        handoff = self.objs.pop(hid)
        handoff.reject(reason)
        for k, v in list(self.objs.items()):
            if v is handoff.socket:
                del self.objs[k]

    def op_ch_poll(self, ch: int, timeout: float = 0.0) -> list[dict[str, Any]]:
        c = self.objs[ch]
        c.poll(timeout)
        return [{"state": t.state, "reason": t.reason} for t in c.returned()]

    def op_ch_counters(self, ch: int) -> dict[str, int]:
        return dict(self.objs[ch].counters)

    def op_ch_close(self, ch: int) -> None:
        self.objs.pop(ch).close()

    # -- asyncio -----------------------------------------------------------------

    def op_run_code(self, code: str) -> Any:
        """Run a snippet with this peer's globals; it sets ``result``."""
        scope: dict[str, Any] = {"peer": self, "socket": socket, "os": os}
        exec(code, scope)
        return scope.get("result")


def _serve(peer: Peer) -> None:
    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "exit":
            print(json.dumps({"ok": None}), flush=True)
            return
        try:
            answer: dict[str, Any] = {"ok": getattr(peer, f"op_{op}")(**cmd)}
        except Exception as exc:  # every failure is an answer, never a dead peer
            answer = {"err": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                      "msg": str(exc)}
        print(json.dumps(answer), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=float, default=120.0,
                        help="end this process after so many seconds, whatever happens")
    parser.add_argument("--import-env", metavar="VAR",
                        help="at start, import the token in $VAR and print the answer first")
    args = parser.parse_args()
    timer = threading.Timer(args.lifetime, os._exit, (99,))
    timer.daemon = True
    timer.start()
    import sockshare  # noqa: F401 - now, while sibling peers start too (~0.5 s under Wine)

    peer = Peer()
    if args.import_env:
        try:
            first: dict[str, Any] = {"ok": peer.op_import(env=args.import_env)}
        except Exception as exc:
            first = {"err": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                     "msg": str(exc)}
        print(json.dumps(first), flush=True)
    _serve(peer)
    return 0


# --------------------------------------------------------------------------- the client


class PeerError(AssertionError):
    """The peer answered with an error (class name in ``name``, its bases in ``mro``)."""

    def __init__(self, name: str, mro: list[str], msg: str) -> None:
        super().__init__(f"{name}: {msg}")
        self.name, self.mro, self.msg = name, mro, msg


def popen(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    """subprocess.Popen, tried up to 3 times: Wine's CreateProcess now and then fails
    with ERROR_INTERNAL_ERROR (1359) under load -- the emulator, not what is tested."""
    for attempt in range(3):
        try:
            proc: subprocess.Popen[str] = subprocess.Popen(argv, **kw)
        except OSError as exc:
            if getattr(exc, "winerror", None) != 1359 or attempt == 2:
                raise
            time.sleep(0.2)
        else:
            return proc
    raise AssertionError("unreachable")


class PeerClient:
    """Drives one peer process through its pipes; every wait has a time limit."""

    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name
        self.pid_os = proc.pid  # the OS pid of the process we started (Linux or Windows)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    @classmethod
    def spawn(cls, name: str, *args: str, env: dict[str, str] | None = None) -> PeerClient:
        """Start a sibling peer with this interpreter (used inside Windows)."""
        proc = popen(
            [sys.executable, str(SCRIPT), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
            env=None if env is None else {**os.environ, **env},
        )
        return cls(proc, name)

    def _read_out(self) -> None:
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    def _read_err(self) -> None:
        try:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self._stderr.append(line)
        except (OSError, ValueError):
            pass

    def stderr(self) -> str:
        return "".join(self._stderr)[-3000:]

    def answer(self, timeout: float = 30.0) -> Any:
        """The next answer line: its value, or PeerError."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name}: no answer within {timeout} s; stderr: {self.stderr()}"
            ) from None
        if line is None:
            raise AssertionError(f"{self.name} ended (exit {self.proc.poll()}); stderr: {self.stderr()}")
        msg = json.loads(line)
        if "err" in msg:
            raise PeerError(msg["err"], msg["mro"], msg["msg"])
        return msg["ok"]

    def call(self, op: str, timeout: float = 30.0, **kw: Any) -> Any:
        self.send_line(json.dumps({"op": op, **kw}))
        return self.answer(timeout)

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def refused(self, op: str, err: str, **kw: Any) -> PeerError:
        """Call ``op``, which must fail with the exception class ``err`` (or a subclass)."""
        try:
            value = self.call(op, **kw)
        except PeerError as exc:
            if err not in exc.mro:
                raise AssertionError(f"{self.name}: expected {err}, got {exc}") from exc
            return exc
        raise AssertionError(f"{self.name}: {op} should have failed with {err}, returned {value!r}")

    @property
    def pid(self) -> int:
        """The peer's own os.getpid() (its Windows pid), asked once."""
        if not hasattr(self, "_pid"):
            self._pid: int = self.call("pid")
        return self._pid

    def kill(self) -> None:
        """Kill the peer (our own child, by its handle) and wait for it."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass

    def finish(self, timeout: float = IO_TIMEOUT) -> int | None:
        """Ask the peer to exit; kill it if it does not within ``timeout``."""
        if self.proc.poll() is None:
            try:
                self.send_line(json.dumps({"op": "exit"}))
                self.proc.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return self.proc.returncode


class Peers:
    """The peers a test started (``add`` returns its argument); :meth:`finish` ends
    every one of them."""

    def __init__(self) -> None:
        self.started: list[PeerClient] = []

    def add(self, peer: PeerClient) -> PeerClient:
        self.started.append(peer)
        return peer

    def finish(self) -> None:
        for peer in self.started:
            peer.finish()


if __name__ == "__main__":
    sys.exit(main())
