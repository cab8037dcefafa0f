"""Workers in other languages through ``--worker-cmd``: the PHP and C reference peers.

The dispatcher runs the command with ``SOCKSHARE_CHANNEL`` / ``SOCKSHARE_WORKER_ID`` in
the environment and the channel address appended as the last argument (the command has
no ``{channel}`` placeholder), which is ``argv[1]`` for ``php worker.php`` and for the
compiled C peer. A worker counts as working when it completed the channel handshake
(state ``ready``), accepted handoffs, and every client got a non-empty answer.

Without php-cli or gcc these tests are skipped with the package to install -- except on
CI (``CI=true``), where a missing tool is a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import IN_CI, ROOT, Server, ask, connect, read_line

pytestmark = pytest.mark.timeout(90)

PHP_WORKER = ROOT / "examples" / "php" / "worker.php"
C_WORKER = ROOT / "examples" / "c" / "worker.c"


def need(ok: bool, why: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def _request(addr: object) -> bytes:
    with connect(addr, timeout=10) as s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
            if b"\r\n\r\n" in buf and len(buf) > 200:
                break
    return buf


def _exercise(srv: Server, expect_exe: str, marker: bytes = b"") -> None:
    st = srv.status()
    pids = [w["pid"] for w in st["workers"]]
    for pid in pids:
        exe = Path(f"/proc/{pid}/exe").resolve().name
        assert expect_exe in exe, (pid, exe)
    addr = srv.address()
    answers = [_request(addr) for _ in range(6)]
    assert all(answers), answers
    assert all(marker in a for a in answers), answers
    st = srv.status()
    assert st["counters"]["handoffs"] == 6
    assert st["counters"]["refused"] == 0
    assert st["counters"]["redispatches"] == 0
    assert {w["state"] for w in st["workers"]} == {"ready"}
    # the worker reports its closes: its open-connection count falls back to 0
    deadline = time.monotonic() + 10
    while sum(w["connections"] for w in st["workers"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        st = srv.status()
    assert [w["connections"] for w in st["workers"]] == [0, 0], st["workers"]


def test_php_worker(tmp_path: Path) -> None:
    need(shutil.which("php") is not None, "install php-cli (apt-get install php-cli)")
    need(PHP_WORKER.exists(), f"{PHP_WORKER.relative_to(ROOT)} is not written yet")
    with Server(tmp_path, "--worker-cmd", f"php {PHP_WORKER}", app=None, workers=2) as srv:
        _exercise(srv, "php")


def test_c_worker(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    need(cc is not None, "install gcc (apt-get install gcc)")
    need(C_WORKER.exists(), f"{C_WORKER.relative_to(ROOT)} is not written yet")
    assert cc is not None
    binary = tmp_path / "c-worker"
    sources = [str(C_WORKER), str(C_WORKER.parent / "sockshare_peer.c")]  # + the peer library
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), *sources], check=True,
                   timeout=120, capture_output=True)
    with Server(tmp_path, "--worker-cmd", str(binary), app=None, workers=2) as srv:
        _exercise(srv, "c-worker", marker=b"C worker")


# A minimal foreign worker: the blocking Channel API only, no sockshare.server code. It
# shows the contract a PHP or C worker follows: connect to argv[-1], accept, serve,
# report closes as {"ev": "closed", "n": k}.
PLAIN_WORKER = """
import json, os, sys
from sockshare import Channel
ch = Channel.connect(sys.argv[-1], name="plain")
for h in ch:
    line = h.data
    sock = h.socket
    while not line.endswith(b"\\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        line += chunk
    h.accept()
    sock.sendall(json.dumps({"argv": sys.argv[1:], "env_id": os.environ["SOCKSHARE_WORKER_ID"],
                             "env_channel": os.environ["SOCKSHARE_CHANNEL"],
                             "line": line.decode(), "meta": h.meta}).encode() + b"\\n")
    sock.close()
    ch.send_control({"ev": "closed", "n": 1})
"""


def test_worker_cmd_gets_the_channel_as_last_argument(tmp_path: Path) -> None:
    script = tmp_path / "plain_worker.py"
    script.write_text(PLAIN_WORKER)
    with Server(tmp_path, "--worker-cmd", f"{sys.executable} {script} --flag", app=None,
                workers=2) as srv:
        chan = srv.status()["channel"]
        addr = srv.address()
        with connect(addr) as s:
            s.sendall(b"hello\n")
            answer = json.loads(read_line(s))
        assert answer["argv"] == ["--flag", chan]
        assert answer["env_channel"] == chan
        assert answer["env_id"] in ("1", "2")
        assert answer["line"] == "hello\n"
        assert answer["meta"]["client"][0] == "127.0.0.1"
        srv.wait_for(lambda st: sum(w["connections"] for w in st["workers"]) == 0,
                     what="the close report applied")


def test_worker_cmd_placeholders(tmp_path: Path) -> None:
    cmd = (f"{sys.executable} -m sockshare.server.worker --app serve_apps:app "
           "--channel {channel} --id {id}")
    with Server(tmp_path, "--policy", "round-robin", "--worker-cmd", cmd, app=None,
                workers=2) as srv:
        addr = srv.address()
        assert [ask(addr)["id"] for _ in range(4)] == [1, 2, 1, 2]
