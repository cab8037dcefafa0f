"""Where the Python worker used to live, kept while other code moves over.

The worker is now three modules: ``_handler`` (the API an app sees: ``Connection``,
``WorkerInfo``, the migration errors), ``_runtime`` (the process: handoffs, reports,
drain) and ``_peers`` (direct migration between workers), started as
``python -m sockshare.server.worker``. This module re-exports the names the dispatcher
imports from here, and still runs a worker as ``python -m sockshare.server._worker``
for a dispatcher that starts it so. Import from the modules above instead.
"""

from __future__ import annotations

import sys

from sockshare.server._peers import PEER_SUFFIX
from sockshare.server._runtime import REJECT_NO_FDS, main

__all__ = ["PEER_SUFFIX", "REJECT_NO_FDS", "main"]

if __name__ == "__main__":
    sys.exit(main())
