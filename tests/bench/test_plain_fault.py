"""The plain C remote fault under bench/migration.py's 2 MiB fault target and bench/lanes.py
(netbench.c pc_nb_remote_fault): every page served is the page asked for (checked page by page
after the call), with one faulting thread or several, over one connection or several. Shape only,
never speed."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from _floor import plain_remote_fault_ns  # noqa: E402

from uffd import PAGE_2M, PAGE_4K  # noqa: E402


@pytest.mark.parametrize("page_size", [PAGE_4K, pytest.param(PAGE_2M, marks=pytest.mark.hugetlb)],
                         ids=["4K", "2M"])
@pytest.mark.parametrize("faulters", [1, 2, 3])
def test_every_page_is_faulted_and_timed(page_size: int, faulters: int) -> None:
    npages = 7 if page_size == PAGE_2M else 301      # not a multiple of the faulters: the last ones get fewer
    lat = plain_remote_fault_ns(npages, page_size, faulters)
    assert len(lat) == npages
    assert all(x > 0 for x in lat), [i for i, x in enumerate(lat) if x <= 0]   # every page was touched and timed


@pytest.mark.parametrize("faulters", [0, 9])
def test_faulters_out_of_range_is_refused(faulters: int) -> None:
    with pytest.raises(ValueError, match="faulters"):
        plain_remote_fault_ns(4, PAGE_4K, faulters)


@pytest.mark.parametrize("page_size", [PAGE_4K, pytest.param(PAGE_2M, marks=pytest.mark.hugetlb)],
                         ids=["4K", "2M"])
@pytest.mark.parametrize(("faulters", "connections"), [(1, 2), (2, 2), (3, 4)])
def test_several_connections_serve_every_fault(page_size: int, faulters: int, connections: int) -> None:
    """Each connection's handler reads the faults it wins from the one userfaultfd: none is lost
    (its faulter would stay blocked: the call would not return), and every page holds what its
    server sent (checked after the call)."""
    npages = 9 if page_size == PAGE_2M else 257
    lat = plain_remote_fault_ns(npages, page_size, faulters, connections)
    assert len(lat) == npages
    assert all(x > 0 for x in lat)


@pytest.mark.parametrize("connections", [0, 5])
def test_connections_out_of_range_is_refused(connections: int) -> None:
    with pytest.raises(ValueError, match="connections"):
        plain_remote_fault_ns(4, PAGE_4K, 1, connections)


def test_lanes_bench_prints_each_round_and_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "lanes.json"
    proc = subprocess.run([sys.executable, str(BENCH / "lanes.py"), "--rounds", "2", "--pages", "64",
                           "--page-size", "4K", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("round ") == 2
    assert "a connection each over one connection (p50): median" in proc.stdout
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 2
    for r in report["rounds"]:
        p50 = r["p50_ns"]
        assert set(p50) == {"one faulter, one connection", "two faulters, one connection",
                            "two faulters, a connection each"}
        assert all(v > 0 for v in p50.values())
        assert r["two_lanes_over_one"] == pytest.approx(p50["two faulters, a connection each"]
                                                        / p50["two faulters, one connection"])
    assert report["median_ratio"] == pytest.approx(statistics.median(r["two_lanes_over_one"] for r in report["rounds"]))
