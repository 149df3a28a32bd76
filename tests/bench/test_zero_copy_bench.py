"""bench/zero_copy.py and the C stream under it (netbench.c pc_nb_record_stream): every way
delivers the records exactly (checked record by record in C), and a small run prints and writes
every figure. Shape and sanity only, never speed."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "zero_copy.py"
sys.path.insert(0, str(BENCH.parent))

from _floor import RECORD_STREAM_WAYS, record_stream  # noqa: E402

from uffd import PAGE_2M, PAGE_4K, RamBlock  # noqa: E402
from uffd import memtouch as mt  # noqa: E402

MiB = 1 << 20


@pytest.mark.parametrize("page_size", [PAGE_4K, pytest.param(PAGE_2M, marks=pytest.mark.hugetlb)],
                         ids=["4K", "2M"])
@pytest.mark.parametrize("way", list(RECORD_STREAM_WAYS))
def test_every_way_delivers_each_record_exactly(page_size: int, way: str) -> None:
    """The receiver compares each header and page with the block (a wrong one fails the call):
    by reference too, where a header page rewritten while an skb holds it would show."""
    with RamBlock("zc.test", 8 * MiB, page_size, "anon" if page_size == PAGE_4K else "hugetlbfs") as block:
        mt.fill_pattern(block, 0, block.used_length, seed=21)
        r = record_stream(block, way, verify=True)
    per_page = PAGE_4K if way == "splice-pages" else PAGE_4K + 8
    assert r.nbytes == 8 * MiB // PAGE_4K * per_page
    assert min(r.elapsed_ns, r.sender_cpu_ns, r.receiver_cpu_ns) > 0


def test_an_unknown_way_is_refused() -> None:
    with RamBlock("zc.test", MiB) as block, pytest.raises(ValueError, match="'sendfile' is not one of copy"):
        record_stream(block, "sendfile")


@pytest.mark.slow
@pytest.mark.hugetlb
def test_small_run_prints_both_page_sizes_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "zc.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--size", "32M", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    for line in ("| 4 KiB | copy ", "| 2 MiB | splice-pages ", "4 KiB: splice / copy ", "2 MiB: splice / copy ",
                 "2 MiB: copy / ceiling "):
        assert line in proc.stdout, f"{line!r} missing from:\n{proc.stdout}"
    report = json.loads(out.read_text())
    assert [r["page_size"] for r in report["results"]] == [PAGE_4K, PAGE_2M]
    for r in report["results"]:
        assert set(r["runs"]) == set(RECORD_STREAM_WAYS)
        assert all(len(runs) == 2 and all(x["gbps"] > 0 for x in runs) for runs in r["runs"].values())
        assert len(r["ceiling_gbps"]) == 2
        assert r["copy_over_ceiling"]["median"] == statistics.median(
            c["gbps"] / g for c, g in zip(r["runs"]["copy"], r["ceiling_gbps"], strict=True))
        for way, paired in r["over_copy"].items():
            ratios = [s["gbps"] / c["gbps"] for s, c in zip(r["runs"][way], r["runs"]["copy"], strict=True)]
            assert (paired["min"], paired["max"]) == (min(ratios), max(ratios))
            assert paired["min"] <= paired["median"] <= paired["max"]
