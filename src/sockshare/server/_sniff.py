"""Content sniffers: pick a worker pool for a connection from its first bytes, without a proxy hop.

The dispatcher accepts a connection and must decide which pool of workers gets it
*before* any worker has seen a byte, and then hand over the socket itself -- not a
copy of the stream. Two facts shape everything here (docs/protocol.md, "Pitfalls":
*Bytes already read travel with the socket*, *TLS is routed by peeking*):

* **Bytes already read travel with the socket.** Whatever the dispatcher consumes from
  the kernel is gone from the socket; it must reach the worker as *pre-read data* in the
  handoff message, and it must be exactly those bytes, in order.
* **TLS state cannot leave an OpenSSL session.** So TLS is never terminated here: the
  ClientHello is read with ``MSG_PEEK``, which leaves it in the kernel, and the worker
  does the whole handshake itself as if nobody had looked.

So the sniffers *peek* at the stream and consume only what must be consumed:

=========  ===============================  ==========================================
sniffer    what it looks at                 what it consumes (``SniffResult.data``)
=========  ===============================  ==========================================
PROXY      v1 text / v2 binary header       exactly the header, never put in ``data``:
                                            it is not part of the client's stream
TLS        record + ClientHello: SNI, ALPN  nothing (``data == b""``)
HTTP/1.x   request line + header block      exactly the head (or up to the ``Host``
                                            line), which becomes ``data``
other      --                               nothing (but a slow first line: what was
                                            read of it, in ``data``)
=========  ===============================  ==========================================

Layers
------
The parsers are **sans-I/O**, in the style of the frame codec: pure functions over the
bytes received so far, which return a result, return :data:`NEED_DATA` when the bytes so
far are a valid but incomplete beginning, or raise :class:`SniffError` as soon as the
bytes cannot be the beginning of a valid message. Every proper prefix of a valid message
gives :data:`NEED_DATA` (tested at every byte), and nothing but a result,
:data:`NEED_DATA` or :class:`SniffError` ever comes out (fuzzed). They are:
:func:`proxy_signature` and :func:`parse_proxy_header`, :func:`classify`,
:func:`parse_client_hello`, :func:`parse_http_head`; :func:`route` looks a name up in a
routing table.
The dispatcher's compiled accept burst has a C twin of the commonest case, a whole plain
HTTP/1.x head queued at accept (``sockshare._speedups.dispatch_sniffed``, docs/sniffing.md,
"In C, when the head is queued"); it takes a subset of what :func:`parse_http_head`
accepts, with the same result, and leaves everything else to this module.

The asyncio driver :func:`sniff` moves the bytes: it peeks at everything queued (up to a
bound), runs a parser, and when the parser needs more it waits for the socket to hold
*more* than it already holds. A slow client does not make it look at everything again
per byte (docs/sniffing.md, "Slow clients"): an incomplete HTTP head is consumed as it
comes (it is all head), parsers run only when the new bytes can complete something
(:class:`_HttpGate`, :class:`_TlsGate`), and a connection still incomplete after a few
looks is looked at again after a pause, not at every segment. It waits on Linux by
raising ``SO_RCVLOWAT`` to one byte over the queued count (a TLS record: to its end)
for the time of the wait (peeked bytes keep a socket readable, so plain
readiness would spin), elsewhere by polling with a short back-off. ``SO_RCVLOWAT`` is
put back before :func:`sniff` returns, on every path, because the option lives on the
socket the worker receives. A ClientHello split over several TCP segments, or across
several TLS records, is simply peeked again, larger, until it is complete, over the
bound, or out of time.

Order of the sniffers: PROXY (when enabled) is parsed from the peeked bytes and then
consumed with one exact ``recv(header length)`` -- never more, because the bytes behind
it (a ClientHello, a request) belong to the client's stream. Then :func:`classify`
decides from the first bytes after it: ``0x16 0x03`` is a TLS handshake record, a
complete, valid HTTP request line is HTTP, anything else is ``"unknown"``.

Silent clients
--------------
Server-speaks-first protocols (SMTP, FTP, POP3, MySQL, ...) send nothing until the
server greets them. If nothing of the client's stream arrives before the timeout,
:func:`sniff` returns ``rules.default`` with ``meta == {"protocol": "unknown", "silent":
True}`` (plus ``"proxy"`` if a header came) when ``rules.unknown == "default"``; it
raises ``SniffError(reason="silent")`` when ``rules.unknown == "reject"``, and when
``rules.proxy == "required"`` and not even the PROXY header came. A silent client
therefore costs the full timeout: on a listener that only serves a server-speaks-first
protocol, turn ``http`` and ``tls`` off (with no sniffer to run and ``proxy="off"``,
:func:`sniff` returns at once without touching the socket). A timeout after *some*
bytes of a message that is not complete is always an error (``"timeout"``).

Errors
------
:class:`SniffError` is the client's fault and concerns that one connection only: the
dispatcher logs its one-line message, closes the socket and carries on. ``reason`` is
one of ``"garbage"`` (malformed), ``"oversize"`` (over a bound), ``"timeout"``
(incomplete when time ran out), ``"silent"`` (nothing arrived), ``"closed"`` (the client
hung up or reset) and ``"unrecognised"`` (neither HTTP nor TLS while ``rules.unknown``
is ``"reject"``). :func:`sniff` never closes the socket: the caller owns it throughout.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import re
import select
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from sockshare._errors import LocalProtocolError, SockshareError
from sockshare.protocol import MAX_DATA, MAX_META

__all__ = [
    "MAX_CLIENT_HELLO",
    "MAX_HTTP_HEAD",
    "MAX_PROXY_HEADER",
    "MAX_SNIFF_META",
    "NEED_DATA",
    "ClientHello",
    "HttpHead",
    "NeedData",
    "ProxyHeader",
    "SniffError",
    "SniffResult",
    "SniffRules",
    "classify",
    "parse_client_hello",
    "parse_http_head",
    "parse_proxy_header",
    "proxy_signature",
    "route",
    "sniff",
]

#: Default bound of an HTTP head (request line + headers + blank line), in bytes.
MAX_HTTP_HEAD: Final = 8 * 1024
#: Default bound of a ClientHello on the wire (TLS record headers included). One full
#: TLS record is 5 + 16384 bytes; today's largest hellos (post-quantum key shares) are
#: about 2 KiB.
MAX_CLIENT_HELLO: Final = 16 * 1024 + 5
#: Bound of a PROXY v2 header (16 bytes + addresses + TLVs). v1 is at most 107 bytes.
MAX_PROXY_HEADER: Final = 4096
#: The JSON-encoded metadata :func:`sniff` returns stays under this size, so that the
#: dispatcher keeps 2 KiB of the handoff's ``MAX_META`` for its own keys.
MAX_SNIFF_META: Final = MAX_META - 2048


class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA` (one member, so ``x is NEED_DATA`` narrows the type)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__


#: Returned by a parser when the bytes so far are a valid but incomplete beginning.
NEED_DATA: Final = NeedData.NEED_DATA

Reason = Literal["garbage", "oversize", "timeout", "silent", "closed", "unrecognised"]


class SniffError(SockshareError):
    """The client sent something that cannot be routed, or not in time. Close that connection.

    ``reason``: ``"garbage"``, ``"oversize"``, ``"timeout"``, ``"silent"``, ``"closed"``
    or ``"unrecognised"`` (see the module documentation). The message is one line, fit
    for a log.
    """

    def __init__(self, message: str, reason: Reason = "garbage") -> None:
        super().__init__(message)
        self.reason: Reason = reason
        #: what an HTTP server answers this client before closing (400, 414, 431, 505),
        #: when it sent an HTTP request the sniffer cannot accept; None: not HTTP
        self.http_status: int | None = None


def _show(data: bytes, n: int = 24) -> str:
    """A short printable excerpt of client bytes for an error message."""
    text = repr(bytes(data[:n]))
    return text + ("..." if len(data) > n else "")


# --- names and routing -----------------------------------------------------------

# RFC 3986 reg-name characters (unreserved, pct-encoded, sub-delims). Both Host values
# and SNI names are held to it: anything else (space, CTL, '/', '@', non-ASCII) is
# garbage, never a routing key.
_NAME = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=]+")
_HOST = re.compile(
    rb"(?:(?P<lit>\[[0-9A-Fa-f:.]+\])|(?P<name>[A-Za-z0-9\-._~%!$&'()*+,;=]+))(?::(?P<port>[0-9]*))?"
)
_MAX_NAME = 255


def _norm_name(raw: bytes, what: str) -> str:
    """Validate and normalise a host name: lowercase, one trailing dot dropped."""
    if raw.endswith(b".") and len(raw) > 1:
        raw = raw[:-1]
    if not 0 < len(raw) <= _MAX_NAME:
        raise SniffError(f"{what} of {len(raw)} bytes (1..{_MAX_NAME} allowed)")
    if _NAME.fullmatch(raw) is None:
        raise SniffError(f"invalid {what} {_show(raw, 64)}")
    return raw.decode("ascii").lower()


def _host_from_authority(raw: bytes, what: str) -> str | None:
    """``host[:port]`` -> lowercased host without the port; ``None`` for an empty value."""
    if not raw:
        return None
    m = _HOST.fullmatch(raw)
    if m is None:
        raise SniffError(f"invalid {what} {_show(raw, 64)}")
    lit = m.group("lit")
    if lit is not None:
        if len(lit) > _MAX_NAME:
            raise SniffError(f"{what} of {len(lit)} bytes (1..{_MAX_NAME} allowed)")
        return str(lit.decode("ascii").lower())
    return _norm_name(m.group("name"), what)


def route(table: Mapping[str, str], name: str | None) -> str | None:
    """The pool for ``name`` in ``table``, or ``None``.

    An exact key wins; then ``*.suffix`` keys, the longest suffix first.
    ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not
    ``example.com`` itself. ``name`` must already be normalised (lowercase, no port, no
    trailing dot), as the parsers return it; keys are normalised by :class:`SniffRules`.
    """
    if name is None:
        return None
    hit = table.get(name)
    if hit is not None:
        return hit
    i = name.find(".")
    while i >= 0:
        hit = table.get("*" + name[i:])
        if hit is not None:
            return hit
        i = name.find(".", i + 1)
    return None


# --- PROXY protocol ----------------------------------------------------------------

_V1_PREFIX: Final = b"PROXY "
_V1_MAX: Final = 107  # the longest v1 line, CRLF included (haproxy proxy-protocol.txt 2.1)
_V2_SIG: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_ADDR_LEN: Final = {1: 12, 2: 36, 3: 216}
_V2_FAMILIES: Final = {0: "unspec", 1: "inet", 2: "inet6", 3: "unix"}
_V1_PRINTABLE = re.compile(rb"[\x20-\x7e]*\r?")

Address = tuple[str, int] | str | None


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    ``src``/``dst`` are ``(ip, port)`` for ``family`` ``"inet"``/``"inet6"``, a path for
    ``"unix"`` (an abstract name starts with ``@``), and ``None`` for ``"unspec"``: v1
    ``UNKNOWN``, v2 ``LOCAL`` (a health check from the proxy itself) or v2 ``AF_UNSPEC``
    -- then the connection's own addresses are the real ones. ``length`` is the size of
    the header on the wire: exactly what must be consumed.
    """

    version: int
    family: str
    src: Address
    dst: Address
    length: int

    def meta(self) -> dict[str, Any]:
        """The JSON-compatible form for :attr:`SniffResult.meta` ``["proxy"]``."""
        def conv(a: Address) -> Any:
            return list(a) if isinstance(a, tuple) else a
        return {"version": self.version, "family": self.family,
                "src": conv(self.src), "dst": conv(self.dst)}


