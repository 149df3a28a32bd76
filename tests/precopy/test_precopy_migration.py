"""Precopy, then postcopy, end to end (a Source and a Destination in this process
over loopback, the guest writing on the source throughout the rounds).

After the switch every page the destination holds must be the source's page at
the switch (no stale precopy page survives its discard) and the guest's own
replay must agree; with 4 KiB and 2 MiB pages, and with a recovery in the
postcopy phase. The soft-dirty method is covered by tests/precopy/test_tracking.py
as far as this kernel allows (CONFIG_MEM_SOFT_DIRTY).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from harness import Outcome, check, migrate

from postcopy.destination import Destination
from postcopy.session import SwitchoverPolicy, ThrottlePolicy
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_2M, PAGE_4K

pytestmark = pytest.mark.root


def _precopy(o: Outcome, min_rounds: int = 2, stale: bool = True, drain: tuple[str, ...] = ("pong",)) -> None:
    pre = o.source.precopy
    assert pre is not None
    assert pre.tracking == "wp-async"
    assert pre.rounds >= min_rounds, pre
    assert pre.bytes > 0
    assert pre.seconds > 0
    # the guest kept writing: pages went stale on the destination and were discarded at the switch
    # (before the stop what the last scan found, after it what the guest wrote during the drain)
    if stale:
        assert pre.dirty_pages_before_stop + pre.dirty_pages_at_switch > 0, pre
        # the drain resent what the last scan found (or discarded it); after the stop, discards
        assert pre.discard_ranges > 0 or pre.drain_bytes > 0, pre
    assert o.dest.discard_ranges == pre.discard_ranges
    # the link was drained before the stop: the destination answered the PING behind every precopy page
    assert pre.drain in drain, pre


@pytest.mark.parametrize("pattern", ["random", "hot"])
def test_4k_guest_writing_during_precopy(pattern: str) -> None:
    spec = GuestSpec.simple(32 << 20, PAGE_4K, vcpus=2, pattern=pattern, write_percent=30, rate_limit=50_000)
    o = migrate(spec, preempt=True, warmup=0.1,
                source_options={"precopy": SwitchoverPolicy(mode="time", max_seconds=1.0), "tracking": "wp-async"})
    check(o, spec)
    _precopy(o)


@pytest.mark.hugetlb
def test_2m_guest_writing_during_precopy() -> None:
    spec = GuestSpec.simple(64 << 20, PAGE_2M, vcpus=2, pattern="random", write_percent=30, rate_limit=20_000)
    o = migrate(spec, preempt=True, warmup=0.1,
                source_options={"precopy": SwitchoverPolicy(mode="time", max_seconds=1.0), "tracking": "wp-async"})
    check(o, spec)
    _precopy(o)


def test_no_preempt_and_a_fast_writer() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=50)
    o = migrate(spec, preempt=False, warmup=0.1,
                source_options={"precopy": SwitchoverPolicy(mode="time", max_seconds=0.8), "tracking": "wp-async"})
    check(o, spec)
    _precopy(o, min_rounds=1)


@pytest.mark.parametrize("mode", ["resend", "discard"])
def test_a_flat_out_guest_drains_before_the_stop(mode: str) -> None:
    """Precopy pages queue up in the socket buffers while a flat-out guest shares the CPUs; the
    switch waits (guest running) for the destination to take them and what the last scan found
    (resent in a last pass, or dropped), so the downtime covers only the pages written since."""
    spec = GuestSpec.simple(64 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=10)
    policy = SwitchoverPolicy(mode="time", max_seconds=1.0, drain_mode=mode)  # type: ignore[arg-type]
    o = migrate(spec, preempt=True, warmup=0.1, source_options={"precopy": policy, "tracking": "wp-async"})
    check(o, spec)
    _precopy(o, min_rounds=1)
    pre = o.source.precopy
    assert pre is not None
    if mode == "resend" and pre.drain_fallback == "":
        assert pre.drain_bytes > 0, pre                 # sent again while the guest still ran
        assert pre.discard_ranges_before_stop == 0, pre
        assert pre.drain_passes >= 1, pre
        assert 0 < pre.drain_seconds < 1.0, pre
        return
    if mode == "resend":
        # a loaded machine: the pass did not fit in its share of the drain; it fell back to discards
        assert pre.drain_fallback == "deadline", pre
        assert pre.discard_ranges_before_stop > 0, pre
        return
    assert pre.discard_ranges_before_stop > 0, pre      # dropped while the guest still ran
    assert pre.dirty_pages_before_stop > 0, pre
    assert 0 < pre.drain_seconds < 1.0, pre
    # what the stop still discards is only what the guest wrote during the drain
    assert pre.discard_ranges - pre.discard_ranges_before_stop <= pre.dirty_pages_at_switch, pre
    assert o.source.downtime_ns < 1_000_000_000, o.source.downtime_ns


def test_a_flat_out_guest_over_a_slow_link_falls_back_to_discards_before_the_stop() -> None:
    """The resend pass of what a flat-out guest dirtied would not reach the destination within the
    drain at the link's 8 MB/s: no queue of it may be left for the downtime. The pass is cut at its
    share of the drain and followed by the discards of what is left and a fresh PING; the guest
    stops once the destination has taken everything sent."""
    spec = GuestSpec.simple(64 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=10)
    policy = SwitchoverPolicy(mode="time", max_seconds=1.0, drain_seconds=2.0)     # margin for a loaded machine
    o = migrate(spec, preempt=True, cap=8 << 20, warmup=0.1,
                source_options={"precopy": policy, "tracking": "wp-async"})
    check(o, spec)
    _precopy(o, min_rounds=1)
    pre = o.source.precopy
    assert pre is not None
    assert pre.drain_fallback == "deadline", pre
    # what the cut pass did not send was dropped on the destination while the guest still ran
    assert pre.discard_ranges_before_stop > 0, pre
    assert pre.dirty_pages_before_stop > 0, pre
    assert pre.drain_passes == 1, pre
    assert pre.drain_bytes > 0, pre
    # the stop waited for the destination (its PONG), not for a deadline with data still queued
    assert pre.drain == "pong", pre
    assert pre.as_dict()["drain_fallback"] == pre.drain_fallback


def _verified_precopy_demo(tmp_path, *args: str) -> tuple[dict, str]:
    """`postcopy demo` of a 32 MiB random guest with 1 s of precopy and --verify (plus ``args``):
    it completed with every page checked; its report's precopy part, and what it printed."""
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "postcopy", "demo", "--size", "32M", "--pattern", "random",
                        "--precopy-seconds", "1", "--verify", *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    assert d["verified"]
    assert d["status"] == "completed"
    return d["precopy"], r.stdout


