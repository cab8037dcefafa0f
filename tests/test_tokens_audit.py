"""Findings of the token audit (docs against code), each with real processes and sockets.

* An importer at its descriptor limit gets :class:`~sockshare.ImportFailed` (a
  ``TokenError`` and an ``OSError``: EMFILE), not a bare ``OSError`` nor a
  ``RemoteProtocolError`` blaming the exporter (README, "Errors"); the token is not
  consumed.
* A token whose GRANT was never confirmed (the importer hung up) and whose lifetime ran
  out meanwhile is expired, not consumed (docs/protocol.md, section 4.3, step 6).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sockshare
from sockshare.backends._agent import agent
from sockshare.protocol import FrameType, decode_token, encode_frame
from sockshare.protocol._messages import Claim, encode_claim
from sockshare.protocol._token import ADDR_ABSTRACT
from tests._fdcount import fd_count, wait_fd_count

IO = 10.0
SRC = str(Path(__file__).resolve().parents[1] / "src")

_IMPORTER = r"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
import sockshare
warm = sys.argv[1] == "warm"
first, second = sys.stdin.readline().split()
if warm:  # an import before: the connection to the agent is pooled
    sockshare.import_socket(first, timeout=10).close()
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    sockshare.import_socket(second, timeout=10)
    print("imported")
except BaseException as exc:
    print(type(exc).__name__, isinstance(exc, sockshare.TokenError))
for fd in held:
    os.close(fd)
n = len(os.listdir("/proc/self/fd"))
sockshare.import_socket(second, timeout=10).close()  # not consumed, nothing left open
sockshare.close_agent_connections()
print(n, len(os.listdir("/proc/self/fd")))
"""


@pytest.mark.parametrize("pool", ["cold", "warm"])
def test_importer_out_of_descriptors_gets_a_token_error(pool: str) -> None:
    a, b = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.Popen(
        [sys.executable, "-c", _IMPORTER, pool], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=env)
    try:
        with a, b:
            tokens = [sockshare.export_socket(a, p.pid) for _ in range(2)]
        out, _ = p.communicate(" ".join(tokens) + "\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = out.splitlines()
    assert p.returncode == 0, out
    before, after = lines[1].split()
    assert before == after  # the failed import left nothing open in the importer
    assert sockshare.release(tokens[0]) is (pool == "cold")  # the second was imported
    assert agent().pending() == 0
    name, is_token_error = lines[0].split()
    assert name == "ImportFailed", "the exporter is blamed for our own fd limit"
    assert is_token_error == "True", f"{name} is not a TokenError"


def test_a_grant_never_confirmed_then_expired_is_expired_not_consumed() -> None:
    sockshare.close_agent_connections()
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, os.getpid(), ttl=0.5)
    time.sleep(0.1)  # the agent thread runs
    base = fd_count()  # with the agent's duplicate
    info = decode_token(token)
    assert info.address_kind == ADDR_ABSTRACT
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(IO)
        c.connect(b"\0" + info.address)
        c.sendall(encode_frame(FrameType.CLAIM,
                               encode_claim(Claim(info.token_id, info.secret, os.getpid()))))
        _data, fds, _flags, _ = socket.recv_fds(c, 4096, 1)
        assert len(fds) == 1  # the GRANT
        for fd in fds:
            os.close(fd)
        time.sleep(0.7)  # the token's lifetime runs out before any DONE
    # hung up without DONE: the agent takes it that the socket never arrived
    wait_fd_count("self", base - 1, what="this process (the agent's duplicate closed)")
    with pytest.raises(sockshare.TokenExpired):
        sockshare.import_socket(token, timeout=IO)
    sockshare.close_agent_connections()


_EXPORT_IN_PIDNS = r"""
import errno, os, socket
import sockshare
from sockshare.backends import _pidfd
assert os.getpid() == 1 and not _pidfd.proc_is_ours()  # /proc shows another pid namespace
a, b = socket.socketpair()
try:
    sockshare.export_socket(a, 3999999)  # above the largest pid_max: no such process
    print("exported")
except sockshare.ExportFailed as exc:
    print("ExportFailed", errno.errorcode.get(exc.errno or 0))
"""


def test_export_for_a_missing_pid_fails_where_proc_is_not_ours() -> None:
    """README, "Tokens": ``export_socket`` raises ``ExportFailed`` for a target pid that
    does not exist. In a pid namespace whose /proc is another's (``unshare -p`` without
    remounting /proc, as some containers run), the identity check is skipped, and so was
    that refusal: the token was made for a pid nobody has."""
    try:
        r = subprocess.run(["unshare", "-p", "-f", sys.executable, "-c", _EXPORT_IN_PIDNS], check=False,
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHONPATH": SRC})
    except FileNotFoundError:
        pytest.skip("no unshare(1) here")
    if r.returncode != 0 and "unshare" in r.stderr:
        pytest.skip(f"cannot make a pid namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ExportFailed", "ESRCH"]
