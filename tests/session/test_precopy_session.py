"""The source session's precopy phase and the switchover policy (pure: no IO, no clock)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import Src, of_type

from postcopy import wire
from postcopy.session import (
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
    SwitchoverPolicy,
)
from postcopy.session._precopy import MIN_ROUND_SECONDS

S = MigrationStatus
MB = 1 << 20


def _round(s: Src, seconds: float, sent: int = 64 * MB) -> list:
    s.now += seconds
    return s.feed(RoundFinished(bytes=sent))


def test_rounds_go_on_until_the_deadline_then_cut_the_round_short() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=2.0)).to_precopy()
    assert s.s.get_timer() == pytest.approx(2.0)
    for i in range(1, 4):
        assert _round(s, 0.3) == [ScanDirty(), StartRound(i)]
    assert s.fire_timer() == [EndRound()]
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert acts[0] == StopGuest() and SendDiscards() in acts
    assert s.s.status is S.POSTCOPY_ACTIVE
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.rounds == 4 and st.bytes == 3 * 64 * MB + MB and st.switch_reason == "time"
    assert st.dirty_pages_last_round == s.dirty_found


def test_a_round_ending_after_the_deadline_switches_without_another() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=1.0)).to_precopy()
    acts = _round(s, 1.5)
    assert acts[:2] == [ScanDirty(), StopGuest()]
    assert s.s.status is S.POSTCOPY_ACTIVE


def test_max_rounds() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=0, max_rounds=2)).to_precopy()
    assert s.s.get_timer() is None
    assert _round(s, 0.2)[-1] == StartRound(1)
    acts = _round(s, 0.2)
    assert StopGuest() in acts and s.s.precopy_stats(s.now).switch_reason == "rounds"  # type: ignore[union-attr]


def test_a_short_round_waits_before_its_scan() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=5.0)).to_precopy()
    assert _round(s, 0.001, sent=0) == []           # an idle guest does not make the source spin
    assert s.s.get_timer() == pytest.approx(MIN_ROUND_SECONDS)
    assert s.fire_timer() == [ScanDirty(), StartRound(1)]


def test_migrate_start_postcopy_during_a_round() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual")).to_precopy()
    assert s.s.get_timer() is None                  # manual: rounds until told
    _round(s, 0.5)
    assert s.feed(StartPostcopy()) == [EndRound()]
    assert s.feed(StartPostcopy()) == []            # once
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    assert StopGuest() in acts and s.s.status is S.POSTCOPY_ACTIVE


def test_a_scan_answer_between_rounds_does_not_double_start() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=5.0)).to_precopy()
    _round(s, 0.5)
    assert s.feed(RoundFinished(bytes=MB)) == []    # a stray second answer: no round is running


def test_the_switch_after_precopy_discards_only_what_is_dirty() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="manual"), dirty_found=42, discard_ranges=5).to_precopy()
    _round(s, 0.5)
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=MB, ended=True))
    data = b"".join(a.data for a in acts if hasattr(a, "data"))
    assert wire.encode(wire.PostcopyListen()) in data
    assert not of_type(acts, MarkAllDirty)
    assert s.s.discard_ranges == 5
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.dirty_pages_at_switch == 42 and st.discard_ranges == 5


def test_a_failure_during_precopy_fails_the_migration() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=5.0)).to_precopy()
    acts = s.feed(ChannelFailed("reset"))
    fin = of_type(acts, Finish)
    assert fin and fin[0].error is not None and fin[0].error.kind == "io"
    assert s.s.status is S.FAILED


def test_start_over_after_precopy_sends_the_whole_stream_again() -> None:
    s = Src(precopy=SwitchoverPolicy(mode="time", max_seconds=0.5)).to_precopy()
    _round(s, 0.6)
    assert s.s.status is S.POSTCOPY_ACTIVE
    assert any(isinstance(e, wire.PostcopyRamDiscard) and e.ranges[0][0] == 0 for e in s.s.switch_events)


# -- the policy ------------------------------------------------------------------------------------


def _r(dirty: int, seconds: float = 1.0, sent: int = 100 * MB) -> RoundRecord:
    return RoundRecord(seconds=seconds, bytes=sent, dirty_pages=dirty)


def test_policy_time_and_rounds() -> None:
    p = SwitchoverPolicy(mode="time", max_seconds=2.0, max_rounds=3)
    assert p.decide([_r(1000)], 1.0) is None
    assert p.decide([_r(1000)], 2.0) == "time"
    assert p.decide([_r(1000)] * 3, 1.5) == "rounds"
    assert p.deadline(10.0) == 12.0
    assert SwitchoverPolicy(mode="manual").deadline(0.0) is None


def test_policy_auto_converged() -> None:
    p = SwitchoverPolicy(mode="auto", max_seconds=30, max_downtime=0.3)
    # 100 MB/s: 0.3 s is 7324 pages
    assert p.decide([_r(100_000), _r(7000)], 2.0) == "converged"
    assert p.decide([_r(100_000), _r(8000)], 2.0) is None
    assert p.decide([_r(0)], 0.1) == "converged"


def test_policy_auto_not_shrinking() -> None:
    p = SwitchoverPolicy(mode="auto", max_seconds=30, max_downtime=0.3)
    assert p.decide([_r(90_000), _r(60_000), _r(40_000)], 3.0) is None        # still shrinking
    assert p.decide([_r(90_000), _r(60_000), _r(58_000)], 3.0) == "not_shrinking"
    assert p.decide([_r(60_000), _r(58_000)], 2.0) is None                    # give it three rounds


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="switchover"):
        SwitchoverPolicy(mode="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        SwitchoverPolicy(max_seconds=-1)