def test_demo_reports_the_drain_fallback(tmp_path) -> None:
    pre, stdout = _verified_precopy_demo(tmp_path, "--write-percent", "10", "--guest-rate", "0",
                                         "--bandwidth-cap", "8M", "--progress", "none")
    assert pre["drain_fallback"] == "deadline", pre
    assert pre["drain"] == "pong", pre
    assert "fell back to discards" in stdout, stdout


def test_throttled_precopy_of_a_flat_out_guest() -> None:
    spec = GuestSpec.simple(64 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=50)
    throttle = ThrottlePolicy(initial=50, increment=25, maximum=95, high_periods=1, sync_seconds=0.2)
    o = migrate(spec, preempt=True, warmup=0.1,
                source_options={"precopy": SwitchoverPolicy(mode="time", max_seconds=1.2, throttle=throttle),
                                "tracking": "wp-async"})
    check(o, spec)
    _precopy(o, min_rounds=2, stale=False)     # at 95 % the guest may write nothing after the last scan
    pre = o.source.precopy
    assert pre is not None
    assert pre.throttle_percent >= 50, pre
    assert pre.throttle_changes >= 1, pre


def test_auto_switchover_on_an_idle_guest_converges() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=1, pattern="hot", write_percent=1, rate_limit=100)
    o = migrate(spec, preempt=True, warmup=0.1,
                source_options={"precopy": SwitchoverPolicy(mode="auto", max_seconds=10.0), "tracking": "wp-async"})
    check(o, spec)
    pre = o.source.precopy
    assert pre is not None
    assert pre.switch_reason == "converged", pre
    assert pre.seconds < 5.0, pre


def test_recovery_in_the_postcopy_phase_after_precopy() -> None:
    spec = GuestSpec.simple(16 << 20, PAGE_4K, vcpus=2, pattern="random", write_percent=30, rate_limit=2000)
    cuts: list[int] = []

    def during(src: Source, dst: Destination) -> None:
        while src.result.status != "postcopy-active":
            if src.result.status in ("completed", "failed"):
                return
            time.sleep(0.002)
        time.sleep(0.05)
        if src.result.status == "postcopy-active":
            dst.pause()
            cuts.append(1)

    o = migrate(spec, preempt=True, cap=4 << 20, warmup=0.1, during=during,
                source_options={"precopy": SwitchoverPolicy(mode="time", max_seconds=0.6), "tracking": "wp-async",
                                "link_timeout": 1.0},
                dest_options={"link_timeout": 1.0})
    check(o, spec)
    # at 4 MB/s the last resend pass may not end within the drain's second: its deadline stops the guest
    _precopy(o, min_rounds=1, drain=("pong", "timeout"))
    assert cuts
    assert o.source.recoveries >= 1


def test_demo_with_precopy_verifies(tmp_path) -> None:
    pre, stdout = _verified_precopy_demo(tmp_path, "--write-percent", "20", "--guest-rate", "20000",
                                         "--progress", "lines")
    assert set(pre) >= {"rounds", "bytes", "seconds", "dirty_pages_last_round", "dirty_rate_pages_per_s"}
    assert pre["rounds"] >= 2
    assert pre["bytes"] > 32 << 20
    assert pre["drain"] == "pong"
    assert "precopy round" in stdout or "precopy" in stdout
