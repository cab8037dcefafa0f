"""The version of sockshare, in one place.

setuptools reads it for the package metadata (``[tool.setuptools.dynamic]`` in
``pyproject.toml``); :data:`sockshare.__version__` and ``sockshare --version`` re-export it.
"""

__version__ = "0.1.0"
