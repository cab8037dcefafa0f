"""The whole ``/metrics`` page of a live ``sockshare serve``, read by Prometheus' own parser.

The page is fetched from a running server that has served and migrated connections,
and parsed with ``prometheus_client.parser.text_string_to_metric_families`` (the
reference Python implementation of the text format). Checked: every family has HELP and
a known TYPE, no family appears twice, counters end in ``_total``, the migration
duration is a real histogram (cumulative ``le`` buckets from 0.1 ms to 10 s, ``+Inf`` ==
``_count``) whose count matches the migrations, and each renamed counter is still there
under its old name, marked deprecated, with the same samples.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from live_helpers import LineClient, LiveServer
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ask

from sockshare.server._metrics import DEPRECATED, Histogram, render

pytestmark = pytest.mark.timeout(120)

APP = "live_apps:handle"


def _families(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} appears twice"
        out[fam.name] = fam
    return out


def _by_labels(fam: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}


def test_whole_metrics_page_parses_with_prometheus_client(tmp_path: Path) -> None:
    with LiveServer(tmp_path, "--no-rebalance", "--metrics", "127.0.0.1:0", app=APP,
                    workers=2) as srv:
        addr = srv.address()
        for _ in range(5):
            ask(addr)
        clients = [LineClient(addr) for _ in range(3)]
        for c in clients:
            c.ask("echo 1")
            assert c.ask("move")["moved"]
        st = srv.wait_for(lambda st: st["counters"]["migrations"] == 3, what="3 migrations")
        host, port = st["metrics"].rsplit(":", 1)
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        for c in clients:
            c.close()

    fams = _families(text)
    assert len(fams) >= 25
    for fam in fams.values():
        assert fam.type in ("counter", "gauge", "histogram"), (fam.name, fam.type)
        assert fam.documentation, f"{fam.name} has no HELP"
    for name in re.findall(r"^# TYPE (\S+) counter$", text, re.M):
        assert name.endswith("_total"), f"counter {name} does not end in _total"

    # the migration duration: a histogram that sums across dispatchers
    hist = fams["sockshare_migration_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")]
    bounds = [float(le) for le, _ in buckets]
    assert bounds[0] == 0.0001
    assert bounds[-2:] == [10.0, float("inf")]
    assert bounds == sorted(set(bounds))
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)   # cumulative
    total = {s.name: s.value for s in hist.samples}
    assert counts[-1] == total["sockshare_migration_duration_seconds_count"] == 3
    assert 0 < total["sockshare_migration_duration_seconds_sum"] < 30
    assert st["migration_latency"]["histogram"]["count"] == 3

    # counters named after what they count, with the status' numbers
    c = st["counters"]
    accepted = fams["sockshare_connections_accepted"]
    assert accepted.type == "counter"
    assert sum(s.value for s in accepted.samples) >= c["accepted"] >= 8
    handoffs = fams["sockshare_handoffs_accepted"]
    assert sum(s.value for s in handoffs.samples if s.name.endswith("_total")) >= 8
    assert {s.labels["worker"] for s in handoffs.samples} == {"1", "2"}
    assert [s.value for s in fams["sockshare_connections_lost"].samples] == [0]
    for new in ("sockshare_connections_refused", "sockshare_connections_sniff_failed",
                "sockshare_handoffs_rejected", "sockshare_handoffs_returned",
                "sockshare_handoffs_redispatched"):
        assert fams[new].type == "counter", new

    # the old names, one more release: same samples, HELP says what replaces them
    for old, new in DEPRECATED.items():
        fam = fams[old.removesuffix("_total")]
        assert fam.documentation.startswith("DEPRECATED"), old
        assert new in fam.documentation, old
        if old.endswith("_total"):
            renamed = {(name.replace(new, old), labels): v
                       for (name, labels), v in _by_labels(fams[new.removesuffix("_total")]).items()}
            old_samples = _by_labels(fam)
            # the page was rendered once: the values are the same numbers
            assert old_samples == renamed, old
    assert fams["sockshare_migration_latency_seconds"].type == "gauge"


def test_histogram_buckets_and_sum_of_two_dispatchers() -> None:
    """Bucket counts are cumulative, ``le`` is inclusive, and two dispatchers' histograms
    add up bucket by bucket to the histogram of all their observations."""
    a, b, both = Histogram(), Histogram(), Histogram()
    for i, v in enumerate([0.00005, 0.0001, 0.0003, 0.0011, 0.02, 0.7, 9.99, 10.0, 12.0, 3600.0]):
        (a if i % 2 else b).observe(v)
        both.observe(v)
    sa, sb, sboth = a.snapshot(), b.snapshot(), both.snapshot()
    assert [x + y for x, y in zip(sa["buckets"], sb["buckets"], strict=True)] == sboth["buckets"]
    assert sa["count"] + sb["count"] == sboth["count"] == 10
    le = dict(zip(sboth["le"], sboth["buckets"], strict=False))
    assert le[0.0001] == 2   # 0.1 ms itself falls in le="0.0001"
    assert le[10.0] == 8
    assert sboth["buckets"][-1] == 10   # +Inf
    st = {"counters": {"redispatches": 0, "refused_by_reason": {}, "sniff_failures": 0,
                       "lost": 0},
          "workers": [], "pools": [], "listeners": [],
          "migration_latency": {"histogram": sboth}}
    fams = _families(render(st))
    samples = {(s.name, s.labels.get("le")): s.value
               for s in fams["sockshare_migration_duration_seconds"].samples}
    assert samples[("sockshare_migration_duration_seconds_bucket", "0.0001")] == 2
    assert samples[("sockshare_migration_duration_seconds_bucket", "+Inf")] == 10
    assert samples[("sockshare_migration_duration_seconds_count", None)] == 10
    assert samples[("sockshare_migration_duration_seconds_sum", None)] == pytest.approx(
        sum([0.00005, 0.0001, 0.0003, 0.0011, 0.02, 0.7, 9.99, 10.0, 12.0, 3600.0]))


def test_worker_up_is_one_while_the_channel_is_connected() -> None:
    """``sockshare_worker_up`` is 1 while the worker's channel is connected
    (docs/server.md, "Metrics"): a retiring worker (scaled down, or replaced with no
    successor yet under its id) still has its channel and finishes its connections on
    it; a ``gone`` one has lost it, a ``starting`` one has none yet."""
    def row(wid: int, state: str, *, retiring: bool = False) -> dict[str, Any]:
        return {"id": wid, "pool": "p", "state": state, "connections": 3, "inflight": 0,
                "retiring": retiring}
    st = {"counters": {"redispatches": 0, "refused_by_reason": {}, "sniff_failures": 0,
                       "lost": 0},
          "workers": [row(1, "ready"), row(2, "draining"), row(3, "retiring", retiring=True),
                      row(4, "gone"), row(5, "starting"), row(6, "backoff")],
          "pools": [], "listeners": []}
    up = {s.labels["worker"]: s.value for s in _families(render(st))["sockshare_worker_up"].samples}
    assert up == {"1": 1, "2": 1, "3": 1, "4": 0, "5": 0, "6": 0}
