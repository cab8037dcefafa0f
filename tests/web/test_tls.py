"""TLS in the workers of ``sockshare serve``, routed by SNI: one sniffing listener, two
ASGI pools with their own certificates.

A test CA and certificates for ``a.test`` and ``b.test`` are made here with the
``openssl`` tool (CI installs it). The server (tests/server/serve_helpers.py) runs a TOML
config: a sniffing listener whose routes send SNI ``a.test`` to pool ``a`` and ``b.test``
to pool ``b``, ``default_pool = "b"``, and a second, non-sniffing listener that sends
everything to pool ``a`` (so plain HTTP reaches a TLS worker's handshake as is). Each
pool has one worker running tests/web/tls_apps.py, which answers with its pool, the
handoff's metadata, ``scope["scheme"]``, ``scope["client"]`` and its pid.

What is checked: each SNI reaches its own pool and gets that pool's certificate; the
scheme is ``https``; wss works; several requests share one TLS connection; no SNI and an
unknown SNI go to the default pool (docs/server.md: route, else the listener's pool, else
``default_pool``); plain HTTP sent to a TLS pool (a failed handshake in the worker, and
on the sniffing listener a refusal before it), a client that does not trust the
certificate and one that resets after its ClientHello cost the worker no descriptor and
do not kill it.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Server, read_to_close
from tests._fdcount import fd_table, wait_fd_count

from sockshare.server._control import request

httpx = pytest.importorskip("httpx")
ws_client = pytest.importorskip("websockets.sync.client")

HERE = Path(__file__).resolve().parent
NAMES = ("a.test", "b.test")


# --- certificates ---------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, and <name>.pem / <name>.key for a.test and b.test, signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl tool is not installed (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=sockshare test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=d)
    for name in NAMES:
        (d / f"{name}.ext").write_text(
            f"subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n")
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)
    return d


def client_ctx(pki: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.check_hostname = check_hostname
    return ctx


# --- the server -----------------------------------------------------------------------


CONFIG = """\
default_pool = "b"

[[listen]]
bind = "127.0.0.1:0"
name = "tls"
sniff = true

[[listen]]
bind = "127.0.0.1:0"
name = "raw"
pool = "a"

[pools.a]
app = "tls_apps:pool_a"
interface = "asgi"
workers = 1
ssl_certfile = "{pki}/a.test.pem"
ssl_keyfile = "{pki}/a.test.key"

[pools.b]
app = "tls_apps:pool_b"
interface = "asgi"
workers = 1
ssl_certfile = "{pki}/b.test.pem"
ssl_keyfile = "{pki}/b.test.key"

[[routes]]
sni = "a.test"
pool = "a"

[[routes]]
sni = "b.test"
pool = "b"
"""


@pytest.fixture(scope="module")
def server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "serve.toml"
    config.write_text(CONFIG.format(pki=pki))
    with pytest.MonkeyPatch.context() as mp:   # the workers import tls_apps from here
        mp.setenv("PYTHONPATH", str(HERE), prepend=":")
        srv = Server(tmp, "--config", str(config), app=None, bind=[], workers=None, ready=2)
    try:
        yield srv
    finally:
        srv.close()


def tls_addr(server: Server) -> tuple[str, int]:
    addr: tuple[str, int] = server.address("tls")
    return addr


def tls_connect(addr: tuple[str, int], ctx: ssl.SSLContext, sni: str | None) -> ssl.SSLSocket:
    raw = socket.create_connection(addr, timeout=10)
    try:
        return ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def get(tls: ssl.SSLSocket, path: str = "/") -> dict[str, Any]:
    """One HTTP/1.1 request on an open TLS socket (keep-alive), its JSON body."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = tls.recv(65536)
        assert chunk, f"closed before the head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk
        body += chunk
    out: dict[str, Any] = json.loads(body)
    return out


