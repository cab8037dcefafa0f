"""The files of ``deploy/`` that can be checked without Docker, Kubernetes, nginx or IPVS.

* ``sockshare-agent-check.sh`` (keepalived's MISC_CHECK) against a real agent: the
  exit status carries the weight;
* the command lines of the Dockerfile and the Kubernetes Deployment are valid
  ``sockshare serve`` flags;
* the Deployment's ``terminationGracePeriodSeconds`` covers the preStop sleep, the
  ``--grace`` time and a margin.

``haproxy.cfg`` runs in ``test_haproxy.py``, the systemd units in ``test_live_systemd.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from serve_helpers import ROOT, Server
from test_health import agent

from sockshare.server._cli import add_commands
from sockshare.server._config import from_args
from sockshare.server._control import request

DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "sockshare-agent-check.sh"


def _check(port: int) -> int:
    return subprocess.run([str(SCRIPT), "127.0.0.1", str(port)], capture_output=True,
                          timeout=10, check=False).returncode


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_agent_check_script_exit_status_is_the_weight(tmp_path: Path) -> None:
    with Server(tmp_path, "--agent", "127.0.0.1:0", workers=1) as srv:
        host, _, port_text = srv.status()["agent"].rpartition(":")
        port = int(port_text)
        assert agent((host, port)) == "ready 100%"
        assert _check(port) == 102          # weight 100
        request(srv.control, {"cmd": "health", "set": "drain"})
        assert _check(port) == 2            # weight 0
        request(srv.control, {"cmd": "health", "set": "maint"})
        assert _check(port) == 1            # down
    with socket.socket() as s:              # nobody listens: down
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert _check(free) == 1


def _serve_args(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.command == "serve"
    from_args(args)   # validates


def test_dockerfile_command_line_is_valid() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    cmd = re.search(r"^CMD (\[.*?\])$", text.replace("\\\n", ""), re.M | re.S)
    assert entry is not None
    assert cmd is not None
    assert json.loads(entry.group(1)) == ["sockshare"]
    _serve_args(json.loads(cmd.group(1)))


def test_kubernetes_deployment_fits_the_grace_time() -> None:
    text = (DEPLOY / "kubernetes.yaml").read_text()
    args = re.search(r"^\s*args: (\[.*?\])$", text, re.M | re.S)
    assert args is not None
    argv: list[str] = json.loads(" ".join(args.group(1).split()))
    _serve_args(argv)
    grace = float(argv[argv.index("--grace") + 1])
    pre_stop = re.search(r'command: \["/bin/sh", "-c", "(.*)"\]', text)
    assert pre_stop is not None
    assert "sockshare health drain" in pre_stop.group(1)
    sleep = float(shlex.split(pre_stop.group(1).split(";")[-1])[-1])
    period = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
    assert period is not None
    assert int(period.group(1)) >= sleep + grace + 5
    assert "path: /healthz, port: metrics" in text
