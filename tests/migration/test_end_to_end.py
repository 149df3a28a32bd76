"""Whole migrations over real loopback TCP with real userfaultfd: a Source and a
Destination in this process (the guest's vCPUs are C threads on both sides)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from harness import Outcome, migrate
from harness import check as check_common

from postcopy.spec import GuestSpec
from uffd import PAGE_2M, PAGE_4K

pytestmark = pytest.mark.root     # kernel-mode faults are not needed, but hugetlb and uffd setup are


def check(o: Outcome, spec: GuestSpec) -> None:
    check_common(o, spec)
    total = sum(b.size for b in spec.blocks) // 4096
    c = o.source.counters
    # every page went out once, on one channel or the other, plus the requested pages that were
    # sent again on preempt because they were still queued behind the bulk stream
    sent = c["main_pages_normal"] + c["main_pages_zero"] + c["preempt_pages_normal"] + c["preempt_pages_zero"]
    assert sent - c["resent_target_pages"] == total


@pytest.mark.parametrize("prealloc", [True, False], ids=["prealloc", "anonymous"])
@pytest.mark.parametrize("preempt", [True, False], ids=["preempt", "no-preempt"])
def test_4k_pages(preempt: bool, prealloc: bool) -> None:
    spec = GuestSpec.simple(64 << 20, PAGE_4K, vcpus=2, pattern="random")
    o = migrate(spec, preempt=preempt, prealloc=prealloc)
    check(o, spec)
    # preallocated: memfds, each page written beside the guest and mapped (UFFDIO_CONTINUE)
    assert o.dest_minor == (prealloc,) * len(spec.blocks)
    assert o.dest.remote_faults > 0           # the guest really ran ahead of the stream
    # QEMU's blocktime: per vCPU, and the total counts only time when every vCPU was blocked
    assert len(o.dest.vcpu_blocktime_ns) == spec.vcpus
    assert sum(o.dest.vcpu_blocktime_ns) > 0
    assert o.dest.blocktime_ns <= min(o.dest.vcpu_blocktime_ns)
    if preempt:
        assert o.source.counters["preempt_pages_normal"] > 0


@pytest.mark.hugetlb
@pytest.mark.parametrize("preempt", [True, False], ids=["preempt", "no-preempt"])
def test_2m_hugetlbfs_pages(preempt: bool) -> None:
    spec = GuestSpec.simple(128 << 20, PAGE_2M, vcpus=2, pattern="hot")
    o = migrate(spec, preempt=preempt)
    check(o, spec)
    # the destination's pages were prefilled (the 4 KiB blocks too): each was written beside the
    # guest and mapped
    assert all(o.dest_minor)
    assert o.dest.remote_faults > 0


def test_bandwidth_cap_does_not_hold_back_requested_pages() -> None:
    """With a 64 MiB/s cap on the bulk stream, requested pages still arrive fast."""
    cap = 64 << 20
    spec = GuestSpec.simple(32 << 20, PAGE_4K, vcpus=2, pattern="random", rate_limit=20000)
    o = migrate(spec, preempt=True, cap=cap)
    check(o, spec)
    postcopy_s = (o.source.finished_ns - o.source.stopped_ns) / 1e9
    main_bytes = o.source.counters["main_bytes"]
    assert main_bytes / postcopy_s <= cap * 1.2, "the cap was not applied to the background stream"
    lat = sorted(o.latencies_ns)
    assert lat, "no remote faults"
    assert lat[len(lat) // 2] < 5_000_000, "requested pages waited behind the capped stream"


def test_zero_pages_travel_as_zero_records() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=1, pattern="hot", write_percent=0)
    o = migrate(spec, preempt=True, warmup=0.05)
    check(o, spec)
    c = o.source.counters
    assert c["main_pages_zero"] + c["preempt_pages_zero"] > 0


def test_demo_command_verifies(tmp_path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "postcopy", "demo", "--size", "64M", "--verify", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    for key in ("status", "verified", "pages_mismatched", "total_time_s", "downtime_ms", "bytes_transferred",
                "throughput_bytes_per_s", "remote_faults", "fault_latency_us", "pages"):
        assert key in report
    assert report["status"] == "completed"
    assert report["verified"] is True
    assert report["pages_mismatched"] == 0
    assert set(report["fault_latency_us"]) >= {"p50", "p99", "p999", "max"}
    assert set(report["pages"]) >= {"normal", "zero", "requested"}
    assert report["bytes_transferred"] >= 64 << 20


def test_vcpus_faulting_the_same_pages_at_once() -> None:
    """Four vCPUs on a small hot set: several threads block on the same pages; each page is
    requested at most once per fault batch and every waiting thread is woken by one placement."""
    spec = GuestSpec.simple(32 << 20, PAGE_4K, vcpus=4, pattern="hot")
    o = migrate(spec, preempt=True)
    check(o, spec)
    assert o.dest.remote_faults >= o.dest.requests_sent > 0
    assert o.dest.requests_sent <= o.dest.pages_total
    assert len(o.dest.vcpu_blocktime_ns) == 4
    assert all(t > 0 for t in o.dest.vcpu_blocktime_ns)
