"""The README's token example runs as written and prints what it says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_token_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    out = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, timeout=60,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == b"b'served by the importer'"


def test_readme_first_lines_name_both_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert any("sockshare serve" in line for line in head)
    assert any("pytest" in line for line in head)
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_readme_error_table_matches_the_error_tree() -> None:
    """Every error class the package exports is in the README's table (or is an abstract
    parent named in it), and every name in the table exists and is a SockshareError."""
    import sockshare
    from sockshare import _errors

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Errors"):text.index("## Platforms")]
    named = set(re.findall(r"`(\w+)`", table))
    exported = {n for n in _errors.__all__ if n != "SockshareError"}
    abstract = {"TokenError", "ProtocolError", "ChannelError", "HandoffError", "CarrierError"}
    carriers = {n for n in exported if n.startswith("Carrier")}
    missing = exported - named - abstract - carriers - {"BackendUnavailable"}
    assert not missing, f"errors not in the README table: {sorted(missing)}"
    for name in named & set(dir(sockshare)):
        obj = getattr(sockshare, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, sockshare.SockshareError), name
