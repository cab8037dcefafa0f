"""``--control PATH`` never changes a directory the server did not create, and refuses
one where another user could replace the socket (issue 18, item 4).

Each test starts a real ``sockshare serve`` with ``--control`` in a directory it made
itself (never the real /tmp, whose mode is not ours to touch), with its own
``XDG_RUNTIME_DIR`` so that the runtime directory is private to the test too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ROOT, ask, env_with_apps, exit_output

from sockshare.server._control import request

pytestmark = pytest.mark.timeout(60)


def _serve(tmp: Path, control: Path) -> subprocess.Popen[bytes]:
    env = env_with_apps()
    env["XDG_RUNTIME_DIR"] = str(tmp / "xdg")
    (tmp / "xdg").mkdir(mode=0o700, exist_ok=True)
    argv = [sys.executable, "-m", "sockshare.server._cli", "serve", "serve_apps:app",
            "--bind", "127.0.0.1:0", "--workers", "1", "--grace", "2", "--control", str(control)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))


def _wait_status(proc: subprocess.Popen[bytes], control: Path, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        if control.exists():
            with contextlib.suppress(Exception):
                resp = request(str(control), {"cmd": "status"}, timeout=2.0)
                if resp.get("ok") and any(w["state"] == "ready" for w in resp["status"]["workers"]):
                    return dict(resp["status"])
        time.sleep(0.05)
    raise AssertionError(f"no ready server at {control}")


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out.decode(errors="replace")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mode", [0o1777, 0o755, 0o700], ids=["1777", "0755", "0700"])
def test_control_in_an_existing_directory_keeps_its_mode(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)   # a /tmp-like directory (1777), a public one, a private one
    control = shared / "x.ctl"
    proc = _serve(tmp_path, control)
    try:
        st = _wait_status(proc, control)
        assert _mode(shared) == mode
        assert _mode(control) == 0o600
        assert st["control"] == str(control)
        host, port = st["listeners"][0]["address"].rsplit(":", 1)
        assert ask((host, int(port)))["id"] == 1
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert not control.exists()   # its own socket is removed...
    assert _mode(shared) == mode   # ...and the directory is as it was


def test_missing_control_directory_is_created_private(tmp_path: Path) -> None:
    control = tmp_path / "new" / "x.ctl"
    proc = _serve(tmp_path, control)
    try:
        _wait_status(proc, control)
        assert _mode(control.parent) == 0o700
    finally:
        _stop(proc)


def _refused(tmp_path: Path, control: Path) -> str:
    proc = _serve(tmp_path, control)
    out = exit_output(proc)
    assert proc.returncode == 1, out
    assert not control.exists()
    return out


def test_world_writable_directory_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    out = _refused(tmp_path, open_dir / "x.ctl")
    assert "writable by every user and has no sticky bit" in out, out
    assert "--control" in out
    assert _mode(open_dir) == 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o755)
    os.chown(theirs, 65534, 65534)   # nobody
    out = _refused(tmp_path, theirs / "x.ctl")
    assert "belongs to uid 65534" in out, out
    assert _mode(theirs) == 0o755
    assert os.stat(theirs).st_uid == 65534
