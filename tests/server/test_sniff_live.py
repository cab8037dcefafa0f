"""sniff() on real sockets: real clients on 127.0.0.1, no mocks.

The TLS tests prove that nothing was consumed in the only way that counts: after
sniffing, the accepted socket completes a real TLS handshake (self-signed certificate
made here, verified by the client) and carries application data. The HTTP tests compare
the pre-read data with the exact bytes http.client wrote. The PROXY tests send the
header and what follows in one segment, so that consuming one byte too many or too few
would show. Garbage, silence, hang-ups and cancellation must end within the time bound,
leave SO_RCVLOWAT as it was, and leak no descriptor.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockshare import LocalProtocolError
from sockshare.server._sniff import SniffError, SniffResult, SniffRules, sniff

pytestmark = pytest.mark.timeout(60)

HOSTS = {"www.example.test": "web", "*.api.example.test": "api-tenants"}
SNIS = {"api.example.test": "api", "*.example.test": "tls-web"}
RULES = SniffRules(hosts=HOSTS, snis=SNIS, default="fallback")
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# --- plumbing ------------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Client(threading.Thread):
    """Run a blocking client function on a thread; :meth:`result` re-raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 20.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "client thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(10)
    yield lst
    lst.close()


def addr(lst: socket.socket) -> tuple[str, int]:
    host, port = lst.getsockname()[:2]
    return host, port


def accept(lst: socket.socket) -> socket.socket:
    conn, _ = lst.accept()
    conn.setblocking(False)
    return conn


def run_sniff(conn: socket.socket, rules: SniffRules = RULES, timeout: float = 5.0) -> SniffResult:
    return asyncio.run(sniff(conn, rules, timeout))


def sniff_error(conn: socket.socket, rules: SniffRules = RULES,
                timeout: float = 5.0) -> tuple[SniffError, float]:
    t0 = time.monotonic()
    with pytest.raises(SniffError) as info:
        run_sniff(conn, rules, timeout)
    return info.value, time.monotonic() - t0


