"""The switch after precopy: the guest's writers yield to the migration, the drain resends (pure)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import DRAIN_FALLBACK_PING_BYTES, DRAIN_PING_BYTES, Src

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
    StatusChanged,
    StopGuest,
    StopTracking,
    SwitchoverPolicy,
    ThrottlePolicy,
    Write,
    WriterPriority,
)
from postcopy.session._precopy import DISCARD_RANGE_SECONDS, DRAIN_DISCARD_WAIT_MAX, THROTTLE_PRESETS, WRITER_NICE
from postcopy.session._source import DRAIN_FALLBACK_PING, DRAIN_PING

S = MigrationStatus
MB = 1 << 20


def test_the_writers_yield_during_precopy_and_get_their_priority_back_at_the_switch() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0))
    acts = s.start()
    # lowered before tracking starts and the first pass goes
    i = acts.index(WriterPriority(WRITER_NICE))
    assert acts[i + 1] == StartTracking()
    # ... and the status says active only after all that (a watcher never sees it active unlowered)
    assert acts.index(StatusChanged(S.ACTIVE)) > acts.index(StartRound(0))
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


def _switch_due(s: Src, sent: int = 100 * MB) -> list:
    """The switch requested 0.5 s into the first round, which had sent ``sent`` bytes."""
    s.now += 0.5
    s.feed(StartPostcopy())
    return s.feed(RoundFinished(bytes=sent, ended=True))


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
    acts = s.s.handle(RoundFinished(bytes=1000 * MB, ended=True), s.now)
    assert acts == [ScanDirty()]
    # 200 MB at the round's 2 GB/s: within the pass's share of the deadline
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


def test_a_late_pass_is_cut_at_its_share_and_falls_back_to_discards_and_a_fresh_ping() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0.4), answer_drain=False).to_precopy()
    acts = _switch_due(s)
    assert acts[-1] == StartRound(1)
    start = s.now
    # the pass has half the drain: cut there, not at the drain's end
    assert s.s.get_timer() == pytest.approx(start + 0.2)
    acts = s.fire_timer()
    assert acts == [EndRound()]
    s.now += 0.01
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    # no stop yet: a scan, what is dirty dropped on the destination, a PING behind it
    assert acts == [ScanDirty(), SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_FALLBACK_PING_BYTES)]
    assert StopGuest() not in acts
    # the fallback's own bounded wait: the rest of the drain
    assert s.s.get_timer() == pytest.approx(s.now + 0.2)
    # the PONG of an earlier drain PING (the queue) is not the fallback's
    assert s.rp(wire.Pong(value=DRAIN_PING)) == []
    s.now += 0.05
    acts = s.rp(wire.Pong(value=DRAIN_FALLBACK_PING))
    # the destination took everything: a scan (few runs: no more discards before the stop), the stop,
    # the exact scan, discards only for what is new
    assert acts[:4] == [ScanDirty(), StopGuest(), ScanDirty(), SendDiscards(max_ranges=512)]
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "pong" and st.drain_fallback == "deadline"
    assert st.drain_bytes == MB and st.discard_ranges_before_stop == 7
    assert st.drain_seconds == pytest.approx(s.now - start)
    assert st.as_dict()["drain_fallback"] == "deadline"


def test_the_fallback_wait_is_bounded_too() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0.4), answer_drain=False).to_precopy()
    _switch_due(s)
    assert s.fire_timer() == [EndRound()]
    s.feed(RoundFinished(bytes=MB, ended=True))
    acts = s.fire_timer()
    assert acts[0] == StopGuest()
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "timeout" and st.drain_fallback == "deadline"


def test_a_pass_sent_whose_pong_is_late_falls_back_too() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=0.4), answer_drain=False).to_precopy()
    _switch_due(s)
    s.now += 0.05
    assert s.feed(RoundFinished(bytes=MB)) == [Write(Channel.MAIN, DRAIN_PING_BYTES)]
    # the pass is on the wire, the destination has not taken it by the pass's share: a queue
    acts = s.fire_timer()
    assert acts == [ScanDirty(), SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_FALLBACK_PING_BYTES)]
    acts = s.rp(wire.Pong(value=DRAIN_FALLBACK_PING))
    assert acts[:2] == [ScanDirty(), StopGuest()]     # no other pass after a fallback
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "pong" and st.drain_fallback == "deadline" and st.drain_passes == 1


def test_a_pass_longer_than_its_share_is_started_and_cut_there() -> None:
    # the first round sent 1 MB in 0.5 s (2 MB/s); the scan finds 100000 pages (410 MB): the pass
    # still starts (what the link carries in its share stays on the destination), the cut ends it
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=1.0), answer_drain=False,
            dirty_found=100_000).to_precopy()
    acts = _switch_due(s, sent=MB)
    assert acts == [ScanDirty(), StartRound(1)]
    assert s.s.get_timer() == pytest.approx(s.now + 0.5)
    assert s.fire_timer() == [EndRound()]
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert acts == [ScanDirty(), SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_FALLBACK_PING_BYTES)]
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain_fallback == "deadline" and st.dirty_pages_before_stop == 100_000


def test_no_sync_cut_during_the_last_pass() -> None:
    t = ThrottlePolicy(sync_seconds=0.1)
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=1.0, throttle=t), answer_drain=False).to_precopy()
    s.now += 0.05
    s.feed(StartPostcopy())
    s.feed(RoundFinished(bytes=MB, ended=True))
    # the pass is under way: only the drain deadline (the pass's share of it) is armed, not a sync period
    assert s.s.get_timer() == pytest.approx(s.now + 0.5)


def test_throttle_presets() -> None:
    assert ThrottlePolicy.preset("qemu") == ThrottlePolicy()
    fast = ThrottlePolicy.preset("fast")
    assert fast is THROTTLE_PRESETS["fast"] and fast.high_periods == 1 and fast.initial >= 90
    with pytest.raises(ValueError, match="choose"):
        ThrottlePolicy.preset("slow")


def _last_pass_cut() -> Src:
    """A manual switch with a 1 s drain: 0.5 s into the first round (1000 MB sent), the scan finds
    20000 runs, the last pass starts, and 0.5 s later (its share of the drain) it is cut."""
    s = Src(precopy=SwitchoverPolicy(mode="manual", drain_seconds=1.0), answer_drain=False).to_precopy()
    s.now += 0.5
    s.feed(StartPostcopy())
    assert s.s.handle(RoundFinished(bytes=1000 * MB, ended=True), s.now) == [ScanDirty()]
    assert s.s.handle(DirtyScanned(50_000, 20_000), s.now) == [StartRound(1)]
    s.now += 0.5
    assert s.s.handle_timer(s.now) == [EndRound()]
    return s


def test_the_fallback_discards_again_while_the_runs_left_shrink() -> None:
    s = _last_pass_cut()
    # cut: the scan finds 30000 runs -> all of them discarded, a fresh PING
    assert s.s.handle(RoundFinished(bytes=500 * MB, ended=True), s.now) == [ScanDirty()]
    assert s.s.handle(DirtyScanned(60_000, 30_000), s.now) == [
        SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_FALLBACK_PING_BYTES)]
    # its PONG: the guest wrote 2000 runs meanwhile (fewer than half, more than 512): discard those too
    s.now += 0.1
    assert s.s.handle(ReturnPathMessage(wire.Pong(value=DRAIN_FALLBACK_PING)), s.now) == [ScanDirty()]
    assert s.s.handle(DirtyScanned(2_500, 2_000), s.now) == [
        SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_FALLBACK_PING_BYTES)]
    # 1500 runs: not halved, but fewer: discards again (a fallback's round of discards is short)
    s.now += 0.02
    assert s.s.handle(ReturnPathMessage(wire.Pong(value=DRAIN_FALLBACK_PING)), s.now) == [ScanDirty()]
    assert s.s.handle(DirtyScanned(1_800, 1_500), s.now) == [
        SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_FALLBACK_PING_BYTES)]
    # then 300 runs: within the bound after the stop -> stop
    s.now += 0.02
    assert s.s.handle(ReturnPathMessage(wire.Pong(value=DRAIN_FALLBACK_PING)), s.now) == [ScanDirty()]
    acts = s.s.handle(DirtyScanned(320, 300), s.now)
    assert acts == [StopGuest()]
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "pong" and st.drain_fallback == "deadline" and st.drain_passes == 1


def test_the_fallback_waits_for_the_destinations_work_on_its_discards() -> None:
    # 20000 runs at 25 us a range: 0.5 s more than the rest of the drain
    s = _last_pass_cut()
    s.s.handle(RoundFinished(bytes=500 * MB, ended=True), s.now)
    s.s.handle(DirtyScanned(60_000, 20_000), s.now)
    assert s.s.get_timer() == pytest.approx(s.now + 0.5 + 20_000 * DISCARD_RANGE_SECONDS)
    # bounded: a million runs wait no longer than DRAIN_DISCARD_WAIT_MAX drains more
    s = _last_pass_cut()
    s.s.handle(RoundFinished(bytes=500 * MB, ended=True), s.now)
    s.s.handle(DirtyScanned(2_000_000, 1_000_000), s.now)
    assert s.s.get_timer() == pytest.approx(s.now + 0.5 + DRAIN_DISCARD_WAIT_MAX * 1.0)


def test_the_fallback_stops_when_the_runs_left_do_not_shrink() -> None:
    s = _last_pass_cut()
    s.s.handle(RoundFinished(bytes=500 * MB, ended=True), s.now)
    s.s.handle(DirtyScanned(6_000, 5_000), s.now)
    s.now += 0.1
    assert s.s.handle(ReturnPathMessage(wire.Pong(value=DRAIN_FALLBACK_PING)), s.now) == [ScanDirty()]
    assert s.s.handle(DirtyScanned(6_000, 5_000), s.now) == [StopGuest()]
