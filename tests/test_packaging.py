"""What a user of the published package gets: the sdist and the wheel build without
deprecation warnings from the build backend, the wheel installs into a fresh venv with
nothing else, and the README's first example and ``sockshare doctor`` run from it, with
no source tree on the path.

It builds with ``python -m build`` (the ``test`` extra installs it) in isolation, so the
build backend is the newest setuptools the index offers, as for a newcomer's first
``pip install``: that is where deprecations show up first.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from sockshare import _fast

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.packaging

# What the build backend says when it is about to stop accepting something the project
# declares. setuptools 84, for the old `license = { text = ... }`, prints "WARNING
# `project.license` as a TOML table is deprecated" in a banner of "!!" lines that ends
# "remove deprecated calls or your builds will no longer be supported"; other cases come as
# SetuptoolsDeprecationWarning. pip's own notices ("DEPRECATION: ...") are not the backend's.
_DEPRECATION = re.compile(r"DeprecationWarning|\bdeprecated\b", re.I)
_FRONTEND_NOTICE = re.compile(r"^\s*DEPRECATION: ")


def _source_version() -> str:
    text = (ROOT / "src" / "sockshare" / "_version.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert found is not None
    return found.group(1)


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put the source tree on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _copy_project(dest: Path) -> Path:
    """What an sdist is made from, copied so that the build leaves nothing in the checkout."""
    project = dest / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "*.so"))
    return project


def _no_deprecations(step: str, out: subprocess.CompletedProcess[str]) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{step} failed:\n{text[-4000:]}"
    lines = [line for line in text.splitlines()
             if _DEPRECATION.search(line) and not _FRONTEND_NOTICE.match(line)]
    assert not lines, f"{step}: the build backend warns of deprecations:\n" + "\n".join(lines)


def test_sdist_and_wheel_install_and_run_in_a_fresh_venv(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="python -m build (in the test extra) builds the sdist")
    project = _copy_project(tmp_path)
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(project)],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env=_clean_env(), check=False)
    _no_deprecations("python -m build", out)
    version = _source_version()
    sdists = list(dist.glob("sockshare-*.tar.gz"))
    wheels = list(dist.glob("sockshare-*.whl"))
    assert [p.name for p in sdists] == [f"sockshare-{version}.tar.gz"]
    # with the C module (sockshare._speedups: Linux, CPython, a compiler) the wheel is
    # this platform's; without it, pure Python
    compiled = _fast.expected() and shutil.which("cc") is not None
    tag = re.escape(f"sockshare-{version}-") + (r"cp3\d+-cp3\d+-linux_\w+\.whl" if compiled
                                                 else r"py3-none-any\.whl")
    assert len(wheels) == 1, [p.name for p in wheels]
    assert re.fullmatch(tag, wheels[0].name), wheels[0].name

    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "src/sockshare/_version.py",
            "src/sockshare/py.typed", "src/sockshare/_speedups.c",
            "src/sockshare/_speedups.pyi"} <= names

    with zipfile.ZipFile(wheels[0]) as whl:
        wnames = set(whl.namelist())
        meta = email.parser.Parser().parsestr(
            whl.read(f"sockshare-{version}.dist-info/METADATA").decode())
    assert f"sockshare-{version}.dist-info/licenses/LICENSE" in wnames
    assert {"sockshare/__main__.py", "sockshare/py.typed", "sockshare/server/demo_page.html",
            "sockshare/_speedups.pyi"} <= wnames
    assert any(n.startswith("sockshare/_speedups.") and n.endswith(".so") for n in wnames) == compiled
    assert meta["Version"] == version
    assert meta["License-Expression"] == "MIT"
    assert meta["License"] is None   # the deprecated free-text field
    assert meta.get_all("Requires-Dist") is None or all(
        "extra ==" in r for r in meta.get_all("Requires-Dist") or [])   # the core has no deps
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Documentation", "Changelog", "Issues"} <= set(urls)

    # A fresh venv with its own pip; the wheel alone, from the directory it was built in.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    out = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-deps",
                          "--find-links", str(dist), f"sockshare=={version}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=_clean_env(), check=False)
    assert out.returncode == 0, out.stdout + out.stderr

    elsewhere = tmp_path / "elsewhere"   # cwd outside the source tree
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import sockshare; print(sockshare.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=elsewhere,
                           env=_clean_env(), check=True)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout

    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S)
    assert example is not None
    ran = subprocess.run([str(python), "-c", example.group(1)], capture_output=True, text=True,
                         timeout=60, cwd=elsewhere, env=_clean_env(), check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "b'served by the importer'"

    script = bindir / ("sockshare.exe" if os.name == "nt" else "sockshare")
    doctor = subprocess.run([str(script), "doctor"], capture_output=True, text=True, timeout=60,
                            cwd=elsewhere, env=_clean_env(), check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert doctor.stdout.startswith(f"sockshare {version} on ")
    assert "ok  tokens" in doctor.stdout
    if compiled:   # the wheel's own C module, not a fallback
        assert "ok  speedups                 hot paths: compiled" in doctor.stdout, doctor.stdout

    for argv in ([str(script), "--version"], [str(python), "-m", "sockshare", "--version"]):
        shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=elsewhere,
                               env=_clean_env(), check=True)
        assert shown.stdout.strip() == f"sockshare {version}"
    meta_version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, sockshare; "
         "print(m.version('sockshare'), sockshare.__version__)"],
        capture_output=True, text=True, timeout=60, cwd=elsewhere, env=_clean_env(), check=True)
    assert meta_version.stdout.split() == [version, version]


def test_editable_install_has_no_deprecation_warnings(tmp_path: Path) -> None:
    """``pip install -e .``, a newcomer's first command, in a fresh venv."""
    project = _copy_project(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    out = subprocess.run([str(python), "-m", "pip", "install", "-v", "--no-deps", "-e", str(project)],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env=_clean_env(), check=False)
    _no_deprecations("pip install -e .", out)
    shown = subprocess.run([str(python), "-m", "sockshare", "--version"], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path, env=_clean_env(), check=True)
    assert shown.stdout.strip() == f"sockshare {_source_version()}"
    if _fast.expected() and shutil.which("cc") is not None:   # the C module, built for -e too
        doctor = subprocess.run([str(python), "-m", "sockshare", "doctor"], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path, env=_clean_env(), check=False)
        assert "hot paths: compiled" in doctor.stdout, doctor.stdout + doctor.stderr
