"""The switch after precopy: the guest's writers yield to the migration, the drain resends (pure)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import DRAIN_PING_BYTES, Src

from postcopy import wire
from postcopy.session import (
    Channel,
    DirtyScanned,
    EndRound,
    MigrationStatus,
    ReturnPathMessage,
    RoundFinished,
    ScanDirty,
    SendDiscards,
    StartPostcopy,
    StartRound,
    StartTracking,
    StopGuest,
    StopTracking,
    SwitchoverPolicy,
    ThrottlePolicy,
    Write,
    WriterPriority,
)
from postcopy.session._precopy import THROTTLE_PRESETS, WRITER_NICE
from postcopy.session._source import DRAIN_PING

S = MigrationStatus
MB = 1 << 20


def test_the_writers_yield_during_precopy_and_get_their_priority_back_at_the_switch() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0))
    acts = s.start()
    # lowered before tracking starts and the first pass goes
    i = acts.index(WriterPriority(WRITER_NICE))
    assert acts[i + 1] == StartTracking()
    s.now += 0.5
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert acts[0] == StopGuest()
    assert acts.index(WriterPriority(0)) > acts.index(StopTracking())
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.writer_nice == WRITER_NICE


def test_writer_nice_0_leaves_the_guest_alone() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0, writer_nice=0))
    acts = s.start()
    assert not [a for a in acts if isinstance(a, WriterPriority)]
    with pytest.raises(ValueError, match="writer nice"):
        SwitchoverPolicy(writer_nice=20)


def _switch_due(s: Src) -> list:
    s.now += 0.5
    s.feed(StartPostcopy())
    return s.feed(RoundFinished(bytes=MB, ended=True))


def test_the_resend_drain_sends_a_last_pass_then_pings_behind_it() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0.5), answer_drain=False).to_precopy()
    acts = _switch_due(s)
    # guest running: scan, then a last pass of what it found (no discard: the destination keeps the pages)
    assert acts == [ScanDirty(), StartRound(1)]
    assert not [a for a in acts if isinstance(a, SendDiscards)]
    s.now += 0.05
    acts = s.feed(RoundFinished(bytes=3 * MB))
    assert acts == [Write(Channel.MAIN, DRAIN_PING_BYTES)]
    # PONG: a scan of what the guest wrote meanwhile; few runs -> stop, exact discards after it
    s.now += 0.01
    acts = s.rp(wire.Pong(value=DRAIN_PING))
    assert acts[:3] == [ScanDirty(), StopGuest(), ScanDirty()]
    assert acts[3] == SendDiscards(max_ranges=512)
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "pong" and st.drain_bytes == 3 * MB and st.drain_passes == 1
    assert st.discard_ranges_before_stop == 0 and s.s.status is S.POSTCOPY_ACTIVE


def _drive_rescan(s: Src, runs: int) -> list:
    """The PONG after a pass, its scan answered with ``runs`` discard runs."""
    acts = s.s.handle(wire_pong(), s.now)
    assert acts == [ScanDirty()]
    return s.feed(DirtyScanned(100, runs))


def wire_pong() -> ReturnPathMessage:
    return ReturnPathMessage(wire.Pong(value=DRAIN_PING))


def test_another_pass_while_the_runs_halve_then_the_stop() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=1.0), answer_drain=False).to_precopy()
    s.now += 0.5
    s.feed(StartPostcopy())
    # the driver answers ScanDirty with runs -1 (not counted): feed the scans by hand instead
    acts = s.s.handle(RoundFinished(bytes=MB, ended=True), s.now)
    assert acts == [ScanDirty()]
    assert s.s.handle(DirtyScanned(50_000, 20_000), s.now) == [StartRound(1)]
    assert s.s.handle(RoundFinished(bytes=100 * MB), s.now) == [Write(Channel.MAIN, DRAIN_PING_BYTES)]
    # the guest wrote 5000 runs meanwhile: fewer than half, more than the 512 allowed after the stop
    assert _drive_rescan(s, 5000) == [StartRound(2)]
    assert s.s.handle(RoundFinished(bytes=20 * MB), s.now) == [Write(Channel.MAIN, DRAIN_PING_BYTES)]
    # 4000 runs: not halved -> stop now
    acts = _drive_rescan(s, 4000)
    assert StopGuest() in acts
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain_passes == 2 and st.drain_bytes == 120 * MB


def test_the_drain_deadline_cuts_the_last_pass_and_stops() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0.3), answer_drain=False).to_precopy()
    acts = _switch_due(s)
    assert acts[-1] == StartRound(1)
    assert s.s.get_timer() == pytest.approx(s.now + 0.3)
    acts = s.fire_timer()
    assert acts == [EndRound()]
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert acts[0] == StopGuest()            # no PING: the deadline passed
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "timeout"


def test_no_sync_cut_during_the_last_pass() -> None:
    t = ThrottlePolicy(sync_seconds=0.1)
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=1.0, throttle=t), answer_drain=False).to_precopy()
    s.now += 0.05
    s.feed(StartPostcopy())
    s.feed(RoundFinished(bytes=MB, ended=True))
    # the pass is under way: only the drain deadline is armed, not a sync period
    assert s.s.get_timer() == pytest.approx(s.now + 1.0)


def test_throttle_presets() -> None:
    assert ThrottlePolicy.preset("qemu") == ThrottlePolicy()
    fast = ThrottlePolicy.preset("fast")
    assert fast is THROTTLE_PRESETS["fast"] and fast.high_periods == 1 and fast.initial >= 90
    with pytest.raises(ValueError, match="choose"):
        ThrottlePolicy.preset("slow")
