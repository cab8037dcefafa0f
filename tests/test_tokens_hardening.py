"""Tokens against hostile local users, exhausted resources and reused pids (issue 18).

* the export agent is the target of another user (``nobody``) and of its own uid: fds
  attached to frames, 1,500 idle connections; its descriptor count stays bounded and
  returns to its baseline, its own ``socket()`` calls and legitimate imports keep
  working, and its log is not flooded;
* a token is bound to the process it was exported for, not to a pid number: a process
  that gets the same pid after the target exited (forced with ``ns_last_pid`` in a new
  pid namespace) is refused;
* ``import_socket(timeout=)`` is one deadline, whatever an agent dribbles;
* an exporter out of descriptors says so (``ExporterBusy``), ``export_socket`` at EMFILE
  raises ``ExportFailed`` (an ``OSError``);
* token text is decoded strictly.

Real processes, real sockets; the other user is ``nobody`` (65534), reached by a
process that drops to it (tests run as root in CI; they skip, saying so, otherwise).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sockshare
from sockshare.backends import _agent, _pidfd
from sockshare.protocol import FrameType, decode_token, encode_frame, encode_token
from sockshare.protocol._messages import ErrorCode, encode_error
from sockshare.protocol._token import ADDR_ABSTRACT, KIND_POSIX, TokenInfo
from tests import test_tokens
from tests._fdcount import PeerProcess, fd_count, settle, settled_fd_count, wait_fd_count
from tests.test_tokens import _start_agent

IO = 10.0
B64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
NOBODY = 65534
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT, reason="needs root: to run the attacker as user nobody (65534)")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="abstract agent address and /proc: Linux")
pytestmark = linux_only

#: A hostile client: connects to an agent's abstract address as ``uid`` and misbehaves.
ATTACKER = r"""
import array, json, os, resource, selectors, socket, sys, time
address, mode, uid, n = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
if uid != os.geteuid():
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
conns, out = [], {"connected": 0, "failed": 0, "sent": 0, "send_failed": 0}
budget = time.monotonic() + 15  # an agent that stops accepting blocks connect()
def connect(c):
    while True:  # EAGAIN: the backlog is full; the agent drains it, or the budget ends
        c.settimeout(max(0.01, min(2, budget - time.monotonic())))
        try:
            c.connect(b"\0" + address)
            return True
        except BlockingIOError:
            if time.monotonic() >= budget:
                return False
            time.sleep(0.001)
        except OSError:
            return False
for _ in range(n):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not connect(c):
        out["failed"] += 1
        c.close()
        continue
    out["connected"] += 1
    conns.append(c)
if mode == "fds":  # 1 byte (a frame's first) + 253 descriptors, twice on each connection
    junk = os.open(os.devnull, os.O_RDONLY)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [junk] * 253).tobytes())]
    for c in conns:
        for _ in range(2):
            try:
                c.sendmsg([b"S"], anc)
                out["sent"] += 1
            except OSError:
                out["send_failed"] += 1
# how many did the agent answer or close within 3 s (the others it holds)
sel = selectors.DefaultSelector()
for c in conns:
    c.setblocking(False)
    sel.register(c, selectors.EVENT_READ)
answered, deadline = set(), time.monotonic() + 3
while len(answered) < len(conns) and time.monotonic() < deadline:
    for key, _ in sel.select(0.1):
        answered.add(key.fileobj)
        sel.unregister(key.fileobj)
