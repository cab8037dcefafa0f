"""Property-based fuzzing of what reads peer input: the token codec and the frame decoder.

* ``decode_token`` and ``import_socket`` are fed random text and bytes, valid tokens
  with random edits, and re-checksummed tokens whose fields were rewritten: only
  :class:`~sockshare.InvalidToken` (``decode_token``) or another
  :class:`~sockshare.SockshareError` (``import_socket``) may come out, and the process
  (which is also the exporter here) must end each example with the descriptors it
  started with.
* ``FrameDecoder`` is fed random bytes and valid frames, split and corrupted at random,
  with real descriptors (``os.dup`` of /dev/null): only ``RemoteProtocolError`` may
  escape, and every descriptor fed must come back exactly once, in a frame or from
  ``take_fds``. The test closes them all.

Hypothesis runs without its example database (``database=None``) so that no files
appear in the working tree.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sockshare
from sockshare.backends._agent import agent
from sockshare.protocol import (
    MAX_FDS_PER_FRAME,
    FrameDecoder,
    FrameType,
    TokenInfo,
    decode_token,
    encode_frame,
    encode_token,
)
from sockshare.protocol._token import ADDR_ABSTRACT, ADDR_PATH, KIND_POSIX, KIND_WINDOWS
from tests._fdcount import settled_fd_count, wait_fd_count

FUZZ = settings(database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=150)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


def _tokens_text() -> st.SearchStrategy[str]:
    alphabet = st.sampled_from("ss1.ABCxyz0189-_+/= \t\n")
    return st.one_of(
        st.text(),
        st.text(alphabet),
        st.builds(lambda t: "ss1." + t, st.text(alphabet)),
        st.builds(lambda t: "ss1." + t, st.text()),
        st.binary().map(lambda b: b.decode("latin-1")),
    )


_edit = st.one_of(
    st.tuples(st.just("del"), st.integers(0, 600)),
    st.tuples(st.just("ins"), st.integers(0, 600), st.characters()),
    st.tuples(st.just("set"), st.integers(0, 600), st.characters()),
    st.tuples(st.just("cut"), st.integers(0, 600)),
    st.tuples(st.just("dup"), st.integers(0, 600)),
)


def _mutate(token: str, edits: list[tuple[object, ...]]) -> str:
    t = token
    for e in edits:
        op, i = e[0], int(e[1]) % (len(t) + 1)  # type: ignore[call-overload]
        if op == "del":
            t = t[:i] + t[i + 1:]
        elif op == "ins":
            t = t[:i] + str(e[2]) + t[i:]
        elif op == "set":
            t = t[:i] + str(e[2]) + t[i + 1:]
        elif op == "cut":
            t = t[:i]
        else:
            t = t[:i] + t[i:] + t[i:]
    return t


def _token_info(kind: int, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[TokenInfo]:
    """TokenInfo of ``kind``: the fields every kind has, and that kind's own ``fields``."""
    return st.builds(
        TokenInfo,
        kind=st.just(kind),
        exporter_pid=u32,
        target_pid=u32,
        token_id=u64,
        secret=st.binary(min_size=16, max_size=16),
        expires_ms=u64,
        **fields,
    )


_POSIX_INFO = _token_info(KIND_POSIX, exporter_uid=u32, address=st.binary(max_size=200),
                          address_kind=st.sampled_from([ADDR_ABSTRACT, ADDR_PATH]))
_WIN_INFO = _token_info(KIND_WINDOWS, agent_port=u16, blob=st.binary(max_size=700))


# --- decode_token ---------------------------------------------------------------------


@FUZZ
@given(text=_tokens_text())
def test_decode_token_random_text(text: str) -> None:
    try:
        info = decode_token(text)
    except sockshare.InvalidToken:
        return
    assert isinstance(info, TokenInfo)


@FUZZ
@given(data=st.binary(max_size=5000))
def test_decode_token_random_bytes(data: bytes) -> None:
    try:
        decode_token(data)
    except sockshare.InvalidToken:
        pass


@FUZZ
@given(info=st.one_of(_POSIX_INFO, _WIN_INFO))
def test_token_codec_round_trips(info: TokenInfo) -> None:
    try:
        text = encode_token(info)
    except Exception:  # encode_token refuses what does not fit its fields
        return
    assert text.isascii()
    assert all(33 <= ord(c) <= 126 for c in text)
    if len(text) > 4096:
        with pytest.raises(sockshare.InvalidToken):
            decode_token(text)
        return
    assert decode_token(text) == info


