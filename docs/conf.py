"""Sphinx configuration for the sockshare documentation site.

The Markdown pages in this directory are the guides (read by myst-parser, and readable on
GitHub as they are); ``api.md`` generates the API reference from the docstrings of the
public names of ``sockshare``, ``sockshare.server`` and ``sockshare.carriers``. Built in
CI with warnings as errors::

    python -m pip install -e '.[docs]'
    python -m sphinx -W -b html docs /tmp/sockshare-docs
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Document the source tree next to this file, not whatever sockshare is installed.
sys.path.insert(0, str(ROOT / "src"))

from sockshare._version import __version__  # noqa: E402

project = "sockshare"
author = "the sockshare authors"
copyright = "the sockshare authors"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"sockshare {__version__}"
