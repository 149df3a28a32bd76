"""The Grafana dashboard only queries series the roles really expose."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics import MigrationSnapshot, make_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def exposed_names() -> set[str]:
    names: set[str] = set()
    for role in ("source", "destination"):
        registry = CollectorRegistry()
        m = make_metrics(registry, role)  # type: ignore[arg-type]
        # downtime is exposed once known
        m.collector.bind(lambda: MigrationSnapshot(downtime_seconds=0.001), 2 if role == "destination" else 0)
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(s.name for s in family.samples)
    return names


def test_every_dashboard_query_names_an_exposed_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    used = {name for e in exprs for name in re.findall(r"\bpostcopy_[a-z_]+", e)}
    missing = used - exposed_names()
    assert not missing, f"the dashboard queries series no role exposes: {sorted(missing)}"
    assert {"postcopy_fault_latency_seconds_bucket", "postcopy_pages_received_total",
            "postcopy_vcpu_blocktime_seconds_total", "postcopy_protocol_errors_total"} <= used
