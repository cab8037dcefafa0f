"""Carriers after a crash: processes killed with SIGKILL at random moments or at chosen
points, and what the survivors (and the next reader) see.

The writer processes here are forked from the test process (which has no other thread)
and killed by pid, then collected at once.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import NoReturn

import pytest

from sockshare import CarrierClosed, CarrierTimeout, carriers
from sockshare.carriers._base import Deadline
from sockshare.carriers._shm import ShmCarrier
from tests.carriers.child import make_message
from tests.carriers.conftest import Addresses, Child, needs

# --- shm:// : writers killed at random moments --------------------------------------

KILLS = 200
RING_SLOTS = 8
SIZE = 1 << 16  # every message is exactly 64 KiB
_HEAD = struct.Struct("<II")  # writer id, message number


def _message(wid: int, k: int) -> bytes:
    """64 KiB of (writer id, number) repeated: a slot still holding part of an earlier
    message (a torn copy) cannot pass :func:`_check`."""
    return _HEAD.pack(wid, k) * (SIZE // _HEAD.size)


def _check(message: bytes) -> tuple[int, int] | None:
    """(writer id, number) of an intact message; None if it is damaged."""
    if len(message) != SIZE:
        return None
    wid, k = _HEAD.unpack_from(message)
    return (wid, k) if message == _message(wid, k) else None


def _writer(url: str, wid: int, report: int) -> NoReturn:
    """A forked writer: sends until killed; reports each message after send() returned."""
    code = 3
    try:
        with carriers.open(url, "w", timeout=10) as tx:
            os.write(report, b"S %d %d\n" % (wid, os.getpid()))
            k = 0
            while True:
                tx.send(_message(wid, k))
                os.write(report, b"%d %d\n" % (wid, k))
                k += 1
    except BaseException as exc:  # any failure is reported to the test
        os.write(report, b"E %d %s\n" % (wid, repr(exc).encode()[:300]))
    finally:
        os._exit(code)


def _fork(fn: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)  # type: ignore[operator]
        finally:
            os._exit(4)
    return pid


def _collect(pid: int) -> int:
    """SIGKILL our child ``pid`` (if still running) and collect it; its wait status."""
    try:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        return -1  # already collected
    return status


def test_shm_survives_200_writers_killed_at_random_moments(addrs: Addresses) -> None:
    needs("shm")
    assert threading.active_count() == 1, "forking needs a single-threaded test process"
    rng = random.Random()
    url = addrs.url("shm") + f"?slots={RING_SLOTS}&msgsize={SIZE}"
    reported: set[tuple[int, int]] = set()
    received: dict[tuple[int, int], int] = {}
    order: dict[int, int] = {}
    damaged = out_of_order = 0
    errors: list[str] = []
    pending = b""
    longest_stall = 0.0

    def take(message: bytes) -> None:
        nonlocal damaged, out_of_order
        key = _check(message)
        if key is None:
            damaged += 1
            return
        received[key] = received.get(key, 0) + 1
        wid, k = key
        if order.get(wid, -1) >= k:
            out_of_order += 1
        order[wid] = k

    def read_reports() -> None:
        nonlocal pending
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"E "):
                errors.append(line.decode(errors="replace"))
            elif line.startswith(b"S "):  # opened: most kills come while it sends
                pid = int(line.split()[2])
                if pid in writers and rng.random() < 0.8:
                    writers[pid] = time.monotonic() + rng.uniform(0.0, 0.01)
            else:
                wid, k = map(int, line.split())
                reported.add((wid, k))

    r, w = os.pipe()
    os.set_blocking(r, False)
    writers: dict[int, float] = {}  # pid -> when to kill it
    kills = next_wid = 0
    started = time.monotonic()
    with carriers.open(url, "r", timeout=10) as rx:
        assert isinstance(rx, ShmCarrier)
        try:
            last_message = time.monotonic()
            while kills < KILLS:
                assert time.monotonic() - started < 60, f"only {kills} kills in 60 s"
                while len(writers) < 3:
                    pid = _fork(_writer, rx.url, next_wid, w)
                    next_wid += 1
                    writers[pid] = time.monotonic() + rng.uniform(0.0, 0.03)
                try:
                    take(rx.recv(timeout=0.002))
                    now = time.monotonic()
                    longest_stall = max(longest_stall, now - last_message)
                    last_message = now
                except CarrierTimeout:
                    pass
                now = time.monotonic()
                for pid, kill_at in list(writers.items()):
                    if now >= kill_at:
                        status = _collect(pid)
                        del writers[pid]
                        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                            kills += 1
                        else:
                            errors.append(f"writer {pid} ended by itself: status {status}")
                read_reports()
            for pid in list(writers):
                _collect(pid)
                del writers[pid]
            read_reports()
            # everything reported is there now, without anyone sending anything more
            while True:
                try:
                    take(rx.recv(timeout=0.5))
                except CarrierTimeout:
                    break
            read_reports()
            elapsed = time.monotonic() - started
            free = rx._free_slots()
            repairs, skipped = rx._recoveries()
            # the ring is whole again: exactly `slots` messages fit without waiting...
            with carriers.open(rx.url, "w", timeout=2) as tx:
                for i in range(RING_SLOTS):
                    tx.send(b"fill %d" % i, timeout=0)
                assert [rx.recv(timeout=1) for _ in range(RING_SLOTS)] == [
                    b"fill %d" % i for i in range(RING_SLOTS)
                ]
                for m in (b"A", b"B", b"C"):  # ... and none arrives late
                    tx.send(m, timeout=1)
                    assert rx.recv(timeout=1) == m
        finally:
            for pid in writers:
                _collect(pid)
            os.close(r)
            os.close(w)
    print(
        f"\n{kills} writers killed in {elapsed:.1f} s; {len(received)} messages of 64 KiB received, "
        f"{len(reported)} reported sent; longest wait between two messages {longest_stall * 1000:.1f} ms; "
        f"{repairs} lock repairs, {skipped} abandoned slots skipped"
    )
    assert not errors, errors[:5]  # no writer timed out or failed
    assert free == RING_SLOTS
    assert damaged == 0
    assert out_of_order == 0
    assert reported <= received.keys(), f"lost: {sorted(reported - received.keys())[:10]}"
    assert all(n == 1 for n in received.values()), "a message was received twice"
    assert longest_stall < 1.0
    assert len(reported) > KILLS  # the writers really sent between the kills
    assert repairs + skipped > 0  # some were killed holding the lock or mid-message


# --- shm:// : killed at chosen points --------------------------------------------------


def _die_holding_the_lock(url: str) -> NoReturn:
    tx = carriers.open(url, "w", timeout=5)
    assert isinstance(tx, ShmCarrier)
    tx._lock(Deadline(5))
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("not reached")


def _die_after_claiming(url: str, half: bool) -> NoReturn:
    """Claim a slot (``half``: write the slot's record but die before ``head`` moves),
    then die without publishing it."""
    tx = carriers.open(url, "w", timeout=5)
    assert isinstance(tx, ShmCarrier)
    if half:
        from sockshare.carriers import _shm

        assert tx._mm is not None
        tx._lock(Deadline(5))
        head = tx._get(_shm._OFF_HEAD)
        record = _shm._TABLE + (head % tx._slots) * _shm._SLOT_SIZE
        _shm._SLOT.pack_into(tx._mm, record, _shm._WRITING, 5, head)
    else:
        index, _ = tx._claim(5, Deadline(5))
        tx._mm[tx._data + index * tx._stride : tx._data + index * tx._stride + 3] = b"hal"  # type: ignore[index]
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("not reached")


@pytest.mark.parametrize("point", ["holding the lock", "after claiming a slot", "halfway through claiming"])
def test_shm_writer_killed_at_a_chosen_point(addrs: Addresses, point: str) -> None:
    """Whatever the writer held is recovered: the next writer is not delayed, no slot is
    lost, the messages around the dead one arrive in order at once."""
    needs("shm")
    with carriers.open(addrs.url("shm") + "?slots=4&msgsize=64", "r", timeout=5) as rx:
        assert isinstance(rx, ShmCarrier)
        with carriers.open(rx.url, "w", timeout=5) as tx:
            tx.send(b"before")
            if point == "holding the lock":
                pid = _fork(_die_holding_the_lock, rx.url)
            else:
                pid = _fork(_die_after_claiming, rx.url, point.startswith("halfway"))
            status = _collect(pid)
            assert os.WIFSIGNALED(status), status
            t0 = time.monotonic()
            tx.send(b"after", timeout=1)
            assert rx.recv(timeout=1) == b"before"
            assert rx.recv(timeout=1) == b"after"
            assert time.monotonic() - t0 < 0.5
            assert rx._free_slots() == 4
            for i in range(4):  # every slot is usable
                tx.send(b"%d" % i, timeout=0)
            assert [rx.recv(timeout=1) for _ in range(4)] == [b"0", b"1", b"2", b"3"]


# --- shm:// : the next reader after a dead one --------------------------------------------


def _reader_then_die(url: str, ready: int) -> NoReturn:
    rx = carriers.open(url, "r", timeout=5)
    os.write(ready, b"x")
    time.sleep(30)
    rx.close()
    os._exit(0)


def test_shm_new_reader_replaces_a_dead_readers_ring(addrs: Addresses) -> None:
    needs("shm")
    url = addrs.url("shm")
    r, w = os.pipe()
    try:
        pid = _fork(_reader_then_die, url, w)
        try:
            assert os.read(r, 1) == b"x"
            with carriers.open(url, "w", timeout=5) as old_writer:
                old_writer.send(b"stale")
                status = _collect(pid)
                assert os.WIFSIGNALED(status)
                with pytest.raises(CarrierClosed, match="left over"):
                    carriers.open(url, "w")
                with carriers.open(url, "r", timeout=5) as rx:  # no manual cleanup needed
                    assert rx.owner
                    with pytest.raises(CarrierClosed, match="replaced"):
                        old_writer.send(b"into the old ring")
                    with carriers.open(url, "w", timeout=5) as tx:
                        tx.send(b"fresh")
                        assert rx.recv(timeout=1) == b"fresh"  # the stale message is gone
                assert not os.path.exists("/dev/shm/" + url.removeprefix("shm://"))
        finally:
            _collect(pid)
    finally:
        os.close(r)
        os.close(w)


# --- fifo:// : a stray write in the stream -------------------------------------------------

STRAY = {
    "text": b"garbage",
    "old length prefix": b"\x00\x00\x03\xe8abc",  # "1000 bytes follow", then 3
    "fake header": b"\xf1\x70\x0f\xa0xyz",  # our magic, "4000 bytes follow", then 3
}


@pytest.mark.parametrize("count", [50, 3])
@pytest.mark.parametrize("stray", list(STRAY))
def test_fifo_stray_write_does_not_cost_the_next_writers_messages(
    addrs: Addresses, children: list[Child], stray: str, count: int
) -> None:
    """Another process writes 7 bytes that are not a frame; a writer process then sends
    ``count`` messages: the reader gets every one of them, in order, and counts the 7
    bytes it skipped."""
    needs("fifo")
    if sys.platform == "win32":
        pytest.skip("POSIX FIFOs only")
    with carriers.open(addrs.url("fifo"), "r", timeout=5) as rx:
        path = rx.url.removeprefix("fifo://")
        code = (
            "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK); "
            "os.write(fd, bytes.fromhex(sys.argv[2])); os.close(fd)"
        )
        done = subprocess.run([sys.executable, "-c", code, path, STRAY[stray].hex()], timeout=30, check=False)
        assert done.returncode == 0
        child = Child("send", rx.url, str(count))
        children.append(child)
        got = [rx.recv(timeout=5) for _ in range(count)]
        assert got == [make_message(i, rx.max_message) for i in range(count)]
        assert child.wait() == 0, child.stderr()
        with pytest.raises(CarrierTimeout):
            rx.recv(timeout=0.1)
        assert rx.discarded == 7  # type: ignore[attr-defined]
