"""``postcopy demo --inject-link-cuts``: two processes, a fault-injecting proxy
between them, random cuts during postcopy; the migration recovers each time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_demo_recovers_from_random_link_cuts(tmp_path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "postcopy", "demo", "--size", "256M", "--verify", "--inject-link-cuts", "3",
         "--fault-seed", "11", "--bandwidth-cap", "128M", "--pattern", "random", "--guest-rate", "2000",
         "--progress", "none", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["status"] == "completed"
    assert report["verified"] is True
    assert report["pages_mismatched"] == 0
    cuts = report["link_cuts"]
    assert cuts["seed"] == 11
    assert cuts["done"] >= 2, cuts
    assert report["recoveries"] >= cuts["done"]
    assert report["paused_seconds"] > 0
