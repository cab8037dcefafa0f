"""``python -m sockshare ...``: the same command line as the ``sockshare`` console script.

Useful where the script is not on ``PATH`` (a venv not activated, the embeddable Windows
CPython) and to pick the interpreter explicitly.
"""

import sys

from sockshare.cli import main

if __name__ == "__main__":
    sys.exit(main())
