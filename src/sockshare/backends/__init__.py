"""The OS mechanisms that move a socket from one process to another.

* :mod:`._scm` -- SCM_RIGHTS over UNIX sockets, with every trap handled (truncation,
  close-on-exec, at least one data byte, peer credentials);
* :mod:`._agent` -- the per-process export agent behind tokens (POSIX: SCM_RIGHTS over
  an abstract or 0700-directory UNIX socket; Windows: WSADuplicateSocket blobs with a
  loopback claim service);
* :mod:`._pidfd` -- Linux ``pidfd_open``/``pidfd_getfd``, measured as an alternative;
* :mod:`._inherit` -- descriptors inherited across exec: systemd ``LISTEN_FDS``;
* :mod:`._fds` -- :func:`~._fds.checked_socket`, the one place a received descriptor
  becomes a socket object (its claimed kind checked with the kernel).

``sockshare doctor`` reports which of these work on this machine.
"""