def proxy_signature(buf: bytes) -> bool | NeedData:
    """Does ``buf`` begin with a PROXY v1 or v2 signature?

    :data:`NEED_DATA` while ``buf`` is a proper prefix of one of them (an empty buffer
    included). Used for ``proxy="optional"``.
    """
    partial = False
    for sig in (_V1_PREFIX, _V2_SIG):
        n = min(len(buf), len(sig))
        if buf[:n] == sig[:n]:
            if n == len(sig):
                return True
            partial = True
    return NEED_DATA if partial else False


def parse_proxy_header(buf: bytes, *, max_size: int = MAX_PROXY_HEADER) -> ProxyHeader | NeedData:
    """Parse a PROXY protocol v1 or v2 header at the start of ``buf``.

    Raises :class:`SniffError` if ``buf`` does not start with one, or with a malformed
    one. v2 TLVs are skipped (they are counted in ``length``); v2 headers longer than
    ``max_size`` are refused.
    """
    n = min(len(buf), len(_V1_PREFIX))
    if buf[:n] == _V1_PREFIX[:n]:
        return NEED_DATA if n < len(_V1_PREFIX) else _parse_v1(buf)
    n = min(len(buf), len(_V2_SIG))
    if buf[:n] == _V2_SIG[:n]:
        return _parse_v2(buf, max_size)
    raise SniffError(f"expected a PROXY protocol header, got {_show(buf)}")


