"""The ``sockshare`` command: version, doctor, and the subcommands it registers."""

from __future__ import annotations

import json
import subprocess
import sys

import sockshare


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockshare.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"sockshare {sockshare.__version__}"


def test_doctor_reports_each_backend_and_why() -> None:
    out = _run("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["scm_rights"]["ok"] is True
    assert report["tokens"]["ok"] is True
    assert report["wsaduplicatesocket"] == {"ok": False, "why": "Windows only (WSADuplicateSocket)"}
    assert "pidfd_getfd" in report
    assert all(set(v) == {"ok", "why"} for v in report.values())
    assert any(k.startswith("carrier:") for k in report)
    text = _run("doctor")
    assert text.returncode == 0
    assert "scm_rights" in text.stdout


def test_help_lists_every_command() -> None:
    out = _run("--help")
    for command in ("doctor", "serve", "status", "send", "recv", "bench"):
        assert command in out.stdout


def test_no_command_prints_usage() -> None:
    out = _run()
    assert out.returncode == 2
    assert "usage" in out.stdout.lower()
