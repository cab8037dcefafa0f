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

from sockshare import CarrierClosed, CarrierFull, CarrierTimeout, carriers
from sockshare.carriers import _libc
from sockshare.carriers._base import Deadline
from sockshare.carriers._proc import alive, self_ident
from sockshare.carriers._shm import ShmCarrier
from tests.carriers.child import make_message
from tests.carriers.conftest import Addresses, Child, mq_exists, needs, sysv_exists

# --- shm:// : writers killed at random moments --------------------------------------

KILLS = 200
MIN_RECOVERIES = 5
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
            # at least KILLS kills, and on until some of them hit a writer holding the lock or
            # in the middle of a message (the counters the ring keeps of its recoveries)
            while kills < KILLS or sum(rx._recoveries()) < MIN_RECOVERIES:
                assert time.monotonic() - started < 30, (
                    f"only {kills} kills and {rx._recoveries()} recoveries in 30 s"
                )
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


# --- mq:// and sysvmq:// : the reader dies ---------------------------------------------


def _queue_gone(scheme: str, url: str) -> bool:
    name = url.split("://", 1)[1].lstrip("/").split("?")[0]
    if scheme == "mq":
        record = f"/dev/shm/.sockshare-mq.{name}"
        return not mq_exists(name) and not os.path.exists(record)
    key = int(name, 0)
    return not sysv_exists(key) and not os.path.exists(f"/dev/shm/.sockshare-sysvmq.{key:08x}")


def _start_reader(children: list[Child], url: str) -> Child:
    child = Child("reader", url)
    children.append(child)
    assert child.line().startswith("ready "), "the reader did not start"
    return child


def _fill(tx: carriers.Carrier) -> int:
    for sent in range(10_000):
        try:
            tx.send(b"f" * tx.max_message, timeout=0)
        except CarrierFull:
            return sent
    raise AssertionError("the queue never filled")


@pytest.mark.parametrize("scheme", ["mq", "sysvmq"])
def test_writer_blocked_on_a_full_queue_learns_the_reader_died(
    addrs: Addresses, children: list[Child], scheme: str
) -> None:
    """A writer waiting forever (timeout=None) in send() on a full queue gets
    CarrierClosed within about a second of the reader being killed."""
    needs(scheme)
    url = addrs.url(scheme)
    reader = _start_reader(children, url)
    outcome: list[BaseException | None] = []
    with carriers.open(url, "w", timeout=None) as tx:  # every send waits as long as it takes
        assert _fill(tx) > 0

        def blocked_send() -> None:
            try:
                tx.send(b"x" * tx.max_message, timeout=None)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=blocked_send, daemon=True)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive(), outcome  # it is waiting for room
        reader.kill()
        killed = time.monotonic()
        thread.join(timeout=5)
        waited = time.monotonic() - killed
        try:
            assert not thread.is_alive(), "the writer still waits, 5 s after the reader died"
            assert isinstance(outcome[0], CarrierClosed), outcome
            assert "gone" in str(outcome[0])
            assert waited < 1.5
            assert tx.closed
        finally:
            # the next reader replaces the dead one's queue, and removes it on close
            # (which also ends a writer still blocked on it)
            carriers.open(url, "r", timeout=5).close()
            thread.join(timeout=5)
            if thread.is_alive():  # (only without the fix) free the writer by hand
                _remove_queue(scheme, url)
                thread.join(timeout=5)
    assert _queue_gone(scheme, url)


def _remove_queue(scheme: str, url: str) -> None:
    name = url.split("://", 1)[1].lstrip("/")
    if scheme == "mq":
        _libc.call("mq_unlink", b"/" + name.encode())
    else:
        key = int(name, 0)
        qid = _libc.call("msgget", key - (1 << 32) if key >= 1 << 31 else key, 0)
        _libc.call("msgctl", qid, 0, None)  # IPC_RMID


@pytest.mark.parametrize("scheme", ["mq", "sysvmq"])
def test_new_reader_takes_over_a_dead_readers_queue(
    addrs: Addresses, children: list[Child], scheme: str
) -> None:
    """The dead reader's queue (with stale messages in it) is replaced by the next reader,
    which owns the new one and removes it (and the owner record) on close."""
    needs(scheme)
    url = addrs.url(scheme)
    reader = _start_reader(children, url)
    with carriers.open(url, "w", timeout=5) as old_writer:
        old_writer.send(b"stale 1")
        old_writer.send(b"stale 2")
        reader.kill()
        with pytest.raises(CarrierClosed, match="left over"):
            carriers.open(url, "w", timeout=1)  # nobody would ever read it
        with carriers.open(url, "r", timeout=5) as rx:
            assert rx.owner
            with pytest.raises(CarrierTimeout):
                rx.recv(timeout=0.2)  # the stale messages went with the old queue
            with carriers.open(url, "w", timeout=5) as tx:
                tx.send(b"fresh")
                assert rx.recv(timeout=1) == b"fresh"
            with pytest.raises(CarrierClosed):  # the old queue is gone for its writers too
                old_writer.send(b"into the old queue", timeout=1)
        assert _queue_gone(scheme, url)


@pytest.mark.parametrize("scheme", ["mq", "sysvmq"])
def test_two_new_readers_race_for_a_dead_readers_queue(
    addrs: Addresses, children: list[Child], scheme: str
) -> None:
    """Two processes open the dead reader's queue at once: exactly one owns the new queue,
    the other attaches to it, and a message sent then reaches one of them."""
    needs(scheme)
    url = addrs.url(scheme)
    _start_reader(children, url).kill()
    racers = [_start_reader(children, url) for _ in range(2)]
    with carriers.open(url, "w", timeout=5) as tx:
        tx.send(b"hello")
    for racer in racers:
        racer.close()  # closes stdin: each closes its end and exits
        assert racer.wait() == 0, racer.stderr()
    assert _queue_gone(scheme, url)


def test_liveness_sees_zombies_and_reused_pids() -> None:
    """What "dead" means for every recovery above: a killed process not yet collected
    (a zombie) is dead, and so is a pid whose start time differs (the pid was reused)."""
    me = self_ident()
    assert alive(me)
    assert not alive(me._replace(start=me.start + 1))  # same pid, another process
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while alive(me._replace(pid=pid, start=0)):  # it exits; we have not collected it
            assert time.monotonic() < deadline, "a zombie counts as alive"
            time.sleep(0.01)
    finally:
        os.waitpid(pid, 0)
    assert not alive(me._replace(pid=pid, start=0))
