"""Descriptors as a resource: raise the soft RLIMIT_NOFILE to the hard limit at start.

Every connection a process holds is a descriptor, and the soft limit most systems start
processes with (1024) is far below what a server needs and what the hard limit allows.
As the Go runtime does at start, the dispatcher and every Python worker raise their soft
limit to the hard one (:func:`raise_nofile`) and log both values; the workers then say
in their hello how many connections fit below the limit (``_runtime.fd_mark``).
"""

from __future__ import annotations

import logging

__all__ = ["NofileLimits", "log_nofile", "raise_nofile"]

#: Where the hard limit is "unlimited", the soft one is raised this far (the kernel's
#: own cap, ``fs.nr_open``, is 1048576 by default).
UNLIMITED_CAP = 1 << 20


class NofileLimits:
    """RLIMIT_NOFILE before and after :func:`raise_nofile`."""

    __slots__ = ("before", "hard", "soft")

    def __init__(self, before: int, soft: int, hard: int) -> None:
        self.before = before
        self.soft = soft
        self.hard = hard

    def __str__(self) -> str:
        hard = "unlimited" if self.hard < 0 or self.hard >= 1 << 62 else str(self.hard)
        raised = f" (raised from {self.before})" if self.soft != self.before else ""
        return f"RLIMIT_NOFILE soft {self.soft}{raised}, hard {hard}"


def raise_nofile() -> NofileLimits | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (or as far as the
    system lets it). None where there is no such limit (no ``resource`` module)."""
    try:
        import resource
    except ImportError:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    before = soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        for want in (target, UNLIMITED_CAP, 10240):   # (macOS caps at OPEN_MAX)
            if want <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (OSError, ValueError):
                continue
            soft = want
            break
    return NofileLimits(before, soft, hard)


def log_nofile(log: logging.Logger, who: str) -> NofileLimits | None:
    """:func:`raise_nofile`, then one log line with both values."""
    limits = raise_nofile()
    if limits is not None:
        log.info("%s: %s", who, limits)
    return limits
