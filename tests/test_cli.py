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


def test_python_dash_m_sockshare_is_the_console_script() -> None:
    # `python -m sockshare` takes the same arguments, prints the same and exits the same.
    for args in (["--version"], ["doctor", "--json"], ["nosuch"]):
        via_m = subprocess.run([sys.executable, "-m", "sockshare", *args], capture_output=True,
                               text=True, timeout=60, check=False)
        via_cli = _run(*args)
        assert via_m.returncode == via_cli.returncode, (args, via_m.stderr)
        assert via_m.stdout == via_cli.stdout
        assert via_m.stderr == via_cli.stderr
    assert _run("--version").stdout.strip() == f"sockshare {sockshare._version.__version__}"
    assert sockshare.__version__ is sockshare._version.__version__
