"""Child process for the carrier tests; one role per run (``python child.py ROLE URL ...``).

Roles:

* ``send URL N``: open URL as a writer and send :func:`make_message` 0..N-1;
* ``reader URL``: open URL as the reader, print ``ready <url>``, then wait until stdin
  closes (or the test kills us) -- a peer to lose;
* ``token URL``: open URL as the reader, print ``ready <url>``, receive one token,
  import the socket, answer ``pong:<what it read>`` on it, print ``ok``.

Everything has a timeout; the exit status tells the test what happened.
"""

from __future__ import annotations

import sys

TIMEOUT = 20.0


def make_message(i: int, limit: int) -> bytes:
    """Message ``i``: its number first, then a varying length (at most ``limit``)."""
    head = b"%08d" % i
    cap = max(len(head), min(limit, 300))
    size = len(head) + (i * 7919) % (cap - len(head) + 1)
    return head + bytes([i % 251]) * (size - len(head))


def main(argv: list[str]) -> int:
    import sockshare
    from sockshare import carriers

    role, url = argv[0], argv[1]
    if role == "send":
        with carriers.open(url, "w", timeout=TIMEOUT) as tx:
            for i in range(int(argv[2])):
                tx.send(make_message(i, tx.max_message))
        return 0
    if role == "reader":
        with carriers.open(url, "r", timeout=TIMEOUT) as rx:
            print("ready", rx.url, flush=True)
            sys.stdin.read()
        return 0
    if role == "token":
        with carriers.open(url, "r", timeout=TIMEOUT) as rx:
            print("ready", rx.url, flush=True)
            token = rx.recv().decode("ascii")
        sock = sockshare.import_socket(token)
        try:
            sock.settimeout(TIMEOUT)
            data = sock.recv(64)
            sock.sendall(b"pong:" + data)
        finally:
            sock.close()
        print("ok", flush=True)
        return 0
    print(f"unknown role {role!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