out["answered"] = len(answered)
print(json.dumps(out), flush=True)
sys.stdin.readline()  # hold every connection until told
"""


class Attacker:
    """The hostile client in its own process (ours, ended by pid)."""

    def __init__(self, address: bytes, mode: str, uid: int, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, address.hex(), mode, str(uid), str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def report(self) -> dict[str, int]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the script's own waits are bounded
        assert line, f"the attacker died: {self.proc.wait(IO)}"
        result: dict[str, int] = json.loads(line)
        return result

    def end(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(IO)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(IO)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


#: a fresh peer process, its descriptor baseline taken (test_tokens' fixture)
importer = test_tokens.importer


def _exporter(nofile: int | None = None, log: Path | None = None) -> PeerProcess:
    p = PeerProcess()
    try:
        if nofile is not None:
            p.call("nofile", soft=nofile)
        if log is not None:
            p.call("log", path=str(log))
        _start_agent(p)
        p.baseline = fd_count(p.pid)
    except BaseException:
        p.close()
        raise
    return p


def _pending_token(exporter: PeerProcess, importer: PeerProcess) -> tuple[str, dict[str, object]]:
    s = exporter.call("socket", family="unix", type="dgram")
    return exporter.call("export", h=s["h"], pid=importer.pid, close=True), s


def _import_ok(importer: PeerProcess, token: str, s: dict[str, object]) -> None:
    got = importer.call("import", token=token, timeout=IO)
    assert got["inode"] == s["inode"]
    importer.call("close", h=got["h"])


# --- 5: descriptors and connections from hostile peers -------------------------------


@needs_root
@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["nobody", "same-uid"])
def test_descriptors_sent_to_the_agent_never_stay(importer: PeerProcess, uid: int) -> None:
    """1 byte + 253 fds, twice on each of 4 connections: the exporter's fd count does
    not move (old code: +2,024, for good), while the attacker still holds its
    connections; the token waiting there is still imported."""
    exporter = _exporter()
    attacker = None
    try:
        token, s = _pending_token(exporter, importer)
        base = fd_count(exporter.pid)  # with the pending duplicate
        attacker = Attacker(decode_token(token).address, "fds", uid, 4)
        got = attacker.report()
        peak = fd_count(exporter.pid)
        print(f"\nexporter fds ({'nobody' if uid else 'root'} attacker, 4 x 2 x 253 fds): "
              f"before {base}, after the attack {peak}")
        assert got["connected"] == 4
        assert got["answered"] == 4, got  # refused or dropped, none left hanging
        # the attacker still holds its connections: the exporter is back to its baseline
        wait_fd_count(exporter.pid, base, timeout=3, what="exporter")
        _import_ok(importer, token, s)
        settle(exporter)
    finally:
        if attacker is not None:
            attacker.end()
        exporter.close()
    settle(importer)


@needs_root
@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["nobody", "same-uid"])
def test_idle_connection_flood_is_bounded(importer: PeerProcess, uid: int,
                                          tmp_path: Path) -> None:
    """1,500 idle connections against an exporter with ``ulimit -n 1024``: from another
    uid all are refused at once, from its own uid at most a quarter of its limit are
    kept; its own socket() calls and a real import keep working; its log holds a few
    lines, not one per connection (old code: EMFILE, a warning every 10 ms)."""
    log = tmp_path / "exporter.log"
    exporter = _exporter(nofile=1024, log=log)
    attacker = None
    try:
        token, s = _pending_token(exporter, importer)
        base = fd_count(exporter.pid)
        t0 = time.monotonic()
        attacker = Attacker(decode_token(token).address, "idle", uid, 1500)
        got = attacker.report()
        held = settled_fd_count(exporter.pid, timeout=2)
        print(f"\nexporter fds ({'nobody' if uid else 'root'}, 1,500 idle connections): "
              f"before {base}, during {held}; attacker: {got}")
        assert got["connected"] + got["failed"] == 1500
        if uid == NOBODY:
            assert got["answered"] == got["connected"], got  # every one refused
            assert held <= base + 2
        else:
            assert held <= base + 1024 // 4 + 2  # the agent's bound (total, per uid)
        # the exporter's own socket() calls work, and so does a real import (it makes
        # room by closing the oldest silent connection)
        exporter.call("close", h=exporter.call("socket", family="inet", type="stream")["h"])
        _import_ok(importer, token, s)
        elapsed = time.monotonic() - t0
    finally:
        if attacker is not None:
            attacker.end()
        exporter.close()
    lines = log.read_text().splitlines()
    print(f"exporter log: {len(lines)} lines in {elapsed:.1f} s")
    # at most one line a second of each kind (refusals, limits, drops...)
    assert len(lines) <= 4 * (elapsed + 2), lines[:20]
    settle(importer)


# --- 6: a reused pid is not the target -----------------------------------------------

PID_REUSE = r"""
import json, os, socket, sys, time
import sockshare
from sockshare.backends import _pidfd
if sys.argv[1] == "start-time":  # as on Linux < 6.9: no pidfs inode, start times only
    _pidfd._pidfs = False

def child(fn):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            msg = fn()
        except BaseException as exc:
            msg = f"{type(exc).__name__}: {exc}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pid, out.decode()

def try_import(token):
    try:
        s = sockshare.import_socket(token, timeout=5)
    except sockshare.WrongProcess as exc:
        return f"WrongProcess: {exc}"
    s.close()
    return "IMPORTED"

a, b = socket.socketpair()
go_r, go_w = os.pipe()
target = os.fork()
if target == 0:  # the target: waits, then exits without importing
    os.close(go_w)
    os.read(go_r, 1)
    os._exit(0)
os.close(go_r)
token = sockshare.export_socket(a, target)
os.close(go_w)
os.waitpid(target, 0)
if sys.argv[1] == "start-time":
    time.sleep(0.05)  # start times count clock ticks (10 ms): let some pass
