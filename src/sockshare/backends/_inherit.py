"""Descriptors handed over at exec time: systemd socket activation and sd_notify.

Two directions, both spoken by systemd and by anything that imitates it (the tests use
a harness that speaks the same protocol):

* **Receiving at start-up**: ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` name
  the descriptors starting at 3 that the parent passed. :func:`listen_fds` validates
  them (the pid must be ours, the count a positive integer, the names as many as the
  descriptors, each descriptor open and a socket), marks them close-on-exec, wraps
  them, and removes the variables so that children do not inherit a stale claim.
* **Talking to the service manager**: :func:`notify` sends ``READY=1``,
  ``RELOADING=1``, ``STOPPING=1``, ``MAINPID=...`` or ``STATUS=...`` datagrams to
  ``$NOTIFY_SOCKET``; :func:`store_fds` sends ``FDSTORE=1`` with the descriptors
  attached, so listeners survive a crash of the process that held them.

:func:`pass_listen_fds` prepares the same environment for a child started with
``subprocess`` (``pass_fds``), which is how ``sockshare upgrade`` hands listeners to a
new dispatcher when systemd is not the parent.
"""

from __future__ import annotations

import array
import os
import socket
import stat

from sockshare._errors import BackendUnavailable

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify", "pass_listen_fds", "store_fds"]

SD_LISTEN_FDS_START = 3
_MAX_FDS = 4096


def listen_fds(*, unset_environment: bool = True,
               environ: dict[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets systemd (or a parent imitating it) passed to this process.

    Returns ``[(name, socket), ...]`` in descriptor order; names default to
    ``"unknown"`` as in systemd. Returns ``[]`` when the variables are absent or meant
    for another pid. Raises :class:`BackendUnavailable` when they are malformed or a
    named descriptor is not an open socket (a misconfiguration that should not be
    silently ignored).
    """
    env = os.environ if environ is None else environ
    pid_text, count_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not count_text:
        return []
    if not pid_text or not pid_text.isdigit():
        raise BackendUnavailable(f"LISTEN_FDS is set but LISTEN_PID is {pid_text!r}, not a pid")
    if int(pid_text) != os.getpid():
        return []  # meant for another process (we are a child that inherited the env)
    if not count_text.isdigit() or not 0 < int(count_text) <= _MAX_FDS:
        raise BackendUnavailable(f"LISTEN_FDS={count_text!r} is not a count of descriptors")
    count = int(count_text)
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise BackendUnavailable(
            f"LISTEN_FDNAMES names {len(names)} descriptors but LISTEN_FDS says {count}")
    out: list[tuple[str, socket.socket]] = []
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise BackendUnavailable(f"LISTEN_FDS names fd {fd}, which is not open") from None
        if not stat.S_ISSOCK(mode):
            raise BackendUnavailable(f"LISTEN_FDS names fd {fd} ({name}), which is not a socket")
        os.set_inheritable(fd, False)
        out.append((name, socket.socket(fileno=fd)))
    return out


def pass_listen_fds(socks: list[tuple[str, socket.socket]]) -> tuple[dict[str, str], list[int]]:
    """Environment and ``pass_fds`` for a child that should receive ``socks`` the
    systemd way. The child's descriptors must be renumbered to 3.. : use
    ``preexec_fn``-free :func:`os.dup2` in a wrapper, or ``python -m sockshare.backends._inherit``."""
    env = {"LISTEN_FDS": str(len(socks)), "LISTEN_FDNAMES": ":".join(n for n, _ in socks)}
    return env, [s.fileno() for _, s in socks]


def _notify_address() -> str | bytes | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return b"\0" + addr[1:].encode()
    if not addr.startswith("/"):
        raise BackendUnavailable(f"NOTIFY_SOCKET={addr!r} is neither a path nor @abstract")
    return addr


def notify(state: str, fds: list[int] | tuple[int, ...] = ()) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager.

    Returns False when there is no ``$NOTIFY_SOCKET`` (not under systemd). Descriptors
    in ``fds`` ride as SCM_RIGHTS (for ``FDSTORE=1``).
    """
    addr = _notify_address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        data = state.encode()
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            s.sendmsg([data], anc, 0, addr)
        else:
            s.sendto(data, addr)
    return True


def store_fds(socks: list[socket.socket], name: str) -> bool:
    """Keep ``socks`` in the service manager's fd store under ``name`` (``FDSTORE=1``).

    systemd hands them back at the next start in ``LISTEN_FDS``/``LISTEN_FDNAMES``
    (with ``FileDescriptorStoreMax=`` set in the unit)."""
    if ":" in name or "\n" in name or len(name) > 255:
        raise ValueError("an fd store name has no ':' or newline and at most 255 characters")
    return notify(f"FDSTORE=1\nFDNAME={name}", [s.fileno() for s in socks])


def _exec_with_listen_fds(argv: list[str]) -> None:  # pragma: no cover - runs after exec
    """``python -m sockshare.backends._inherit FD... -- PROGRAM ARGS``: renumber the
    inherited descriptors to 3.., set LISTEN_PID to our pid and exec the program."""
    sep = argv.index("--")
    fds = [int(a) for a in argv[:sep]]
    import fcntl

    floor = SD_LISTEN_FDS_START + len(fds)  # stage above the targets 3..3+n-1
    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]
    for i, fd in enumerate(staged):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.execvp(argv[sep + 1], argv[sep + 1:])


if __name__ == "__main__":  # pragma: no cover
    import sys

    _exec_with_listen_fds(sys.argv[1:])