def _a_token(pid: int) -> str:
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, pid)
    assert sockshare.release(token) is True
    return token


@FUZZ
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_decode_token_mutated(edits: list[tuple[object, ...]]) -> None:
    token = _token_for_decode()
    text = _mutate(token, edits)
    try:
        info = decode_token(text)
    except sockshare.InvalidToken:
        return
    # Only edits that do not change the body may pass (whitespace, base64 aliases).
    assert info == decode_token(token)


@functools.cache
def _token_for_decode() -> str:
    return _a_token(1)


# --- import_socket, with this process as exporter and target ------------------------


class _Idle:
    """This process's fd count with its export agent running and idle (computed once)."""

    def __init__(self) -> None:
        self._base: int | None = None

    def base(self) -> int:
        if self._base is None:
            # Earlier tests in this process may have left pooled agent connections (and
            # the agent's ends of them): close them and let the count settle first.
            sockshare.close_agent_connections()
            n = settled_fd_count()
            thread = agent()._thread
            if thread is None or not thread.is_alive():
                n += 5  # the agent's listener, wake pair, epoll and reserve fd
            a, b = socket.socketpair()
            with a, b:
                sockshare.import_socket(sockshare.export_socket(a, os.getpid()),
                                        timeout=5).close()
            sockshare.close_agent_connections()  # pooling: tests/test_token_pool.py
            wait_fd_count("self", n, timeout=5, what="this process (agent start)")
            self._base = n
        return self._base


_IDLE = _Idle()


def _attempt(text: str) -> None:
    try:
        s = sockshare.import_socket(text, timeout=2)
    except sockshare.SockshareError:
        return
    finally:
        sockshare.close_agent_connections()  # a refusal may have pooled a connection
    s.close()


@FEW
@given(text=_tokens_text())
def test_import_socket_random_text(text: str) -> None:
    base = _IDLE.base()
    _attempt(text)
    _settled(base)


def _settled(base: int) -> None:
    assert agent().pending() == 0
    wait_fd_count("self", base, timeout=5, what="this process (exporter and importer)")


@FEW
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_import_socket_mutated_tokens(edits: list[tuple[object, ...]]) -> None:
    base = _IDLE.base()
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, os.getpid())
    try:
        _attempt(_mutate(token, edits))
    finally:
        sockshare.release(token)
    _settled(base)


_field_edits = st.fixed_dictionaries(
    {},
    optional={
        "exporter_pid": st.one_of(u32, st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1])),
        "exporter_uid": u32,
        "target_pid": st.one_of(u32, st.just(-1)),  # -1: this process
        "token_id": u64,
        "secret": st.binary(min_size=16, max_size=16),
        "expires_ms": u64,
        "address": st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"", b"/", b"/etc/passwd", b"/tmp", b"/dev/null", b"x" * 107, b"x" * 108])),
        "address_kind": st.sampled_from([ADDR_ABSTRACT, ADDR_PATH]),
    },
)


@FUZZ
@given(edits=_field_edits)
def test_import_socket_forged_fields(edits: dict[str, object]) -> None:
    """Tokens with a valid checksum and rewritten fields: refused, never a crash."""
    base = _IDLE.base()
    a, b = socket.socketpair()
    with a, b:
        token = sockshare.export_socket(a, os.getpid())
    if edits.get("target_pid") == -1:
        edits["target_pid"] = os.getpid()
    forged = dataclasses.replace(decode_token(token), **edits)  # type: ignore[arg-type]
    try:
        _attempt(encode_token(forged))
    finally:
        sockshare.release(token)
    _settled(base)


# --- FrameDecoder -----------------------------------------------------------------------


class _FdPool:
    """Real descriptors to feed the decoder: dups of /dev/null, all closed at the end."""

    def __init__(self) -> None:
        self.src = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.fed: list[int] = []

    def take(self, n: int) -> list[int]:
        fds = [os.dup(self.src) for _ in range(n)]
        self.fed += fds
        return fds

    def close(self, returned: list[int]) -> None:
        try:
            assert Counter(returned) == Counter(self.fed), (
                f"fed {sorted(self.fed)}, got back {sorted(returned)}"
            )
        finally:
            for fd in set(self.fed):
                try:
                    os.close(fd)
                except OSError:
                    pass
            os.close(self.src)


