"""The carrier commands: ``send``, ``recv`` and ``bench carriers``."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sockshare import CarrierNotFound, carriers
from sockshare.carriers import _cli
from tests.carriers.conftest import Addresses, child_env, needs


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sockshare.carriers._cli", *args],
        env=child_env(),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("scheme", ["mq", "unix", "fifo", "shm"])
def test_send_and_recv_commands_between_processes(addrs: Addresses, scheme: str) -> None:
    needs(scheme)
    url = addrs.url(scheme)
    cmd = [sys.executable, "-m", "sockshare.carriers._cli", "recv", url, "--timeout", "20", "--count", "2"]
    with subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as recv:
        try:
            # the reader may not have made the queue yet: send waits up to --timeout for it
            for message in ("hello", "wörld"):
                sent = _run("send", url, message, "--timeout", "20")
                assert sent.returncode == 0, sent.stderr
            out, err = recv.communicate(timeout=30)
        finally:
            if recv.poll() is None:
                recv.kill()  # our own child
    assert recv.returncode == 0, err
    assert out == "hello\nwörld\n".encode()


def test_recv_timeout_exit_status(addrs: Addresses, capsys: pytest.CaptureFixture[str]) -> None:
    needs("mq")
    assert _cli.main(["recv", addrs.url("mq"), "--timeout", "0.2"]) == _cli.EXIT_TIMEOUT
    assert "nothing received" in capsys.readouterr().err


def test_send_errors(addrs: Addresses, capsys: pytest.CaptureFixture[str]) -> None:
    needs("mq")
    url = addrs.url("mq")
    assert _cli.main(["send", url, "x"]) == _cli.EXIT_ERROR
    assert "No such file" in capsys.readouterr().err
    with carriers.open(url, "r") as rx:
        big = "x" * (rx.max_message + 1)
        assert _cli.main(["send", url, big]) == _cli.EXIT_ERROR
        assert "max_message" in capsys.readouterr().err
        assert _cli.main(["send", url, "ok"]) == 0
        assert rx.recv(timeout=1) == b"ok"
    assert _cli.main(["send", "nosuch://x", "x"]) == _cli.EXIT_ERROR
    assert "unknown carrier scheme" in capsys.readouterr().err


def test_recv_in_process_prints_raw_bytes(
    addrs: Addresses, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    needs("unixgram")
    url = addrs.url("unixgram")

    def later() -> None:
        for _ in range(200):
            try:
                with carriers.open(url, "w", timeout=1) as tx:
                    tx.send(b"\x00\xffraw")
                return
            except CarrierNotFound:  # the reader has not bound yet
                time.sleep(0.01)

    t = threading.Thread(target=later)
    t.start()
    try:
        assert _cli.main(["recv", url, "--timeout", "10"]) == 0
    finally:
        t.join(10)
    assert capsysbinary.readouterr().out == b"\x00\xffraw\n"


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_bench_table_progress_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "carriers.png"
    args = ["bench", "carriers", "--only", "unix,shm", "--rounds", "30", "--messages", "300"]
    done = _run(*args, "--plot", str(png), timeout=60)
    if not HAVE_MATPLOTLIB:
        assert done.returncode == _cli.EXIT_ERROR
        assert b"matplotlib" in done.stderr
        done = _run(*args, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "| carrier |" in out
    assert "| unix |" in out
    assert "| shm |" in out
    assert "[1/2] unix" in done.stderr.decode()  # progress, one line per phase off a terminal
    assert "[2/2] shm" in done.stderr.decode()
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_carrier(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["bench", "carriers", "--only", "pigeon"]) == 2
    assert "pigeon" in capsys.readouterr().err


def test_add_commands_registers_on_a_foreign_parser() -> None:
    parser = argparse.ArgumentParser(prog="sockshare")
    _cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "carriers", "--rounds", "5"])
    assert args.what == "carriers"
    assert callable(args.func)
    args = parser.parse_args(["send", "mq:///x", "hi", "--timeout", "1.5"])
    assert (args.url, args.message, args.timeout) == ("mq:///x", "hi", 1.5)
    args = parser.parse_args(["recv", "mq:///x"])
    assert args.count == 1
    assert args.timeout is None
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "tokens"])


def test_bench_plot_without_matplotlib_fails_early_and_clearly(tmp_path: Path) -> None:
    fake = tmp_path / "matplotlib"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = child_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sockshare.carriers._cli",
            "bench",
            "carriers",
            "--plot",
            str(tmp_path / "x.png"),
        ],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == _cli.EXIT_ERROR
    assert b"pip install 'sockshare[bench]'" in done.stderr
    assert b"| carrier |" not in done.stdout  # refused before running anything
