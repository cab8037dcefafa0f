"""The master: the process ``sockshare serve`` started, the same pid through every upgrade.

``sockshare serve`` runs :class:`Master`, a small process that serves nothing itself: it
starts the first dispatcher generation as its child (the same command line, with
``SOCKSHARE_MASTER``), forwards signals to the current generation, follows it through
upgrades, speaks to systemd for it, and exits with its status. So a supervisor that
knows only the pid it started (a shell, Docker's PID 1, supervisord, runit, systemd
without ``MAINPID=``) keeps watching and signalling the right process, however many
times the dispatcher is replaced. The upgrade itself is unchanged (:mod:`._upgrade`):
the old dispatcher starts the new one with the listeners, proves it, hands over, exits.

What the master keeps:

* **its children**: it is a child subreaper (``PR_SET_CHILD_SUBREAPER``, Linux), so a
  new generation, whose parent is the old dispatcher, becomes the master's child when
  the old one exits; so do orphans, which it reaps (no zombies, none left unwatched);
* **a notify socket** ``<master pid>.notify`` in the runtime directory (mode 0700
  directory, ``SO_PASSCRED``), given to the generations as ``NOTIFY_SOCKET``: the
  dispatchers' ``sd_notify`` reaches the master, which learns from it which dispatcher
  is current (``SOCKSHARE_SUCCESSOR=<pid>`` when one starts a successor, ``MAINPID=<pid>``
  when it hands over) and forwards the rest (``READY=1``, ``RELOADING=1``, ``STATUS=``,
  ``FDSTORE=1`` with its descriptors) to the real ``NOTIFY_SOCKET``, if any: for systemd
  the master is the main pid for ever, and it alone says ``STOPPING=1``;
* **the write end of a pipe** whose read end every generation holds
  (``SOCKSHARE_MASTER_FD``, passed on from generation to generation): when the master
  dies, however it dies, the dispatchers read EOF and stop gracefully (see
  ``Dispatcher._master_gone``). Nothing runs on unsupervised.

Signals: SIGTERM/SIGINT go to every live generation (a stop during an upgrade stops
both), and the master exits with the current generation's status once it and every
other child are gone (children still there ``grace`` + 5 s after it are killed); a
stop the current generation begins itself (``sockshare stop``: its ``STOPPING=1``) is
one too;
SIGHUP, SIGUSR2, SIGQUIT, SIGTTIN, SIGTTOU and SIGUSR1 go to the current generation. When the
current generation exits on its own (a crash, an internal error), the master stops the
others and exits with its status (128 + n for a signal n), as the dispatcher's own exit
would have been seen before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

from sockshare._errors import BackendUnavailable, SockshareError
from sockshare.backends import _inherit
from sockshare.server._control import ControlError, runtime_dir
from sockshare.server._pidfile import pid_alive

__all__ = ["ENV_MASTER", "ENV_MASTER_FD", "FORWARDED", "NOTIFY_SUFFIX", "SUCCESSOR_FIELD",
           "Master", "pass_master_fd"]

log = logging.getLogger("sockshare.server")

#: Environment of a dispatcher generation: the master's pid and the read end of its pipe.
ENV_MASTER = "SOCKSHARE_MASTER"
ENV_MASTER_FD = "SOCKSHARE_MASTER_FD"
#: The master's notify socket: ``<pid>.notify`` in the runtime directory.
NOTIFY_SUFFIX = ".notify"
#: sd_notify field a dispatcher sends its master when it starts a successor.
SUCCESSOR_FIELD = "SOCKSHARE_SUCCESSOR"
#: Signals the master passes to the current generation (TERM and INT: to every one).
#: (none on Windows, which has no master: see _platform)
FORWARDED: tuple[signal.Signals, ...] = () if sys.platform == "win32" else (
    signal.SIGHUP, signal.SIGUSR2, signal.SIGQUIT, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGUSR1)
STOPS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_CHILD_SUBREAPER = 36
_UCRED = struct.Struct("3i")
_MAX_FDS = 253


def set_subreaper() -> bool:
    """Become a child subreaper (Linux): orphaned descendants are re-parented to us."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def pass_master_fd(fd: int, floor: int) -> int:
    """A copy of the master pipe's read end numbered at least ``floor`` (above the
    descriptors 3.. that ``python -m sockshare.backends._inherit`` renumbers), for
    ``pass_fds``; the caller closes it once the child is started."""
    import fcntl  # (POSIX only: there is no master on Windows)

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(floor, 3))


def describe_exit(rc: int | None) -> str:
    """``status n``, ``signal SIGKILL`` (as the supervisor says it of a worker)."""
    if rc is None:
        return "an unknown status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _exit_status(rc: int) -> int:
    """A return code (``-n`` for a signal ``n``) as a shell shows it: 128 + n."""
    return 128 - rc if rc < 0 else rc