def _drive(dec: FrameDecoder, pool: _FdPool, chunks: list[tuple[bytes, int]],
           eos: bool) -> tuple[list[int], list[tuple[int, bytes, int, int]], bool]:
    """Feed chunks (bytes, how many fresh fds), drain frames; return (fds out, frames,
    failed). Descriptors are made just before their feed: the decoder owns them then."""
    out: list[int] = []
    frames: list[tuple[int, bytes, int, int]] = []
    try:
        for data, nfds in chunks:
            dec.feed(data, pool.take(nfds))
            while (f := dec.next_frame()) is not None:
                out.extend(f.fds)
                frames.append((int(f.type), f.payload, f.flags, len(f.fds)))
        if eos:
            dec.end_of_stream()
    except sockshare.RemoteProtocolError:
        # a failed decoder stays failed, still owns what it is fed, and gives it all back
        with pytest.raises(sockshare.RemoteProtocolError):
            dec.next_frame()
        with pytest.raises(sockshare.RemoteProtocolError):
            dec.feed(b"SS", pool.take(1))
        out.extend(dec.take_fds())
        assert dec.take_fds() == []
        return out, frames, True
    out.extend(dec.take_fds())
    return out, frames, False


_chunk = st.tuples(st.binary(max_size=64), st.integers(0, 4))


@FUZZ
@given(chunks=st.lists(_chunk, max_size=12), max_payload=st.integers(0, 128),
       allow_fds=st.booleans(), eos=st.booleans())
def test_frame_decoder_random_bytes(chunks: list[tuple[bytes, int]], max_payload: int,
                                    allow_fds: bool, eos: bool) -> None:
    pool = _FdPool()
    out: list[int] = []
    try:
        dec = FrameDecoder(max_payload=max_payload, allow_fds=allow_fds)
        out, _frames, _failed = _drive(dec, pool, chunks, eos)
    finally:
        pool.close(out)


_frame_spec = st.tuples(
    st.sampled_from(list(FrameType)), st.binary(max_size=40), u8, st.integers(0, 3)
)


@FUZZ
@given(frames=st.lists(_frame_spec, max_size=8), cuts=st.lists(st.integers(0, 400), max_size=8),
       flips=st.lists(st.tuples(st.integers(0, 400), u8), max_size=3),
       extra_fds=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 3)), max_size=2),
       eos=st.booleans())
def test_frame_decoder_valid_frames_split_and_corrupted(
    frames: list[tuple[FrameType, bytes, int, int]], cuts: list[int],
    flips: list[tuple[int, int]], extra_fds: list[tuple[int, int]], eos: bool,
) -> None:
    """Valid frames, each frame's fds attached to its first byte, cut into random
    receives; optionally corrupted bytes and stray descriptors."""
    pool = _FdPool()
    out: list[int] = []
    try:
        stream = bytearray()
        fd_at: dict[int, int] = {}
        for ftype, payload, flags, nfds in frames:
            if nfds:
                fd_at[len(stream)] = fd_at.get(len(stream), 0) + nfds
            stream += encode_frame(ftype, payload, flags=flags, nfds=nfds)
        for pos, val in flips:
            if stream:
                stream[pos % len(stream)] = val
        for pos, n in extra_fds:
            p = pos % (len(stream) + 1)
            fd_at[p] = fd_at.get(p, 0) + n
        # cut so that every fd-carrying position starts a receive, like the kernel does
        bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts), *fd_at})
        chunks = []
        for lo, hi in zip(bounds, [*bounds[1:], bounds[-1]], strict=True):
            if hi > lo or (lo in fd_at and lo == len(stream)):
                chunks.append((bytes(stream[lo:hi]), fd_at.get(lo, 0)))
        dec = FrameDecoder(max_payload=64)
        out, got, failed = _drive(dec, pool, chunks, eos)
        if not flips and not extra_fds and not failed:
            assert got == [(int(t), p, f, n) for t, p, f, n in frames]
    finally:
        pool.close(out)


@settings(FUZZ, max_examples=20)
@given(n=st.integers(MAX_FDS_PER_FRAME - 2, 2 * MAX_FDS_PER_FRAME + 3))
def test_frame_decoder_many_fds(n: int) -> None:
    """Around the fd limits: a frame with up to 253 fds, then a flood of stray ones."""
    pool = _FdPool()
    out: list[int] = []
    try:
        nfds = min(n, MAX_FDS_PER_FRAME)
        frame = encode_frame(FrameType.HANDOFF, b"x", nfds=nfds)
        dec = FrameDecoder()
        out, got, failed = _drive(dec, pool, [(frame, n)], eos=True)
        assert failed == (n != nfds)
        if not failed:
            assert got == [(int(FrameType.HANDOFF), b"x", 0, nfds)]
    finally:
        pool.close(out)
