"""Signals with gunicorn's meanings (QUIT, HUP re-reading --config, TTIN/TTOU), the
environment (SOCKSHARE_<FLAG>, SOCKSHARE_CMD_ARGS), --pid-file, --user/--group and
--proxy-allow-from, on real ``sockshare serve`` processes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, LiveServer, pid_alive, wait_gone
from serve_helpers import ROOT, Server, ask, connect, env_with_apps, read_line

from sockshare import SockshareError
from sockshare.server._cli import add_commands, apply_environment, environment_argv
from sockshare.server._config import ConfigError, from_args, parse_proxy_allow
from sockshare.server._control import request

LIVE = "live_apps:handle"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


# --- the environment (unit) ------------------------------------------------------------


def test_environment_fills_what_the_command_line_left_out() -> None:
    env = {"SOCKSHARE_WORKERS": "4", "SOCKSHARE_BIND": "127.0.0.1:9001,unix:/tmp/x.sock",
           "SOCKSHARE_SNIFF": "yes", "SOCKSHARE_MAX_CONNS": "7", "SOCKSHARE_POOL": "ignored",
           "SOCKSHARE_PROXY_ALLOW_FROM": "10.0.0.0/8,::1"}
    args = apply_environment(_parse(["--max-conns", "3"]), env)
    cfg = from_args(args)
    assert cfg.pools["default"].workers == 4
    assert cfg.pools["default"].max_conns == 3   # the command line wins
    assert [lc.bind.text for lc in cfg.listeners] == ["127.0.0.1:9001", "unix:/tmp/x.sock"]
    assert all(lc.sniff for lc in cfg.listeners)
    assert cfg.listeners[0].proxy_allow == ("10.0.0.0/8", "::1")


def test_cmd_args_beat_single_variables_and_lose_to_the_command_line() -> None:
    env = {"SOCKSHARE_CMD_ARGS": "--workers=5 --bind 127.0.0.1:9002 --queue 9 --pid-file /tmp/p",
           "SOCKSHARE_WORKERS": "4", "SOCKSHARE_BIND": "127.0.0.1:9003", "SOCKSHARE_QUEUE": "1"}
    args = apply_environment(_parse(["--queue", "2"]), env)
    cfg = from_args(args)
    assert cfg.pools["default"].workers == 5
    assert [lc.bind.text for lc in cfg.listeners] == ["127.0.0.1:9002"]
    assert cfg.pools["default"].queue == 2
    assert cfg.pid_file == "/tmp/p"


def test_environment_over_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "s.toml"
    conf.write_text('grace = 3.0\ntimeout = 7.0\n[[listen]]\nbind = "127.0.0.1:0"\n'
                    '[pools.a]\napp = "serve_apps:app"\n')
    cfg = from_args(apply_environment(_parse(["--timeout", "9"]), {
        "SOCKSHARE_CONFIG": str(conf), "SOCKSHARE_GRACE": "4", "SOCKSHARE_TIMEOUT": "8",
        "SOCKSHARE_BACKLOG": "77"}))
    assert (cfg.grace, cfg.timeout) == (4.0, 9.0)
    assert cfg.listeners[0].backlog == 77


def test_a_0_on_the_command_line_is_given_and_wins_over_the_environment() -> None:
    """``--ws-ping-interval 0`` (pings off) or ``--max-requests 0`` on the command line
    are values, not "not given": the environment does not replace them (0 == False)."""
    env = {"SOCKSHARE_WS_PING_INTERVAL": "20", "SOCKSHARE_MAX_REQUESTS": "500",
           "SOCKSHARE_CMD_ARGS": "--ws-ping-timeout 0", "SOCKSHARE_WS_PING_TIMEOUT": "9"}
    args = apply_environment(_parse(["m:a", "--ws-ping-interval", "0", "--max-requests", "0"]), env)
    web = from_args(args).pools["default"].web
    assert (web.ws_ping_interval, web.max_requests) == (0.0, 0)
    assert web.ws_ping_timeout == 0.0   # SOCKSHARE_CMD_ARGS over SOCKSHARE_<FLAG>, 0 too


@pytest.mark.parametrize(("env", "message"), [
    ({"SOCKSHARE_WORKERS": "many"}, "invalid int value"),
    ({"SOCKSHARE_SNIFF": "perhaps"}, "SOCKSHARE_SNIFF='perhaps'"),
    ({"SOCKSHARE_CMD_ARGS": "--no-such-flag"}, "SOCKSHARE_CMD_ARGS"),
])
def test_environment_mistakes_are_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_environment(_parse([]), env)


def test_environment_argv_names() -> None:
    assert environment_argv({"SOCKSHARE_SSL_KEYFILE_PASSWORD": "pw", "SOCKSHARE_APP": "m:f",
                             "SOCKSHARE_NO_REBALANCE": "0"}) == ["--ssl-keyfile-password=pw", "m:f"]


def test_proxy_allow_lists() -> None:
    assert parse_proxy_allow(["*"]) is None
    assert [str(n) for n in parse_proxy_allow(["127.0.0.1", "10.1.2.3/8"]) or ()] == [
        "127.0.0.1/32", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match="not an address"):
        parse_proxy_allow(["localhost"])


# --- signals -----------------------------------------------------------------------------


def test_sigquit_stops_fast_with_status_0(tmp_path: Path) -> None:
    # a held connection would keep a SIGTERMed worker up to --grace (30 s)
    with Server(tmp_path, "--grace", "30", workers=2) as srv:
        held = connect(srv.address())
        held.sendall(b"hold\n")
        assert read_line(held)
        t0 = time.monotonic()
        assert srv.stop(signal.SIGQUIT, timeout=15.0) == 0
        assert time.monotonic() - t0 < 5.0
        assert "SIGQUIT: stopping fast" in srv.log()
        held.close()


def test_ttin_and_ttou_add_and_retire_a_worker_without_dropping(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", app=LIVE, workers=2) as srv:
        os.kill(srv.pid, signal.SIGTTIN)
        st = srv.wait_for(lambda st: st["pools"][0]["workers"] == 3
                          and sum(w["state"] == "ready" for w in st["workers"]) == 3,
                          what="a third worker")
        newest = max(w["id"] for w in st["workers"])
        clients = [LineClient(srv.address()) for _ in range(3)]
        served = {c.ask("echo a")["id"]: c for c in clients}
        assert set(served) == {w["id"] for w in st["workers"]}   # least-conn: one each
        on_newest = served[newest]
        os.kill(srv.pid, signal.SIGTTOU)
        moved = on_newest.read()   # the retired worker migrates it
        assert moved["moved"]
        assert moved["reason"] == "SIGTTOU"
        assert on_newest.ask("echo b")["n"] == 2
        srv.wait_for(lambda st: st["pools"][0]["workers"] == 2 and len(st["workers"]) == 2,
                     what="the retired worker to exit")
        for c in clients:
            assert c.ask("echo c")["echo"] == "c"
            c.close()
        # never below one worker
        os.kill(srv.pid, signal.SIGTTOU)
        srv.wait_for(lambda st: st["pools"][0]["workers"] == 1 and len(st["workers"]) == 1,
                     what="one worker")
        os.kill(srv.pid, signal.SIGTTOU)
        deadline = time.monotonic() + 10
        while "keeps its last worker" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "keeps its last worker" in srv.log()
        assert srv.status()["pools"][0]["workers"] == 1


def test_sigusr1_has_the_workers_reopen_their_log_files(tmp_path: Path) -> None:
    """SIGUSR1, gunicorn's meaning (logrotate's ``kill -USR1``): the workers reopen the
    files of their ``--log-config``, and nothing else happens. It used to end the
    master -- its default action -- and the whole server with it."""
    log_file = tmp_path / "workers.log"
    conf = tmp_path / "logging.json"
    conf.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file)}},
        "root": {"level": "INFO", "handlers": ["file"]}}))
    with LiveServer(tmp_path, "--log-config", str(conf), app=LIVE, workers=2) as srv:
        pids = {w["pid"] for w in srv.status()["workers"]}
        client = LineClient(srv.address())
        assert client.ask("echo a")["echo"] == "a"
        deadline = time.monotonic() + 10
        while not log_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        moved = tmp_path / "workers.log.1"
        log_file.rename(moved)   # (what logrotate does before its postrotate)
        os.kill(srv.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = log_file.read_text() if log_file.exists() else ""
            if text.count("SIGUSR1: 1 log file(s) reopened") >= 2:
                break
            time.sleep(0.05)
        assert text.count("SIGUSR1: 1 log file(s) reopened") == 2, (text, srv.log()[-2000:])
        assert "reopened" not in moved.read_text()   # the moved file is left alone
        assert "SIGUSR1: 2 worker(s) reopen their log files" in srv.log()
        # nothing else happened: the same workers, the same connection, serving
        assert {w["pid"] for w in srv.status()["workers"]} == pids
        assert client.ask("echo b")["echo"] == "b"
        assert pid_alive(srv.pid)
        client.close()


def _conf(path: Path, workers: int, max_conns: int, extra: str = "") -> None:
    path.write_text(f'grace = 5.0\n[[listen]]\nbind = "127.0.0.1:0"\nname = "main"\n'
                    f'[pools.web]\napp = "live_apps:handle"\nworkers = {workers}\n'
                    f'max_conns = {max_conns}\nrebalance = false\n{extra}')


def test_sighup_rereads_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "serve.toml"
    _conf(conf, 2, 10)
    with LiveServer(tmp_path, "--config", str(conf), app=None, bind=[], workers=None,
                    ready=2) as srv:
        c = LineClient(srv.address())
        c.ask("echo a")
        _conf(conf, 3, 20)
        os.kill(srv.pid, signal.SIGHUP)
        st = srv.wait_for(lambda st: st["generation"] == 2 and st["pools"][0]["workers"] == 3
                          and sum(w["state"] == "ready" for w in st["workers"]) == 3,
                          what="generation 2 with 3 workers")
        assert st["pools"][0]["max_conns"] == 20
        assert c.read()["reason"] == "reload"   # the live connection moved, not dropped
        assert c.ask("echo b")["n"] == 2
        # a broken file: logged, nothing changes, still serving
        conf.write_text("[pools.web\nworkers = 5\n")
        os.kill(srv.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "the running configuration stays" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = srv.log()
        assert "the running configuration stays" in log
        assert "serve.toml" in log
        st = srv.status()
        assert (st["generation"], st["pools"][0]["workers"], st["pools"][0]["max_conns"]) == (2, 3, 20)
        assert st["counters"]["reload_failures"] == 1
        assert c.ask("echo c")["n"] == 3
        # what needs an upgrade is named, the rest applies
        _conf(conf, 3, 30, '[[listen]]\nbind = "127.0.0.1:0"\nname = "other"\n')
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        assert "needs an upgrade" in srv.log()
        assert srv.status()["pools"][0]["max_conns"] == 30
        c.close()


# --- environment, pid file, user ---------------------------------------------------------


def _serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    e = env_with_apps()
    e.update(env or {})
    log = open(tmp / "serve.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "sockshare.server._cli", "serve",
                                 "serve_apps:app", *args], env=e, cwd=str(ROOT),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def _wait_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def test_environment_reaches_a_serving_process(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl" / "s.ctl"
    proc = _serve(tmp_path, env={"SOCKSHARE_WORKERS": "3", "SOCKSHARE_BIND": "127.0.0.1:0",
                                 "SOCKSHARE_CMD_ARGS": f"--control {ctl} --max-conns 4"})
    try:
        deadline = time.monotonic() + 20
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = request(str(ctl), {"cmd": "status"}, timeout=5)["status"]
                if sum(w["state"] == "ready" for w in st["workers"]) == 3:
                    break
            except (OSError, ValueError, SockshareError):
                pass
            time.sleep(0.05)
        pool = st["pools"][0]
        assert (pool["workers"], pool["max_conns"]) == (3, 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_pid_file_lifecycle(tmp_path: Path) -> None:
    pid_file = tmp_path / "serve.pid"
    pid_file.write_text("999999999\n")   # stale: no such process
    with Server(tmp_path / "a", "--pid-file", str(pid_file), workers=1) as srv:
        assert pid_file.read_text() == f"{srv.pid}\n"
        # a live one refuses a second server
        second = _serve(tmp_path, "--bind", "127.0.0.1:0", "--pid-file", str(pid_file),
                        "--control", str(tmp_path / "b.ctl"))
        assert second.wait(20) == 1
        assert f"process {srv.pid} is running" in (tmp_path / "serve.log").read_text()
        assert pid_file.read_text() == f"{srv.pid}\n"
        # through an upgrade it names the same process: the one that was started
        old = srv.status()["dispatcher"]
        assert request(srv.control, {"cmd": "upgrade", "wait": True}, timeout=60)["ok"]
        srv.wait_for(lambda st: st["dispatcher"] != old and not _alive(old), timeout=30,
                     what="the old dispatcher gone")
        assert pid_file.read_text() == f"{srv.pid}\n"
        assert srv.stop() == 0
    assert not pid_file.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _open_to_others(path: str) -> bool:
    """Whether every user may run ``path`` (each directory on the way searchable)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for k in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:k]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return True


