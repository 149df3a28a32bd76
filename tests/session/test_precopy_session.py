"""The source session's precopy phase and the switchover policy (pure: no IO, no clock)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import Src, of_type

from postcopy import wire
from postcopy.session import (
    Channel,
    ChannelFailed,
    EndRound,
    Finish,
    MarkAllDirty,
    MigrationStatus,
    RoundFinished,
    RoundRecord,
    ScanDirty,
    SendDiscards,
    StartPostcopy,
    StartRound,
    StopGuest,
    StopTracking,
    SwitchoverPolicy,
    ThrottleGuest,
    ThrottlePolicy,
    Write,
)
from postcopy.session._precopy import MIN_ROUND_SECONDS
from postcopy.session._source import DRAIN_PING
from session_drivers import DRAIN_PING_BYTES

S = MigrationStatus
MB = 1 << 20


def _round(s: Src, seconds: float, sent: int = 64 * MB) -> list:
    s.now += seconds
    return s.feed(RoundFinished(bytes=sent))


def test_rounds_go_on_until_the_deadline_then_cut_the_round_short() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=2.0)).to_precopy()
    assert s.s.get_timer() == pytest.approx(2.0)
    for i in range(1, 4):
        assert _round(s, 0.3) == [ScanDirty(), StartRound(i)]
    assert s.fire_timer() == [EndRound()]
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    # guest running: scan, discard what it found, PING; its PONG (answered at once here) stops the guest
    assert acts[:4] == [ScanDirty(), SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_PING_BYTES),
                        StopGuest()]
    assert SendDiscards(max_ranges=512) in acts[4:]
    assert s.s.status is S.POSTCOPY_ACTIVE
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.rounds == 4 and st.bytes == 3 * 64 * MB + MB and st.switch_reason == "time"
    assert st.dirty_pages_last_round == s.dirty_found


def test_a_round_ending_after_the_deadline_switches_without_another() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=1.0)).to_precopy()
    acts = _round(s, 1.5)
    assert acts[:3] == [ScanDirty(), ScanDirty(), SendDiscards(before_stop=True)]
    assert StopGuest() in acts
    assert s.s.status is S.POSTCOPY_ACTIVE


def test_max_rounds() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=0, max_rounds=2)).to_precopy()
    assert s.s.get_timer() is None
    assert _round(s, 0.2)[-1] == StartRound(1)
    acts = _round(s, 0.2)
    assert StopGuest() in acts and s.s.precopy_stats(s.now).switch_reason == "rounds"  # type: ignore[union-attr]


def test_a_short_round_waits_before_its_scan() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=5.0)).to_precopy()
    assert _round(s, 0.001, sent=0) == []           # an idle guest does not make the source spin
    assert s.s.get_timer() == pytest.approx(MIN_ROUND_SECONDS)
    assert s.fire_timer() == [ScanDirty(), StartRound(1)]


def test_migrate_start_postcopy_during_a_round() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual")).to_precopy()
    assert s.s.get_timer() is None                  # manual: rounds until told
    _round(s, 0.5)
    assert s.feed(StartPostcopy()) == [EndRound()]
    assert s.feed(StartPostcopy()) == []            # once
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert StopGuest() in acts and s.s.status is S.POSTCOPY_ACTIVE


def test_a_scan_answer_between_rounds_does_not_double_start() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=5.0)).to_precopy()
    _round(s, 0.5)
    assert s.feed(RoundFinished(bytes=MB)) == []    # a stray second answer: no round is running


def test_the_switch_after_precopy_discards_only_what_is_dirty() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual"), dirty_found=42, discard_ranges=5).to_precopy()
    _round(s, 0.5)
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    data = b"".join(a.data for a in acts if hasattr(a, "data"))
    assert wire.encode(wire.PostcopyListen()) in data
    assert not of_type(acts, MarkAllDirty)
    assert s.s.discard_ranges == 10                 # 5 before the stop (guest running), 5 after
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.dirty_pages_at_switch == 42 and st.discard_ranges == 10
    assert st.discard_ranges_before_stop == 5 and st.dirty_pages_before_stop == 42
    assert st.drain == "pong"


def test_a_failure_during_precopy_fails_the_migration() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=5.0)).to_precopy()
    acts = s.feed(ChannelFailed("reset"))
    fin = of_type(acts, Finish)
    assert fin and fin[0].error is not None and fin[0].error.kind == "io"
    assert s.s.status is S.FAILED


def test_start_over_after_precopy_sends_the_whole_stream_again() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=0.5)).to_precopy()
    _round(s, 0.6)
    assert s.s.status is S.POSTCOPY_ACTIVE
    assert any(isinstance(e, wire.PostcopyRamDiscard) and e.ranges[0][0] == 0 for e in s.s.switch_events)


# -- the policy ------------------------------------------------------------------------------------


def _r(dirty: int, seconds: float = 1.0, sent: int = 100 * MB) -> RoundRecord:
    return RoundRecord(seconds=seconds, bytes=sent, dirty_pages=dirty)


def test_policy_time_and_rounds() -> None:
    p = SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=2.0, max_rounds=3)
    assert p.decide([_r(1000)], 1.0) is None
    assert p.decide([_r(1000)], 2.0) == "time"
    assert p.decide([_r(1000)] * 3, 1.5) == "rounds"
    assert p.deadline(10.0) == 12.0
    assert SwitchoverPolicy(drain_mode="discard", mode="manual").deadline(0.0) is None


def test_policy_auto_converged() -> None:
    p = SwitchoverPolicy(drain_mode="discard", mode="auto", max_seconds=30, max_downtime=0.3)
    # 100 MB/s: 0.3 s is 7324 pages
    assert p.decide([_r(100_000), _r(7000)], 2.0) == "converged"
    assert p.decide([_r(100_000), _r(8000)], 2.0) is None
    assert p.decide([_r(0)], 0.1) == "converged"


def test_policy_auto_not_shrinking() -> None:
    p = SwitchoverPolicy(drain_mode="discard", mode="auto", max_seconds=30, max_downtime=0.3)
    assert p.decide([_r(90_000), _r(60_000), _r(40_000)], 3.0) is None        # still shrinking
    assert p.decide([_r(90_000), _r(60_000), _r(58_000)], 3.0) == "not_shrinking"
    assert p.decide([_r(60_000), _r(58_000)], 2.0) is None                    # give it three rounds


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="switchover"):
        SwitchoverPolicy(drain_mode="discard", mode="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        SwitchoverPolicy(max_seconds=-1)


# -- the drain before the stop -------------------------------------------------------------------


def test_the_guest_stops_when_the_drain_ping_is_answered() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual", drain_seconds=0.5), answer_drain=False).to_precopy()
    _round(s, 0.5)
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    # the guest runs on: what the scan found is dropped on the destination now, then PING
    assert acts == [ScanDirty(), SendDiscards(before_stop=True), Write(Channel.MAIN, DRAIN_PING_BYTES)]
    assert s.s.get_timer() == pytest.approx(s.now + 0.5)
    assert s.rp(wire.Pong(value=0x50430001)) == []       # a heartbeat's PONG is not the drain's
    s.now += 0.1
    acts = s.rp(wire.Pong(value=DRAIN_PING))
    assert acts[0] == StopGuest()
    # guest stopped: the exact scan, only the new discards, then the switch; tracking ends after it
    assert acts[1:3] == [ScanDirty(), SendDiscards(max_ranges=512)]
    assert isinstance(acts[3], Write) and wire.encode(wire.PostcopyListen()) in acts[3].data
    assert acts[4] == StopTracking()
    assert s.s.status is S.POSTCOPY_ACTIVE
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "pong" and st.drain_seconds == pytest.approx(0.1)
    assert s.rp(wire.Pong(value=DRAIN_PING)) == []       # late or twice: nothing more


def test_the_drain_deadline_stops_the_guest_anyway() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=1.0, drain_seconds=0.3), answer_drain=False).to_precopy()
    assert s.fire_timer() == [EndRound()]
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert Write(Channel.MAIN, DRAIN_PING_BYTES) in acts and StopGuest() not in acts
    assert s.s.get_timer() == pytest.approx(1.3)
    acts = s.fire_timer()
    assert acts[0] == StopGuest() and s.s.status is S.POSTCOPY_ACTIVE
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "timeout" and st.drain_seconds == pytest.approx(0.3)


def test_a_link_failure_during_the_drain_fails_before_the_stop() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual"), answer_drain=False).to_precopy()
    _round(s, 0.2)
    s.feed(StartPostcopy())
    s.feed(RoundFinished(bytes=MB, ended=True))
    acts = s.feed(ChannelFailed("reset"))
    assert StopGuest() not in acts and s.s.status is S.FAILED     # the guest never stopped: it runs on here


def test_no_drain_stops_at_once() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual", drain_seconds=0)).to_precopy()
    _round(s, 0.2)
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert acts[0] == StopGuest() and SendDiscards(before_stop=True) not in acts
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.drain == "" and st.discard_ranges_before_stop == 0


# -- throttling (auto-converge) ------------------------------------------------------------------


def test_throttle_policy_as_qemu() -> None:
    t = ThrottlePolicy(initial=20, increment=10, maximum=35)
    high, low = _r(100_000, sent=100 * MB), _r(1000, sent=100 * MB)     # 390 MiB dirtied vs 100 MiB sent
    assert t.after(low, 0, 0) == (0, 0)
    assert t.after(high, 0, 0) == (0, 1)              # once is not enough (QEMU: twice)
    assert t.after(high, 0, 1) == (20, 0)
    assert t.after(high, 20, 1) == (30, 0)
    assert t.after(high, 30, 1) == (35, 0)            # capped
    assert ThrottlePolicy(high_periods=1).after(high, 0, 0) == (20, 0)
    with pytest.raises(ValueError, match="1-99"):
        ThrottlePolicy(maximum=100)
    with pytest.raises(ValueError, match="above its maximum"):
        ThrottlePolicy(initial=50, maximum=40)


def test_a_long_round_is_cut_for_a_sync_period_and_the_pass_goes_on() -> None:
    t = ThrottlePolicy(initial=50, increment=25, maximum=99, high_periods=1, sync_seconds=0.4)
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=5.0, throttle=t), dirty_found=50_000).to_precopy()
    assert s.s.get_timer() == pytest.approx(0.4)
    assert s.fire_timer() == [EndRound()]             # the sync period: cut, scan, measure
    assert s.s.get_timer() == pytest.approx(5.0)      # no second cut while the first one ends
    acts = s.feed(RoundFinished(bytes=40 * MB, ended=True))
    # 50000 pages (195 MiB) dirtied against 40 MiB sent: throttle, and the same pass goes on
    assert acts == [ScanDirty(), ThrottleGuest(50), StartRound(1, resume=True)]
    assert s.fire_timer() == [EndRound()]
    acts = s.feed(RoundFinished(bytes=40 * MB, ended=True))
    assert acts == [ScanDirty(), ThrottleGuest(75), StartRound(2, resume=True)]
    s.now += 0.1
    acts = s.feed(RoundFinished(bytes=400 * MB))     # the pass ended on its own: a new one from the first page
    assert acts == [ScanDirty(), StartRound(3)]
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.throttle_percent == 75 and st.throttle_changes == 2


def test_the_switch_during_a_sync_cut_waits_for_that_round() -> None:
    t = ThrottlePolicy(sync_seconds=0.4)
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual", throttle=t)).to_precopy()
    assert s.fire_timer() == [EndRound()]
    assert s.feed(StartPostcopy()) == []              # the round is ending already: no second EndRound
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert acts[:2] == [ScanDirty(), SendDiscards(before_stop=True)] and StopGuest() in acts


def test_no_throttle_no_sync_cut() -> None:
    s = Src(precopy=SwitchoverPolicy(drain_mode="discard", mode="manual")).to_precopy()
    assert s.s.get_timer() is None
    acts = _round(s, 5.0, sent=MB)
    assert not of_type(acts, ThrottleGuest)
