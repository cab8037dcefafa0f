"""The server runtime: ``sockshare serve``.

One dispatcher process owns the listening sockets and accepts; worker processes serve.
Each accepted connection is handed to a worker over a handoff :class:`~sockshare.Channel`
together with the bytes a sniffer already read and metadata (client address, route,
handoff id). Layout:

* :mod:`._dispatcher` -- listeners, accept loop, balancing, queue, supervision, the
  migration relay, rebalancing, reload, upgrade, systemd (LISTEN_FDS, sd_notify, fd store);
* :mod:`._sniff` -- HTTP/1.x, TLS ClientHello (SNI, by MSG_PEEK) and PROXY v1/v2 sniffers;
* :mod:`._worker` -- the Python worker runtime and :class:`Connection`, with
  ``conn.migrate(state)`` / ``resume(conn, state)``;
* :mod:`._demo` -- the built-in demo app (HTTP page, ``/whoami``, WebSocket echo that moves
  between workers with its "move me" button);
* :mod:`._control` -- the owner-only control socket read by ``sockshare status``;
* :mod:`._cli` -- the ``serve``, ``status``, ``reload``, ``upgrade`` and ``migrate`` commands;
* :mod:`._loadgen` -- the load generator of the live benchmark and its CI test.
"""