def _parse_v1(buf: bytes) -> ProxyHeader | NeedData:
    eol = buf.find(b"\r\n", 0, _V1_MAX)
    if eol < 0:
        head = buf[:_V1_MAX]
        if _V1_PRINTABLE.fullmatch(head) is None:
            raise SniffError(f"malformed PROXY v1 header {_show(head, 60)}")
        if len(buf) >= _V1_MAX:
            raise SniffError(f"PROXY v1 header without CRLF in its first {_V1_MAX} bytes",
                             "oversize")
        return NEED_DATA
    line = buf[len(_V1_PREFIX):eol]
    if _V1_PRINTABLE.fullmatch(line) is None or line.endswith(b"\r"):
        raise SniffError(f"malformed PROXY v1 header {_show(buf[:eol], 60)}")
    parts = line.decode("ascii").split(" ")
    if parts[0] == "UNKNOWN":  # anything may follow; the receiver ignores it
        return ProxyHeader(1, "unspec", None, None, eol + 2)
    if parts[0] not in ("TCP4", "TCP6") or len(parts) != 5:
        raise SniffError(f"malformed PROXY v1 header {_show(buf[:eol], 60)}")
    six = parts[0] == "TCP6"
    src = _v1_addr(parts[1], parts[3], six)
    dst = _v1_addr(parts[2], parts[4], six)
    return ProxyHeader(1, "inet6" if six else "inet", src, dst, eol + 2)


def _v1_addr(ip: str, port: str, six: bool) -> tuple[str, int]:
    try:
        if "%" in ip:  # no scope ids on the wire
            raise ValueError(ip)
        addr = ipaddress.IPv6Address(ip) if six else ipaddress.IPv4Address(ip)
    except ValueError:
        raise SniffError(f"PROXY v1 header: bad {'IPv6' if six else 'IPv4'} address {ip!r}") from None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise SniffError(f"PROXY v1 header: bad port {port!r}")
    return (str(addr), int(port))


def _parse_v2(buf: bytes, max_size: int) -> ProxyHeader | NeedData:
    if len(buf) > 12 and buf[12] >> 4 != 2:
        raise SniffError(f"PROXY v2 header with version {buf[12] >> 4}")
    if len(buf) > 12 and buf[12] & 0x0F not in (0, 1):
        raise SniffError(f"PROXY v2 header with command {buf[12] & 0x0F}")
    if len(buf) > 13 and (buf[13] >> 4 not in _V2_FAMILIES or buf[13] & 0x0F > 2):
        raise SniffError(f"PROXY v2 header with address family/protocol byte {buf[13]:#04x}")
    if len(buf) < 16:
        return NEED_DATA
    total = 16 + int.from_bytes(buf[14:16], "big")
    if total > max_size:
        raise SniffError(f"PROXY v2 header of {total} bytes; the limit is {max_size}", "oversize")
    af = buf[13] >> 4
    local = buf[12] & 0x0F == 0
    need = _V2_ADDR_LEN.get(af, 0)
    if not local and total - 16 < need:
        raise SniffError(f"PROXY v2 header: {total - 16} bytes cannot hold a "
                         f"{_V2_FAMILIES[af]} address block ({need} bytes)")
    if len(buf) < total:
        return NEED_DATA
    if local or af == 0:
        return ProxyHeader(2, "unspec", None, None, total)
    body = buf[16:16 + need]
    if af == 3:
        return ProxyHeader(2, "unix", _unix_path(body[:108]), _unix_path(body[108:]), total)
    size = 4 if af == 1 else 16
    mk = ipaddress.IPv4Address if af == 1 else ipaddress.IPv6Address
    ports = body[2 * size:]
    src = (str(mk(body[:size])), int.from_bytes(ports[0:2], "big"))
    dst = (str(mk(body[size:2 * size])), int.from_bytes(ports[2:4], "big"))
    return ProxyHeader(2, _V2_FAMILIES[af], src, dst, total)


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\x00":  # abstract namespace: shown with a leading '@'
        return "@" + raw[1:].rstrip(b"\x00").decode("utf-8", "backslashreplace")
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


# --- classification --------------------------------------------------------------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_VCHAR = rb"[\x21-\x7e]"
_TOKEN = re.compile(_TCHAR + rb"+")
_REQUEST_LINE = re.compile(
    rb"(?P<method>" + _TCHAR + rb"+) (?P<target>" + _VCHAR + rb"+) HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])"
)
# Every proper prefix of a request line (CR included, LF excluded).
_REQUEST_LINE_PREFIX = re.compile(
    _TCHAR + rb"*|" + _TCHAR + rb"+ " + _VCHAR + rb"*|" + _TCHAR + rb"+ " + _VCHAR
    + rb"+ (?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?"
)

Protocol = Literal["http", "tls", "unknown"]


def classify(buf: bytes, *, http: bool = True, tls: bool = True) -> Protocol | NeedData:
    """Which sniffer the first bytes of a client's stream call for.

    ``"tls"``: a handshake record (``0x16 0x03``). ``"http"``: a complete, valid HTTP
    request line (``METHOD SP target SP HTTP/d.d``). ``"unknown"``: as soon as the bytes
    can be neither (of the enabled ones). :data:`NEED_DATA` while they still could.
    """
    if not buf:
        return NEED_DATA if http or tls else "unknown"
    if tls and buf[0] == 0x16:
        if len(buf) < 2:
            return NEED_DATA
        return "tls" if buf[1] == 0x03 else "unknown"
    if http:
        eol = buf.find(b"\n")
        if eol < 0:
            return NEED_DATA if _REQUEST_LINE_PREFIX.fullmatch(buf) else "unknown"
        line = buf[:eol - 1] if buf[eol - 1:eol] == b"\r" else buf[:eol]
        return "http" if _REQUEST_LINE.fullmatch(line) else "unknown"
    return "unknown"


# --- HTTP/1.x ------------------------------------------------------------------------

