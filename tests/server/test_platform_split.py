"""``split_command`` on Windows: a ``worker_cmd`` split by the Microsoft C runtime's rules
(POSIX ``shlex`` would strip the backslashes of ``C:\\path\\worker.exe``). Pure string
work, run here on Linux; the Wine test runs such a command for real."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from sockshare.server._platform import split_command, split_windows


@pytest.mark.parametrize("argv", [
    ["C:\\Program Files\\Python\\python.exe", "Z:\\work\\worker.py", "{channel}"],
    ["a\\\"b", "c d\\", "", "x\"y", "\\\\server\\share\\w.exe", "tail\\\\"],
    ["plain", "two words", "--id={id}"],
])
def test_round_trips_what_list2cmdline_writes(argv: list[str]) -> None:
    assert split_windows(subprocess.list2cmdline(argv)) == argv


def test_windows_rules_by_hand() -> None:
    assert split_windows(r'C:\php\php.exe  C:\w\worker.php {channel}') == [
        "C:\\php\\php.exe", "C:\\w\\worker.php", "{channel}"]
    assert split_windows(r'"a b"c \"d\" \\"e f"') == ['a bc', '"d"', '\\e f']
    assert split_windows('"say ""hi"""\t x') == ['say "hi"', "x"]
    assert split_windows("   ") == []
    # what the old POSIX split made of a Windows path
    assert shlex.split(r"C:\php\php.exe") == ["C:phpphp.exe"]


def test_posix_still_uses_shlex() -> None:
    assert split_command("php 'my worker.php' {channel}") == ["php", "my worker.php", "{channel}"]
