"""Handle counts of Windows processes, for tests that run ``sockshare serve`` under Wine.

Run inside Windows CPython (``python.exe tests/windows/handles.py PID...``): prints one
JSON object ``{"PID": handles, ...}`` on one line, counted from the system's handle
table (``NtQuerySystemInformation(SystemHandleInformation)``; under Wine 8
``GetProcessHandleCount`` answers 0 for every process, the table is right: a socket
open in a worker is one handle more there). A pid that has no handle (gone) counts 0.

``--kill PID`` first ends that process with ``TerminateProcess`` (``os.kill`` with a
signal that is not a console event), as a crash or the Task Manager would;
``--suspend PID`` first stops all its threads (``NtSuspendProcess``): a hung process.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import sys

SYSTEM_HANDLE_INFORMATION = 16
STATUS_INFO_LENGTH_MISMATCH = 0xC0000004


class _Entry(ctypes.Structure):
    """SYSTEM_HANDLE_TABLE_ENTRY_INFO (x64: 24 bytes)."""

    _fields_ = [("pid", ctypes.c_ulong), ("type", ctypes.c_ubyte), ("flags", ctypes.c_ubyte),
                ("handle", ctypes.c_ushort), ("obj", ctypes.c_void_p), ("access", ctypes.c_ulong)]


def handle_counts() -> collections.Counter[int]:
    """Open handles per process id, the whole system at once."""
    if sys.platform != "win32":
        raise SystemExit("handles.py runs inside Windows CPython")
    ntdll = ctypes.WinDLL("ntdll")
    size = 1 << 20
    while True:
        buf = ctypes.create_string_buffer(size)
        needed = ctypes.c_ulong()
        status = ntdll.NtQuerySystemInformation(SYSTEM_HANDLE_INFORMATION, buf, size,
                                                ctypes.byref(needed)) & 0xFFFFFFFF
        if status == STATUS_INFO_LENGTH_MISMATCH and size < 1 << 28:
            size *= 4
            continue
        if status:
            raise SystemExit(f"NtQuerySystemInformation: status {status:#x}")
        break
    count = ctypes.c_ulong.from_buffer(buf).value
    entries = (_Entry * count).from_buffer(buf, ctypes.sizeof(ctypes.c_void_p))
    return collections.Counter(int(e.pid) for e in entries)


def suspend(pid: int) -> None:
    """Stop every thread of ``pid`` (as SIGSTOP would on Linux)."""
    if sys.platform != "win32":
        raise SystemExit("handles.py runs inside Windows CPython")
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = ctypes.c_void_p
    handle = kernel32.OpenProcess(0x0800, False, pid)   # PROCESS_SUSPEND_RESUME
    if not handle:
        raise SystemExit(f"OpenProcess({pid}): error {ctypes.get_last_error()}")
    try:
        status = ctypes.WinDLL("ntdll").NtSuspendProcess(ctypes.c_void_p(handle)) & 0xFFFFFFFF
        if status:
            raise SystemExit(f"NtSuspendProcess({pid}): status {status:#x}")
    finally:
        kernel32.CloseHandle(ctypes.c_void_p(handle))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--kill"]:
        os.kill(int(argv[1]), 9)   # TerminateProcess(handle, 9)
        argv = argv[2:]
    elif argv[:1] == ["--suspend"]:
        suspend(int(argv[1]))
        argv = argv[2:]
    counts = handle_counts()
    print(json.dumps({str(pid): counts.get(int(pid), 0) for pid in argv}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
