"""SIGHUP with ``--config``: the file is read again and what can change live is applied.

:func:`reconfigure` is called by a reload (:meth:`Supervisor._reload_once`) before the
new generation of workers starts, so the new workers are started from the new pool
settings. What applies live:

* every pool's settings (``workers``, ``app``/``worker_cmd``, ``resume``, ``policy``,
  ``hash_key``, ``max_conns``, ``queue``, ``rebalance``, the web settings): the new
  workers of the reload are started from them, with as many workers as ``workers`` says;
* routes, ``default_pool`` and the top-level settings in :data:`LIVE` (grace, timeouts,
  retries, log level and log configuration, sniffing limits, rebalancing, ...).

What needs an upgrade (SIGUSR2, ``sockshare upgrade``: the new dispatcher reads the file
anew) -- the running values stay and one warning names each: the listeners (binds,
names, sniff, proxy, backlog, proxy_allow_from), pools added or removed, a pool's
``accept`` mode, and the
settings in :data:`UPGRADE_ONLY` (metrics, agent, control, fd_reserve, pid_file, user, group,
dispatchers).

A file that cannot be read or is invalid (:class:`ConfigError`) changes nothing: the
caller logs the message and the reload stops there (no new workers either).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sockshare.server._config import ConfigError, PoolConfig, ServerConfig
from sockshare.server._policy import make_policy

if TYPE_CHECKING:
    from sockshare.server._dispatcher import Dispatcher

__all__ = ["LIVE", "UPGRADE_ONLY", "reconfigure"]

log = logging.getLogger("sockshare.server")

#: top-level settings a reload applies
LIVE = ("routes", "default_pool", "grace", "log_level", "log_config", "sniff_timeout",
        "sniff_max", "max_retries", "queue_timeout", "backoff_initial", "backoff_max",
        "stable_after", "connect_timeout", "timeout", "upgrade_probation",
        "rebalance_interval", "rebalance_min", "rebalance_spread", "direct_migration",
        "accept_window")
#: top-level settings only an upgrade (a new dispatcher) applies
UPGRADE_ONLY = ("metrics", "agent", "control", "fd_reserve", "pid_file", "user", "group",
                "dispatchers")


def _diff(old: Any, new: Any, keys: tuple[str, ...] | list[str]) -> list[str]:
    return [f"{k} {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in keys
            if getattr(old, k) != getattr(new, k)]


def reconfigure(d: Dispatcher, load: Callable[[], ServerConfig]) -> Callable[[], None]:
    """Read the configuration again (``load``) and apply what can change live; returns
    a function that puts the previous configuration back (a reload whose new workers do
    not start). :class:`ConfigError` (nothing changed) for a bad file, or a good one
    that cannot apply without what only an upgrade changes (a route to a new pool)."""
    new = load()
    cur = d.cfg
    not_live: list[str] = []
    if new.listeners != cur.listeners:
        not_live.append("listeners ([[listen]], --bind, backlog, proxy settings)")
    not_live += _diff(cur, new, UPGRADE_ONLY)
    added = sorted(set(new.pools) - set(cur.pools))
    removed = sorted(set(cur.pools) - set(new.pools))
    if added:
        not_live.append(f"new pool(s) {', '.join(added)}")
    if removed:
        not_live.append(f"removed pool(s) {', '.join(removed)} (they go on serving)")
    pools = {name: new.pools.get(name, p) for name, p in cur.pools.items()}
    for name, p in list(pools.items()):
        if p.accept != cur.pools[name].accept:   # (the listeners' holds are set at start)
            not_live.append(f"pools.{name}.accept ({cur.pools[name].accept} -> {p.accept})")
            pools[name] = dataclasses.replace(p, accept=cur.pools[name].accept)
    effective = dataclasses.replace(cur, pools=pools, **{k: getattr(new, k) for k in LIVE})
    try:
        effective.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (with what only an upgrade changes left as it runs: "
                          f"{'; '.join(not_live) or 'nothing'})") from None
    changes = _diff(cur, new, [k for k in LIVE if k != "routes"])
    if new.routes != cur.routes:
        changes.append(f"routes ({len(cur.routes)} -> {len(new.routes)})")
    for name, p in pools.items():
        changes += [f"pools.{name}.{c}" for c in _diff(
            cur.pools[name], p, [f.name for f in dataclasses.fields(PoolConfig)])]
    if not_live:
        log.warning("reload: the configuration changed what needs an upgrade (SIGUSR2, "
                    "sockshare upgrade); not applied: %s", "; ".join(not_live))
    log.info("reload: configuration re-read; %s", "; ".join(changes) if changes
             else "no live setting changed")
    saved = {k: getattr(cur, k) for k in LIVE}
    saved_pools = dict(cur.pools)
    _apply(d, {k: getattr(effective, k) for k in LIVE}, pools)

    def revert() -> None:
        log.warning("reload failed: the previous configuration is back")
        _apply(d, saved, saved_pools)

    return revert


def _apply(d: Dispatcher, top: dict[str, Any], pools: dict[str, PoolConfig]) -> None:
    """Set the values on the running configuration (every part holds the same object)."""
    for k, v in top.items():
        setattr(d.cfg, k, v)
    d.cfg.pools = dict(pools)
    for name, state in d.pools.items():
        pc = pools[name]
        if (pc.policy, pc.hash_key) != (state.cfg.policy, state.cfg.hash_key):
            state.policy = make_policy(pc.policy, pc.hash_key)
        state.cfg = pc
        state.rebalance = (not pc.policy.startswith("hash-")) if pc.rebalance is None \
            else pc.rebalance
    logging.getLogger().setLevel(getattr(logging, d.cfg.log_level.upper(), logging.INFO))
    d.listeners.settle_routes()   # (routes and default_pool: where connections go)
