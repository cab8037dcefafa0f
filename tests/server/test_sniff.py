"""The sans-I/O sniffers of sockshare.server._sniff, byte by byte.

Every parser is checked on valid input (real OpenSSL ClientHellos, http.client-style
heads, PROXY headers as haproxy writes them), on every proper prefix of that input
(which must give NEED_DATA, never a result and never an error), on hand-made malformed
input (which must give SniffError, and early: before the message could be complete),
and fuzzed with hypothesis: nothing but a result, NEED_DATA or SniffError may come out.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import struct
from collections.abc import Callable
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockshare import SockshareError
from sockshare.server._sniff import (
    MAX_CLIENT_HELLO,
    NEED_DATA,
    ClientHello,
    HttpHead,
    ProxyHeader,
    SniffError,
    SniffRules,
    classify,
    parse_client_hello,
    parse_http_head,
    parse_proxy_header,
    proxy_signature,
    route,
)

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# --- sample builders --------------------------------------------------------------------


def openssl_hello(server_hostname: str | None = "api.example.test",
                  alpn: list[str] | None = None) -> bytes:
    """The first flight of a real ssl-module client: one record with its ClientHello."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def ext(etype: int, data: bytes) -> bytes:
    return struct.pack(">H", etype) + vec(2, data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def alpn_ext(*protos: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p) for p in protos)))


def hello_body(exts: list[bytes] | None, *, session: bytes = b"\x11" * 32,
               suites: bytes = b"\x13\x01\x13\x02", compression: bytes = b"\x00",
               version: bytes = b"\x03\x03", tail: bytes = b"") -> bytes:
    body = version + b"\x22" * 32 + vec(1, session) + vec(2, suites) + vec(1, compression)
    if exts is not None:
        body += vec(2, b"".join(exts))
    return body + tail


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(hs: bytes, size: int = 1 << 14, version: bytes = b"\x03\x01") -> bytes:
    """``hs`` cut into handshake records of at most ``size`` bytes each."""
    out = b""
    for i in range(0, len(hs), size):
        out += b"\x16" + version + vec(2, hs[i:i + size])
    return out


def hand_hello(*exts: bytes, **kw: bytes) -> bytes:
    return records(handshake(hello_body(list(exts), **kw)))


def v2_header(cmd: int = 1, fam: int = 0x11, addr: bytes = b"", tlvs: bytes = b"",
              version: int = 2) -> bytes:
    body = addr + tlvs
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([(version << 4) | cmd, fam])
            + struct.pack(">H", len(body)) + body)


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack(">HH", sport, dport))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack(">HH", sport, dport))


def assert_prefixes_need_data(parse: Callable[[bytes], object], whole: bytes,
                              upto: int | None = None) -> None:
    """Every proper prefix of a valid message (up to ``upto``) is NEED_DATA."""
    for i in range(len(whole) if upto is None else upto):
        assert parse(whole[:i]) is NEED_DATA, f"prefix of {i} bytes: {whole[:i]!r}"


def outcome(parse: Callable[[bytes], object], data: bytes) -> object:
    """Run a parser; only a result, NEED_DATA or SniffError may come out."""
    try:
        return parse(data)
    except SniffError as exc:
        err = exc
    assert isinstance(err, SockshareError)
    assert err.reason in ("garbage", "oversize")
    assert str(err)
    assert "\n" not in str(err)
    return err


# --- TLS ClientHello -------------------------------------------------------------------