class Master:
    """``Master(argv, grace=...).run()`` runs the server and returns its exit status."""

    def __init__(self, argv: list[str], *, grace: float) -> None:
        #: the dispatcher's command line (the same as ours: the environment tells them apart)
        self.argv = argv
        self.grace = grace
        self.pid = os.getpid()
        #: the current dispatcher generation, and every one that may still run
        self.current = 0
        self.dispatchers: set[int] = set()
        self.generation = 0
        #: dispatchers that said READY=1 (their signal handlers are installed), and the
        #: signals held for the current one until it has
        self.ready: set[int] = set()
        self._held: list[int] = []
        self.stopping: int = 0          # the signal that stops us (0: not stopping)
        self.status: int | None = None  # the current generation's exit status
        self.upstream = _inherit._notify_address()
        self.notify_path = ""
        self._notify: socket.socket | None = None
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._subreaper = False
        self._said_stopping = False
        self._orphans_deadline = 0.0

    # -- life --------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self._cleanup()

    def _run(self) -> int:
        try:
            inherited = _inherit.listen_fds()
        except BackendUnavailable as exc:
            log.error("cannot start: %s", exc)
            return 1
        self._subreaper = set_subreaper()
        try:
            rundir = runtime_dir()
        except ControlError as exc:
            log.error("cannot start: %s", exc)
            return 1
        self.notify_path = os.path.join(rundir, f"{self.pid}{NOTIFY_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)   # (a pid of ours that was used before)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self.notify_path)
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._notify, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (*STOPS, *FORWARDED, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        life_r, life_w = os.pipe()
        try:
            pid = self._start(inherited, life_r)
        except OSError as exc:
            log.error("cannot start the dispatcher: %s", exc)
            os.close(life_w)
            return 1
        finally:
            os.close(life_r)
            for _name, s in inherited:
                s.close()
        self.current = pid
        self.dispatchers.add(pid)
        self.generation = 1
        log.info("master pid %d: dispatcher pid %d started%s", self.pid, pid,
                 "" if self._subreaper else " (not a child subreaper: upgrades are followed "
                 "by pid only)")
        try:
            while not self._done():
                self._turn()
        finally:
            os.close(life_w)   # (any dispatcher still there reads EOF and stops)
        status = self.status if self.status is not None else 1
        log.info("master: exiting with status %d", status)
        return status

    def _start(self, inherited: list[tuple[str, socket.socket]], life_r: int) -> int:
        """The first generation: our command line, in its own process group (a
        terminal's Ctrl-C reaches only the master, which passes it on once)."""
        env = dict(os.environ)
        argv = list(self.argv)
        fds: list[int] = []
        if inherited:
            env_add, fds = _inherit.pass_listen_fds(inherited)
            env.update(env_add)
            argv = [sys.executable, "-m", "sockshare.backends._inherit", *map(str, fds), "--", *argv]
        life = pass_master_fd(life_r, 3 + len(fds))
        try:
            env[ENV_MASTER] = str(self.pid)
            env[ENV_MASTER_FD] = str(life)
            env["NOTIFY_SOCKET"] = self.notify_path
            proc = subprocess.Popen(argv, env=env, pass_fds=[*fds, life], process_group=0,
                                    stdin=subprocess.DEVNULL)
        finally:
            os.close(life)
        proc.returncode = 0   # reaped by _reap (waitpid(-1)), never by Popen
        return proc.pid

    def _done(self) -> bool:
        if self.status is None or any(pid_alive(p) for p in self.dispatchers):
            return False
        if not self._subreaper:
            return True
        # wait for the orphans we inherited (workers of a generation that crashed):
        # they finish within grace; past grace + 5 s they are killed
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid:
            log.debug("master: reaped pid %d (%s)", pid,
                      describe_exit(os.waitstatus_to_exitcode(status)))
            return False
        if not self._orphans_deadline:
            self._orphans_deadline = time.monotonic() + self.grace + 5.0
        elif time.monotonic() > self._orphans_deadline:
            self._kill_children()
            self._orphans_deadline = time.monotonic() + 5.0
        return False

    def _turn(self) -> None:
        for key, _ in self._sel.select(0.2):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    while self._wake_r.recv(512):
                        pass
        self._read_notify()   # first: MAINPID= comes before the old dispatcher's exit
        signals, self._signals = self._signals, []
        for sig in signals:
            self._handle(sig)
        self._reap()
        self._check_current()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    # -- signals -----------------------------------------------------------------------

    def _handle(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return
        name = signal.Signals(sig).name
        if sig in STOPS:
            if not self.stopping:
                log.info("%s: stopping dispatcher pid %d%s", name, self.current,
                         "" if len(self._live()) < 2 else f" and {len(self._live()) - 1} other(s)")
                self.stopping = sig
                self._say_stopping()
            for pid in self._live():
                self._kill(pid, sig)
            return
        if self.stopping:
            log.info("%s ignored: stopping", name)
            return
        if self.current not in self.ready:
            # its default action would end it (SIGHUP, SIGUSR1, SIGUSR2) or stop it (SIGTTIN)
            log.info("%s: held until dispatcher pid %d is ready", name, self.current)
            self._held.append(sig)
            return
        log.info("%s: passed on to dispatcher pid %d", name, self.current)
        self._kill(self.current, sig)

    def _live(self) -> list[int]:
        return sorted(p for p in self.dispatchers if pid_alive(p))

    def _kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _kill_children(self) -> None:
        """SIGKILL what is left of our children (orphans past their grace)."""
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    for pid in map(int, f.read().split()):
                        log.warning("master: pid %d still runs after the stop: killed", pid)
                        self._kill(pid, signal.SIGKILL)

    def _say_stopping(self) -> None:
        if not self._said_stopping:
            self._said_stopping = True
            self._forward("STOPPING=1", [])

    # -- children ----------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self._exited(pid, os.waitstatus_to_exitcode(status))

    def _check_current(self) -> None:
        """A dispatcher that is not (yet) our child, whose parent reaped it: gone too."""
        for pid in list(self.dispatchers):
            if not pid_alive(pid) and not self._is_child(pid):
                self._exited(pid, None)

    def _is_child(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1]) == self.pid
        except (OSError, IndexError, ValueError):
            return False

    def _exited(self, pid: int, rc: int | None) -> None:
        """``pid`` is gone; ``rc``: its return code (``-n``: signal ``n``), None when
        another process reaped it."""
        if pid not in self.dispatchers:
            log.debug("master: reaped pid %d (%s)", pid, describe_exit(rc))
            return
        self.dispatchers.discard(pid)
        what = describe_exit(rc)
        if pid != self.current:
            log.info("master: dispatcher pid %d exited with %s", pid, what)
            return
        asked = bool(self.stopping)
        if asked and rc == -self.stopping and pid not in self.ready:
            # the stop came before it had installed its signal handlers: a stop all the same
            log.info("master: dispatcher pid %d stopped while starting", pid)
            rc = 0
        if not asked:
            successor = self._live()
            if rc == 0 and successor:
                # it handed over without our hearing MAINPID= (cannot happen unless a
                # datagram was lost): follow the one it started
                self._follow(successor[-1], "exited 0 beside it")
                return
            log.error("master: the dispatcher (pid %d) exited with %s: stopping", pid, what)
            self._say_stopping()
            self.stopping = signal.SIGTERM
            for other in successor:
                self._kill(other, signal.SIGTERM)
        else:
            log.info("master: dispatcher pid %d exited with %s", pid, what)
        # (not our child: its parent reaped it; without a subreaper, after an upgrade)
        self.status = _exit_status(rc) if rc is not None else (0 if asked else 1)

    def _follow(self, pid: int, why: str) -> None:
        old, self.current = self.current, pid
        self.dispatchers.add(pid)
        self.generation += 1
        log.info("master: dispatcher pid %d %s; pid %d is the current one (generation %d)",
                 old, why, pid, self.generation)

    # -- notify ------------------------------------------------------------------------

    def _read_notify(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data, anc, _flags, _addr = self._notify.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(_MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("master: notify socket: %s", exc)
                return
            sender, fds = 0, []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = _UCRED.unpack(payload[:_UCRED.size])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // 4
                    fds += list(struct.unpack(f"{n}i", payload[:n * 4]))
            try:
                self._notified(sender, data.decode(errors="replace"), fds)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _notified(self, sender: int, text: str, fds: list[int]) -> None:
        if sender not in self.dispatchers:
            log.debug("master: notify from pid %d, not a dispatcher: ignored", sender)
            return
        keep: list[str] = []
        for line in text.split("\n"):
            key, _, value = line.partition("=")
            if line == "READY=1":
                self.ready.add(sender)
                if sender == self.current and self._held and not self.stopping:
                    held, self._held = self._held, []
                    for sig in held:
                        log.info("%s: passed on to dispatcher pid %d", signal.Signals(sig).name,
                                 sender)
                        self._kill(sender, sig)
                keep.append(line)
            elif key == SUCCESSOR_FIELD and value.isdigit():
                self.dispatchers.add(int(value))
            elif key == "MAINPID":
                if sender == self.current and value.isdigit() and int(value) != sender:
                    self._follow(int(value), "handed over")
            elif key == "STOPPING":
                # the master says it, once, for the whole server; the current dispatcher
                # says it when it stops without a signal from us (``sockshare stop``,
                # ``{"cmd": "stop"}``): a stop all the same, as SIGTERM is
                if sender == self.current and not self.stopping:
                    log.info("master: dispatcher pid %d is stopping", sender)
                    self.stopping = signal.SIGTERM
                    self._say_stopping()
                continue
            elif line:
                keep.append(line)
        if keep or fds:
            self._forward("\n".join(keep), fds)

    def _forward(self, text: str, fds: list[int]) -> None:
        if self.upstream is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                       if fds else [])
                s.sendmsg([text.encode()], anc, 0, self.upstream)
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED or not self._said_stopping:
                log.warning("sd_notify %r failed: %s", text.split("\n", 1)[0], exc)

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for sock in (self._notify, self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(OSError, SockshareError):
                    sock.close()
        self._sel.close()
        if self.notify_path:
            with contextlib.suppress(OSError):
                os.unlink(self.notify_path)
