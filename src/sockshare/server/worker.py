"""The Python worker's command line: ``python -m sockshare.server.worker``.

The dispatcher starts each Python worker as::

    python -m sockshare.server.worker --app module:callable --channel ADDRESS --id N \
        [--resume module:callable] [--pool NAME] [--generation G] [--grace SECONDS] \
        [--log-level LEVEL]

(``SOCKSHARE_CHANNEL``, ``SOCKSHARE_WORKER_ID``, ``SOCKSHARE_POOL`` and
``SOCKSHARE_GENERATION`` stand in for the flags). A ``worker_cmd`` may start it too, with
``{channel}`` and ``{id}`` in its arguments.

This module only runs :func:`sockshare.server._runtime.main`; nothing imports it, so
``-m`` runs it once, as ``__main__``, and the classes an app imports from
:mod:`sockshare.server` are the ones the runtime raises. What an app uses is in
:mod:`sockshare.server` (``Connection``, the migration errors...).
"""

from __future__ import annotations

import sys

from sockshare.server._runtime import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
