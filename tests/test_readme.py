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