def _python_for_others() -> str:
    """An interpreter ``nobody`` may run (the test's own may sit in root's home)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand) and _open_to_others(cand):
            out = subprocess.run([cand, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                                 capture_output=True, text=True, timeout=30, check=False)
            if out.stdout.strip() == "True":
                return cand
    pytest.skip("no Python 3.11+ interpreter that other users may run")


def _status(ctl: Path, ready: int, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            st = request(str(ctl), {"cmd": "status"}, timeout=5)["status"]
            if sum(w["state"] == "ready" for w in st["workers"]) >= ready:
                return st
        except (OSError, ValueError, SockshareError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready: {st}\n{log.read_text()}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_user_and_group_for_the_workers(tmp_path: Path) -> None:
    import grp
    import pwd
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    python = _python_for_others()
    # The workers, as nobody, import sockshare and the test app from a copy every user
    # may read (this checkout may sit in a private home, as CI's clone may).
    shared = Path(tempfile.mkdtemp(prefix="sockshare-user-test-"))
    try:
        shutil.copytree(ROOT / "src" / "sockshare", shared / "sockshare",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "tests" / "server" / "serve_apps.py", shared / "serve_apps.py")
        for d in (shared, *[p for p in shared.rglob("*") if p.is_dir()]):
            d.chmod(0o755)
        for f in shared.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
        _user_test(tmp_path, python, shared, nobody.pw_uid, nobody.pw_gid, group)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _user_test(tmp_path: Path, python: str, shared: Path, uid: int, gid: int,
               group: str) -> None:
    env = env_with_apps()
    env["PYTHONPATH"] = str(shared)   # (that interpreter's, and readable by nobody)
    ctl, log = tmp_path / "ctl" / "s.ctl", tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([python, "-m", "sockshare.server._cli", "serve", "serve_apps:app",
                                 "--bind", "127.0.0.1:0", "--workers", "2", "--control", str(ctl),
                                 "--user", "nobody", "--group", group],
                                env=env, cwd=str(shared), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        st = _status(ctl, 2, proc, log)
        pids = {w["pid"] for w in st["workers"]}
        for pid in pids:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            uids = next(ln for ln in lines if ln.startswith("Uid:")).split()[1:]
            gids = next(ln for ln in lines if ln.startswith("Gid:")).split()[1:]
            groups = next(ln for ln in lines if ln.startswith("Groups:")).split()[1:]
            assert uids == [str(uid)] * 4
            assert gids == [str(gid)] * 4
            assert "0" not in groups
        host, _, port = st["listeners"][0]["address"].rpartition(":")
        assert ask((host, int(port)))["pid"] in pids
        assert os.stat(f"/proc/{proc.pid}").st_uid == 0   # it starts them: it stays root
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    assert not list(Path(tempfile.gettempdir()).glob(f"sockshare-{proc.pid}-*"))


def test_user_refused_when_not_root(tmp_path: Path) -> None:
    serve = ["-m", "sockshare.server._cli", "serve", "--user", "root"]
    if os.geteuid() == 0:   # the dispatcher itself as nobody
        python = _python_for_others()
        cmd = [python, "-c", "import os, sys; os.setgroups([]); os.setgid(65534); "
               "os.setuid(65534); os.execv(sys.argv[1], sys.argv[1:])", python, *serve]
    else:
        cmd = [sys.executable, *serve]
    env = env_with_apps()
    env["PYTHONPATH"] = os.pathsep.join((str(ROOT / "src"), env["PYTHONPATH"]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                         cwd="/", check=False)
    assert out.returncode == 2, out.stderr
    assert "only root can start workers as another user" in out.stderr


# --- trusted proxies ---------------------------------------------------------------------

FORGED = b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 80\r\n"


@pytest.mark.parametrize("allow", ["10.0.0.0/8", None])
def test_proxy_header_believed_only_from_allowed_sources(tmp_path: Path, allow: str | None) -> None:
    args = ["--proxy-protocol", "optional"] + (["--proxy-allow-from", allow] if allow else [])
    with Server(tmp_path, *args, workers=1) as srv:
        with connect(srv.address()) as s:
            s.sendall(FORGED + b"who\n")
            got = json.loads(read_line(s))
        if allow is None:   # the default: loopback may send one
            assert got["meta"]["proxy"]["src"][0] == "203.0.113.9"
            assert got["pre"] == 0
        else:   # the bytes are the client's own data: the app reads the PROXY line
            assert "proxy" not in got["meta"]
            assert got["client"][0] == "127.0.0.1"
            assert got["pre"] == 0


def test_required_proxy_header_from_an_unlisted_source_is_refused(tmp_path: Path) -> None:
    with Server(tmp_path, "--proxy-protocol", "required", "--proxy-allow-from", "127.0.0.1/32",
                workers=1) as srv:
        addr = ("127.0.0.1", srv.address()[1])
        # refused at accept, before anything is read: the reset may reach the client
        # while it connects, sends or reads (whichever it is doing when it lands)
        try:
            with connect(addr, src="127.0.0.2") as s:
                s.sendall(FORGED + b"who\n")
                data = s.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        assert data == b""
        with connect(addr, src="127.0.0.1") as s:
            s.sendall(FORGED + b"who\n")
            assert b"203.0.113.9" in read_line(s)
        st = srv.status()
        assert st["counters"]["refused_by_reason"].get("proxy_untrusted") == 1
        assert "127.0.0.2 is not in its proxy_allow_from" in srv.log()
        assert pid_alive(srv.pid)
    assert wait_gone(srv.pid, 1.0)


def test_a_reload_that_adds_routes_applies_them_to_new_connections(tmp_path: Path) -> None:
    """``routes`` and ``default_pool`` are live: a listener whose every connection went
    to one pool (its metadata compiled once, no routes to try) follows the re-read file.
    (Before, a reload that added ``[[routes]]`` was logged as applied and ignored.)"""
    conf = tmp_path / "serve.toml"
    two_pools = ('grace = 5.0\ndefault_pool = "web"\n[[listen]]\nbind = "127.0.0.1:0"\n'
                 'name = "main"\n[pools.web]\napp = "live_apps:handle"\nworkers = 1\n'
                 '[pools.beta]\napp = "live_apps:handle"\nworkers = 1\n')
    conf.write_text(two_pools)
    with LiveServer(tmp_path, "--config", str(conf), app=None, bind=[], workers=None,
                    ready=2) as srv:
        pool_of = {w["pid"]: w["pool"] for w in srv.status()["workers"]}

        def pools_now() -> set[str]:
            out = set()
            for _ in range(4):
                c = LineClient(srv.address())
                out.add(pool_of[c.ask("echo a")["pid"]])
                c.close()
            return out

        assert pools_now() == {"web"}
        conf.write_text(two_pools + '[[routes]]\nlistener = "main"\npool = "beta"\n')
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        pool_of = {w["pid"]: w["pool"] for w in srv.status()["workers"] if w["state"] == "ready"}
        assert pools_now() == {"beta"}
        conf.write_text(two_pools.replace('default_pool = "web"', 'default_pool = "beta"'))
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        pool_of = {w["pid"]: w["pool"] for w in srv.status()["workers"] if w["state"] == "ready"}
        assert pools_now() == {"beta"}
        assert srv.status()["counters"]["refused"] == 0


# --- audit: flags and variables next to --config -----------------------------------------


def test_queue_flag_overrides_the_files_top_level_queue(tmp_path: Path) -> None:
    """``--queue`` (or ``SOCKSHARE_QUEUE``) next to ``--config`` overrides the file's
    top-level ``queue`` (the default of every pool without its own), as docs/server.md
    says of the top-level settings. (Before, it was silently ignored.)"""
    conf = tmp_path / "serve.toml"
    conf.write_text('queue = 10\ngrace = 5.0\n[[listen]]\nbind = "127.0.0.1:0"\n'
                    '[pools.a]\napp = "serve_apps:app"\nworkers = 1\n'
                    '[pools.b]\napp = "serve_apps:app"\nworkers = 1\nqueue = 3\n')
    with Server(tmp_path / "flag", "--config", str(conf), "--queue", "5", app=None, bind=[],
                workers=None, ready=2) as srv:
        limits = {p["name"]: p["queue_limit"] for p in srv.status()["pools"]}
        assert limits == {"a": 5, "b": 3}   # b's own queue stays
    with Server(tmp_path / "env", "--config", str(conf), app=None, bind=[], workers=None,
                ready=2, env={"SOCKSHARE_QUEUE": "7"}) as srv:
        limits = {p["name"]: p["queue_limit"] for p in srv.status()["pools"]}
        assert limits == {"a": 7, "b": 3}


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    """docs/server.md: "A bad value is a configuration error (exit 2) that names the
    variable" -- SOCKSHARE_MAX_CONNS, not only the flag it stands for."""
    e = env_with_apps()
    e.update({"SOCKSHARE_MAX_CONNS": "lots", "SOCKSHARE_CONTROL": str(tmp_path / "c.ctl")})
    out = subprocess.run([sys.executable, "-m", "sockshare", "serve", "serve_apps:app"],
                         env=e, cwd=str(ROOT), capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 2, out.stderr
    assert "SOCKSHARE_MAX_CONNS" in out.stderr, out.stderr
    assert "invalid int value: 'lots'" in out.stderr


@pytest.mark.parametrize(("env", "argv", "named"), [
    ({"SOCKSHARE_WORKERS": "0"}, [], "(SOCKSHARE_WORKERS=0, from the environment)"),
    ({"SOCKSHARE_CMD_ARGS": "--workers 0"}, [],
     "(SOCKSHARE_CMD_ARGS=--workers 0, from the environment)"),
    ({"SOCKSHARE_GRACE": "3"}, ["-w", "0"], "(also set from the environment: SOCKSHARE_GRACE=3)"),
], ids=["variable", "cmd-args", "flag"])
def test_a_value_that_parses_but_is_refused_names_its_variable(
        tmp_path: Path, env: dict[str, str], argv: list[str], named: str) -> None:
    """A value from the environment that parses but fails validation (workers 0) is a
    configuration error (exit 2) that names the variable too, not only what the
    setting is; one from the command line says which variables were in play."""
    e = env_with_apps()
    e.update({"SOCKSHARE_CONTROL": str(tmp_path / "c.ctl"), **env})
    out = subprocess.run([sys.executable, "-m", "sockshare", "serve", "serve_apps:app", *argv],
                         env=e, cwd=str(ROOT), capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 2, out.stderr
    assert "workers must be at least 1" in out.stderr, out.stderr
    assert named in out.stderr.replace("SOCKSHARE_CONTROL=" + str(tmp_path / "c.ctl") + "; ", ""), \
        out.stderr


def test_a_reload_names_a_changed_dispatchers_count_as_needing_an_upgrade(tmp_path: Path) -> None:
    """``dispatchers`` is read at start only: a reload of a file that changed it must
    say so (the warning of what needs an upgrade), not log "no live setting changed"."""
    conf = tmp_path / "serve.toml"
    base = ('grace = 5.0\n[[listen]]\nbind = "127.0.0.1:0"\nname = "main"\n'
            '[pools.web]\napp = "live_apps:handle"\nworkers = 1\n')
    conf.write_text(base)
    with LiveServer(tmp_path, "--config", str(conf), app=None, bind=[], workers=None,
                    ready=1) as srv:
        conf.write_text("dispatchers = 2\n" + base)
        assert srv.command({"cmd": "reload", "wait": True})["ok"]
        log = srv.log()
        assert "needs an upgrade" in log, log[-2000:]
        assert "dispatchers 1 -> 2" in log, log[-2000:]
        assert "dispatchers" not in srv.status()   # still one process: no feeders


def test_pool_and_listener_flags_next_to_config_apply_to_every_pool_and_listener(
        tmp_path: Path) -> None:
    """Flags beside ``--config`` that are pool settings (``--workers``, ``--policy``,
    ``--max-conns``, ...) apply to every pool of the file, and listener settings
    (``--sniff``, ``--proxy-protocol``) to every listener, as ``--backlog`` and the web
    flags do: none is dropped without a word. An APP or ``--worker-cmd`` beside it is a
    configuration error (the file names each pool's app)."""
    conf = tmp_path / "s.toml"
    conf.write_text('[[listen]]\nbind = "127.0.0.1:0"\n[[listen]]\nbind = "127.0.0.1:0"\n'
                    '[pools.a]\napp = "serve_apps:app"\n[pools.b]\napp = "serve_apps:app"\n'
                    'workers = 4\n')
    cfg = from_args(_parse(["--config", str(conf), "--proxy-protocol", "required", "--sniff",
                            "--workers", "3", "--policy", "round-robin", "--max-conns", "7",
                            "--no-rebalance"]))
    assert [(lc.proxy, lc.sniff) for lc in cfg.listeners] == [("required", True)] * 2
    assert [(p.workers, p.policy, p.max_conns, p.rebalance) for p in cfg.pools.values()] == \
        [(3, "round-robin", 7, False)] * 2
    plain = from_args(_parse(["--config", str(conf)]))   # (nothing given: the file's)
    assert [(lc.proxy, lc.sniff) for lc in plain.listeners] == [("off", False)] * 2
    assert [p.workers for p in plain.pools.values()][1] == 4
    for extra in (["serve_apps:app"], ["--worker-cmd", "sleep 100"]):
        with pytest.raises(ConfigError, match="cannot be given with --config"):
            from_args(_parse([*extra, "--config", str(conf)]))
