"""Tests in this folder run inside Windows CPython (under Wine, via scripts/wine_python.py).

A Linux pytest run ignores the whole folder; ``tests/test_wine_smoke.py`` runs it with
``python3 scripts/wine_python.py pytest tests/windows`` and checks the result. The Windows
run uses ``--confcutdir`` here, so the Linux conftest.py files above are not loaded.
"""

import sys

collect_ignore_glob = [] if sys.platform == "win32" else ["*"]