_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB; obs-text is allowed
_BAD_PARTIAL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A header line as _check_lines accepts it: field-name ":" value (HTAB, SP, VCHAR,
# obs-text), then CR LF or LF. A line that starts with SP/HTAB (folding) fails the token.
_HEADER_LINES = re.compile(rb"(?:" + _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*\r?\n)*")
_HOST_LINE = re.compile(rb"^[Hh][Oo][Ss][Tt]:([^\r\n]*)", re.MULTILINE)
_BLANK_LINE = re.compile(rb"\n\r?\n")
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://(?P<authority>[^/?#]*)")


@dataclass(frozen=True, slots=True)
class HttpHead:
    """The start of an HTTP/1.x request.

    ``host`` comes from an absolute-form target if there is one, else from the ``Host``
    header; lowercased, port and one trailing dot removed, IPv6 literals kept in
    brackets; ``None`` when absent or empty. ``length`` is how many bytes of the stream
    this covers: the whole head (``complete``), or, in ``until="host"`` mode, up to the
    end of the line that gave the host.
    """

    method: str
    target: str
    version: str
    host: str | None
    length: int
    complete: bool


def _lines(buf: bytes, start: int, stop: int) -> tuple[bytes, int] | None:
    """The line at ``start`` (CR LF or LF ending, ending stripped) and the next start."""
    eol = buf.find(b"\n", start, stop)
    if eol < 0:
        return None
    end = eol - 1 if eol > start and buf[eol - 1] == 0x0D else eol
    return buf[start:end], eol + 1


def parse_http_head(
    buf: bytes, *, max_size: int = MAX_HTTP_HEAD, until: Literal["headers", "host"] = "headers",
) -> HttpHead | NeedData:
    """Parse an HTTP/1.x request line and headers at the start of ``buf``.

    ``until="headers"`` waits for the blank line that ends the head, which must end
    within ``max_size`` bytes. ``until="host"`` returns as soon as the host is known:
    after an absolute-form request line, or after the ``Host`` line once the first byte
    of the next line shows it is not folded onto it. Refused (:class:`SniffError`): a
    malformed request line or header line, a version other than HTTP/1.x (``PRI *
    HTTP/2.0``, the h2c preface, is passed through with no host), obsolete line
    folding, whitespace before a colon, several ``Host`` headers (``"headers"`` mode), an
    invalid host.
    """
    first = _lines(buf, 0, max_size)
    if first is None:
        head = buf[:max_size]
        if _REQUEST_LINE_PREFIX.fullmatch(head) is None:
            raise SniffError(f"not an HTTP request line: {_show(head)}")
        if len(buf) >= max_size:
            raise SniffError(f"HTTP request line longer than {max_size} bytes", "oversize")
        return NEED_DATA
    line, pos = first
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise SniffError(f"not an HTTP request line: {_show(line)}")
    method = m.group("method").decode("ascii")
    target = m.group("target").decode("ascii")
    major, minor = int(m.group("major")), int(m.group("minor"))
    if major != 1 and not (major, minor, method, target) == (2, 0, "PRI", "*"):
        raise SniffError(f"HTTP/{major}.{minor} request line; only HTTP/1.x is sniffed")
    version = f"HTTP/{major}.{minor}"

    host: str | None = None
    absolute = _ABSOLUTE.match(m.group("target"))
    if absolute is not None:  # RFC 9112 3.2.2: the target's authority wins over Host
        authority = absolute.group("authority").rpartition(b"@")[2]
        host = _host_from_authority(authority, "host in the request target")
        if until == "host":
            return HttpHead(method, target, version, host, pos, False)

    # The complete header lines are checked by one regex pass, not a Python loop: a slow
    # client makes the driver parse again for every segment. Only a failure walks the
    # lines, to say what is wrong.
    blank = _BLANK_LINE.search(buf, pos - 1, max_size)
    lines_end = blank.start() + 1 if blank else buf.rfind(b"\n", pos - 1, max_size) + 1
    if until == "host":
        hline = _HOST_LINE.search(buf, pos, lines_end)
        if hline is not None:
            line_end = buf.index(b"\n", hline.end()) + 1
            _check_lines(buf, pos, line_end)
            host = _host_from_authority(hline.group(1).strip(b" \t"), "Host header")
            # The Host line counts once the next byte shows that it is not folded.
            if line_end >= len(buf):
                if line_end >= max_size:
                    raise SniffError(f"HTTP head longer than {max_size} bytes", "oversize")
                return NEED_DATA
            if buf[line_end] in b" \t":
                raise SniffError("obsolete line folding in the HTTP head is not accepted")
            if blank is not None and blank.start() + 1 == line_end:
                return HttpHead(method, target, version, host, blank.end(), True)
            return HttpHead(method, target, version, host, line_end, False)
    _check_lines(buf, pos, lines_end)
    if blank is None:
        if _BAD_PARTIAL.search(buf, lines_end, max_size):
            raise SniffError(f"control character in an HTTP header line: "
                             f"{_show(buf[lines_end:max_size])}")
        if len(buf) >= max_size:
            raise SniffError(f"HTTP head longer than {max_size} bytes", "oversize")
        return NEED_DATA
    values = [h.group(1).strip(b" \t") for h in _HOST_LINE.finditer(buf, pos, lines_end)]
    if len(values) > 1:
        raise SniffError("several Host headers in one HTTP request")
    if values:
        from_header = _host_from_authority(values[0], "Host header")
        if absolute is None:
            host = from_header
    return HttpHead(method, target, version, host, blank.end(), True)


def _check_lines(buf: bytes, start: int, stop: int) -> None:
    """Raise :class:`SniffError` unless ``buf[start:stop]`` is complete header lines."""
    if _HEADER_LINES.fullmatch(buf, start, stop) is not None:
        return
    while (got := _lines(buf, start, stop)) is not None:
        line, start = got
        if line[:1] in (b" ", b"\t"):
            raise SniffError("obsolete line folding in the HTTP head is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise SniffError(f"malformed HTTP header line: {_show(line)}")
        if _BAD_VALUE.search(value):
            raise SniffError(f"control character in HTTP header {name.decode('ascii')!r}")
    raise SniffError("malformed HTTP header block")  # pragma: no cover - the walk finds it


# --- TLS ClientHello -------------------------------------------------------------------

_MAX_RECORD: Final = 1 << 14


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs from a TLS ClientHello.

    ``sni``: the ``host_name`` of the server_name extension, lowercased, one trailing dot
    removed (with Encrypted Client Hello this is the *outer*, public name). ``alpn``: the
    offered protocols in the client's order (bytes outside printable ASCII, and ``\\``,
    shown as ``\\xNN``).
    ``length``: the bytes of the records that carried the hello (peeked, not consumed).
    """

    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    length: int


class _Short(Exception):
    """A length field points past the end of its enclosing structure."""


class _Reader:
    """Bounds-checked reads over one complete, length-delimited structure."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise _Short
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vec(self, n: int) -> bytes:
        return self.take(self.uint(n))


def parse_client_hello(buf: bytes, *, max_size: int = MAX_CLIENT_HELLO) -> ClientHello | NeedData:
    """Parse the TLS ClientHello at the start of ``buf``: SNI and ALPN.

    The handshake message may be fragmented across several handshake records; it is
    reassembled. Refused (:class:`SniffError`): a first record that is not a TLS
    handshake, any other record type before the hello is complete, a record over 2^14
    bytes or of zero length, a handshake message that is not a ClientHello, a hello
    longer than ``max_size`` bytes on the wire, and any inconsistent length or malformed
    vector inside it (duplicate extensions, an empty or repeated host_name, ...).
    """
    hs = b""
    pos = 0
    version = 0
    while True:
        header = buf[pos:pos + 5]
        if header[:1] and header[0] != 0x16:
            if pos == 0:
                raise SniffError(f"not a TLS handshake record: {_show(buf)}")
            raise SniffError(f"TLS record of type {header[0]} inside a ClientHello")
        if header[1:2] and header[1] != 0x03:
            raise SniffError(f"TLS record with version {header[1:3].hex()}")
        if len(header) < 5:
            return NEED_DATA
        rlen = int.from_bytes(header[3:5], "big")
        if rlen == 0:
            raise SniffError("empty TLS handshake record")
        if rlen > _MAX_RECORD:
            raise SniffError(f"TLS record of {rlen} bytes; the limit is {_MAX_RECORD}", "oversize")
        if pos + 5 + rlen > max_size:
            raise SniffError(f"TLS ClientHello over {max_size} bytes", "oversize")
        if pos == 0:
            version = int.from_bytes(header[1:3], "big")
        fragment = buf[pos + 5:pos + 5 + rlen]
        have = hs + fragment
        if have[:1] and have[0] != 1:
            raise SniffError(f"TLS handshake message of type {have[0]}, not a ClientHello")
        hlen = int.from_bytes(have[1:4], "big") if len(have) >= 4 else 0
        if len(have) >= 4:
            # the fewest wire bytes that can carry it: a record header per 2^14 bytes
            wire = 4 + hlen + 5 * (1 + (4 + hlen - 1) // _MAX_RECORD)
            if wire > max_size:
                raise SniffError(f"TLS ClientHello of {hlen} bytes; the limit is {max_size}",
                                 "oversize")
        if len(fragment) < rlen:
            return NEED_DATA
        hs = have
        pos += 5 + rlen
        if len(hs) >= 4 and len(hs) >= 4 + hlen:
            # Bytes after the hello in its last record (none in practice) are ignored.
            return _client_hello_body(hs[4:4 + hlen], version, pos)


def _client_hello_body(body: bytes, version: int, length: int) -> ClientHello:
    r = _Reader(body)
    try:
        legacy = r.uint(2)
        if legacy >> 8 != 3:
            raise SniffError(f"ClientHello with version {legacy:#06x}")
        r.take(32)  # random
        if len(r.vec(1)) > 32:
            raise SniffError("ClientHello with a session id over 32 bytes")
        suites = r.vec(2)
        if not suites or len(suites) % 2:
            raise SniffError(f"ClientHello with a cipher suite list of {len(suites)} bytes")
        if not r.vec(1):
            raise SniffError("ClientHello without compression methods")
        sni: str | None = None
        alpn: tuple[str, ...] = ()
        if r.left():
            exts = _Reader(r.vec(2))
            if r.left():
                raise SniffError(f"{r.left()} stray bytes after the ClientHello extensions")
            seen: set[int] = set()
            while exts.left():
                etype = exts.uint(2)
                edata = exts.vec(2)
                if etype in seen:
                    raise SniffError(f"ClientHello repeats extension {etype}")
                seen.add(etype)
                if etype == 0:
                    sni = _server_name(edata)
                elif etype == 16:
                    alpn = _alpn(edata)
    except _Short:
        raise SniffError("malformed ClientHello: a length points past its end") from None
    return ClientHello(sni, alpn, legacy, length)


def _server_name(data: bytes) -> str | None:
    r = _Reader(data)
    names = _Reader(r.vec(2))
    if r.left() or not names.left():
        raise SniffError("malformed server_name extension")
    host: str | None = None
    while names.left():
        kind = names.uint(1)
        name = names.vec(2)
        if kind == 0:
            if host is not None:
                raise SniffError("server_name extension with two host names")
            host = _norm_name(name, "TLS server_name")
    return host


def _alpn(data: bytes) -> tuple[str, ...]:
    r = _Reader(data)
    protos = _Reader(r.vec(2))
    if r.left() or not protos.left():
        raise SniffError("malformed ALPN extension")
    out: list[str] = []
    while protos.left():
        p = protos.vec(1)
        if not p:
            raise SniffError("empty protocol name in the ALPN extension")
        out.append("".join(chr(c) if 0x20 < c < 0x7F and c != 0x5C else f"\\x{c:02x}" for c in p))
    return tuple(out)


# --- rules and results ------------------------------------------------------------------


def _routes(table: Mapping[str, str], what: str) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for key, pool in table.items():
        if not isinstance(pool, str) or not pool:
            raise ValueError(f"{what}[{key!r}]: a pool name must be a non-empty string")
        name = key.lower()
        if name.endswith(".") and len(name) > 1:
            name = name[:-1]
        bare = name[2:] if name.startswith("*.") else name
        raw = bare.encode("ascii", "replace")
        literal = bare is name and re.fullmatch(rb"\[[0-9a-f:.]+\]", raw) is not None
        if not literal and ("*" in bare or _NAME.fullmatch(raw) is None):
            raise ValueError(f"{what}: {key!r} is neither a host name nor '*.suffix' "
                             "(use SniffRules.default for 'anything')")
        out[name] = pool
    return MappingProxyType(out)


@dataclass(frozen=True)
class SniffRules:
    """Which sniffers run and where their results lead. One per listener, immutable.

    ``proxy``: ``"off"``; ``"optional"`` (parsed when the stream starts with a PROXY
    signature -- any client can then claim any address, so only where untrusted clients
    cannot connect); ``"required"`` (a connection without one is refused).
    ``http``/``tls``: run those sniffers. ``hosts``/``snis``: routing tables, name ->
    pool, exact names and ``*.suffix`` wildcards (see :func:`route`); keys are
    lowercased. ``default``: the pool when nothing matched (``None`` lets the dispatcher
    choose). ``unknown``: ``"default"`` sends unrecognised and silent clients to
    ``default``; ``"reject"`` makes them a :class:`SniffError`. ``http_until``: wait for
    the whole HTTP head (``"headers"``) or only until the host is known (``"host"``).
    """

    proxy: Literal["off", "optional", "required"] = "off"
    http: bool = True
    tls: bool = True
    hosts: Mapping[str, str] = field(default_factory=dict)
    snis: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None
    unknown: Literal["default", "reject"] = "default"
    http_until: Literal["headers", "host"] = "headers"
    max_http_head: int = MAX_HTTP_HEAD
    max_client_hello: int = MAX_CLIENT_HELLO

    def __post_init__(self) -> None:
        if self.proxy not in ("off", "optional", "required"):
            raise ValueError(f"proxy={self.proxy!r}: use 'off', 'optional' or 'required'")
        if self.unknown not in ("default", "reject"):
            raise ValueError(f"unknown={self.unknown!r}: use 'default' or 'reject'")
        if self.http_until not in ("headers", "host"):
            raise ValueError(f"http_until={self.http_until!r}: use 'headers' or 'host'")
        if not 16 <= self.max_http_head <= MAX_DATA:
            raise ValueError(f"max_http_head={self.max_http_head}: must be 16..{MAX_DATA} "
                             "(the head travels as pre-read data)")
        if not 64 <= self.max_client_hello <= 1 << 20:
            raise ValueError(f"max_client_hello={self.max_client_hello}: must be 64..{1 << 20}")
        if self.default is not None and not (isinstance(self.default, str) and self.default):
            raise ValueError("default must be a non-empty pool name or None")
        object.__setattr__(self, "hosts", _routes(self.hosts, "hosts"))
        object.__setattr__(self, "snis", _routes(self.snis, "snis"))


@dataclass(frozen=True, slots=True)
class SniffResult:
    """Where a connection goes and what goes with it.

    ``pool``: the chosen pool, or ``None`` when no rule matched and ``rules.default`` is
    ``None``. ``meta``: JSON-compatible, at most :data:`MAX_SNIFF_META` bytes encoded;
    always ``"protocol"`` (``"http"``, ``"tls"`` or ``"unknown"``); for HTTP
    ``"method"``, ``"path"``, ``"version"``, ``"host"``; for TLS ``"sni"``, ``"alpn"``;
    ``"proxy"`` when a PROXY header was received; ``"silent": True`` when the client sent
    nothing. ``data``: exactly the bytes consumed from the socket that the worker must
    see first (the HTTP head; ``b""`` for TLS; for unknown, ``b""`` unless a first line
    trickled in slowly and was read while waiting for its end; never the PROXY header).
    """

    pool: str | None
    meta: dict[str, Any]
    data: bytes = b""


# --- the asyncio driver ------------------------------------------------------------------

T = TypeVar("T")

_LINUX: Final = sys.platform.startswith("linux")
_RCVLOWAT: Final[int | None] = getattr(socket, "SO_RCVLOWAT", None)
_POLLRDHUP: Final = getattr(select, "POLLRDHUP", 0)


#: A connection whose message is still incomplete after this many looks is *trickling*:
#: from then on it is looked at again after a pause (PACE_MIN doubling up to PACE_MAX)
#: rather than at every byte that arrives -- a slow client costs a few looks a second.
PACE_AFTER: Final = 3
PACE_MIN: Final = 0.005
PACE_MAX: Final = 0.05


class _HttpGate:
    """When parsing an HTTP head again can give something new, judged from the new bytes
    only: the whole head is parsed once, when its blank line has arrived (``until="host"``:
    at each new line). The header lines completed in between are checked as they arrive
    (one regex over the new lines), so garbage still fails at once."""

    __slots__ = ("checked", "until")

    def __init__(self, until: str) -> None:
        self.until = until
        self.checked = -1   # end of the lines checked so far (-1: the request line not seen)

    def __call__(self, buf: bytes, prev: int) -> bool:
        if self.checked < 0:
            eol = buf.find(b"\n")
            if eol < 0:
                return True   # (the request line is incomplete: the parser says why)
            self.checked = eol + 1
            if self.until == "host":
                return True   # an absolute-form target gives the host
        start = max(self.checked - 1, prev - 3, 0)
        if _BLANK_LINE.search(buf, start) is not None:
            return True
        last = buf.rfind(b"\n", self.checked)
        if last < 0:
            # the byte after a complete Host line tells whether it is folded
            return self.until == "host" and prev > 0 and buf[prev - 1:prev] == b"\n"
        ok = _HEADER_LINES.fullmatch(buf, self.checked, last + 1) is not None
        self.checked = last + 1
        return not ok or self.until == "host"


class _TlsGate:
    """A ClientHello is parsed when a TLS record of it is complete (or a record header is
    wrong: the parser says why); :meth:`want` is how many bytes the records announce, so
    that the driver sleeps until they are all there (``SO_RCVLOWAT``)."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = 0

    @staticmethod
    def _walk(buf: bytes) -> tuple[int, int, bool]:
        """(end of the complete records, bytes wanted next, a header is malformed)."""
        pos = 0
        while True:
            if len(buf) < pos + 5:
                head = buf[pos:pos + 2]
                bad = bool(head) and (head[0] != 0x16 or head[1:2] not in (b"", b"\x03"))
                return pos, pos + 5, bad
            rlen = int.from_bytes(buf[pos + 3:pos + 5], "big")
            if buf[pos] != 0x16 or buf[pos + 1] != 0x03 or not 0 < rlen <= _MAX_RECORD:
                return pos, pos + 5, True
            end = pos + 5 + rlen
            if len(buf) < end:
                return pos, end, False
            pos = end

    def __call__(self, buf: bytes, prev: int) -> bool:
        complete, _want, bad = self._walk(buf)
        if bad or complete > self.complete or prev <= 0:   # (the first look checks what it can)
            self.complete = complete
            return True
        return False

    def want(self, buf: bytes) -> int:
        return self._walk(buf)[1]


class _Peeker:
    """Peek, wait for more, consume exactly: all the I/O :func:`sniff` does."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.sock = sock
        self.loop = loop
        self.timeout = timeout
        self.deadline = loop.time() + timeout
        self.seen = 0  # bytes of the stream seen since the last consume
        #: bytes of an incomplete message consumed while waiting for the rest (see until)
        self.taken = bytearray()
        self.select_ok = True  # False once add_reader is not implemented (Proactor)

    def _peek(self, n: int) -> bytes | None:
        try:
            return self.sock.recv(n, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise SniffError(f"connection failed while sniffing: {exc}", "closed") from exc

    def _peer_closed(self) -> bool:
        """Has the peer sent FIN (or failed)? Only answerable where POLLRDHUP exists."""
        if not _POLLRDHUP:
            return False
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN | _POLLRDHUP)
        return any(ev & (_POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    def _closed(self, what: str) -> SniffError:
        if self.seen == 0:
            return SniffError("the client closed the connection without sending anything", "closed")
        return SniffError(f"the client closed the connection after {self.seen} bytes of an "
                          f"incomplete {what}", "closed")

    def _out_of_time(self, what: str) -> SniffError:
        if self.seen == 0:
            return SniffError(f"the client sent nothing in {self.timeout:g} s", "silent")
        return SniffError(f"timed out after {self.timeout:g} s waiting for the rest of the "
                          f"{what} ({self.seen} bytes so far)", "timeout")

    async def until(self, parse: Callable[[bytes], T | NeedData], limit: int, what: str, *,
                    gate: Callable[[bytes, int], bool] | None = None,
                    want: Callable[[bytes], int] | None = None,
                    take: Callable[[bytes], bool] | None = None) -> T:
        """Look at up to ``limit`` bytes until ``parse`` gives a result; raise SniffError.

        ``gate(buf, bytes seen at the previous look)``: whether ``parse`` can say something
        new (it is skipped otherwise); ``want(buf)``: how many bytes to wait for before
        looking again (else one more than now); ``take(buf)``: whether the bytes of an
        incomplete message may be consumed while waiting for the rest (:attr:`taken`), so
        that the next look peeks only at the new ones -- peeking is a walk over every
        segment queued, and a slow client's are one byte each."""
        prev = -1
        stalls = 0
        looks = 0
        while True:
            new = self._peek(limit - len(self.taken))
            have = len(self.taken)
            queued = 0
            need = 0
            if new is not None:
                if not new:
                    raise self._closed(what)
                queued = len(new)
                buf = bytes(self.taken) + new if self.taken else new
                have = len(buf)
                self.seen = max(self.seen, have)
                if have >= limit or gate is None or gate(buf, max(prev, 0)):
                    result = parse(buf)
                    if result is not NEED_DATA:
                        return result
                    if have >= limit:
                        raise SniffError(f"{what} over {limit} bytes", "oversize")
                if have == prev:  # woken up, nothing new: FIN behind the data, or spurious
                    if self._peer_closed():
                        raise self._closed(what)
                    stalls += 1
                else:
                    stalls = 0
                    looks += 1
                prev = have
                if take is not None and take(buf):
                    self.taken += self._recv_exactly(queued)
                    queued = 0
                elif want is not None:
                    need = min(want(buf), limit) - len(self.taken)
            await self._wait(queued, stalls, what, need, looks)

    async def _wait(self, have: int, stalls: int, what: str, need: int = 0, looks: int = 0) -> None:
        """Wait until the socket holds more than ``have`` bytes (at least ``need``, where
        SO_RCVLOWAT can say so), or EOF; or raise. A trickling client (``looks`` past
        PACE_AFTER) waits for a pause instead: it is looked at a few times a second, not
        at every byte."""
        left = self.deadline - self.loop.time()
        if left <= 0:
            raise self._out_of_time(what)
        lowat = _LINUX and _RCVLOWAT is not None
        if looks > PACE_AFTER and not stalls and (need <= have or not lowat):
            await asyncio.sleep(min(left, PACE_MIN * 2 ** min(looks - PACE_AFTER - 1, 4), PACE_MAX))
            return
        if stalls or not self.select_ok or (have and not lowat):
            # Peeked bytes keep the socket readable: without SO_RCVLOWAT, poll.
            await asyncio.sleep(min(left, 0.001 * (2 ** min(stalls, 6))))
            return
        fd = self.sock.fileno()
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        try:
            self.loop.add_reader(fd, ready)
        except NotImplementedError:
            self.select_ok = False
            return
        opt = _RCVLOWAT if have else None
        restore = None
        try:
            if opt is not None:
                restore = self.sock.getsockopt(socket.SOL_SOCKET, opt)
                self.sock.setsockopt(socket.SOL_SOCKET, opt, max(have + 1, need))
            async with asyncio.timeout(left):
                await fut
        except TimeoutError:
            raise self._out_of_time(what) from None
        except OSError as exc:
            raise SniffError(f"connection failed while sniffing: {exc}", "closed") from exc
        finally:
            self.loop.remove_reader(fd)
            if opt is not None and restore is not None:
                # The option lives on the socket the worker receives: always put it back.
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, restore)
                except OSError:
                    pass

    def consume(self, n: int) -> bytes:
        """The first ``n`` bytes of the stream (those :attr:`taken` already, then exactly
        the rest, which a peek has already seen queued)."""
        out, self.taken = self.taken[:n], self.taken[n:]
        out += self._recv_exactly(n - len(out))
        self.seen = len(self.taken)
        return bytes(out)

    def _recv_exactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes that a peek has already seen queued."""
        out = bytearray()
        try:
            while len(out) < n:
                chunk = self.sock.recv(n - len(out))
                if not chunk:
                    break
                out += chunk
        except OSError as exc:  # BlockingIOError included: the peeked bytes must be there
            raise SniffError(f"connection failed while consuming {n} sniffed bytes: {exc}",
                             "closed") from exc
        if len(out) != n:
            raise SniffError(f"the client closed the connection before {n} sniffed bytes "
                             "could be consumed", "closed")
        return bytes(out)


def _proxy_step(required: bool, buf: bytes) -> ProxyHeader | NeedData | None:
    """PROXY header, or ``None`` when optional and absent."""
    if not required:
        sig = proxy_signature(buf)
        if sig is NEED_DATA:
            return NEED_DATA
        if not sig:
            return None
    return parse_proxy_header(buf)


def sniff_now(sock: socket.socket, rules: SniffRules) -> SniffResult | None:
    """:func:`sniff` without waiting, for the common case: no PROXY header expected, and
    the whole HTTP head (or TLS ClientHello) already queued when the connection is
    accepted -- a client sends it right after connecting. One peek, the same parsers and
    the same result as :func:`sniff` (the HTTP head consumed, nothing else).

    ``None`` when anything is missing or unusual (an incomplete or bad message, not HTTP
    or TLS, metadata near its limit): nothing was consumed, and :func:`sniff` does the
    whole job as before (and says what is wrong). Raises :class:`SniffError` only if the
    connection fails between the peek and the read of the head it peeked."""
    if rules.proxy != "off" or not (rules.http or rules.tls):
        return None
    limit = max(rules.max_http_head, rules.max_client_hello) if rules.tls else rules.max_http_head
    try:
        buf = sock.recv(limit, socket.MSG_PEEK)
    except OSError:
        return None
    if not buf:
        return None
    data = b""
    try:
        kind = classify(buf[:rules.max_http_head], http=rules.http, tls=rules.tls)
        if kind == "http":
            head = parse_http_head(buf[:rules.max_http_head], max_size=rules.max_http_head,
                                   until=rules.http_until)
            if head is NEED_DATA:
                return None
            meta: dict[str, Any] = {"protocol": "http", "method": head.method,
                                    "path": head.target, "version": head.version,
                                    "host": head.host}
            pool = route(rules.hosts, head.host)
            size = head.length
        elif kind == "tls":
            hello = parse_client_hello(buf[:rules.max_client_hello],
                                       max_size=rules.max_client_hello)
            if hello is NEED_DATA:
                return None
            meta = {"protocol": "tls", "sni": hello.sni, "alpn": list(hello.alpn)}
            pool = route(rules.snis, hello.sni)
            size = 0
        else:
            return None
    except SniffError:
        return None
    # every value comes from the peeked bytes: JSON makes a byte at most 6 (\uXXXX)
    if 6 * len(buf) + 256 > MAX_SNIFF_META and \
            len(json.dumps(meta, separators=(",", ":"))) > MAX_SNIFF_META:
        return None
    if size:
        try:
            data = sock.recv(size)
            while len(data) < size:   # (peeked, so queued: one recv takes it all)
                more = sock.recv(size - len(data))
                if not more:
                    raise SniffError("the client closed the connection while its HTTP head "
                                     "was read", "closed")
                data += more
        except OSError as exc:
            raise SniffError(f"connection failed while sniffing: {exc}", "closed") from exc
    return SniffResult(rules.default if pool is None else pool, meta, data)


async def sniff(sock: socket.socket, rules: SniffRules, timeout: float) -> SniffResult:
    """Sniff a freshly accepted, non-blocking ``sock`` and choose its pool.

    Runs on the running event loop; ``timeout`` (seconds) bounds the whole call. Consumes
    the PROXY header (if any) and the HTTP head (if HTTP), and nothing else. Raises
    :class:`SniffError` for that one connection (log it, close the socket, carry on);
    never closes ``sock``; leaves its socket options as it found them, also when
    cancelled. :class:`~sockshare.LocalProtocolError` if ``sock`` is blocking.
    """
    if sock.gettimeout() != 0.0:
        raise LocalProtocolError("sniff() needs a non-blocking socket (sock.setblocking(False))")
    if not timeout > 0:
        raise LocalProtocolError(f"sniff() timeout must be positive, not {timeout!r}")
    io = _Peeker(sock, asyncio.get_running_loop(), timeout)
    meta: dict[str, Any] = {"protocol": "unknown"}

    if rules.proxy != "off":
        required = rules.proxy == "required"
        try:
            header = await io.until(lambda b: _proxy_step(required, b), MAX_PROXY_HEADER,
                                    "PROXY protocol header")
        except SniffError as exc:
            if exc.reason != "silent" or required or rules.unknown == "reject":
                raise
            meta["silent"] = True
            return SniffResult(rules.default, meta)
        if header is not None:
            io.consume(header.length)
            meta["proxy"] = header.meta()

    if not (rules.http or rules.tls):
        return SniffResult(rules.default, meta)

    expect = " or ".join(name for name, on in (("HTTP request line", rules.http),
                                                ("TLS record", rules.tls)) if on)
    try:
        # (a request line that trickles in is consumed as it comes: it can no longer be
        # TLS, and it is part of the head, or of the unknown stream's data)
        kind = await io.until(lambda b: classify(b, http=rules.http, tls=rules.tls),
                              rules.max_http_head, expect,
                              take=(lambda b: b[0] != 0x16) if rules.http else None)
    except SniffError as exc:
        if exc.reason != "silent" or rules.unknown == "reject":
            raise
        meta["silent"] = True
        return SniffResult(rules.default, meta)

    pool: str | None = None
    data = b""
    if kind == "tls":
        tls_gate = _TlsGate()
        hello = await io.until(lambda b: parse_client_hello(b, max_size=rules.max_client_hello),
                               rules.max_client_hello, "TLS ClientHello", gate=tls_gate,
                               want=tls_gate.want)
        meta.update(protocol="tls", sni=hello.sni, alpn=list(hello.alpn))
        pool = route(rules.snis, hello.sni)
    elif kind == "http":
        try:
            head = await io.until(
                lambda b: parse_http_head(b, max_size=rules.max_http_head, until=rules.http_until),
                rules.max_http_head, "HTTP head", gate=_HttpGate(rules.http_until),
                take=lambda _b: True)   # (NEED_DATA: every byte so far is part of the head)
        except SniffError as exc:
            if exc.reason == "oversize":
                exc.http_status = 414 if "request line" in str(exc) else 431
            elif exc.reason == "garbage":
                exc.http_status = 505 if "only HTTP/1.x" in str(exc) else 400
            raise
        data = io.consume(head.length)
        meta.update(protocol="http", method=head.method, path=head.target,
                    version=head.version, host=head.host)
        pool = route(rules.hosts, head.host)
    elif rules.unknown == "reject":
        first = bytes(io.taken[:16]) + (io._peek(16) or b"")
        raise SniffError(f"neither HTTP nor TLS: {_show(first, 16)}", "unrecognised")
    else:
        data = bytes(io.taken)   # what was consumed before it turned out not to be HTTP

    size = len(json.dumps(meta, separators=(",", ":")))
    if size > MAX_SNIFF_META:
        raise SniffError(f"sniffed metadata of {size} bytes; the limit is {MAX_SNIFF_META}",
                         "oversize")
    return SniffResult(rules.default if pool is None else pool, meta, data)
