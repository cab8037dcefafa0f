"""The ``sockshare`` command line.

Subcommands follow gunicorn/uvicorn conventions (``sockshare serve APP --bind ...``):

* ``sockshare --version``
* ``sockshare doctor`` -- which backends work on this machine, and why not;
* ``sockshare serve`` / ``status`` -- the server runtime (:mod:`sockshare.server`);
* ``sockshare send`` / ``recv`` / ``bench carriers`` -- IPC carriers (:mod:`sockshare.carriers`).

Each subcommand module registers itself with ``add_commands(subparsers)``; modules
that cannot be imported here (a missing optional dependency) are reported, not fatal.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import sockshare
from sockshare._version import __version__

__all__ = ["main"]

_COMMAND_MODULES = ("sockshare.server._cli", "sockshare.carriers._cli")


def _probe_scm() -> tuple[bool, str]:
    if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "SCM_RIGHTS"):
        return False, "no AF_UNIX/SCM_RIGHTS on this platform"
    from sockshare.backends._scm import recv_with_fds, send_with_fds

    a, b = socket.socketpair()
    try:
        r, w = os.pipe()
        try:
            send_with_fds(a, b"x", [r])
            _data, fds = recv_with_fds(b)
            for fd in fds:
                os.close(fd)
            return (len(fds) == 1, "descriptor passed and received close-on-exec")
        finally:
            os.close(r)
            os.close(w)
    except OSError as exc:
        return False, str(exc)
    finally:
        a.close()
        b.close()


def _probe_tokens() -> tuple[bool, str]:
    try:
        a, b = socket.socketpair() if hasattr(socket, "AF_UNIX") else _tcp_pair()
        try:
            s = sockshare.import_socket(sockshare.export_socket(a, os.getpid()))
            s.sendall(b"ok")
            ok = b.recv(2) == b"ok"
            s.close()
        finally:
            a.close()
            b.close()
        return ok, "export/import round trip in this process"
    except (OSError, sockshare.SockshareError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    try:
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
        return s, c
    finally:
        lst.close()


def _probe_pidfd() -> tuple[bool, str]:
    try:
        mod = importlib.import_module("sockshare.backends._pidfd")
    except ImportError as exc:
        return False, str(exc)
    result: tuple[bool, str] = mod.available()
    return result


def _probe_wsa() -> tuple[bool, str]:
    if sys.platform != "win32":
        return False, "Windows only (WSADuplicateSocket)"
    return True, "socket.share/fromshare present"


def _probe_systemd() -> tuple[bool, str]:
    if os.environ.get("LISTEN_FDS"):
        return True, f"LISTEN_FDS={os.environ['LISTEN_FDS']} LISTEN_PID={os.environ.get('LISTEN_PID')}"
    return False, "not started by systemd socket activation (no LISTEN_FDS)"


def _probe_speedups() -> tuple[bool, str]:
    """Which hot paths run: compiled (sockshare._speedups) or pure Python, and why."""
    from sockshare import _fast

    return _fast.speedups is not None, f"hot paths: {_fast.active_path()}"


def _doctor(args: argparse.Namespace) -> int:
    checks: dict[str, tuple[bool, str]] = {
        "speedups": _probe_speedups(),
        "scm_rights": _probe_scm(),
        "tokens": _probe_tokens(),
        "pidfd_getfd": _probe_pidfd(),
        "wsaduplicatesocket": _probe_wsa(),
        "systemd_activation": _probe_systemd(),
    }
    try:
        from sockshare import carriers

        avail: dict[str, Any] = carriers.available()
        for name, status in avail.items():
            ok, why = status if isinstance(status, tuple) else (bool(status), "")
            checks[f"carrier:{name}"] = (bool(ok), str(why))
    except (ImportError, AttributeError) as exc:
        checks["carriers"] = (False, str(exc))
    if args.json:
        print(json.dumps({k: {"ok": ok, "why": why} for k, (ok, why) in checks.items()}, indent=2))
    else:
        print(f"sockshare {__version__} on {sys.platform}, Python {sys.version.split()[0]}")
        for name, (ok, why) in checks.items():
            print(f"  {'ok ' if ok else 'no '} {name:<24} {why}")
    return 0 if checks["tokens"][0] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockshare",
        description="Move live sockets between processes.",
    )
    parser.add_argument("--version", action="version", version=f"sockshare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = sub.add_parser("doctor", help="report which backends work on this machine")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=_doctor)
    for modname in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            if exc.name == modname or (exc.name and not exc.name.startswith("sockshare")):
                continue  # not built here, or an optional dependency is missing
            raise
        mod.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code: int = func(args)
    except sockshare.SockshareError as exc:
        print(f"sockshare: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
