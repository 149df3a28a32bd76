"""Smoke test of bench/migration.py: a tiny --quick run prints the table and a
complete JSON report. It checks the shape and sanity of the figures, never
their speed."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "migration.py"
sys.path.insert(0, str(BENCH.parent))

from migration import SwitchTrace  # noqa: E402

SWITCH_STEPS = SwitchTrace.STEPS

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.hugetlb, pytest.mark.qemu]


def test_quick_run_prints_every_column_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--scale", "0.05", "--qemu", "on", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    text = proc.stdout
    for column in ("config", "faults", "p50 us", "p99 us", "max us", "p50/floor", "p99/floor",
                   "bulk idle GB/s", "ceiling GB/s", "bulk ratio", "downtime ms", "targets"):
        assert column in text, f"column {column!r} missing from:\n{text}"
    for line in ("loopback TCP RTT", "loopback TCP stream", "UFFDIO_COPY 4K", "UFFDIO_COPY 2M",
                 "plain C remote fault 4K", "Downtime by guest size", "QEMU 7.2 reference",
                 "Downtime against QEMU 7.2 in this run", "Cost as the guest grows", "src CPU s/GiB",
                 "dst MB beyond guest", "each role in its own process (as on two hosts",
                 "both roles in this process (diagnostic", "2-proc worst / QEMU", "in-proc worst / QEMU",
                 "Prefetch that follows the guest", "host CPU steal"):
        assert line in text, f"{line!r} missing from:\n{text}"

    report = json.loads(out.read_text())
    # the hypervisor's share of the run, by section: each from /proc/stat, adding up to the total
    steal = report["host_steal_s"]
    assert set(steal) == {"floors", "migrations", "downtime", "QEMU", "cost", "prefetch", "rest", "total"}
    assert all(v >= 0 for v in steal.values())
    assert math.isclose(steal["total"], sum(v for k, v in steal.items() if k != "total"), abs_tol=1e-6)
    assert report["host"]["python_sum_range_1000_us"] > 0
    assert f"sum(range(1000)) in {report['host']['python_sum_range_1000_us']:.1f} us" in text
    f = report["floors"]
    assert 0 < f["rtt_p50_ns"] <= f["rtt_p99_ns"]
    assert f["tcp_stream_bps"] > 0
    assert set(f["copy_ns"]) == {"4096", "2097152"}
    assert all(v > 0 for v in f["copy_ns"].values())
    configs = [r["config"] for r in report["rows"]]
    assert configs == [
        "4K cap none preempt on", "4K cap 100MiB/s preempt on", "2M cap none preempt on",
        "2M cap 100MiB/s preempt on", "4K cap none preempt off",
    ]
    for r in report["rows"]:
        assert r["runs"] == 1
        assert r["busy_bulk_bps"]
        assert all(b > 0 for b in r["busy_bulk_bps"])
        assert len(r["idle_bulk_bps"]) == (0 if r["cap"] else 1)
        page = 4096 if r["page"] == "4K" else 2 << 20
        if r["idle_bulk_bps"]:      # measured again right before the idle run, the ratio paired with it
            assert len(r["ceilings_bps"]) == len(r["idle_bulk_bps"])
            assert math.isclose(r["ceiling_bps"], statistics.median(r["ceilings_bps"]))
            assert math.isclose(r["bulk_ratio"], statistics.median(
                b / c for b, c in zip(r["idle_bulk_bps"], r["ceilings_bps"], strict=True)))
        else:
            ceiling = min(f["tcp_stream_bps"], page * 1e9 / f["copy_ns"][str(page)])
            assert math.isclose(r["ceiling_bps"], ceiling)
        assert all(d > 0 for d in r["downtime_ns"])
        if r["page"] == "2M" and r["preempt"] and not r["cap"]:     # the 2 MiB fault target, paired by run
            assert len(r["plain_p50s_ns"]) == len(r["run_p50s_ns"]) == r["runs"]
            assert math.isclose(r["ratio_vs_plain"], statistics.median(
                a / b for a, b in zip(r["run_p50s_ns"], r["plain_p50s_ns"], strict=True)))
            assert any("p50<=1.2x plain C" in t for t in r["targets"])
            # the diagnostic beside it: one busy vCPU per pair, over the same plain C fault
            assert len(r["one_vcpu_p50s_ns"]) == r["runs"]
            assert all(p > 0 for p in r["one_vcpu_p50s_ns"])
            assert math.isclose(r["ratio_one_vcpu"], statistics.median(
                a / b for a, b in zip(r["one_vcpu_p50s_ns"], r["plain_p50s_ns"], strict=True)))
            assert any("one busy vCPU" in t for t in r["targets"])
            # and the plain C fault of two faulting threads, measured with each pair
            assert len(r["plain_two_p50s_ns"]) == r["runs"]
            assert all(p > 0 for p in r["plain_two_p50s_ns"])
            assert math.isclose(r["ratio_vs_plain_two"], statistics.median(
                a / b for a, b in zip(r["run_p50s_ns"], r["plain_two_p50s_ns"], strict=True)))
            assert any("over two C faulters" in t for t in r["targets"])
        else:
            assert not r["one_vcpu_p50s_ns"]
            assert not r["plain_two_p50s_ns"]
        if r["faults"]:
            assert r["lat_p50_ns"] <= r["lat_p99_ns"] <= r["lat_max_ns"]
            assert math.isclose(r["ratio_p50"], r["lat_p50_ns"] / r["floor_p50_ns"])
    # a capped bulk stream stays near its cap: the cap really applied to the bench's migration
    for r in report["rows"]:
        if r["cap"]:
            assert r["busy_bulk_bps"][0] <= r["cap"] * 1.3
    sizes = {(d["size"], d["page_size"], d["busy"]) for d in report["downtime"]}
    assert len(sizes) == len(report["downtime"]) >= 4
    assert report["qemu_7_2_reference"], "the QEMU 7.2 reference table was not read"
    assert all("downtime ms" in row for row in report["qemu_7_2_reference"])

    # the same-run QEMU downtime: one row per 4K downtime size, ours against QEMU's STOP -> RESUME
    same = report["qemu_same_run"]
    sizes_4k = sorted({d["size"] for d in report["downtime"] if d["page_size"] == 4096})
    assert [r["size"] for r in same] == sizes_4k
    for r in same:
        assert r["qemu_stop_to_resume_us"]
        assert all(0 < us < 10_000_000 for us in r["qemu_stop_to_resume_us"])
        assert set(r["ours_ns"]) == {"idle", "busy"}
        assert math.isclose(r["ratio"], max(r["ours_ns"].values()) / r["qemu_median_ns"])
        assert r["verdict"] in ("ok", "miss")
    assert any("measured in this run" in t["target"] for t in report["downtime_targets"])

    # downtime with each role in its own process: --quick runs the sizes up to 256 MiB (all of them at
    # --scale 0.05), idle and busy once each; the targets use them, the in-process worst is reported beside
    two = report["downtime_two_process"]
    assert {(d["size"], d["page_size"]) for d in two} == {(d["size"], d["page_size"]) for d in report["downtime"]}
    assert not report["downtime_two_process_skipped"]
    for d in two:
        assert 0 < d["downtime_ns"] < 10_000_000_000
        assert d["postcopy_s"] > 0
        # the phases come from both processes' traces and add up to the downtime
        ph = d["phases_ns"]
        assert {"src_guest_stop_ns", "dest_listen_register_ns", "pong3_to_source_ns"} <= set(ph)
        steps = [k for k, _ in SWITCH_STEPS] + ["pong3_to_source_ns"]
        assert sum(v for k, v in ph.items() if k in steps) == d["downtime_ns"]
    table = report["downtime_two_process_table"]
    assert len(table) == len(two)       # --quick: one run per (size, page, load)
    for g in table:
        assert g["min_ns"] <= g["median_ns"] <= g["max_ns"]
        assert g["verdict"] == ("ok" if g["max_ns"] <= 2_000_000 else "miss")
    worst2 = max(d["downtime_ns"] for d in two)
    worst1 = max(d["downtime_ns"] for d in report["downtime"])
    targets = {t["target"]: t for t in report["downtime_targets"]}
    t2 = targets["downtime <= 2 ms at every size, busy or idle (each role in its own process)"]
    assert t2["verdict"] == ("ok" if worst2 <= 2_000_000 else "miss")
    assert f"worst {worst2 / 1e6:.2f} ms" in t2["measured"]
    # the same runs' exact figure (the guest's stop -> its vCPUs started there), never above PONG 3's arrival
    exact = [d["phases_ns"]["stop_to_dest_running_ns"] for d in two]
    assert all(0 < e <= d["downtime_ns"] for e, d in zip(exact, two, strict=True))
    te = next(t for name, t in targets.items() if "vCPUs started on the destination" in name)
    assert te["verdict"] == ("ok" if max(exact) <= 2_000_000 else "miss")
    assert f"worst {max(exact) / 1e6:.2f} ms" in te["measured"]
    t1 = targets["downtime <= 2 ms at every size, busy or idle (in-process diagnostic: both roles share one GIL)"]
    assert f"worst {worst1 / 1e6:.2f} ms" in t1["measured"]
    assert any("each role in its own process" in t["target"] and "QEMU" in t["target"] for t in targets.values())
    for r in same:
        mine = [d["downtime_ns"] for d in two if d["size"] == r["size"] and d["page_size"] == 4096]
        assert sorted(r["ours_two_process_ns"]["idle"] + r["ours_two_process_ns"]["busy"]) == sorted(mine)
        assert math.isclose(r["two_process_ratio"], max(mine) / r["qemu_median_ns"])
        assert r["two_process_verdict"] in ("ok", "miss")
    # the cost rows: --quick stops at 1 GiB (times --scale), both sides measured
    cost = report["cost"]
    assert [c["size"] for c in cost] == [12 << 20, 51 << 20]
    for c in cost:
        assert c["s_per_gib"] > 0
        for role in ("source", "destination"):
            assert c[role]["status"] == "completed"
            assert c["cpu_s_per_gib"][role] > 0
            assert c["memory_fraction"][role] >= 0
            assert c["verdicts"][role] in ("ok", "miss")
    assert {t["verdict"] for t in report["cost_targets"]} <= {"ok", "miss"}
    assert len(report["cost_targets"]) == 2

    # prefetch that follows the guest: the default demo (scaled), seq and random, prefetch on and off once each
    pf = report["prefetch"]
    assert pf["size"] == 51 << 20
    assert sorted((r["pattern"], r["prefetch"]) for r in pf["rows"]) == [
        ("random", False), ("random", True), ("seq", False), ("seq", True)]
    for r in pf["rows"]:
        assert r["gbps"] > 0
        assert 0 <= r["fault_pct"] <= 100
        if not r["prefetch"]:
            assert r["prefetch_pages"] == 0, r       # prefetch off sends nothing ahead
    seq_on = next(r for r in pf["rows"] if r["pattern"] == "seq" and r["prefetch"])
    assert seq_on["prefetch_pages"] > 0, seq_on     # a sequential guest is followed
    assert pf["medians"]["seq/on"]["fault_pct"] == seq_on["fault_pct"]
    names = [t["target"] for t in pf["targets"]]
    assert len(names) == 4
    assert any("remote faults <= 5%" in n for n in names)
    assert any("no slower with prefetch" in n for n in names)
    random_on = next(r for r in pf["rows"] if r["pattern"] == "random" and r["prefetch"])
    assert pf["medians"]["random on/off paired"]["pages_sent_ahead"] == random_on["prefetch_pages"]
    paired = next(t for t in pf["targets"] if "no slower with prefetch" in t["target"])
    assert paired["measured"].endswith(f"; {random_on['prefetch_pages']} pages sent ahead in the random demos")
    assert {t["verdict"] for t in pf["targets"]} <= {"ok", "miss"}
    for t in pf["targets"]:
        assert f"target {t['target']}: {t['measured']} -> {t['verdict']}" in text