class TestClientHello:
    def test_real_openssl_hello(self) -> None:
        data = openssl_hello("API.Example.Test", ["h2", "http/1.1"])
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert hello.sni == "api.example.test"
        assert hello.alpn == ("h2", "http/1.1")
        assert hello.length == len(data)
        assert hello.legacy_version == 0x0303

    def test_real_hello_every_prefix_needs_data(self) -> None:
        data = openssl_hello(alpn=["http/1.1"])
        assert_prefixes_need_data(parse_client_hello, data)

    def test_trailing_bytes_after_the_hello_are_left_alone(self) -> None:
        data = openssl_hello()
        hello = parse_client_hello(data + b"\x17\x03\x03\x00\x05early")
        assert isinstance(hello, ClientHello)
        assert hello.length == len(data)

    def test_no_server_name(self) -> None:
        hello = parse_client_hello(openssl_hello(None))
        assert isinstance(hello, ClientHello)
        assert hello.sni is None
        assert hello.alpn == ()

    def test_no_extensions_at_all(self) -> None:
        data = records(handshake(hello_body(None)))
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.alpn) == (None, ())

    @pytest.mark.parametrize("size", [1, 7, 100, 300])
    def test_fragmented_across_records(self, size: int) -> None:
        hs = handshake(hello_body([sni_ext(b"frag.example.test"), alpn_ext(b"h2")]))
        data = records(hs, size)
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert hello.sni == "frag.example.test"
        assert hello.alpn == ("h2",)
        assert hello.length == len(data)
        assert_prefixes_need_data(parse_client_hello, data)

    def test_real_hello_refragmented(self) -> None:
        data = openssl_hello(alpn=["h2"])
        hs = data[5:]
        re_recorded = records(hs, 64)
        hello = parse_client_hello(re_recorded)
        assert isinstance(hello, ClientHello)
        assert hello.sni == "api.example.test"

    def test_sni_normalised(self) -> None:
        hello = parse_client_hello(hand_hello(sni_ext(b"WWW.Example.TEST.")))
        assert isinstance(hello, ClientHello)
        assert hello.sni == "www.example.test"

    def test_other_name_types_are_skipped(self) -> None:
        data = hand_hello(ext(0, vec(2, b"\x07" + vec(2, b"whatever") + b"\x00" + vec(2, b"a.test"))))
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert hello.sni == "a.test"

    def test_non_ascii_alpn_is_escaped(self) -> None:
        hello = parse_client_hello(hand_hello(alpn_ext(b"h2", b"\xff\x01")))
        assert isinstance(hello, ClientHello)
        assert hello.alpn == ("h2", "\\xff\\x01")
        json.dumps(list(hello.alpn))

    @pytest.mark.parametrize(("data", "words"), [
        (b"\x17\x03\x03\x00\x10", "not a TLS handshake"),
        (b"\x16\x02", "version"),
        (b"\x16\x03\x01\x00\x00", "empty"),
        (b"\x16\x03\x01\x00\x05\x02", "not a ClientHello"),
        (records(handshake(b"")), "malformed"),
        (hand_hello(sni_ext(b"a.test"), sni_ext(b"b.test")), "repeats extension"),
        (hand_hello(sni_ext(b"a.test", b"b.test")), "two host names"),
        (hand_hello(ext(0, b"")), "malformed"),
        (hand_hello(ext(0, vec(2, b""))), "server_name"),
        (hand_hello(ext(0, vec(2, b"\x00" + vec(2, b"a.test")) + b"x")), "server_name"),
        (hand_hello(sni_ext(b"")), "TLS server_name of 0 bytes"),
        (hand_hello(sni_ext(b"a b.test")), "invalid TLS server_name"),
        (hand_hello(sni_ext(b"evil\x00.test")), "invalid TLS server_name"),
        (hand_hello(sni_ext(b"caf\xc3\xa9.test")), "invalid TLS server_name"),
        (hand_hello(sni_ext(b"a" * 256)), "256 bytes"),
        (hand_hello(alpn_ext(b"h2", b"")), "empty protocol name"),
        (hand_hello(ext(16, vec(2, b""))), "ALPN"),
        (hand_hello(ext(16, b"\x00\x05\x02h2")), "malformed"),
        (hand_hello(session=b"s" * 33), "session id"),
        (hand_hello(suites=b"\x13"), "cipher suite"),
        (hand_hello(suites=b""), "cipher suite"),
        (hand_hello(compression=b""), "compression"),
        (hand_hello(version=b"\x02\x00"), "version"),
        (records(handshake(hello_body([], tail=b"junk"))), "stray bytes"),
        (records(handshake(hello_body([sni_ext(b"a.test")])[:-3])), "malformed"),
    ])
    def test_malformed(self, data: bytes, words: str) -> None:
        with pytest.raises(SniffError, match=words) as info:
            parse_client_hello(data)
        assert info.value.reason == "garbage"

    def test_other_record_between_fragments(self) -> None:
        hs = handshake(hello_body([sni_ext(b"a.test")]))
        data = records(hs[:10]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(hs[10:])
        with pytest.raises(SniffError, match="record of type 21 inside"):
            parse_client_hello(data)

    def test_oversize_record_refused_from_its_header(self) -> None:
        with pytest.raises(SniffError, match="TLS record of 65535 bytes") as info:
            parse_client_hello(b"\x16\x03\x01\xff\xff")
        assert info.value.reason == "oversize"

    def test_oversize_hello_refused_from_its_length(self) -> None:
        with pytest.raises(SniffError, match="TLS ClientHello of") as info:
            parse_client_hello(b"\x16\x03\x01\x40\x00\x01\x10\x00\x00")
        assert info.value.reason == "oversize"

    def test_max_size(self) -> None:
        data = openssl_hello()
        assert isinstance(parse_client_hello(data, max_size=len(data)), ClientHello)
        with pytest.raises(SniffError, match="over") as info:
            parse_client_hello(data, max_size=len(data) - 1)
        assert info.value.reason == "oversize"

    def test_garbage(self) -> None:
        for junk in (b"\x00", b"GET / HTTP/1.1\r\n", b"\x16\x16", b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"):
            with pytest.raises(SniffError):
                parse_client_hello(junk)

    @FUZZ
    @given(st.binary(max_size=600))
    def test_fuzz_arbitrary(self, data: bytes) -> None:
        outcome(parse_client_hello, data)
        outcome(parse_client_hello, b"\x16\x03\x01" + data)

    @FUZZ
    @given(st.data())
    def test_fuzz_mutated_real_hello(self, draw: st.DataObject) -> None:
        data = bytearray(REAL_HELLO)
        for _ in range(draw.draw(st.integers(1, 4))):
            i = draw.draw(st.integers(0, len(data) - 1))
            data[i] = draw.draw(st.integers(0, 255))
        cut = draw.draw(st.integers(0, len(data)))
        outcome(parse_client_hello, bytes(data[:cut]))
        result = outcome(parse_client_hello, bytes(data))
        if isinstance(result, ClientHello) and result.sni is not None:
            json.dumps([result.sni, list(result.alpn)])

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6),
           st.integers(1, 64))
    def test_fuzz_structured_extensions(self, exts: list[tuple[int, bytes]], size: int) -> None:
        data = records(handshake(hello_body([ext(t, d) for t, d in exts])), size)
        result = outcome(parse_client_hello, data)
        assert result is not NEED_DATA