def lowat(conn: socket.socket) -> int:
    return conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def raw_client(lst: socket.socket, *pieces: bytes, pause: float = 0.05,
               then: str = "wait") -> Client:
    """Connect, send ``pieces`` (one segment each), then wait for the server to close,
    or close (``"close"``: FIN) or reset (``"reset"``: RST) at once."""
    def go() -> bytes:
        with socket.create_connection(addr(lst), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(pause)
                s.sendall(piece)
            if then == "close":  # FIN
                return b""
            if then == "reset":  # RST
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return b""
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except ConnectionResetError:  # closed by the server with bytes unread
                pass
            return out
    return Client(go)


# --- certificates and TLS clients -------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for api.example.test and *.example.test, made here."""
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl tool is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "1",
             "-subj", "/CN=api.example.test",
             "-addext", "subjectAltName=DNS:api.example.test,DNS:*.example.test"],
            check=True, capture_output=True, timeout=60)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("api.example.test"), x509.DNSName("*.example.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def server_ctx(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


@pytest.fixture
def client_ctx(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def serve_tls(conn: socket.socket, server_ctx: ssl.SSLContext) -> str | None:
    """Complete the handshake on the sniffed socket; answer one b"ping" with b"pong"."""
    conn.setblocking(True)
    conn.settimeout(10)
    with server_ctx.wrap_socket(conn, server_side=True) as tls:
        assert tls.recv(4) == b"ping"
        tls.sendall(b"pong")
        return tls.selected_alpn_protocol()


def records(hs: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(hs), size):
        out += b"\x16\x03\x01" + struct.pack(">H", len(hs[i:i + size])) + hs[i:i + size]
    return out


def bio_tls_client(lst: socket.socket, ctx: ssl.SSLContext, hostname: str, *,
                   prefix: bytes = b"", cuts: tuple[int, ...] = (), record_size: int = 0,
                   hello_out: list[bytes] | None = None) -> Client:
    """A real TLS client over MemoryBIOs, so that its first flight can be shaped: sent
    after ``prefix`` in one segment, cut into segments at ``cuts``, or re-framed into
    handshake records of ``record_size`` bytes (what reaches the server is still one valid
    ClientHello). It sends b"ping" and returns the reply."""
    def go() -> bytes:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname=hostname)
        with socket.create_connection(addr(lst), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def pump() -> None:
                chunk = s.recv(65536)
                if not chunk:
                    raise EOFError("server closed during the handshake")
                incoming.write(chunk)

            first = True
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                flight = outgoing.read()
                if first:
                    first = False
                    if record_size:
                        flight = records(flight[5:], record_size)
                    if hello_out is not None:
                        hello_out.append(flight)
                    flight = prefix + flight
                    start = 0
                    for cut in (*cuts, len(flight)):
                        s.sendall(flight[start:cut])
                        start = cut
                        time.sleep(0.05)
                elif flight:
                    s.sendall(flight)
                pump()
            obj.write(b"ping")
            s.sendall(outgoing.read())
            while True:
                try:
                    return obj.read(4)
                except ssl.SSLWantReadError:
                    if out := outgoing.read():
                        s.sendall(out)
                    pump()
    return Client(go)


# --- TLS ---------------------------------------------------------------------------------------


class TestTls:
    @pytest.mark.parametrize(("hostname", "pool"), [("api.example.test", "api"),
                                                   ("www.example.test", "tls-web")])
    def test_sni_routes_then_the_worker_handshakes(
            self, listener: socket.socket, server_ctx: ssl.SSLContext,
            client_ctx: ssl.SSLContext, hostname: str, pool: str) -> None:
        def client() -> tuple[bytes, str | None]:
            with socket.create_connection(addr(listener), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.sendall(b"ping")
                return tls.recv(4), tls.selected_alpn_protocol()

        c = Client(client)
        conn = accept(listener)
        try:
            result = run_sniff(conn)
            assert result.pool == pool
            assert result.meta == {"protocol": "tls", "sni": hostname, "alpn": ["h2", "http/1.1"]}
            assert result.data == b""
            assert lowat(conn) == 1
            assert serve_tls(conn, server_ctx) == "h2"
        finally:
            conn.close()
        assert c.result() == (b"pong", "h2")

    def test_without_sni_goes_to_default(self, listener: socket.socket,
                                         server_ctx: ssl.SSLContext, cert: tuple[Path, Path]) -> None:
        ctx = ssl.create_default_context(cafile=str(cert[0]))
        ctx.check_hostname = False

        def client() -> bytes:
            with socket.create_connection(addr(listener), timeout=10) as raw, \
                    ctx.wrap_socket(raw) as tls:
                tls.sendall(b"ping")
                return tls.recv(4)

        c = Client(client)
        conn = accept(listener)
        try:
            result = run_sniff(conn)
            assert (result.pool, result.meta["sni"], result.meta["alpn"]) == ("fallback", None, [])
            serve_tls(conn, server_ctx)
        finally:
            conn.close()
        assert c.result() == b"pong"

    @pytest.mark.parametrize(("cuts", "record_size"), [((3,), 0), ((1, 4, 60, 200), 0),
                                                      ((7, 250), 100), ((), 64)])
    def test_split_hello_is_peeked_until_complete(
            self, listener: socket.socket, server_ctx: ssl.SSLContext,
            client_ctx: ssl.SSLContext, cuts: tuple[int, ...], record_size: int) -> None:
        sent: list[bytes] = []
        c = bio_tls_client(listener, client_ctx, "x.example.test", cuts=cuts,
                           record_size=record_size, hello_out=sent)
        conn = accept(listener)
        try:
            t0 = time.monotonic()
            result = run_sniff(conn)
            assert time.monotonic() - t0 < 2.0
            assert (result.pool, result.meta["sni"], result.data) == ("tls-web", "x.example.test", b"")
            assert lowat(conn) == 1
            # nothing consumed: the whole first flight is still queued, byte for byte
            assert conn.recv(65536, socket.MSG_PEEK) == sent[0]
            serve_tls(conn, server_ctx)
        finally:
            conn.close()
        assert c.result() == b"pong"

    def test_proxy_v2_then_tls_in_one_segment(self, listener: socket.socket,
                                              server_ctx: ssl.SSLContext,
                                              client_ctx: ssl.SSLContext) -> None:
        body = (ipaddress.IPv4Address("198.51.100.20").packed
                + ipaddress.IPv4Address("192.0.2.10").packed + struct.pack(">HH", 50000, 443)
                + b"\x04\x00\x03abc")  # a NOOP TLV, skipped
        header = V2_SIG + b"\x21\x11" + struct.pack(">H", len(body)) + body
        c = bio_tls_client(listener, client_ctx, "api.example.test", prefix=header)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(proxy="required", snis=SNIS))
            assert result.meta == {
                "protocol": "tls", "sni": "api.example.test", "alpn": ["h2", "http/1.1"],
                "proxy": {"version": 2, "family": "inet", "src": ["198.51.100.20", 50000],
                          "dst": ["192.0.2.10", 443]}}
            assert (result.pool, result.data) == ("api", b"")
            serve_tls(conn, server_ctx)  # fails if one byte of the header was left, or taken too many
        finally:
            conn.close()
        assert c.result() == b"pong"


# --- HTTP ------------------------------------------------------------------------------------


class RecordingConnection(http.client.HTTPConnection):
    """http.client, unchanged, except that it keeps a copy of every byte it sends."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent = bytearray()

    def send(self, data: Any) -> None:
        assert isinstance(data, bytes | bytearray)
        self.sent += data
        super().send(data)


def http_client(lst: socket.socket, method: str, path: str, headers: dict[str, str],
                body: bytes | None = None) -> tuple[Client, RecordingConnection]:
    conn = RecordingConnection(*addr(lst), timeout=10)

    def go() -> tuple[int, bytes]:
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()
    return Client(go), conn


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class TestHttp:
    def test_host_routes_and_data_is_what_the_client_sent(self, listener: socket.socket) -> None:
        c, hc = http_client(listener, "GET", "/hello?x=1", {"Host": "WWW.Example.Test:8080",
                                                             "X-Test": "1"})
        conn = accept(listener)
        try:
            result = run_sniff(conn)
            assert result.pool == "web"
            assert result.meta == {"protocol": "http", "method": "GET", "path": "/hello?x=1",
                                   "version": "HTTP/1.1", "host": "www.example.test"}
            conn.setblocking(True)
            conn.sendall(RESPONSE)  # the "worker" answers on the same socket
        finally:
            conn.close()
        assert c.result() == (200, b"ok")
        assert result.data == bytes(hc.sent)
        assert result.data.startswith(b"GET /hello?x=1 HTTP/1.1\r\n")

    def test_body_stays_in_the_socket(self, listener: socket.socket) -> None:
        body = b'{"k": "v"}' * 10
        c, hc = http_client(listener, "POST", "/submit", {"Host": "t1.api.example.test"}, body)
        conn = accept(listener)
        try:
            result = run_sniff(conn)
            assert (result.pool, result.meta["method"]) == ("api-tenants", "POST")
            assert result.data.endswith(b"\r\n\r\n")
            conn.setblocking(True)
            conn.settimeout(10)
            rest = b""
            while len(rest) < len(body):
                rest += conn.recv(65536)
            assert rest == body
            conn.sendall(RESPONSE)
        finally:
            conn.close()
        assert c.result() == (200, b"ok")
        assert result.data + rest == bytes(hc.sent)

    def test_head_split_across_segments(self, listener: socket.socket) -> None:
        head = b"GET / HTTP/1.1\r\nHost: www.example.test\r\nAccept: */*\r\n\r\n"
        c = raw_client(listener, head[:5], head[5:20], head[20:41], head[41:])
        conn = accept(listener)
        try:
            result = run_sniff(conn)
            assert (result.pool, result.data) == ("web", head)
            assert lowat(conn) == 1
        finally:
            conn.close()
        c.result()

    @pytest.mark.parametrize("until", ["headers", "host"])
    def test_head_a_byte_at_a_time(self, listener: socket.socket, until: str) -> None:
        """A trickled head (consumed as it comes, looked at with pauses) gives exactly
        the head as data; the body stays in the socket."""
        head = b"GET /x HTTP/1.1\r\nHost: www.example.test\r\nX-A: 1\r\n\r\n"
        body = b"BODY"
        c = raw_client(listener, *(head[i:i + 1] for i in range(len(head))), body,
                       pause=0.003)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(hosts=HOSTS, http_until=until))  # type: ignore[arg-type]
            assert result.pool == "web"
            want = head if until == "headers" else head[:head.index(b"X-A")]
            assert result.data == want
            time.sleep(0.2)
            assert conn.recv(100) == head[len(want):] + body
            assert lowat(conn) == 1
        finally:
            conn.close()
        c.result()

    def test_slow_first_line_that_is_not_http(self, listener: socket.socket) -> None:
        """A first line read while it trickled in, then not HTTP: the bytes read are the
        data (the worker sees them first), the rest stays in the socket."""
        line = b"SET key value\r\n"
        c = raw_client(listener, *(line[i:i + 1] for i in range(len(line))), b"more",
                       pause=0.01)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(default="other"))
            assert (result.pool, result.meta) == ("other", {"protocol": "unknown"})
            assert line.startswith(result.data)
            assert result.data   # (read while waiting for the end of the line)
            rest = b""
            conn.settimeout(5.0)   # (the client may still be trickling on a busy machine)
            while len(result.data) + len(rest) < len(line) + 4:
                chunk = conn.recv(100)
                if not chunk:
                    break
                rest += chunk
            assert result.data + rest == line + b"more"
        finally:
            conn.close()
        c.result()

    def test_until_host(self, listener: socket.socket) -> None:
        head = b"GET / HTTP/1.1\r\nHost: www.example.test\r\nAccept: */*\r\n\r\n"
        c = raw_client(listener, head)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(hosts=HOSTS, http_until="host"))
            assert result.data == head[:head.index(b"Accept")]
            assert result.pool == "web"
            assert conn.recv(100) == head[len(result.data):]
        finally:
            conn.close()
        c.result()

    def test_unknown_host_goes_to_default(self, listener: socket.socket) -> None:
        c = raw_client(listener, b"GET / HTTP/1.0\r\n\r\n")
        conn = accept(listener)
        try:
            result = run_sniff(conn)
            assert (result.pool, result.meta["host"]) == ("fallback", None)
        finally:
            conn.close()
        c.result()


# --- PROXY protocol -------------------------------------------------------------------------------

REQUEST = b"GET /p HTTP/1.1\r\nHost: www.example.test\r\n\r\n"


class TestProxy:
    def test_v1_then_http(self, listener: socket.socket) -> None:
        c = raw_client(listener, b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 80\r\n" + REQUEST)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(proxy="required", hosts=HOSTS))
            assert result.meta["proxy"] == {"version": 1, "family": "inet",
                                            "src": ["203.0.113.7", 51234], "dst": ["192.0.2.1", 80]}
            assert (result.pool, result.data) == ("web", REQUEST)
        finally:
            conn.close()
        c.result()

    def test_v2_ipv6_then_http(self, listener: socket.socket) -> None:
        body = (ipaddress.IPv6Address("2001:db8::42").packed + ipaddress.IPv6Address("2001:db8::1").packed
                + struct.pack(">HH", 4242, 8080) + b"\x05\x00\x02id")
        header = V2_SIG + b"\x21\x21" + struct.pack(">H", len(body)) + body
        c = raw_client(listener, header + REQUEST)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(proxy="optional", hosts=HOSTS))
            assert result.meta["proxy"] == {"version": 2, "family": "inet6",
                                            "src": ["2001:db8::42", 4242], "dst": ["2001:db8::1", 8080]}
            assert result.data == REQUEST
        finally:
            conn.close()
        c.result()

    def test_header_split_from_what_follows(self, listener: socket.socket) -> None:
        line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 80\r\n"
        c = raw_client(listener, line[:10], line[10:] + REQUEST[:8], REQUEST[8:])
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(proxy="required", hosts=HOSTS))
            assert result.data == REQUEST
            assert result.meta["proxy"]["src"] == ["203.0.113.7", 51234]
        finally:
            conn.close()
        c.result()

    def test_optional_and_absent(self, listener: socket.socket) -> None:
        c = raw_client(listener, REQUEST)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(proxy="optional", hosts=HOSTS))
            assert "proxy" not in result.meta
            assert result.data == REQUEST
        finally:
            conn.close()
        c.result()

    def test_required_and_absent(self, listener: socket.socket) -> None:
        c = raw_client(listener, REQUEST)
        conn = accept(listener)
        try:
            err, elapsed = sniff_error(conn, SniffRules(proxy="required"))
            assert err.reason == "garbage"
            assert "expected a PROXY protocol header" in str(err)
            assert elapsed < 1.0
        finally:
            conn.close()
        c.result()

    def test_proxy_only_leaves_the_stream(self, listener: socket.socket) -> None:
        c = raw_client(listener, b"PROXY UNKNOWN\r\n" + REQUEST)
        conn = accept(listener)
        try:
            result = run_sniff(conn, SniffRules(proxy="required", http=False, tls=False, default="d"))
            assert result == SniffResult("d", {"protocol": "unknown", "proxy": {
                "version": 1, "family": "unspec", "src": None, "dst": None}}, b"")
            assert conn.recv(100) == REQUEST
        finally:
            conn.close()
        c.result()


# --- garbage, silence, hang-ups --------------------------------------------------------------------


class TestFailures:
    @pytest.mark.parametrize(("data", "reason", "words"), [
        (b"\x16\x03\x01\xff\xff", "oversize", "TLS record of 65535 bytes"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "garbage", "not a ClientHello"),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", "garbage", "malformed HTTP header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "garbage", "several Host"),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"x" * 9000, "oversize", "longer than 8192"),
        (b"GET /" + b"a" * 9000, "oversize", "over 8192"),
        (b"GET /" + b'"' * 7500 + b" HTTP/1.1\r\n\r\n", "oversize", "sniffed metadata of"),
    ])
    def test_garbage_fails_fast(self, listener: socket.socket, data: bytes, reason: str,
                                words: str) -> None:
        c = raw_client(listener, data)
        conn = accept(listener)
        try:
            err, elapsed = sniff_error(conn)
            assert (err.reason, words in str(err)) == (reason, True), str(err)
            assert elapsed < 1.0
            assert lowat(conn) == 1
        finally:
            conn.close()
        c.result()

    def test_unrecognised(self, listener: socket.socket) -> None:
        junk = b"\x00\x01\x02binary junk\xff"
        for unknown in ("reject", "default"):
            c = raw_client(listener, junk)
            conn = accept(listener)
            try:
                rules = SniffRules(default="other", unknown=unknown)
                if unknown == "reject":
                    err, elapsed = sniff_error(conn, rules)
                    assert err.reason == "unrecognised"
                    assert "neither HTTP nor TLS" in str(err)
                    assert elapsed < 1.0
                else:
                    result = run_sniff(conn, rules)
                    assert result == SniffResult("other", {"protocol": "unknown"}, b"")
                    assert conn.recv(100, socket.MSG_PEEK) == junk
            finally:
                conn.close()
            c.result()

    @pytest.mark.parametrize("rules", [
        SniffRules(unknown="reject"),
        SniffRules(proxy="required", default="d"),
    ])
    def test_silent_client_is_an_error_when_required(self, listener: socket.socket,
                                                     rules: SniffRules) -> None:
        c = raw_client(listener)
        conn = accept(listener)
        try:
            err, elapsed = sniff_error(conn, rules, timeout=0.3)
            assert err.reason == "silent"
            assert str(err) == "the client sent nothing in 0.3 s"
            assert 0.29 <= elapsed < 1.0
        finally:
            conn.close()
        c.result()

    @pytest.mark.parametrize("proxy", ["off", "optional"])
    def test_silent_client_goes_to_default(self, listener: socket.socket, proxy: str) -> None:
        c = raw_client(listener)
        conn = accept(listener)
        try:
            t0 = time.monotonic()
            result = run_sniff(conn, SniffRules(proxy=proxy, default="smtp"), 0.3)  # type: ignore[arg-type]
            assert 0.29 <= time.monotonic() - t0 < 1.0
            assert result == SniffResult("smtp", {"protocol": "unknown", "silent": True}, b"")
        finally:
            conn.close()
        c.result()

    def test_no_sniffer_returns_at_once(self, listener: socket.socket) -> None:
        c = raw_client(listener)
        conn = accept(listener)
        try:
            t0 = time.monotonic()
            result = run_sniff(conn, SniffRules(http=False, tls=False, default="x"), 5.0)
            assert time.monotonic() - t0 < 0.1
            assert result == SniffResult("x", {"protocol": "unknown"}, b"")
        finally:
            conn.close()
        c.result()

    @pytest.mark.parametrize("partial", [b"GET / HTTP/1.1\r\nHost: a", b"GET / HT",
                                         REAL_HELLO_START := b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
                                         b"PROXY TCP4 1.2."])
    def test_incomplete_then_silent_times_out(self, listener: socket.socket, partial: bytes) -> None:
        c = raw_client(listener, partial)
        conn = accept(listener)
        try:
            err, elapsed = sniff_error(conn, SniffRules(proxy="optional"), timeout=0.3)
            assert err.reason == "timeout"
            assert f"({len(partial)} bytes so far)" in str(err)
            assert 0.29 <= elapsed < 1.0
            assert lowat(conn) == 1
        finally:
            conn.close()
        c.result()

    @pytest.mark.parametrize("then", ["close", "reset"])
    @pytest.mark.parametrize("partial", [b"", b"GET / HTTP/1.1\r\nHost: a", b"\x16\x03\x01\x02\x00\x01"])
    def test_hang_up_is_seen_at_once(self, listener: socket.socket, partial: bytes, then: str) -> None:
        c = raw_client(listener, partial, then=then)
        conn = accept(listener)
        try:
            c.result()  # the client is gone before sniffing starts, or goes during it
            err, elapsed = sniff_error(conn, timeout=5.0)
            assert err.reason == "closed"
            assert elapsed < 1.0
            assert lowat(conn) == 1
        finally:
            conn.close()

    def test_cancelled_sniff_restores_the_socket(self, listener: socket.socket) -> None:
        c = raw_client(listener, b"\x16\x03\x01\x02\x00\x01")
        conn = accept(listener)

        async def main() -> None:
            task = asyncio.create_task(sniff(conn, RULES, 5.0))
            await asyncio.sleep(0.2)  # parked in the SO_RCVLOWAT wait by now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not asyncio.get_running_loop().remove_reader(conn.fileno())

        try:
            asyncio.run(main())
            assert lowat(conn) == 1
        finally:
            conn.close()
        c.result()

    def test_blocking_socket_is_a_caller_bug(self, listener: socket.socket) -> None:
        c = raw_client(listener, REQUEST)
        conn = accept(listener)
        conn.setblocking(True)
        try:
            with pytest.raises(LocalProtocolError, match="non-blocking"):
                run_sniff(conn)
        finally:
            conn.close()
        c.result()


def test_many_at_once_leak_nothing(listener: socket.socket) -> None:
    """A dispatcher's view: 40 connections of every kind sniffed concurrently in one loop."""
    hello = REAL_HELLO
    kinds = [
        ((REQUEST,), "web"),
        ((hello,), "api"),
        ((b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n" + REQUEST,), "web"),
        ((b"\x16\x03\x01\xff\xff",), "oversize"),
        ((b"GET / HT",), "timeout"),
        ((), "fallback"),
        ((REQUEST[:10], REQUEST[10:]), "web"),
        ((hello[:50], hello[50:]), "api"),
    ]
    rules = SniffRules(proxy="optional", hosts=HOSTS, snis=SNIS, default="fallback")
    baseline = fd_count()
    for _round in range(2):
        clients, conns, expected = [], [], []
        for i in range(40):
            pieces, want = kinds[i % len(kinds)]
            clients.append(raw_client(listener, *pieces))
            conns.append(accept(listener))
            expected.append(want)

        async def main(conns: list[socket.socket] = conns) -> list[Any]:
            return await asyncio.gather(*(sniff(c, rules, 0.5) for c in conns), return_exceptions=True)

        t0 = time.monotonic()
        results = asyncio.run(main())
        assert time.monotonic() - t0 < 2.0
        for got, want in zip(results, expected, strict=True):
            if isinstance(got, SniffError):
                assert got.reason == want, got
            else:
                assert isinstance(got, SniffResult), got
                assert got.pool == want
        for conn in conns:
            assert lowat(conn) == 1
            conn.close()
        for c in clients:
            c.result()
    assert fd_count() == baseline


def _real_hello() -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="api.example.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


REAL_HELLO = _real_hello()