def peer_names(tls: ssl.SSLSocket) -> tuple[str, list[str]]:
    """(subject CN, DNS names of the SAN) of the certificate the server presented."""
    cert = tls.getpeercert()
    assert cert
    cn = [str(attr[1]) for rdn in cert["subject"] for attr in rdn if attr[0] == "commonName"]
    sans = [str(san[1]) for san in cert.get("subjectAltName", ()) if san[0] == "DNS"]
    assert len(cn) == 1, cert
    return cn[0], sans


def pid_of(server: Server, pki: Path, pool: str) -> int:
    with tls_connect(tls_addr(server), client_ctx(pki), f"{pool}.test") as tls:
        pid: int = get(tls)["pid"]
    return pid


# --- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["a", "b"])
def test_each_sni_reaches_its_pool_with_its_certificate(server: Server, pki: Path,
                                                        pool: str) -> None:
    name = f"{pool}.test"
    with tls_connect(tls_addr(server), client_ctx(pki), name) as tls:
        assert peer_names(tls) == (name, [name])
        got = get(tls, "/hello")
    assert (got["app"], got["pool"]) == (pool, pool), got
    assert got["sni"] == name
    assert got["scheme"] == "https"
    assert got["path"] == "/hello"


@pytest.mark.parametrize("pool", ["a", "b"])
def test_httpx_with_the_ca_keeps_its_connection(server: Server, pki: Path, pool: str) -> None:
    # (one Client per SNI: httpx pools connections by URL origin, not by SNI)
    host, port = tls_addr(server)
    with httpx.Client(verify=client_ctx(pki), timeout=10) as client:
        bodies = []
        for i in range(3):
            r = client.get(f"https://{host}:{port}/{i}",
                           extensions={"sni_hostname": f"{pool}.test"})
            assert r.status_code == 200
            bodies.append(r.json())
    assert {(b["app"], b["scheme"]) for b in bodies} == {(pool, "https")}, bodies
    assert len({tuple(b["client"]) for b in bodies}) == 1, bodies   # one connection


def test_keep_alive_several_requests_on_one_connection(server: Server, pki: Path) -> None:
    with tls_connect(tls_addr(server), client_ctx(pki), "b.test") as tls:
        answers = [get(tls, f"/{i}") for i in range(5)]
        local = tls.getsockname()
    assert [a["path"] for a in answers] == [f"/{i}" for i in range(5)]
    assert {a["app"] for a in answers} == {"b"}
    assert {a["pid"] for a in answers} == {answers[0]["pid"]}
    assert {a["scheme"] for a in answers} == {"https"}
    # the app saw one client: this one connection
    assert {(a["client"][0], a["client"][1]) for a in answers} == {(local[0], local[1])}