REAL_HELLO = openssl_hello(alpn=["h2", "http/1.1"])


# --- HTTP/1.x ------------------------------------------------------------------------------

GET = (b"GET /index.html?q=1 HTTP/1.1\r\nHost: WWW.Example.Test:8080\r\n"
       b"User-Agent: test\r\nAccept: */*\r\n\r\n")


NAMES = st.from_regex(rb"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() != b"host")
VALUES = st.from_regex(rb"[\x21-\x7e\x80-\xff]([\x20-\x7e\t]{0,30}[\x21-\x7e])?", fullmatch=True)
HOSTNAMES = st.from_regex(rb"[A-Za-z0-9]{1,10}(\.[a-z0-9-]{1,10}){0,3}(:[0-9]{1,5})?", fullmatch=True)


class TestHttpHead:
    def test_get(self) -> None:
        head = parse_http_head(GET + b"pipelined bytes")
        assert head == HttpHead("GET", "/index.html?q=1", "HTTP/1.1", "www.example.test", len(GET), True)

    def test_every_prefix_needs_data(self) -> None:
        assert_prefixes_need_data(parse_http_head, GET)

    def test_host_mode_stops_after_the_host_line(self) -> None:
        head = parse_http_head(GET, until="host")
        end = GET.index(b"User-Agent")
        assert isinstance(head, HttpHead)
        assert (head.host, head.length, head.complete) == ("www.example.test", end, False)
        # ... but only once the next line's first byte shows no folding
        assert_prefixes_need_data(lambda b: parse_http_head(b, until="host"), GET, end + 1)

    def test_host_mode_host_last(self) -> None:
        data = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
        assert parse_http_head(data, until="host") == HttpHead(
            "GET", "/", "HTTP/1.1", "a.test", len(data), True)

    def test_host_mode_without_host_waits_for_the_end(self) -> None:
        data = b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"
        assert parse_http_head(data, until="host") == HttpHead(
            "GET", "/", "HTTP/1.0", None, len(data), True)

    def test_host_mode_folded_host(self) -> None:
        with pytest.raises(SniffError, match="folding"):
            parse_http_head(b"GET / HTTP/1.1\r\nHost: a.test\r\n b.test\r\n\r\n", until="host")

    def test_absolute_form_wins(self) -> None:
        data = b"GET HTTP://User@Proxy.Test:81/x HTTP/1.1\r\nHost: other.test\r\n\r\n"
        head = parse_http_head(data)
        assert isinstance(head, HttpHead)
        assert head.host == "proxy.test"
        assert head.target == "HTTP://User@Proxy.Test:81/x"
        short = parse_http_head(data, until="host")
        assert isinstance(short, HttpHead)
        assert (short.host, short.length) == ("proxy.test", data.index(b"Host"))

    @pytest.mark.parametrize(("value", "host"), [
        (b"[::1]:8080", "[::1]"),
        (b"[2001:DB8::1]", "[2001:db8::1]"),
        (b"10.0.0.1:80", "10.0.0.1"),
        (b"a.test:", "a.test"),
        (b"a.test.", "a.test"),
        (b"", None),
        (b"  spaced.test \t", "spaced.test"),
    ])
    def test_host_values(self, value: bytes, host: str | None) -> None:
        head = parse_http_head(b"GET / HTTP/1.1\r\nHost:" + value + b"\r\n\r\n")
        assert isinstance(head, HttpHead)
        assert head.host == host

    def test_http10_without_host_and_bare_lf(self) -> None:
        data = b"HEAD / HTTP/1.0\nX-A: b\n\n"
        assert parse_http_head(data) == HttpHead("HEAD", "/", "HTTP/1.0", None, len(data), True)

    def test_h2c_preface(self) -> None:
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        assert classify(preface) == "http"
        head = parse_http_head(preface)
        assert head == HttpHead("PRI", "*", "HTTP/2.0", None, 18, True)

    def test_obs_text_in_values_is_allowed(self) -> None:
        data = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Name: caf\xc3\xa9\r\n\r\n"
        assert isinstance(parse_http_head(data), HttpHead)

    @pytest.mark.parametrize(("data", "words"), [
        (b"GET /\r\n\r\n", "not an HTTP request line"),
        (b"GET / HTTP/1.1 \r\n\r\n", "not an HTTP request line"),
        (b"GET  / HTTP/1.1\r\n", "not an HTTP request line"),
        (b"G\x00T", "not an HTTP request line"),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\n", "not an HTTP request line"),
        (b"GET / HTTP/2.0\r\n\r\n", "only HTTP/1.x"),
        (b"GET / HTTP/3.0\r\n\r\n", "only HTTP/1.x"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", "several Host"),
        (b"GET / HTTP/1.1\r\nhost: a.test\r\nHOST: a.test\r\n\r\n", "several Host"),
        (b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n", "malformed HTTP header"),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "malformed HTTP header"),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\n folded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", "control character"),
        (b"GET / HTTP/1.1\r\nX: a\x00", "control character"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host header"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host header"),
        (b"GET / HTTP/1.1\r\nHost: a.test:x\r\n\r\n", "invalid Host header"),
        (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", "invalid Host header"),
        (b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.test\r\n\r\n", "invalid Host header"),
        (b"GET / HTTP/1.1\r\nHost: " + b"a" * 300 + b"\r\n\r\n", "300 bytes"),
        (b"GET http://a b/ HTTP/1.1\r\n\r\n", "not an HTTP request line"),
        (b"GET http://a%zz:x/ HTTP/1.1\r\n\r\n", "invalid host in the request target"),
    ])
    def test_malformed(self, data: bytes, words: str) -> None:
        with pytest.raises(SniffError, match=words) as info:
            parse_http_head(data)
        assert info.value.reason == "garbage"

    def test_oversize_head(self) -> None:
        data = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 225 + b"\r\n"
        assert parse_http_head(data, max_size=256) is NEED_DATA
        with pytest.raises(SniffError, match="longer than 256") as info:
            parse_http_head(data + b"X: y\r\n\r\n", max_size=256)
        assert info.value.reason == "oversize"

    def test_oversize_request_line(self) -> None:
        with pytest.raises(SniffError, match="request line longer than 64") as info:
            parse_http_head(b"GET /" + b"a" * 100, max_size=64)
        assert info.value.reason == "oversize"

    def test_head_exactly_at_the_bound(self) -> None:
        data = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
        assert isinstance(parse_http_head(data, max_size=len(data)), HttpHead)
        with pytest.raises(SniffError, match="longer than"):
            parse_http_head(data, max_size=len(data) - 1)

    @FUZZ
    @given(st.lists(st.tuples(NAMES, VALUES), max_size=8), st.none() | HOSTNAMES,
           st.integers(0, 8), st.sampled_from([b"\r\n", b"\n"]))
    def test_generated_heads(self, headers: list[tuple[bytes, bytes]], host: bytes | None,
                             where: int, eol: bytes) -> None:
        lines = [name + b": " + value for name, value in headers]
        if host is not None:
            lines.insert(min(where, len(lines)), b"host:\t" + host + b" ")
        head = b"PUT /x HTTP/1.1" + eol + b"".join(line + eol for line in lines) + eol
        want = host.partition(b":")[0].decode().lower() if host is not None else None
        assert parse_http_head(head + b"body") == HttpHead("PUT", "/x", "HTTP/1.1", want, len(head), True)
        short = parse_http_head(head + b"body", until="host")
        assert isinstance(short, HttpHead)
        assert short.host == want
        if host is not None and not short.complete:
            assert head[:short.length].endswith(b" " + eol)
            assert head[short.length:][:1] not in (b" ", b"\t", b"\r", b"\n")

    @FUZZ
    @given(st.binary(max_size=300))
    def test_fuzz_arbitrary(self, data: bytes) -> None:
        outcome(parse_http_head, data)
        outcome(parse_http_head, b"GET / HTTP/1.1\r\n" + data)
        outcome(lambda b: parse_http_head(b, until="host", max_size=64), b"GET / HTTP/1.1\r\nHost:" + data)

    @FUZZ
    @given(st.data())
    def test_fuzz_mutated_head(self, draw: st.DataObject) -> None:
        data = bytearray(GET)
        for _ in range(draw.draw(st.integers(1, 3))):
            i = draw.draw(st.integers(0, len(data) - 1))
            data[i] = draw.draw(st.sampled_from(b" \t\r\n:\x00\x7f\x80/@[]Aa0."))
        parsers: list[Callable[[bytes], object]] = [
            parse_http_head, lambda b: parse_http_head(b, until="host")]
        for parse in parsers:
            for cut in (len(data), draw.draw(st.integers(0, len(data)))):
                result = outcome(parse, bytes(data[:cut]))
                if isinstance(result, HttpHead):
                    json.dumps([result.method, result.target, result.version, result.host])
                    assert result.length <= cut


# --- PROXY protocol -------------------------------------------------------------------------


class TestProxy:
    def test_v1_tcp4(self) -> None:
        line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n"
        hdr = parse_proxy_header(line + b"GET / HTTP/1.1\r\n")
        assert hdr == ProxyHeader(1, "inet", ("203.0.113.7", 51234), ("192.0.2.1", 443), len(line))
        assert hdr.meta() == {"version": 1, "family": "inet", "src": ["203.0.113.7", 51234],
                              "dst": ["192.0.2.1", 443]}
        assert_prefixes_need_data(parse_proxy_header, line)

    def test_v1_tcp6(self) -> None:
        line = b"PROXY TCP6 2001:DB8::7 2001:db8:0::1 65535 0\r\n"
        hdr = parse_proxy_header(line)
        assert hdr == ProxyHeader(1, "inet6", ("2001:db8::7", 65535), ("2001:db8::1", 0), len(line))

    def test_v1_longest(self) -> None:
        line = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
        assert len(line) == 104
        assert isinstance(parse_proxy_header(line), ProxyHeader)

    @pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                      b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
    def test_v1_unknown(self, line: bytes) -> None:
        assert parse_proxy_header(line) == ProxyHeader(1, "unspec", None, None, len(line))

    @pytest.mark.parametrize(("line", "words"), [
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed PROXY v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed PROXY v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "malformed PROXY v1"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "malformed PROXY v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "malformed PROXY v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "malformed PROXY v1"),
        (b"PROXY TCP4 1.2.3.4\x00", "malformed PROXY v1"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad IPv6"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "malformed"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "expected a PROXY"),
        (b"GET / HTTP/1.1\r\n", "expected a PROXY"),
    ])
    def test_v1_malformed(self, line: bytes, words: str) -> None:
        with pytest.raises(SniffError, match=words):
            parse_proxy_header(line)

    def test_v1_without_crlf(self) -> None:
        with pytest.raises(SniffError, match="without CRLF") as info:
            parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 100)
        assert info.value.reason == "oversize"

    def test_v2_inet_with_tlvs(self) -> None:
        tlvs = b"\x02\x00\x08a.test:1" + b"\x04\x00\x00"  # PP2_TYPE_AUTHORITY, PP2_TYPE_NOOP
        hdr_bytes = v2_header(1, 0x11, inet4("198.51.100.9", "192.0.2.1", 40000, 80), tlvs)
        hdr = parse_proxy_header(hdr_bytes + b"\x16\x03\x01")
        assert hdr == ProxyHeader(2, "inet", ("198.51.100.9", 40000), ("192.0.2.1", 80), len(hdr_bytes))
        assert_prefixes_need_data(parse_proxy_header, hdr_bytes)

    def test_v2_inet6(self) -> None:
        data = v2_header(1, 0x21, inet6("2001:db8::9", "::1", 1, 2))
        assert parse_proxy_header(data) == ProxyHeader(
            2, "inet6", ("2001:db8::9", 1), ("::1", 2), len(data))

    def test_v2_unix(self) -> None:
        addr = b"/run/a.sock".ljust(108, b"\x00") + b"\x00abstract".ljust(108, b"\x00")
        data = v2_header(1, 0x31, addr)
        assert parse_proxy_header(data) == ProxyHeader(2, "unix", "/run/a.sock", "@abstract", len(data))

    @pytest.mark.parametrize("data", [
        v2_header(0, 0x00),                                   # LOCAL, health check
        v2_header(0, 0x11, inet4("1.1.1.1", "2.2.2.2", 1, 2)),  # LOCAL ignores addresses
        v2_header(0, 0x11, b"short"),                          # ... whatever they are
        v2_header(1, 0x00, b"\x01\x02"),                       # PROXY + AF_UNSPEC
    ])
    def test_v2_no_address(self, data: bytes) -> None:
        assert parse_proxy_header(data) == ProxyHeader(2, "unspec", None, None, len(data))

    @pytest.mark.parametrize(("data", "words"), [
        (v2_header(1, 0x11, inet4("1.1.1.1", "2.2.2.2", 1, 2), version=1), "version 1"),
        (v2_header(2, 0x11, inet4("1.1.1.1", "2.2.2.2", 1, 2)), "command 2"),
        (v2_header(1, 0x41, b""), "family/protocol"),
        (v2_header(1, 0x13, b""), "family/protocol"),
        (v2_header(1, 0x11, b"\x00" * 11), "cannot hold a inet"),
        (v2_header(1, 0x21, b"\x00" * 12), "cannot hold a inet6"),
        (v2_header(1, 0x31, b"\x00" * 215), "cannot hold a unix"),
    ])
    def test_v2_malformed(self, data: bytes, words: str) -> None:
        with pytest.raises(SniffError, match=words):
            parse_proxy_header(data[:16])  # refused from the fixed part alone

    def test_v2_oversize_refused_from_the_length(self) -> None:
        with pytest.raises(SniffError, match="PROXY v2 header of 65551 bytes") as info:
            parse_proxy_header(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff")
        assert info.value.reason == "oversize"

    def test_signature(self) -> None:
        for sig in (b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n"):
            assert_prefixes_need_data(proxy_signature, sig)
            assert proxy_signature(sig) is True
            assert proxy_signature(sig + b"rest") is True
        for other in (b"G", b"PROPFIND / HTTP/1.1", b"\x16\x03", b"\r\n\r\n\x01", b"PROXY\t"):
            assert proxy_signature(other) is False

    @FUZZ
    @given(st.binary(max_size=300))
    def test_fuzz_arbitrary(self, data: bytes) -> None:
        outcome(parse_proxy_header, data)
        outcome(parse_proxy_header, b"PROXY " + data)
        outcome(parse_proxy_header, b"PROXY TCP4 " + data)
        outcome(parse_proxy_header, b"\r\n\r\n\x00\r\nQUIT\n" + data)
        proxy_signature(data)

    @FUZZ
    @given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=260))
    def test_fuzz_v2_fields(self, ver_cmd: int, fam: int, body: bytes) -> None:
        data = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([ver_cmd, fam]) + struct.pack(">H", len(body)) + body
        result = outcome(parse_proxy_header, data)
        assert result is not NEED_DATA
        if isinstance(result, ProxyHeader):
            assert result.length == len(data)
            json.dumps(result.meta())


# --- classification, routing, rules ---------------------------------------------------------


class TestClassify:
    def test_tls(self) -> None:
        assert classify(REAL_HELLO) == "tls"
        assert classify(b"\x16") is NEED_DATA
        assert classify(b"\x16\x02") == "unknown"
        assert classify(REAL_HELLO, tls=False) == "unknown"

    def test_http_needs_a_whole_request_line(self) -> None:
        line = b"OPTIONS * HTTP/1.1\r\n"
        assert_prefixes_need_data(classify, line)
        assert classify(line) == "http"
        assert classify(line, http=False) == "unknown"
        assert classify(b"GET / HTTP/1.1\n") == "http"

    @pytest.mark.parametrize("data", [
        b"SSH-2.0-OpenSSH_9.6\r\n", b"PING\r\n", b"SET key value\r\n", b"\x00\x00\x00\x08",
        b"\r\n", b"GET / HTTP/1.1\r\r", b"GET /a b", b"GET / HTTP/x", b" GET",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-compatible hello: not sniffed
    ])
    def test_unknown_as_soon_as_possible(self, data: bytes) -> None:
        assert classify(data) == "unknown"

    def test_nothing_enabled(self) -> None:
        assert classify(b"", http=False, tls=False) == "unknown"
        assert classify(b"") is NEED_DATA

    @FUZZ
    @given(st.binary(max_size=100))
    def test_fuzz(self, data: bytes) -> None:
        assert classify(data) in ("http", "tls", "unknown", NEED_DATA)


class TestRoutes:
    TABLE: ClassVar[dict[str, str]] = {
        "api.example.test": "api", "*.example.test": "web", "*.deep.example.test": "deep",
        "[::1]": "local"}

    @pytest.mark.parametrize(("name", "pool"), [
        ("api.example.test", "api"),
        ("www.example.test", "web"),
        ("a.b.example.test", "web"),
        ("x.deep.example.test", "deep"),
        ("deep.example.test", "web"),
        ("example.test", None),
        ("other.test", None),
        ("[::1]", "local"),
        (None, None),
    ])
    def test_route(self, name: str | None, pool: str | None) -> None:
        assert route(SniffRules(hosts=self.TABLE).hosts, name) == pool

    def test_rules_normalise_keys(self) -> None:
        rules = SniffRules(snis={"API.Example.TEST.": "api", "*.Example.Test": "web"})
        assert dict(rules.snis) == {"api.example.test": "api", "*.example.test": "web"}
        with pytest.raises(TypeError):
            rules.snis["x"] = "y"  # type: ignore[index]

    @pytest.mark.parametrize("kw", [
        {"proxy": "maybe"}, {"unknown": "drop"}, {"http_until": "body"},
        {"max_http_head": 10}, {"max_http_head": 1 << 20}, {"max_client_hello": 1},
        {"default": ""}, {"hosts": {"*": "any"}}, {"hosts": {"a.*.test": "x"}},
        {"hosts": {"a.test:80": "x"}}, {"hosts": {"a.test": ""}}, {"snis": {"*.": "x"}},
        {"snis": {"café.test": "x"}},
    ])
    def test_rules_refuse(self, kw: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            SniffRules(**kw)  # type: ignore[arg-type]

    def test_defaults(self) -> None:
        rules = SniffRules()
        assert (rules.proxy, rules.http, rules.tls, rules.default, rules.unknown) == (
            "off", True, True, None, "default")
        assert rules.max_client_hello == MAX_CLIENT_HELLO


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA"
