"""gunicorn's worker class for benchmarks/asgi.py: uvicorn's ``UvicornWorker`` with the
same HTTP implementation and event loop as the other servers (``httptools``; the loop
from ``SOCKSHARE_BENCH_LOOP``, set by the benchmark) and no access log (the other
servers run without one)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]


class Worker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": os.environ.get("SOCKSHARE_BENCH_LOOP", "auto"),
                                     "http": "httptools", "access_log": False}
