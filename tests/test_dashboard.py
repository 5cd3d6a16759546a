"""The Grafana dashboard (deploy/grafana/ctxstream.json) only queries metrics the streamer and the
loader export, by the names prometheus-client gives their samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from ctxstream.loader.metrics import LoaderMetrics
from ctxstream.streamer.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "ctxstream.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def exported(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def queried() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    return {m for e in exprs for m in re.findall(r"\b(?:ctxstream|process)_[a-z_]+\b", e)}


def test_every_dashboard_query_names_an_exported_metric():
    names = exported(Metrics().registry) | exported(LoaderMetrics().registry)
    used = queried()
    assert used - names == set(), f"the dashboard queries metrics nobody exports: {sorted(used - names)}"
    # and it covers every family the streamer and loader declare (process metrics aside)
    families = {f.name for r in (Metrics(process=False).registry, LoaderMetrics().registry) for f in r.collect()}
    uncovered = {f for f in families if not any(u.startswith(f) for u in used)}
    assert uncovered == set(), f"metrics without a panel: {sorted(uncovered)}"


def test_the_name_check_catches_a_typo():
    names = exported(Metrics().registry)
    assert "ctxstream_request_seconds_bucket" in names and "ctxstream_requests_total" in names
    assert "ctxstream_request_second_bucket" not in names and "ctxstream_requests_seconds_total" not in names
