"""Build step for the optional C module ``sockshare._speedups`` (the metadata is all in
pyproject.toml). Linux only (accept4, MSG_CMSG_CLOEXEC); ``optional=True``: a failed
compile does not fail the install, sockshare then runs its pure-Python paths (and says so
once: see ``sockshare._fast``)."""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") and platform.python_implementation() == "CPython":
    ext_modules.append(Extension("sockshare._speedups", ["src/sockshare/_speedups.c"],
                                 optional=True))

setup(ext_modules=ext_modules)
