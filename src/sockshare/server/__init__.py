"""The server runtime: ``sockshare serve``.

One dispatcher process owns the listening sockets and accepts; worker processes serve.
Each accepted connection is handed to a worker over a handoff :class:`~sockshare.Channel`
together with the bytes a sniffer already read and metadata (client address, route,
handoff id). Layout:

* :mod:`._dispatcher` -- listeners, accept loop, balancing, queue, supervision;
* :mod:`._sniff` -- HTTP/1.x, TLS ClientHello (SNI, by MSG_PEEK) and PROXY v1/v2 sniffers;
* :mod:`._worker` -- the Python worker runtime and :class:`Connection`;
* :mod:`._demo` -- the built-in demo app (HTTP page, ``/whoami``, WebSocket echo);
* :mod:`._control` -- the owner-only control socket read by ``sockshare status``;
* :mod:`._cli` -- the ``serve`` and ``status`` commands.
"""