result = {"target": target, "tries": 0}
for _ in range(5):  # the next fork gets pid `target` (unless something else forked first)
    result["tries"] += 1
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(target - 1))
    pid, out = child(lambda: "miss" if os.getpid() != target else try_import(token))
    if out != "miss":
        result["imposter"], result["imposter_pid"] = out, pid
        break
result["pending"] = sockshare._tokens.agent().pending()
# the binding does not stop the right process: a live target imports its token
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    text = b""
    while chunk := os.read(r, 4096):
        text += chunk
    try:
        sockshare.import_socket(text.decode(), timeout=5).close()
        os._exit(0)
    except BaseException:
        os._exit(1)
os.close(r)
os.write(w, sockshare.export_socket(a, pid).encode())
os.close(w)
result["live_target_status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(result), flush=True)
"""


def _unshare_pid_ok() -> str:
    """'' if ``unshare --pid --fork --mount-proc`` works here, else why not."""
    if not ROOT:
        return "needs root (CAP_SYS_ADMIN) to create a pid namespace and write ns_last_pid"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare(1) to create a pid namespace"
    try:
        out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                             capture_output=True, timeout=IO, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --pid --fork --mount-proc failed: {exc}"
    if out.returncode:
        return ("unshare --pid --fork --mount-proc failed (a container without "
                f"CAP_SYS_ADMIN?): {out.stderr.decode(errors='replace').strip()}")
    return ""


UNSHARE_WHY = _unshare_pid_ok() if sys.platform.startswith("linux") else "Linux only"


PIDFS = pytest.mark.skipif(not _pidfd._has_pidfs(),
                           reason="pidfds have no inode of their own before Linux 6.9")


@pytest.mark.skipif(bool(UNSHARE_WHY), reason=UNSHARE_WHY or "-")
@pytest.mark.parametrize("identity", [pytest.param("pidfs", marks=PIDFS), "start-time"])
def test_a_process_that_reuses_the_target_pid_is_refused(tmp_path: Path,
                                                          identity: str) -> None:
    """The target exits without importing; the next process forked gets its pid (made
    so with ns_last_pid, in a pid namespace of our own) and presents the token: refused
    with WrongProcess (old code: it imported the live connection). The token stays
    pending; a live target still imports its own token. ``pidfs``: the process's pidfs
    inode (Linux >= 6.9), exact even within one clock tick; ``start-time``: the
    fallback for older kernels, its start time in /proc."""
    script = tmp_path / "reuse.py"
    script.write_text(PID_REUSE)
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                          str(script), identity], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result.get("imposter_pid") == result["target"], result  # the pid was reused
    assert result["imposter"].startswith("WrongProcess: "), result
    assert "exited" in result["imposter"], result
    assert result["pending"] == 1, result  # the refusal did not consume it
    assert result["live_target_status"] == 0, result


# --- 7: one deadline per import ---------------------------------------------------------


class FakeAgent:
    """An agent in this process (so SO_PEERCRED names the token's exporter) that reads
    the CLAIM, then answers one byte every ``interval`` seconds."""

    def __init__(self, interval: float, serve: bool = True) -> None:
        self.name = f"sockshare-test/{os.getpid()}/{secrets.token_hex(6)}".encode()
        self.lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lst.bind(b"\0" + self.name)
        self.lst.listen(8)
        self.lst.settimeout(IO)
        self.interval = interval
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        if serve:
            self.thread.start()

    def token(self) -> str:
        return encode_token(TokenInfo(KIND_POSIX, os.getpid(), os.getpid(), 7, b"s" * 16,
                                      int(time.time() * 1000) + 60_000, os.geteuid(),
                                      self.name, ADDR_ABSTRACT))

    def _run(self) -> None:
        try:
            c, _ = self.lst.accept()
        except OSError:
            return
        with c:
            c.settimeout(IO)
            c.recv(64)  # the CLAIM
            answer = encode_frame(FrameType.ERROR, encode_error(ErrorCode.EXPIRED, "x" * 20))
            for byte in answer:
                if self.stop.wait(self.interval):
                    return
                try:
                    c.send(bytes([byte]))
                except OSError:
                    return  # the importer gave up
                self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.lst.close()
        if self.thread.ident is not None:
            self.thread.join(IO)


def test_import_timeout_is_one_deadline_against_a_dribbling_agent() -> None:
    """An agent that sends one byte every 0.5 s (old code: each read got its own 2 s, so
    the import lasted the whole 16 s answer)."""
    base = fd_count()
    agent = FakeAgent(0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(sockshare.ExporterTimeout) as err:
            sockshare.import_socket(agent.token(), timeout=2)
        elapsed = time.monotonic() - t0
    finally:
        agent.close()
    print(f"\nimport_socket(timeout=2) against a dribbling agent: {elapsed:.2f} s")
    assert 1.9 <= elapsed < 2.5
    assert isinstance(err.value, TimeoutError)
    assert isinstance(err.value, sockshare.ExporterGone)
    assert "within the 2 s timeout" in str(err.value)
    assert f"(pid {os.getpid()}) is alive" in str(err.value)
    assert 2 <= agent.sent < 8
    sockshare.close_agent_connections()
    wait_fd_count("self", base, what="this process")


def test_import_timeout_covers_a_full_backlog() -> None:
    """An agent that never accepts and whose backlog is full (connect: EAGAIN): the
    importer keeps trying until its deadline, then ExporterTimeout."""
    base = fd_count()
    agent = FakeAgent(0.5, serve=False)  # nobody accepts
    agent.lst.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the backlog
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            fillers.append(c)
            try:
                c.connect(b"\0" + agent.name)
            except BlockingIOError:
                break
        t0 = time.monotonic()
        with pytest.raises(sockshare.ExporterTimeout):
            sockshare.import_socket(agent.token(), timeout=1)
        elapsed = time.monotonic() - t0
    finally:
        for c in fillers:
            c.close()
        agent.close()
    assert 0.9 <= elapsed < 1.5
    wait_fd_count("self", base, what="this process")


# --- 9, 10: an exporter out of descriptors -------------------------------------------------


def test_exporter_out_of_descriptors_says_so(importer: PeerProcess) -> None:
    """The exporter at EMFILE: the importer is told at once (ExporterBusy, "out of file
    descriptors"), not after its whole timeout as "gone"; export_socket raises
    ExportFailed (an OSError, errno EMFILE). Once descriptors are free again the same
    token imports, and nothing is left open."""
    exporter = _exporter(nofile=128)
    try:
        token, s = _pending_token(exporter, importer)
        base = fd_count(exporter.pid)
        spare = exporter.call("socket", family="unix", type="dgram")
        hogged = exporter.call("exhaust")
        assert hogged > 0
        t0 = time.monotonic()
        err = importer.fails("import", token=token, timeout=IO)
        elapsed = time.monotonic() - t0
        assert err.name == "ExporterBusy", err
        assert "out of file descriptors (EMFILE)" in err.msg
        assert f"pid {exporter.pid}" in err.msg
        assert elapsed < 2, elapsed  # old code: ExporterGone after the 10 s timeout
        assert importer.fails("import", token=token, timeout=IO).name == "ExporterBusy"

        err = exporter.fails("export", h=spare["h"], pid=importer.pid)
        assert err.name == "ExportFailed", err
        assert {"OSError", "SockshareError"} <= set(err.mro)
        assert "[Errno 24]" in err.msg
        assert "out of file descriptors" in err.msg
        assert exporter.call("pending") == 1

        assert exporter.call("unexhaust") == hogged
        exporter.call("close", h=spare["h"])
        wait_fd_count(exporter.pid, base, what="exporter")
        _import_ok(importer, token, s)
        settle(exporter)
    finally:
        exporter.close()
    settle(importer)


def test_export_errors_are_sockshare_errors() -> None:
    with socket.socket() as s:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait(IO)
        with pytest.raises(sockshare.ExportFailed) as err:
            sockshare.export_socket(s, gone.pid)  # no such process (any more)
        assert isinstance(err.value, OSError)
        assert "no process has pid" in str(err.value)
    with open(os.devnull, "rb") as f, pytest.raises(sockshare.ExportFailed) as err:
        sockshare.export_socket(f.fileno(), os.getpid())
    assert "not a socket" in str(err.value)
    assert _agent.agent().pending() == 0


# --- 9: strict token text ------------------------------------------------------------------


def test_token_text_is_decoded_strictly() -> None:
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, os.getpid())
    try:
        info = decode_token(token)
        # the last character with its lowest bit flipped: where that bit is padding
        # (the body is not a multiple of 3 bytes), the same bytes, encoded otherwise
        alias = B64URL[B64URL.index(token[-1]) ^ 1]
        bad = {
            "50 stars appended": token + "*" * 50,
            "padding": token + "=" * (-len(token[4:]) % 4 or 4),
            "inner space": token[:20] + " " + token[20:],
            "one character more": token + "A",
            "non-canonical last character": token[:-1] + alias,
            "non-ASCII": token + "é",
        }
        accepted = []
        for name, text in bad.items():
            try:
                decode_token(text)
            except sockshare.InvalidToken:
                continue
            accepted.append(name)
        assert not accepted
        # whitespace around it (a line read from a pipe or a file) is not part of it
        assert decode_token(f" {token}\n") == info
    finally:
        assert sockshare.release(token) is True