@pytest.mark.parametrize("pool", ["a", "b"])
def test_wss(server: Server, pki: Path, pool: str) -> None:
    host, port = tls_addr(server)
    name = f"{pool}.test"
    raw = socket.create_connection((host, port), timeout=10)
    with ws_client.connect(f"wss://{name}:{port}/ws", sock=raw, ssl=client_ctx(pki),
                           server_hostname=name, open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert (hello["app"], hello["scheme"], hello["sni"]) == (pool, "wss", name), hello
        for i in range(3):
            ws.send(f"m{i}")
            assert ws.recv(timeout=10) == f"{pool}:m{i}"


@pytest.mark.parametrize("sni", [None, "c.test"])
def test_no_or_unknown_sni_goes_to_the_default_pool(server: Server, pki: Path,
                                                     sni: str | None) -> None:
    # default_pool = "b": its worker answers, with its own certificate
    with tls_connect(tls_addr(server), client_ctx(pki, check_hostname=False), sni) as tls:
        assert peer_names(tls) == ("b.test", ["b.test"])
        got = get(tls)
    assert (got["app"], got["pool"], got["sni"], got["scheme"]) == ("b", "b", sni, "https")


def told(server: Server, pid: int, case: str) -> int:
    """How many of the connections of ``case`` the server has given up on so far: for
    ``plain-sniffed``, the connections the dispatcher refused at once with 400, since the
    pool they route to ends TLS (counted by reason; its log line is rate-limited);
    otherwise the worker's log lines about a failed handshake."""
    if case == "plain-sniffed":
        n: int = server.status()["counters"]["refused_by_reason"].get("not_tls", 0)
        return n
    return sum(f"[{pid}] sockshare.web" in line and "TLS handshake failed" in line
               for line in server.log().splitlines())


def _client_hello(sni: str) -> bytes:
    """The first flight of a TLS client for ``sni`` (a complete ClientHello)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def bad_client(case: str, addr: tuple[str, int]) -> None:
    """One client that never completes a TLS session: ``plain-*`` send an HTTP request
    (and must not get a 200); ``untrusted`` does not trust the server's certificate (it
    aborts the handshake with an alert); ``hello-then-reset`` sends a ClientHello and
    resets the connection."""
    if case == "untrusted":
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_connect(addr, ssl.create_default_context(), "a.test").close()
        return
    with socket.create_connection(addr, timeout=10) as s:
        if case == "hello-then-reset":
            s.sendall(_client_hello("a.test"))
            time.sleep(0.01)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        s.sendall(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
        out = read_to_close(s, until_timeout=True)
    assert not out.startswith(b"HTTP/1.1 200"), out
    if case == "plain-sniffed":
        assert out.startswith(b"HTTP/1.1 400 "), out


#: case -> (listener, the pool that gets the connection)
BAD = {"plain-raw": ("raw", "a"), "plain-sniffed": ("tls", "b"), "untrusted": ("tls", "a"),
       "hello-then-reset": ("tls", "a")}


@pytest.mark.parametrize("case", list(BAD))
def test_failed_handshakes_cost_the_worker_no_fd(server: Server, pki: Path, case: str) -> None:
    """``plain-raw``: plain HTTP reaches pool a's worker (no sniffing), whose handshake
    fails; ``plain-sniffed``: the sniffer reads the HTTP head, routes it to the default
    pool b, which ends TLS: the dispatcher answers 400 at once, no worker is bothered;
    ``untrusted`` and
    ``hello-then-reset``: pool a's worker starts the handshake, the client gives up. Each
    time: closed, no fd left over, the same worker still serves."""
    listener, pool = BAD[case]
    pid = pid_of(server, pki, pool)
    time.sleep(0.2)   # that connection's close is processed
    before = fd_table(pid)
    n = len(before)
    addr: tuple[str, int] = server.address(listener)
    said_before = told(server, pid, case)
    for _ in range(20):
        bad_client(case, addr)
    deadline = time.monotonic() + 15
    while told(server, pid, case) - said_before < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert told(server, pid, case) - said_before == 20, server.log()[-3000:]
    wait_fd_count(pid, n, before=before, what=f"pool {pool}'s worker")
    assert pid_of(server, pki, pool) == pid   # alive, and still the one serving
    wait_fd_count(pid, n, before=before, what=f"pool {pool}'s worker")
    st = server.status()
    assert all(w["state"] == "ready" for w in st["workers"]), st["workers"]


def test_reload_closes_tls_keep_alive_between_requests(server: Server, pki: Path) -> None:
    """TLS that ended in a worker cannot move (its state is in that process): on a reload
    its idle keep-alive connection is closed cleanly between requests (close_notify, then
    EOF), never handed raw to a worker that would read TLS records as HTTP. A new
    connection is served by the new generation. (Last in this module: it replaces the
    workers the other tests share.)"""
    with tls_connect(tls_addr(server), client_ctx(pki), "a.test") as tls:
        old_pid = get(tls)["pid"]
        resp = request(server.control, {"cmd": "reload", "wait": True}, timeout=60.0)
        assert resp["ok"], resp
        tls.settimeout(15)
        assert tls.recv(100) == b""   # closed by the old worker, cleanly
    assert pid_of(server, pki, "a") != old_pid
    st = server.wait_for(lambda st: st["counters"]["web_moves_refused"] >= 1, timeout=15,
                         what="the refusal (TLS cannot move) counted")
    assert st["counters"]["web_keepalive_handed_over"] == 0
