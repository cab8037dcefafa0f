"""Every ``from sockshare... import X`` shown in README.md and docs/*.md works, and
names only public modules and public names: what the docs teach must not break when a
private module is reorganised."""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FROM = re.compile(r"\bfrom\s+(sockshare(?:\.\w+)*)\s+import\s+(\([^)]*\)|[\w ,*]+)")
_IMPORT = re.compile(r"^\s*import\s+([\w., ]+)$", re.M)
_FENCE = re.compile(r"```python\n(.*?)```", re.S)
_PRIVATE_REF = re.compile(r"\bsockshare(?:\.\w+)*\._\w+")


def _imports() -> list[tuple[str, str, list[str]]]:
    """(where, module, names) for each import statement in the docs."""
    out: list[tuple[str, str, list[str]]] = []
    for path in DOCS:
        text = path.read_text()
        for m in _FROM.finditer(text):
            names = [n.split(" as ")[0].strip() for n in m.group(2).strip("()").split(",")]
            where = f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}"
            out.append((where, m.group(1), [n for n in names if n]))
        for m in _IMPORT.finditer(text):
            for item in m.group(1).split(","):
                mod = item.split(" as ")[0].strip()
                if mod == "sockshare" or mod.startswith("sockshare."):
                    where = f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}"
                    out.append((where, mod, []))
    return out


IMPORTS = _imports()


def test_the_docs_show_imports() -> None:
    modules = {mod for _w, mod, _n in IMPORTS}
    assert {"sockshare", "sockshare.server"} <= modules, modules
    assert len(IMPORTS) >= 5


@pytest.mark.parametrize(("where", "module", "names"), IMPORTS, ids=[w for w, _m, _n in IMPORTS])
def test_doc_import_is_public_and_works(where: str, module: str, names: list[str]) -> None:
    private = [part for part in module.split(".") if part.startswith("_")]
    assert not private, f"{where}: `{module}` is a private module; import from a public one"
    mod = importlib.import_module(module)
    for name in names:
        if name == "*":
            continue
        assert not name.startswith("_"), f"{where}: {name} is private"
        if not hasattr(mod, name) or isinstance(getattr(mod, name), types.ModuleType):
            importlib.import_module(f"{module}.{name}")   # `from sockshare import carriers`
            continue
        public = getattr(mod, "__all__", None)
        if public is not None:
            assert name in public, f"{where}: {name} is not in {module}.__all__"


def test_python_examples_name_no_private_module() -> None:
    found = []
    for path in DOCS:
        for block in _FENCE.findall(path.read_text()):
            found += [f"{path.name}: {ref}" for ref in _PRIVATE_REF.findall(block)]
    assert found == []


def test_nothing_points_to_notes_outside_the_repository() -> None:
    """What the code relies on is written in docs/ ("Pitfalls" in docs/protocol.md), not
    in a notes file that a user of the repository does not have."""
    patterns = re.compile("|".join([r"\.\./" + "shared", "shared/" + "notes",
                                    r"pitfalls? \d", "fd-passing " + "notes"]), re.I)
    found = []
    for top in ("src", "tests", "docs", "benchmarks", "examples", "scripts", "README.md"):
        base = ROOT / top
        for path in ([base] if base.is_file() else sorted(base.rglob("*"))):
            if path.suffix not in (".py", ".md", ".c", ".h", ".php", ".toml", ".txt", ""):
                continue
            if not path.is_file():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if patterns.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
    assert "## Pitfalls" in (ROOT / "docs" / "protocol.md").read_text()
